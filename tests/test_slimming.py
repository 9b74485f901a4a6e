import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.checkpoint import load_model, save_model
from pipeline.errors import ConfigError, ModelError
from pipeline.flops import count_macs, count_params
from pipeline.models import build_model
from pipeline.prune.gates import ChannelGate, GatedModel, attach_gates
from pipeline.prune.slimming import apply_pruning_spec, exactness, layer_widths, slim

TOLERANCE = 1e-4  # relative, as docs/methods.md defines exact slimming

# name -> (fresh model, input side, batch): small inputs; the deep ones use batch 2.
MODELS = {
    "resnet20": (lambda: build_model({"arch": "resnet20"}), 32, 4),
    "resnet56": (lambda: build_model({"arch": "resnet56"}), 32, 2),
    "vgg11": (lambda: build_model({"arch": "vgg11"}), 32, 4),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32, 4),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32, 2),
}


def _set_gates(gated: GatedModel, seed: int) -> dict[str, int]:
    """Open everything, then close random channels in every other group and all of one group.

    Returns the channels each group keeps (keep-one: a fully closed group keeps 1).
    """
    generator = torch.Generator().manual_seed(seed)
    keys = gated.group_keys
    with torch.no_grad():
        for index, key in enumerate(keys):
            logits = gated.gate(key).logits
            logits.copy_(torch.rand(len(logits), generator=generator) + 0.1)  # all open
            if index % 2 == 1:
                closed = torch.randperm(len(logits), generator=generator)
                closed = closed[: int(torch.randint(1, len(logits), (1,), generator=generator))]
                logits[closed] = -logits[closed]
        gated.gate(keys[-2]).logits.neg_()  # one group entirely closed
    return gated.kept_channels()


def _build(name: str, randomize_bn, seed: int = 0):
    make, side, batch = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_bn(make(), seed)
    gated = attach_gates(model, torch.zeros(1, 3, side, side))
    kept = _set_gates(gated, seed)
    images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))
    return gated.eval(), kept, images


def _no_gates_left(model: nn.Module) -> bool:
    return all(not isinstance(m, ChannelGate) and not m._forward_pre_hooks
               and not m._forward_hooks for m in model.modules())


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("name", list(MODELS))
def test_slimming_is_exact_and_replayable(name, randomize_bn):
    gated, kept, images = _build(name, randomize_bn)
    assert sum(kept[k] < w for k, w in gated.group_widths().items()) >= len(kept) / 3
    reference = gated(images)
    for round_to in (1, 8):
        slim_model, spec = slim(gated, round_to=round_to, verify=False)  # checked right here
        max_diff, relative = exactness(gated, slim_model, images)
        assert relative < TOLERANCE, (round_to, max_diff, relative)
        assert _no_gates_left(slim_model) and type(slim_model) is type(gated.model)
        assert _last_linear(slim_model).out_features == 10  # the logits are never pruned
        widths = layer_widths(slim_model)
        for key, width in gated.group_widths().items():
            expected = min(width, math.ceil(kept[key] / round_to) * round_to)
            assert len(spec["groups"][key]["keep"]) == widths[key] == expected >= 1
        if round_to == 1:  # the differentiable MACs estimate equals the real count
            assert count_macs(slim_model) == pytest.approx(gated.expected_macs().item(),
                                                           rel=1e-6)
        # Replay on a fresh model, from a JSON round trip of the spec.
        fresh = apply_pruning_spec(MODELS[name][0](), json.loads(json.dumps(spec)))
        fresh.load_state_dict(slim_model.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh.eval()(images), slim_model.eval()(images))
    assert torch.equal(gated(images), reference)  # slimming never touched the gated model


def _resnet20_params(width: dict[str, int]) -> int:
    """Parameters of a CIFAR ResNet20 with the given kept widths, counted by hand."""
    streams = [width["conv1"], width["layer2.0.conv2"], width["layer3.0.conv2"]]
    total = 3 * streams[0] * 9 + 2 * streams[0]  # stem conv + BN
    in_channels = streams[0]
    for stage, out in enumerate(streams, start=1):
        for block in range(3):
            mid = width[f"layer{stage}.{block}.conv1"]
            total += in_channels * mid * 9 + 2 * mid + mid * out * 9 + 2 * out
            in_channels = out
    return total + in_channels * 10 + 10  # fc


def _vgg11_params(width: dict[str, int]) -> int:
    convs = ["features.0", "features.4", "features.8", "features.11", "features.15",
             "features.18", "features.22", "features.25"]
    total, in_channels = 0, 3
    for name in convs:
        total += in_channels * width[name] * 9 + 2 * width[name]
        in_channels = width[name]
    return total + in_channels * 10 + 10


@pytest.mark.parametrize("name,count", [("resnet20", _resnet20_params),
                                        ("vgg11", _vgg11_params)])
