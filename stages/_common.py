"""Set-up and bookkeeping that every training stage repeats: seeds, device, data, outputs, and
the processes of data-parallel training (pipeline.distributed)."""

import logging
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import distributed
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
from pipeline.training import FitResult, make_loaders


@dataclass(frozen=True)
class TrainingPaths:
    """What a training stage reads and writes; its outputs are named after the stage."""

    stage: str
    dataset: Path = Path("data/prepared.npz")
    teacher: Path = Path("models/teacher.pt")
    # the teacher_logits stage's table; None: the teacher runs live
    teacher_logits: Path | None = Path("data/teacher_logits.npy")
    start: Path | None = None  # the model training starts from, if not a fresh one
    latency_budget: Path = Path("latency/budget.json")  # a latency budget and its table

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
    dist: distributed.DistEnv = field(default_factory=distributed.DistEnv)  # this process's
    # place among the training processes (one process unless common.distributed asks for more)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.train.images.shape[1:])

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape, device=self.device)

    def loaders(self, cfg: TrainConfig, seed: int) -> tuple[BatchLoader, BatchLoader]:
        """Training and test batches; in data-parallel training, this process's shard."""
        return make_loaders(self.dataset, cfg, self.device, seed, self.dist.rank,
                            self.dist.world_size)

    def fingerprint(self, cfg: Any, *extra: Any) -> str:
        """What a resume checkpoint must match: settings, data, the stage's code, `extra`."""
        return fingerprint(as_dict(cfg), self.dataset_hash, self.code_hash, *extra)

    def model_meta(self, cost: ModelCost, top1: float, **extra: Any) -> dict[str, Any]:
        """What a model file carries for export and model cards."""
        return {"classes": list(self.dataset.classes), "mean": list(self.dataset.mean),
                "std": list(self.dataset.std), "input_shape": list(self.input_shape),
                "dataset": self.dataset.name, "top1": top1, "params": cost.params,
                "macs": cost.macs, **extra}


def trains(stage_file: str) -> bool:
    """Whether the stage trains: its `Settings` hold a training schedule (a TrainConfig).

    Only such stages run as several processes when common.distributed asks for them; the
    others (e.g. slimming) always run as one.
    """
    module = next((m for m in list(sys.modules.values())
                   if getattr(m, "__file__", None)
                   and Path(m.__file__).resolve() == Path(stage_file).resolve()), None)
    schema = getattr(module, "Settings", None)
    if schema is None or not is_dataclass(schema):
        return False
    hints = typing.get_type_hints(schema)
    return any(isinstance(hints[f.name], type) and issubclass(hints[f.name], TrainConfig)
               for f in fields(schema))


def start_stage(common: RunConfig, dataset_path: Path, stage_file: str) -> StageContext:
    """Seed, set threads, load the data. stage_file: the stage's `__file__` (whose code is hashed;
    `__file__` rather than the module name, which is "__main__" under `python -m`).

    A training stage asked for several processes (common.distributed) starts them here: it
    re-executes itself under torchrun, or, under torchrun, joins the other processes. Every
    process then runs the stage; only rank 0 logs progress and writes files.
    """
    env, device = distributed.start(common.distributed, common.device, stage_file,
                                    trains(stage_file))
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports; the others only warn
    seed_everything(common.seed)
    set_threads(distributed.threads_per_process(common.threads, env))
    dataset = load_prepared(dataset_path)
    return StageContext(device, dataset, file_sha256(dataset_path),
                        code_hash(module_of(Path(stage_file))), env)


def cost_of(model: nn.Module, ctx: StageContext) -> ModelCost:
    return model_cost(model, ctx.input_shape)


def training_metrics(result: FitResult, cfg: TrainConfig, ctx: StageContext,
                     common: RunConfig) -> dict[str, Any]:
    """The metrics every training stage reports, from its fit result."""
    return {"top1": result.history[-1]["test_top1"], "epochs": cfg.epochs,
            "train_seconds": round(result.train_seconds, 2),
            "images_per_second": round(result.images_per_second, 1), "device": str(ctx.device),
            "processes": ctx.dist.describe(ctx.device), "world_size": ctx.dist.world_size,
            "amp": result.amp, "dataset": ctx.dataset.name, "data_checksum": ctx.dataset.checksum,
            "train_images": len(ctx.dataset.train), "test_images": len(ctx.dataset.test),
            "profile": common.profile}


def write_curves_and_metrics(result: FitResult, plots: Path, metrics_path: Path,
                             metrics: dict[str, Any]) -> None:
    write_csv(plots, result.history)
    write_json(metrics_path, metrics)
