"""Data-parallel training (pipeline.distributed): two gloo processes on the CPU against one.

The processes are started with torch.multiprocessing and join through the same environment
variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so they go through
the stages' own `distributed.start`. tests/test_distributed_stage.py runs real stages under
torchrun (kill -9 and resume) and DVC's experiment queue.

Why float64. Two processes with B/2 images each compute the same numbers as one process with
B images only up to the order of floating-point sums (DDP averages two half-batch gradients;
BatchNorm merges two sets of statistics). In float32 that is ~1e-7 relative per step, and
training amplifies it: a ReLU input or a PDD gate logit within rounding distance of zero flips
and the runs part (measured on ResNet20 at lr 0.1: ~10x per step; a single-process run that
only reorders the BatchNorm arithmetic drifts as far). In float64 the same reordering is
~1e-16, so the comparison can be tight enough to catch any real difference: unsynchronised
BatchNorm, a wrong shard, a loss scaled by the number of processes or an unreduced gate
gradient each change the weights by 1e-2 or more (the negative control below: > 1e-3).
"""

import json
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline import distributed
from pipeline.config import DistillConfig, DistributedConfig, TrainConfig
from pipeline.data import BatchLoader, make_synthetic, normalize
from pipeline.distill import FrozenTeacher
from pipeline.errors import ConfigError
from pipeline.io import write_json
from pipeline.models import build_model
from pipeline.prune.gates import attach_gates, count_flips, macs_penalty
from pipeline.students import distillation_loss_fn
from pipeline.training import TrainingRun, cross_entropy_loss, fit, make_loaders

CPU = torch.device("cpu")
# Measured with these very runs (float64, 8 steps of ResNet20; PDD with gates, KD and a MACs
# penalty): state norm 5e-12 (plain) and 2e-11 (PDD), worst tensor 2e-11 and 6e-11. The bounds
# leave > 50x headroom above that and stay >= 6 orders of magnitude below the smallest real
# error: without synchronised BatchNorm the same runs differ by 1.0 (norm, relative).
STATE_NORM_TOLERANCE = 1e-9  # ||sum of differences|| / ||reference state||
TENSOR_TOLERANCE = 1e-7  # max |difference| per tensor, relative to max(1, max |reference|)
# The project's losses are computed in float32 (logits.float() in the loss and in evaluate),
# so loss values agree to float32 rounding, not to float64.
LOSS_TOLERANCE = 1e-6


def one_process() -> DistributedConfig:
    return DistributedConfig(nproc_per_node=1, nnodes=1, rdzv_endpoint="", sync_batchnorm=True,
                             max_restarts=0, timeout_s=600)


def schedule(**changes) -> TrainConfig:
    settings = dict(epochs=2, batch_size=16, eval_batch_size=16, lr=0.1, momentum=0.9,
                    nesterov=True, weight_decay=5e-4, schedule="cosine", milestones=(), gamma=0.1,
                    warmup_epochs=1, label_smoothing=0.0, amp="off", channels_last=False)
    return TrainConfig(**{**settings, **changes})


# --------------------------------------------------------------------------- two processes
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _process(rank: int, world: int, port: int, sync_batchnorm: bool, device: str, worker,
             args) -> None:
    """One of `world` processes, set up as torchrun would, running worker(env, *args)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = DistributedConfig(nproc_per_node=world, nnodes=1, rdzv_endpoint="",
                            sync_batchnorm=sync_batchnorm, max_restarts=0, timeout_s=120)
    env, _ = distributed.start(cfg, device, __file__, trains=True)
    try:
        worker(env, *args)
    finally:
        distributed.shutdown()


def run_processes(worker, *args, world: int = 2, sync_batchnorm: bool = True,
                  device: str = "cpu") -> None:
    mp.start_processes(_process, args=(world, free_port(), sync_batchnorm, device, worker, args),
                       nprocs=world, start_method="spawn")


# --------------------------------------------------------------------------- training cases
class AsFloat64(nn.Module):
    """Runs `net` in float64 on the loaders' float32 batches (the cast is exact)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.double())


