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


def require_count(value: object, option: str) -> int:
    """`value` as a count (a whole number of at least 1, not a bool), else an `OptionError`
    naming `option`: batch sizes, chunk sizes, threads."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{option} must be a whole number of at least 1, not {value!r}", option)
    return value
