"""The README's Python example runs as written (it is the documented way to prune your own CNN)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks_under(heading: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_pruning_your_own_cnn_example_runs_and_slims_exactly(capsys):
    blocks = _python_blocks_under("Pruning your own CNN")
    assert len(blocks) == 1, "README should show one Python example for pruning your own CNN"
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README

    from pipeline.gates import ChannelGate  # noqa: PLC0415 - after the example imported it
    slim_model = namespace["slim_model"]
    assert all(not isinstance(m, ChannelGate) and not m._forward_hooks
               and not m._forward_pre_hooks for m in slim_model.modules())
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(slim_model) < params(namespace["model"])
    max_abs, relative = namespace["exactness"](namespace["gated"], slim_model,
                                               torch.randn(4, 3, 64, 64))
    assert relative <= 1e-4, (max_abs, relative)
    assert capsys.readouterr().out.strip(), "the example prints its exactness numbers"
