"""Model directories: ``config.json`` (a :class:`Config`) plus ``model.safetensors`` (our parameter names).

Written and read through :mod:`ref_bert.files` (atomic writes, safetensors only, nothing unpickled).
``ref-bert pretrain`` makes its output directory and every checkpoint directory a model directory, so
:func:`load_model` opens any of them. :func:`load_any` opens either kind of model directory: ours, or
a Hugging Face one (transformers' own, or what ``Model.save_hf`` writes), and says which it found.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config
from .files import (atomic_write_bytes, check_finite, check_float_tensors, check_shapes, check_state, load_tensors,
                    read_json, read_safetensors_header, save_tensors)
from .hf import ARCHITECTURES, config_from_hf, transformer_directory
from .model import DTYPES, Model
from .params import parameter_shapes
from .tokenization import Tokenizer, check_vocab_size, find_tokenizer

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
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise ValueError(f"model config {path} holds a JSON {type(raw).__name__}, expected an object of Config fields")
    try:
        return Config.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"model config {path}: {e}") from e


def read_weights(path, expected_shapes: dict, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """A model's weights from a safetensors file, checked before anything is allocated for a model:
    names and shapes against ``expected_shapes`` (read from the header alone, so a config that claims
    more than the file holds fails before any big allocation), floating-point dtypes, and finite
    values unless ``allow_nonfinite``. Returns ``(tensors, metadata)``."""
    entries, _, _ = read_safetensors_header(path)
    check_shapes(expected_shapes, {name: shape for name, (_, shape, _) in entries.items()}, str(path))
    tensors, metadata = load_tensors(path)
    check_float_tensors(tensors, str(path))
    if not allow_nonfinite:
        check_finite(tensors, str(path))
    return tensors, metadata


def _as_path(value, what: str) -> Path:
    if not isinstance(value, (str, Path)) or str(value) == "":
        raise ValueError(f"{what}={value!r:.60} is invalid: expected the path of a model directory")
    return Path(value)


def load_model(directory, backend=None, dtype=None, tokenizer="auto", allow_nonfinite: bool = False):
    """Rebuild a :class:`Model` from :func:`save_model`'s directory. ``dtype`` defaults to the saved one.
    Every check (config, tensor names, shapes, dtypes, finite values unless ``allow_nonfinite``) runs
    before the model is allocated. ``tokenizer``: "auto" makes the directory's tokenizer, when it has one
    (a pretraining run's ``spiece.model``), ``model.tokenizer`` (:func:`run_tokenizer`); True requires
    one; False skips it."""
    if tokenizer not in ("auto", True, False):
        raise ValueError(f"tokenizer={tokenizer!r} is invalid: expected 'auto', True or False")
    directory = _as_path(directory, "directory")
    config = load_config(directory)
    tensors, metadata = read_weights(directory / WEIGHTS_NAME, parameter_shapes(config, heads=True), allow_nonfinite)
    saved_dtype = metadata.get("dtype", "float32")
    if dtype is None and saved_dtype not in DTYPES:
        raise ValueError(f"{directory / WEIGHTS_NAME}: metadata dtype={saved_dtype!r} is invalid; expected one of {DTYPES}")
    found = None
    if tokenizer is True:
        found = Tokenizer.from_hf(directory)     # a ValueError naming the files looked for when there is none
    elif tokenizer == "auto":
        found = run_tokenizer(directory)
    if found is not None:
        check_vocab_size(found, config.vocab_size, str(directory))
    model = Model(config, backend=backend, dtype=dtype or saved_dtype)
    _assign(model, tensors, directory / WEIGHTS_NAME)
    model.tokenizer = found
    return model


def run_tokenizer(directory):
    """The tokenizer of a ref-bert model directory (:meth:`ref_bert.Tokenizer.from_hf`: a pretraining run's
    ``spiece.model``, with its settings file when the run had non-default ones), or None."""
    return find_tokenizer(directory)


def load_weights(model, directory, allow_nonfinite: bool = False) -> dict:
    """Overwrite ``model``'s parameters with ``directory/model.safetensors`` (checked name by name, shape
    by shape, dtype and finiteness before anything is written). Returns the file's metadata."""
    path = Path(directory) / WEIGHTS_NAME
    tensors, metadata = read_weights(path, model.params.shapes, allow_nonfinite)
    _assign(model, tensors, path)
    return metadata


