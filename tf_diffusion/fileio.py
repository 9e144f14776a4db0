"""File handling shared by every reader and writer.

Reading: ``CheckpointError``, the one error a malformed or hostile file gives, and ``reading``, the
guard that turns whatever else a reader raises into it, naming the file; ``open_regular`` refuses
pipes and devices. Writing: every writer works in a hidden temporary sibling of its destination
(``temp_prefix``), fsyncs it (``sync_tree``) and renames it into place; ``publish`` does that for a
file with the mode a plain ``open()`` gives, and no clobbering; ``clean_stale`` removes what a
killed writer left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator

# Exceptions that are about the process, not about a file: never translated.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit, ImportError)


class CheckpointError(ValueError):
    """A file could not be read: malformed, hostile, or failing in a way its reader did not expect.

    The message starts with the file's path. The original exception, if any, is the ``__cause__``.

    Attributes:
        path: the file or folder being read.
    """

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


def _names(error: BaseException, path: str) -> bool:
    """Whether ``error``'s message (or its filename) already points at ``path``."""
    name = os.path.basename(os.path.normpath(path))
    text = str(error)
    filename = getattr(error, "filename", None)
    return bool(filename) or path in text or (bool(name) and name in text)


@contextlib.contextmanager
def reading(path: str | os.PathLike, action: str = "cannot read the checkpoint") -> Iterator[None]:
    """Turn anything a reader raises inside the block into an error that names ``path``.

    ``ValueError`` (``CheckpointError``, ``StateDictError``, ...) and ``OSError`` whose message already
    names the file pass unchanged; a ``ValueError`` that does not gets the path in front of its message
    (same type, same traceback), or is wrapped if its message is not its one argument. Anything else (``OSError`` without the path, ``MemoryError``,
    ``RecursionError``, ``KeyError``, ``zlib.error``, ...) becomes ``CheckpointError`` chained to the
    original. Interrupts, exits and ``ImportError`` (a missing optional package) pass unchanged.

    Args:
        path: the file or folder being read (or the source as the user gave it).
        action: what failed, for the message of translated errors.

    Raises:
        CheckpointError: for an exception that is neither a ``ValueError`` nor an ``OSError`` naming the file.
    """
    path = os.fspath(path)
    try:
        yield
    except _PASS_THROUGH:
        raise
    except ValueError as e:
        if _names(e, path):
            raise
        if len(e.args) == 1 and isinstance(e.args[0], str) and str(e) == e.args[0]:
            e.args = (f"{path}: {e.args[0]}",)
            raise
        # A ValueError whose message is not its one argument (UnicodeDecodeError, ...): wrap it.
        raise CheckpointError(path, f"{action}: {type(e).__name__}: {_short(e)}") from e
    except OSError as e:
        if _names(e, path):
            raise
        raise CheckpointError(path, f"{action}: {type(e).__name__}: {_short(e)}") from e
    except MemoryError as e:
        raise CheckpointError(
            path, f"{action}: MemoryError: the file asks for more memory than there is"
        ) from e
    except Exception as e:  # RecursionError, KeyError, zlib.error, ...: a reader met what it did not expect
        raise CheckpointError(path, f"{action}: {type(e).__name__}: {_short(e)}") from e


def open_regular(path: str | os.PathLike):
    """Open ``path`` for binary reading, refusing anything but a regular file.

    Opening is non-blocking, so a FIFO or device at ``path`` is refused instead of hanging the reader.

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: as ``open`` (naming the path).
        CheckpointError: ``path`` is not a regular file.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(path, "not a regular file (a pipe, socket or device); refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# Config, scheduler and tokenizer JSON files are kilobytes to a few megabytes (vocab.json: 1 MB).
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json_object(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a small file, with every failure a ValueError naming the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a regular file, larger than ``limit`` bytes, not UTF-8, not JSON, nested
            too deeply for the parser, or not an object.
    """
    path = os.fspath(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CheckpointError(path, f"{size} bytes; a JSON file here has at most {limit}")
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise CheckpointError(path, f"more than {limit} bytes; a JSON file here has at most {limit}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"not valid UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(path, "not valid JSON here: nested too deeply") from None
    except ValueError as e:  # a number with more digits than Python converts
        raise CheckpointError(path, f"not valid JSON here: {_short(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or "no message"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def publish(
    tmp: str | os.PathLike,
    path: str | os.PathLike,
    overwrite: bool,
    hint: str = "pass overwrite=True to replace it",
) -> None:
    """Move the finished temporary file ``tmp`` (same folder) to ``path``.

    ``tempfile.mkstemp`` makes files private (0600); the published file gets the mode ``open()``
    would have given it (0666 minus the umask). Without ``overwrite``, a file that appeared at
    ``path`` while ``tmp`` was written is never replaced: the move is a hard link, which fails if
    ``path`` exists (on file systems without hard links, a check just before the rename).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (the message ends with ``hint``);
            ``tmp`` is left for the caller to remove.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{os.fspath(path)}: appeared while writing; {hint}") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(f"{os.fspath(path)}: appeared while writing; {hint}") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


# --------------------------------------------------------------------------- temporary siblings

_TEMP_TAG = ".tmp-"
_ASIDE_TAG = ".old-"


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of a writer's temporary sibling of ``path``: hidden, with this process's id.

    The id lets ``clean_stale`` tell a killed run's leftovers from a live writer's work in progress.
    """
    return f".{os.path.basename(os.fspath(path))}{_TEMP_TAG}{os.getpid()}-"


def aside_path(path: str | os.PathLike) -> str:
    """Where an old destination waits while its replacement is renamed in (see ``clean_stale``)."""
    path = os.fspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{_ASIDE_TAG}{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(name: str, stem: str, tag: str) -> int | None:
    """The process id in a temporary or aside name of ``stem``, or None if it is not one."""
    start = f".{stem}{tag}"
    if not name.startswith(start):
        return None
    digits = name[len(start) :].split("-", 1)[0].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def clean_stale(path: str | os.PathLike) -> list[str]:
    """Remove what a killed writer of ``path`` left next to it; returns what was removed or restored.

    Temporary siblings (``temp_prefix``) of dead processes are deleted. An old destination set
    aside by a dead process (``aside_path``) is put back if ``path`` is missing (the replacement
    never landed, so nothing is lost), else deleted. Work of live processes is left alone.
    Symlinks among the leftovers are unlinked, never followed.
    """
    path = os.fspath(path)
    folder, stem = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    done = []
    try:
        names = os.listdir(folder)
    except OSError:
        return done
    for name in sorted(names):
        full = os.path.join(folder, name)
        temp_pid, aside_pid = _owner(name, stem, _TEMP_TAG), _owner(name, stem, _ASIDE_TAG)
        pid = temp_pid if temp_pid is not None else aside_pid
        if pid is None or _alive(pid):
            continue
        if aside_pid is not None and not os.path.lexists(path):
            os.rename(full, path)
            done.append(f"restored {path} from {full}")
            continue
        _remove(full)
        done.append(f"removed {full}")
    return done


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def sync_tree(path: str | os.PathLike) -> None:
    """fsync every file and folder under ``path`` (itself included), so a rename publishes complete data."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(root, name), os.O_RDONLY)
            _fsync(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    else:
        _fsync(path, os.O_RDONLY)


def sync_folder(path: str | os.PathLike) -> None:
    """fsync a folder, making a rename inside it durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        _fsync(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
