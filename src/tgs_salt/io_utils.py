"""Small file helpers: atomic writes so that no output is ever half-written."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tgs_salt.errors import UserError

TMP_MARK = ".tmp-pid"  # temporary names: .<name>.tmp-pid<PID>.<random><suffix>
_TMP_RE = re.compile(r"^\..+\.tmp-pid(\d+)\.")


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(exc)  # torch.save reports a short write as a RuntimeError
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "No space left" in text
                                              or "File too large" in text)


def disk_full_error(path: Path, need_bytes: int | None = None) -> UserError:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    need = f"need about {max(need_bytes, 1 << 20) / 2**20:.0f} MB, " if need_bytes else ""
    return UserError(f"no space left on {path.parent} (or the file-size limit was reached) while writing "
                     f"{path.name}: {need}{free / 2**20:.0f} MB free; nothing was written to {path.name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.
    A full disk (or file-size limit) becomes a UserError naming the directory; ``need_bytes``
    (an estimate of the file's size) goes into that message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}.",
                               suffix=suffix or (path.suffix or ".tmp"), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        if _disk_full(exc):
            raise disk_full_error(path, need_bytes or _size(tmp_path)) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size or None
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in ``directory`` by writers that no longer run (killed with -9)."""
    d = Path(directory)
    removed = []
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        m = _TMP_RE.match(f.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


@contextlib.contextmanager
def exclusive_lock(lock_file: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` for the block; a second holder is refused at once
    with the first one's PID. The lock dies with its process (kill -9 included)."""
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_file, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise UserError(f"{what} is in use by another process (PID {holder}); wait for it to end or stop it "
                        f"(lock: {lock_file})") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha1_of(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
