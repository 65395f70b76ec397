"""Dropout as drawn, not only as applied (issue #18).

The gradient checks freeze whatever mask the forward draws, so they cannot see a mask of the wrong
shape (one embedding mask broadcast over every token), a mask reused by two sites, layers or shared
blocks, or a keep probability that is off. These tests read the masks the model actually applied (from
its cache: the very arrays its forward multiplied by and its backward reuses) and check them against
the published definition of inverted dropout (docs/reference.md §1.1, §1.2, §11.2, §13):

    m = 1 / (1 - p) with probability 1 - p, else 0, independently for every element of the activation,
    at every site (embeddings after LayerNorm, attention probabilities, attention output projection,
    FFN output projection, the pooled output before the SOP head / the classifier input).

Statistics. Every check is a fixed-seed computation, so the outcome is deterministic; the bounds are
sized so that a correct implementation would fail with a stated small probability over seeds, and a
planted error fails with a large margin:
- keep rate: the binomial z = (k - n q) / sqrt(n q (1 - q)) of k kept out of n at keep probability q;
  |z| < 6, i.e. a false failure with probability 2e-9 per check (under 1e-7 over the ~40 checks here).
  The samples are sized so that q off by 0.01 gives |z| >= 11 at every site (the smallest, the pooled
  classifier input: n = 65,536 at q = 0.95, z = 0.01 / sqrt(q (1 - q) / n) = 11.7).
- independence: the Pearson correlation r of two 0/1 keep patterns of n pairs has standard deviation
  1/sqrt(n) when they are independent; |r| < 6 / sqrt(n) (false failure 2e-9 per pair, under 1e-6 over
  the ~400 pairs here). A shared or broadcast mask gives r = 1.
"""
import itertools

import numpy as np
import pytest

import backends
from ref_bert import Config, Model

P_HIDDEN, P_ATTENTION, P_HEAD = 0.1, 0.15, 0.05     # three different rates: a site reading another's fails
Z_BOUND = 6.0
BATCH, SEQ = 1024, 8                                 # 8192 tokens: every site has >= 65,536 draws per forward
LAYERS, INNER = 3, 2                                 # 3 layers of 2 blocks each, all sharing one parameter group


def config(head="pretraining", **overrides):
    """The tiny config with the three dropout rates above, 3 layers x 2 inner blocks sharing one
    parameter set (ALBERT's cross-layer sharing: 6 blocks, one set of weights), FFN-output dropout on
    (TF ALBERT / BERT), so that every site exists."""
    fields = dict(vocab_size=50, num_hidden_layers=LAYERS, inner_group_num=INNER, sharing="all",
                  hidden_dropout_prob=P_HIDDEN, attention_probs_dropout_prob=P_ATTENTION,
                  classifier_dropout_prob=P_HEAD, ffn_output_dropout=True, head=head)
    return Config.preset("tiny", **{**fields, **overrides})


