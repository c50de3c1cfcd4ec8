"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Everything is written under a temporary name in the destination's own folder (same file system) and renamed
onto the destination with `os.replace`; on any error the temporary file or folder is removed and the
destination is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

FILE_MODE = 0o644  # mkstemp / mkdtemp create 0600 / 0700
FOLDER_MODE = 0o755


def make_folder(folder: str | os.PathLike) -> Path:
    """`folder` and its parents, created if missing; NotADirectoryError naming the culprit when a file
    stands where a folder is needed (an output path under a file)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise NotADirectoryError(f"{folder}: cannot create this folder: {blocker} is a file") from None
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file next to `path`, then rename it onto `path`; return `path`.

    `write` gets the temporary file's path (it exists, empty: writers must overwrite it) and may use any
    library's writer (`HDUList.writeto(tmp, overwrite=True)`, `Figure.savefig(tmp, format="png")`, ...).
    """
    path = Path(path)
    make_folder(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return `path`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: object, indent: int = 2, **dumps_kwargs: object) -> Path:
    """Write `data` as JSON (`json.dumps(data, indent=indent, **dumps_kwargs)` + newline) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")


@contextlib.contextmanager
def replaced_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder next to `folder` to write into; on success it replaces `folder` at once (the old
    `folder` is deleted afterwards), on error it is deleted and `folder` stays as it was."""
    folder = Path(folder)
    make_folder(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, FOLDER_MODE)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Rename `tmp` to `folder`, moving an existing `folder` aside first (and back if the rename fails)."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        os.replace(folder, old / folder.name)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            os.replace(old / folder.name, folder)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
