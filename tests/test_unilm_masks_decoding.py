"""ref_bert.masks and ref_bert.decoding against independent definitions (issue #18, mutation survivors).

masks.py: every mask, for every small length, against the table of docs/reference.md §3.1 (Dong et al.
2019, section 2) evaluated entry by entry in plain Python; the argument rules and their messages; the
teaching grid as text written out by hand; the picture's content (which mask each panel shows, its
labels, its colours, its size).
decoding.py: the KV cache's bookkeeping against a list-of-arrays model of it, and the incremental
forward against the full forward (Model.forward) under the same seq2seq mask, chunk by chunk.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

import backends
from ref_bert import Config, Model
from ref_bert.decoding import KVCache, incremental_forward
from ref_bert.masks import (MASK_KINDS, additive_mask, batch_masks, draw_masks_png, format_mask, normalize_kind,
                            teaching_mask, token_labels, unilm_mask)


def allowed(kind, i, j, n, s):
    """docs/reference.md §3.1, one entry: may query i attend key j (n real tokens, source length s)."""
    both_real = i < n and j < n
    if kind == "bidirectional":
        return both_real
    if kind == "left_to_right":
        return j <= i and both_real
    if kind == "right_to_left":
        return j >= i and both_real
    assert kind == "seq2seq"
    return (j < s or j <= i) and both_real


def definition(kind, T, n, s=None):
    return np.array([[allowed(kind, i, j, n, s) for j in range(T)] for i in range(T)], dtype=bool)


# --- unilm_mask ------------------------------------------------------------------------------------
def test_every_mask_for_every_small_length_matches_the_published_table():
    """All kinds, T = 1..6, every n in [0, T], every s in [0, n] (seq2seq): equal to the §3.1 table
    entry by entry (booleans: exact). The boundary values n = 0, n = T, s = 0, s = n are valid input."""
    for T in range(1, 7):
        for n in range(T + 1):
            for kind in MASK_KINDS:
                for s in (range(n + 1) if kind == "seq2seq" else [None]):
                    got = unilm_mask(kind, T, n, s)
                    assert got.dtype == bool and got.shape == (T, T)
                    np.testing.assert_array_equal(got, definition(kind, T, n, s), err_msg=f"{kind} T={T} n={n} s={s}")
    # num_real defaults to seq_len; numpy integers are integers
    np.testing.assert_array_equal(unilm_mask("left_to_right", 5), definition("left_to_right", 5, 5))
    np.testing.assert_array_equal(unilm_mask("seq2seq", np.int64(6), np.int64(5), np.int64(2)),
                                  definition("seq2seq", 6, 5, 2))
    # the paper's example: [SOS] t1 t2 [EOS] t3 t4 t5 [EOS], s = 4: t1 sees 4 tokens, t4 sees 6
    assert unilm_mask("seq2seq", 8, 8, 4).sum(axis=1).tolist() == [4, 4, 4, 4, 5, 6, 7, 8]


def test_kind_names_are_case_space_and_hyphen_insensitive():
    assert [normalize_kind(k) for k in (" Left-To-Right ", "RIGHT-TO-LEFT", "seq2seq", "Bidirectional")] == \
        ["left_to_right", "right_to_left", "seq2seq", "bidirectional"]
    np.testing.assert_array_equal(unilm_mask("Right-to-Left", 4, 3), definition("right_to_left", 4, 3))
    np.testing.assert_array_equal(unilm_mask(" SEQ2SEQ", 4, 4, 2), definition("seq2seq", 4, 4, 2))


@pytest.mark.parametrize("call, message", [
    (lambda: normalize_kind("sideways"),
     r"^unknown mask kind 'sideways'; expected one of bidirectional, left_to_right, right_to_left, seq2seq$"),
    (lambda: unilm_mask("diagonal", 3), r"^unknown mask kind 'diagonal'; expected one of bidirectional, "),
    (lambda: unilm_mask("bidirectional", 0), r"^seq_len=0 is invalid: expected a positive integer$"),
    (lambda: unilm_mask("bidirectional", 2.5), r"^seq_len=2\.5 is invalid: expected a positive integer$"),
    (lambda: unilm_mask("bidirectional", True), r"^seq_len=True is invalid"),
    (lambda: unilm_mask("bidirectional", 3, -1), r"^num_real=-1 is invalid: expected an integer in \[0, seq_len=3\]$"),
    (lambda: unilm_mask("bidirectional", 3, 4), r"^num_real=4 is invalid: expected an integer in \[0, seq_len=3\]$"),
    (lambda: unilm_mask("bidirectional", 3, 2.0), r"^num_real=2\.0 is invalid"),
    (lambda: unilm_mask("bidirectional", 3, True), r"^num_real=True is invalid"),
    (lambda: unilm_mask("seq2seq", 3), r"^the seq2seq mask needs source_len \(the length of \[CLS\] S1 \[SEP\]\)$"),
    (lambda: unilm_mask("seq2seq", 4, 3, -1), r"^source_len=-1 is invalid: expected an integer in \[0, num_real=3\]$"),
    (lambda: unilm_mask("seq2seq", 4, 3, 4), r"^source_len=4 is invalid: expected an integer in \[0, num_real=3\]$"),
    (lambda: unilm_mask("seq2seq", 4, 3, 1.0), r"^source_len=1\.0 is invalid"),
    (lambda: unilm_mask("seq2seq", 4, 3, False), r"^source_len=False is invalid"),
    (lambda: batch_masks(["seq2seq", "bidirectional"], 4, [4]), r"^num_real has 1 entries, expected one per example \(2\)$"),
    (lambda: batch_masks(["seq2seq"], 4, [4], [2, 3]), r"^source_lens has 2 entries, expected one per example \(1\)$"),
    (lambda: batch_masks([], 4, []), r"^batch_masks needs at least one example \(got an empty list of kinds\)$"),
    (lambda: format_mask(np.ones((3, 3)), ["a", "b"]),
     r"^mask shape \(3, 3\) and 2 labels do not match \(expected \(T, T\), T labels\)$"),
    (lambda: format_mask(np.ones((3, 2)), ["a", "b", "c"]), r"^mask shape \(3, 2\) and 3 labels do not match"),
    (lambda: format_mask(np.ones(3), ["a", "b", "c"]), r"^mask shape \(3,\) and 3 labels do not match"),
])
def test_bad_arguments_are_value_errors_that_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_source_len_is_read_only_by_seq2seq():
    """The other kinds ignore source_len (None is fine, and so is a value that seq2seq would refuse)."""
    for kind in ("bidirectional", "left_to_right", "right_to_left"):
        np.testing.assert_array_equal(unilm_mask(kind, 4, 3, None), definition(kind, 4, 3))
        np.testing.assert_array_equal(unilm_mask(kind, 4, 3, 99), definition(kind, 4, 3))


def test_batch_masks_stacks_one_mask_per_example():
    kinds = ["seq2seq", "left-to-right", "bidirectional", "right_to_left"]
    got = batch_masks(kinds, 6, [6, 4, 5, 3], [3, None, None, None])
    want = np.stack([definition("seq2seq", 6, 6, 3), definition("left_to_right", 6, 4),
                     definition("bidirectional", 6, 5), definition("right_to_left", 6, 3)])
    assert got.shape == (4, 6, 6) and got.dtype == bool
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(batch_masks(["left_to_right"], 3, [2]), definition("left_to_right", 3, 2)[None])
    np.testing.assert_array_equal(batch_masks(["bidirectional"] * 2, 3, [1, 3]),
                                  np.stack([definition("bidirectional", 3, 1), definition("bidirectional", 3, 3)]))


def test_additive_mask_is_zero_where_allowed_and_the_mask_value_elsewhere():
    """Defaults: -10000 (TF ALBERT / UniLM, docs/reference.md §1.3) in float32."""
    mask = definition("seq2seq", 5, 4, 2)
    got = additive_mask(mask)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.where(mask, np.float32(0), np.float32(-10000)))
    assert set(np.unique(got).tolist()) == {0.0, -10000.0}
    got = additive_mask(mask.astype(np.int64), -1e9, "float64")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np.where(mask, 0.0, -1e9))


# --- the teaching grid and picture -------------------------------------------------------------------
def test_token_labels_follow_the_teaching_layout():
    assert token_labels("seq2seq", 2, 3) == ["[CLS]", "s1", "s2", "[SEP]", "t1", "t2", "t3", "[SEP]"]
    assert token_labels("Left-to-right", 1, 2, pad=2) == ["[CLS]", "a1", "[SEP]", "b1", "b2", "[SEP]", "[PAD]", "[PAD]"]
    assert token_labels("bidirectional", 0, 0) == ["[CLS]", "[SEP]", "[SEP]"]
    assert token_labels("right_to_left", 11, 1)[10:14] == ["a10", "a11", "[SEP]", "b1"]


def test_teaching_mask_is_the_mask_of_its_layout():
    """[CLS] s1..sN [SEP] t1..tM [SEP] [PAD]*pad: n = N + M + 3 real tokens, s = N + 2 (§3.1: the
    source counts [CLS] and the first [SEP])."""
    for kind in MASK_KINDS:
        for N, M, pad in ((2, 3, 0), (1, 1, 2), (0, 2, 1)):
            mask, labels = teaching_mask(kind, N, M, pad)
            T = N + M + 3 + pad
            assert labels == token_labels(kind, N, M, pad) and len(labels) == T
            np.testing.assert_array_equal(mask, definition(kind, T, N + M + 3, N + 2), err_msg=f"{kind} {N} {M} {pad}")
    mask, labels = teaching_mask("seq2seq", 1, 1)        # pad defaults to 0
    assert labels[-1] == "[SEP]" and mask.shape == (5, 5)


def test_format_mask_prints_the_grid_written_out_by_hand():
    mask, labels = teaching_mask("seq2seq", 1, 1, pad=1)
    expected = "\n".join([
        "      | [CLS]    s1 [SEP]    t1 [SEP] [PAD]",
        "-------------------------------------------",
        "[CLS] |     1     1     1     .     .     .   sees 3",
        "   s1 |     1     1     1     .     .     .   sees 3",
        "[SEP] |     1     1     1     .     .     .   sees 3",
        "   t1 |     1     1     1     1     .     .   sees 4",
        "[SEP] |     1     1     1     1     1     .   sees 5",
        "[PAD] |     .     .     .     .     .     .   sees 0",
    ])
    assert format_mask(mask, labels) == expected
    # one-character labels: columns of width 1; other symbols; a 0/1 integer mask reads as booleans
    assert format_mask(np.array([[1, 0], [1, 1]]), ["x", "y"], allowed="#", blocked="-") == \
        "\n".join(["  | x y", "-------", "x | # -   sees 1", "y | # #   sees 2"])
    # any non-zero entry allows (the mask is read as booleans): "sees" counts keys, not weights
    assert format_mask(np.array([[2.0, 0.0], [0.5, 3.0]]), ["x", "y"]) == \
        "\n".join(["  | x y", "-------", "x | 1 .   sees 1", "y | 1 1   sees 2"])


def test_the_picture_shows_every_kind_with_its_labels_and_colours(tmp_path, monkeypatch):
    """draw_masks_png: four panels side by side, one per kind (titles with hyphens), each showing that
    kind's teaching mask (allowed entries one mid grey, blocked ones white, also when a panel has no
    blocked entry), keys on x and queries on y labelled with the layout's tokens (x labels vertical,
    7 pt), the suptitle; a PNG of 4 x 4.2 in by 5 in at 120 dpi (2016 x 600 pixels) written to the path
    whatever its extension and whatever the user's matplotlib defaults (here savefig.format = "svg",
    savefig.dpi = 72). Drawn twice: with pad 1, and with the default pad (0: the bidirectional mask then
    has no blocked entry)."""
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k))[1])
    monkeypatch.setitem(matplotlib.rcParams, "savefig.format", "svg")
    monkeypatch.setitem(matplotlib.rcParams, "savefig.dpi", 72)
    for call, (N, M, pad) in (((2, 1, 1), (2, 1, 1)), ((1, 2), (1, 2, 0))):
        path = tmp_path / f"masks-{pad}.image"
        draw_masks_png(str(path), *call)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert image.shape[:2] == (600, 2016)
        fig = figures.pop()
        assert fig._suptitle.get_text() == "UniLM self-attention masks (shaded: query may attend key)"
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["bidirectional", "left-to-right", "right-to-left", "seq2seq"]
        boxes = [ax.get_position() for ax in axes]                     # one row, left to right
        assert all(a.x1 <= b.x0 and abs(a.y0 - b.y0) < 1e-9 and abs(a.y1 - b.y1) < 1e-9 for a, b in zip(boxes, boxes[1:]))
        for ax, kind in zip(axes, MASK_KINDS):
            mask, labels = teaching_mask(kind, N, M, pad)
            assert len(labels) == N + M + 3 + pad
            (im,) = ax.get_images()
            np.testing.assert_array_equal(np.asarray(im.get_array()), mask)
            rgba = im.to_rgba(np.asarray(mask, dtype=float))
            blocked, grey = rgba[~mask], rgba[mask]
            np.testing.assert_allclose(blocked[:, :3], 1.0)                      # white
            level = grey[:, :3]
            assert np.ptp(level) == 0 and 0.35 < level[0, 0] < 0.6               # one mid grey (Greys at 1/1.6)
            assert ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
            assert list(ax.get_xticks()) == list(range(len(labels))) == list(ax.get_yticks())
            assert [t.get_text() for t in ax.get_xticklabels()] == labels == [t.get_text() for t in ax.get_yticklabels()]
            assert all(t.get_rotation() == 90 and t.get_fontsize() == 7 for t in ax.get_xticklabels())
            assert all(t.get_rotation() == 0 and t.get_fontsize() == 7 for t in ax.get_yticklabels())
        if pad == 0:   # no blocked entry in this panel: its grey must not come from scaling to the data
            assert teaching_mask("bidirectional", N, M)[0].all()


def test_the_picture_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"^--png needs matplotlib, which is not installed \(pip install matplotlib; "
                                         r"a default dependency of ref-bert\)$"):
        draw_masks_png(str(tmp_path / "x.png"), 1, 1)


# --- the KV cache ------------------------------------------------------------------------------------
def small_config(**overrides):
    """3 layers, 2 groups, 2 inner blocks (6 executed blocks over 4 parameter sets), E < H (projection),
    6 segment types as UniLM uses them; a large init so that hidden states vary."""
    fields = dict(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_hidden_groups=2,
                  inner_group_num=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=40,
                  type_vocab_size=6, initializer_range=0.3, hidden_act="gelu_new", hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1)
    fields.update(overrides)
    return Config(**fields)


def test_kv_cache_bookkeeping():
    """Buffers: one (N, h, capacity, d) pair per executed block (L * K), zero-filled, in the dtype;
    append writes at [length, length + n) of one block, advance moves length, reorder permutes the
    filled part of every buffer's rows only; filling exactly to capacity is allowed, one more raises."""
    cfg = small_config()
    cache = KVCache(cfg, batch_size=3, capacity=5, xp=np, dtype=np.float32)
    assert cache.length == 0 and cache.capacity == 5
    assert len(cache.keys) == len(cache.values) == 6
    for buf in cache.keys + cache.values:
        assert buf.shape == (3, 2, 5, 8) and buf.dtype == np.float32 and not buf.any()
    assert len({id(b) for b in cache.keys + cache.values}) == 12             # 12 separate buffers
    rng = np.random.default_rng(0)
    model_k = [np.zeros((3, 2, 5, 8), np.float32) for _ in range(6)]
    model_v = [np.zeros((3, 2, 5, 8), np.float32) for _ in range(6)]
    for n in (2, 3):
        for block in range(6):
            k, v = rng.standard_normal((2, 3, 2, n, 8)).astype(np.float32)
            cache.append(block, k, v)
            model_k[block][:, :, cache.length:cache.length + n] = k
            model_v[block][:, :, cache.length:cache.length + n] = v
        cache.advance(n)
        for block in range(6):
            np.testing.assert_array_equal(cache.keys[block], model_k[block])
            np.testing.assert_array_equal(cache.values[block], model_v[block])
    assert cache.length == 5
    with pytest.raises(ValueError, match=r"^KV cache overflow: 5 \+ 1 positions exceed its capacity 5$"):
        cache.append(0, np.zeros((3, 2, 1, 8)), np.zeros((3, 2, 1, 8)))
    short = KVCache(cfg, 3, 4, np, np.float64)
    short.append(1, np.ones((3, 2, 3, 8)), np.ones((3, 2, 3, 8)))
    short.advance(3)
    with pytest.raises(ValueError, match=r"^KV cache overflow: 3 \+ 2 positions exceed its capacity 4$"):
        short.append(1, np.ones((3, 2, 2, 8)), np.ones((3, 2, 2, 8)))
    short.append(1, np.full((3, 2, 1, 8), 2.0), np.full((3, 2, 1, 8), 3.0))       # 3 + 1 == capacity: fits
    assert short.keys[1][:, :, 3].min() == 2.0 and short.values[1][:, :, 3].min() == 3.0
    # reorder: rows follow the index in the first `length` positions; the rest is left as it was
    marked = KVCache(cfg, 3, 4, np, np.float64)
    for buf in marked.keys + marked.values:
        buf[...] = np.arange(3)[:, None, None, None] + 10 * np.arange(4)[None, None, :, None]
    marked.advance(2)
    marked.reorder(np.array([2, 2, 0]))
    for buf in marked.keys + marked.values:
        np.testing.assert_array_equal(buf[:, 0, :, 0], [[2, 12, 20, 30], [2, 12, 21, 31], [0, 10, 22, 32]])


