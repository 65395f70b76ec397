"""NumPy and CuPy agree: the same seed gives the same weights bit for bit (they are drawn on the host),
and the same activations, losses and gradients up to rounding (different BLAS / reduction order).

Runs only where CuPy and a GPU are available (``backends.available("cupy")``); it is skipped elsewhere.
The comparison rule and tolerances are ref-bert verify's (ref_bert/verify.py): per tensor,
max|cupy - numpy| <= rtol * max|numpy| + atol * (largest value of its section), with
(rtol, atol) = (1e-5, 1e-6) in float32 and (1e-10, 1e-12) in float64.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import backends
from ref_bert import Config, Model
from ref_bert.golden import make_inputs
from ref_bert.verify import compare, format_report, tolerances

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not backends.available("cupy"), reason="needs CuPy and a visible GPU"),
]

CONFIGS = {
    "albert_groups": Config(vocab_size=97, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                            num_hidden_groups=2, inner_group_num=2, num_attention_heads=4, intermediate_size=48,
                            max_position_embeddings=32, hidden_act="gelu_new", hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.1, model_type="albert"),
    "bert": Config(vocab_size=97, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=32, hidden_act="gelu", sharing="none",
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, model_type="bert"),
}


def run_on(backend: str, config: Config, dtype: str, training: bool) -> "OrderedDict[str, np.ndarray]":
    """Parameters, every traced activation, the losses and every gradient, as host arrays."""
    model = Model(config, backend=backend, dtype=dtype, seed=0)
    bk = model.backend
    x = {k: bk.from_host(v) for k, v in make_inputs(config, batch=3, seq_len=12, seed=0).items()}
    out: OrderedDict = OrderedDict((f"params/{k}", bk.to_host(v).copy()) for k, v in model.params.items())
    args = (x["input_ids"], x["token_type_ids"], x["attention_mask"])
    model.forward(*args, position_ids=x["position_ids"], training=training, dropout_seed=7,
                  trace=lambda name, a: out.__setitem__(f"forward/{name}", bk.to_host(a).copy()))
    _result = model.loss_and_grads(*args, x["mlm_labels"], x["sop_labels"], x["position_ids"],
                                              training=training, dropout_seed=7)
    loss, grads, parts = _result.loss, _result.grads, _result.parts
    for name, value in (("total", loss), ("mlm", parts["mlm"]), ("sop", parts["sop"])):
        out[f"loss/{name}"] = bk.to_host(value).copy()
    for name, g in grads.items():
        out[f"grads/{name}"] = bk.to_host(g).copy()
    return out


@pytest.mark.parametrize("training", [False, True], ids=["eval", "dropout"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_and_cupy_agree(name, dtype, training):
    config = CONFIGS[name]
    reference = run_on("numpy", config, dtype, training)
    candidate = run_on("cupy", config, dtype, training)
    assert list(candidate) == list(reference)
    for key in reference:
        if key.startswith("params/"):  # host-drawn initial weights: identical, not merely close
            assert np.array_equal(candidate[key], reference[key]), key
    report = compare(reference, candidate, *tolerances(dtype), dtype=dtype)
    assert report.ok, format_report(report, f"numpy vs cupy, {name}, {dtype}", show="failures")
