"""Exact channel slimming: gated network -> plain, narrower network with the same function.

    slim_model, spec = slim(gated, round_to=8)          # gated: pipeline.prune.gates.GatedModel
    exactness(gated, slim_model, images)                # (max |a - b|, max |a - b| / max |a|)
    model = apply_pruning_spec(build_model(arch_spec), spec)   # replay on a fresh model

`slim` works on a copy and never changes the gated model. Steps:
1. Choose each group's kept channels: the open gates; with `round_to` N, the group's width is
   rounded up to a multiple of N (never above the original width) by also keeping the closed
   channels with the largest logits.
2. Fold the 0/1 gates into the layers whose inputs they multiply (conv/linear input weights;
   ZeroPadShortcut `source_index` -> its zero channel). Channels kept only for rounding are
   thereby read by nobody, as their closed gate ensured.
3. Remove the closed channels with Torch-Pruning's dependency graph (every layer that produces
   or reads a group's channels shrinks together), and check the result against the gated model.

The pruning spec is plain JSON-able data, keyed by group key (the module name of the group's
first producing layer), so the same removal replays on a freshly built model:

    {"format": "prune-deploy/pruning/1", "input_shape": [3, 32, 32], "round_to": 8,
     "groups": {"conv1": {"width": 16, "keep": [0, 2, ...], "zeroed": [5]}, ...},
     "buffers": {"layer2.0.shortcut.source_index": [...]}}

`zeroed` lists the kept channels whose gate was closed (kept only for rounding; every layer
that reads them has zero weights there). `buffers` holds the integer non-persistent buffers
(channel index maps such as ZeroPadShortcut's `source_index`), which a state_dict does not carry.
"""

import contextlib
import math
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, ModelError, ParityError
from pipeline.models.resnet_cifar import ZeroPadShortcut
from pipeline.prune.gates import GatedModel, build_dependency_graph

SPEC_FORMAT = "prune-deploy/pruning/1"
EXACTNESS_TOLERANCE = 1e-4  # relative: max |gated - slim| / max |gated| over the check batch


