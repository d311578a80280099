"""Errors raised by the storage layer."""


class StorageError(Exception):
    """Base class of all errors raised on purpose by :mod:`storage`."""


class InvalidUIDError(StorageError, ValueError):
    """A UID cannot be used as a storage key (empty, too long, or not digits and dots)."""


class StorageFullError(StorageError, OSError):
    """The instance store cannot take more data (disk full or above the configured watermark)."""
