"""PDD channel gates: one learnable 0/1 gate per prunable channel, placed so removal is exact.

Usage (the whole public surface):

    gated = attach_gates(model, torch.zeros(1, 3, 32, 32))   # model gets gate pre-hooks
    opt = SGD([{"params": gated.model.parameters()},
               {"params": gated.gate_parameters(), "weight_decay": 0}], lr=...)
    loss = task_loss + lam * macs_penalty(gated, target_fraction=0.6)   # optional budget
    gated.kept_channels(); gated.expected_macs(); count_flips(gated, snapshot)
    slim_model, spec = pipeline.prune.slimming.slim(gated, round_to=8)

Other pruning methods (pipeline/prune/<method>.py) use the same gates only to carry their
keep decision: `gated.freeze_gates().set_keep(masks, scores)`, then the same exact slimming.

Gate (seed 000, Bi-Real Net's ApproxSign): `gate = (ApproxSign(m) + 1) / 2` with logits
`m ~ N(0, 1) * 1e-3`. Forward: ApproxSign(m) = +1 for m >= 0, -1 for m < 0 (so m == 0 gives
gate 1: a gate that was never pushed below zero keeps its channel). Backward: ApproxSign
passes `2 - 2|m|` inside [-1, 1] and 0 outside, the derivative of the piecewise-quadratic sign
approximation; the chain rule through `(s + 1) / 2` makes d gate / d m = `1 - |m|`.

Every group keeps at least one channel: when all of a group's logits are below zero, the gate of
its largest logit is forced to 1 in the forward pass (the gradient is passed straight through),
so training sees the same network that slimming produces.

Groups come from Torch-Pruning's DependencyGraph: channels tied by a residual add or a concat
form one group with one gate vector, keyed by the name of its first producing conv/linear
layer (in `named_modules` order, so a fresh model of the same spec gets the same keys).
Groups that reach the model output (the classifier's logits) are never gated.

Placement, for exactness and for a live gradient: the gate multiplies the group's channels
where they are *read*, i.e. on the input of every consumer (a conv, linear or option-A
shortcut that takes the group's channels in; forward pre-hooks). A closed channel is then
exactly 0 in every layer that mixes channels, so removing it - from its producers (convs,
BatchNorms, depthwise convs, the adds between them) and from its consumers - changes nothing.
Gating producer outputs instead (before the ReLU) would also be exact, but a closed channel's
pre-activation would be exactly 0 and ReLU'(0) = 0 would cut its gate's gradient for good:
closed gates could never reopen. On the consumer side the gradient is
d loss / d input * activation, alive whenever the activation is. The channel-wise ops between
producer and consumer (BatchNorm, activations, pooling, adds, flatten) never mix channels;
`attach_gates` refuses a group whose channels pass a normalisation that does (LayerNorm over
channels, GroupNorm, their functional forms), and `slimming.slim` still checks exactness
numerically for anything else that might.

Option-A shortcuts (`ZeroPadShortcut`) are a group boundary: a custom pruner tells the graph
that their input channels (stage k) and output channels (stage k+1) are different groups, and
updates `source_index` when either side is pruned.
"""

import copy
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from pipeline.errors import ModelError
from pipeline.flops import COUNTED, LayerCost, layer_costs
from pipeline.models.resnet_cifar import ZeroPadShortcut

_CONV_LINEAR = COUNTED  # the layers that produce and mix channels
_GATEABLE = (nn.modules.conv._ConvNd, nn.Linear, ZeroPadShortcut)  # consumers gates can sit on


# --------------------------------------------------------------------------- the gate itself
class ApproxSign(torch.autograd.Function):
    """sign(m) forward (with sign(0) = +1); gradient 2 - 2|m| inside [-1, 1], 0 outside."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return torch.where(logits >= 0, 1.0, -1.0).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        return grad_output * (2.0 - 2.0 * logits.abs()).clamp(min=0.0)


def gate_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact 0/1 gates; if every logit is < 0 the largest one is forced to 1 (keep-one rule)."""
    gate = (ApproxSign.apply(logits) + 1.0) / 2.0
    # Tensor ops only (no .item()): no host-device sync per step on a GPU.
    none_kept = (gate.detach().sum() == 0).to(gate.dtype)
    forced = F.one_hot(logits.detach().argmax(), logits.numel()).to(gate.dtype) * none_kept
    return gate + forced  # forced is 0 unless gate is all 0: value 1, gradient straight through


