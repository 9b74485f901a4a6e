"""What every stage's main() shares: logging setup and a clean exit on a PipelineError."""

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError


def run_main(body: Callable[[], object]) -> None:
    """Configure logging, run the stage body, turn a PipelineError into one line and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        body()
    except PipelineError as err:
        logging.getLogger("stage").error("%s: %s", type(err).__name__, err)
        sys.exit(2)


def params_stage_main(doc: str, run: Callable[..., object], paths: object) -> None:
    """main() of a stage that reads params.yaml and writes fixed paths: run(params, paths)."""
    from pipeline.config import load_params  # keeps `import stages._cli` free of pydantic/torch

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    run_main(lambda: run(load_params(args.params), paths))
