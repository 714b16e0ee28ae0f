"""Files: atomic writing (nothing half-written is ever left behind), output checks before work, clear reads.

Everything written gets the permissions the user's umask gives a new file or
folder (``0o666 & ~umask``, ``0o777 & ~umask``), as ``open``/``mkdir`` would;
the temporary files and folders behind atomic writes are created private
(0600/0700) and widened to that before they are renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError, OutputError

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def check_output_location(path: Any, overwrite: bool = False, what: str = "output folder") -> Path:
    """Refuse, before any work, an output folder that could not be written at the end of a run.

    Checks: a name that is a folder name (not '', '.', '..' or a root); no existing file in its
    place; every existing ancestor a folder; write permission where the folder (and the temporary
    sibling an atomic write needs) will be created; for ``overwrite``, permission to remove the old one.
    Raises :class:`OutputError`; returns the path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise OutputError(f"the {what} must be a path; got {type(path).__name__} {path!r}.")
    raw = os.fspath(path)
    p = Path(raw).expanduser()
    if not str(raw).strip() or p.name in ("", ".", "..") or p == Path(p.anchor):
        raise OutputError(f"the {what} {str(raw)!r} does not name a folder; give a new folder's name, e.g. "
                          "'hydra_report/'.")
    if p.exists() and not p.is_dir():
        raise OutputError(f"the {what} {str(raw)!r} is an existing file; give a folder name (or remove the file).")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise OutputError(f"the {what} {str(raw)!r} cannot be created: {str(anc)!r} is a file, not a folder; "
                          "choose another location.")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"the {what} {str(raw)!r} cannot be written: no write permission in {str(anc)!r}; "
                          "choose a folder you can write to.")
    if p.exists() and overwrite and not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"the {what} {str(raw)!r} cannot be overwritten: no write permission in it; choose "
                          "another folder.")
    return p


def read_text(path: Any, error: type[InputError] = InputError, what: str = "file") -> str:
    """The UTF-8 text of ``path``, or ``error`` naming the file (and, for bad bytes, the line)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {str(p)!r} does not exist.") from None
    except IsADirectoryError:
        raise error(f"{what} {str(p)!r} is a folder, not a file.") from None
    except PermissionError:
        raise error(f"{what} {str(p)!r} cannot be read (permission denied).") from None
    except OSError as e:
        raise error(f"{what} {str(p)!r} cannot be read ({e.strerror or e}).") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the {what} as UTF-8.") from None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt (so atomic writes clean up) when nothing else handles it.

    Only in the main thread, and only while SIGTERM has its default action; the previous handler is restored.
    """
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM") \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _widen(path: Path, folder: bool) -> None:
    """Give a private temporary file or folder the permissions the umask gives a new one."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())
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
        with sigterm_as_interrupt():
            _widen(tmp, folder=True)
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

    check_output_location(folder, overwrite)
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