class ChannelGate(nn.Module):
    """Logits `m` of one channel group; calling it returns the 0/1 gate vector."""

    def __init__(self, width: int, init_mean: float = 0.0, init_std: float = 1e-3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        device = generator.device if generator is not None else None  # e.g. a CUDA generator
        noise = torch.randn(width, generator=generator, device=device)
        self.logits = nn.Parameter(noise * init_std + init_mean)
        self._shared: torch.Tensor | None = None  # set only inside `computed_once`

    def forward(self) -> torch.Tensor:
        return gate_from_logits(self.logits)

    def vector(self) -> torch.Tensor:
        """The gate vector; inside `computed_once`, the same tensor for every reader."""
        return self._shared if self._shared is not None else self()

    @contextmanager
    def computed_once(self) -> Iterator[None]:
        """Compute the gate once for a whole forward pass, however many layers read it.

        Saves ~10 small kernels per extra reader (a ResNet stream is read by every block).
        """
        self._shared = self()
        try:
            yield
        finally:
            self._shared = None

    @torch.no_grad()
    def kept_mask(self) -> torch.Tensor:
        """Boolean mask of the channels this gate keeps now."""
        return self().bool()

    def extra_repr(self) -> str:
        return f"width={self.logits.numel()}"


# --------------------------------------------------------------- the dependency graph and groups
class ZeroPadShortcutPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for `ZeroPadShortcut`; in and out channels belong to different groups.

    Distinct `prune_in_channels` / `prune_out_channels` functions tell the graph there is no
    dependency between the two sides, so the residual streams of consecutive stages stay apart.
    Pruning either side rewrites `source_index`: a kept input channel maps to its new position,
    a removed input channel becomes the zero channel, a removed output channel disappears.
    """

    TARGET_MODULES = ZeroPadShortcut

    def prune_out_channels(self, layer: ZeroPadShortcut, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.out_channels)) - set(idxs))
        layer.source_index = layer.source_index[keep].clone()
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: ZeroPadShortcut, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.in_channels)) - set(idxs))
        # old input index, or in_channels for the zero channel -> new index (removed -> zero)
        remap = torch.full((layer.in_channels + 1,), len(keep), dtype=torch.long,
                           device=layer.source_index.device)
        remap[keep] = torch.arange(len(keep), device=remap.device)
        layer.source_index = remap[layer.source_index]
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: ZeroPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ZeroPadShortcut) -> int:
        return layer.in_channels


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor):
    """Torch-Pruning DependencyGraph of `model`, with option-A shortcuts as group boundaries.

    Tracing runs the model once; its train/eval mode is restored afterwards.
    """
    was_training = model.training
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False,
                customized_pruners={ZeroPadShortcut: ZeroPadShortcutPruner()})
    finally:
        model.train(was_training)
    return graph


def _upstream(node, depth: int) -> Iterator:
    """Torch-Pruning graph nodes feeding `node`, nearest first, up to `depth` steps back."""
    frontier, seen = [node], {id(node)}
    for _ in range(depth):
        frontier = [n for current in frontier for n in current.inputs if id(n) not in seen]
        seen.update(id(n) for n in frontier)
        yield from frontier


def _graph_failure(model: nn.Module, err: Exception) -> ModelError:
    """A Torch-Pruning failure as a ModelError naming the model and, where the failing reshape
    can be found, the layer before it and why it cannot be traced."""
    where, reason = "", "its dependency graph cannot be built"
    try:
        reshape = next(frame.f_locals["reshape_node"]
                       for frame, _ in traceback.walk_tb(err.__traceback__)
                       if "reshape_node" in frame.f_locals)
        names = {module: name for name, module in model.named_modules()}
        nodes = list(_upstream(reshape, depth=8))
        layer = next((names[n.module] for n in nodes if n.module in names), None)
        where = f" at a reshape after {layer}" if layer else " at a reshape"
        reason = ("a channel shuffle (reshape, transpose, reshape of the channel axis, as in "
                  "ShuffleNet) is not supported"
                  if any(op in n.name for n in nodes[:4] for op in ("Transpose", "Permute"))
                  else "a reshape that splits or merges the channel axis is not supported")
    except (StopIteration, AttributeError, TypeError):
        pass  # the failure happened elsewhere: the generic reason stands
    return ModelError(f"cannot find the channel groups of {type(model).__name__}{where}: "
                      f"{reason} (Torch-Pruning: {type(err).__name__}: {err})")


# ------------------------------------------------------------------------------ the gating plan
@dataclass(frozen=True)
class ChannelSpan:
    """Channels on one axis of one module that belong to one group."""

    group: str  # key of the group
    channels: tuple[int, ...]  # channel indices on the module's axis
    gate_index: tuple[int, ...]  # the same channels as indices into the group's gate vector


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together; one gate vector of length `width`."""

    key: str  # name of the first conv/linear producing these channels (stable per spec)
    width: int  # channels before pruning
    producers: tuple[str, ...]  # modules whose output channels are this group (conv, BN, ...)
    consumers: tuple[str, ...]  # layers that read the channels in and mix them: gated inputs


@dataclass(frozen=True)
class GatePlan:
    groups: tuple[ChannelGroup, ...]  # sorted by their key's position in named_modules
    out_spans: dict[str, tuple[ChannelSpan, ...]]  # module -> group spans on its output axis
    in_spans: dict[str, tuple[ChannelSpan, ...]]  # module -> group spans on its input axis
    layers: tuple[LayerCost, ...]  # every conv/linear that runs in the forward pass
    input_shape: tuple[int, ...]  # one sample, e.g. (3, 32, 32)


def plan_gates(model: nn.Module, example_input: torch.Tensor,
               ignored_layers: Iterable[nn.Module] = ()) -> GatePlan:
    """Find the channel groups of `model`, where to gate them, and the cost of each layer.

    ModelError, before any training, for a model the gates cannot prune exactly: one whose
    channels Torch-Pruning cannot trace (e.g. a channel shuffle), or whose gated channels pass
    a layer that mixes them (LayerNorm over channels, GroupNorm).
    """
    try:
        return _plan(model, example_input, ignored_layers)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - Torch-Pruning fails with whatever its code raises
        raise _graph_failure(model, err) from err


def _plan(model: nn.Module, example_input: torch.Tensor,
          ignored_layers: Iterable[nn.Module]) -> GatePlan:
    graph = build_dependency_graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    order = {name: index for index, name in enumerate(names.values())}
    groups, out_spans, in_spans = [], {}, {}
    for tp_group in graph.get_all_groups(ignored_layers=list(ignored_layers),
                                         root_module_types=_CONV_LINEAR):
        if _reaches_model_output(graph, tp_group):
            continue  # the logits (classifier outputs) are never pruned
        key = min((names[m] for m in _members(tp_group, names, graph.is_out_channel_pruning_fn)
                   if isinstance(m, _CONV_LINEAR)), key=order.__getitem__)
        group, spans_out, spans_in = _describe_group(graph, model, key, names)
        if group.width < 2:
            continue
        groups.append(group)
        for table, spans in ((out_spans, spans_out), (in_spans, spans_in)):
            for name, span in spans:
                table[name] = (*table.get(name, ()), span)
    groups.sort(key=lambda g: order[g.key])
    return GatePlan(tuple(groups), out_spans, in_spans, layer_costs(model, example_input),
                    tuple(example_input.shape[1:]))


def _reaches_model_output(graph, tp_group) -> bool:
    """True if the group's output channels are model outputs (e.g. the classifier's logits).

    Tracing starts at the outputs, so the nodes with no consumers are exactly the outputs.
    """
    return any(graph.is_out_channel_pruning_fn(item.dep.handler) and not item.dep.target.outputs
               for item in tp_group)


def _members(tp_group, names: dict, side) -> list[nn.Module]:
    """Real modules of the group (not traced tensor ops) whose pruning handler is on `side`."""
    return [item.dep.target.module for item in tp_group
            if item.dep.target.module in names and side(item.dep.handler)]


def _describe_group(graph, model: nn.Module, key: str, names: dict):
    """Re-root the group at `key` so that gate indices are the key layer's channel indices."""
    root = model.get_submodule(key)
    pruner = graph.get_pruner_of_module(root)
    width = pruner.get_out_channels(root)
    tp_group = graph.get_pruning_group(root, pruner.prune_out_channels, list(range(width)))
    spans_out, spans_in = [], []
    for item in tp_group:
        module, handler = item.dep.target.module, item.dep.handler
        if module not in names:
            continue
        span = ChannelSpan(key, tuple(item.idxs), tuple(item.root_idxs))
        if graph.is_out_channel_pruning_fn(handler):
            spans_out.append((names[module], span))
        if graph.is_in_channel_pruning_fn(handler):
            spans_in.append((names[module], span))
    _check_channel_wise(tp_group, names, key, type(model).__name__)
    producers = _members(tp_group, names, graph.is_out_channel_pruning_fn)
    consumers = [m for m in _members(tp_group, names, graph.is_in_channel_pruning_fn)
                 if m not in producers]  # BatchNorm and depthwise convs are channel-wise
    for module in consumers:
        _check_consumer(module, names[module])
    group = ChannelGroup(key, width, tuple(names[m] for m in producers),
                         tuple(names[m] for m in consumers))
    return group, spans_out, spans_in


def _channel_mixing(module: nn.Module, grad_fn_name: str | None) -> str | None:
    """Why a member of a channel group cannot lose channels exactly, or None when it works per
    channel. `grad_fn_name`: the autograd op of a traced function call (None for a module)."""
    if isinstance(module, nn.LayerNorm):
        return (f"LayerNorm over {tuple(module.normalized_shape)} normalises across them, so a "
                "closed channel still changes the channels kept beside it")
    if isinstance(module, nn.GroupNorm) and module.num_groups != module.num_channels:
        return (f"GroupNorm normalises its {module.num_groups} groups of "
                f"{module.num_channels // module.num_groups} channels together, so a closed "
                "channel still changes the others of its group")
    if isinstance(module, nn.GroupNorm):  # per channel, but slimming keeps its group count
        return ("GroupNorm's group count cannot shrink with its channels (for one channel per "
                "group use InstanceNorm2d(affine=True))")
    for op, call in (("LayerNorm", "layer_norm"), ("GroupNorm", "group_norm")):
        if grad_fn_name and grad_fn_name.startswith((f"Native{op}Backward", f"{op}Backward")):
            return f"F.{call} normalises across them"  # the functional form, called in forward
    return None


def _check_channel_wise(tp_group, names: dict, key: str, model_name: str) -> None:
    """ModelError if a layer the group's channels pass cannot lose channels exactly - found
    when gates are attached, not after training, when slimming's exactness check would fail."""
    for item in tp_group:
        node = item.dep.target
        traced_op = None if node.module in names else type(getattr(node, "grad_fn", None)).__name__
        reason = _channel_mixing(node.module, traced_op)
        if reason is not None:
            layer = names.get(node.module) or _traced_op_place(node, names)
            raise ModelError(
                f"cannot gate the channel group {key} of {model_name}: its channels pass "
                f"{layer}, and {reason}; removing gated channels would not be exact. Gated "
                "channels may pass only per-channel layers (BatchNorm, InstanceNorm, "
                "activations, pooling, adds) between the layers that produce and read them")


def _traced_op_place(node, names: dict) -> str:
    """Where a traced function call sits: after the nearest module that feeds it."""
    before = next((names[n.module] for n in _upstream(node, depth=8) if n.module in names), None)
    return f"a function call after {before}" if before else "a function call"


def _check_consumer(module: nn.Module, name: str) -> None:
    """Gates fold into a consumer's input weights at slimming time; only some layers allow it."""
    grouped = getattr(module, "groups", 1) != 1 or getattr(module, "transposed", False)
    if not isinstance(module, _GATEABLE) or grouped:
        raise ModelError(
            f"cannot gate the input of {name} ({module}): gated channels may only be read by "
            f"Conv (not grouped or transposed, except depthwise), Linear or ZeroPadShortcut")


# ------------------------------------------------------------------------------ the gated model
def module_in_width(module: nn.Module) -> int:
    """Input channels of a consumer (conv, linear, ZeroPadShortcut)."""
    return int(module.in_features if isinstance(module, nn.Linear) else module.in_channels)


class _GateHook:
    """Forward pre-hook: multiplies a consumer's input channels by their gates.

    A plain object rather than a closure, so that `copy.deepcopy` of a gated model makes the
    copy's hooks point at the copy's gates.
    """

    def __init__(self, parts: list[tuple[ChannelGate, ChannelSpan | None]], width: int,
                 channel_dim: int) -> None:
        self.parts, self.width, self.channel_dim = parts, width, channel_dim

    def multiplier(self) -> torch.Tensor:
        """The 0/1 factor of each input channel (1 where no group covers the channel)."""
        if len(self.parts) == 1 and self.parts[0][1] is None:
            return self.parts[0][0].vector()  # the common case: one group, identity indexing
        mult = None
        for gate, span in self.parts:
            values = gate.vector()
            if mult is None:
                mult = torch.ones(self.width, device=values.device, dtype=values.dtype)
            index = torch.as_tensor(span.gate_index, device=values.device)
            channels = torch.as_tensor(span.channels, device=values.device)
            mult = mult.index_put((channels,), values[index])
        return mult

    def __call__(self, module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return (x * self.multiplier().to(x.dtype).view(shape), *inputs[1:])


def _strip_gate_hooks(model: nn.Module) -> None:
    # Handles cannot be used: a deep copy's handles would still point at the original's hooks.
    for module in model.modules():
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, _GateHook):
                del module._forward_pre_hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)


