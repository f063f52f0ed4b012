"""Output files that never destroy what the run did not create.

`check_target` refuses a path that is the input (under any name) or not a regular file;
`OutputFile` creates exclusively, appends (resume), or writes a temporary file beside the
target that replaces it only on `commit()`; `plan_outputs` decides how a run's output and
errors file are opened; `OutputPlan.run` commits them when the run succeeds and aborts them
when it fails (or is interrupted while replacing).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from perm_lite.errors import OptionError, PermError

T = TypeVar("T")


class TargetError(PermError):
    """An output path perm refuses to use; `code` is the exit code (2 usage, 1 fatal)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class OutputWriteError(PermError):
    """Writing an output failed (disk full, permissions, a closed pipe)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@dataclass(frozen=True)
class _Identity:
    dev: int
    ino: int
    real: str


def _identity(path: str | os.PathLike) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Identity(st.st_dev, st.st_ino, os.path.realpath(path))


def input_identity(input_path: str) -> _Identity | None:
    """What the input is on disk (stdin too, when it is a redirected regular file)."""
    if input_path != "-":
        return _identity(input_path)
    try:
        st = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return _Identity(st.st_dev, st.st_ino, "") if stat.S_ISREG(st.st_mode) else None


def _same(a: _Identity | None, b: _Identity | None) -> bool:
    if a is None or b is None:
        return False
    return (a.dev, a.ino) == (b.dev, b.ino) or bool(a.real and a.real == b.real)


def check_target(path: Path, what: str, source: _Identity | None = None) -> os.stat_result | None:
    """Refuse a path to write that is the input (under any name: links included) or that
    exists and is not a regular file (a directory, a device, a dangling link); a missing
    directory is fatal. Returns the stat of an existing regular file, None when absent."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        parent = Path(os.path.abspath(path)).parent
        if not parent.is_dir():
            raise TargetError(f"cannot write {what} {path}: directory {parent} does not exist", 1) from None
        return None
    except OSError as exc:
        raise TargetError(f"cannot use {what} {path}: {exc.strerror or exc}", 1) from None
    try:
        st = os.stat(path)
    except OSError:
        raise TargetError(f"{what} {path} is a broken symbolic link; remove it or choose another path") from None
    if not stat.S_ISREG(st.st_mode):
        raise TargetError(f"{what} {path} exists and is {_kind(st.st_mode)}; choose a regular file path")
    if _same(_identity(path), source):
        raise TargetError(f"{what} {path} is the input file; choose another path")
    return st


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputFile:
    """A text output (write/flush) that never destroys what the run did not create.

    mode "new": created exclusively when first opened (never truncates anything);
    "append": an existing file continued (resume, or an empty file); "replace": written to
    a temporary file beside the target and renamed over it by `commit()`, so the old
    file stays whole until the run succeeds, and `abort()` leaves it untouched. A symlink
    target is followed: the file it points to is replaced, the link kept.
    `publish_empty` (replace mode): commit even if nothing was written; otherwise an
    untouched replacement of a file that did not exist is dropped.
    """

    def __init__(self, path: str | os.PathLike, mode: str, *, publish_empty: bool = True) -> None:
        if mode not in ("new", "append", "replace"):
            raise OptionError(f"unknown output mode {mode!r}; choose new, append or replace")
        self.path = Path(path)
        self.mode = mode
        self.publish_empty = publish_empty
        self.target = Path(os.path.realpath(path)) if mode == "replace" else self.path
        try:
            self._existing = os.stat(self.target) if mode == "replace" else None
        except FileNotFoundError:
            self._existing = None
        self._fh: IO[bytes] | None = None
        self._tmp: Path | None = None
        self.created = False

    @property
    def opened(self) -> bool:
        return self._fh is not None

    def _error(self, exc: OSError) -> OutputWriteError:
        return OutputWriteError(f"cannot write {self.path}: {exc.strerror or exc}")

    def _open_fd(self, path: Path, flags: int) -> int:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)

    def open(self) -> None:
        if self._fh is not None:
            return
        try:
            newline = b""
            if self.mode == "new":
                fd = self._open_fd(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                self.created = True
            elif self.mode == "append":
                with open(self.path, "rb") as fh:  # never glue a line onto a torn last one
                    if fh.seek(0, os.SEEK_END):
                        fh.seek(-1, os.SEEK_END)
                        newline = b"" if fh.read(1) == b"\n" else b"\n"
                fd = self._open_fd(self.path, os.O_WRONLY | os.O_APPEND)
            else:
                fd = self._temp_fd()
            self._fh = self._wrap(fd)
            if newline:
                self._fh.write(newline)
        except FileExistsError:
            raise OutputWriteError(f"{self.path} appeared while perm was starting; it was left untouched") from None
        except OSError as exc:
            raise self._error(exc) from None

    @staticmethod
    def _wrap(fd: int) -> IO[bytes]:
        return os.fdopen(fd, "wb")

    def _temp_fd(self) -> int:
        for _ in range(100):
            tmp = self.target.parent / f".{self.target.name[:80]}.{secrets.token_hex(6)}.perm-tmp"
            try:
                fd = self._open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            self._tmp = tmp
            if self._existing is not None:
                try:
                    os.fchmod(fd, stat.S_IMODE(self._existing.st_mode))
                except OSError:
                    pass
            return fd
        raise FileExistsError(self.target)

    def write(self, text: str) -> None:
        self.open()
        try:
            self._fh.write(text.encode("utf-8"))
        except OSError as exc:
            raise self._error(exc) from None

    def flush(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.flush()
        except OSError as exc:
            raise self._error(exc) from None

    def commit(self) -> None:
        """Make the output final: flush and fsync; a replacement is renamed over the target."""
        if self.mode == "replace" and self._fh is None and (self.publish_empty or self._existing is not None):
            self.open()
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.target)
                self._tmp = None
            _fsync_dir(self.target.parent)
        except OSError as exc:
            _close_quietly(fh)
            self._drop_temp()
            raise self._error(exc) from None

    def abort(self) -> None:
        """Give up: a replacement's temporary file is removed and the target left as it
        was; a new or appended file keeps what was written (a later --resume continues it)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            if self.mode != "replace":
                try:
                    fh.flush()
                except OSError:
                    pass
            _close_quietly(fh)
        self._drop_temp()

    def _drop_temp(self) -> None:
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None


def _close_quietly(fh: IO[bytes]) -> None:
    try:
        fh.close()
    except OSError:
        pass


class StreamSink:
    """A stream (stdout) written as UTF-8 whatever the locale, whose write failures
    (a closed pipe) become `OutputWriteError`."""

    def __init__(self, stream: IO[str], name: str = "stdout") -> None:
        self.stream = stream
        self.name = name
        self.binary = getattr(stream, "buffer", None)

    def write(self, text: str) -> None:
        try:
            if self.binary is not None:
                self.binary.write(text.encode("utf-8"))
            else:
                self.stream.write(text)
        except OSError as exc:
            raise OutputWriteError(f"cannot write {self.name}: {exc.strerror or exc}") from None

    def flush(self) -> None:
        try:
            (self.binary if self.binary is not None else self.stream).flush()
        except OSError as exc:
            raise OutputWriteError(f"cannot write {self.name}: {exc.strerror or exc}") from None

    def silence(self) -> None:
        """After a closed pipe: point the stream at /dev/null so that Python's own flush at
        exit does not print a second error."""
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self.stream.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):  # a stream without a file descriptor
            pass


@dataclass
class OutputPlan:
    output: OutputFile | None  # None: stdout
    errors: OutputFile

    @property
    def replacing(self) -> bool:
        return self.output is not None and self.output.mode == "replace"

    def commit(self) -> None:
        if self.output is not None:
            self.output.commit()
        self.errors.commit()

    def abort(self) -> None:
        if self.output is not None:
            self.output.abort()
        self.errors.abort()

    def run(self, body: Callable[[Any, OutputFile], T], stdout: IO[str] | None = None) -> T:
        """`body(sink, errors_sink)` with the outputs opened, then committed: the output (or
        `stdout`, default `sys.stdout`, when there is no output file) is opened before the
        first record, so a run that ends early still leaves a (possibly empty) file. Any
        exception aborts the plan (a replacement leaves the old files whole) and is raised
        again; a result whose `interrupted` is true aborts a replacement and commits what an
        appended or new output holds (a later resume continues it)."""
        sink = self.output if self.output is not None else StreamSink(stdout if stdout is not None else sys.stdout)
        try:
            if self.output is not None:
                self.output.open()  # created (or the replacement started) before the first record
            result = body(sink, self.errors)
            if getattr(result, "interrupted", False) and self.replacing:
                self.abort()  # a replacement happens only when a run finishes
            else:
                self.commit()
        except BaseException:
            self.abort()
            raise
        return result


def plan_outputs(
    input_path: str, output: Path | None, errors_path: Path, *, resume: bool = False, overwrite: bool = False
) -> OutputPlan:
    """Check the output and errors paths and decide how each is written (see `OutputFile`).

    Refused (`TargetError`, code 2): a path that is the input or not a regular file, the
    same path for both, an existing non-empty output or errors file without --overwrite
    (or --resume). A missing directory is code 1.
    """
    source = input_identity(input_path)
    out_st = check_target(output, "output", source) if output is not None else None
    err_st = check_target(errors_path, "errors file", source)
    if output is not None and (
        os.path.realpath(output) == os.path.realpath(errors_path) or _same(_identity(output), _identity(errors_path))
    ):
        raise TargetError(f"the errors file {errors_path} is the output; give --errors another path")
    out_mode = None
    if output is not None:
        if resume:
            out_mode = "append" if out_st is not None else "new"
        elif out_st is not None and out_st.st_size:
            if not overwrite:
                raise TargetError(f"{output} exists: use --resume to continue it or --overwrite to replace it")
            out_mode = "replace"
        else:
            out_mode = "append" if out_st is not None else "new"  # an empty file loses nothing
    if resume:
        err_mode = "append" if err_st is not None else "new"
    elif err_st is not None and err_st.st_size and not overwrite:
        raise TargetError(
            f"{errors_path} exists (bad records of an earlier run): use --overwrite to replace it, or --errors PATH"
        )
    elif out_mode == "replace" or (err_st is not None and err_st.st_size):
        err_mode = "replace"
    else:
        err_mode = "append" if err_st is not None else "new"
    return OutputPlan(
        OutputFile(output, out_mode) if output is not None else None,
        OutputFile(errors_path, err_mode, publish_empty=False),
    )


def default_errors_path(output: str) -> Path:
    """OUT.errors.jsonl, or perm-errors.jsonl in the working directory for `-o -`."""
    return Path("perm-errors.jsonl") if output == "-" else Path(output + ".errors.jsonl")