def _assign(model, tensors: dict, path) -> None:
    check_state(model.params.shapes, tensors, str(path))
    for name, view in model.params.items():
        view[...] = model.backend.from_host(tensors[name], dtype=model.dtype)


# --- every kind of model directory ---------------------------------------------------------------
REF_BERT_DIRECTORY = "ref-bert"          # config.json of Config fields + model.safetensors under our names
HF_DIRECTORY = "hugging-face"            # a transformers directory, or what Model.save_hf writes
DIRECTORY_KINDS = (REF_BERT_DIRECTORY, HF_DIRECTORY)
_DESCRIPTIONS = {REF_BERT_DIRECTORY: "a ref-bert model directory (config.json + model.safetensors, our names)",
                 HF_DIRECTORY: "a Hugging Face model directory (config.json with model_type; transformers' names)"}


def directory_kind(path) -> str:
    """Which kind of model directory ``path`` is: :data:`REF_BERT_DIRECTORY` (what :func:`save_model`
    and ``ref-bert pretrain`` write: a config.json whose keys are all :class:`Config` fields) or
    :data:`HF_DIRECTORY` (transformers' ``save_pretrained`` or ``Model.save_hf``: a config.json with a
    ``model_type`` and keys Config does not have). Anything else is a ValueError saying what was found."""
    path = _as_path(path, "path")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; expected a model directory: ref-bert's (config.json + "
                         f"model.safetensors) or a Hugging Face one")
    path = transformer_directory(path)       # a sentence-transformers directory: its transformer module
    if not (path / CONFIG_NAME).is_file():
        present = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(f"{path} has no {CONFIG_NAME} (found {present}); expected a model directory: ref-bert's "
                         f"(config.json + model.safetensors) or a Hugging Face one")
    raw = read_json(path / CONFIG_NAME, "model config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path / CONFIG_NAME} holds a JSON {type(raw).__name__}, expected an object")
    fields = {f.name for f in dataclasses.fields(Config)}
    if set(raw) <= fields:
        return REF_BERT_DIRECTORY
    if "model_type" in raw:
        return HF_DIRECTORY
    unknown = sorted(set(raw) - fields)[:5]
    raise ValueError(f"{path / CONFIG_NAME} is neither a ref-bert config (it has keys {unknown} that Config does "
                     f"not) nor a Hugging Face ALBERT/BERT config (it has no model_type)")


def describe_kind(kind: str) -> str:
    """A phrase for messages: what a kind of directory is."""
    return _DESCRIPTIONS[kind]


def load_config_any(path) -> tuple[Config, str]:
    """The :class:`Config` of a model directory of either kind, and the kind."""
    kind = directory_kind(path)
    if kind == REF_BERT_DIRECTORY:
        return load_config(path), kind
    path = transformer_directory(path)
    raw = read_json(Path(path) / CONFIG_NAME, "model config")
    family = raw.get("model_type")
    if family not in ("albert", "bert"):
        raise ValueError(f"{Path(path) / CONFIG_NAME} has model_type={family!r}; expected 'albert' or 'bert'")
    archs = raw.get("architectures") or []
    head = next((ARCHITECTURES[a][1] for a in archs if a in ARCHITECTURES), "pretraining")   # the directory's head
    return config_from_hf(raw, family, name=str(raw.get("_name_or_path") or Path(path).name), head=head), kind


def load_any(path, backend=None, dtype=None, seed: int = 0, tokenizer="auto",
             allow_nonfinite: bool = False) -> tuple[Model, str]:
    """A :class:`Model` from a model directory of either kind, and the kind found. ``dtype`` None keeps a
    ref-bert directory's saved dtype and reads a Hugging Face one as float32. ``tokenizer`` as in
    :meth:`Model.from_hf`: "auto" attaches the directory's tokenizer when there is one, True requires it,
    False skips it. Non-finite weights are refused unless ``allow_nonfinite``."""
    kind = directory_kind(path)
    if kind != REF_BERT_DIRECTORY:
        return Model.from_hf(path, backend=backend, dtype=dtype or "float32", seed=seed, tokenizer=tokenizer,
                             allow_nonfinite=allow_nonfinite), kind
    return load_model(path, backend=backend, dtype=dtype, tokenizer=tokenizer, allow_nonfinite=allow_nonfinite), kind
