"""Exceptions raised by perm-lite: every one is a `PermError`."""


class PermError(Exception):
    """Base class for perm-lite errors."""


class ModelError(PermError):
    """A model that cannot be found, verified or loaded."""


class ProviderError(PermError):
    """An execution provider that was asked for explicitly and cannot run."""


class OptionError(PermError, ValueError):
    """An argument with a value perm-lite cannot use (the message names it and the choices);
    `option` is the argument's name where one argument is at fault."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option