def slim(gated: GatedModel, round_to: int = 1, *, widths: dict[str, int] | None = None,
         verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Remove the closed channels of `gated` for real; returns (plain model, pruning spec).

    The plain model has no gates or hooks and is in the gated model's train/eval mode. With
    `verify`, both models run on a random batch in eval mode and a relative difference above
    EXACTNESS_TOLERANCE raises ParityError. `widths` (group key -> width, e.g. chosen from a
    latency table) replaces rounding: each group keeps exactly that many channels, which must be
    at least its open ones and at most its width.
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be an integer >= 1, got {round_to!r}")
    kept = _choose_kept_channels(gated, round_to, widths)
    model = gated.plain_copy()
    _fold_gates(gated, model)
    example = _example_input(model, gated.plan.input_shape)
    graph = build_dependency_graph(model, example)
    for key, entry in kept.items():
        _prune_group(graph, model, key, entry["width"], entry["keep"])
    spec = {"format": SPEC_FORMAT, "input_shape": list(gated.plan.input_shape),
            "round_to": round_to, **({"widths": dict(widths)} if widths else {}),
            "groups": kept, "buffers": _index_buffers(model)}
    if verify:
        _verify(gated, model)
    return model, spec


def apply_pruning_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Replay a `slim` spec on a freshly built model (in place); returns the model.

    Shapes then match the slimmed model, so its state_dict loads; index buffers are restored.
    """
    _check_spec(spec)
    graph = build_dependency_graph(model, _example_input(model, spec["input_shape"]))
    for key, entry in spec["groups"].items():
        _prune_group(graph, model, key, entry["width"], entry["keep"])
    _restore_buffers(model, spec["buffers"])
    return model


@contextlib.contextmanager
def _full_fp32():
    """TF32 off for convolutions and matmuls (CUDA) while the block runs; restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def exactness(reference: nn.Module, candidate: nn.Module,
              images: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |a|) of the two models' outputs, both in eval mode.

    Both run in full fp32: on CUDA, PyTorch lets cuDNN use TF32 for convolutions by default,
    whose rounding (10-bit mantissa) differs between the gated and the narrower network's
    kernels. On an H200 that alone gave relative differences up to 6.3e-5 (2e-7 without TF32),
    most of student_slim's 1e-4 tolerance.
    """
    modes = reference.training, candidate.training
    reference.eval(), candidate.eval()
    try:
        with _full_fp32():
            expected, actual = reference(images).float(), candidate(images).float()
    finally:
        reference.train(modes[0]), candidate.train(modes[1])
    if expected.shape != actual.shape:
        raise ParityError(f"output shapes differ: {tuple(expected.shape)} (reference) vs "
                          f"{tuple(actual.shape)} (candidate)")
    max_diff = (expected - actual).abs().max().item()
    scale = expected.abs().max().item()
    relative = max_diff / scale if scale > 0 else (0.0 if max_diff == 0 else math.inf)
    return max_diff, relative


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv, linear and BatchNorm layer, by module name."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            widths[name] = module.num_features
    return widths


# ----------------------------------------------------------------------------------- internals
@torch.no_grad()
def _choose_kept_channels(gated: GatedModel, round_to: int,
                          widths: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Per group: open channels, plus the best closed ones (by logit) up to a multiple of N
    (or up to `widths[key]`)."""
    if widths is not None and set(widths) != set(gated.group_keys):
        raise ConfigError(f"widths cover groups {sorted(widths)}, the model has "
                          f"{sorted(gated.group_keys)}")
    kept = {}
    for group in gated.plan.groups:
        gate = gated.gate(group.key)
        is_open = gate().bool().cpu()
        opened = is_open.nonzero().flatten().tolist()
        target = min(group.width, math.ceil(len(opened) / round_to) * round_to)
        if widths is not None:
            target = widths[group.key]
            if not len(opened) <= target <= group.width:
                raise ConfigError(f"group {group.key!r}: width {target} must be between its "
                                  f"{len(opened)} open channels and its width {group.width}")
        ranked = torch.argsort(gate.logits.detach().cpu(), descending=True, stable=True)
        extra = [i for i in ranked.tolist() if not is_open[i]][: target - len(opened)]
        kept[group.key] = {"width": group.width, "keep": sorted(opened + extra),
                           "zeroed": sorted(extra)}
    return kept


@torch.no_grad()
def _fold_gates(gated: GatedModel, model: nn.Module) -> None:
    """Multiply each consumer's 0/1 input gates into its weights (exact: w*1 = w, w*0 = 0)."""
    for site in gated.gate_sites:
        factor = gated.input_multiplier(site).detach()
        module = model.get_submodule(site)
        if isinstance(module, ZeroPadShortcut):
            index = module.source_index
            reads_closed = torch.cat([factor, factor.new_ones(1)])[index] == 0
            index[reads_closed] = module.in_channels  # read the appended zero channel instead
        else:  # a conv (groups=1) or linear: input channels are dim 1 of the weight
            module.weight.mul_(factor.view(1, -1, *[1] * (module.weight.dim() - 2)))


def _prune_group(graph, model: nn.Module, key: str, width: int, keep: list[int]) -> None:
    try:
        root = model.get_submodule(key)
    except AttributeError as err:
        raise ModelError(f"pruning spec names group {key!r}, but the model has no such "
                         f"module") from err
    pruner = graph.get_pruner_of_module(root)
    current = pruner.get_out_channels(root) if pruner is not None else None
    if current != width:
        raise ModelError(f"pruning spec: group {key!r} expects {width} channels before "
                         f"pruning, the model's {type(root).__name__} has {current}")
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < width for i in keep):
        raise ModelError(f"pruning spec: group {key!r} keep list must be 1..{width} distinct "
                         f"indices in [0, {width}), got {keep}")
    removed = sorted(set(range(width)) - set(keep))
    if removed:
        graph.get_pruning_group(root, pruner.prune_out_channels, removed).prune()


def _index_buffers(model: nn.Module) -> dict[str, list[int]]:
    """Integer buffers that state_dict leaves out (channel index maps), as plain lists."""
    persistent = set(model.state_dict())
    return {name: buffer.tolist() for name, buffer in model.named_buffers()
            if name not in persistent and not buffer.is_floating_point()
            and not buffer.is_complex()}


def _restore_buffers(model: nn.Module, buffers: dict[str, list[int]]) -> None:
    for name, values in buffers.items():
        try:
            buffer = model.get_buffer(name)
        except AttributeError as err:
            raise ModelError(f"pruning spec restores buffer {name!r}, which the model "
                             f"does not have") from err
        restored = torch.as_tensor(values, dtype=buffer.dtype, device=buffer.device)
        if restored.shape != buffer.shape:
            raise ModelError(f"pruning spec: buffer {name!r} has shape {tuple(restored.shape)}, "
                             f"the replayed model's has {tuple(buffer.shape)}")
        buffer.copy_(restored)


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ModelError(f"not a pruning spec: expected format {SPEC_FORMAT!r}, got {found!r}")
    missing = {"input_shape", "groups", "buffers"} - set(spec)
    if missing:
        raise ModelError(f"pruning spec lacks key(s) {sorted(missing)}")


def _example_input(model: nn.Module, input_shape) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.zeros(1, *input_shape, device=device)


def _verify(gated: GatedModel, model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, *gated.plan.input_shape, generator=generator)
    images = images.to(_example_input(model, gated.plan.input_shape).device)
    max_diff, relative = exactness(gated, model, images)
    if relative > EXACTNESS_TOLERANCE:
        raise ParityError(f"slimmed model differs from the gated model: max |diff| "
                          f"{max_diff:.3g}, relative {relative:.3g} > {EXACTNESS_TOLERANCE}")
