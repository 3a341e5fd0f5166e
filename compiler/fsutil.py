"""Writing output files: atomically (a reader never sees half a file), keeping the umask."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_all_atomically(files: dict[str, str]) -> None:
    """Write every file or none: each is staged in a temporary file next to it first, then all
    are moved into place; if a move fails, the files already moved get their old text back."""
    staged: list[tuple[Path, str]] = []
    try:
        for path, text in files.items():
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
            staged.append((p, tmp))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
        old = {p: p.read_text("utf-8") if p.exists() else None for p, _ in staged}
        moved: list[Path] = []
        try:
            for p, tmp in staged:
                os.replace(tmp, p)
                moved.append(p)
        except BaseException:
            for p in moved:
                before = old[p]
                if before is None:
                    p.unlink(missing_ok=True)
                else:
                    write_atomically(p, before)
            raise
    finally:
        for _, tmp in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
