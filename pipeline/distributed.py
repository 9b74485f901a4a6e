"""Data-parallel training: PyTorch DistributedDataParallel in processes launched by torchrun.

How a training stage runs on N processes (one per GPU; on a CPU, processes talking gloo):

- `start` (called by stages._common.start_stage) reads `common.distributed`. When that asks
  for more than one process and torchrun did not start this one, the stage executes itself
  again as `python -m torch.distributed.run <options> -m stages.<name> <its arguments>`, so
  dvc.yaml keeps `python -m stages.<name>` and torchrun's exit status is the stage's. Under
  torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) it joins the
  process group instead, and records the process's place in `current()`.
- Every process runs the whole stage. The loaders give each process its slice of every global
  batch (pipeline.data.BatchLoader); `pipeline.training.fit` trains each epoch through
  `data_parallel` (DDP, BatchNorm synchronised) and sums its metrics over the processes.
- Only global rank 0 writes files: pipeline.io discards what other ranks write, so a stage
  needs no code of its own for it. (Hence a rank other than 0 must never read back a file it
  has just written.)

With one process nothing here runs a collective or changes the model: training is exactly the
single-process training it always was.
"""

import atexit
import datetime
import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import DistributedConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

NODE_RANK_ENV = "PIPELINE_NODE_RANK"  # which machine this is (0 = the one running dvc)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the training processes."""

    rank: int = 0  # global rank; 0 writes the outputs
    world_size: int = 1
    local_rank: int = 0  # rank on this machine: its GPU
    local_world_size: int = 1
    backend: str = ""  # gloo | nccl; "" for a single process
    sync_batchnorm: bool = False  # BatchNorm statistics over all processes while training

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, device: torch.device) -> str:
        """E.g. "cpu" for one process, "cuda x8 (nccl)" for eight."""
        return str(device) if not self.enabled else \
            f"{device.type} x{self.world_size} ({self.backend})"


_current = DistEnv()


def current() -> DistEnv:
    """The process group this process has joined (a single process when none)."""
    return _current


# --------------------------------------------------------------------------- launching
def torchrun_env() -> DistEnv | None:
    """What torchrun put in the environment, or None outside torchrun."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return None
    rank, world, local_rank, local_world = (int(os.environ[name]) for name in TORCHRUN_ENV)
    return DistEnv(rank, world, local_rank, local_world)


def _uses_cuda(device_setting: str) -> bool:
    return device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())


def processes_per_node(cfg: DistributedConfig, device_setting: str) -> int:
    """nproc_per_node, with 0 meaning one per visible GPU (one process without a GPU)."""
    if cfg.nproc_per_node:
        return cfg.nproc_per_node
    return max(1, torch.cuda.device_count()) if _uses_cuda(device_setting) else 1


def node_rank(cfg: DistributedConfig) -> int:
    """This machine's rank among cfg.nnodes, from $PIPELINE_NODE_RANK (required if nnodes > 1)."""
    value = os.environ.get(NODE_RANK_ENV, "")
    if cfg.nnodes == 1 and value in ("", "0"):
        return 0
    if not value.isdigit() or int(value) >= cfg.nnodes:
        raise ConfigError(f"{NODE_RANK_ENV}={value!r}: common.distributed.nnodes is "
                          f"{cfg.nnodes}, so every machine must set {NODE_RANK_ENV} to its "
                          f"own number in 0..{cfg.nnodes - 1} (0 = the machine at "
                          "rdzv_endpoint, which writes the outputs)")
    return int(value)


