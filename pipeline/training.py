"""The training engine shared by every stage that trains (teacher, student, PDD, fine-tune).

`fit` runs an SGD schedule with a caller-supplied loss, evaluates after every epoch, saves a
resume checkpoint after every epoch (atomically) and, when started again with the same
fingerprint, continues from the last completed epoch. Batches are drawn from a per-epoch seed,
so a resumed run follows the same trajectory as an uninterrupted one.

In data-parallel training (pipeline.distributed) every process calls `fit` with its shard of
the data; `fit` trains through DDP, sums the metrics over processes, gives the epoch hooks the
plain model, keeps the processes' models identical, and lets rank 0 alone read and write the
checkpoint. A stage that trains through `fit` and `StageContext.loaders` needs nothing else.
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from pipeline import cpu, distributed
from pipeline.checkpoint import atomic_save
from pipeline.config import TrainConfig
from pipeline.data import BatchLoader
from pipeline.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# loss_fn(model, images, labels) -> (loss, logits); lets KD and gate penalties plug in.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# on_epoch_end(epoch, model) -> extra numbers recorded in that epoch's history row.
# Hooks get the plain model (never the DDP wrapper); in data-parallel training they run in
# every process, and must decide the same in each (see distributed.agree_on_state).
EpochHook = Callable[[int, nn.Module], dict[str, Any]]
# on_epoch_start(epoch, model): runs after a resume has restored the model, before training.
EpochStartHook = Callable[[int, nn.Module], None]


@dataclass
class FitResult:
    history: list[dict[str, Any]]  # one row per epoch: losses, accuracies, lr, hook outputs
    train_seconds: float  # wall time spent in training epochs, summed over resumed runs
    images_per_second: float  # training throughput over all epochs (all processes together)
    amp: str  # autocast precision actually used ("off" on CPU)
    resumed_from_epoch: int = 0  # epochs already done when this process started
    world_size: int = 1  # training processes (data-parallel), 1 = a single process
    extras: dict[str, Any] = field(default_factory=dict)


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing), logits

    return loss_fn


def make_optimizer(param_groups: Iterable, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, epoch_progress: float) -> float:
    """Multiplier of cfg.lr at a (fractional) epoch: linear warm-up, then multistep or cosine."""
    if epoch_progress < cfg.warmup_epochs:
        return 0.1 + 0.9 * epoch_progress / cfg.warmup_epochs
    if cfg.schedule == "multistep":
        passed = sum(1 for milestone in cfg.milestones if epoch_progress >= milestone)
        return cfg.gamma**passed
    span = cfg.epochs - cfg.warmup_epochs
    return 0.5 * (1 + math.cos(math.pi * (epoch_progress - cfg.warmup_epochs) / span))


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step LambdaLR over the whole run (resumable through its state_dict)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step / steps_per_epoch))


def autocast(device: torch.device, amp: str):
    """The autocast context training runs its forward passes in (`amp` as resolved)."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolved_amp(device: torch.device, requested: str) -> str:
    """The autocast precision training really uses on `device` for the requested `amp`.

    bf16 runs where the hardware computes it natively: CUDA GPUs that support it, CPUs with
    AVX512_BF16 or AMX (pipeline.cpu); elsewhere bf16 is emulated and slower than fp32, so
    training stays in fp32. fp16 is CUDA only. `auto` picks bf16 where native.
    """
    if requested == "off":
        return "off"
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "off"
        return requested
    return "bf16" if requested in ("auto", "bf16") and cpu.native_bf16() else "off"


def effective_amp(device: torch.device, requested: str) -> str:
    """resolved_amp, saying so when an explicitly requested precision cannot run here."""
    amp = resolved_amp(device, requested)
    if requested not in ("auto", amp):
        log.warning("amp=%s needs %s; training on %s in fp32", requested,
                    "CUDA" if requested == "fp16" else "native bf16 (AVX512_BF16 or AMX)",
                    device)
    return amp


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, amp: str = "off") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (fraction) over the loader, in eval mode.

    A loader sharded over processes (loader.world > 1) gives each its share of the test set;
    the sums are then added up over the processes, so every process returns the same numbers.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        with autocast(images.device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    model.train(was_training)
    if loader.world > 1:
        loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count])
    return {"loss": loss_sum / max(count, 1), "top1": correct / max(count, 1)}


def _progress(shown: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                    transient=True, disable=not shown)


def _train_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, amp, progress, title):
    loss_sum, correct, count = 0.0, 0, 0
    task = progress.add_task(title, total=len(loader), loss=float("nan"))
    with distributed.data_parallel(model, loader.device) as trained:
        trained.train()
        for images, labels in loader:
            with autocast(images.device, amp):
                loss, logits = loss_fn(trained, images, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
            progress.update(task, advance=1, loss=loss_sum / count)
    progress.remove_task(task)
    if loader.world > 1:
        loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count])
    return {"train_loss": loss_sum / max(count, 1), "train_top1": correct / max(count, 1),
            "images": count}


@dataclass
class TrainingRun:
    """Everything `fit` needs besides the model; groups the arguments a stage assembles."""

    cfg: TrainConfig
    train_loader: BatchLoader
    test_loader: BatchLoader
    loss_fn: LossFn
    checkpoint_path: Path  # resume state, rewritten after every epoch
    fingerprint: str  # identifies config + data + initial model; a mismatch means start over
    param_groups: list[dict[str, Any]] | None = None  # default: all model parameters
    on_epoch_end: EpochHook | None = None
    on_epoch_start: EpochStartHook | None = None
    title: str = "train"


