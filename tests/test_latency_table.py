"""Latency tables, the latency model and pruning against them, on a fake clock (latency_fakes):
exact expectations instead of timings. The real measurement runs in the smoke pipeline."""

import json

import pytest
import torch
from latency_fakes import OVERHEAD_MS, fake_timer, network_ms

from pipeline.errors import ConfigError, PruneError
from pipeline.latency.table import (
    LatencyTable,
    MissingRows,
    fit_calibration,
    grid_widths,
    needed_rows,
)
from pipeline.latency.units import named_units
from pipeline.models import build_model
from pipeline.prune.gates import attach_gates
from pipeline.prune.latency import (
    LatencyCost,
    fastest_widths,
    latency_penalty,
    select_at_latency,
)
from pipeline.prune.slimming import exactness, slim

SHAPE = (3, 32, 32)
BATCHES = [1, 8]


def units_of(model):
    return [unit for _, unit in named_units(model, SHAPE)]


def resnet(width: int = 16, depth: int = 20):
    torch.manual_seed(0)
    return build_model({"arch": f"resnet{depth}", "base_width": width}).eval()


@pytest.fixture(scope="module")
def table() -> LatencyTable:
    student = units_of(resnet())
    built = LatencyTable.build({"target": "fake"}, {b: OVERHEAD_MS for b in BATCHES},
                               needed_rows(student, 8), fake_timer(max(BATCHES)), width_step=8)
    nets = {f"w{w}": units_of(resnet(w)) for w in (4, 8, 16)}
    sums = {b: {n: built.network_sum(u) for n, u in nets.items()} for b in BATCHES}
    measured = {b: {n: network_ms(u, b) for n, u in nets.items()} for b in BATCHES}
    built.calibration = fit_calibration(sums, measured, built.overhead_ms)
    return built


def test_grid_widths_are_multiples_of_the_step_and_the_width():
    assert grid_widths(16, 8) == [4, 8, 16]
    assert grid_widths(64, 16) == [4, 8, 12, 16, 32, 48, 64]
    assert grid_widths(3, 8) == [3]
    assert grid_widths(20, 8) == [4, 8, 16, 20]


def test_a_row_is_the_layer_alone_without_the_call_or_the_lead_in(table):
    """Rows subtract the lead-in conv (or the empty call), so a network is the sum of its rows
    plus one call: the fake network's time exactly."""
    assert table.row_batch == max(BATCHES)
    for width in (8, 16):
        units = units_of(resnet(width))
        total = OVERHEAD_MS + table.network_sum(units)
        assert total == pytest.approx(network_ms(units, table.row_batch), rel=1e-9)


def test_each_batch_size_is_calibrated_on_its_own_measurements(table):
    """Rows come from the largest batch; batch b is predicted as overhead + alpha(b) x sum,
    here alpha(b) = b / 8 exactly, with no leave-one-out error."""
    for batch in BATCHES:
        assert table.calibration.alpha[batch] == pytest.approx(batch / max(BATCHES))
        for net in table.calibration.networks[batch].values():
            assert abs(net["rel_err"]) < 1e-9
        units = units_of(resnet(8))
        assert table.predict_ms(units, batch) == pytest.approx(network_ms(units, batch))


def test_a_width_off_the_grid_is_a_missing_row_not_a_guess(table):
    units = units_of(resnet(10))
    with pytest.raises(MissingRows) as err:
        table.network_sum(units)
    assert any("c10-10" in key for key in err.value.keys)


def test_interpolation_misses_the_staircase(table):
    """Widths between grid points cost like the next block of 16; a bilinear interpolation
    cannot know that, which is why decisions use grid widths only."""
    from pipeline.latency.table import conv_row
    from pipeline.latency.units import Unit

    unit = Unit(16, 20, 20)
    exact = fake_timer(table.row_batch)
    row = conv_row(unit, 20, 20)
    measured = exact(row.probe()) - exact(row.baseline.probe())
    assert table.interpolate_conv(unit) != pytest.approx(measured, rel=0.05)
    on_grid = Unit(32, 8, 16)
    assert table.interpolate_conv(on_grid) == table.rows[on_grid.conv_key()]


def test_a_table_survives_json_and_keeps_one_batch_on_request(table):
    again = LatencyTable.from_dict(json.loads(json.dumps(table.as_dict())))
    units = units_of(resnet(8))
    assert again.predict_ms(units, 8) == pytest.approx(table.predict_ms(units, 8))
    one = again.at_batch(8)
    assert one.batch_sizes == [8] and one.predict_ms(units, 8) == pytest.approx(
        table.predict_ms(units, 8))
    with pytest.raises(Exception, match="batch sizes"):
        again.at_batch(3)


def test_ensure_measures_only_missing_rows(table):
    copy = LatencyTable.from_dict(table.as_dict())
    calls = []

    def counting(model):
        calls.append(model)
        return fake_timer(copy.row_batch)(model)

    units = units_of(resnet(16))
    assert copy.ensure(needed_rows(units, 8).values(), counting) == 0 and not calls
    assert copy.ensure(needed_rows(units_of(resnet(10)), 10).values(), counting) > 0


