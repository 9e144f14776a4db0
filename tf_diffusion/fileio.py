"""File handling shared by every reader and writer.

Reading: ``CheckpointError``, the one error a malformed or hostile file gives, and ``reading``, the
guard that turns whatever else a reader raises into it, naming the file. Writing: ``publish`` puts a
finished temporary file in place with the mode a plain ``open()`` gives, and no clobbering.
"""

from __future__ import annotations

import contextlib
import errno
import os
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
    (same type, same traceback). Anything else (``OSError`` without the path, ``MemoryError``,
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
        if not _names(e, path) and e.args and isinstance(e.args[0], str):
            e.args = (f"{path}: {e.args[0]}", *e.args[1:])
        raise
    except OSError as e:
        if _names(e, path):
            raise
        raise CheckpointError(path, f"{action}: {type(e).__name__}: {_short(e)}") from e
    except RecursionError as e:
        raise CheckpointError(path, f"{action}: nested too deeply ({_short(e)})") from e
    except MemoryError as e:
        raise CheckpointError(path, f"{action}: ran out of memory ({_short(e)})") from e
    except Exception as e:
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