def _load_resume_state(run: TrainingRun, fingerprint: str) -> dict[str, Any] | None:
    if not run.checkpoint_path.is_file():
        return None
    try:
        state = torch.load(run.checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt checkpoint is reported, then ignored
        log.warning("%s: unreadable resume checkpoint (%s); starting over",
                    run.checkpoint_path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("%s belongs to other settings; starting over", run.checkpoint_path)
        return None
    return state


def _check_sharding(run: TrainingRun, env: distributed.DistEnv) -> None:
    for name, loader in (("train_loader", run.train_loader), ("test_loader", run.test_loader)):
        if (loader.rank, loader.world) != (env.rank, env.world_size):
            raise ConfigError(
                f"{run.title}: {name} is shard {loader.rank} of {loader.world}, but this is "
                f"process {env.rank} of {env.world_size}; build the loaders with "
                "StageContext.loaders (or make_loaders with rank and world)")


def fit(model: nn.Module, run: TrainingRun) -> FitResult:
    """Train `model` in place according to `run`; resume from its checkpoint when it matches."""
    cfg = run.cfg
    device = run.train_loader.device
    env = distributed.current()
    _check_sharding(run, env)
    amp = effective_amp(device, cfg.amp)
    # `amp: auto` resolves per machine: a run resumed elsewhere must not mix precisions.
    fingerprint = f"{run.fingerprint}|amp={amp}"
    if len(run.train_loader) == 0:
        raise ConfigError(f"{run.title}: batch_size={cfg.batch_size} exceeds the training set")
    optimizer = make_optimizer(run.param_groups or model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, len(run.train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    history, seconds, images, start_epoch = [], 0.0, 0, 0
    # Rank 0 reads the checkpoint and hands it to the others: they may be on machines without it.
    state = distributed.broadcast_object(_load_resume_state(run, fingerprint) if env.is_main
                                         else None)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{run.checkpoint_path}: cannot resume ({err}); delete it "
                                  "to start over") from err
        history, seconds, images = state["history"], state["seconds"], state["images"]
        start_epoch = len(history)
        log.info("%s: resuming after epoch %d of %d", run.title, start_epoch, cfg.epochs)
    with _progress(shown=env.is_main) as progress:
        for epoch in range(start_epoch, cfg.epochs):
            run.train_loader.set_epoch(epoch)
            if run.on_epoch_start is not None:
                run.on_epoch_start(epoch + 1, model)
            began = time.perf_counter()
            row = _train_epoch(model, run.train_loader, optimizer, scheduler, scaler,
                               run.loss_fn, amp, progress, f"{run.title} {epoch + 1}/{cfg.epochs}")
            elapsed = time.perf_counter() - began
            seconds, images = seconds + elapsed, images + row.pop("images")
            # Without synchronised BatchNorm each process has its own running statistics.
            distributed.broadcast_state(model, buffers_only=True)
            test = evaluate(model, run.test_loader, amp)
            row = {"epoch": epoch + 1, **row, "test_loss": test["loss"], "test_top1": test["top1"],
                   "lr": optimizer.param_groups[0]["lr"], "seconds": elapsed}
            if run.on_epoch_end is not None:
                row.update(run.on_epoch_end(epoch + 1, model))
            distributed.agree_on_state(model, f"{run.title} epoch {epoch + 1}")
            history.append(row)
            log.info("%s epoch %d/%d: loss %.4f  train top1 %.4f  test top1 %.4f  (%.1f s)",
                     run.title, epoch + 1, cfg.epochs, row["train_loss"], row["train_top1"],
                     row["test_top1"], elapsed)
            if env.is_main:
                atomic_save({"fingerprint": fingerprint, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "history": history, "seconds": seconds, "images": images},
                            run.checkpoint_path)
    return FitResult(history, seconds, images / seconds if seconds else 0.0, amp, start_epoch,
                     env.world_size)


def make_loaders(dataset, cfg: TrainConfig, device: torch.device, seed: int, rank: int = 0,
                 world: int = 1) -> tuple[BatchLoader, BatchLoader]:
    """Augmented, shuffled training batches and plain test batches, both on `device`; process
    `rank` of `world` gets its shard of each (cfg.batch_size is the global batch)."""
    train = training_loader(dataset, cfg.batch_size, cfg.channels_last, device, seed, rank,
                            world)
    test = BatchLoader(dataset.test, cfg.eval_batch_size, dataset.mean, dataset.std, device,
                       train=False, channels_last=cfg.channels_last, rank=rank, world=world)
    return train, test


def training_loader(dataset, batch_size: int, channels_last: bool, device: torch.device,
                    seed: int, rank: int = 0, world: int = 1) -> BatchLoader:
    """The augmented, shuffled training batches of a schedule with `batch_size`: the same
    views, epoch by epoch, for every stage with the same seed and batch size."""
    return BatchLoader(dataset.train, batch_size, dataset.mean, dataset.std, device, train=True,
                       seed=seed, channels_last=channels_last, rank=rank, world=world)


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model
