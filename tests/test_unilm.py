"""UniLM: the four self-attention masks, mixed-objective batches, and the model's gradients under them.

Gradient checks: float64, the gradcheck library (Richardson-extrapolated five-point differences at
h = 1e-3, relative error |a - n| / max(|a| + |n|, 1e-4) < 1e-6) on sampled entries of every parameter
tensor, half where the analytic gradient is non-zero, plus one random direction per tensor. Dropout is
on (p = 0.1) with frozen masks (a fixed dropout_seed), so the dropout paths are checked too.
"""
from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backends
from gradcheck.cases import check_model
from ref_bert import Config, Model
from ref_bert.cli import main as cli_main
from ref_bert.masks import MASK_KINDS, additive_mask, batch_masks, normalize_kind, unilm_mask
from ref_bert.unilm import (CLS_ID, MASK_ID, NUM_SPECIAL, OBJECTIVE_SHARES, PAD_ID, SEP_ID, choose_spans,
                            objective_kinds, pretraining_batch, seq2seq_finetune_batch)

IGNORE = -100


# --- the definition, written independently of ref_bert.masks ------------------------------------
def may_attend(kind: str, i: int, j: int, num_real: int, source_len: int) -> bool:
    """Can query i see key j? Rules in words (docs/reference.md §3.1), not the library's formula."""
    if i >= num_real or j >= num_real:          # padding: never attended, pad queries see nothing
        return False
    if kind == "bidirectional":
        return True
    if kind == "left_to_right":                 # the past and itself
        return j <= i
    if kind == "right_to_left":                 # the future and itself
        return j >= i
    assert kind == "seq2seq"
    if j < source_len:                          # everyone sees the whole source segment
        return True
    if i < source_len:                          # the source never sees the target
        return False
    return j <= i                               # the target is causal, diagonal included


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(MASK_KINDS), source=st.integers(0, 7), target=st.integers(0, 7),
       pad=st.integers(0, 5))
def test_mask_matches_definition_in_the_standard_layout(kind, source, target, pad):
    source_len = source + 2                     # [CLS] S1 [SEP]
    num_real = source_len + target + 1          # ... S2 [SEP]
    T = num_real + pad
    mask = unilm_mask(kind, T, num_real, source_len)
    assert mask.shape == (T, T) and mask.dtype == bool
    for i in range(T):
        for j in range(T):
            assert mask[i, j] == may_attend(kind, i, j, num_real, source_len), (kind, i, j)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), T=st.integers(1, 12))
def test_mask_matches_definition_for_any_lengths(data, T):
    kind = data.draw(st.sampled_from(MASK_KINDS))
    num_real = data.draw(st.integers(0, T))
    source_len = data.draw(st.integers(0, num_real))
    mask = unilm_mask(kind, T, num_real, source_len)
    expected = np.array([[may_attend(kind, i, j, num_real, source_len) for j in range(T)] for i in range(T)])
    np.testing.assert_array_equal(mask, expected)


def test_paper_example_counts():
    # [SOS] t1 t2 [EOS] t3 t4 t5 [EOS]: the source segment is the first 4 tokens; t1 sees 4, t4 sees 6.
    mask = unilm_mask("seq2seq", 8, 8, source_len=4)
    assert mask[1].sum() == 4
    assert mask[5].sum() == 6
    assert mask[:4, 4:].sum() == 0               # the source never sees the target


def test_batch_mixes_kinds_and_hyphenated_names_and_additive_form():
    kinds = ["seq2seq", "left-to-right", "bidirectional", "right_to_left"]
    num_real, source_lens = [9, 6, 7, 5], [4, None, None, None]
    masks = batch_masks(kinds, 9, num_real, source_lens)
    assert masks.shape == (4, 9, 9)
    for b, kind in enumerate(kinds):
        expected = [[may_attend(normalize_kind(kind), i, j, num_real[b], source_lens[b] or 0) for j in range(9)]
                    for i in range(9)]
        np.testing.assert_array_equal(masks[b], expected)
    add = additive_mask(masks[0], -10000.0, "float64")
    assert set(np.unique(add)) == {0.0, -10000.0}
    np.testing.assert_array_equal(add == 0, masks[0])


