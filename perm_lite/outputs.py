"""Output files that never destroy what the run did not create, written by one run at a time.

`check_target` refuses a path that is the input (under any name) or not a regular file;
`OutputLock` holds an exclusive lock on an output path for a whole run, so that a second
writer is refused (`OutputBusy`) before it reads or writes anything; `OutputFile` creates
exclusively, appends (resume), or writes a temporary file beside the target that replaces
it only on `commit()`; `plan_outputs` decides how a run's output and errors file are opened;
`OutputPlan.run` commits them when the run succeeds and aborts them when it fails (or is
interrupted while replacing); `single_output` is the same for a command that writes one file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from perm_lite.errors import OptionError, PermError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


class TargetError(PermError):
    """An output path perm refuses to use; `code` is the exit code (2 usage, 1 fatal)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class OutputWriteError(PermError):
    """Writing an output failed (disk full, permissions, a closed pipe)."""


class OutputBusy(TargetError):
    """Another run (perm, in this or another process) holds the output's lock (exit 2)."""


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


def is_devnull(path: str | os.PathLike) -> bool:
    """Whether `path` is /dev/null (or a link to it): `--errors /dev/null` discards bad records."""
    try:
        return os.path.realpath(path) == os.path.realpath(os.devnull) and stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


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


# -- one writer per output ------------------------------------------------------------------

