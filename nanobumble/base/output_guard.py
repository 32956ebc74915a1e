"""The one door out: every program that writes a model, a checkpoint, a results
file or shards claims its output here before it writes anything.

    lock = claim_run_dir(output_dir, inputs)       # a training run's output_dir, for the run's lifetime
    with publish_directory(save_path, inputs, overwrite, "--save_path") as tmp: ...  # merge, export, prepare
    with publish_file(path, inputs, "--output", is_ours) as tmp: ...                 # evaluate's results

What it promises:
- One writer per output. An exclusive lock (output_dir/.lock, or .<name>.lock
  beside a directory or file that is written whole) is held while the program
  runs; the OS drops it when the process dies, kill -9 included. A second
  program is refused, naming the holder's pid.
- An output is never an input. The resolved paths (symlinks followed) of the
  output and of every input must lie apart: neither equal nor one inside the other.
- Nothing it did not write is removed or replaced. .nanobumble-files in a
  directory lists the names nanobumble wrote there (recorded before they are
  written); only those may be removed or replaced.
- A directory written whole appears complete or not at all: it is filled
  beside its destination and renamed into place.
- Its own leftovers (the temporary names of a killed program) are swept on the
  next claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator

from nanobumble.base.errors import UserError
from nanobumble.base.files import atomic_directory, atomic_path, atomic_write_text
from nanobumble.base.reading import read_json

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

LOCK = ".lock"
RECORD = ".nanobumble-files"
# Temporary names: "<name>.tmp-<pid>" (atomic_path), ".<name>.tmp-<pid>-<random>"
# (atomic_directory), ".tmp-checkpoint-<step>" and ".old-checkpoint-<step>" (checkpoints).
TEMPORARY = re.compile(r"\.tmp-(\d+)|^\.tmp-|^\.old-")


class OutputLock:
    """An exclusive lock on a lock file, held until release() or the end of the process."""

    def __init__(self, lock_file: str, what: str, remove_on_release: bool = False):
        self.lock_file, self.remove_on_release = lock_file, remove_on_release
        self.fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(f"{what} is in use by another nanobumble program (pid {holder}, lock {lock_file}); "
                            f"wait for it to end, or pick another path") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        if self.remove_on_release:
            with contextlib.suppress(OSError):
                os.remove(self.lock_file)
        os.close(self.fd)
        self.fd = None


def check_apart(output: str, inputs: dict[str, str], flag: str) -> None:
    """Refuse an output that is an input, lies inside one or contains one (paths
    resolved: a symlink to an input is that input). inputs maps a key to a path;
    empty paths and names that are not paths (a preset) are skipped."""
    out = os.path.realpath(output)
    for key, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        source = os.path.realpath(path)
        if out == source:
            relation = "is"
        elif out.startswith(source.rstrip(os.sep) + os.sep):
            relation = "lies inside"
        elif source.startswith(out.rstrip(os.sep) + os.sep):
            relation = "contains"
        else:
            continue
        raise UserError(f"{flag} {output} {relation} {key} {path}: an output must lie apart from every input "
                        f"(it would be read while written, or replace it); pick another {flag}")


def recorded(directory: str) -> set[str]:
    """The names nanobumble wrote in directory (its .nanobumble-files record)."""
    path = os.path.join(directory, RECORD)
    if not os.path.lexists(path):
        return set()
    content = read_json(path)
    names = content.get("written") if isinstance(content, dict) else None
    if not isinstance(names, list):
        raise UserError(f'{path}: damaged (expected {{"written": [names]}}); remove it by hand if the directory '
                        f"is yours")
    return {name for name in names if isinstance(name, str)}


def record(directory: str, *names: str) -> None:
    """Add names to directory's record, before they are written: a kill between the
    two leaves a name recorded that does not exist, never a written one unrecorded."""
    known = recorded(directory)
    if not set(names) <= known:
        atomic_write_text(os.path.join(directory, RECORD),
                          json.dumps({"written": sorted(known | set(names))}, indent=1) + "\n")


def foreign(directory: str, names) -> list[str]:
    """Those of names present in directory that nanobumble did not write there."""
    mine = recorded(directory)
    return sorted(name for name in names if name not in mine and os.path.lexists(os.path.join(directory, name)))


def remove_entry(path: str) -> None:
    """Remove a file, a symlink (not what it points at) or a directory tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def remove_recorded(directory: str) -> list[str]:
    """Remove everything nanobumble wrote in directory (--overwrite_output_dir); return the names."""
    removed = []
    for name in sorted(recorded(directory) - {LOCK, RECORD}):
        if os.path.lexists(os.path.join(directory, name)):
            remove_entry(os.path.join(directory, name))
            removed.append(name)
    atomic_write_text(os.path.join(directory, RECORD), json.dumps({"written": []}) + "\n")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep_leftovers(directory: str, locked: bool) -> list[str]:
    """Remove the temporary names a killed program left in directory. With the
    directory's lock held every one is stale; otherwise only those whose writing
    process (the pid in the name) has ended."""
    if not os.path.isdir(directory):
        return []
    swept = []
    for name in os.listdir(directory):
        match = TEMPORARY.search(name)
        if match is None or name in (LOCK, RECORD):
            continue
        if not locked and (match.group(1) is None or _alive(int(match.group(1)))):
            continue
        remove_entry(os.path.join(directory, name))
        swept.append(name)
    return swept