@pytest.mark.parametrize("call, message", [
    (lambda: unilm_mask("causal", 4), "unknown mask kind 'causal'"),
    (lambda: batch_masks(["bidirectional", "prefix"], 4, [4, 4]), "unknown mask kind 'prefix'"),
    (lambda: unilm_mask("seq2seq", 4, 4), "needs source_len"),
    (lambda: unilm_mask("seq2seq", 4, 3, source_len=4), "source_len=4"),
    (lambda: unilm_mask("bidirectional", 4, 5), "num_real=5"),
    (lambda: unilm_mask("bidirectional", 0), "seq_len=0"),
    (lambda: batch_masks(["bidirectional"], 4, [4, 4]), "num_real has 2 entries"),
])
def test_mask_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the model under every kind ---------------------------------------------------------------------
def tiny_model(seed=0, dtype="float64", **overrides):
    cfg = dict(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=24, max_position_embeddings=24, type_vocab_size=6, hidden_act="gelu_new",
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.1)
    cfg.update(overrides)
    return Model(Config(**cfg), dtype=dtype, seed=seed)


def random_pairs(rng, count, vocab=40, longest=5):
    return [([int(t) for t in rng.integers(NUM_SPECIAL, vocab, size=rng.integers(1, longest + 1))],
             [int(t) for t in rng.integers(NUM_SPECIAL, vocab, size=rng.integers(1, longest + 1))])
            for _ in range(count)]


def hidden_states_of(model, input_ids, token_type_ids, mask):
    bk = model.backend
    out = model.forward(bk.from_host(input_ids), bk.from_host(token_type_ids), bk.from_host(mask))
    return bk.to_host(out.last_hidden_state)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_nan_in_any_output_whatever_the_lengths(data):
    """Random kinds and lengths per example, padding included, even an all-padding row: every
    forward output, the loss and every gradient are finite."""
    model = tiny_model(dtype="float32")
    B, T = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 10))
    kinds = data.draw(st.lists(st.sampled_from(MASK_KINDS), min_size=B, max_size=B))
    num_real = [data.draw(st.integers(0, T)) for _ in range(B)]
    source_lens = [data.draw(st.integers(0, n)) for n in num_real]
    mask = batch_masks(kinds, T, num_real, source_lens)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ids = rng.integers(0, 40, size=(B, T))
    types = rng.integers(0, 6, size=(B, T))
    labels = np.where(rng.random((B, T)) < 0.5, rng.integers(0, 40, size=(B, T)), IGNORE)
    bk = model.backend
    out = model.forward(bk.from_host(ids), bk.from_host(types), bk.from_host(mask), training=True, dropout_seed=1)
    for array in [*out.hidden_states, out.pooled_output, out.mlm_logits, out.sop_logits]:
        assert np.isfinite(bk.to_host(array)).all()
    _result = model.loss_and_grads(bk.from_host(ids), bk.from_host(types), bk.from_host(mask),
                                       bk.from_host(labels), bk.from_host(rng.integers(0, 2, size=B)))
    loss, grads = _result.loss, _result.grads
    assert np.isfinite(float(loss))
    assert all(np.isfinite(bk.to_host(g)).all() for g in grads.values())


def test_pad_keys_are_never_attended():
    """Changing the tokens at pad positions leaves every real position's output unchanged."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    T, num_real, source_len = 10, [7, 5, 9, 6], [4, 3, 5, 2]
    for kind in MASK_KINDS:
        mask = batch_masks([kind] * 4, T, num_real, source_len)
        ids = rng.integers(NUM_SPECIAL, 40, size=(4, T))
        types = rng.integers(0, 6, size=(4, T))
        other = ids.copy()
        for b, n in enumerate(num_real):
            other[b, n:] = rng.integers(0, 40, size=T - n)
        h1, h2 = hidden_states_of(model, ids, types, mask), hidden_states_of(model, other, types, mask)
        for b, n in enumerate(num_real):
            np.testing.assert_allclose(h1[b, :n], h2[b, :n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_information_flows_only_where_the_mask_allows(kind):
    """Perturbing the token at position k changes exactly the positions whose mask lets them (directly
    or through earlier layers) see k -- checked as: positions that cannot see k stay unchanged."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    T, n, s = 9, 9, 4
    mask = unilm_mask(kind, T, n, s)[None]
    ids = rng.integers(NUM_SPECIAL, 40, size=(1, T))
    types = np.zeros((1, T), dtype=np.int64)
    base = hidden_states_of(model, ids, types, mask)[0]
    # Which positions are reachable from k in any number of layers: the transitive closure of the mask.
    reach = mask[0].astype(int)
    for _ in range(T):
        reach = ((reach @ reach) > 0).astype(int) | reach
    for k in range(T):
        changed = ids.copy()
        changed[0, k] = NUM_SPECIAL + (ids[0, k] - NUM_SPECIAL + 1) % (40 - NUM_SPECIAL)
        after = hidden_states_of(model, changed, types, mask)[0]
        moved = np.abs(after - base).max(axis=-1) > 1e-12
        unaffected = reach[:, k] == 0
        assert not moved[unaffected].any(), (kind, k, np.flatnonzero(moved & unaffected))
        assert moved[k]                          # every token sees itself
        if kind == "seq2seq" and k >= s:
            assert not moved[:s].any()           # the source never sees the target


