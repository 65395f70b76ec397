"""The public model contract: ``forward(..., keep_cache=True)`` then ``backward(out, d_...)``.

A user's own loss on any outputs (every layer's hidden states, the pooled output, MLM and SOP logits)
is checked against finite differences for every parameter, in float64 with the project's gradient
check tolerance (1e-6 relative with a 1e-4 floor: tests/test_gradcheck_ops.py says why). The loss is
L = sum_i <W_i, h_i> + <W_p, pooled> + <W_m, mlm_logits> + <W_s, sop_logits> with random W, so the
upstream gradients are the W and every path into the encoder (below the top layer too) is exercised.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck import check_inplace
from gradcheck.strategies import configs, model_inputs
from ref_bert import Model, ops
from ref_bert.model import Gradients, LossAndGrads

from .conftest import examples


def _custom_loss_setup(config, inputs, rng, layers):
    model = Model(config, dtype="float64", seed=int(rng.integers(1000)))
    kwargs = dict(token_type_ids=inputs["token_type_ids"], attention_mask=inputs["attention_mask"],
                  training=True, dropout_seed=inputs["dropout_seed"])
    ids = inputs["input_ids"]
    out = model.forward(ids, **kwargs, keep_cache=True)
    weights = {i: rng.standard_normal(out.hidden_states[i].shape) for i in layers}
    w_pooled = rng.standard_normal(out.pooled_output.shape)
    w_mlm = rng.standard_normal(out.mlm_logits.shape)
    w_sop = rng.standard_normal(out.sop_logits.shape)

    def loss():
        o = model.forward(ids, **kwargs)
        total = sum((weights[i] * o.hidden_states[i]).sum() for i in layers)
        return total + (w_pooled * o.pooled_output).sum() + (w_mlm * o.mlm_logits).sum() + (w_sop * o.sop_logits).sum()

    grads = model.backward(out, d_hidden_states=weights, d_pooled_output=w_pooled, d_mlm_logits=w_mlm,
                           d_sop_logits=w_sop)
    return model, loss, grads


@settings(max_examples=examples(5))
@given(data=st.data())
def test_backward_of_a_custom_loss_on_every_output_matches_finite_differences(data):
    config = data.draw(configs(max_layers=3), label="config")
    inputs = data.draw(model_inputs(config), label="inputs")
    rng = np.random.default_rng(inputs["dropout_seed"])
    L = config.num_hidden_layers
    # gradients enter at the encoder input, a middle layer and the top, by index and by negative index
    layers = sorted({0, int(rng.integers(0, L + 1)), L})
    model, loss, grads = _custom_loss_setup(config, inputs, rng, layers)
    assert isinstance(grads, Gradients)
    report = check_inplace(loss, model.state_dict(), grads.params, samples=4, directions=1,
                           seed=inputs["dropout_seed"] % 1000)
    assert {r.name for r in report.results} == set(model.state_dict())
    report.assert_ok()


def test_gradients_entering_below_the_top_layer_are_not_dropped():
    """Only a middle layer's hidden states in the loss: the top layer's blocks get no gradient from it
    (they come after), the embeddings and the lower blocks do; and the numbers are finite differences'."""
    from ref_bert import Config

    config = Config.preset("tiny", sharing="none", num_hidden_layers=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    rng = np.random.default_rng(3)
    model = Model(config, dtype="float64", seed=1)
    ids = rng.integers(5, config.vocab_size, size=(2, 5))
    out = model.forward(ids, keep_cache=True)
    w = rng.standard_normal(out.hidden_states[1].shape)
    grads = model.backward(out, d_hidden_states={1: w}).params
    assert not grads["encoder.attention.2.query.weight"].any()     # layer 2 is above hidden_states[1]
    assert grads["encoder.attention.0.query.weight"].any()
    names = ["embeddings.word_embeddings", "encoder.ffn.0.output.weight", "encoder.attention.0.value.bias"]
    params = {k: v for k, v in model.state_dict().items() if k in names}
    check_inplace(lambda: (w * model.forward(ids).hidden_states[1]).sum(), params,
                  {k: grads[k] for k in names}, samples=6, directions=2).assert_ok()


def test_inputs_embeds_gradient_is_each_positions_upstream_gradient():
    """With distinct token ids and no MLM logits in the loss (so no tied-decoder term), the word
    embedding table's gradient row ids[b, t] is exactly ``inputs_embeds[b, t]``, and the position table's
    row t the sum over the batch (finite differences verify the table gradients in the test above)."""
    from ref_bert import Config

    config = Config.preset("tiny")
    rng = np.random.default_rng(0)
    model = Model(config, dtype="float64", seed=0)
    B, T = 2, 6
    ids = rng.permutation(np.arange(5, config.vocab_size))[:B * T].reshape(B, T)
    out = model.forward(ids, keep_cache=True)
    grads = model.backward(out, d_hidden_states={-1: rng.standard_normal(out.hidden_states[-1].shape)},
                           d_sop_logits=rng.standard_normal(out.sop_logits.shape))
    assert grads.inputs_embeds.shape == (B, T, config.embedding_size)
    word = grads.params["embeddings.word_embeddings"]
    assert np.array_equal(word[ids.reshape(-1)], grads.inputs_embeds.reshape(B * T, -1))
    np.testing.assert_allclose(grads.params["embeddings.position_embeddings"][:T], grads.inputs_embeds.sum(axis=0),
                               rtol=1e-15, atol=0)


def test_loss_and_grads_is_forward_then_cross_entropy_then_backward():
    """loss_and_grads composed by hand from the public pieces gives the same bits."""
    from ref_bert import Config

    config = Config.preset("tiny")
    rng = np.random.default_rng(1)
    model = Model(config, dtype="float64", seed=2)
    ids = rng.integers(5, config.vocab_size, size=(3, 8))
    labels = np.full_like(ids, -100)
    labels[:, [1, 4]] = ids[:, [1, 4]]
    sop = np.array([0, 1, 1])
    result = model.loss_and_grads(ids, mlm_labels=labels, sop_labels=sop, training=True, dropout_seed=9,
                                  loss_weights=(1.0, 2.0))
    assert isinstance(result, LossAndGrads)

    positions = np.nonzero(labels.reshape(-1) != -100)[0]
    out = model.forward(ids, training=True, dropout_seed=9, mlm_positions=positions, keep_cache=True)
    mlm, mlm_cache = ops.cross_entropy_forward(out.mlm_logits, labels.reshape(-1)[positions])
    sop_loss, sop_cache = ops.cross_entropy_forward(out.sop_logits, sop)
    grads = model.backward(out, d_mlm_logits=ops.cross_entropy_backward(1.0, mlm_cache),
                           d_sop_logits=ops.cross_entropy_backward(2.0, sop_cache))
    assert result.loss == mlm + 2.0 * sop_loss
    assert result.parts["mlm"] == mlm and result.parts["sop"] == sop_loss
    for name, g in grads.params.items():
        assert np.array_equal(result.grads[name], g), name


def test_mlm_logits_at_every_position_and_at_chosen_positions_agree():
    from ref_bert import Config

    model = Model(Config.preset("tiny"), dtype="float64", seed=0)
    ids = np.random.default_rng(0).integers(5, 1000, size=(2, 7))
    full = model.forward(ids).mlm_logits
    positions = np.array([0, 5, 13])
    some = model.forward(ids, mlm_positions=positions).mlm_logits
    np.testing.assert_allclose(some, full.reshape(14, -1)[positions], rtol=1e-13, atol=1e-13)


def test_backward_refuses_what_it_cannot_use():
    from ref_bert import Config

    model = Model(Config.preset("tiny"), dtype="float64", seed=0)
    ids = np.array([[2, 7, 9, 3]])
    with pytest.raises(ValueError, match="keep_cache=True"):
        model.backward(model.forward(ids), d_sop_logits=np.zeros((1, 2)))
    out = model.forward(ids, keep_cache=True, return_mlm_logits=False)
    with pytest.raises(ValueError, match="d_mlm_logits was given but forward did not compute"):
        model.backward(out, d_mlm_logits=np.zeros((1, 4, 1000)))
    with pytest.raises(ValueError, match=r"d_sop_logits has shape \(2, 2\) and dtype float64, expected shape \(1, 2\)"):
        model.backward(out, d_sop_logits=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="layer index 5"):
        model.backward(out, d_hidden_states={5: np.zeros((1, 4, 64))})
    with pytest.raises(ValueError, match="dtype float32"):
        model.backward(out, d_pooled_output=np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="has 2 entries, expected 3"):
        model.backward(out, d_hidden_states=[None, None])


def test_repeated_mlm_positions_get_every_rows_gradient_and_duplicate_layers_are_refused():
    from ref_bert import Config

    model = Model(Config.preset("tiny"), dtype="float64", seed=0)
    ids = np.random.default_rng(0).integers(5, 1000, size=(1, 5))
    twice = model.forward(ids, mlm_positions=np.array([2, 2]), keep_cache=True)
    once = model.forward(ids, mlm_positions=np.array([2]), keep_cache=True)
    d = np.random.default_rng(1).standard_normal(once.mlm_logits.shape)
    g_twice = model.backward(twice, d_mlm_logits=np.concatenate([d, d])).params
    g_once = model.backward(once, d_mlm_logits=2 * d).params
    for name in ("encoder.ffn.0.output.weight", "embeddings.position_embeddings"):
        np.testing.assert_allclose(g_twice[name], g_once[name], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="twice"):
        model.backward(once, d_hidden_states={-1: np.zeros((1, 5, 64)), 2: np.zeros((1, 5, 64))})


def _arrays_in(obj, seen=None):
    """Every ndarray reachable from a cache (tuples, lists, dicts, dataclasses, named tuples)."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _arrays_in(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _arrays_in(value, seen)
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            yield from _arrays_in(getattr(obj, field.name), seen)


@pytest.mark.parametrize("sharing", ["all", "none"])
def test_the_cache_keeps_activations_and_no_copy_of_the_weights(sharing):
    """Memory: what forward(..., keep_cache=True) keeps for the backward is activations (a leading axis of
    B examples or B * T rows, or the labelled rows) and views of the parameters, never a copy of weights.
    The fused q/k/v product multiplies by an (H, 3H) concatenation of three weights; keeping it would
    hold one copy per layer until the backward (bert-base: 7 MB a layer, per shard), so the attention
    cache keeps the parameter views and the backward concatenates again (the gradient checks show that
    the numbers are the same)."""
    from ref_bert import Config

    config = Config.preset("tiny", num_hidden_layers=3, sharing=sharing)
    B, T = 3, 5
    rng = np.random.default_rng(0)
    model = Model(config, dtype="float64", seed=1)
    ids = rng.integers(5, config.vocab_size, size=(B, T))
    positions = np.array([1, 7, 8, 13])
    out = model.forward(ids, training=True, dropout_seed=2, mlm_positions=positions, keep_cache=True)
    arrays = list(_arrays_in(out.cache))
    assert len(arrays) > 10 * config.num_hidden_layers
    own = [a for a in arrays if not np.shares_memory(a, model.params.flat)]
    shapes = sorted({a.shape for a in own if a.ndim and a.shape[0] not in (B, B * T, len(positions))})
    assert shapes == [], f"arrays in the cache that are neither activations nor parameter views: {shapes}"
