"""What every stage's main() shares: logging, a clean exit on a PipelineError, and reading the
stage's validated settings back from resolved/ (written by the validate_params stage).

A stage declares what it reads as a `Settings` dataclass whose fields are sections: field `x`
comes from resolved/x.json, or from the file its `resolved` metadata names (e.g. a target's
settings, resolved/targets/onnxruntime-cpu.json). dvc.yaml lists exactly those files as the
stage's deps (tests/test_dvc_deps.py checks it), so a stage re-runs when, and only when, the
values it reads change - whichever profile set them.
"""

import argparse
import logging
import signal
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import PipelineError

RESOLVED = Path("resolved")
Settings = TypeVar("Settings")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a terminated stage unwinds like Ctrl-C: temp files and folders go


def run_main(body: Callable[[], object]) -> None:
    """Configure logging, run the stage body, turn a PipelineError into one line and exit 2
    (an interrupt or SIGTERM: one line, exit 130, after cleaning up)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        body()
    except PipelineError as err:
        logging.getLogger("stage").error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    except KeyboardInterrupt:
        logging.getLogger("stage").error("interrupted")
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolved_files(schema: type) -> dict[str, str]:
    """Field -> file stem under resolved/ for a stage's Settings dataclass."""
    return {f.name: f.metadata.get("resolved", f.name) for f in fields(schema)}


def load_settings(schema: type[Settings], resolved: Path = RESOLVED) -> Settings:
    """The stage's Settings, each field validated against its type from its resolved file."""
    from pipeline.config import load_section  # keeps `import stages._cli` free of pydantic

    types = typing.get_type_hints(schema)
    return schema(**{name: load_section(types[name], resolved / f"{stem}.json")
                     for name, stem in resolved_files(schema).items()})


def stage_main(doc: str, run: Callable[[Any, Any], object], schema: type,
               paths: object) -> None:
    """main() of a stage that reads resolved settings and writes fixed paths: run(s, paths)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--resolved", type=Path, default=RESOLVED,
                        help="folder of validated settings (the validate_params stage's output)")
    args = parser.parse_args()
    run_main(lambda: run(load_settings(schema, args.resolved), paths))
