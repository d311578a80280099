"""Errors raised by the model runtime.

Every error raised on purpose by ``inference`` derives from :class:`InferenceError`; subclasses also
inherit the matching built-in so callers can catch either.
"""


class InferenceError(Exception):
    """Base class of all errors raised by :mod:`inference`."""


class InvalidInputError(InferenceError, ValueError):
    """The images given to a task cannot be processed by it (wrong modality, too few slices...)."""


class ModelNotConfiguredError(InferenceError, LookupError):
    """A task needs a model that the configuration does not provide."""


class ModelLoadError(InferenceError, OSError):
    """A model directory or bundle exists in the config but cannot be loaded."""


class OutputParseError(InferenceError, ValueError):
    """A model produced text that cannot be parsed into the requested result type."""


class ModelServerUnavailableError(InferenceError, ConnectionError):
    """A model server did not answer (down, refusing, timed out, or overloaded): worth retrying."""


class ModelOutOfMemoryError(InferenceError, MemoryError):
    """The accelerator ran out of memory even for one prompt alone: transient, retry the job later
    (other jobs may be holding memory now)."""
