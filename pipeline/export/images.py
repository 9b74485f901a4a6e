"""The images every exported file is checked and calibrated on, normalised as the model was
trained: the test split (top-1), its first export.parity_images images (parity gates), and
class-balanced training images (INT8 calibration, the same for every INT8 file of a model)."""

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import LoadedModel, load_model
from pipeline.config import ExportConfig
from pipeline.data import Dataset, balanced_subset, load_prepared, normalize
from pipeline.errors import DataError


@dataclass(frozen=True)
class Images:
    """Normalised float32 inputs, as the model was trained on them."""

    test: np.ndarray  # the whole test split
    labels: np.ndarray  # its labels
    parity: np.ndarray  # the first export.parity_images test images
    calibration: np.ndarray  # class-balanced training images for INT8 calibration


def prepare_images(dataset: Dataset, meta: dict[str, Any], cfg: ExportConfig) -> Images:
    """The images for a model whose metadata is `meta`; refuses a dataset of other classes or
    with fewer training images than calibration needs."""
    if tuple(meta["classes"]) != tuple(dataset.classes):
        raise DataError(f"the model was trained on classes {list(meta['classes'])[:5]}..., the "
                        f"prepared dataset has {list(dataset.classes)[:5]}...; expected the same")
    needed = cfg.quantize.calibration_images
    if len(dataset.train) < needed:
        raise DataError(f"INT8 calibration needs {needed} training images "
                        f"(export.quantize.calibration_images); the prepared dataset has "
                        f"{len(dataset.train)}")
    shape = (1, -1, 1, 1)
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(shape)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(shape)
    test = normalize(dataset.test.images, mean, std).numpy()
    calibration = normalize(balanced_subset(dataset.train, needed).images, mean, std).numpy()
    return Images(test, dataset.test.labels.numpy(), test[:cfg.parity_images], calibration)


def model_and_images(model_path: str | os.PathLike, dataset_path: str | os.PathLike,
                     cfg: ExportConfig) -> tuple[LoadedModel, Images]:
    """The model file every exported form of it is made from, and the images they are checked
    and calibrated on."""
    loaded = load_model(model_path)
    return loaded, prepare_images(load_prepared(dataset_path), loaded.meta, cfg)
