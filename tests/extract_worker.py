"""Runs the extract stage in a child process, optionally dying at a chosen point (for test_extract).

    python tests/extract_worker.py CRASH -- <extract stage arguments>

CRASH is ``none``, ``after:N`` (exit hard once N chunks are fully written and marked done) or
``inside:N`` (exit hard in the middle of writing chunk number N: tokens written, the rest not).
os._exit skips every cleanup, like a SIGKILL or a power cut.
"""

import os
import sys

from pipeline.features import store

mode, _, args = sys.argv[1], sys.argv[2], sys.argv[3:]
kind, _, n = mode.partition(":")
written = 0
original = store.write_chunk


def write_chunk(group, layout, chunk, arrays):
    global written
    if kind == "inside" and written == int(n):
        start, stop = layout.chunk_range(chunk)
        group["tokens"][start:stop] = arrays["tokens"]
        os._exit(137)
    original(group, layout, chunk, arrays)
    written += 1
    if kind == "after" and written == int(n):
        os._exit(137)


store.write_chunk = write_chunk

from pipeline.stages.extract import main  # noqa: E402

main(args)
