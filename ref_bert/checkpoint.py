"""Model directories: ``config.json`` (a :class:`Config`) plus ``model.safetensors`` (our parameter names).

safetensors holds raw tensors and a JSON header, nothing executable, so loading a file from anywhere
cannot run code (unlike pickle). Every file is written atomically: to a temporary file in the same
directory, flushed and fsynced, then ``os.replace``-d over the target, so a crash leaves either the
old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .config import Config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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


def save_model(model, directory) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    tensors = {k: model.backend.to_host(v) for k, v in model.params.items()}
    save_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "ref-bert", "dtype": model.dtype.name})
    atomic_write_bytes(directory / CONFIG_NAME, model.config.to_json().encode())
    return directory


def load_config(directory) -> Config:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}")
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_model(directory, backend=None, dtype=None):
    """Rebuild a :class:`Model` from :func:`save_model`'s directory. ``dtype`` defaults to the saved one."""
    from .model import Model

    directory = Path(directory)
    config = load_config(directory)
    tensors, metadata = load_tensors(directory / WEIGHTS_NAME)
    model = Model(config, backend=backend, dtype=dtype or metadata.get("dtype", "float32"))
    check_state(model.params.shapes, tensors, str(directory / WEIGHTS_NAME))
    for name, view in model.params.items():
        view[...] = model.backend.from_host(tensors[name], dtype=model.dtype)
    return model
