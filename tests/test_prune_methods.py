"""Every pruning method on a tiny ResNet: it removes what its definition says, the structured
ones slim exactly, and the common MACs-target search lands on the target."""

import math

import pytest
import torch
from torch import nn

from pipeline.config import (
    DistillConfig,
    KddpConfig,
    NetslimConfig,
    PddConfig,
    PruneThenKdConfig,
    SdapConfig,
    TrainConfig,
    WeightConfig,
)
from pipeline.data import make_synthetic
from pipeline.distill import FrozenTeacher
from pipeline.errors import PruneError
from pipeline.flops import count_macs, sparse_cost, weight_tensors
from pipeline.models import build_model
from pipeline.prune.budget import masks_at_threshold, normalize, select_at_target
from pipeline.prune.gates import attach_gates
from pipeline.prune.method import PruneJob, streams
from pipeline.prune.netslim import batchnorm_l1
from pipeline.prune.registry import make_method
from pipeline.prune.saliency import ActivationMeter, bn_scale_scores, filter_l1_scores
from pipeline.prune.sdap import ChannelScales
from pipeline.prune.slimming import exactness, slim
from pipeline.prune.sparse import ZeroKeeper, apply_masks, magnitude_masks
from pipeline.training import make_loaders

SMALL = {"arch": "resnet20", "num_classes": 10, "base_width": 8}  # widths 8, 16, 32
EXAMPLE = torch.zeros(1, 3, 32, 32)


def schedule(epochs: int = 2) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, eval_batch_size=64, lr=0.05, momentum=0.9,
                       nesterov=True, weight_decay=5e-4, schedule="cosine", milestones=(),
                       gamma=0.1, warmup_epochs=0, label_smoothing=0.0, amp="off",
                       channels_last=False)


def make_job(tmp_path, target: float | None, round_to: int = 1, epochs: int = 1) -> PruneJob:
    torch.manual_seed(0)
    dataset = make_synthetic(64, 32, 10, seed=0)
    cfg = schedule(epochs)
    train, test = make_loaders(dataset, cfg, torch.device("cpu"), seed=0)
    teacher = FrozenTeacher(build_model({"arch": "resnet20", "num_classes": 10,
                                         "base_width": 4}))
    return PruneJob(student=build_model(SMALL), teacher=teacher, train=cfg,
                    distill=DistillConfig(student_arch="resnet20", temperature=3.0, alpha=0.6,
                                          teacher_runtime="torch", teacher_cache=False),
                    target_macs=target, round_to=round_to, seed=0, train_loader=train,
                    test_loader=test, example_input=EXAMPLE, checkpoint=tmp_path / "ckpt.pt",
                    fingerprint="test", title="test")


def assert_slims_exactly(gated, randomize_bn, round_to: int = 1) -> float:
    """The slimmed network computes the gated one's logits; returns its MACs fraction."""
    randomize_bn(gated.model, seed=3)
    slimmed, _ = slim(gated.eval(), round_to, verify=False)
    _, relative = exactness(gated, slimmed, torch.randn(8, 3, 32, 32))
    assert relative <= 1e-4
    return count_macs(slimmed) / gated.full_macs


def kept_masks(gated) -> dict[str, torch.Tensor]:
    return {key: vector.bool() for key, vector in gated.gate_vectors().items()}


def assert_lowest_scores_pruned(gated, scores) -> None:
    """In every group, each pruned channel scores no higher than any kept one."""
    for key, mask in kept_masks(gated).items():
        if (~mask).any():
            assert scores[key][~mask].max() <= scores[key][mask].min(), key


# ---------------------------------------------------------------------------- netslim
def test_netslim_prunes_the_channels_below_its_global_threshold(tmp_path, randomize_bn):
    method = make_method("netslim", NetslimConfig(l1=1e-4, percent=0.4, normalize="none"))
    outcome = method.prune(make_job(tmp_path, target=None))
    gated = outcome.model
    scores = bn_scale_scores(gated)
    threshold = outcome.decision["own_threshold"]
    assert threshold == pytest.approx(float(torch.quantile(torch.cat(list(scores.values())),
                                                           0.4)))
    for key, mask in kept_masks(gated).items():
        below = scores[key] < threshold
        if below.all():  # every channel below: the group keeps its best one
            assert mask.sum() == 1 and scores[key][mask] == scores[key].max()
        else:
            assert torch.equal(mask, ~below), key
    assert not any(p.requires_grad for p in gated.gate_parameters())
    assert assert_slims_exactly(gated, randomize_bn) < 1.0


def test_netslim_penalty_is_the_l1_of_every_batchnorm_scale():
    """Its gradient is sign(gamma): the official code's `updateBN` step."""
    model = build_model(SMALL)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(-1.0, 1.0)
    penalty = batchnorm_l1(model)()
    assert penalty.item() == pytest.approx(sum(bn.weight.abs().sum().item() for bn in bns))
    penalty.backward()
    assert all(torch.equal(bn.weight.grad, bn.weight.detach().sign()) for bn in bns)


