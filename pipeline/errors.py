"""The one base class of every error a user can cause and fix (bad params, data, stores, checkpoints).

Stage entry points catch :class:`PipelineError` and print its one-line message instead of a traceback
(``pipeline.stages.run``); anything else is a bug and keeps its traceback. Each module defines its own
subclass (``ConfigError``, ``DatasetError``, ``StoreError``, ...), whose message names the file, key or
array at fault.
"""


class PipelineError(Exception):
    """An error in the user's inputs or artifacts; the message says what and where, in one line."""


class NonFiniteError(PipelineError, FloatingPointError):
    """NaN or Inf where finite numbers are required (tokens, codes, losses, metrics). Names the source."""
