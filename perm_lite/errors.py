"""Exceptions raised by perm-lite."""


class PermError(Exception):
    """Base class for perm-lite errors."""


class ModelError(PermError):
    """A model that cannot be found, verified or loaded."""


class ProviderError(PermError):
    """An execution provider that was asked for explicitly and cannot run."""
