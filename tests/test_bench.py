"""The benchmark harness (benchmarks/): its FLOP count, its torch LAMB, and one tiny run end to end.
Nothing here is timed against a limit: the harness is exercised, not the machine."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import backends
from benchmarks import bench
from ref_bert.cli import bench as bench_cli
from benchmarks.flops import forward_matmul_flops, step_flops
from ref_bert import Config
from ref_bert.optim import Lamb


def test_flop_count_by_hand():
    c = Config(vocab_size=100, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=32, inner_group_num=2)
    B, T, M = 2, 5, 3
    N, blocks = B * T, 3 * 2
    parts = forward_matmul_flops(c, B, T, M)
    assert parts["embedding projection"] == 2 * N * 8 * 16
    assert parts["attention q, k, v"] == blocks * 3 * 2 * N * 16 * 16
    assert parts["attention scores"] == parts["attention context"] == blocks * 2 * B * 2 * T * T * 8
    assert parts["attention output"] == blocks * 2 * N * 16 * 16
    assert parts["ffn"] == blocks * 2 * 2 * N * 16 * 32
    assert parts["pooler"] == 2 * B * 16 * 16 and parts["sop classifier"] == 2 * B * 16 * 2
    assert parts["mlm dense"] == 2 * M * 16 * 8 and parts["mlm decoder"] == 2 * M * 8 * 100
    totals = step_flops(c, B, T, M)
    assert totals["forward"] == sum(parts.values()) and totals["train_step"] == 3 * totals["forward"]
    # BERT: no projection
    assert forward_matmul_flops(Config.preset("bert-base"), 1, 4, 1)["embedding projection"] == 0


def test_albert_base_figure():
    """The quoted point: albert-base, batch 8, sequence 128, 19 labels per sequence."""
    f = step_flops(Config.preset("albert-base"), 8, 128, 8 * 19)
    assert round(f["train_step"] / 1e9, 1) == 540.6


@pytest.mark.parametrize("bad", [dict(batch=0), dict(seq=-1), dict(mlm_rows=11)])
def test_flop_count_rejects_bad_sizes(bad):
    args = {"batch": 2, "seq": 5, "mlm_rows": 3, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        forward_matmul_flops(Config.preset("tiny"), **args)


def test_torch_lamb_matches_ours():
    """TorchAlbertLamb (the torch side of the benchmark) is Lamb.from_preset("albert"), step for step."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"encoder.dense.weight": (6, 5), "encoder.dense.bias": (5,), "encoder.LayerNorm.weight": (5,),
              "zero.weight": (3, 3)}
    params = {n: rng.standard_normal(s) * (n != "zero.weight") for n, s in shapes.items()}
    ours = {n: p.copy() for n, p in params.items()}
    opt = Lamb.from_preset("albert", ours)
    theirs = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in params.items()}
    topt = bench.TorchAlbertLamb(theirs.items())
    for step in range(4):
        grads = {n: rng.standard_normal(s) * (3.0 if step == 1 else 0.1) for n, s in shapes.items()}  # clips once
        opt.step(grads)
        for n, p in theirs.items():
            p.grad = torch.from_numpy(grads[n].copy())
        topt.step()
        for n in shapes:
            np.testing.assert_allclose(theirs[n].detach().numpy(), ours[n], rtol=1e-12, atol=1e-14, err_msg=n)


def test_batch_is_deterministic_and_valid():
    c = Config.preset("tiny")
    a, b = bench.make_batch(c, 3, 20, 0.15, 7), bench.make_batch(c, 3, 20, 0.15, 7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert ((a["mlm_labels"] != -100).sum(axis=1) == 3).all() and (a["mlm_labels"][:, 0] == -100).all()
    assert a["input_ids"].min() >= 5 and a["input_ids"].max() < c.vocab_size
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bench.make_batch(c, 1, c.max_position_embeddings + 1, 0.15, 0)


def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _main(*argv) -> int:
    """``ref-bert bench ARGV`` through the one command-line layer (its error reporting included)."""
    from ref_bert.cli import main

    return main(["bench", *argv])


def test_tiny_run_writes_json(tmp_path, capsys):
    systems = ["ref-bert", "torch"] if _has("torch") and _has("transformers") else ["ref-bert"]
    out = tmp_path / "bench.json"
    code = bench_cli.run(_args("--config", "tiny", "--batch-size", "2", "--seq-len", "16", "--warmup", "0", "--steps", "1",
                           "--peak-size", "128", "--peak-repeats", "1", "--threads", "1", "--systems", *systems,
                           "--json", str(out)))
    assert code == 0
    record = json.loads(out.read_text())
    assert record["peak"]["sgemm_gflops"] > 0 and record["machine"]["numpy"] == np.__version__
    assert [r["system"] for r in record["results"]] == systems
    for r in record["results"]:
        assert r["train_median_s"] > 0 and r["forward_median_s"] > 0 and r["train_peak_rss_mib"] > 0
        assert len(r["train_times_s"]) == 1 and r["train_gflop"] > r["forward_gflop"] > 0
    screen = capsys.readouterr().out
    assert "| tiny | ref-bert |" in screen and "sgemm peak" in screen
    # The default step is the loop's: two shards (one example each), whose weighted eval losses add up
    # to the whole batch's (float32: 1e-5 relative, the agreement of two orders of float32 sums).
    ours = record["results"][0]
    assert record["shards"] == ours["shards"] == 2
    assert ours["sharded_eval_loss"] == pytest.approx(ours["eval_loss"], rel=1e-5)
    if "torch" in systems:  # same weights and batch: the eval losses agree
        ours, theirs = record["results"]
        assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(backends.available("cupy"), reason="checks the message given where CuPy cannot run")
def test_cupy_backend_fails_clearly_without_a_gpu(capsys):
    assert _main("--backend", "cupy", "--config", "tiny") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --backend cupy cannot run here") and "cupy" in err.lower()


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
                                           (["--masked-fraction", "1.5"], "--masked-fraction"),
                                           (["--shards", "9"], "--shards"), (["--shards", "0"], "--shards")])
def test_bad_arguments_are_reported(argv, message, capsys):
    assert _main(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_registers_bench():
    from ref_bert.cli import COMMANDS

    assert COMMANDS["bench"][0] == "ref_bert.cli.bench"
    assert sys.modules["ref_bert.cli.bench"] is bench_cli
    assert not hasattr(bench, "add_arguments") and not hasattr(bench, "run")  # the library has no command line
