"""Putting a finished temporary file in place: the mode a plain ``open()`` gives, and no clobbering."""

from __future__ import annotations

import errno
import os


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
