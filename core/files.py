"""Small file helpers shared by every part of ferry: atomic writes, directories replaced whole
(and recoverably), checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a fsynced temporary file in the same directory and a rename.

    Readers see the old file or the new one, never a torn mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; the result is an ordinary readable file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# A directory `out` is replaced by a complete new one in three renames, journaled so that a
# crash at any instant can be finished by the next caller (`recover_directory`):
#   .out.staging-PID-XXXX   the new content, being written (a leftover of a dead PID is removed)
#   .out.swap               written once the staging is complete: names it and the writer's PID
#   .out.old                the previous `out` while the new one moves in
def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _owner(name: str) -> int | None:
    """The PID in a staging directory's name (`.out.staging-PID-XXXX`)."""
    try:
        return int(name.rsplit(".staging-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def recover_directory(out: str | Path) -> None:
    """Finish or undo an interrupted replacement of `out`: a journaled swap whose writer died is
    completed (the new content was whole), and what dead writers left behind is removed. A
    swap or staging of a live process is left alone."""
    out = Path(out)
    journal, old = _sibling(out, "swap"), _sibling(out, "old")
    if journal.is_file():
        try:
            staging_name, pid = journal.read_text().split()
            staging = out.with_name(staging_name)
            writer = int(pid)
        except (OSError, ValueError):  # torn while written: the swap never began
            journal.unlink(missing_ok=True)
        else:
            if _alive(writer) and writer != os.getpid():
                return
            if staging.parent == out.parent and staging.is_dir():
                if out.exists() and not old.exists():
                    os.rename(out, old)
                os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
            journal.unlink(missing_ok=True)
    elif old.exists():  # a swap that finished all but its clean-up
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out)
    for leftover in out.parent.glob(f".{out.name}.staging-*"):
        pid = _owner(leftover.name)
        if pid is not None and (pid == os.getpid() or not _alive(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries durable (its files are fsynced as they are written)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(staging: Path, out: Path) -> None:
    """Put the complete directory `staging` at `out`, replacing what is there; recoverable at
    every instant by `recover_directory`."""
    journal, old = _sibling(out, "swap"), _sibling(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    # written in place, not via a temporary file: a torn journal reads as "never begun"
    with open(journal, "w") as f:
        f.write(f"{staging.name} {os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    journal.unlink()


def new_staging(out: Path) -> Path:
    """A fresh, empty staging directory beside `out`, named after this process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-{os.getpid()}-"))
    staging.chmod(0o755)  # mkdtemp creates 0700; the result is an ordinary directory
    return staging


@contextlib.contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """A fresh directory beside `out` to write a whole result into (a bundle, an import, a
    checkpoint); when the block ends without an error its entries are fsynced and it replaces
    `out`, else it is removed, so `out` is never half-written and an earlier result there is
    replaced only at the very end. An interrupted earlier replacement of `out` is finished
    first."""
    out = Path(out)
    recover_directory(out)
    staging = new_staging(out)
    try:
        yield staging
        fsync_directory(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, out)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
