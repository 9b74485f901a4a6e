"""The zoo matches the published sizes, and checkpoints round-trip with weights_only=True."""

import pytest
import torch

from pipeline.checkpoint import load_model, save_model
from pipeline.errors import CheckpointError, ModelError
from pipeline.flops import model_cost
from pipeline.models import build_model

# He et al. 2016, Table 6 (CIFAR ResNets, option A): params in millions.
RESNET_PARAMS_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                   "resnet110": 1.7}


@pytest.mark.parametrize(("arch", "params_m"), RESNET_PARAMS_M.items())
def test_resnet_parameter_counts_match_the_paper(arch, params_m):
    cost = model_cost(build_model({"arch": arch}))
    # The paper rounds to two significant digits.
    assert float(f"{cost.params / 1e6:.2g}") == params_m


@pytest.mark.parametrize(("arch", "macs_m"), [("resnet20", 41), ("resnet56", 126)])
def test_resnet_macs_match_the_usual_numbers(arch, macs_m):
    assert model_cost(build_model({"arch": arch})).macs / 1e6 == pytest.approx(macs_m, rel=0.02)


@pytest.mark.parametrize(("arch", "params_m"),
                         [("vgg11", 9.23), ("vgg13", 9.41), ("vgg16", 14.72), ("vgg19", 20.04)])
def test_vgg_parameter_counts(arch, params_m):
    # Conv-BN layers + one 512->10 linear layer (the CIFAR VGG of network slimming and PDD).
    assert model_cost(build_model({"arch": arch})).params / 1e6 == pytest.approx(params_m, abs=0.01)


def test_option_a_shortcut_zero_pads_the_channel_axis():
    block = build_model({"arch": "resnet20"}).layer2[0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_num_classes_sets_the_classifier_width():
    model = build_model({"arch": "resnet20", "num_classes": 100})
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("spec", [{"arch": "resnet9"}, {"arch": "resnet20", "colour": 1}, {}])
def test_bad_specs_are_model_errors(spec):
    with pytest.raises(ModelError):
        build_model(spec)


def test_checkpoint_round_trip_is_exact_and_weights_only(tmp_path):
    model = build_model({"arch": "resnet20"}).eval()
    path = tmp_path / "m.pt"
    save_model(path, model, {"arch": "resnet20", "num_classes": 10}, {"top1": 0.5})
    raw = torch.load(path, weights_only=True)  # no pickled classes inside
    assert raw["spec"]["arch"] == "resnet20"
    loaded = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.meta == {"top1": 0.5}


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable model file"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pt")
