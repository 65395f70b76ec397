"""Golden files (ref_bert/golden.py) and the divergence report (ref_bert/verify.py)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from ref_bert import Config, Model
from ref_bert import golden, verify
from ref_bert.cli import COMMANDS, main
from ref_bert.cli import golden as golden_cli
from ref_bert.cli import verify as verify_cli
from ref_bert.optim import Lamb
from tests._models import perturbed_model

CONFIG = Config(vocab_size=50, embedding_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=24, max_position_embeddings=16, hidden_act="gelu_new", model_type="albert",
                ffn_output_dropout=False)


def randomised(config, dtype="float64", seed=1):
    return perturbed_model(config, dtype=dtype, seed=seed, std=0.3)


def clone(model, config):
    """A model with ``config`` and exactly ``model``'s parameters (how a buggy candidate is planted)."""
    other = Model(config, dtype=model.dtype.name)
    other.params.flat[...] = model.params.flat
    return other


def write(model, path, steps=1, seed=0):
    inputs = golden.make_inputs(model.config, batch=2, seq_len=8, seed=seed)
    golden.write_golden(path, model, inputs, steps=steps, seed=seed, source="test")
    return path


def cli(module, argv) -> int:
    """``ref-bert golden|verify ARGV`` through the one command-line layer (its error reporting included)."""
    name = {golden_cli: "golden", verify_cli: "verify"}[module]
    return main([name, *(str(a) for a in argv)])


