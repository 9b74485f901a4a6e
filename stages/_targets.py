"""A runtime target built from its resolved settings, for the stages that run one."""

from pathlib import Path

from pipeline.config import load_section
from targets.base import Target
from targets.registry import make_target, target_class


def load_target(name: str, resolved: Path) -> Target:
    """Target `name` built from its resolved settings (resolved/targets/<name>.json)."""
    settings = load_section(target_class(name).Settings, resolved / "targets" / f"{name}.json")
    return make_target(name, settings)