def _pdd(student: nn.Module):
    """The PDD recipe: gated student (gate logits trained with their own lr), frozen teacher
    outside the trained module, KD loss plus a MACs penalty computed outside the forward."""
    gated = attach_gates(student, torch.zeros(1, 3, 32, 32),
                         generator=torch.Generator().manual_seed(0)).double()
    torch.manual_seed(1)
    teacher = FrozenTeacher(AsFloat64(build_model({"arch": "resnet20", "num_classes": 4})))
    distill = DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6,
                            teacher_runtime="torch", teacher_cache=False)
    loss = distillation_loss_fn(teacher, distill, 0.0,
                                lambda: 2.0 * macs_penalty(gated, 0.5))
    groups = [{"params": list(gated.model.parameters())},
              {"params": gated.gate_parameters(), "lr": 0.1, "weight_decay": 0.0}]
    snapshot = {}

    def epoch_start(_epoch, _model):
        snapshot["gates"] = gated.gate_states()

    def epoch_end(_epoch, _model):
        return {"gate_flips": count_flips(gated, snapshot["gates"]),
                "kept_channels": sum(gated.kept_channels().values())}

    return AsFloat64(gated), loss, groups, epoch_start, epoch_end


def train_case(case: str, checkpoint: Path, rank: int = 0, world: int = 1,
               device: torch.device = CPU) -> nn.Module:
    """One training run of `case` ("plain": ResNet20 with cross-entropy, the teacher's recipe;
    "pdd": the gated student), as process `rank` of `world`; returns the trained model."""
    torch.manual_seed(0)
    dataset = make_synthetic(64, 40, 4, seed=0)
    cfg = schedule()
    train, test = make_loaders(dataset, cfg, device, seed=0, rank=rank, world=world)
    student = build_model({"arch": "resnet20", "num_classes": 4})
    if case == "plain":
        model, loss, groups, start, end = AsFloat64(student), cross_entropy_loss(), None, None, None
    else:
        model, loss, groups, start, end = _pdd(student)
    model.to(device)
    fit(model, TrainingRun(cfg=cfg, train_loader=train, test_loader=test, loss_fn=loss,
                           checkpoint_path=checkpoint, fingerprint=case, param_groups=groups,
                           on_epoch_start=start, on_epoch_end=end, title=case))
    return model


def _train_both_cases(env, out: Path) -> None:
    for case in ("plain", "pdd"):
        model = train_case(case, out / f"{case}.pt", env.rank, env.world_size)
        plain = all(type(m) is nn.BatchNorm2d for m in model.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm))
        torch.save({"bn_plain_after_fit": plain, "digest": distributed.state_digest(model)},
                   out / f"{case}.rank{env.rank}.pt")  # test bookkeeping, every rank
    write_json(out / f"written_by_rank{env.rank}.json", {"rank": env.rank})


def _train_plain(env, out: Path, device: str = "cpu") -> None:
    rank_device = torch.device("cuda", env.local_rank) if device == "cuda" else CPU
    train_case("plain", out / "plain.pt", env.rank, env.world_size, rank_device)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the two cases: one process, two synchronised processes, and two
    processes without BatchNorm synchronisation (the negative control)."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("one", "two", "two_unsynced")}
    for case in ("plain", "pdd"):
        train_case(case, folders["one"] / f"{case}.pt")
    run_processes(_train_both_cases, folders["two"])
    run_processes(_train_plain, folders["two_unsynced"], sync_batchnorm=False)
    return folders


def state_differences(reference: dict, other: dict) -> tuple[float, float]:
    """(||difference|| / ||reference||, max over tensors of max|difference| / max(1, max|ref|))
    over the floating-point entries of two state dicts."""
    assert reference.keys() == other.keys()
    squares, norm, worst = 0.0, 0.0, 0.0
    for key, ref in reference.items():
        if not ref.is_floating_point():
            assert torch.equal(ref, other[key]), key  # num_batches_tracked: exactly equal
            continue
        difference = (ref.double() - other[key].double()).abs()
        squares += float((difference**2).sum())
        norm += float((ref.double() ** 2).sum())
        worst = max(worst, float(difference.max()) / max(1.0, float(ref.abs().max())))
    return (squares / norm) ** 0.5, worst