def run_module(module, argv) -> int:
    """A subcommand module on its own: its parser and ``run`` (errors propagate as exceptions)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


def test_commands_are_registered():
    assert COMMANDS["golden"][0] == "ref_bert.cli.golden" and COMMANDS["verify"][0] == "ref_bert.cli.verify"
    for module in (golden_cli, verify_cli):
        assert callable(module.add_arguments) and callable(module.run)
    for module in (golden, verify):   # the library modules have no command line
        assert not hasattr(module, "add_arguments") and not hasattr(module, "run")


def test_verify_module_imports_no_heavy_dependency():
    import subprocess

    code = ("import sys, ref_bert.verify, ref_bert.golden, ref_bert.hf; "
            "bad = [m for m in ('torch', 'transformers', 'cupy') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_golden_file_is_complete_ordered_and_self_consistent(tmp_path):
    model = randomised(CONFIG)
    path = write(model, tmp_path / "g.safetensors", steps=2)
    tensors, meta = golden.read_golden(path)
    assert meta["format"] == "ref-bert-golden" and meta["format_version"] == "1"
    assert Config.from_dict(meta["config"]) == CONFIG.replace(name=meta["config"]["name"])
    assert (meta["dtype"], meta["steps"], meta["optimizer"]["optimizer"]) == ("float64", "2", "Lamb")
    assert meta["optimizer"]["preset"] == "albert" and meta["optimizer"]["max_grad_norm"] == 1.0

    names = list(tensors)
    sections = [n.split("/")[0] for n in names]
    assert sections == sorted(sections, key=golden.SECTIONS.index)  # sections in the documented order
    forward = [n[len("forward/"):] for n in names if n.startswith("forward/")]
    assert forward[:3] == ["embeddings.sum", "embeddings.layer_norm", "embeddings.output"]
    assert forward[3:6] == [f"encoder.layer.0.block.0.attention.{p}" for p in ("query", "key", "value")]
    assert forward[-4:] == ["mlm.dense", "mlm.activation", "mlm.layer_norm", "mlm_logits"]
    assert len(forward) == 3 + 2 * 11 + 3 + 4
    assert [n for n in names if n.startswith("params/")] == [f"params/{k}" for k in model.params.shapes]
    assert [n for n in names if n.startswith("grads/")] == [f"grads/{k}" for k in model.params.shapes]

    # the file agrees with a fresh run of the model it describes
    x = {k: tensors[f"inputs/{k}"] for k in golden.INPUT_NAMES}
    out = model.forward(x["input_ids"], x["token_type_ids"], x["attention_mask"], x["position_ids"])
    assert np.array_equal(out.mlm_logits, tensors["forward/mlm_logits"])
    assert np.array_equal(out.hidden_states[-1], tensors["forward/encoder.layer.1.block.0.ffn_output"])
    _result = model.loss_and_grads(x["input_ids"], x["token_type_ids"], x["attention_mask"], x["mlm_labels"],
                                       x["sop_labels"], x["position_ids"])
    loss, grads = _result.loss, _result.grads
    assert tensors["loss/total"] == loss == tensors["loss/mlm"] + tensors["loss/sop"]
    assert tensors["steps/loss"][0] == loss and tensors["steps/loss"][1] < loss
    for name in model.params.shapes:
        assert np.array_equal(tensors[f"grads/{name}"], grads[name])
        assert np.array_equal(tensors[f"params/{name}"], model.params[name])  # restored after the steps
    # K = 2 steps of ALBERT's LAMB on the same batch, replayed independently
    replay = clone(model, CONFIG)
    opt = Lamb.from_preset("albert", replay.state_dict())
    for _ in range(2):
        opt.step(replay.loss_and_grads(x["input_ids"], x["token_type_ids"], x["attention_mask"], x["mlm_labels"],
                                       x["sop_labels"], x["position_ids"]).grads)
    for name, view in replay.params.items():
        assert np.array_equal(tensors[f"after_steps/{name}"], view)
        assert not np.array_equal(view, model.params[name]) or "key.bias" in name  # every tensor moved

    # inputs: padded rows, pad id only at padded positions, labels only at real positions
    mask = x["attention_mask"].astype(bool)
    assert not mask.all() and (x["input_ids"][mask] != CONFIG.pad_token_id).all()
    assert (x["mlm_labels"][~mask] == -100).all() and (x["mlm_labels"] != -100).any()


def test_golden_cli_and_determinism(tmp_path, capsys):
    args = ["--config", "tiny", "--batch-size", 2, "--seq-len", 8, "--steps", 1, "--dtype", "float32"]
    assert main(["golden"] + [str(a) for a in args] + ["--out", str(tmp_path / "a.safetensors")]) == 0  # ref-bert golden
    assert run_module(golden_cli, args + ["--out", tmp_path / "b.safetensors"]) == 0
    assert "wrote" in capsys.readouterr().out
    a, meta = golden.read_golden(tmp_path / "a.safetensors")
    b, _ = golden.read_golden(tmp_path / "b.safetensors")
    assert meta["source"] == "preset:tiny" and meta["dtype"] == "float32"
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert a["forward/mlm_logits"].dtype == np.float32
    assert main(["verify", "--golden", str(tmp_path / "a.safetensors"), "--candidate", str(tmp_path / "b.safetensors")]) == 0
    assert "verify: OK" in capsys.readouterr().out


@pytest.mark.parametrize("bug, first", [
    # exact erf GELU where the config says gelu_new: the FFN pre-activation still matches, its output not
    (dict(hidden_act="gelu"), "forward/encoder.layer.0.block.0.ffn.activation"),
    # LayerNorm epsilon 1e-5 instead of 1e-12: the very first LayerNorm (embeddings) diverges
    (dict(layer_norm_eps=1e-5), "forward/embeddings.layer_norm"),
])
def test_planted_bug_is_named_as_the_first_divergence(bug, first, tmp_path, capsys):
    model = randomised(CONFIG)
    write(model, tmp_path / "golden.safetensors")
    write(clone(model, CONFIG.replace(**bug)), tmp_path / "candidate.safetensors")
    report = verify.verify_files(tmp_path / "golden.safetensors", tmp_path / "candidate.safetensors")
    assert report.first_failure.name == first
    rows = {r.name: r for r in report.rows}
    assert all(rows[n].ok for n in list(rows)[:list(rows).index(first)])  # everything before it matches
    assert rows["forward/mlm_logits"].max_rel > 1e-8 and not report.ok

    rc = cli(verify_cli, ["--golden", tmp_path / "golden.safetensors", "--candidate", tmp_path / "candidate.safetensors"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"{first}" in out.splitlines()[-1] and "first divergence" in out.splitlines()[-1]
    marked = [line for line in out.splitlines() if "<-- first divergence" in line]
    assert len(marked) == 1 and first in marked[0]


def test_float32_candidate_of_a_float32_golden_passes_and_a_bug_fails(tmp_path):
    model = randomised(CONFIG, dtype="float32")
    write(model, tmp_path / "golden.safetensors")
    # another correct implementation differs by rounding; emulate it by moving every parameter one ulp
    nudged = clone(model, CONFIG)
    nudged.params.flat[...] = np.nextafter(nudged.params.flat, np.float32(np.inf))
    write(nudged, tmp_path / "ulp.safetensors")
    assert verify.verify_files(tmp_path / "golden.safetensors", tmp_path / "ulp.safetensors").ok
    write(clone(model, CONFIG.replace(layer_norm_eps=1e-5)), tmp_path / "eps.safetensors")
    report = verify.verify_files(tmp_path / "golden.safetensors", tmp_path / "eps.safetensors")
    assert report.first_failure.name == "forward/embeddings.layer_norm"


def test_missing_and_misshapen_candidate_tensors(tmp_path):
    from ref_bert.files import load_tensors, save_tensors

    model = randomised(CONFIG)
    path = write(model, tmp_path / "golden.safetensors")
    tensors, metadata = load_tensors(path)
    order = json.loads(metadata["tensor_order"])
    drop = "forward/encoder.layer.1.block.0.attention.probs"
    tensors.pop(drop)
    metadata["tensor_order"] = json.dumps([n for n in order if n != drop])
    save_tensors(tmp_path / "partial.safetensors", tensors, metadata)
    report = verify.verify_files(path, tmp_path / "partial.safetensors")
    assert report.first_failure.name == drop and report.first_failure.status == "missing"
    assert verify.verify_files(path, tmp_path / "partial.safetensors", allow_missing=True).ok

    tensors["forward/pooled_output"] = tensors["forward/pooled_output"][:1]
    save_tensors(tmp_path / "shape.safetensors", tensors, metadata)
    report = verify.verify_files(path, tmp_path / "shape.safetensors", allow_missing=True)
    assert report.first_failure.name == "forward/pooled_output" and report.first_failure.status.startswith("shape")

    save_tensors(tmp_path / "plain.safetensors", {"x": np.zeros(2)}, {"format": "pt"})
    with pytest.raises(ValueError, match="not a ref-bert golden file"):
        golden.read_golden(tmp_path / "plain.safetensors")


def test_compare_rule():
    ref = {"grads/a": np.array([1.0, -2.0]), "grads/b": np.array([1e-17, -1e-17]),
           "forward/c": np.array([[0.5]]), "inputs/ids": np.array([1, 2])}
    same = verify.compare(ref, dict(ref), 1e-10, 1e-12)
    assert same.ok and all(r.max_abs == 0 for r in same.rows)
    # noise on an exactly-zero gradient passes by atol (relative to the largest gradient), ...
    noisy = dict(ref, **{"grads/b": np.array([3e-16, 0.0])})
    report = verify.compare(ref, noisy, 1e-10, 1e-12)
    assert report.ok and report.rows[1].status == "ok by atol" and report.rows[1].max_rel > 1
    # ... a real difference does not, NaN never passes, and integer inputs must be identical
    assert verify.compare(ref, dict(ref, **{"grads/a": np.array([1.0, -2.0 + 1e-9])}), 1e-10, 1e-12).first_failure.name == "grads/a"
    assert not verify.compare(ref, dict(ref, **{"forward/c": np.array([[np.nan]])}), 1e-10, 1e-12).ok
    assert verify.compare(ref, dict(ref, **{"inputs/ids": np.array([1, 3])}), 1e-10, 1e-12).first_failure.name == "inputs/ids"


def test_verify_usage_errors(tmp_path, capsys, monkeypatch):
    assert cli(verify_cli, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "give --hf DIR" in err
    with pytest.raises(ValueError, match="give --hf DIR"):   # the module raises; main reports
        run_module(verify_cli, [])
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    assert cli(verify_cli, ["--hf", tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs torch and transformers" in err


def test_verify_hf_end_to_end(tmp_path, capsys):
    from tests._hf_models import ALBERT_GROUPS, hf_model

    hf_model(ALBERT_GROUPS).save_pretrained(tmp_path)
    assert cli(verify_cli, ["--hf", tmp_path, "--batch-size", 2, "--seq-len", 8]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out.splitlines()[-1]
    # every activation of every block (L * K = 8), parameters, loss and gradients were compared
    assert "forward/encoder.layer.3.block.1.ffn.activation" in out and "grads/" in out and "loss/total" in out
    assert "not compared" not in out


def test_golden_from_hf_is_readable_without_ref_bert(tmp_path):
    """What a PyTorch test suite would do: safetensors + json + transformers only."""
    import torch
    import transformers
    from safetensors import safe_open

    from tests._hf_models import BERT, hf_model

    hf_model(BERT).save_pretrained(tmp_path / "hf")
    assert cli(golden_cli, ["--hf", tmp_path / "hf", "--out", tmp_path / "g.safetensors", "--seq-len", 8]) == 0

    with safe_open(str(tmp_path / "g.safetensors"), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    hf_config = json.loads(meta["hf_config"])
    names = json.loads(meta["hf_names"])
    config = getattr(transformers, hf_config.pop("model_type").capitalize() + "Config")(**hf_config)
    model = getattr(transformers, hf_config["architectures"][0])(config).double().eval()
    state = {hf: (t[f"params/{ours}"].T if transposed else t[f"params/{ours}"]) for ours, (hf, transposed) in names.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("decoder" in k for k in missing)  # the tied decoder
    model.tie_weights()
    out = model(input_ids=t["inputs/input_ids"], token_type_ids=t["inputs/token_type_ids"],
                attention_mask=t["inputs/attention_mask"], position_ids=t["inputs/position_ids"],
                labels=t["inputs/mlm_labels"], next_sentence_label=t["inputs/sop_labels"])
    assert torch.allclose(out.prediction_logits, t["forward/mlm_logits"], rtol=0, atol=1e-12)
    assert abs(out.loss.item() - t["loss/total"].item()) < 1e-12
    out.loss.backward()
    for ours, (hf, transposed) in names.items():
        g = t[f"grads/{ours}"].T if transposed else t[f"grads/{ours}"]
        p = dict(model.named_parameters())[hf]
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12), hf
