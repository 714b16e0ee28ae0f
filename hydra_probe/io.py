"""Atomic file and folder writing: nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_folder(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on error it is removed.

    A refused or failed run leaves no ``path`` behind (and an existing one untouched).
    Overwriting swaps the folders atomically where the OS can (Linux); elsewhere
    the old folder is moved aside to ``.NAME.old`` for the instant before the
    new one is renamed into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(path)
        if _exchange(tmp, path):          # path now holds the new run, tmp the old one
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_folder(folder: Path | str, overwrite: bool) -> Path:
    """Refuse an output location that cannot be written safely, before any computation.

    Raises :class:`~hydra_probe.errors.OutputError` when ``folder`` is a file, a
    non-empty folder without ``overwrite``, or under a folder we cannot write to.
    Returns ``folder`` as a Path.
    """
    from .errors import OutputError

    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise OutputError(f"the output path {str(p)!r} is a file; choose a folder (e.g. --out hydra_report/).")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputError(f"the output folder {str(p)!r} exists and is not empty; pass --overwrite "
                          "(overwrite=True) to replace it, or choose another folder.")
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {str(parent)!r} (permission denied); choose another --out folder.")
    return p