def _gate_name(key: str) -> str:
    return key.replace(".", "-")  # ModuleDict names cannot contain dots


class GatedModel(nn.Module):
    """A model whose prunable channel groups are multiplied by PDD gates where they are read.

    `model` is the user's module, unchanged apart from forward pre-hooks on the consumers; its
    state_dict keys are the same as before. Gate logits live in `gates` (one `ChannelGate` per
    group), so `gated.state_dict()` = `model.*` + `gates.<key, dots as dashes>.logits`, and
    `attach_gates` on a fresh model of the same spec gives a module that loads it.
    """

    def __init__(self, model: nn.Module, plan: GatePlan, gates: dict[str, ChannelGate]) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.gates = nn.ModuleDict({_gate_name(key): gate for key, gate in gates.items()})
        self._hooks = {name: self._make_hook(name) for name in self._site_names()}
        for name, hook in self._hooks.items():
            model.get_submodule(name).register_forward_pre_hook(hook)

    def forward(self, *args, **kwargs):
        with ExitStack() as stack:
            for gate in self.gates.values():
                stack.enter_context(gate.computed_once())
            return self.model(*args, **kwargs)

    def plain_copy(self) -> nn.Module:
        """A deep copy of `model` without the gate hooks (weights as they are, gates not folded)."""
        plain = copy.deepcopy(self.model)
        _strip_gate_hooks(plain)
        return plain

    def _site_names(self) -> list[str]:
        names = [site for group in self.plan.groups for site in group.consumers]
        return list(dict.fromkeys(names))  # unique, in group order

    def _make_hook(self, name: str) -> _GateHook:
        module = self.model.get_submodule(name)
        width = module_in_width(module)
        parts = []
        for span in self.plan.in_spans[name]:
            gate = self.gate(span.group)
            identity = (span.channels == span.gate_index == tuple(range(width))
                        and gate.logits.numel() == width)
            parts.append((gate, None if identity else span))
        return _GateHook(parts, width, -1 if isinstance(module, nn.Linear) else 1)

    @property
    def gate_sites(self) -> tuple[str, ...]:
        """Modules whose inputs the gates multiply (every group's consumers), by name."""
        return tuple(self._hooks)

    @property
    def group_keys(self) -> tuple[str, ...]:
        return tuple(group.key for group in self.plan.groups)

    def gate(self, key: str) -> ChannelGate:
        return self.gates[_gate_name(key)]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate logits, for their own optimizer parameter group (usually no weight decay)."""
        return [self.gate(key).logits for key in self.group_keys]

    def input_multiplier(self, site: str) -> torch.Tensor:
        """The 0/1 factor the gates apply to each input channel of gate site `site`."""
        return self._hooks[site].multiplier()

    def gate_vectors(self) -> dict[str, torch.Tensor]:
        """Current 0/1 gate vector of every group (differentiable, straight-through)."""
        return {key: self.gate(key)() for key in self.group_keys}

    def kept_channels(self) -> dict[str, int]:
        """Channels each group keeps now, by group key."""
        with torch.no_grad():
            return {key: int(v.sum().item()) for key, v in self.gate_vectors().items()}

    def group_widths(self) -> dict[str, int]:
        return {group.key: group.width for group in self.plan.groups}

    @property
    def full_macs(self) -> int:
        """MACs per sample with every channel kept (as pipeline.flops.count_macs counts)."""
        return sum(layer.macs for layer in self.plan.layers)

    def expected_macs(self, vectors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """MACs per sample of the network the current gates describe; differentiable in them.

        `vectors` (group key -> 0/1 vector) evaluates a hypothetical keep decision instead,
        without touching the gates: how the MACs-target search prices a candidate.
        """
        device = self.gate_parameters()[0].device
        if vectors is None:
            vectors = self.gate_vectors()
        else:
            vectors = {key: torch.as_tensor(v, device=device).float() for key, v in vectors.items()}
        total = torch.zeros((), device=device) if vectors else 0.0
        for layer in self.plan.layers:
            kept_out = _kept(self.plan.out_spans, layer.name, layer.out_channels, vectors)
            if layer.depthwise:
                total = total + layer.macs_per_pair * kept_out
                continue
            kept_in = _kept(self.plan.in_spans, layer.name, layer.in_channels, vectors)
            total = total + layer.macs_per_pair * kept_in * kept_out / layer.groups
        return torch.as_tensor(total, dtype=torch.float32)

    def summary(self) -> dict[str, Any]:
        """JSON-able state of the pruning: kept/width per group and the MACs they imply."""
        widths, kept = self.group_widths(), self.kept_channels()
        with torch.no_grad():
            expected = float(self.expected_macs())
        return {"groups": {key: {"kept": kept[key], "width": widths[key]} for key in widths},
                "expected_macs": expected, "full_macs": self.full_macs,
                "macs_fraction": expected / self.full_macs}

    @torch.no_grad()
    def set_keep(self, masks: dict[str, torch.Tensor],
                 scores: dict[str, torch.Tensor] | None = None) -> None:
        """Write a keep decision (group key -> bool mask, True = keep) into the gate logits.

        Kept channels get logit +1; pruned ones a logit in (-1, -0.51), ordered by `scores` when
        given (the best pruned channel gets the largest), so that `slim(round_to=N)`, which
        rounds a group up by its largest closed logits, would re-add the most salient ones.
        Methods other than PDD decide with their own scores and call this once: their gates
        must never reach an optimizer (`freeze_gates`).
        """
        if set(masks) != set(self.group_keys):
            raise ModelError(f"keep decision covers groups {sorted(masks)}, the model has "
                             f"{sorted(self.group_keys)}")
        for key, mask in masks.items():
            logits = self.gate(key).logits
            mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
            if mask.shape != logits.shape or not mask.any():
                raise ModelError(f"group {key!r}: a keep mask needs {logits.numel()} entries and "
                                 f"at least one kept channel, got {int(mask.sum())} of "
                                 f"{mask.numel()}")
            value = torch.where(mask, 1.0, -1.0)
            closed = (~mask).nonzero().flatten()
            if scores is not None and len(closed):
                order = torch.argsort(scores[key].detach().float().cpu()[closed], stable=True)
                rank = torch.empty_like(order)
                rank[order] = torch.arange(len(order))
                value[closed] = -1.0 + 0.49 * (rank.float() + 1) / (len(closed) + 1)
            logits.copy_(value.to(logits.device, logits.dtype))

    def freeze_gates(self) -> "GatedModel":
        """Take the gate logits out of training (requires_grad off): the keep decision is made
        by a method's own scores, not by gradient descent on the gates."""
        for logits in self.gate_parameters():
            logits.requires_grad_(False)
        return self

    def open_all(self) -> "GatedModel":
        """Keep every channel (all logits +1), e.g. before a method decides."""
        self.set_keep({key: torch.ones(width, dtype=torch.bool)
                       for key, width in self.group_widths().items()})
        return self

    def gate_states(self) -> dict[str, torch.Tensor]:
        """A snapshot of every gate (boolean, on the CPU), for `count_flips`."""
        with torch.no_grad():
            return {key: v.bool().cpu() for key, v in self.gate_vectors().items()}


