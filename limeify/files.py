"""Writing directories atomically: build the new content beside the target, then rename it in.

A failure at any point (an exception, a signal turned into one, a full disk) leaves the target
as it was: absent, or the previous version, complete. Only a hard kill in the instant between
the two renames of a replacement leaves the previous version under a hidden name beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask, read without changing it where Linux allows (umask() sets it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_directory(new: Path, dst: Path) -> None:
    """Put directory ``new`` at ``dst``, replacing a directory there."""
    if not dst.exists():
        os.replace(new, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.limeify-old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, keep: bool = True) -> Iterator[Path]:
    """Yield a staging directory beside ``dst``; on success it replaces ``dst``.

    ``keep``: the staging directory starts with copies of ``dst``'s files (what the writer
    does not overwrite stays), else empty (``dst`` is replaced as a whole).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.limeify-", dir=dst.parent))
    try:
        # mkdtemp makes it private (0700); the result is an ordinary directory, so the umask decides.
        tmp.chmod(0o777 & ~umask())
        if keep and dst.is_dir():
            shutil.copytree(dst, tmp, dirs_exist_ok=True)  # copies, not links: writers may overwrite them
        yield tmp
        replace_directory(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
