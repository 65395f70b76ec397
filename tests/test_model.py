"""The model's public surface: outputs, float32 vs float64, determinism, dropout, and the loss
against an independent recomputation from the forward pass's full MLM logits."""
from types import SimpleNamespace

import numpy as np
import pytest

from ref_bert import Config, Model
from ref_bert.examples import make_batch

CFG = Config.preset("tiny", vocab_size=50, num_hidden_layers=3, max_position_embeddings=16)


def batch(seed=0, B=3, T=9, V=50):
    """Row 1 padded after 6 tokens, labels on ~30% of the real positions (one forced), random token
    types: :func:`ref_bert.examples.make_batch`'s ``"matrix"`` recipe. Returns (inputs, labels, sop)."""
    shape = SimpleNamespace(vocab_size=V, type_vocab_size=2, pad_token_id=0, max_position_embeddings=T)
    x = make_batch(shape, B, T, seed, recipe="matrix", lengths=[T, 6] + [T] * (B - 2), label_rate=0.3)
    x["mlm_labels"][0, 2] = 7
    return ({k: x[k] for k in ("input_ids", "token_type_ids", "attention_mask")}, x["mlm_labels"],
            x["sop_labels"])


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_forward_shapes():
    model = Model(CFG, dtype="float32")
    inputs, _, _ = batch()
    out = model.forward(**inputs)
    assert len(out.hidden_states) == CFG.num_hidden_layers + 1
    assert all(h.shape == (3, 9, 64) for h in out.hidden_states)
    assert out.pooled_output.shape == (3, 64) and out.sop_logits.shape == (3, 2)
    assert out.mlm_logits.shape == (3, 9, 50)
    assert model.forward(**inputs, return_mlm_logits=False).mlm_logits is None


def test_loss_equals_independent_cross_entropy_of_forward_logits():
    """loss_and_grads evaluates the MLM head only at labelled positions; recompute the HF-convention
    loss (mean over labels != -100, plus mean SOP cross entropy) from the full logits of forward()."""
    model = Model(CFG, dtype="float64", seed=3)
    inputs, labels, sop = batch()
    out = model.forward(**inputs)
    lp = log_softmax(out.mlm_logits)
    sel = labels != -100
    mlm = -np.mean(lp[sel, labels[sel]])
    sop_loss = -np.mean(log_softmax(out.sop_logits)[np.arange(3), sop])
    _result = model.loss_and_grads(**inputs, mlm_labels=labels, sop_labels=sop)
    loss, grads, parts = _result.loss, _result.grads, _result.parts
    # float64, same arithmetic up to summation order: agreement to ~1e-15 relative.
    np.testing.assert_allclose(float(parts["mlm"]), mlm, rtol=1e-13)
    np.testing.assert_allclose(float(parts["sop"]), sop_loss, rtol=1e-13)
    np.testing.assert_allclose(float(loss), mlm + sop_loss, rtol=1e-13)
    assert set(grads) == set(model.state_dict())
    assert all(grads[k].shape == v.shape for k, v in model.state_dict().items())


def test_float32_forward_agrees_with_float64():
    """Same seed, same weights (drawn in float64 and rounded): float32 stays within ~1e-5 relative
    (24-bit mantissa ~6e-8 per op, accumulated over 3 layers of LayerNorm/softmax/GELU)."""
    inputs, labels, sop = batch()
    m32, m64 = Model(CFG, dtype="float32", seed=1), Model(CFG, dtype="float64", seed=1)
    o32, o64 = m32.forward(**inputs), m64.forward(**inputs)
    for a, b in zip(o32.hidden_states + [o32.pooled_output, o32.mlm_logits, o32.sop_logits],
                    o64.hidden_states + [o64.pooled_output, o64.mlm_logits, o64.sop_logits]):
        assert a.dtype == np.float32
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 1e-5, rel
    _result = m32.loss_and_grads(**inputs, mlm_labels=labels, sop_labels=sop)
    l32, g32 = _result.loss, _result.grads
    _result = m64.loss_and_grads(**inputs, mlm_labels=labels, sop_labels=sop)
    l64, g64 = _result.loss, _result.grads
    assert l32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32.values())
    assert abs(float(l32) - float(l64)) / float(l64) < 1e-5
    # Gradients: relative to each tensor's largest entry, but never to less than 1e-3 of the largest
    # gradient anywhere (the key bias's true gradient is exactly zero: float32 leaves ~1e-12 there).
    overall = max(np.abs(g).max() for g in g64.values())
    for k in g64:
        scale = max(np.abs(g64[k]).max(), 1e-3 * overall)
        assert np.abs(g32[k] - g64[k]).max() / scale < 1e-4, k


