"""The slim stage: exact on real images, a violation fails it before anything is written, and
the `weight` method's sparse student passes through unchanged."""


import pytest
import torch
from stage_settings import ONE_PROCESS

from pipeline.checkpoint import load_model, read_checkpoint, save_model
from pipeline.config import RunConfig, SlimConfig
from pipeline.data import make_synthetic, save_prepared
from pipeline.errors import CheckpointError, ParityError
from pipeline.flops import sparse_cost
from pipeline.models import build_model
from pipeline.prune.gates import attach_gates
from pipeline.prune.sparse import apply_masks, magnitude_masks
from stages import student_slim as slim_stage
from stages.compression import compression_table

PDD = {"method": "pdd", "structured": True, "target_macs": None, "recovery_teacher": "teacher"}


@pytest.fixture
def gated_checkpoint(tmp_path):
    dataset = make_synthetic(32, 16, 10, seed=0)
    save_prepared(dataset, tmp_path / "prepared.npz")
    torch.manual_seed(0)
    spec = {"arch": "resnet20", "num_classes": 10}
    gated = attach_gates(build_model(spec), torch.zeros(1, 3, 32, 32),
                         generator=torch.Generator().manual_seed(0))
    for module in gated.model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    meta = {"input_shape": [3, 32, 32], "top1": 0.1, "classes": list(dataset.classes),
            "mean": list(dataset.mean), "std": list(dataset.std), "pruning": PDD}
    save_model(tmp_path / "gated.pt", gated, spec, meta)
    settings = slim_stage.Settings(
        common=RunConfig(seed=0, device="cpu", threads=0, distributed=ONE_PROCESS,
                         profile="smoke"),
        student_slim=SlimConfig(round_to=8, widths="round_to", check_images=128,
                                tolerance=1e-4))
    paths = slim_stage.Paths("pdd", dataset=tmp_path / "prepared.npz",
                             pruned=tmp_path / "gated.pt", model=tmp_path / "slim.pt",
                             metrics=tmp_path / "slim.json", width_plan=tmp_path / "plan.json")
    return settings, paths


def test_slim_stage_is_exact_and_its_file_replays(gated_checkpoint):
    params, paths = gated_checkpoint
    metrics = slim_stage.run(params, paths)
    assert metrics["rel_diff"] <= 1e-4
    assert metrics["macs_after"] < metrics["macs_before"]
    assert metrics["method"] == "pdd" and metrics["sparsity"] == 0.0
    model = load_model(paths.model).model
    assert not any("gate" in name.lower() for name, _ in model.named_modules())
    assert sum(p.numel() for p in model.parameters()) == metrics["params_after"]


def test_a_non_exact_slimming_fails_the_stage_and_writes_nothing(gated_checkpoint, monkeypatch):
    params, paths = gated_checkpoint
    real_slim = slim_stage.slim

    def perturbed_slim(gated, round_to, **options):
        model, spec = real_slim(gated, round_to, **options)
        with torch.no_grad():
            model.fc.bias.add_(1.0)
        return model, spec

    monkeypatch.setattr(slim_stage, "slim", perturbed_slim)
    with pytest.raises(ParityError, match=r"gated vs slimmed: .*relative .* > tolerance"):
        slim_stage.run(params, paths)
    assert not paths.model.exists() and not paths.metrics.exists()


def fake_table(batch: int):
    """A latency table of the resnet20 student on the fake clock, calibrated at `batch`."""
    from latency_fakes import OVERHEAD_MS, fake_timer, network_ms

    from pipeline.latency.table import LatencyTable, fit_calibration, needed_rows
    from pipeline.latency.units import named_units

    def units(width):
        return [u for _, u in named_units(build_model({"arch": "resnet20", "base_width": width}),
                                          (3, 32, 32))]

    table = LatencyTable.build({"target": "fake"}, {batch: OVERHEAD_MS},
                               needed_rows(units(16), 8), fake_timer(batch), 8)
    nets = {w: units(w) for w in (4, 8, 16)}
    table.calibration = fit_calibration({batch: {w: table.network_sum(u) for w, u in
                                                 nets.items()}},
                                        {batch: {w: network_ms(u, batch) for w, u in
                                                 nets.items()}}, table.overhead_ms)
    return table


def test_widths_by_table_are_the_fastest_at_or_above_the_kept_channels(gated_checkpoint):
    from dataclasses import replace

    from pipeline.io import write_json
    from pipeline.latency.table import grid_widths
    from pipeline.prune.latency import plan_document

    settings, paths = gated_checkpoint
    write_json(paths.width_plan, plan_document(fake_table(8), 8, widths="table"))
    settings = replace(settings, student_slim=replace(settings.student_slim, widths="table"))
    metrics = slim_stage.run(settings, paths)
    assert metrics["widths_by"] == "table" and metrics["rel_diff"] <= 1e-4
    kept = read_checkpoint(paths.pruned)["meta"]  # the gates' open channels, per group
    gated, _, _ = slim_stage.load_gated(paths.pruned, "cpu")
    for key, open_channels in gated.kept_channels().items():
        width = metrics["group_widths"][key]
        assert width >= open_channels and width in grid_widths(gated.group_widths()[key], 8)
    assert kept["pruning"]["method"] == "pdd"
    assert metrics["predicted_ms"] <= 1.01 * metrics["predicted_ms_round_to_8"]


def test_the_weight_methods_sparse_student_passes_through_unchanged(gated_checkpoint):
    settings, paths = gated_checkpoint
    torch.manual_seed(0)
    spec = {"arch": "resnet20", "num_classes": 10}
    model = build_model(spec)
    apply_masks(model, magnitude_masks(model, 0.6))
    meta = {**read_checkpoint(paths.pruned)["meta"],
            "pruning": {**PDD, "method": "weight", "structured": False}}
    save_model(paths.pruned, model, spec, meta)
    metrics = slim_stage.run(settings, slim_stage.Paths(
        "weight", paths.pruned, paths.model, paths.metrics, paths.dataset))
    assert metrics["rel_diff"] == 0.0 and metrics["macs_after"] == metrics["macs_before"]
    assert metrics["sparsity"] == pytest.approx(sparse_cost(model).sparsity)
    assert metrics["params_nonzero"] < metrics["params_after"]
    passed = load_model(paths.model).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(passed.state_dict()[name], tensor), name


def test_a_file_of_another_method_is_refused(gated_checkpoint):
    settings, paths = gated_checkpoint
    other = slim_stage.Paths("netslim", paths.pruned, paths.model, paths.metrics, paths.dataset)
    with pytest.raises(CheckpointError, match="expected a student pruned by 'netslim'.*'pdd'"):
        slim_stage.run(settings, other)
    assert not paths.model.exists()


def test_compression_table_reductions():
    metrics = {"teacher": {"top1": 0.9, "params": 850, "macs": 126},
               "student_dense": {"top1": 0.8, "params": 270, "macs": 40},
               "student_final": {"top1": 0.82, "params": 135, "macs": 30,
                                 "params_nonzero": 100, "macs_nonzero": 20, "sparsity": 0.1}}
    table = compression_table(metrics, "netslim")
    reduction = table["student_final_vs_student_dense"]
    assert table["method"] == "netslim"
    assert reduction["flops_reduction"] == pytest.approx(0.25)
    assert reduction["params_reduction"] == pytest.approx(0.5)
    assert reduction["nonzero_params_reduction"] == pytest.approx(1 - 100 / 270)
    assert reduction["top1_delta"] == pytest.approx(0.02)