# --- incremental forward against the full forward ----------------------------------------------------
@pytest.mark.parametrize("dtype, ops, overrides", [
    ("float64", "fast", {}), ("float32", "fast", {}), ("float32", "reference", {}),
    ("float64", "fast", {"embedding_size": 16, "sharing": "none", "num_hidden_groups": 1, "model_type": "bert"})],
    ids=["float64", "float32", "float32-reference-ops", "bert-like-no-projection"])
def test_incremental_forward_equals_the_full_forward_chunk_by_chunk(dtype, ops, overrides):
    """Two rows, 9 positions with segment ids and shifted position ids, under a seq2seq mask with source
    length 4 (and row 1 with pad keys hidden): fed in chunks of 4 (all committed), 3 (2 committed), 3
    (the uncommitted one again, then 2 more; 1 committed), the new positions' last hidden states equal
    the full forward's (Model.forward with the (B, T, T) mask, dropout off) at those positions: 1e-12
    relative in float64, 2e-5 in float32 (six blocks, sums in another order). Dropout is configured on
    and must not be applied. The cache holds what each block's keys were at committed positions. Also
    with the reference ops (no fast table: a float64 additive mask would promote a float32 model's
    activations there) and with E == H (no projection)."""
    with backends.reference_ops() if ops == "reference" else contextlib.nullcontext():
        run_incremental_against_full(dtype, overrides)


