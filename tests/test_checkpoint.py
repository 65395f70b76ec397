"""Model directories: bit-exact round trip, atomic writes, and clear errors for damaged files."""
import json
import os

import numpy as np
import pytest

from ref_bert import Config, Model
from ref_bert import checkpoint, files
from ref_bert.checkpoint import load_model, save_model


def test_round_trip_is_bit_identical(tmp_path):
    model = Model(Config.preset("tiny", num_hidden_layers=3, sharing="ffn"), dtype="float64", seed=4)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config and loaded.dtype == np.float64
    assert np.array_equal(loaded.params.flat, model.params.flat)
    as32 = load_model(tmp_path, dtype="float32")
    assert as32.dtype == np.float32


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    save_model(Model("tiny"), tmp_path)
    path = tmp_path / checkpoint.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        load_model(tmp_path)


def test_hostile_header_is_rejected_without_executing_anything(tmp_path):
    save_model(Model("tiny"), tmp_path)
    # a pickle payload where the safetensors header should be: it must be refused, never unpickled
    (tmp_path / checkpoint.WEIGHTS_NAME).write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." * 3)
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        load_model(tmp_path)


def test_weights_of_another_config_are_refused(tmp_path):
    save_model(Model("tiny"), tmp_path)
    other = Config.preset("tiny", num_hidden_layers=3, sharing="none")
    (tmp_path / checkpoint.CONFIG_NAME).write_text(other.to_json())
    with pytest.raises(ValueError, match="parameter names do not match the config"):
        load_model(tmp_path)
    wider = Config.preset("tiny", intermediate_size=96)
    (tmp_path / checkpoint.CONFIG_NAME).write_text(wider.to_json())
    with pytest.raises(ValueError, match=r"has shape \(64, 128\), expected \(64, 96\)"):
        load_model(tmp_path)


def test_bad_config_json(tmp_path):
    save_model(Model("tiny"), tmp_path)
    (tmp_path / checkpoint.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_model(tmp_path)
    (tmp_path / checkpoint.CONFIG_NAME).write_text(json.dumps({"hidden_size": 10, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="hidden_size=10"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path / "missing")


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    files.atomic_write_bytes(target, b"old contents")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_every_kind_of_model_directory_loads_and_is_named(tmp_path):
    from ref_bert.checkpoint import HF_DIRECTORY, REF_BERT_DIRECTORY, directory_kind, load_any, load_config_any

    model = Model(Config.preset("tiny"), dtype="float64", seed=3)
    save_model(model, tmp_path / "ours")
    model.save_hf(tmp_path / "hf")
    for name, kind in (("ours", REF_BERT_DIRECTORY), ("hf", HF_DIRECTORY)):
        assert directory_kind(tmp_path / name) == kind
        loaded, found = load_any(tmp_path / name, dtype="float64")
        assert found == kind
        for key, value in model.named_parameters():
            assert np.array_equal(loaded.state_dict()[key], value), (name, key)
        config, found = load_config_any(tmp_path / name)
        assert found == kind and config.hidden_size == model.config.hidden_size
    with pytest.raises(ValueError, match="is not a directory"):
        directory_kind(tmp_path / "ours" / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config.json \(found \[\]\)"):
        directory_kind(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"hidden": 3}')
    with pytest.raises(ValueError, match="neither a ref-bert config"):
        directory_kind(tmp_path / "other")