def _kept(spans: dict[str, tuple[ChannelSpan, ...]], name: str, full: int,
          vectors: dict[str, torch.Tensor]):
    """Kept channels on one axis of a layer: uncovered channels + the gates of covered ones."""
    kept = full
    for span in spans.get(name, ()):
        values = vectors[span.group]
        if span.gate_index != tuple(range(values.numel())):
            values = values[torch.as_tensor(span.gate_index, device=values.device)]
        kept = kept - len(span.channels) + values.sum()
    return kept


def count_flips(gated: GatedModel, snapshot: dict[str, torch.Tensor]) -> int:
    """How many gates changed 0 <-> 1 since `snapshot = gated.gate_states()`."""
    now = gated.gate_states()
    if now.keys() != snapshot.keys():
        raise ModelError(f"snapshot groups {sorted(snapshot)} do not match the model's "
                         f"groups {sorted(now)}")
    return sum(int((now[key] != snapshot[key]).sum()) for key in now)


def macs_penalty(gated: GatedModel, target_fraction: float) -> torch.Tensor:
    """max(0, expected MACs / full MACs - target): pushes the gated network down to a budget.

    Zero once the budget is met, so it never pushes below it; add `weight * macs_penalty(...)`
    to the training loss.
    """
    if not 0.0 < target_fraction <= 1.0:
        raise ModelError(f"MACs target fraction must be in (0, 1], got {target_fraction}")
    return F.relu(gated.expected_macs() / gated.full_macs - target_fraction)