# ---------------------------------------------------------------------- prune_then_kd
def test_prune_then_kd_removes_the_lowest_l1_filters_and_keeps_the_streams(tmp_path,
                                                                           randomize_bn):
    method = make_method("prune_then_kd", PruneThenKdConfig(
        ratio=0.5, keep_streams=True, normalize="mean", recovery_teacher="unpruned"))
    outcome = method.prune(make_job(tmp_path, target=None))
    gated = outcome.model
    scores = filter_l1_scores(gated)
    coupled = streams(gated)
    assert coupled and len(coupled) < len(gated.group_keys)
    for key, mask in kept_masks(gated).items():
        if key in coupled:
            assert mask.all(), key  # Li et al.: residual streams untouched
        else:
            assert int(mask.sum()) == math.ceil(0.5 * mask.numel()), key
    assert_lowest_scores_pruned(gated, scores)
    assert outcome.recovery_teacher == "unpruned"
    assert assert_slims_exactly(gated, randomize_bn) < 1.0


def test_filter_l1_scores_are_the_mean_absolute_filter_weight():
    gated = attach_gates(build_model(SMALL), EXAMPLE)
    conv = gated.model.layer1[0].conv1  # produces its block's internal group alone
    scores = filter_l1_scores(gated)["layer1.0.conv1"]
    assert torch.allclose(scores, conv.weight.abs().flatten(1).mean(1))


# ------------------------------------------------------------------------------- kddp
def silence_channels(model: nn.Module, bn: nn.BatchNorm2d, channels: list[int]) -> None:
    """Channels whose BN output is 0 before the ReLU: their activation is 0 everywhere."""
    with torch.no_grad():
        bn.weight[channels] = 0.0
        bn.bias[channels] = 0.0


def test_kddp_prunes_channels_with_low_mean_activation(tmp_path, randomize_bn):
    job = make_job(tmp_path, target=None)
    silent = [1, 4, 6]
    bn = job.student.layer2[1].bn1  # the internal group of block layer2.1 (16 channels)
    silence_channels(job.student, bn, silent)
    method = make_method("kddp", KddpConfig(l1=1e-3, tau=0.01, dynamic=True, score_images=64,
                                            normalize="mean"))
    gated = method.prune(job).model
    mask = kept_masks(gated)["layer2.1.conv1"]
    assert not mask[silent].any()  # inactive: pruned (and closed during training already)
    assert mask.sum() >= 1
    assert assert_slims_exactly(gated, randomize_bn) <= 1.0


def test_activation_meter_measures_before_the_gate_and_ignores_evaluation():
    gated = attach_gates(build_model(SMALL), EXAMPLE).open_all()
    meter = ActivationMeter(gated)
    closed = {key: torch.ones(w, dtype=torch.bool) for key, w in gated.group_widths().items()}
    closed["layer1.0.conv1"][0] = False
    gated.set_keep(closed)
    gated.train()
    gated(torch.randn(4, 3, 32, 32))
    assert meter.penalty() > 0
    assert meter.scores()["layer1.0.conv1"][0] > 0  # the closed channel's natural activation
    meter.reset()
    gated.eval()
    gated(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="no recorded activation"):
        meter.scores()  # evaluation passes are no decision input
    meter.remove()


# ------------------------------------------------------------------------------- sdap
def test_sdap_prunes_the_smallest_scales_and_folds_them_exactly(randomize_bn):
    gated = attach_gates(build_model(SMALL), EXAMPLE).open_all()
    randomize_bn(gated.model)
    scales = ChannelScales(gated)
    with torch.no_grad():
        for key in gated.group_keys:
            scales.of(key).uniform_(0.0, 2.0)
    images = torch.randn(8, 3, 32, 32)
    gated.eval()
    with torch.no_grad():
        scaled = gated(images)
    scores = {key: scales.of(key).detach().abs() for key in gated.group_keys}
    scales.fold_and_remove()
    _, relative = exactness(gated, gated, images)  # hooks gone: a plain gated network again
    with torch.no_grad():
        assert (gated(images) - scaled).abs().max() <= 1e-4 * scaled.abs().max()
    decision = select_at_target(gated, scores, 0.5, round_to=1)
    gated.set_keep(decision.masks, scores)
    assert_lowest_scores_pruned(gated, scores)
    assert relative == 0.0
    assert assert_slims_exactly(gated, randomize_bn) <= 0.5


