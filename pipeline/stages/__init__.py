"""One thin entry point per DVC stage: parse paths, load config, call the library, write outputs."""

import logging
import os


def setup_logging() -> None:
    """Log to stderr with the stage's rank when run under torchrun."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=os.environ.get("SPG_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