def test_same_seed_same_numbers_different_seed_different():
    a, b, c = Model(CFG, seed=5), Model(CFG, seed=5), Model(CFG, seed=6)
    assert np.array_equal(a.params.flat, b.params.flat)
    assert not np.array_equal(a.params.flat, c.params.flat)
    # initial weights: N(0, 0.02^2) for matrices, LayerNorm gamma 1, biases 0
    w = a.params["encoder.ffn.0.intermediate.weight"]
    assert abs(w.std() - 0.02) < 0.001 and np.all(a.params["encoder.attention.0.layer_norm.weight"] == 1)
    assert np.all(a.params["pooler.bias"] == 0)


def test_dropout_frozen_by_seed_and_off_outside_training():
    cfg = CFG.replace(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = Model(cfg, dtype="float64")
    inputs, _, _ = batch()
    eval1, eval2 = model.forward(**inputs), model.forward(**inputs)
    np.testing.assert_array_equal(eval1.last_hidden_state, eval2.last_hidden_state)
    t1 = model.forward(**inputs, training=True, dropout_seed=11)
    t2 = model.forward(**inputs, training=True, dropout_seed=11)
    t3 = model.forward(**inputs, training=True, dropout_seed=12)
    np.testing.assert_array_equal(t1.last_hidden_state, t2.last_hidden_state)
    assert not np.allclose(t1.last_hidden_state, t3.last_hidden_state)
    assert not np.allclose(t1.last_hidden_state, eval1.last_hidden_state)
    # the model's own stream advances between calls when no seed is given
    s1 = model.forward(**inputs, training=True)
    s2 = model.forward(**inputs, training=True)
    assert not np.allclose(s1.last_hidden_state, s2.last_hidden_state)


def test_padding_does_not_change_real_positions():
    """Pad keys are never attended: changing the tokens under the padding changes no real output."""
    model = Model(CFG, dtype="float64")
    inputs, _, _ = batch()
    other = {k: v.copy() for k, v in inputs.items()}
    other["input_ids"][1, 6:] = (other["input_ids"][1, 6:] + 1) % 50
    a, b = model.forward(**inputs), model.forward(**other)
    np.testing.assert_array_equal(a.last_hidden_state[1, :6], b.last_hidden_state[1, :6])


def test_trace_reports_activations_in_forward_order():
    model = Model(CFG, dtype="float32")
    inputs, _, _ = batch()
    names = []
    model.forward(**inputs, trace=lambda name, x: names.append(name))
    assert names[0] == "embeddings.sum" and names[-1] == "mlm_logits"
    assert names.index("embeddings.layer_norm") < names.index("embeddings.output")
    assert names.index("encoder.layer.2.block.0.ffn_output") < names.index("pooled_output")


def test_per_query_mask_accepted():
    model = Model(CFG, dtype="float64")
    inputs, labels, sop = batch()
    B, T = inputs["input_ids"].shape
    causal = np.broadcast_to(np.tril(np.ones((T, T), dtype=np.int64)), (B, T, T))
    out = model.forward(inputs["input_ids"], attention_mask=causal)
    # position 0 sees only itself under a causal mask: independent of every later token
    ids2 = inputs["input_ids"].copy()
    ids2[:, 1:] = (ids2[:, 1:] + 1) % 50
    out2 = model.forward(ids2, attention_mask=causal)
    np.testing.assert_array_equal(out.last_hidden_state[:, 0], out2.last_hidden_state[:, 0])


def test_repr_and_named_parameters_are_views():
    model = Model(CFG)
    assert "tiny" in repr(model)
    params = model.state_dict()
    params["pooler.bias"][0] = 1.5
    assert model.params.flat[np.flatnonzero(model.params.flat == np.float32(1.5))].size >= 1


@pytest.mark.parametrize("dtype", ["float16", "int32"])
def test_dtype_must_be_float32_or_float64(dtype):
    with pytest.raises(ValueError, match=f"dtype must be one of .*got '{dtype}'"):
        Model(CFG, dtype=dtype)


def test_parameter_accessors_follow_pytorch_conventions():
    """named_parameters() iterates (name, array) pairs, as PyTorch's does; state_dict() is the dict of
    the same live views (writing to one changes the model)."""
    model = Model(Config.preset("tiny"), dtype="float64", seed=0)
    pairs = list(model.named_parameters())
    assert all(isinstance(name, str) for name, _ in pairs)
    names = [name for name, _ in pairs]
    assert names == list(model.state_dict()) == list(model.params.shapes)
    assert sum(p.size for p in model.parameters()) == model.params.flat.size
    for name, array in model.named_parameters():
        assert np.shares_memory(array, model.params.flat) and model.state_dict()[name] is not None
    model.state_dict()["sop.bias"][...] = 7.0
    assert np.all(dict(model.named_parameters())["sop.bias"] == 7.0)