def inputs(batch, seq, seed=0, choices=None):
    rng = np.random.default_rng(seed)
    shape = (batch, seq) if choices is None else (batch, choices, seq)
    ids = rng.integers(0, 50, shape)
    types = (np.arange(seq) >= seq // 2).astype(np.int64) * np.ones(shape, dtype=np.int64)
    return ids, types


CLASSIFIER_HEADS = ("sequence_classification", "token_classification", "multiple_choice")


def drawn_masks(out, head="pretraining"):
    """``[(site, mask)]`` in the order the model draws them (the order its docstring states: embeddings,
    then per block attention probabilities, attention output, FFN output, then the head), read from the
    forward's cache: the arrays the forward multiplied by (ops.dropout caches its mask)."""
    c = out.cache
    masks = [("embeddings", c.embeddings[4])]
    for k, (_a, _f, attn_cache, ffn_cache) in enumerate(c.encoder):
        # attention cache: (AttentionCache, output linear, output dropout, LN); the masked softmax's cache
        # keeps the probs mask at [1] in the reference and in every fast table
        masks.append((f"block{k}.attention_probs", attn_cache[0].softmax_cache[1]))
        masks.append((f"block{k}.attention_output", attn_cache[2]))
        masks.append((f"block{k}.ffn_output", ffn_cache[3]))
    if c.sop is not None:
        masks.append(("sop", c.sop[0]))
    if head in CLASSIFIER_HEADS:
        masks.append(("classifier", c.task[0]))      # tasks.classifier_forward's cache: (dropout, linear)
    return masks


def site_rate(site):
    kind = site.split(".")[-1]
    return {"embeddings": P_HIDDEN, "attention_probs": P_ATTENTION, "attention_output": P_HIDDEN,
            "ffn_output": P_HIDDEN, "sop": P_HEAD, "classifier": P_HEAD}[kind]


def binomial_z(kept: int, n: int, q: float) -> float:
    return (kept - n * q) / np.sqrt(n * q * (1 - q))


def correlation(a, b) -> float:
    """Pearson correlation of two equally long 0/1 patterns (float64 sums: exact for these counts)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def big():
    """One training forward of the big batch (float32, the pretraining head, MLM logits skipped): the
    model, its output and its masks, keyed by site."""
    model = Model(config(), dtype="float32", seed=0)
    ids, types = inputs(BATCH, SEQ)
    out = model.forward(ids, types, training=True, dropout_seed=11, keep_cache=True, return_mlm_logits=False)
    return model, out, drawn_masks(out)


# --- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["pretraining", "sequence_classification", "token_classification",
                                  "multiple_choice", "question_answering"])
def test_every_site_draws_a_mask_of_its_activation_shape(head):
    """Each site's mask has exactly its activation's shape (no broadcasting: a (B, 1, E) embedding mask
    shared by every token would be accepted by x * m and by the gradient check) and the model's dtype,
    one set per block (6 blocks: 3 layers x 2 inner blocks, all sharing one parameter set), and the head
    mask where transformers applies one (docs/reference.md §11.2: none before the QA outputs)."""
    B, T, C = 3, 7, 2
    cfg = config(head)
    E, H, h = cfg.embedding_size, cfg.hidden_size, cfg.num_attention_heads
    model = Model(cfg, dtype="float64", seed=0)
    ids, types = inputs(B, T, choices=C if head == "multiple_choice" else None)
    rows = B * C if head == "multiple_choice" else B
    out = model.forward(ids, types, training=True, dropout_seed=5, keep_cache=True)
    masks = dict(drawn_masks(out, head))
    expected = {"embeddings": (rows, T, E)}
    for k in range(LAYERS * INNER):
        expected.update({f"block{k}.attention_probs": (rows, h, T, T), f"block{k}.attention_output": (rows, T, H),
                         f"block{k}.ffn_output": (rows, T, H)})
    head_input = {"pretraining": ("sop", (rows, H)), "sequence_classification": ("classifier", (rows, H)),
                  "token_classification": ("classifier", (rows, T, H)), "multiple_choice": ("classifier", (rows, H)),
                  "question_answering": ("classifier", None)}[head]
    if head_input[1] is not None:
        expected[head_input[0]] = head_input[1]
    assert {site: getattr(m, "shape", None) for site, m in masks.items()} == expected
    assert all(m.dtype == np.float64 for m in masks.values())
    if head == "question_answering":      # no dropout before qa_outputs: the logits are last Wqa + bqa
        p = model.state_dict()
        qa = out.hidden_states[-1] @ p["qa_outputs.weight"] + p["qa_outputs.bias"]
        np.testing.assert_allclose(np.stack([out.start_logits, out.end_logits], -1), qa, rtol=0, atol=1e-14)


def test_ffn_output_dropout_off_draws_no_ffn_mask():
    """HF ALBERT's layout (ffn_output_dropout=False, docs/reference.md §1.2): no FFN-output mask, the
    other sites unchanged."""
    model = Model(config(ffn_output_dropout=False), dtype="float64", seed=0)
    ids, types = inputs(2, 5)
    masks = dict(drawn_masks(model.forward(ids, types, training=True, dropout_seed=5, keep_cache=True)))
    assert all(masks[f"block{k}.ffn_output"] is None for k in range(LAYERS * INNER))
    assert all(masks[f"block{k}.attention_output"].shape == (2, 5, 64) for k in range(LAYERS * INNER))


# --- values and keep rates -----------------------------------------------------------------------
def test_kept_value_is_one_over_keep_exactly_in_both_dtypes(big):
    """Every mask holds only 0 and the dtype's 1/(1-p) (exactly: float32(1/(1-p)) in float32, the float64
    quotient in float64), and the keep pattern is the same in float32 and float64 models (the uniforms
    are drawn in float64 whatever the dtype, docs/reference.md §13)."""
    _, _, masks = big
    for site, m in masks:
        assert m.dtype == np.float32
        assert set(np.unique(m).tolist()) == {0.0, float(np.float32(1.0 / (1.0 - site_rate(site))))}, site
    ids, types = inputs(4, 6)
    masks32, masks64 = (drawn_masks(Model(config(), dtype=dtype, seed=0).forward(
        ids, types, training=True, dropout_seed=11, keep_cache=True)) for dtype in ("float32", "float64"))
    assert [s for s, _ in masks32] == [s for s, _ in masks64] == [s for s, _ in masks]
    for (site, m32), (_, m64) in zip(masks32, masks64):
        p = site_rate(site)
        assert m64.dtype == np.float64 and set(np.unique(m64).tolist()) == {0.0, 1.0 / (1.0 - p)}, site
        np.testing.assert_array_equal(m32 != 0, m64 != 0, err_msg=site)


def test_keep_rate_of_every_site_and_block(big):
    """Binomial test of the kept fraction at each site and block (module docstring: |z| < 6), and of
    each site pooled over its 6 blocks. At these sizes a keep probability off by 0.01 gives |z| >= 11.7
    (the classifier-input site) and up to 35 (FFN output pooled)."""
    _, _, masks = big
    pooled = {}
    for site, m in masks:
        q = 1.0 - site_rate(site)
        kept, n = int(np.count_nonzero(m)), m.size
        assert n >= 65536, site
        assert abs(binomial_z(kept, n, q)) < Z_BOUND, (site, kept / n, q)
        kind = site.split(".")[-1]
        k0, n0 = pooled.get(kind, (0, 0))
        pooled[kind] = (k0 + kept, n0 + n)
    assert set(pooled) == {"embeddings", "attention_probs", "attention_output", "ffn_output", "sop"}
    for kind, (kept, n) in pooled.items():
        assert abs(binomial_z(kept, n, 1.0 - site_rate(kind))) < Z_BOUND, (kind, kept / n)


def test_keep_rate_of_the_classifier_heads():
    """The classifier's input mask (sequence classification: pooled (B, H); token classification:
    (B, T, H)) at classifier_dropout_prob, binomial |z| < 6, and BERT's token classifier falling back to
    hidden_dropout_prob when classifier_dropout is None (docs/reference.md §11.2). 65,536 draws each:
    off by 0.01 gives |z| = 11.7 (q = 0.95) or 8.4 (q = 0.9)."""
    for cfg, rows, T, q in ((config("sequence_classification"), 1024, 2, 1 - P_HEAD),
                            (config("token_classification"), 128, 8, 1 - P_HEAD),
                            (config("token_classification", model_type="bert", classifier_dropout_prob=None,
                                    sharing="none", num_hidden_layers=1, inner_group_num=1,
                                    embedding_size=64), 128, 8, 1 - P_HIDDEN)):
        model = Model(cfg, dtype="float32", seed=0)
        ids, types = inputs(rows, T, seed=2)
        out = model.forward(ids, types, training=True, dropout_seed=[4, 2], keep_cache=True)
        m = dict(drawn_masks(out, cfg.head))["classifier"]
        assert m.size == 65536
        assert set(np.unique(m).tolist()) == {0.0, float(np.float32(1 / q))}
        assert abs(binomial_z(int(np.count_nonzero(m)), m.size, q)) < Z_BOUND, (cfg.head, cfg.model_type)


# --- independence --------------------------------------------------------------------------------
def test_masks_are_independent_along_every_axis(big):
    """Within each mask, neighbours along every axis (batch rows, tokens, heads, query and key positions,
    features) are uncorrelated: |r| < 6/sqrt(n) for the n neighbour pairs (module docstring). One
    embedding mask shared by every token, one per batch row, one attention mask for all heads: r = 1."""
    _, _, masks = big
    for site, m in masks:
        keep = m != 0
        for axis in range(keep.ndim):
            n = keep.shape[axis]
            a = np.take(keep, range(n - 1), axis=axis)
            b = np.take(keep, range(1, n), axis=axis)
            r = correlation(a, b)
            assert abs(r) < Z_BOUND / np.sqrt(a.size), (site, axis, r)


def test_no_two_sites_layers_or_shared_blocks_reuse_a_mask(big):
    """Every pair of masks (20: embeddings, 3 sites x 6 blocks that share one parameter set, the SOP
    head) is uncorrelated, compared element by element over the common leading stretch of their flat
    patterns: |r| < 6/sqrt(n). A mask reused by two blocks, or a generator re-seeded for every draw
    (whose streams then start alike whatever the shapes), gives r = 1."""
    _, _, masks = big
    flat = [(site, (m != 0).ravel()) for site, m in masks]
    assert len(flat) == 1 + 3 * LAYERS * INNER + 1
    for (s1, a), (s2, b) in itertools.combinations(flat, 2):
        n = min(a.size, b.size)
        r = correlation(a[:n], b[:n])
        assert abs(r) < Z_BOUND / np.sqrt(n), (s1, s2, r)


def test_each_forward_of_the_model_stream_draws_new_masks():
    """Without a dropout_seed the model's own stream advances: two training forwards draw uncorrelated
    masks (|r| < 6/sqrt(n), 16,384 draws: a repeated mask gives r = 1)."""
    model = Model(config(), dtype="float32", seed=0)
    ids, types = inputs(64, 8)
    first = drawn_masks(model.forward(ids, types, training=True, keep_cache=True, return_mlm_logits=False))
    second = drawn_masks(model.forward(ids, types, training=True, keep_cache=True, return_mlm_logits=False))
    for (site, a), (_, b) in zip(first, second):
        r = correlation(a != 0, b != 0)
        assert abs(r) < Z_BOUND / np.sqrt(a.size), (site, r)


# --- p = 0, evaluation, seeds --------------------------------------------------------------------
def test_zero_probability_and_evaluation_apply_no_dropout():
    """p = 0 at every site: training=True draws no mask and gives the evaluation forward bit for bit; in
    evaluation nothing is drawn at all (the model's generator state is untouched)."""
    cfg = config("sequence_classification", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 classifier_dropout_prob=0.0)
    model = Model(cfg, dtype="float64", seed=0)
    ids, types = inputs(3, 6)
    state = model.dropout_rng.bit_generator.state
    train = model.forward(ids, types, training=True, keep_cache=True)
    evaluation = model.forward(ids, types, keep_cache=True)
    assert all(m is None for _, m in drawn_masks(train, cfg.head))
    np.testing.assert_array_equal(train.logits, evaluation.logits)
    for a, b in zip(train.hidden_states, evaluation.hidden_states):
        np.testing.assert_array_equal(a, b)
    assert model.dropout_rng.bit_generator.state == state          # p = 0 draws nothing
    dropping = Model(config("sequence_classification"), dtype="float64", seed=0)
    state = dropping.dropout_rng.bit_generator.state
    assert all(m is None for _, m in drawn_masks(dropping.forward(ids, types, keep_cache=True), cfg.head))
    assert dropping.dropout_rng.bit_generator.state == state


def reference_masks(seed, shapes_and_rates, dtype):
    """Inverted-dropout masks drawn from ``numpy.random.default_rng(seed)`` one site after another, as
    README "The model in Python" and docs/reference.md §13 promise: uniforms in float64, kept where
    u < 1 - p, kept value 1/(1-p) in the dtype. Sites with p = 0 draw nothing."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, p in shapes_and_rates:
        if p == 0:
            out.append(None)
            continue
        keep = rng.random(shape) < 1.0 - p
        out.append(np.where(keep, dtype(1.0 / (1.0 - p)), dtype(0)))
    return out


@pytest.mark.parametrize("zero_site", [None, "attention_probs"])
def test_masks_follow_the_seeded_draw_order(zero_site):
    """The masks equal, element for element, the draws of numpy.random.default_rng(dropout_seed) taken
    site by site in model order; the same seed gives the same masks, another seed others. With the
    attention-probs rate at 0 that site draws nothing and the other sites' masks follow on (so a run's
    masks do not depend on sites that are off). Without a dropout_seed the stream is
    default_rng([seed, 1]) (Model's docstring), continuing from one forward to the next."""
    overrides = {} if zero_site is None else {"attention_probs_dropout_prob": 0.0}
    cfg = config("token_classification", **overrides)
    B, T = 2, 5
    model = Model(cfg, dtype="float32", seed=3)
    ids, types = inputs(B, T)
    p_attn = cfg.attention_probs_dropout_prob
    plan = [((B, T, cfg.embedding_size), P_HIDDEN)]
    for _ in range(LAYERS * INNER):
        plan += [((B, cfg.num_attention_heads, T, T), p_attn), ((B, T, 64), P_HIDDEN), ((B, T, 64), P_HIDDEN)]
    plan.append(((B, T, 64), P_HEAD))

    def masks_of(**kw):
        return [m for _, m in drawn_masks(model.forward(ids, types, training=True, keep_cache=True, **kw), cfg.head)]

    def same(got, want):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                assert g.dtype == w.dtype
                np.testing.assert_array_equal(g, w)

    same(masks_of(dropout_seed=[7, 1]), reference_masks([7, 1], plan, np.float32))
    same(masks_of(dropout_seed=[7, 1]), reference_masks([7, 1], plan, np.float32))     # the same seed again
    other = masks_of(dropout_seed=8)
    same(other, reference_masks(8, plan, np.float32))
    assert not np.array_equal(other[0], reference_masks([7, 1], plan, np.float32)[0])
    # the model's own stream: default_rng([seed, 1]), the second forward continuing where the first stopped
    stream = np.random.default_rng([3, 1])
    for _ in range(2):
        want = reference_masks(None, plan, np.float32)          # shapes; values replaced from the stream
        for i, (shape, p) in enumerate(plan):
            if p:
                want[i] = np.where(stream.random(shape) < 1.0 - p, np.float32(1.0 / (1.0 - p)), np.float32(0))
        same(masks_of(), want)


def traced_run(fn, **kwargs):
    traced = {}
    fn(trace=lambda name, x: traced.setdefault(name, np.array(x)), **kwargs)
    return traced


@pytest.mark.parametrize("head", ["token_classification", "pretraining"])
def test_loss_and_grads_applies_the_masks_forward_draws(head):
    """loss_and_grads(training=True, dropout_seed=s) runs with the masks forward(..., dropout_seed=s)
    draws (the pretraining loss and the fine-tuning heads' loss are two paths): every traced activation
    (each downstream of a dropout site) is bit-identical, and the loss equals the cross-entropy of
    forward's logits (float64, 1e-12 relative: the same numbers, the reference summing with math.fsum).
    Without training the loss is another number (no masks)."""
    import math

    model = Model(config(head), dtype="float64", seed=0)
    ids, types = inputs(2, 6)
    rng = np.random.default_rng(1)
    if head == "pretraining":
        mlm = np.where(rng.random((2, 6)) < 0.5, rng.integers(0, 50, (2, 6)), -100)
        mlm[0, 0] = 7
        labels = dict(mlm_labels=mlm, sop_labels=np.array([1, 0]))
    else:
        labels = dict(labels=rng.integers(0, 2, (2, 6)))
    forward = traced_run(model.forward, input_ids=ids, token_type_ids=types, training=True, dropout_seed=9)
    loss_path = traced_run(model.loss_and_grads, input_ids=ids, token_type_ids=types, training=True, dropout_seed=9,
                           **labels)
    names = {n for n in set(forward) & set(loss_path) if not n.startswith("mlm")}   # MLM: labelled rows only
    assert "encoder.layer.2.block.1.ffn_output" in names and "embeddings.output" in names
    assert ("sop_logits" if head == "pretraining" else "head.logits") in names
    for name in names:
        np.testing.assert_array_equal(loss_path[name], forward[name], err_msg=name)

    def mean_nll(logits, targets):
        keep = targets != -100
        nll = [math.log(math.fsum(math.exp(v) for v in row)) - row[y]
               for row, y in zip(logits.reshape(-1, logits.shape[-1])[keep.ravel()].tolist(), targets[keep])]
        return math.fsum(nll) / len(nll)

    out = model.forward(ids, types, training=True, dropout_seed=9)
    if head == "pretraining":
        want = mean_nll(out.mlm_logits, labels["mlm_labels"]) + mean_nll(out.sop_logits, labels["sop_labels"])
    else:
        want = mean_nll(out.logits, labels["labels"])
    result = model.loss_and_grads(ids, types, training=True, dropout_seed=9, **labels)
    assert float(result.loss) == pytest.approx(want, rel=1e-12)
    evaluation = model.loss_and_grads(ids, types, **labels)
    assert float(evaluation.loss) != pytest.approx(float(result.loss), rel=1e-6)


def test_masks_are_applied_exactly_at_the_embeddings_and_the_classifier():
    """The cached mask is the one multiplied in, scaling included: the embedding output equals
    (LayerNorm output * m) Wp + bp, and the classifier's logits equal (pooled * m) Wc + bc, both
    recomputed here from the traced pre-dropout activations (float64, 1e-13 relative to the largest
    entry: one product and one (E x H) or (H x L) matrix product, rounding ~1e-16 per term)."""
    model = Model(config("sequence_classification"), dtype="float64", seed=0)
    ids, types = inputs(4, 6)
    traced = {}
    out = model.forward(ids, types, training=True, dropout_seed=2, keep_cache=True,
                        trace=lambda name, x: traced.setdefault(name, np.array(x)))
    masks = dict(drawn_masks(out, "sequence_classification"))
    p = model.state_dict()
    emb = (traced["embeddings.layer_norm"] * masks["embeddings"]) @ p["embeddings.projection.weight"] \
        + p["embeddings.projection.bias"]
    np.testing.assert_allclose(out.hidden_states[0], emb, rtol=0, atol=1e-13 * np.abs(emb).max())
    logits = (out.pooled_output * masks["classifier"]) @ p["classifier.weight"] + p["classifier.bias"]
    np.testing.assert_allclose(out.logits, logits, rtol=0, atol=1e-13 * np.abs(logits).max())
    assert np.count_nonzero(masks["embeddings"] == 0) > 0      # some entries were dropped: the check can see it


# --- reference and fast tables ------------------------------------------------------------------
def test_masks_are_the_same_with_the_reference_ops_and_the_fast_tables():
    """The NumPy backend's fast table (in-place masked softmax), the CuPy table run on NumPy through the
    kernel interpreter (tests/test_fused_kernels.py: the fused softmax-and-dropout kernel's own source)
    and the reference ops (tables emptied) draw and apply identical masks for the same seed, and their
    outputs agree to rounding (float64, 1e-12 relative to the largest entry: the fast variants reorder
    a few sums)."""
    from backends.cupy_fast import fast_table
    from backends.cupy_kernels import CupyKernels

    from .test_fused_kernels import NumpyKernelInterpreter

    model = Model(config(), dtype="float64", seed=0)
    ids, types = inputs(4, 6)

    def run():
        return model.forward(ids, types, training=True, dropout_seed=6, keep_cache=True)

    numpy_backend = backends.get("numpy")
    assert numpy_backend.fast, "the NumPy backend has a fast table outside reference_ops()"
    fast = run()
    saved = numpy_backend.fast
    numpy_backend.fast = fast_table(CupyKernels(NumpyKernelInterpreter), numpy_backend)
    try:
        interpreted = run()
    finally:
        numpy_backend.fast = saved
    with backends.reference_ops():
        reference = run()
    for other in (fast, interpreted):
        for (site, a), (_, b) in zip(drawn_masks(other), drawn_masks(reference)):
            np.testing.assert_array_equal(a, b, err_msg=site)
        for a, b in zip(other.hidden_states, reference.hidden_states):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())