def load(folder: Path, case: str) -> dict:
    return torch.load(folder / f"{case}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "pdd"])
def test_two_processes_train_the_same_model_as_one(runs, case):
    one, two = load(runs["one"], case), load(runs["two"], case)
    norm, worst = state_differences(one["model"], two["model"])
    assert norm <= STATE_NORM_TOLERANCE, norm
    assert worst <= TENSOR_TOLERANCE, worst
    for row_one, row_two in zip(one["history"], two["history"], strict=True):
        for key in ("train_top1", "test_top1", "lr", "gate_flips", "kept_channels"):
            assert row_one.get(key) == row_two.get(key), key  # counts: exactly equal
        for key in ("train_loss", "test_loss"):
            assert row_two[key] == pytest.approx(row_one[key], rel=LOSS_TOLERANCE), key
    assert one["images"] == two["images"] == 2 * 64  # both processes' images, counted once


@pytest.mark.slow
def test_pdd_gates_open_and_close_alike(runs):
    one, two = load(runs["one"], "pdd"), load(runs["two"], "pdd")
    gates = [key for key in one["model"] if key.endswith("logits")]
    assert gates
    for key in gates:  # the 0/1 decision of every gate, not only its logit value
        assert torch.equal(one["model"][key] >= 0, two["model"][key] >= 0), key
    assert sum(row["gate_flips"] for row in one["history"]) > 0  # the gates did move


@pytest.mark.slow
def test_without_synchronised_batchnorm_the_models_differ(runs):
    norm, _ = state_differences(load(runs["one"], "plain")["model"],
                                load(runs["two_unsynced"], "plain")["model"])
    assert norm > 1e-3, "the equivalence test could not tell synchronised BatchNorm from none"


@pytest.mark.slow
def test_only_rank_0_writes_and_every_rank_ends_with_the_same_plain_model(runs):
    folder = runs["two"]
    assert (folder / "written_by_rank0.json").is_file()
    assert not (folder / "written_by_rank1.json").exists()
    assert not list(folder.rglob("*.tmp"))
    for case in ("plain", "pdd"):
        ranks = [torch.load(folder / f"{case}.rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["digest"] == ranks[1]["digest"], case
        assert all(rank["bn_plain_after_fit"] for rank in ranks), case


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL, "
                    "nn.SyncBatchNorm); none or one visible")
def test_two_gpus_train_the_same_model_as_one(tmp_path):
    train_case("plain", tmp_path / "one.pt", device=torch.device("cuda", 0))
    (tmp_path / "two").mkdir()
    run_processes(_train_plain, tmp_path / "two", "cuda", device="cuda")
    norm, worst = state_differences(torch.load(tmp_path / "one.pt", weights_only=True)["model"],
                                    load(tmp_path / "two", "plain")["model"])
    assert norm <= STATE_NORM_TOLERANCE and worst <= TENSOR_TOLERANCE, (norm, worst)


# --------------------------------------------------------------------------- BatchNorm
def _batchnorm_halves(env, out: Path) -> None:
    """Each process normalises its half of one batch through the synchronised BatchNorm."""
    torch.manual_seed(0)
    batch = 3.0 * torch.randn(8, 5, 6, 6, dtype=torch.float64) + 2.0
    weights = torch.randn_like(batch)
    layer = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    half = batch[4 * env.rank: 4 * env.rank + 4].clone().requires_grad_(True)
    hooked = []
    layer.register_forward_hook(lambda *_: hooked.append(True))
    with distributed.synchronized_batchnorm(layer, CPU):
        assert type(layer) is distributed.CpuSyncBatchNorm2d
        for _ in range(2):  # running statistics after two updates
            output = layer(half)
    (output * weights[4 * env.rank: 4 * env.rank + 4]).sum().backward()
    assert type(layer) is nn.BatchNorm2d and len(hooked) == 2  # same object, hooks kept
    outputs = [torch.empty_like(output) for _ in range(2)]
    grads = [torch.empty_like(half) for _ in range(2)]
    dist.all_gather(outputs, output.detach())
    dist.all_gather(grads, half.grad)
    for grad in (layer.weight.grad, layer.bias.grad):
        dist.all_reduce(grad)  # local weight gradients add up (DDP would average them)
    if env.is_main:
        torch.save({"batch": batch, "weights": weights, "y": torch.cat(outputs),
                    "grad_x": torch.cat(grads), "state": layer.state_dict(),
                    "grad_w": layer.weight.grad, "grad_b": layer.bias.grad,
                    "affine": (layer.weight.detach(), layer.bias.detach())},
                   out / "batchnorm.pt")


def _batchnorm_halves_bf16(env, out: Path) -> None:
    """As under bf16 autocast: bf16 activations through a BatchNorm with fp32 parameters."""
    torch.manual_seed(0)
    batch = (3.0 * torch.randn(8, 5, 6, 6) + 2.0).bfloat16()
    layer = nn.BatchNorm2d(5)
    half = batch[4 * env.rank: 4 * env.rank + 4].clone().requires_grad_(True)
    with distributed.synchronized_batchnorm(layer, CPU):
        output = layer(half)
    output.float().square().sum().backward()
    outputs = [torch.empty_like(output) for _ in range(2)]
    grads = [torch.empty_like(half) for _ in range(2)]
    dist.all_gather(outputs, output.detach())
    dist.all_gather(grads, half.grad)
    if env.is_main:
        torch.save({"batch": batch, "y": torch.cat(outputs), "grad_x": torch.cat(grads),
                    "running_mean": layer.running_mean}, out / "batchnorm_bf16.pt")


@pytest.mark.slow
def test_synchronised_batchnorm_takes_bf16_activations(tmp_path):
    run_processes(_batchnorm_halves_bf16, tmp_path)
    got = torch.load(tmp_path / "batchnorm_bf16.pt", weights_only=True)
    assert got["y"].dtype == got["grad_x"].dtype == torch.bfloat16  # as the input came
    layer = nn.BatchNorm2d(5)
    batch = got["batch"].clone().requires_grad_(True)
    output = layer(batch)  # one process, the same mixed precision
    output.float().square().sum().backward()
    close = partial(torch.testing.assert_close, rtol=2e-2, atol=2e-2)  # bf16: 8-bit mantissa
    close(got["y"].float(), output.detach().float())
    close(got["grad_x"].float(), batch.grad.float())
    close(got["running_mean"], layer.running_mean)


@pytest.mark.slow
def test_synchronised_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    run_processes(_batchnorm_halves, tmp_path)
    got = torch.load(tmp_path / "batchnorm.pt", weights_only=True)
    layer = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        layer.weight.copy_(got["affine"][0])
        layer.bias.copy_(got["affine"][1])
    batch = got["batch"].clone().requires_grad_(True)
    for _ in range(2):
        output = layer(batch)
    (output * got["weights"]).sum().backward()
    close = partial(torch.testing.assert_close, rtol=1e-12, atol=1e-12)
    close(got["y"], output.detach())
    close(got["grad_x"], batch.grad)
    close(got["grad_w"], layer.weight.grad)
    close(got["grad_b"], layer.bias.grad)
    for key, value in layer.state_dict().items():
        close(got["state"][key], value)


def test_synchronised_batchnorm_is_plain_batchnorm_in_one_process_and_in_eval():
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    batch = torch.randn(4, 3, 5, 5)
    expected = nn.BatchNorm2d(3)
    with distributed.synchronized_batchnorm(layer, CPU):
        assert torch.equal(layer(batch), expected(batch))  # no process group: plain BatchNorm
        layer.eval(), expected.eval()
        assert torch.equal(layer(batch), expected(batch))
    assert type(layer) is nn.BatchNorm2d
    assert torch.equal(layer.running_mean, expected.running_mean)


# --------------------------------------------------------------------------- hooks that drift
def _drifting_hook(env, out: Path) -> None:
    """An epoch hook that changes each process's model differently (as a hook deciding from its
    own data shard would): every process must continue from rank 0's model."""
    torch.manual_seed(0)
    dataset = make_synthetic(32, 16, 4, seed=0)
    cfg = schedule(epochs=1, warmup_epochs=0)
    train, test = make_loaders(dataset, cfg, CPU, seed=0, rank=env.rank, world=env.world_size)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4))

    def drift(_epoch, net):
        with torch.no_grad():
            net[0].bias.add_(env.rank)
        return {}

    fit(model, TrainingRun(cfg=cfg, train_loader=train, test_loader=test,
                           loss_fn=cross_entropy_loss(), checkpoint_path=out / "drift.pt",
                           fingerprint="drift", on_epoch_end=drift))
    summed = distributed.sum_over_processes(torch.tensor([1.0, env.rank]))
    torch.save({"digest": distributed.state_digest(model), "summed": summed},
               out / f"drift{env.rank}.pt")