def attach_gates(model: nn.Module, example_input: torch.Tensor, *,
                 ignored_layers: Iterable[nn.Module] = (), init_mean: float = 0.0,
                 init_std: float = 1e-3, generator: torch.Generator | None = None) -> GatedModel:
    """Gate every prunable channel group of `model`; returns a GatedModel wrapping it.

    `example_input` is one batch as the model takes it (e.g. zeros(1, 3, 32, 32)), on the
    model's device; the model runs on it twice (graph tracing, layer sizes). Groups touching
    the model output, and groups rooted at `ignored_layers`, get no gate. Logits start at
    N(init_mean, init_std^2) (PDD: N(0, 1) * 1e-3, so about half the gates start closed);
    `generator` makes them reproducible. The model itself is not copied: it gets forward hooks
    and becomes `gated.model`.
    """
    if not isinstance(example_input, torch.Tensor):
        raise ModelError("example_input must be a tensor batch, "
                         f"got {type(example_input).__name__}")
    if any(isinstance(hook, _GateHook) for m in model.modules()
           for hook in m._forward_pre_hooks.values()):
        raise ModelError("the model already carries gates; attach_gates to a fresh model or to "
                         "gated.plain_copy()")
    plan = plan_gates(model, example_input, ignored_layers)
    if not plan.groups:
        raise ModelError(f"{type(model).__name__} has no prunable channel group")
    device = example_input.device
    gates = {group.key: ChannelGate(group.width, init_mean, init_std, generator).to(device)
             for group in plan.groups}
    return GatedModel(model, plan, gates)