def test_sdap_run_reaches_the_target_with_a_self_teacher(tmp_path, randomize_bn):
    method = make_method("sdap", SdapConfig(pretrain_epochs=1, l1=1e-3, scale_lr=0.05,
                                            rate=0.5, normalize="none"))
    outcome = method.prune(make_job(tmp_path, target=0.6, epochs=2))
    gated = outcome.model
    assert outcome.decision["mode"] == "target"
    assert 0.55 <= outcome.decision["macs_fraction"] <= 0.6
    assert set(gated.state_dict()) == set(attach_gates(build_model(SMALL),
                                                       EXAMPLE).state_dict())
    assert [row["kept_macs_fraction"] for row in outcome.result.history][0] == 1.0
    assert assert_slims_exactly(gated, randomize_bn) <= 0.6 + 1e-9


# ----------------------------------------------------------------------------- weight
def test_weight_pruning_hits_the_exact_sparsity_with_the_smallest_weights(tmp_path):
    outcome = make_method("weight", WeightConfig(sparsity=0.7)).prune(make_job(tmp_path, None))
    model = outcome.model
    weights = weight_tensors(model)
    total = sum(w.numel() for w in weights.values())
    cost = sparse_cost(model)
    assert cost.sparsity == round(0.7 * total) / total
    assert outcome.decision["sparsity"] == cost.sparsity
    assert cost.macs_nonzero < count_macs(model) and cost.params_nonzero < sum(
        p.numel() for p in model.parameters())
    assert all(not isinstance(m, nn.Module) or not m._forward_pre_hooks for m in model.modules())


def test_magnitude_masks_remove_the_globally_smallest_weights():
    model = build_model(SMALL)
    before = {name: w.detach().clone() for name, w in weight_tensors(model).items()}
    apply_masks(model, magnitude_masks(model, 0.5))
    removed = torch.cat([before[n][w == 0].abs().flatten()
                         for n, w in weight_tensors(model).items()])
    kept = torch.cat([before[n][w != 0].abs().flatten() for n, w in weight_tensors(model).items()])
    assert removed.max() <= kept.min()
    with pytest.raises(PruneError, match="sparsity must be in"):
        magnitude_masks(model, 1.0)


