"""Files and folders that are either whole or absent: a crash mid-write never leaves one that looks complete.

Also the one check of an output folder before any work starts (`check_output_folder`, `check_writable`): a file
in the way, a place that cannot be written, or a non-empty folder without overwrite is one line, not a
traceback after minutes of loading, and never a folder posttrain did not write deleted.

Every file and folder posttrain writes gets the mode a plain open()/mkdir() gives it (0o666/0o777 less the
umask), like config.json beside it: see give_default_modes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from posttrain.errors import PosttrainError


def _umask() -> int:
    """The process umask. Linux reports it in /proc; os.umask can only read it by setting another, which for
    that moment gives any file another thread creates the wrong mode, so it is the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The mode open() (or mkdir()) gives a new file (folder): 0o666 (0o777) less the umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def give_default_modes(folder: str | Path) -> None:
    """Give every file under folder the mode a plain open() gives it (default_mode). safetensors >= 0.8 writes
    each file through a temporary file created 0600 and renames it into place (safetensors issue #782), so
    model.safetensors would be unreadable to anyone else meant to load it, beside a 0644 config.json. Called on
    the staging folders posttrain fills, before they are moved into place: files posttrain wrote, and no others."""
    mode = default_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a staging folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(default_mode(folder=True))  # mkdtemp makes it 0700; renamed into place, it is the output folder
    try:
        yield staging
        give_default_modes(staging)
        if target.exists():  # move the old one aside in one rename, so target is never half-deleted
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            shutil.rmtree(old)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable(path: str | Path, name: str) -> Path:
    """`path` can become a folder posttrain writes: nothing but folders above it, and its nearest existing
    ancestor takes a new file. `name` is how the user gave it (`output_dir`, `--out`). Returns it, expanded.

    The probe creates and removes a real file: os.access answers yes to root for read-only mounts and for
    /proc, where creating anything fails."""
    try:
        path = Path(path).expanduser()
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a name too long, ~unknown_user ...
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)[:200]
        raise PosttrainError(f"{name} {str(path)[:200]!r}: not a usable path ({why})") from None
    if blocking is not None:
        where = "" if blocking == path else f" ({blocking} is a file)"
        raise PosttrainError(f"{name} {path}: a file is in the way{where}; choose a folder path")
    if existing is None:  # only a relative path from a current folder that was deleted
        raise PosttrainError(f"{name} {path}: no folder above it exists (was the current folder deleted?)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".posttrain-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise PosttrainError(f"{name} {path} cannot be written (creating a file in {existing} fails: {why}); "
                             "choose a folder you can write") from None
    return path


def check_output_folder(path: str | Path, name: str, overwrite: bool = False) -> Path:
    """An output folder for a verb that replaces it whole (init-tiny, quantize, merge, export): writable
    (check_writable) and empty or absent; with `overwrite`, a non-empty one only when it holds a model or a
    posttrain output, so that --overwrite given by mistake never deletes a project, a home folder or a checkout."""
    path = check_writable(path, name)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise PosttrainError(f"{name} {path} is not empty; choose another folder or pass --overwrite")
        refusal = _not_replaceable(path)
        if refusal:
            raise PosttrainError(f"{name} {path}: --overwrite replaces only a folder that holds a model or a "
                                 f"posttrain output, and {refusal}; choose another folder")
    return path


REPLACEABLE_MARKERS = ("config.json", "adapter_config.json", "posttrain.yaml", "quantize.json")


def _not_replaceable(path: Path) -> str | None:
    """Why a non-empty folder must not be replaced, or None."""
    here = path.resolve()
    cwd = Path.cwd().resolve()
    if here in (cwd, *cwd.parents) or here == Path.home().resolve():
        return "this is the current folder, a folder above it, or the home folder"
    if (here / ".git").exists():
        return "this one holds a git checkout"
    if not any((here / marker).is_file() for marker in REPLACEABLE_MARKERS):
        return f"this one holds none ({', '.join(REPLACEABLE_MARKERS)})"
    return None
