import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ModelError
from pipeline.flops import count_macs
from pipeline.models import build_model
from pipeline.models.resnet_cifar import ZeroPadShortcut
from pipeline.prune.gates import (
    ApproxSign,
    ChannelGate,
    attach_gates,
    count_flips,
    gate_from_logits,
    macs_penalty,
)

GRID = [-2.5, -1.0, -0.75, -0.25, -1e-6, 0.0, 1e-6, 0.3, 0.9, 1.0, 1.7]


@pytest.fixture
def make_gated(randomize_bn):
    """`make_gated(seed, **attach_kwargs)`: a gated ResNet20 with non-trivial BatchNorm."""

    def make(seed: int = 0, **kwargs):
        model = randomize_bn(build_model({"arch": "resnet20"}), seed)
        generator = torch.Generator().manual_seed(seed)
        return attach_gates(model, torch.zeros(1, 3, 32, 32), generator=generator, **kwargs)

    return make


# --------------------------------------------------------------------------- gate arithmetic
def test_approx_sign_forward_is_sign_with_zero_mapped_to_plus_one():
    m = torch.tensor(GRID)
    expected = torch.tensor([-1.0 if v < 0 else 1.0 for v in GRID])
    assert torch.equal(ApproxSign.apply(m), expected)


def test_gate_forward_is_exactly_zero_or_one():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    gate = gate_from_logits(logits)
    assert set(gate.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(gate, (logits >= 0).float())


def test_approx_sign_gradient_is_two_minus_two_abs_m_inside_and_zero_outside():
    m = torch.tensor(GRID, requires_grad=True)
    ApproxSign.apply(m).sum().backward()
    expected = [max(0.0, 2 - 2 * abs(v)) for v in GRID]
    assert m.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert m.grad[0] == 0 and m.grad[-1] == 0  # outside [-1, 1]
    assert m.grad[3] == pytest.approx(1.5) and m.grad[5] == pytest.approx(2.0)


def test_gate_gradient_is_half_the_sign_gradient_and_scales_with_upstream():
    m = torch.tensor(GRID, requires_grad=True)
    upstream = torch.linspace(-1, 2, len(GRID))
    (gate_from_logits(m) * upstream).sum().backward()
    expected = [u * max(0.0, 1 - abs(v)) for u, v in zip(upstream.tolist(), GRID, strict=True)]
    assert m.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_all_closed_group_keeps_its_largest_logit_with_straight_through_gradient():
    m = torch.tensor([-0.3, -0.1, -0.7, -0.2], requires_grad=True)
    gate = gate_from_logits(m)
    assert gate.tolist() == [0.0, 1.0, 0.0, 0.0]
    gate.sum().backward()
    assert m.grad.tolist() == pytest.approx([0.7, 0.9, 0.3, 0.8])


def test_channel_gate_init_is_small_gaussian_and_reproducible():
    make = lambda: ChannelGate(4096, generator=torch.Generator().manual_seed(3))  # noqa: E731
    a, b = make(), make()
    assert torch.equal(a.logits, b.logits)
    assert a.logits.std().item() == pytest.approx(1e-3, rel=0.1)
    assert a.logits.abs().max().item() < 1e-2 and (a.logits != 0).all()
    assert a.kept_mask().dtype == torch.bool


# --------------------------------------------------------------------------- groups and placement
def test_resnet20_option_a_stages_are_separate_groups_and_logits_are_not_gated(make_gated):
    gated = make_gated()
    widths = gated.group_widths()
    # 3 stage streams + 9 block-internal groups; the classifier has none.
    assert len(widths) == 12
    assert widths["conv1"] == 16 and widths["layer2.0.conv2"] == 32
    assert widths["layer3.0.conv2"] == 64
    groups = {g.key: g for g in gated.plan.groups}
    assert "layer2.0.shortcut" in groups["conv1"].consumers
    assert "layer2.0.shortcut" in groups["layer2.0.conv2"].producers
    assert "layer2.0.shortcut" not in groups["conv1"].producers
    assert not any(name.startswith("layer2") for name in groups["conv1"].producers)
    assert all("fc" not in g.producers for g in gated.plan.groups)
    assert groups["layer1.0.conv1"].producers == ("layer1.0.conv1", "layer1.0.bn1")
    assert groups["layer1.0.conv1"].consumers == ("layer1.0.conv2",)  # gated where read


def test_closed_channels_are_exactly_zero_in_every_consumer(make_gated):
    gated = make_gated(seed=1)
    closed = {key: ~gated.gate(key).kept_mask() for key in gated.group_keys}
    assert all(mask.any() for mask in closed.values())  # N(0, 1e-3) init closes about half
    seen = []

    def check(name):
        def hook(_module, inputs):
            for span in gated.plan.in_spans[name]:
                off = closed[span.group][list(span.gate_index)]
                channels = torch.tensor(span.channels)[off]
                assert inputs[0][:, channels].abs().max() == 0, (name, span.group)
                seen.append(name)
        return hook

    consumers = {name for group in gated.plan.groups for name in group.consumers}
    for name in consumers:  # registered after the gates' pre-hooks, so they see gated inputs
        gated.model.get_submodule(name).register_forward_pre_hook(check(name))
    gated.eval()(torch.randn(2, 3, 32, 32))
    assert set(seen) == consumers and "layer3.0.shortcut" in seen and "fc" in seen


def test_attach_leaves_weights_and_bn_statistics_untouched(randomize_bn):
    model = randomize_bn(build_model({"arch": "resnet20"})).train()
    before = copy.deepcopy(model.state_dict())
    gated = attach_gates(model, torch.zeros(1, 3, 32, 32))
    after = gated.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert gated.model.training


def test_zero_pad_shortcut_is_not_traced_as_elementwise(make_gated):
    gated = make_gated()
    shortcuts = [n for n, m in gated.model.named_modules() if isinstance(m, ZeroPadShortcut)]
    assert shortcuts == ["layer2.0.shortcut", "layer3.0.shortcut"]
    producer_of = {n: g.key for g in gated.plan.groups for n in g.producers}
    consumer_of = {n: g.key for g in gated.plan.groups for n in g.consumers}
    for name in shortcuts:
        assert producer_of[name] != consumer_of[name]


# ------------------------------------------------------------------------ costs and bookkeeping
def test_full_and_expected_macs_match_the_flops_counter_when_all_gates_open(make_gated):
    gated = make_gated(init_mean=0.5)
    macs = count_macs(gated.plain_copy())
    assert gated.full_macs == macs
    assert gated.expected_macs().item() == pytest.approx(macs, rel=1e-6)


def test_expected_macs_follow_the_gates_and_are_differentiable(make_gated):
    gated = make_gated(init_mean=0.5)
    with torch.no_grad():
        gated.gate("layer1.0.conv1").logits[:8] = -0.5  # close 8 of 16 mid channels
    saved = 8 * 32 * 32 * 9 * 16 * 2  # conv1 outputs and conv2 inputs of that block
    assert gated.expected_macs().item() == pytest.approx(gated.full_macs - saved, rel=1e-6)
    penalty = macs_penalty(gated, 0.5)
    assert penalty.item() == pytest.approx((gated.full_macs - saved) / gated.full_macs - 0.5,
                                           rel=1e-5)
    penalty.backward()
    grads = torch.cat([p.grad for p in gated.gate_parameters()])
    assert (grads > 0).all()  # descending the penalty lowers every logit (|m| < 1 here)


def test_macs_penalty_is_zero_under_budget_and_rejects_bad_targets(make_gated):
    gated = make_gated(init_mean=0.5)
    assert macs_penalty(gated, 1.0).item() == 0.0
    with pytest.raises(ModelError, match="target fraction"):
        macs_penalty(gated, 0.0)


def test_kept_channels_and_flip_count(make_gated):
    gated = make_gated(seed=2)
    kept = gated.kept_channels()
    assert kept == {k: int((gated.gate(k).logits >= 0).sum()) for k in gated.group_keys}
    snapshot = gated.gate_states()
    with torch.no_grad():
        logits = gated.gate("layer2.0.conv2").logits
        flipped = [i for i in range(32) if logits[i] > 0][:3]
        logits[flipped] = -logits[flipped]
    assert count_flips(gated, snapshot) == 3
    assert gated.kept_channels()["layer2.0.conv2"] == kept["layer2.0.conv2"] - 3


def test_closed_gates_still_receive_gradient_so_they_can_reopen(make_gated):
    gated = make_gated(seed=3)
    gated.train()(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    for key in gated.group_keys:
        gate = gated.gate(key)
        closed = ~gate.kept_mask()
        assert closed.any()
        # A gate before a ReLU would get exactly 0 here (ReLU'(0) = 0) and never reopen.
        assert (gate.logits.grad[closed] != 0).float().mean() > 0.9, key


def test_gated_state_dict_reloads_into_a_fresh_attachment_and_deepcopy_is_independent(make_gated):
    gated = make_gated(seed=4).eval()
    fresh = make_gated(seed=5).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(gated(x), fresh(x))
    fresh.load_state_dict(gated.state_dict())
    assert torch.equal(gated(x), fresh(x))
    twin = copy.deepcopy(gated)
    with torch.no_grad():
        for p in twin.gate_parameters():
            p.fill_(-1.0)  # all closed (keep-one leaves one channel per group)
    assert torch.equal(gated(x), fresh(x))  # the original's hooks still use its own gates
    assert sum(twin.kept_channels().values()) == len(twin.group_keys)


def test_attach_rejects_a_non_tensor_example():
    with pytest.raises(ModelError, match="tensor"):
        attach_gates(build_model({"arch": "resnet20"}), (3, 32, 32))


def test_attach_refuses_an_already_gated_model(make_gated):
    gated = make_gated()
    with pytest.raises(ModelError, match="already carries gates"):
        attach_gates(gated.model, torch.zeros(1, 3, 32, 32))
    again = attach_gates(gated.plain_copy(), torch.zeros(1, 3, 32, 32))
    assert again.group_keys == gated.group_keys


def test_summary_is_json_able_and_consistent(make_gated):
    gated = make_gated(seed=6)
    summary = json.loads(json.dumps(gated.summary()))
    assert summary["groups"]["conv1"] == {"kept": gated.kept_channels()["conv1"], "width": 16}
    assert summary["full_macs"] == gated.full_macs
    assert 0 < summary["macs_fraction"] < 1


# ------------------------------------------------------- models the gates cannot prune exactly
class ChannelsLastNorm(nn.Module):
    """ConvNeXt's pattern: normalise over the channel axis of an NCHW tensor."""

    def __init__(self, channels: int, functional: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.functional = functional

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:]) if self.functional else self.norm(x)
        return x.permute(0, 3, 1, 2)


def small_net(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize(("norm", "message"), [
    (ChannelsLastNorm(8), r"its channels pass 1\.norm, and LayerNorm over \(8,\) normalises "
                          r"across them"),
    (ChannelsLastNorm(8, functional=True), r"its channels pass a function call after 0, and "
                                           r"F\.layer_norm normalises across them"),
    (nn.GroupNorm(2, 8), r"its channels pass 1, and GroupNorm normalises its 2 groups of 4 "
                         r"channels together"),
    (nn.GroupNorm(8, 8), r"its channels pass 1, and GroupNorm's group count cannot shrink"),
])
def test_channel_mixing_normalisation_is_refused_when_gates_attach(norm, message):
    with pytest.raises(ModelError, match=r"cannot gate the channel group 0 of Sequential: "
                                         + message):
        attach_gates(small_net(norm), torch.zeros(1, 3, 16, 16))


def test_per_channel_normalisation_is_gated_and_slims_exactly():
    from pipeline.prune.slimming import exactness, slim

    gated = attach_gates(small_net(nn.InstanceNorm2d(8, affine=True)), torch.zeros(1, 3, 16, 16),
                         generator=torch.Generator().manual_seed(0))
    slim_model, _ = slim(gated.eval(), round_to=1)
    assert exactness(gated, slim_model, torch.randn(4, 3, 16, 16))[1] < 1e-5


def test_convnext_is_refused_before_training_with_the_layer_named():
    import torchvision

    model = torchvision.models.convnext_tiny(num_classes=10)
    with pytest.raises(ModelError, match=r"of ConvNeXt: its channels pass features\.\d\.\d\."
                                         r"block\.2, and LayerNorm over \(\d+,\) normalises"):
        attach_gates(model, torch.zeros(1, 3, 32, 32))


def test_a_channel_shuffle_is_a_model_error_naming_model_layer_and_reason():
    import torchvision

    model = torchvision.models.shufflenet_v2_x1_0(num_classes=10)
    with pytest.raises(ModelError, match=r"cannot find the channel groups of ShuffleNetV2 at a "
                                         r"reshape after stage\d\.\d\.branch\d\.\d+: a channel "
                                         r"shuffle .* is not supported \(Torch-Pruning: "
                                         r"ZeroDivisionError"):
        attach_gates(model, torch.zeros(1, 3, 32, 32))
