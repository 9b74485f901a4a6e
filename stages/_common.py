"""Set-up and bookkeeping that every training stage repeats: seeds, device, data, outputs."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.codebase import code_hash, module_of
from pipeline.config import RunConfig, TrainConfig, as_dict
from pipeline.data import BatchLoader, Dataset, load_prepared
from pipeline.flops import ModelCost, model_cost
from pipeline.io import (
    file_sha256,
    fingerprint,
    seed_everything,
    set_threads,
    write_csv,
    write_json,
)
from pipeline.training import FitResult, make_loaders, resolve_device


@dataclass(frozen=True)
class TrainingPaths:
    """What a training stage reads and writes; its outputs are named after the stage."""

    stage: str
    dataset: Path = Path("data/prepared.npz")
    teacher: Path = Path("models/teacher.pt")
    start: Path | None = None  # the model training starts from, if not a fresh one

    @property
    def model(self) -> Path:
        return Path("models") / f"{self.stage}.pt"

    @property
    def metrics(self) -> Path:
        return Path("metrics") / f"{self.stage}.json"

    @property
    def plots(self) -> Path:
        return Path("plots") / f"{self.stage}.csv"

    @property
    def checkpoint(self) -> Path:
        return Path("checkpoints") / f"{self.stage}.pt"


@dataclass(frozen=True)
class StageContext:
    device: torch.device
    dataset: Dataset
    dataset_hash: str  # sha256 of the prepared data file, part of every resume fingerprint
    code_hash: str  # pipeline.codebase.code_hash of the stage: checkpoints of other code differ

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.train.images.shape[1:])

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape, device=self.device)

    def loaders(self, cfg: TrainConfig, seed: int) -> tuple[BatchLoader, BatchLoader]:
        return make_loaders(self.dataset, cfg, self.device, seed)

    def fingerprint(self, cfg: Any, *extra: Any) -> str:
        """What a resume checkpoint must match: settings, data, the stage's code, `extra`."""
        return fingerprint(as_dict(cfg), self.dataset_hash, self.code_hash, *extra)

    def model_meta(self, cost: ModelCost, top1: float, **extra: Any) -> dict[str, Any]:
        """What a model file carries for export and model cards."""
        return {"classes": list(self.dataset.classes), "mean": list(self.dataset.mean),
                "std": list(self.dataset.std), "input_shape": list(self.input_shape),
                "dataset": self.dataset.name, "top1": top1, "params": cost.params,
                "macs": cost.macs, **extra}


def start_stage(common: RunConfig, dataset_path: Path, stage_file: str) -> StageContext:
    """Seed, set threads, load the data. stage_file: the stage's `__file__` (whose code is hashed;
    `__file__` rather than the module name, which is "__main__" under `python -m`)."""
    seed_everything(common.seed)
    set_threads(common.threads)
    dataset = load_prepared(dataset_path)
    return StageContext(resolve_device(common.device), dataset, file_sha256(dataset_path),
                        code_hash(module_of(Path(stage_file))))


def cost_of(model: nn.Module, ctx: StageContext) -> ModelCost:
    return model_cost(model, ctx.input_shape)


def training_metrics(result: FitResult, cfg: TrainConfig, ctx: StageContext,
                     common: RunConfig) -> dict[str, Any]:
    """The metrics every training stage reports, from its fit result."""
    return {"top1": result.history[-1]["test_top1"], "epochs": cfg.epochs,
            "train_seconds": round(result.train_seconds, 2),
            "images_per_second": round(result.images_per_second, 1), "device": str(ctx.device),
            "amp": result.amp, "dataset": ctx.dataset.name, "data_checksum": ctx.dataset.checksum,
            "train_images": len(ctx.dataset.train), "test_images": len(ctx.dataset.test),
            "profile": common.profile}


def write_curves_and_metrics(result: FitResult, plots: Path, metrics_path: Path,
                             metrics: dict[str, Any]) -> None:
    write_csv(plots, result.history)
    write_json(metrics_path, metrics)