def test_zeros_stay_zero_through_training():
    torch.manual_seed(0)
    model = build_model(SMALL)
    apply_masks(model, magnitude_masks(model, 0.8))
    zeros = sparse_cost(model).sparsity
    keeper = ZeroKeeper(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    for _ in range(5):
        loss = model(torch.randn(8, 3, 32, 32)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    keeper.check()
    assert sparse_cost(model).sparsity == zeros
    keeper.remove()
    with torch.no_grad():
        conv = weight_tensors(model)["conv1"]
        conv[conv == 0] = 1.0  # what training without the keeper could do
    with pytest.raises(PruneError, match="pruned weights are no longer zero"):
        keeper.check()


# -------------------------------------------------------------------------------- pdd
def test_pdd_without_a_target_keeps_its_trained_gates(tmp_path, randomize_bn):
    outcome = make_method("pdd", PddConfig(gate_lr=0.05, flops_target=0.0,
                                           flops_weight=0.0)).prune(make_job(tmp_path, None))
    gated = outcome.model
    logits = torch.cat([p.detach() for p in gated.gate_parameters()])
    assert logits.abs().max() < 0.9  # as trained (near the N(0,1)*1e-3 init), not rewritten
    assert len(outcome.decision["gate_flips_per_epoch"]) == 1
    assert assert_slims_exactly(gated, randomize_bn, round_to=8) <= 1.0


def test_pdd_with_a_target_is_trimmed_to_it(tmp_path):
    outcome = make_method("pdd", PddConfig(gate_lr=0.05, flops_target=0.0, flops_weight=0.0)
                          ).prune(make_job(tmp_path, target=0.4))
    assert outcome.decision["mode"] == "target"
    assert 0.38 <= outcome.decision["macs_fraction"] <= 0.4
    assert "own size" in outcome.alternatives


# ------------------------------------------------------------------ the common MACs target
@pytest.mark.parametrize(("round_to", "tolerance"), [(1, 0.005), (8, 0.02)])
def test_the_target_search_lands_within_tolerance_below_the_target(round_to, tolerance,
                                                                   randomize_bn):
    """Stated tolerance: the kept MACs are at most the target and at most 0.5 % (round_to 1)
    or 2 % (round_to 8) of the unpruned MACs below it, on the full-width ResNet20."""
    gated = attach_gates(build_model({"arch": "resnet20", "num_classes": 10}), EXAMPLE)
    generator = torch.Generator().manual_seed(1)
    scores = {key: torch.rand(width, generator=generator)
              for key, width in gated.group_widths().items()}
    for target in (0.3, 0.5, 0.75):
        decision = select_at_target(gated, scores, target, round_to)
        assert target - tolerance <= decision.macs_fraction <= target, (target, decision)
        assert all(int(m.sum()) % round_to == 0 or int(m.sum()) == m.numel()
                   for m in decision.masks.values())
    gated.set_keep(decision.masks, scores)
    assert assert_slims_exactly(gated, randomize_bn, round_to) == pytest.approx(
        decision.macs_fraction)


def test_a_target_below_the_smallest_network_is_refused():
    gated = attach_gates(build_model(SMALL), EXAMPLE)
    scores = {key: torch.rand(width) for key, width in gated.group_widths().items()}
    with pytest.raises(PruneError, match="below the smallest network"):
        select_at_target(gated, scores, 0.05, round_to=8)


def test_normalize_makes_groups_comparable():
    scores = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([10.0, 30.0])}
    assert torch.equal(normalize(scores, "mean")["a"], normalize(scores, "mean")["b"])
    masks = masks_at_threshold(normalize(scores, "mean"), 1.0, round_to=1)
    assert masks["a"].tolist() == masks["b"].tolist() == [False, True]


# ---------------------------------------------------------------------------- latency budget
def small_table(batch: int = 8):
    """A fake-clock latency table (tests/latency_fakes.py) of the SMALL student, grid step 4."""
    from latency_fakes import OVERHEAD_MS, fake_timer, network_ms

    from pipeline.latency.table import LatencyTable, fit_calibration, needed_rows
    from pipeline.latency.units import named_units

    def units(width):
        model = build_model({**SMALL, "base_width": width})
        return [unit for _, unit in named_units(model, (3, 32, 32))]

    table = LatencyTable.build({"target": "fake"}, {batch: OVERHEAD_MS},
                               needed_rows(units(8), 4), fake_timer(batch), 4)
    nets = {w: units(w) for w in (4, 8)}
    table.calibration = fit_calibration(
        {batch: {w: table.network_sum(u) for w, u in nets.items()}},
        {batch: {w: network_ms(u, batch) for w, u in nets.items()}}, table.overhead_ms)
    return table


@pytest.mark.parametrize("name", ["pdd", "netslim"])
def test_a_latency_budget_is_met_at_grid_widths_and_slims_exactly(tmp_path, randomize_bn, name):
    """Under a latency budget every structured method decides by the table (PDD's training
    penalty included): the decision's predicted latency is within the budget, every width is a
    grid width, and the network slims exactly at those widths."""
    from dataclasses import replace

    from pipeline.latency.table import grid_widths
    from pipeline.latency.units import named_units
    from pipeline.prune.latency import LatencyCost, LatencyPlan

    table = small_table()
    settings = {"pdd": PddConfig(gate_lr=0.05, flops_target=0.5, flops_weight=1.0),
                "netslim": NetslimConfig(l1=1e-4, percent=0.4, normalize="none")}[name]
    dense = table.predict_ms([u for _, u in named_units(build_model(SMALL), (3, 32, 32))], 8)
    plan = LatencyPlan(table, budget_ms=0.95 * dense, batch=8)  # 16-channel blocks: ~0.9 is
    # the fastest this small student (widths 8, 16, 32) can get
    job = replace(make_job(tmp_path, target=None), latency=plan)
    outcome = make_method(name, settings).prune(job)
    decision, gated = outcome.decision, outcome.model
    assert decision["mode"] == "latency" and decision["predicted_ms"] <= plan.budget_ms
    widths = gated.group_widths()
    for key, kept in gated.kept_channels().items():
        assert kept in grid_widths(widths[key], 4), (key, kept)
    assert LatencyCost(gated, table, 8).predict(gated.kept_channels()) == pytest.approx(
        decision["predicted_ms"])
    assert assert_slims_exactly(gated, randomize_bn) < 1.0


@pytest.mark.parametrize("name", ["pdd", "netslim"])
def test_a_macs_budget_with_table_widths_ships_at_most_the_budget(tmp_path, randomize_bn, name):
    """student_slim.widths: table under a MACs budget: the decision is made at the widths the
    table ships (grid widths, each its own fastest), so slimming them keeps MACs within the
    budget."""
    from dataclasses import replace

    from pipeline.prune.latency import LatencyCost, WidthTable, fastest_widths

    settings = {"pdd": PddConfig(gate_lr=0.05, flops_target=0.5, flops_weight=1.0),
                "netslim": NetslimConfig(l1=1e-4, percent=0.4, normalize="none")}[name]
    table = small_table()
    job = replace(make_job(tmp_path, target=0.6), width_table=WidthTable(table, 8))
    outcome = make_method(name, settings).prune(job)
    decision, gated = outcome.decision, outcome.model
    assert decision["mode"] == "target" and decision["widths_by"] == "table"
    assert decision["macs_fraction"] <= 0.6
    kept = gated.kept_channels()
    assert fastest_widths(LatencyCost(gated, table, 8), kept) == kept
    assert assert_slims_exactly(gated, randomize_bn) <= 0.6