@pytest.mark.slow
def test_processes_that_drift_apart_in_a_hook_follow_rank_0(tmp_path):
    run_processes(_drifting_hook, tmp_path)
    ranks = [torch.load(tmp_path / f"drift{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for rank in ranks:  # what a method should use instead: statistics summed over processes
        assert torch.equal(rank["summed"], torch.tensor([2.0, 1.0]))


# --------------------------------------------------------------------------- sharded loaders
def reference_batches(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of the single-process loader as it was before sharding existed: one
    randperm, then per batch two randint and one rand draws on the batch's images."""
    generator = torch.Generator().manual_seed(loader.seed * 100_003 + loader.epoch)
    order = torch.randperm(len(loader.labels), generator=generator)
    batches = []
    for start in range(0, len(loader) * loader.batch_size, loader.batch_size):
        index = order[start:start + loader.batch_size]
        images = loader.images[index]
        n, c, h, w = images.shape
        padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n, 1), generator=generator)
        dx = torch.randint(0, 9, (n, 1), generator=generator)
        rows = (dy + torch.arange(h))[:, None, :, None]
        cols = (dx + torch.arange(w))[:, None, None, :]
        cropped = padded[torch.arange(n)[:, None, None, None],
                         torch.arange(c)[None, :, None, None], rows, cols]
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
        batches.append((normalize(images, loader.mean, loader.std), loader.labels[index]))
    return batches


def loader(train: bool, batch: int, rank: int = 0, world: int = 1) -> BatchLoader:
    dataset = make_synthetic(70, 45, 4, seed=0)
    split = dataset.train if train else dataset.test
    return BatchLoader(split, batch, dataset.mean, dataset.std, CPU, train=train, seed=3,
                       rank=rank, world=world)


def test_one_process_loader_gives_exactly_the_batches_it_always_gave():
    single = loader(True, 16)
    single.set_epoch(2)
    for (images, labels), (old_images, old_labels) in zip(single, reference_batches(single),
                                                          strict=True):
        assert torch.equal(images, old_images) and torch.equal(labels, old_labels)


@pytest.mark.parametrize("world", [2, 3])
def test_the_shards_of_a_training_batch_are_the_single_process_batch(world):
    single = loader(True, 12)
    shards = [loader(True, 12, rank, world) for rank in range(world)]
    for each in (single, *shards):
        each.set_epoch(1)
    assert {len(shard) for shard in shards} == {len(single)}  # every process: the same steps
    for step, (images, labels) in enumerate(single):
        parts = [list(shard)[step] for shard in shards]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)