def run_incremental_against_full(dtype, overrides):
    model = Model(small_config(**overrides), dtype=dtype, seed=1)
    rng = np.random.default_rng(3)
    B, T, s = 2, 9, 4
    ids = rng.integers(0, 30, (B, T))
    types = np.array([[0] * s + [1] * (T - s), [4] * s + [5] * (T - s)])
    positions = np.arange(T)[None, :] + np.array([[0], [3]])
    full_mask = np.stack([definition("seq2seq", T, T, s), definition("seq2seq", T, T, s)]).astype(np.int64)
    full_mask[1, :, 7] = 0                                      # a key hidden from every query of row 1
    full = model.forward(ids, types, full_mask, positions).hidden_states[-1]
    tol = 1e-12 if dtype == "float64" else 2e-5
    cache = KVCache(model.config, B, T, np, model.dtype)
    # (first new position, n new positions, commit): the chunk positions are committed + new
    for first, n, commit in ((0, 4, 4), (4, 3, 2), (6, 3, 1), (7, 2, 2)):
        assert first == cache.length
        sl = slice(first, first + n)
        mask = full_mask[:, sl, :first + n]
        x = incremental_forward(model, cache, ids[:, sl], types[:, sl], positions[:, sl], mask, commit)
        assert x.shape == (B, n, 16) and x.dtype == model.dtype
        err = np.abs(x - full[:, sl]).max() / np.abs(full).max()
        assert err < tol, (first, n, commit, err)
        assert cache.length == first + commit
    assert cache.length == T
    # the cached keys of block 0 are layer 0's keys of the embedded input at every position
    out = model.forward(ids, types, full_mask, positions, keep_cache=True)
    keys0 = out.cache.encoder[0][2][0].k
    assert np.abs(cache.keys[0] - keys0).max() < tol * np.abs(keys0).max()
    last = out.cache.encoder[-1][2][0]
    assert np.abs(cache.values[-1] - last.v).max() < tol * np.abs(last.v).max()


