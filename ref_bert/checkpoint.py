"""Model directories: ``config.json`` (a :class:`Config`) plus ``model.safetensors`` (our parameter names).

Written and read through :mod:`ref_bert.files` (atomic writes, safetensors only, nothing unpickled).
``ref-bert pretrain`` makes its output directory and every checkpoint directory a model directory, so
:func:`load_model` opens any of them.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .files import atomic_write_bytes, check_state, load_tensors, read_json, save_tensors
from .model import Model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
    return Config.from_dict(read_json(path, "model config"))


def load_model(directory, backend=None, dtype=None):
    """Rebuild a :class:`Model` from :func:`save_model`'s directory. ``dtype`` defaults to the saved one."""
    directory = Path(directory)
    config = load_config(directory)
    tensors, metadata = load_tensors(directory / WEIGHTS_NAME)
    model = Model(config, backend=backend, dtype=dtype or metadata.get("dtype", "float32"))
    _assign(model, tensors, directory / WEIGHTS_NAME)
    return model


def load_weights(model, directory) -> dict:
    """Overwrite ``model``'s parameters with ``directory/model.safetensors`` (checked name by name and
    shape by shape before anything is written). Returns the file's metadata."""
    path = Path(directory) / WEIGHTS_NAME
    tensors, metadata = load_tensors(path)
    _assign(model, tensors, path)
    return metadata


def _assign(model, tensors: dict, path) -> None:
    check_state(model.params.shapes, tensors, str(path))
    for name, view in model.params.items():
        view[...] = model.backend.from_host(tensors[name], dtype=model.dtype)