def test_test_shards_cover_the_test_set_once():
    whole = torch.cat([labels for _, labels in loader(False, 10)])
    shards = [loader(False, 10, rank, 2) for rank in range(2)]
    assert [len(shard) for shard in shards] == [3, 2]  # 5 batches (45 images): 0, 2, 4 / 1, 3
    batches = [list(shard) for shard in shards]
    interleaved = [batches[i % 2][i // 2][1] for i in range(5)]
    assert torch.equal(torch.cat(interleaved), whole)


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ConfigError, match="batch_size=10 does not split evenly over 4"):
        loader(True, 10, 0, 4)


def test_fit_refuses_loaders_sharded_for_other_processes(tmp_path):
    dataset = make_synthetic(32, 16, 4, seed=0)
    cfg = schedule(epochs=1, warmup_epochs=0)
    train, test = make_loaders(dataset, cfg, CPU, seed=0, rank=1, world=2)
    run = TrainingRun(cfg=cfg, train_loader=train, test_loader=test, loss_fn=cross_entropy_loss(),
                      checkpoint_path=tmp_path / "c.pt", fingerprint="x")
    with pytest.raises(ConfigError, match="train_loader is shard 1 of 2"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)), run)
    assert not (tmp_path / "c.pt").exists()


# --------------------------------------------------------------------------- launching
def several_nodes(**changes) -> DistributedConfig:
    settings = dict(nproc_per_node=2, nnodes=2, rdzv_endpoint="10.0.0.1:29500",
                    sync_batchnorm=True, max_restarts=1, timeout_s=600)
    return DistributedConfig(**{**settings, **changes})