def test_incremental_forward_rejects_a_mask_of_the_wrong_shape_and_a_bad_commit():
    model = Model(small_config(), dtype="float64", seed=0)
    N, n = 2, 3
    cache = KVCache(model.config, N, 8, np, model.dtype)
    ids = np.ones((N, n), dtype=np.int64)
    types = np.zeros((N, n), dtype=np.int64)
    pos = np.tile(np.arange(n), (N, 1))
    good = np.ones((N, n, n), dtype=np.int64)
    with pytest.raises(ValueError, match=r"^attention_mask has shape \(2, 3, 4\), expected \(2, 3, 3\) "
                                         r"\(new queries x cached \+ new keys\)$"):
        incremental_forward(model, cache, ids, types, pos, np.ones((N, n, n + 1)), 1)
    for commit in (-1, 4):
        with pytest.raises(ValueError, match=rf"^commit={commit} is invalid: expected an integer in \[0, 3\]$"):
            incremental_forward(model, cache, ids, types, pos, good, commit)
    assert cache.length == 0
    incremental_forward(model, cache, ids, types, pos, good, 0)            # commit 0: nothing cached
    assert cache.length == 0 and not any(b.any() for b in cache.keys + cache.values)
    incremental_forward(model, cache, ids, types, pos, good, 3)            # commit n: all of them
    assert cache.length == 3 and all(b[:, :, :3].any() and not b[:, :, 3:].any() for b in cache.keys)


