"""Replace a file atomically, so readers see the old content or the new, never a mix.

Used for every file other programs read (the model manifest, the health report).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

__all__ = ["temp_path_for", "write_atomic"]

# errno values meaning "this filesystem does not do hard links here".
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
)


def temp_path_for(path: Path, tag: str = "") -> Path:
    """A fresh temporary name next to ``path``: ``.<name>[.<tag>].<random>.tmp``.

    Hidden and with a ``.tmp`` suffix, so a temp file left behind by a killed writer is
    never taken for the real file. Same folder, so the final rename stays on one
    filesystem (``os.replace`` is atomic only there).
    """
    middle = f".{tag}" if tag else ""
    return path.with_name(f".{path.name}{middle}.{secrets.token_hex(6)}.tmp")


def write_atomic(
    path: Path, data: bytes, *, keep_previous: bool = False, mode: int | None = None
) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    Steps: write a temp file in the same folder, flush and fsync it, optionally keep the
    current file as ``<name>.prev``, rename the temp file over ``path``, fsync the folder.
    Missing parent folders are created.

    Guarantees: if this raises, or the process dies, before the final rename, ``path``
    still holds its old content (a temp file may be left behind after a kill; one that
    raises removes its own). ``path`` never goes missing, not even while ``.prev`` is
    being made. A new file gets the usual 0o666 minus umask; a replaced one keeps its mode;
    ``mode`` sets it whatever it was (0o600 for a file of secrets: never readable by
    others, not even for a moment).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        _write_synced(temp, data, mode_from=path, mode=mode)
        if keep_previous:
            _keep_previous(path)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_folder(path.parent)


def _write_synced(temp: Path, data: bytes, *, mode_from: Path, mode: int | None = None) -> None:
    # O_EXCL: never write through a name someone else created (or a symlink planted there).
    created = 0o666 if mode is None else mode
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, created)
    with os.fdopen(fd, "wb") as handle:
        if mode is not None:
            os.fchmod(handle.fileno(), mode)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(handle.fileno(), stat.S_IMODE(mode_from.stat().st_mode))
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _keep_previous(path: Path) -> None:
    """Make ``<name>.prev`` the current content of ``path``, leaving ``path`` in place.

    A hard link to a temp name, then a rename over ``.prev``: the old ``.prev`` is
    replaced atomically and ``path`` itself is never moved. Without hard links (some
    network or FUSE filesystems) the content is copied instead.
    """
    previous = path.with_name(path.name + ".prev")
    temp = temp_path_for(path, "prev")
    try:
        try:
            os.link(path, temp)
        except FileNotFoundError:
            return  # first write: nothing to keep
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return
            _write_synced(temp, current, mode_from=path)
        os.replace(temp, previous)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def _fsync_folder(folder: Path) -> None:
    # The rename is only durable once the folder's entry is on disk.
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a folder; the rename itself has happened.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)