# --- gradient checks ----------------------------------------------------------------------------------
# gradcheck library defaults: Richardson five-point differences at h = 1e-3, relative tolerance 1e-6
# with floor 1e-4; every parameter tensor on sampled entries (half where the gradient is non-zero)
# plus one random direction covering all of its entries.
def gradcheck_report(model, inputs, seed, samples=4):
    return check_model(model, {**inputs, "training": True, "dropout_seed": 11}, samples=samples, directions=1,
                       seed=seed)


def gradcheck_batch(kind_shares, seed):
    rng = np.random.default_rng(seed)
    batch = pretraining_batch(random_pairs(rng, 6), 16, 40, seed=seed, shares=kind_shares, mask_prob=0.3)
    return batch


@pytest.mark.parametrize("shares", [{k: 1.0} for k in MASK_KINDS] + [OBJECTIVE_SHARES],
                         ids=list(MASK_KINDS) + ["mixed"])
def test_gradients_under_each_mask_kind_and_a_mixed_batch(shares):
    model = tiny_model(seed=3)
    batch = gradcheck_batch(shares, seed=5)
    if len(shares) > 1:
        assert set(batch.kinds) == set(MASK_KINDS)
    assert (np.array(batch.num_real) < 16).any()          # padding present
    report = gradcheck_report(model, batch.model_inputs(model.backend), seed=0)
    print(f"gradcheck {'+'.join(shares)}: max relative error {report.max_rel_error:.2e}")
    report.assert_ok()


def test_gradients_with_shared_inner_blocks_under_seq2seq():
    """ALBERT sharing with K = 2 inner blocks and 2 groups over 3 layers, under the seq2seq mask."""
    model = tiny_model(seed=4, num_hidden_layers=3, num_hidden_groups=2, inner_group_num=2)
    batch = gradcheck_batch({"seq2seq": 1.0}, seed=6)
    gradcheck_report(model, batch.model_inputs(model.backend), seed=1, samples=2).assert_ok()


# --- pretraining batches --------------------------------------------------------------------------
def test_pretraining_batch_is_deterministic_per_seed():
    pairs = random_pairs(np.random.default_rng(0), 12, vocab=100)
    a, b = pretraining_batch(pairs, 24, 100, seed=7), pretraining_batch(pairs, 24, 100, seed=7)
    c = pretraining_batch(pairs, 24, 100, seed=8)
    for name in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "sop_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.kinds == b.kinds
    assert not (np.array_equal(a.input_ids, c.input_ids) and np.array_equal(a.mlm_labels, c.mlm_labels))


def test_objective_shares_are_exact_per_batch():
    rng = np.random.default_rng(0)
    for B in (6, 12, 30):
        kinds = objective_kinds(B, rng)
        assert kinds.count("bidirectional") == kinds.count("seq2seq") == B // 3
        assert kinds.count("left_to_right") == kinds.count("right_to_left") == B // 6
    for B in (1, 2, 4, 5, 7):
        kinds = objective_kinds(B, rng)
        counts = [kinds.count(k) for k in OBJECTIVE_SHARES]
        assert len(kinds) == B
        assert all(abs(c - B * s) < 1 for c, s in zip(counts, OBJECTIVE_SHARES.values()))