def test_attention_sublayer_with_a_cache_asks_for_a_dropout_mask_over_cached_and_new_keys():
    """With ``past`` (L cached keys) the attention-dropout mask covers the T new queries against all L + T
    keys: the sublayer asks ``drop`` for (B, h, T, L + T), and a mask of ones of that shape gives exactly
    the undropped output. L = 5, T = 3, head size 4, so a shape built from T alone, L - T or the head
    size is wrong (mutants of encoder.attention_sublayer_forward, each applied by hand)."""
    from ref_bert.encoder import attention_sublayer_forward
    from ref_bert.ops import additive_mask_from

    cfg = Config(vocab_size=24, embedding_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=12, max_position_embeddings=16, attention_probs_dropout_prob=0.5)
    model = Model(cfg, dtype="float64", seed=0)
    B, T, L, h, d = 2, 3, 5, 2, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, 8))
    past = (rng.normal(size=(B, h, L, d)), rng.normal(size=(B, h, L, d)))
    mask = additive_mask_from(np.ones((B, T, L + T)), np.float64, cfg.attention_mask_value)
    p = model.params.prefixed("encoder.attention.0.")
    asked = []

    def ones_for_attention(shape, prob):
        asked.append((tuple(shape), prob))
        return np.ones(shape) if len(shape) == 4 else None

    plain, _ = attention_sublayer_forward(x, p, mask, cfg, lambda shape, prob: None, past=past)
    ones, _ = attention_sublayer_forward(x, p, mask, cfg, ones_for_attention, past=past)
    assert asked[0] == ((B, h, T, L + T), 0.5)
    np.testing.assert_array_equal(ones, plain)
