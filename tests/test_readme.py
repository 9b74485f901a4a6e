"""The README's Python example runs as written (it is the documented way to prune your own CNN)."""

import re
from pathlib import Path

import torch

from pipeline.prune.gates import ChannelGate

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks_under(heading: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_pruning_your_own_cnn_example_runs_and_slims_exactly(capsys):
    blocks = _python_blocks_under("Pruning your own CNN")
    assert len(blocks) == 1, "README should show one Python example for pruning your own CNN"
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README

    slim_model = namespace["slim_model"]
    assert all(not isinstance(m, ChannelGate) and not m._forward_hooks
               and not m._forward_pre_hooks for m in slim_model.modules())
    assert _parameter_count(slim_model) < _parameter_count(namespace["model"])
    max_abs, relative = namespace["exactness"](namespace["gated"], slim_model,
                                               torch.randn(4, 3, 64, 64))
    assert relative <= 1e-4, (max_abs, relative)
    assert capsys.readouterr().out.strip(), "the example prints its exactness numbers"