def test_pretraining_batch_layout_labels_segments_and_masks():
    rng = np.random.default_rng(1)
    pairs = random_pairs(rng, 60, vocab=100, longest=8)
    batch = pretraining_batch(pairs, 20, 100, seed=3)
    plain = pretraining_batch(pairs, 20, 100, seed=3, unilm_segments=False)
    np.testing.assert_array_equal(batch.input_ids, plain.input_ids)      # the segments option changes only types
    unilm_types = {"bidirectional": (0, 1), "left_to_right": (2, 2), "right_to_left": (3, 3), "seq2seq": (4, 5)}
    for b, kind in enumerate(batch.kinds):
        ids, n, s = batch.input_ids[b], batch.num_real[b], batch.source_lens[b]
        assert ids[0] == CLS_ID and ids[s - 1] == SEP_ID and ids[n - 1] == SEP_ID and (ids[n:] == PAD_ID).all()
        first, second = unilm_types[kind]
        assert (batch.token_type_ids[b, :s] == first).all() and (batch.token_type_ids[b, s:n] == second).all()
        assert (batch.token_type_ids[b, n:] == 0).all()
        assert (plain.token_type_ids[b, :s] == 0).all() and (plain.token_type_ids[b, s:n] == 1).all()
        np.testing.assert_array_equal(batch.attention_mask[b], unilm_mask(kind, 20, n, s))
        # sentence-pair loss only on bidirectional examples
        assert (batch.sop_labels[b] in (0, 1)) == (kind == "bidirectional")
        if kind != "bidirectional":
            assert batch.sop_labels[b] == IGNORE
        # the masking budget: ALBERT's count (never more candidates than exist)
        labelled = np.flatnonzero(batch.mlm_labels[b] != IGNORE)
        candidates = n - 3
        assert len(labelled) == min(20, max(1, round(0.15 * n)), candidates)
        assert labelled.min() > 0 and not np.isin(labelled, [s - 1, n - 1]).any()   # specials never predicted
        assert (batch.mlm_labels[b, labelled] >= NUM_SPECIAL).all()
    # in seq2seq pretraining both segments are masked (over the batch)
    s2s = [b for b, k in enumerate(batch.kinds) if k == "seq2seq"]
    in_source = sum(int((batch.mlm_labels[b, :batch.source_lens[b]] != IGNORE).any()) for b in s2s)
    in_target = sum(int((batch.mlm_labels[b, batch.source_lens[b]:] != IGNORE).any()) for b in s2s)
    assert in_source > 0 and in_target > 0


def test_sentence_order_labels_match_swaps():
    pairs = [([10 + k] * 3, [60 + k] * 4) for k in range(30)]     # A tokens < 60 <= B tokens
    batch = pretraining_batch(pairs, 12, 100, seed=2, shares={"bidirectional": 1.0}, mask_prob=0.01)
    assert set(batch.sop_labels.tolist()) == {0, 1}
    for b in range(30):
        original = np.where(batch.mlm_labels[b] != IGNORE, batch.mlm_labels[b], batch.input_ids[b])
        first_segment = original[1:batch.source_lens[b] - 1]
        swapped = bool((first_segment >= 60).all())
        assert batch.sop_labels[b] == int(swapped)


def test_replacement_is_80_10_10_and_ngrams_are_80_10_10():
    rng = np.random.default_rng(0)
    pairs = [([int(t) for t in rng.integers(NUM_SPECIAL, 5000, size=30)],
              [int(t) for t in rng.integers(NUM_SPECIAL, 5000, size=30)]) for _ in range(400)]
    batch = pretraining_batch(pairs, 64, 5000, seed=1)
    labelled = batch.mlm_labels != IGNORE
    replaced_by_mask = (batch.input_ids == MASK_ID) & labelled
    kept = (batch.input_ids == batch.mlm_labels) & labelled
    total = labelled.sum()
    assert total > 3000
    assert abs(replaced_by_mask.sum() / total - 0.8) < 0.03
    assert abs(kept.sum() / total - 0.1) < 0.02
    assert abs((total - replaced_by_mask.sum() - kept.sum()) / total - 0.1) < 0.02
    # n-gram lengths where nothing forces a fallback (ample candidates and budget)
    lengths = [length for seed in range(300)
               for _, length in choose_spans(list(range(1000)), 30, np.random.default_rng(seed))]
    fractions = np.bincount(lengths, minlength=4)[1:] / len(lengths)
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.02)


def test_spans_stay_inside_candidates_and_budget():
    candidates = [1, 2, 3, 5, 6, 9]        # 4, 7, 8 are specials: no span may cross them
    for seed in range(200):
        spans = choose_spans(candidates, 4, np.random.default_rng(seed), {3: 1.0})
        positions = [p for start, length in spans for p in range(start, start + length)]
        assert len(positions) == len(set(positions)) <= 4
        assert set(positions) <= set(candidates)


