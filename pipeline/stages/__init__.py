"""One thin entry point per DVC stage: parse paths, load config, call the library, write outputs.

Every stage module ends with ``run(main)``: a :class:`~pipeline.errors.PipelineError` (bad params, a
dataset that breaks its layout, a store or checkpoint that does not fit) prints as one ``error:`` line
and exits 1; the traceback is kept for ``--verbose`` or ``PIPELINE_DEBUG=1``. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from pipeline.errors import PipelineError


def setup_logging() -> None:
    """Log to stderr with the stage's rank when run under torchrun."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=os.environ.get("SPG_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when ``--verbose`` is on the command line or ``PIPELINE_DEBUG`` is set to a non-empty, non-0 value."""
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call a stage's ``main(argv)``; turn a :class:`PipelineError` into one line on stderr and exit 1.

    ``--verbose`` is taken out of ``argv`` here, so stages need not declare it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--verbose"]
    try:
        result = main(argv)
    except PipelineError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    if isinstance(result, int) and result:
        sys.exit(result)