def torchrun_command(cfg: DistributedConfig, nproc: int, program: Sequence[str]) -> list[str]:
    """The command that runs `program` (["-m", module, args...]) in nproc processes here.

    One machine: --standalone (torchrun picks a free port, so parallel queued experiments do
    not collide). Several: static rendezvous at rdzv_endpoint, so that node 0 - the machine
    running dvc - holds global rank 0 and receives the outputs (c10d rendezvous would number
    the machines by host name).
    """
    common = [f"--nproc-per-node={nproc}", f"--max-restarts={cfg.max_restarts}"]
    if cfg.nnodes == 1:
        where = ["--standalone", "--nnodes=1"]
    else:
        host, _, port = cfg.rdzv_endpoint.rpartition(":")
        where = [f"--nnodes={cfg.nnodes}", f"--node-rank={node_rank(cfg)}",
                 f"--master-addr={host}", f"--master-port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, *common, *program]


def _program(stage_file: str) -> list[str] | None:
    """How to run the stage again: ["-m", module, args...] when `stage_file` is the program
    this process runs (`python -m stages.x ...`), else None (e.g. a stage called by a test)."""
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main_file is None or Path(main_file).resolve() != Path(stage_file).resolve():
        return None
    spec = getattr(main, "__spec__", None)
    head = ["-m", spec.name] if spec is not None else [str(Path(stage_file).resolve())]
    return [*head, *sys.argv[1:]]


def _relaunch(command: list[str]) -> None:
    log.info("re-launching under torchrun: %s", " ".join(command))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # torchrun's exit status becomes this process's


def start(cfg: DistributedConfig, device_setting: str, stage_file: str,
          trains: bool) -> tuple[DistEnv, torch.device]:
    """Join the training processes, or start them: a training stage (`trains`) asked for more
    than one process by `cfg` re-executes itself under torchrun and never returns here."""
    under_torchrun = torchrun_env()
    if under_torchrun is not None:  # torchrun decided the processes; never start more
        if not under_torchrun.enabled:
            return DistEnv(), resolve_device(device_setting)
        if not trains:
            raise ConfigError(f"{Path(stage_file).stem} does not train; run it as one process, "
                              "not under torchrun")
        return _join(cfg, under_torchrun, device_setting)
    wanted = processes_per_node(cfg, device_setting) * cfg.nnodes
    if trains and wanted > 1:
        program = _program(stage_file)
        if program is None:
            raise ConfigError(
                f"common.distributed asks for {wanted} processes, but {Path(stage_file).stem} "
                "is not the program being run, so it cannot start them; run it as "
                "`python -m stages.<name>`, or set nproc_per_node and nnodes to 1")
        _relaunch(torchrun_command(cfg, processes_per_node(cfg, device_setting), program))
    return DistEnv(), resolve_device(device_setting)


def resolve_device(setting: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is an error, never a fallback."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("common.device is 'cuda' but no CUDA GPU is visible to torch")
    return torch.device("cuda" if _uses_cuda(setting) else "cpu")


def _rank_device(env: DistEnv, device_setting: str) -> torch.device:
    device = resolve_device(device_setting)
    if device.type != "cuda":
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {env.local_rank} has no GPU: {torch.cuda.device_count()} "
                          "visible; lower common.distributed.nproc_per_node")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def _join(cfg: DistributedConfig, env: DistEnv,
          device_setting: str) -> tuple[DistEnv, torch.device]:
    global _current
    device = _rank_device(env, device_setting)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun --max-restarts keeps its key-value store across attempts: without a per-attempt
    # prefix, a restarted process can read a dead peer's address from the previous attempt.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    atexit.register(shutdown)
    _current = DistEnv(rank, world, env.local_rank, env.local_world_size, backend,
                       cfg.sync_batchnorm)
    return _current, device


def shutdown() -> None:
    """Leave the process group (registered to run at exit by `start`)."""
    global _current
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = DistEnv()


def threads_per_process(requested: int, env: DistEnv) -> int:
    """CPU threads for one of several processes on a machine: `requested`, or an even share of
    this process's cores (torchrun alone would leave each process one thread). 0 = leave
    torch's default, which is what a single process keeps."""
    if requested or not env.enabled:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // env.local_world_size)


# --------------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _current.backend == "nccl" \
        else torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sums of a few numbers over all processes (float64); the numbers as they are in one."""
    if not _current.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all processes (a new tensor; `tensor` itself in a
    single process): e.g. per-channel statistics a method gathers on its data shard and then
    decides from, so that every process decides alike."""
    if not _current.enabled:
        return tensor
    total = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (pickled; e.g. a resume checkpoint rank 0 has read)."""
    if not _current.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=_comm_device())
    return holder[0]


def state_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@torch.no_grad()
def broadcast_state(module: nn.Module, buffers_only: bool = False) -> None:
    """Overwrite this process's parameters and buffers with rank 0's."""
    if not _current.enabled:
        return
    tensors = [*([] if buffers_only else module.parameters()), *module.buffers()]
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def agree_on_state(module: nn.Module, where: str) -> None:
    """Make every process continue from rank 0's model, and warn when they had differed.

    Code that runs in each process on its own - a stage's epoch hooks - keeps the processes in
    step only if it decides the same everywhere; a decision taken from one process's shard of
    the data (e.g. its activations) would let the models drift apart silently. Such code
    should sum its statistics over processes (`sum_over_processes`, `all_reduce_sum`); until it
    does, the processes follow rank 0, and the result differs from a single-process run.
    """
    if not _current.enabled:
        return
    digests: list[str | None] = [None] * _current.world_size
    dist.all_gather_object(digests, state_digest(module))
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        if _current.is_main:
            log.warning("%s: the model of rank(s) %s differs from rank 0's (code that ran in "
                        "each process decided differently, e.g. from its own data shard); "
                        "every process continues from rank 0's model, so this run is no "
                        "longer equivalent to a single-process run", where, differing)
        broadcast_state(module)


# --------------------------------------------------------------------------- BatchNorm
class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the union of all processes' batches, with ordinary tensor
    ops (torch.nn.SyncBatchNorm's algorithm; its kernels exist on CUDA only).

    Forward: each process's per-channel mean and sum of squared deviations, one all_gather of
    those (2C + 1 float64 numbers), merged exactly (Chan et al.'s parallel variance). Backward:
    one all_reduce of sum(dy) and sum(dy * (x - mean)) per channel, then the closed-form input
    gradient. Weight and bias gradients stay local: DDP averages them like any other gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps):
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        var_local, mean_local = torch.var_mean(x, dims, correction=0)
        count = x.numel() // channels
        mine = torch.cat([mean_local.double(), var_local.double() * count,
                          torch.full((1,), float(count), dtype=torch.float64, device=x.device)])
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        table = torch.stack(gathered)
        means, squares, counts = (table[:, :channels], table[:, channels:2 * channels],
                                  table[:, 2 * channels:])
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (squares.sum(0) + (counts * (means - mean) ** 2).sum(0)) / total  # biased
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            unbiased = var * total / max(total.item() - 1, 1)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        # Statistics in the parameters' dtype: under bf16 autocast x is bf16 while weight and
        # bias stay fp32, and the CPU kernel takes bf16 input only with all-fp32 parameters.
        stats = weight.dtype if weight is not None else x.dtype
        mean, invstd = mean.to(stats), torch.rsqrt(var + eps).to(stats)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total = total.item()
        return F.batch_norm(x, mean, var.to(stats), weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        centred = x.to(mean.dtype) - mean.view(shape)  # in the statistics' dtype (see forward)
        grad_out = grad_out.to(mean.dtype)
        sum_dy = grad_out.sum(dims, dtype=torch.float64)
        sum_dy_centred = (grad_out * centred).sum(dims, dtype=torch.float64)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = (sum_dy_centred * invstd.double()).to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
        both = torch.cat([sum_dy, sum_dy_centred])
        dist.all_reduce(both)
        mean_dy = (both[:channels] / ctx.total).to(mean.dtype)
        mean_dy_centred = (both[channels:] / ctx.total).to(mean.dtype)
        scale = invstd if weight is None else invstd * weight
        grad_x = (grad_out - mean_dy.view(shape)
                  - centred * (invstd * invstd * mean_dy_centred).view(shape)) * scale.view(shape)
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics span all processes, for CPU (gloo) training,
    where torch.nn.SyncBatchNorm refuses to run. Eval mode, or a single process: exactly
    nn.BatchNorm2d. Same parameters, buffers and state_dict keys as nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                else self.momentum
        tracked = self.track_running_stats
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if tracked else None,
            self.running_var if tracked else None, factor, self.eps)


@contextmanager
def synchronized_batchnorm(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Inside the block, every nn.BatchNorm2d of `model` normalises over all processes' batches:
    nn.SyncBatchNorm on CUDA, CpuSyncBatchNorm2d elsewhere.

    The layers change class in place and back afterwards, so they stay the same objects with
    the same parameters, buffers and hooks: an optimizer built before, and any reference a
    training method holds, keep working. Other BatchNorm kinds keep per-process statistics.
    """
    layers = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    others = [type(m).__name__ for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) is not nn.BatchNorm2d
              and not isinstance(m, nn.SyncBatchNorm | CpuSyncBatchNorm2d)]
    if others and _current.is_main:
        log.warning("BatchNorm layers %s keep per-process statistics (only BatchNorm2d is "
                    "synchronised)", sorted(set(others)))
    cuda = device.type == "cuda"
    for layer in layers:
        if cuda:
            layer.process_group = None  # what nn.SyncBatchNorm reads: None = all processes
        layer.__class__ = nn.SyncBatchNorm if cuda else CpuSyncBatchNorm2d
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = nn.BatchNorm2d
            if cuda:
                del layer.process_group


@contextmanager
def data_parallel(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The module to train for one epoch: `model` itself in a single process; otherwise `model`
    inside DistributedDataParallel (gradients averaged over processes; rank 0's weights copied
    to all when it is built), with BatchNorm synchronised unless configured off.

    Built anew for every epoch, after the epoch-start hooks: a method may change which
    parameters train between epochs, and DDP only reduces those that trained when it was built.
    """
    if not _current.enabled:
        yield model
        return
    sync = synchronized_batchnorm(model, device) if _current.sync_batchnorm else nullcontext()
    with sync:
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        try:
            yield wrapped
        finally:
            del wrapped