def test_finetune_batch_masks_only_the_target_and_final_sep():
    rng = np.random.default_rng(3)
    pairs = random_pairs(rng, 50, vocab=60, longest=6)
    batch = seq2seq_finetune_batch(pairs, 16, 60, seed=4, mask_prob=0.5)
    assert batch.sop_labels is None and "sop_labels" not in batch.model_inputs(backends.get("numpy"))
    sep_predicted = 0
    for b, (source, target) in enumerate(pairs):
        s, n = batch.source_lens[b], batch.num_real[b]
        assert s == len(source) + 2 and n == s + len(target) + 1
        labelled = np.flatnonzero(batch.mlm_labels[b] != IGNORE)
        assert len(labelled) == max(1, round(0.5 * (len(target) + 1)))
        assert labelled.min() >= s and labelled.max() < n
        np.testing.assert_array_equal(batch.mlm_labels[b, labelled], np.array(target + [SEP_ID])[labelled - s])
        sep_predicted += int(n - 1 in labelled)
        assert (batch.token_type_ids[b, :s] == 4).all() and (batch.token_type_ids[b, s:n] == 5).all()
        np.testing.assert_array_equal(batch.attention_mask[b], unilm_mask("seq2seq", 16, n, s))
    assert sep_predicted > 0
    full = seq2seq_finetune_batch(pairs, 16, 60, seed=4, mask_prob=1.0, replace_probs=(1.0, 0.0, 0.0))
    for b in range(len(pairs)):
        s, n = full.source_lens[b], full.num_real[b]
        assert (full.input_ids[b, s:n] == MASK_ID).all() and (full.mlm_labels[b, s:n] != IGNORE).all()


@pytest.mark.parametrize("call, message", [
    (lambda: pretraining_batch([([5], [])], 8, 40), r"pairs\[0\]\[1\] is empty"),
    (lambda: pretraining_batch([([5, 3], [6])], 8, 40), "contains token id 3"),
    (lambda: pretraining_batch([([5], [6])], 8, 40, pair_task="itc"), "pair_task='itc'"),
    (lambda: pretraining_batch([], 8, 40), "at least one"),
    (lambda: pretraining_batch([([5], [6])], 8, 40, shares={"causal": 1.0}), "shares="),
    (lambda: seq2seq_finetune_batch([([5] * 6, [6] * 4)], 8, 40), "needs 13 positions"),
    (lambda: seq2seq_finetune_batch([([], [6])], 8, 40), "source is empty"),
])
def test_batch_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the teaching command -------------------------------------------------------------------------
def run_cli(*argv) -> str:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli_main(list(argv)) == 0
    return buffer.getvalue()


def cli_error(capsys, *argv) -> str:
    """The command fails as a usage error: exit status 2 and one ``error: ...`` line, no traceback."""
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_masks_command_prints_the_mask_as_a_labelled_grid():
    text = run_cli("masks", "--kind", "seq2seq", "--source", "3", "--target", "4", "--pad", "2")
    rows = [line for line in text.splitlines() if "|" in line][1:]       # skip the header row
    labels = [row.split("|")[0].strip() for row in rows]
    assert labels == ["[CLS]", "s1", "s2", "s3", "[SEP]", "t1", "t2", "t3", "t4", "[SEP]", "[PAD]", "[PAD]"]
    grid = np.array([[cell == "1" for cell in row.split("|")[1].split()[:12]] for row in rows])
    np.testing.assert_array_equal(grid, unilm_mask("seq2seq", 12, 10, 5))
    every = run_cli("masks", "--source", "1", "--target", "1")
    assert all(kind in every for kind in MASK_KINDS)


def test_masks_command_draws_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "masks.png"
    run_cli("masks", "--kind", "all", "--source", "2", "--target", "2", "--png", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_masks_command_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)     # makes "import matplotlib" fail
    assert "--png needs matplotlib" in cli_error(capsys, "masks", "--png", str(tmp_path / "x.png"))


def test_masks_command_rejects_unknown_kind_and_negative_sizes(capsys):
    assert "unknown mask kind 'sideways'" in cli_error(capsys, "masks", "--kind", "sideways")
    assert "--pad=-1" in cli_error(capsys, "masks", "--pad", "-1")


def test_next_sentence_pairs_take_b_from_another_pair():
    pairs = [([10 + k] * 2, [60 + k] * 3) for k in range(20)]     # pair k: A = 10 + k, B = 60 + k
    batch = pretraining_batch(pairs, 10, 100, seed=3, shares={"bidirectional": 1.0}, pair_task="nsp",
                              mask_prob=0.01)
    assert set(batch.sop_labels.tolist()) == {0, 1}
    for b in range(20):
        original = np.where(batch.mlm_labels[b] != IGNORE, batch.mlm_labels[b], batch.input_ids[b])
        a_token, b_token = original[1], original[batch.source_lens[b]]
        assert batch.sop_labels[b] == int(b_token - 60 != a_token - 10)
