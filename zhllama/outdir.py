"""Self-describing output directories, written atomically.

Every command writes its results through :func:`atomic_output_dir`: files go to a temporary
sibling (``.NAME.tmp-HOST-PID``) that is renamed to ``NAME`` only when the command succeeds, so
an interrupted or failed run never leaves a directory that looks finished. A run killed outright
(``kill -9``, a lost node) cannot clean up after itself; the next command writing the same
output does it (:func:`clean_stale_siblings`): it removes the dead run's temporary sibling and,
if the kill fell between the two renames of an ``--overwrite``, puts the previous results back.
What each directory says about itself (``zhllama.json``) is :mod:`zhllama.provenance`.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from zhllama.errors import ZhllamaError


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def temporary_sibling(target: str | Path, kind: str = "tmp") -> Path:
    """``.NAME.KIND-HOST-PID`` beside ``target``: where a run builds ``target`` before renaming it.

    The host and process id let a later run tell a dead run's leftovers (removed by
    :func:`clean_stale_siblings`) from a live one's, also on a filesystem shared by several nodes.
    """
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}"


def _owner_is_dead(sibling: Path, prefix: str) -> bool:
    host, _, pid = sibling.name[len(prefix) :].rpartition("-")
    if not pid.isdigit():
        return False
    if host and host != _host():
        return False  # another node's run: we cannot tell whether it is alive
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_siblings(target: str | Path) -> list[Path]:
    """Remove what killed runs left beside ``target``; return the paths removed or restored.

    A ``.NAME.tmp-*`` sibling of a dead process is an unfinished result: removed. A
    ``.NAME.old-*`` sibling is the previous result that an ``--overwrite`` was replacing: if
    ``target`` is missing the run died between its two renames, so the old result is moved
    back; otherwise the swap completed and only the removal of the old copy was lost.
    Siblings of live processes (or of other hosts) are left alone.
    """
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    touched = []
    for kind in ("old", "tmp"):
        prefix = f".{target.name}.{kind}-"
        for sibling in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            if not _owner_is_dead(sibling, prefix):
                continue
            if kind == "old" and not target.exists():
                sibling.rename(target)
            else:
                _remove(sibling)
            touched.append(sibling)
    return touched


def check_output_target(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when ``out`` cannot be written or already holds results."""
    out = Path(out).expanduser()
    clean_stale_siblings(out)
    if out.exists() and not out.is_dir():
        raise ZhllamaError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ZhllamaError(f"{out}: output directory exists and is not empty; pass --overwrite to replace it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZhllamaError(f"{out}: cannot create parent directory {parent}: {e.strerror or e}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZhllamaError(f"{out}: parent directory {parent} is not writable")
    return out


_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_reason(error: Exception) -> str | None:
    """The operating-system reason behind ``error`` ("No space left on device"), or None.

    Besides ``OSError`` this recognises the libraries that report a failed write in their own
    exception types: ``tokenizers`` and ``safetensors`` (Rust I/O errors, "... (os error 28)")
    and ``torch.save`` ("PytorchStreamWriter failed writing file ...").
    """
    if isinstance(error, OSError):
        return error.strerror or " ".join(str(error).split()) or type(error).__name__
    text = " ".join(str(error).split())
    found = _RUST_IO_ERROR.search(text)
    if found:
        return os.strerror(int(found.group(1)))
    if isinstance(error, RuntimeError) and ("PytorchStreamWriter failed" in text or "file write failed" in text):
        return f"write failed ({text[:200]})"
    return None


@contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` only if the block succeeds.

    On any exception the temporary directory is removed and ``out`` is left as it was; an
    ``OSError`` (a full disk, a read-only file system) becomes a one-line :class:`ZhllamaError`
    naming ``out``. With ``overwrite`` an existing ``out`` is replaced at the very end, never
    before the new results are complete.
    """
    out = check_output_target(out, overwrite)
    final = out.resolve()
    tmp = temporary_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        raise ZhllamaError(f"{out}: cannot create output directory: {e.strerror or e}") from e
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os_error_reason(e) if isinstance(e, Exception) else None
        if reason is None:
            raise
        # e.g. a full disk: a failed write() carries no file name, so say which output it was
        name = getattr(e, "filename", None)
        name = None if name is None else str(name).replace(str(tmp), str(final))
        where = f"{name}: " if name is not None and name != str(final) else ""
        raise ZhllamaError(f"{out}: {where}{reason} (nothing was written)") from e
    if final.exists():
        old = temporary_sibling(final, "old")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


@contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces the file ``path`` only if the block succeeds.

    For single-file outputs (a JSON report, a GGUF file): a reader never sees half a file, an
    error removes the temporary file (an ``OSError`` becomes a one-line :class:`ZhllamaError`
    naming ``path``), and a killed run's leftover is removed by the next run.
    """
    path = Path(path).expanduser()
    clean_stale_siblings(path)
    if path.is_dir():
        raise ZhllamaError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZhllamaError(f"{path}: cannot create parent directory {path.parent}: {e.strerror or e}") from e
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        reason = os_error_reason(e) if isinstance(e, Exception) else None
        if reason is None:
            raise
        raise ZhllamaError(f"{path}: {reason} (nothing was written)") from e


def copy_files(names: Iterator[str] | list[str], source: str | Path, dest: str | Path) -> list[str]:
    """Copy the named files that exist in ``source`` into ``dest``; return the names copied."""
    copied = []
    for name in names:
        src = Path(source) / name
        if src.is_file():
            shutil.copy2(src, Path(dest) / name)
            copied.append(name)
    return copied
