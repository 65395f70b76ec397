"""Files, written so that nothing is ever half there: atomic writes, JSON, safetensors, directories.

Every file is written atomically: to a temporary file in the same directory, flushed and fsynced,
then ``os.replace``-d over the target, so a crash leaves either the old file or the new one, never half
of one. Whole directories (a training checkpoint: several files that only make sense together) are
written the same way one level up: :func:`publish_directory` fills a hidden temporary directory next to
the target and renames it into place when every file is complete; :func:`write_pointer` /
:func:`read_pointer` keep a small file naming the newest complete one.

Tensors are stored as safetensors: raw arrays and a JSON header, nothing executable, so reading a file
from anywhere cannot run code (unlike pickle). Every reader here turns a missing or damaged file into
a ``ValueError`` naming the file.

This module knows nothing of models: ``checkpoint`` (model directories) and ``hf`` (Hugging Face
directories) are built on it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_directory(path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path, obj) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def parse_json(text, where: str):
    """Parse JSON ``text`` (str or bytes); invalid JSON is a ValueError naming ``where``."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e


def read_json(path, what: str = "JSON file"):
    """Parse a JSON file; a missing or unparsable file is a ValueError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e
    return parse_json(text, f"{what} {path}")


STAGING_SUFFIXES = (".tmp", ".old")


def publish_directory(final, write) -> Path:
    """Create directory ``final`` atomically: ``write(tmp)`` fills a hidden sibling ``.NAME.*.tmp``,
    which is fsynced and renamed to ``final`` only when ``write`` returns. Until then ``final`` is
    untouched; if ``write`` raises (KeyboardInterrupt included) the temporary directory is removed.

    An existing ``final`` is first renamed aside (``.NAME.*.old``) and deleted after the new one is
    in place, so ``final`` names a complete directory at every moment except between two renames.
    Leftovers of a killed process are hidden names that :func:`remove_staging` deletes.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    try:
        write(tmp)
        for entry in tmp.iterdir():  # atomic_write_bytes already fsynced each file's data
            if entry.is_dir():
                fsync_directory(entry)
        fsync_directory(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        fsync_directory(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_staging(parent) -> list:
    """Delete the hidden temporary directories :func:`publish_directory` leaves behind when a process
    is killed mid-write (names ``.*.tmp`` and ``.*.old``). Returns the paths removed."""
    parent = Path(parent)
    removed = []
    if parent.is_dir():
        for entry in parent.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(STAGING_SUFFIXES) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def write_pointer(path, target) -> None:
    """Atomically write a one-line file naming ``target`` relative to the pointer's own directory."""
    path = Path(path)
    relative = os.path.relpath(Path(target), path.parent)
    atomic_write_bytes(path, (Path(relative).as_posix() + "\n").encode())


def read_pointer(path) -> Path:
    """The directory a :func:`write_pointer` file names; ValueError if the file or the directory is missing."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; expected a file naming a checkpoint directory")
    try:
        name = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file naming a checkpoint directory: {e}") from e
    if not name:
        raise ValueError(f"{path} is empty; expected the name of a checkpoint directory")
    target = path.parent / name
    if not target.is_dir():
        raise ValueError(f"{path} names {name!r}, but {target} is not a directory")
    return target


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Host NumPy arrays -> one safetensors file, atomically. Metadata values must be strings."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def load_tensors(path) -> tuple[dict, dict]:
    """Read a safetensors file into host NumPy arrays and its metadata; a damaged file is a ValueError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"checkpoint file {path} is corrupt or not a safetensors file: {e}") from e
    return tensors, metadata


def check_state(expected_shapes: dict, tensors: dict, where: str) -> None:
    """Every expected name present with the expected shape, and nothing else."""
    missing = [k for k in expected_shapes if k not in tensors]
    unexpected = [k for k in tensors if k not in expected_shapes]
    if missing or unexpected:
        raise ValueError(f"{where}: parameter names do not match the config "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    for k, shape in expected_shapes.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}")
