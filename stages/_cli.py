"""What every stage's main() shares: logging setup and a clean exit on a PipelineError."""

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