_RUN_LOCKS: dict[str, OutputLock] = {}  # held until the process ends
_CREATED: set[str] = set()  # output_dirs this process created


def abandon_run_dir(output_dir: str) -> None:
    """A run that stopped before writing anything: remove the output_dir its claim
    created (holding only the lock and the record), so a refused run leaves no trace."""
    path = os.path.realpath(output_dir)
    if path not in _CREATED or not os.path.isdir(path) or not set(os.listdir(path)) <= {LOCK, RECORD}:
        return
    lock = _RUN_LOCKS.pop(os.path.join(path, LOCK), None)
    if lock is not None:
        lock.release()
    shutil.rmtree(path, ignore_errors=True)
    _CREATED.discard(path)


def check_writable(path: str, flag: str) -> None:
    """Fail early, naming the key, when path (or, before it exists, the directory
    that will hold it) cannot be written to: not hours later at the first save."""
    existing = os.path.abspath(path)
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise UserError(f"{flag} {path}: {existing} is a file, not a directory")
        existing = os.path.dirname(existing)
    probe = os.path.join(existing, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({existing}: {e.strerror})") from None


def claim_run_dir(output_dir: str, inputs: dict[str, str], flag: str = "output_dir") -> OutputLock:
    """Lock a training run's output_dir for the run (the launching rank calls this
    once) and sweep what a killed run left behind. What may be replaced in it is
    the resume policy's to decide (run/resume.py), from the record."""
    check_apart(output_dir, inputs, flag)
    check_writable(output_dir, flag)
    if not os.path.exists(output_dir):
        _CREATED.add(os.path.realpath(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    lock_file = os.path.realpath(os.path.join(output_dir, LOCK))
    if lock_file not in _RUN_LOCKS:  # a second run in the same process (tests, notebooks) holds it already
        _RUN_LOCKS[lock_file] = OutputLock(lock_file, f"{flag} {output_dir}")
    sweep_leftovers(output_dir, locked=True)
    return _RUN_LOCKS[lock_file]


def _sibling_lock(path: str, flag: str) -> OutputLock:
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return OutputLock(os.path.join(parent, f".{name}.lock"), f"{flag} {path}", remove_on_release=True)


@contextlib.contextmanager
def publish_directory(path: str, inputs: dict[str, str], overwrite: bool, flag: str,
                      overwrite_flag: str | None = "--overwrite_output_dir true") -> Iterator[str]:
    """A temporary directory beside path to fill; when the block ends without an
    error it becomes path, recorded as written by nanobumble. An existing path is
    replaced only with overwrite, and only when it holds nothing but what
    nanobumble wrote there; the old one is removed after the new one is in place."""
    check_apart(path, inputs, flag)
    lock = _sibling_lock(path, flag)
    try:
        parent = os.path.dirname(os.path.abspath(path))
        sweep_leftovers(parent, locked=False)
        old = None
        if os.path.lexists(path):
            if not os.path.isdir(path) or os.path.islink(path):
                raise UserError(f"{flag} {path} exists and is not a directory")
            present = set(os.listdir(path)) - {RECORD}
            if present and not overwrite:
                raise UserError(f"{flag} {path} exists and is not empty; pick another directory"
                                + (f", or pass {overwrite_flag} to replace it" if overwrite_flag else ""))
            strangers = foreign(path, present)
            if strangers:
                raise UserError(f"{flag} {path} holds {', '.join(strangers[:5])}, which nanobumble did not write; "
                                f"it will not replace them: move them away or pick another directory")
            old = path
        with atomic_directory(path, replace=old is not None) as tmp:
            yield tmp
            record(tmp, *os.listdir(tmp))
    finally:
        lock.release()


@contextlib.contextmanager
def publish_file(path: str, inputs: dict[str, str], flag: str, is_ours) -> Iterator[str]:
    """A temporary path beside `path` to write; renamed to path when the block ends
    without an error. An existing file at path is replaced only when is_ours(path)
    says nanobumble wrote it (e.g. an earlier results file)."""
    check_apart(path, inputs, flag)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if os.path.lexists(path) and not is_ours(path):
        raise UserError(f"{flag} {path} exists and was not written by this program; it will not replace it: "
                        f"pick another {flag}")
    lock = _sibling_lock(path, flag)
    try:
        with atomic_path(path) as tmp:
            yield tmp
    finally:
        lock.release()
