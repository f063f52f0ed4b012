"""Exceptions raised by perm-lite: every one is a `PermError`."""


class PermError(Exception):
    """Base class for perm-lite errors."""


class ModelError(PermError):
    """A model that cannot be found, verified or loaded."""


class ProviderError(PermError):
    """An execution provider that was asked for explicitly and cannot run."""


class OptionError(PermError, ValueError):
    """An argument with a value perm-lite cannot use (the message names it and the choices)."""