LOCK_SUFFIX = ".perm-lock"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: `.NAME.perm-lock` beside the file the path resolves to
    (two names for one file, through a symbolic link, share it)."""
    real = Path(os.path.realpath(path))
    name = real.name or "root"
    if len(name.encode("utf-8", "surrogateescape")) > 200:
        name = name[:100] + "." + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return real.parent / f".{name}{LOCK_SUFFIX}"


def _release_lock(fd: int, path: Path | None, ino: tuple[int, int] | None) -> None:
    """Unlink our lock file (while still holding the lock), then let go of it."""
    try:
        if path is not None and ino is not None:
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == ino:
                    os.unlink(path)
            except OSError:
                pass
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


class OutputLock:
    """An exclusive lock (`flock`) on one output path, taken before anything is read from or
    written to it and held until `release()` (or the process ends).

    The lock is a sidecar file, `lock_path(path)`, created beside the target and removed on
    release (holding the pid of the run, for the refusal message); where it cannot be created
    (a read-only directory) the existing target itself is locked. A second writer, in this
    process or another, gets `OutputBusy`. Where the filesystem has no locks, none is held.
    """

    def __init__(self, path: str | os.PathLike, what: str = "output") -> None:
        self.path = Path(path)
        self.what = what
        self.lock_file: Path | None = None
        self._release: Callable[[], None] | None = None
        if fcntl is not None:
            self._acquire()

    @property
    def held(self) -> bool:
        return self._release is not None

    def _busy(self, fd: int) -> OutputBusy:
        return OutputBusy(
            f"{self.what} {self.path} is being written by another perm run{_holder(fd)}; "
            "wait for it to finish or choose another path"
        )

    def _acquire(self) -> None:
        target = lock_path(self.path)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(50):
            try:
                fd = os.open(target, flags, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise TargetError(f"the lock file {target} is a symbolic link; remove it") from None
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    self._lock_target()  # a directory perm cannot create files in
                    return
                raise TargetError(f"cannot lock {self.what} {self.path}: {exc.strerror or exc}", 1) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise TargetError(f"the lock file {target} exists and is {_kind(st.st_mode)}; remove it")
                if not self._flock(fd):
                    raise self._busy(fd)
                try:
                    now = os.lstat(target)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # the holder removed it as we opened it: take the new one
                    continue
                try:  # the pid, for the refusal message of a second run (best effort)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except OSError:
                    pass
            except BaseException:
                _close_fd(fd)
                raise
            self.lock_file = target
            self._release = weakref.finalize(self, _release_lock, fd, target, (st.st_dev, st.st_ino))
            return
        raise TargetError(f"cannot lock {self.what} {self.path}: its lock file keeps changing", 1)

    def _lock_target(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # never waits on a pipe
        except OSError:
            return  # nothing to lock yet; writing it will fail with its own error
        try:
            if not self._flock(fd):
                raise self._busy(-1)
        except BaseException:
            _close_fd(fd)
            raise
        self._release = weakref.finalize(self, _release_lock, fd, None, None)

    @staticmethod
    def _flock(fd: int) -> bool:
        """True when locked (or the filesystem has no locks), False when another holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            return True  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        return True

    def release(self) -> None:
        """Let the next writer in (removes the lock file); safe to call twice."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


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
    target is followed: the file it points to is replaced, the link kept. "discard":
    nothing is written (`--errors /dev/null`).
    `publish_empty` (replace mode): commit even if nothing was written; otherwise an
    untouched replacement of a file that did not exist is dropped.
    `lock`: an `OutputLock` already held for this path (released by `commit()`/`abort()`),
    True to take one when the file is opened, False for none (a directory lock covers it).
    """

    MODES = ("new", "append", "replace", "discard")

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str,
        *,
        publish_empty: bool = True,
        lock: OutputLock | bool = True,
        what: str = "output",
    ) -> None:
        if mode not in self.MODES:
            raise OptionError(f"unknown output mode {mode!r}; choose new, append, replace or discard")
        self.path = Path(path)
        self.mode = mode
        self.what = what
        self.publish_empty = publish_empty
        self.target = Path(os.path.realpath(path)) if mode == "replace" else self.path
        try:
            self._existing = os.stat(self.target) if mode == "replace" else None
        except FileNotFoundError:
            self._existing = None
        self._fh: IO[bytes] | None = None
        self._tmp: Path | None = None
        self._lock: OutputLock | None = lock if isinstance(lock, OutputLock) else None
        self._take_lock = lock is True and mode != "discard"
        self.created = False

    def lock(self) -> None:
        """Take this output's lock now (before anything is read or written); `OutputBusy`
        when another run holds it. A no-op once held, or for an output without a lock."""
        if self._take_lock and self._lock is None:
            self._lock = OutputLock(self.path, self.what)

    def release(self) -> None:
        """Give the lock up (the run is over)."""
        lock, self._lock = self._lock, None
        self._take_lock = False
        if lock is not None:
            lock.release()

    @property
    def opened(self) -> bool:
        return self._fh is not None

    def _error(self, exc: OSError) -> OutputWriteError:
        return OutputWriteError(f"cannot write {self.path}: {exc.strerror or exc}")

    def _open_fd(self, path: Path, flags: int) -> int:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)

    def open(self) -> None:
        if self._fh is not None or self.mode == "discard":
            return
        self.lock()
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
        if self.mode == "discard":
            return
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
        try:
            self._commit()
        finally:
            self.release()

    def _commit(self) -> None:
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
        try:
            if fh is not None:
                if self.mode != "replace":
                    try:
                        fh.flush()
                    except OSError:
                        pass
                _close_quietly(fh)
            self._drop_temp()
        finally:
            self.release()

    @property
    def temporary(self) -> Path | None:
        """The temporary file a replacement is being written to (None before `open()`)."""
        return self._tmp

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

    @property
    def locks(self) -> list[Path]:
        """The lock files this plan holds (for messages and tests)."""
        files = [f._lock.lock_file for f in (self.output, self.errors) if f is not None and f._lock is not None]
        return [f for f in files if f is not None]

    def abort(self) -> None:
        try:
            if self.output is not None:
                self.output.abort()
        finally:
            self.errors.abort()

    def close(self) -> None:
        """Give the plan up without running it: nothing is written, the locks are released."""
        self.abort()

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
    input_path: str,
    output: Path | None,
    errors_path: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    replace_earlier_errors: bool = False,
    refuse_existing: Callable[[str, Path], str] | None = None,
) -> OutputPlan:
    """Check the output and errors paths, lock them, and decide how each is written (see
    `OutputFile`). The locks are held by the plan until it commits or aborts (or `close()`).

    Refused (`TargetError`, code 2): a path that is the input or not a regular file, the
    same path for both, an output or errors file another run is writing (`OutputBusy`),
    an existing non-empty output or errors file without --overwrite (or --resume; the
    message is `refuse_existing(what, path)` when given). A missing directory is code 1.
    `errors_path` may be the null device: bad records are then discarded.
    `replace_earlier_errors` (a run to stdout with the default errors file): an existing
    errors file of an earlier perm run is replaced by this run's, not refused.
    """
    source = input_identity(input_path)
    discard = is_devnull(errors_path)
    if output is not None:
        check_target(output, "output", source)
    if not discard:
        check_target(errors_path, "errors file", source)
    if (
        output is not None
        and not discard
        and (
            os.path.realpath(output) == os.path.realpath(errors_path)
            or _same(_identity(output), _identity(errors_path))
        )
    ):
        raise TargetError(f"the errors file {errors_path} is the output; give --errors another path")
    locks: list[OutputLock] = []
    try:
        out_lock = err_lock = None
        if output is not None:
            out_lock = OutputLock(output, "output")
            locks.append(out_lock)
        if not discard:
            err_lock = OutputLock(errors_path, "errors file")
            locks.append(err_lock)
        # Decided on what is there now that no other perm run can change it.
        out_st = check_target(output, "output", source) if output is not None else None
        err_st = None if discard else check_target(errors_path, "errors file", source)
        out_mode = None
        if output is not None:
            if resume:
                out_mode = "append" if out_st is not None else "new"
            elif out_st is not None and out_st.st_size:
                if not overwrite:
                    raise TargetError(
                        refuse_existing("output", output)
                        if refuse_existing
                        else f"{output} exists: use --resume to continue it or --overwrite to replace it"
                    )
                out_mode = "replace"
            else:
                out_mode = "append" if out_st is not None else "new"  # an empty file loses nothing
        earlier = err_st is not None and err_st.st_size > 0
        if discard:
            err_mode = "discard"
        elif resume:
            err_mode = "append" if err_st is not None else "new"
        elif earlier and not overwrite:
            if replace_earlier_errors and is_errors_file(errors_path):
                err_mode = "replace"  # an earlier run's bad records: this run's replace them
            elif refuse_existing:
                raise TargetError(refuse_existing("errors file", errors_path))
            elif replace_earlier_errors:
                raise TargetError(
                    f"{errors_path} exists and is not a perm errors file: give --errors PATH (or --errors /dev/null)"
                )
            else:
                raise TargetError(
                    f"{errors_path} exists (bad records of an earlier run): use --overwrite to replace it, "
                    "or --errors PATH"
                )
        elif out_mode == "replace" or earlier:
            err_mode = "replace"
        else:
            err_mode = "append" if err_st is not None else "new"
        return OutputPlan(
            OutputFile(output, out_mode, lock=out_lock or False) if output is not None else None,
            OutputFile(errors_path, err_mode, publish_empty=False, lock=err_lock or False, what="errors file"),
        )
    except BaseException:
        for lock in locks:
            lock.release()
        raise