def test_one_machine_uses_a_standalone_rendezvous():
    cfg = DistributedConfig(nproc_per_node=4, nnodes=1, rdzv_endpoint="", sync_batchnorm=True,
                            max_restarts=0, timeout_s=600)
    command = distributed.torchrun_command(cfg, 4, ["-m", "stages.teacher", "--resolved", "r"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc-per-node=4", "--max-restarts=0", "-m", "stages.teacher",
                           "--resolved", "r"]


def test_several_machines_meet_at_node_0_with_their_own_node_rank(monkeypatch):
    monkeypatch.setenv(distributed.NODE_RANK_ENV, "1")
    command = distributed.torchrun_command(several_nodes(), 2, ["-m", "stages.teacher"])
    assert command[3:9] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
                            "--master-port=29500", "--nproc-per-node=2", "--max-restarts=1"]


@pytest.mark.parametrize("value", [None, "2", "one"])
def test_several_machines_need_each_machines_node_rank(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(distributed.NODE_RANK_ENV, raising=False)
    else:
        monkeypatch.setenv(distributed.NODE_RANK_ENV, value)
    with pytest.raises(ConfigError, match="PIPELINE_NODE_RANK"):
        distributed.torchrun_command(several_nodes(), 2, ["-m", "stages.teacher"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"rdzv_endpoint": ""}, "needs rdzv_endpoint"),
    ({"rdzv_endpoint": "node0"}, "must be host:port"),
    ({"rdzv_endpoint": "node0:99999"}, "must be host:port"),
])
def test_a_bad_rendezvous_endpoint_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        several_nodes(**changes)


def test_one_process_starts_nothing_and_is_rank_0(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    env, device = distributed.start(one_process(), "cpu", __file__, trains=True)
    assert (env.rank, env.world_size, env.enabled, device) == (0, 1, False, CPU)
    assert not dist.is_initialized()


def test_a_stage_called_in_process_cannot_start_processes(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = DistributedConfig(nproc_per_node=2, nnodes=1, rdzv_endpoint="", sync_batchnorm=True,
                            max_restarts=0, timeout_s=600)
    with pytest.raises(ConfigError, match="is not the program being run"):
        distributed.start(cfg, "cpu", __file__, trains=True)
    env, _ = distributed.start(cfg, "cpu", __file__, trains=False)  # e.g. slimming: one process
    assert not env.enabled


def test_under_torchrun_with_one_process_nothing_more_is_started(monkeypatch):
    for name, value in zip(distributed.TORCHRUN_ENV, ("0", "1", "0", "1"), strict=True):
        monkeypatch.setenv(name, value)
    cfg = DistributedConfig(nproc_per_node=2, nnodes=1, rdzv_endpoint="", sync_batchnorm=True,
                            max_restarts=0, timeout_s=600)
    env, _ = distributed.start(cfg, "cpu", __file__, trains=True)  # no re-launch, no error
    assert not env.enabled and not dist.is_initialized()


def test_a_stage_that_does_not_train_refuses_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="does not train"):
        distributed.start(one_process(), "cpu", __file__, trains=False)


def test_training_stages_are_told_apart_by_their_settings():
    from stages import _common, student_slim, teacher

    assert _common.trains(teacher.__file__)
    assert not _common.trains(student_slim.__file__)


def test_processes_share_the_cores_unless_threads_are_set():
    two = distributed.DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2)
    assert distributed.threads_per_process(3, two) == 3
    assert distributed.threads_per_process(0, distributed.DistEnv()) == 0  # torch's default
    assert distributed.threads_per_process(0, two) >= 1


