"""Writing so that a crash, a kill -9 or a full disk never leaves half a file.

Everything is written under a temporary name beside its destination and
renamed into place once complete (a rename within one directory is atomic):
a reader sees the old version or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path` to write. When the block ends without an error
    the file replaces `path`; otherwise it is removed and `path` is untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def usual_permissions(path: str) -> None:
    """Give a file the permissions any new file gets (0644 under the usual umask 022):
    safetensors' save_file writes through a private temporary and leaves 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_directory(directory: str, replace: bool = False) -> Iterator[str]:
    """A new temporary directory beside `directory` to fill. When the block ends
    without an error it is renamed to `directory`; otherwise it is removed. So
    `directory` is complete or absent. `directory` may exist only empty, unless
    replace: then the old one is moved aside, the new one renamed in, and the old
    one removed. If `directory` appeared meanwhile (another process),
    FileExistsError is raised."""
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    # the pid in the name lets a later program sweep what a killed one left (output_guard.py)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-{os.getpid()}-")
    os.chmod(tmp, 0o755)  # mkdtemp makes the directory private
    try:
        yield tmp
        if replace and os.path.lexists(directory):
            # not a temporary name: a kill between the two renames must not get it swept
            old = os.path.join(parent, f".{name}.replaced-{os.getpid()}")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
            return
        try:
            if os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)
            os.rename(tmp, directory)
        except OSError as e:
            raise FileExistsError(errno.EEXIST, f"{directory} appeared meanwhile ({e})", directory) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