@pytest.mark.parametrize("round_to", [1, 8])
def test_slimmed_parameter_count_matches_a_hand_count_from_the_kept_widths(
        name, count, round_to, randomize_bn):
    gated, _, _ = _build(name, randomize_bn, seed=1)
    assert count(gated.group_widths()) == count_params(gated.model)  # the hand count is right
    slim_model, spec = slim(gated, round_to=round_to)
    widths = {key: len(entry["keep"]) for key, entry in spec["groups"].items()}
    assert count_params(slim_model) == count(widths) < count_params(gated.model)


@pytest.mark.parametrize("round_to", [1, 8])
def test_zero_pad_shortcut_index_follows_both_stages(round_to, randomize_bn):
    gated, _, _ = _build("resnet20", randomize_bn, seed=2)
    stage1_open = set(gated.gate("conv1").kept_mask().nonzero().flatten().tolist())
    slim_model, spec = slim(gated, round_to=round_to)
    kept_in = spec["groups"]["conv1"]["keep"]
    kept_out = spec["groups"]["layer2.0.conv2"]["keep"]
    expected = []
    for out in kept_out:  # option A: output o copies input o - 8 (16 -> 32 channels)
        source = out - 8 if 8 <= out < 24 else None
        readable = source in stage1_open and source in kept_in
        expected.append(kept_in.index(source) if readable else len(kept_in))
    shortcut = slim_model.layer2[0].shortcut
    assert shortcut.source_index.tolist() == expected
    assert (shortcut.in_channels, shortcut.out_channels) == (len(kept_in), len(kept_out))
    assert spec["buffers"]["layer2.0.shortcut.source_index"] == expected


def test_checkpoint_round_trip_restores_the_slimmed_model(tmp_path, randomize_bn):
    gated, _, images = _build("resnet20", randomize_bn, seed=3)
    slim_model, spec = slim(gated, round_to=8)
    path = tmp_path / "student_slim.pt"
    save_model(path, slim_model, {"arch": "resnet20", "num_classes": 10, "pruning": spec}, {})
    loaded = load_model(path).model
    with torch.no_grad():
        assert torch.equal(loaded(images), slim_model.eval()(images))


class _ConcatNet(nn.Module):
    """Two branches concatenated, then a BatchNorm over the concat and a 1x1 mixing conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 6, 3, padding=1)  # biased, no BN of its own
        self.b, self.b_bn = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.post_bn = nn.BatchNorm2d(10)
        self.mix, self.mix_bn = nn.Conv2d(10, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = torch.cat([self.a(x), F.relu(self.b_bn(self.b(x)))], dim=1)
        y = F.relu(self.mix_bn(self.mix(F.relu(self.post_bn(y)))))
        return self.fc(y.mean((2, 3)))


def test_concat_groups_slim_exactly(randomize_bn):
    torch.manual_seed(0)
    gated = attach_gates(randomize_bn(_ConcatNet()), torch.zeros(1, 3, 8, 8))
    groups = {g.key: g for g in gated.plan.groups}
    assert sorted(groups) == ["a", "b", "mix", "stem"]
    assert "post_bn" in groups["a"].producers and "post_bn" in groups["b"].producers
    assert [s.channels for s in gated.plan.in_spans["mix"]] == [tuple(range(6)),
                                                                tuple(range(6, 10))]
    _set_gates(gated, seed=4)
    images = torch.randn(4, 3, 8, 8)
    for round_to in (1, 4):
        slim_model, spec = slim(gated.eval(), round_to=round_to)
        assert exactness(gated, slim_model, images)[1] < TOLERANCE
        replayed = apply_pruning_spec(_ConcatNet(), spec)
        replayed.load_state_dict(slim_model.state_dict())
        assert exactness(slim_model, replayed, images) == (0.0, 0.0)


def test_exactness_reports_absolute_and_relative_difference():
    reference = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    shifted = copy.deepcopy(reference)
    with torch.no_grad():
        shifted.weight[1, 1] = 3.0
    assert exactness(reference, shifted, torch.ones(1, 2)) == (1.0, 0.25)
    assert exactness(reference, reference, torch.ones(1, 2)) == (0.0, 0.0)


def test_bad_inputs_raise_pipeline_errors(randomize_bn):
    gated, _, _ = _build("resnet20", randomize_bn, seed=5)
    with pytest.raises(ConfigError, match="round_to"):
        slim(gated, round_to=0)
    _, spec = slim(gated)
    with pytest.raises(ModelError, match="format"):
        apply_pruning_spec(build_model({"arch": "resnet20"}), {"groups": {}})
    with pytest.raises(ModelError, match="expects 16 channels"):
        apply_pruning_spec(build_model({"arch": "resnet20", "base_width": 8}), spec)
    broken = copy.deepcopy(spec)
    broken["groups"]["conv1"]["keep"] = []
    with pytest.raises(ModelError, match="keep list"):
        apply_pruning_spec(build_model({"arch": "resnet20"}), broken)