# --------------------------------------------------------------------------- method statistics
def _meter_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"arch": "resnet20", "num_classes": 4, "base_width": 4})


def _meter_gated():
    return attach_gates(_meter_model(), torch.zeros(1, 3, 32, 32),
                        generator=torch.Generator().manual_seed(2))


def _meter_images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _activation_scores_of_halves(env, out: Path) -> None:
    """Each process records KDDP's activation statistics on its half of the images."""
    from pipeline.prune.saliency import ActivationMeter

    gated = _meter_gated()
    meter = ActivationMeter(gated)
    gated.train()
    images = _meter_images()[4 * env.rank: 4 * env.rank + 4]
    for chunk in images.split(2):  # two batches per process, as a sharded epoch would give
        gated(chunk).sum().backward()
    scores = meter.scores()
    torch.save(scores, out / f"scores_{env.rank}.pt")


@pytest.mark.slow
def test_activation_statistics_are_summed_over_the_processes(tmp_path):
    """KDDP closes channels from activations each process measures on its own shard: every
    process must get the statistics of all the images, or their models would differ."""
    from pipeline.prune.saliency import ActivationMeter

    run_processes(_activation_scores_of_halves, tmp_path)
    ranks = [torch.load(tmp_path / f"scores_{r}.pt", weights_only=True) for r in (0, 1)]
    gated = _meter_gated()
    meter = ActivationMeter(gated)
    gated.train()
    for chunk in _meter_images().split(2):
        gated(chunk).sum().backward()
    whole = meter.scores()
    assert set(ranks[0]) == set(ranks[1]) == set(whole)
    for key, value in whole.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)


def _teacher_counts_of_shards(env, out: Path) -> None:
    """Each process serves its own shard through one logit table, as a student stage does:
    rank 0 two batches the table holds, rank 1 one it holds and one it lacks."""
    import numpy as np

    from pipeline.students import teacher_cache_metrics
    from pipeline.teacher_cache import (
        CachedTeacher,
        pixels,
        table_context,
        table_dtype,
        teacher_mode,
        view_keys,
    )

    torch.manual_seed(0)
    live = FrozenTeacher(build_model({"arch": "resnet20", "num_classes": 4}))
    images = torch.rand(8, 3, 32, 32)
    context = table_context("0" * 64, teacher_mode("torch", torch.device("cpu"), "off", False))
    table = np.zeros(6, table_dtype(4))
    table["key"] = view_keys(pixels(images[:6]), context)
    teacher = CachedTeacher(live.teacher, "torch", table, context, make_live=lambda: live)
    for batch in images[4 * env.rank: 4 * env.rank + 4].split(2):
        teacher(batch)
    own = {"own": [teacher.cached, teacher.computed]}  # plain writes: write_json is rank 0's
    (out / f"teacher_{env.rank}.json").write_text(json.dumps(own))
    counts = teacher_cache_metrics(teacher)  # every process calls it: it sums over them
    (out / f"metrics_{env.rank}.json").write_text(json.dumps(counts))


@pytest.mark.slow
def test_teacher_cache_counts_are_summed_over_the_processes(tmp_path):
    """A data-parallel student stage's metrics count the teacher's images of every shard, not
    rank 0's half."""
    run_processes(_teacher_counts_of_shards, tmp_path)
    assert [json.loads((tmp_path / f"teacher_{r}.json").read_text())["own"] for r in (0, 1)] \
        == [[4, 0], [2, 2]]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"metrics_{rank}.json").read_text()) == {
            "teacher_cache": "table", "teacher_images_cached": 6, "teacher_images_run": 2}

