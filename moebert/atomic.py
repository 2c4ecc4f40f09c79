"""Writes that appear whole or not at all: every folder and file the project writes goes through here.

A folder (a saved model, a checkpoint, stored stem states, an ONNX export, evaluation results) is written in full
under a temporary name beside its final place and then swapped in: the folder already there is renamed aside
(`.old-NAME`), the new one renamed in (`.tmp-NAME` -> `NAME`), the old one deleted. A kill between the two renames
leaves both complete folders and no `NAME`; `recover_folder` (run before each swap and when training starts) puts
the new one in place. So `NAME` is only ever the complete old folder or the complete new one. A file (an index's
chunk, its manifest) is written beside itself and renamed over the old one.
"""

import contextlib
import os
import shutil
from pathlib import Path


def temporary_folder(final: Path) -> Path:
    """Where the new content of `final` is written before the swap: one name, so that several processes (a
    checkpoint's random states) write into the same folder."""
    return final.with_name(f".tmp-{final.name}")


@contextlib.contextmanager
def writing_folder(final: Path):
    """Yields an empty temporary folder beside `final`; when the block ends without error it becomes `final` in one
    swap, replacing what was there. On any error, what was written is removed and `final` is left as it was."""
    final = Path(final)
    recover_folder(final)  # before the temporary folder is reused
    tmp = temporary_folder(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)


def replace_folder(new: Path, final: Path):
    """Move the complete folder `new` to `final`, replacing a folder already there (see the module docstring)."""
    recover_folder(final)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: Path) -> bool:
    """Finish a folder swap that a kill cut between its two renames; returns whether there was one to finish."""
    final = Path(final)
    old, new = final.with_name(f".old-{final.name}"), temporary_folder(final)
    if final.exists() or not old.exists():
        return False
    os.replace(new if new.exists() else old, final)  # `new` was complete before `old` was moved aside
    shutil.rmtree(old, ignore_errors=True)
    return True


def write_file(path: Path, text: str):
    """Write a whole text file under a temporary name beside it, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def writing_file(path: Path):
    """Yields a temporary path beside `path` for a writer that wants a file name (numpy, FAISS); renamed over `path`
    when the block ends without error, removed otherwise."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