def is_errors_file(path: str | os.PathLike) -> bool:
    """Whether every line of `path` is an errors-file line perm writes ({"line", "field",
    "error", "id"}, or {"file", ...} from a Ray run): an earlier run's bad records."""
    allowed = {"line", "field", "error", "id", "file"}
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                row = json.loads(raw)
                if not (isinstance(row, dict) and isinstance(row.get("error"), str) and set(row) <= allowed):
                    return False
                if not isinstance(row.get("line"), int | None) or ("line" not in row and "file" not in row):
                    return False
    except (OSError, ValueError, RecursionError):
        return False
    return True


def single_output(
    path: str | os.PathLike,
    *,
    reads: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    what: str = "output",
) -> OutputFile:
    """One output file of a command that writes it whole (`perm report`): checked, locked and
    written to a temporary file beside it that replaces it only on `commit()` (a failed or
    interrupted run leaves no partial file and an existing one whole).

    Refused (`TargetError`): "-" (a file is needed), a path that is any of the files the
    command `reads` (links and hard links included) or not a regular file, one another run
    is writing (`OutputBusy`), an existing file without `overwrite` (all code 2); a missing
    directory (code 1)."""
    if os.fspath(path) == "-":
        raise TargetError("this command writes a file: give -o FILE, not - (stdout)")
    target = Path(path)
    sources = [(Path(r), input_identity(os.fspath(r))) for r in reads]

    def check() -> os.stat_result | None:
        st = check_target(target, what)
        for name, identity in sources:
            if _same(_identity(target), identity) or (
                identity is None and os.path.realpath(target) == os.path.realpath(name)
            ):
                raise TargetError(f"{what} {target} is {name}, which this command reads; choose another path")
        return st

    check()
    lock = OutputLock(target, what)
    try:
        st = check()  # again, now that no other perm run can change it
        if st is not None and not overwrite:
            raise TargetError(f"{target} exists; pass --overwrite to replace it")
        return OutputFile(target, "replace", lock=lock, what=what)
    except BaseException:
        lock.release()
        raise


def default_errors_path(output: str) -> Path:
    """OUT.errors.jsonl, or perm-errors.jsonl in the working directory for `-o -`."""
    return Path("perm-errors.jsonl") if output == "-" else Path(output + ".errors.jsonl")