@pytest.fixture()
def gated():
    model = resnet()
    return attach_gates(model, torch.zeros(1, *SHAPE),
                        generator=torch.Generator().manual_seed(0))


def test_the_cost_of_widths_is_the_table_price_of_the_slimmed_network(table, gated):
    """LatencyCost.predict prices exactly the network slim(widths=...) builds."""
    cost = LatencyCost(gated, table, 8)
    widths = {key: cost.candidates(key)[len(cost.candidates(key)) // 2] for key in cost.widths}
    gated.set_keep({key: torch.arange(w) < widths[key] for key, w in cost.widths.items()})
    slimmed, _ = slim(gated, widths=widths)
    assert cost.predict(widths) == pytest.approx(table.predict_ms(units_of(slimmed), 8))


def test_the_expected_latency_follows_the_gates_and_has_a_gradient(table, gated):
    cost = LatencyCost(gated, table, 1)
    widths = {key: 40 if w == 64 else w for key, w in cost.widths.items()}
    gated.set_keep({key: torch.arange(w) < widths[key] for key, w in cost.widths.items()})
    assert float(cost.expected_ms().detach()) == pytest.approx(cost.predict(widths), rel=1e-6)
    for key in gated.group_keys:  # inside ApproxSign's live range (no gradient at |logit| 1)
        with torch.no_grad():
            gated.gate(key).logits.mul_(0.5)
        gated.gate(key).logits.requires_grad_(True)
    penalty = latency_penalty(cost, budget_ms=0.5 * cost.predict(widths))
    penalty.backward()
    grads = {key: gated.gate(key).logits.grad for key in gated.group_keys}
    assert float(penalty.detach()) > 0
    # 40 channels sit between grid rows 32 and 40 of different cost (blocks of 16): a slope
    # pushes those gates; where the table is flat (8 and 16 channels: one block) none does.
    assert all(grads[key].abs().sum() > 0 for key, w in cost.widths.items() if w == 64)
    assert float(latency_penalty(cost, budget_ms=10 * cost.predict(widths)).detach()) == 0


def test_the_knapsack_meets_the_budget_at_grid_widths(table, gated):
    cost = LatencyCost(gated, table, 8)
    full = cost.predict(cost.widths)
    scores = {key: torch.rand(w, generator=torch.Generator().manual_seed(1))
              for key, w in cost.widths.items()}
    chosen = select_at_latency(cost, scores, 0.5 * full)
    assert chosen.predicted_ms <= 0.5 * full
    assert chosen.predicted_ms == pytest.approx(cost.predict(chosen.widths))
    assert all(w in cost.candidates(k) for k, w in chosen.widths.items())
    assert {k: int(m.sum()) for k, m in chosen.masks.items()} == chosen.widths
    with pytest.raises(PruneError, match="below the fastest network"):
        select_at_latency(cost, scores, 1e-6)


def test_fixed_groups_keep_every_channel(table, gated):
    cost = LatencyCost(gated, table, 8)
    scores = {key: torch.ones(w) for key, w in cost.widths.items()}
    fixed = frozenset({gated.group_keys[0]})
    chosen = select_at_latency(cost, scores, 0.7 * cost.predict(cost.widths), fixed)
    assert chosen.widths[gated.group_keys[0]] == cost.widths[gated.group_keys[0]]


def test_the_fastest_width_is_never_below_the_kept_channels(table, gated):
    """On the staircase 12 channels cost what 16 do: the table keeps 16 (more for free)."""
    cost = LatencyCost(gated, table, 8)
    kept = {key: min(w, 12) if w == 16 else w // 2 + 1 for key, w in cost.widths.items()}
    widths = fastest_widths(cost, kept)
    assert all(widths[k] >= kept[k] for k in kept)
    assert all(widths[k] == 16 for k, w in cost.widths.items() if w == 16)


def test_the_fastest_widths_are_their_own_fastest_widths(table, gated):
    """Slimming widens a decision made at these widths by nothing: the answer is a fixed
    point, for any kept counts."""
    cost = LatencyCost(gated, table, 8)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        kept = {key: int(torch.randint(1, w + 1, (1,), generator=generator))
                for key, w in cost.widths.items()}
        widths = fastest_widths(cost, kept)
        assert fastest_widths(cost, widths) == widths


def test_a_macs_target_is_met_at_the_widths_the_table_ships(table, gated):
    """Widening an exact decision to the table's widths after the fact overshoots a MACs
    target; priced inside the decision, the shipped widths meet it and slimming adds nothing."""
    from pipeline.prune.budget import macs_fraction, select_at_target, top_mask
    from pipeline.prune.latency import select_at_target_by_table

    cost = LatencyCost(gated, table, 8)
    scores = {key: torch.rand(w, generator=torch.Generator().manual_seed(2))
              for key, w in cost.widths.items()}
    target = 0.5
    after = fastest_widths(cost, select_at_target(gated, scores, target, 1).kept())
    widened = {key: top_mask(s, after[key]) for key, s in scores.items()}
    assert macs_fraction(gated, widened) > target  # the problem this decision solves
    chosen = select_at_target_by_table(cost, scores, target)
    assert chosen.decision.macs_fraction <= target
    assert chosen.decision.kept() == chosen.widths
    assert fastest_widths(cost, chosen.widths) == chosen.widths
    assert all(w in cost.candidates(k) for k, w in chosen.widths.items())
    assert chosen.inner_target < target
    assert chosen.predicted_ms == pytest.approx(cost.predict(chosen.widths))
    with pytest.raises(PruneError, match="cannot be met at the latency table's widths"):
        select_at_target_by_table(cost, scores, 0.001)
    with pytest.raises(PruneError, match="must be in"):
        select_at_target_by_table(cost, scores, 1.5)


def test_slim_to_widths_is_exact_and_refuses_widths_below_the_open_channels(gated):
    keep = {key: torch.arange(w) < max(1, w // 3) for key, w in gated.group_widths().items()}
    gated.set_keep(keep)
    widths = {key: max(1, w // 2) for key, w in gated.group_widths().items()}
    slimmed, spec = slim(gated, widths=widths)
    assert spec["widths"] == widths
    images = torch.randn(4, *SHAPE)
    assert exactness(gated, slimmed, images)[1] < 1e-5
    too_narrow = {**widths, gated.group_keys[0]: 0}
    with pytest.raises(ConfigError, match="between its"):
        slim(gated, widths=too_narrow)


def test_a_macs_budget_plan_does_not_change_when_the_table_does(tmp_path, table):
    """latency_plan writes what pruning reads; a MACs budget with rounded widths reads nothing
    of the table, so a re-measured table leaves both files byte-identical (nothing retrains)."""
    from pipeline.config import (
        LatencyBudget,
        LatencyConfig,
        MacsBudget,
        PruneConfig,
        SlimConfig,
        TimingPlan,
    )
    from pipeline.io import write_json
    from stages import latency_plan

    lat = LatencyConfig(target="onnxruntime-cpu", batch_sizes=(1, 8), select_batch=8,
                        width_step=8, sweep_widths=(), holdout=0, probe_sessions=1,
                        network_sessions=1, timing=TimingPlan(warmup_iters=1, warmup_seconds=0,
                                                              min_iters=1, min_seconds=0))
    paths = latency_plan.Paths(tmp_path / "table.json", tmp_path / "budget.json",
                               tmp_path / "slim.json")
    settings = latency_plan.Settings(PruneConfig(methods=("pdd",), budget=MacsBudget(0.5)),
                                     SlimConfig(round_to=8, widths="round_to", check_images=8,
                                                tolerance=1e-4), lat)
    contents = []
    for scale in (1.0, 2.0):
        changed = LatencyTable.from_dict(table.as_dict())
        changed.rows = {key: ms * scale for key, ms in table.rows.items()}
        write_json(paths.table, {**changed.as_dict(), "status": "ok"})
        latency_plan.run(settings, paths)
        contents.append((paths.budget.read_bytes(), paths.slim.read_bytes()))
    assert contents[0] == contents[1]
    latency = LatencyBudget(latency_ms=1.0, target="onnxruntime-cpu", precision="fp32", batch=8)
    by_table = latency_plan.Settings(
        PruneConfig(methods=("pdd",), budget=latency),
        SlimConfig(round_to=8, widths="table", check_images=8, tolerance=1e-4), lat)
    latency_plan.run(by_table, paths)
    from pipeline.prune.latency import read_budget_plan, read_width_table

    plan = read_budget_plan(paths.budget)
    assert plan.budget_ms == 1.0 and plan.batch == 8 and plan.table.batch_sizes == [8]
    assert read_width_table(paths.budget) is None  # the knapsack picks grid widths itself
    assert read_width_table(paths.slim).batch == 8
    macs_by_table = latency_plan.Settings(PruneConfig(methods=("pdd",), budget=MacsBudget(0.5)),
                                          by_table.student_slim, lat)
    latency_plan.run(macs_by_table, paths)
    priced = read_width_table(paths.budget)  # the MACs decision is made at the table's widths
    assert priced.batch == 8 and priced.table.batch_sizes == [8]
    latency_plan.run(settings, paths)
    assert read_width_table(paths.budget) is None  # rounded widths: nothing to price


def test_pruning_refuses_a_skipped_table(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.io import write_json
    from stages import latency_plan

    write_json(tmp_path / "table.json", {"status": "skipped", "target": "ssh-onnxruntime",
                                         "reason": "no host configured"})
    with pytest.raises(PipelineError, match="no host configured"):
        latency_plan.load_table(tmp_path / "table.json", "prune.budget.latency_ms")


def test_a_student_the_table_cannot_price_is_refused_before_training(table):
    from pipeline.prune.latency import require_priced

    require_priced(resnet(), SHAPE, table)  # the student the table was built for
    with pytest.raises(MissingRows) as err:
        require_priced(resnet(width=24), SHAPE, table)  # a wider student: rows missing
    assert any("c24-24" in key for key in err.value.keys)
