"""Seq2seq generation: cached == uncached, beam search, constraints, bad input, the command, and an
end-to-end learning test (seq2seq fine-tuning on digit-string reversal, then greedy decoding)."""
from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import numpy as np
import pytest

import ref_bert.decoding as decoding
from ref_bert import Config, Model
from ref_bert.checkpoint import save_model
from ref_bert.cli import main as cli_main
from ref_bert.generate import (DecodingLayout, CachedStepper, FullStepper, banned_by_ngrams, beam_search,
                               constrained_log_probs, generate, greedy_search, length_penalty)
from ref_bert.unilm import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, seq2seq_finetune_batch


def decoding_model(seed=0, dtype="float64", **overrides):
    """Small, with ALBERT sharing that makes the block schedule non-trivial: 3 layers, 2 groups,
    2 inner blocks (6 executed blocks over 4 parameter sets). Large init so predictions vary."""
    cfg = dict(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_hidden_groups=2,
               inner_group_num=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=40,
               type_vocab_size=6, initializer_range=0.3, hidden_act="gelu_new")
    cfg.update(overrides)
    return Model(Config(**cfg), dtype=dtype, seed=seed)


SOURCES = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]


def relative_difference(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- the cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("overrides", [{}, {"type_vocab_size": 2, "num_hidden_groups": 1, "inner_group_num": 1},
                                       {"sharing": "none", "num_hidden_groups": 1, "embedding_size": 16}],
                         ids=["albert-shared-K2", "plain-segments", "bert-like"])
def test_cached_decoding_equals_uncached(beam_size, overrides):
    model = decoding_model(**overrides)
    kwargs = dict(max_length=12, beam_size=beam_size, keep_logits=True, no_repeat_ngram_size=3,
                  length_penalty_alpha=0.6)
    cached = generate(model, SOURCES, use_cache=True, **kwargs)
    full = generate(model, SOURCES, use_cache=False, **kwargs)
    assert cached.sequences == full.sequences
    assert cached.finished == full.finished
    assert len(cached.step_logits) == len(full.step_logits) > 1
    worst = max(relative_difference(c, f) for c, f in zip(cached.step_logits, full.step_logits))
    print(f"cached vs uncached logits, beam {beam_size}: max relative difference {worst:.1e}")
    assert worst <= 1e-6
    np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-9)


def test_batched_decoding_equals_one_source_at_a_time():
    model = decoding_model()
    for beam_size in (1, 2):
        batched = generate(model, SOURCES, max_length=10, beam_size=beam_size)
        for n, source in enumerate(SOURCES):
            alone = generate(model, source, max_length=10, beam_size=beam_size)
            assert alone.sequences[0] == batched.sequences[n]
            assert alone.scores[0] == pytest.approx(batched.scores[n], rel=1e-10)


def test_each_cached_step_runs_only_the_new_positions(monkeypatch):
    """The [MASK] slot never enters the cache, and a step computes scores for 2 queries against the
    current length (linear work), not the whole (T, T) square."""
    model = decoding_model()
    shapes = []
    from ref_bert.ops import attention

    real_softmax = attention.masked_softmax_forward
    monkeypatch.setattr(attention, "masked_softmax_forward",
                        lambda scores, *args: (shapes.append(scores.shape), real_softmax(scores, *args))[1])
    layout = DecodingLayout(SOURCES, 1, 8, 4, 5)
    stepper = CachedStepper(model, layout)
    S, blocks = layout.S, 3 * 2
    stepper.first()
    assert stepper.cache.length == S                         # source block committed, [MASK] not
    assert shapes == [(3, 2, S + 1, S + 1)] * blocks
    for t in range(1, 6):
        shapes.clear()
        stepper.next(np.full(3, 7))
        assert stepper.cache.length == S + t                 # the token committed, the new [MASK] not
        assert shapes == [(3, 2, 2, S + t + 1)] * blocks


def test_decoding_mask_is_seq2seq_without_pad_keys():
    layout = DecodingLayout([[5, 6, 7], [8]], 1, 4, 4, 5)     # S = 5; row 1 has pads at columns 3, 4
    mask = layout.mask(0, 8)
    assert layout.S == 5
    np.testing.assert_array_equal(mask[1, :, 3:5], False)     # pad keys never attended
    np.testing.assert_array_equal(mask[0, :5, 5:], False)     # the source never sees the target
    np.testing.assert_array_equal(mask[0, 5:, :5], True)      # the target sees the whole source
    np.testing.assert_array_equal(mask[0, 5:, 5:], np.tril(np.ones((3, 3), bool)))   # causal target
    np.testing.assert_array_equal(layout.target_positions(0, 2), [[5, 6], [3, 4]])


# --- search -----------------------------------------------------------------------------------------
def test_beam_search_with_one_beam_is_greedy():
    model = decoding_model(seed=1)
    layout = DecodingLayout(SOURCES, 1, 10, 4, 5)
    greedy = greedy_search(CachedStepper(model, layout), 3, 10, 2, 2, 0.6, None)
    beam = beam_search(CachedStepper(model, layout), 3, 1, 10, 2, 2, 0.6, None)
    assert greedy[0] == beam[0]
    np.testing.assert_allclose(greedy[1], beam[1], rtol=1e-12)
    assert greedy[2] == beam[2]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_beam_wider_than_all_candidates_is_exhaustive(alpha):
    """max_length 3, min_length 2, and a beam holding every candidate: beam search must return the best
    of all finished outputs [a, b, SEP] over every allowed a, b (8 x 8 of them), length penalty included."""
    model = decoding_model(seed=3, vocab_size=12)       # its best output is [9, 11]; beam 2 finds none
    source = [7, 8, 9]
    out = generate(model, source, max_length=3, min_length=2, beam_size=100, length_penalty_alpha=alpha)

    def step_log_probs(prefix):
        stepper = FullStepper(model, DecodingLayout([source], 1, 3, 4, 5))
        logits = stepper.first()
        for token in prefix:
            logits = stepper.next(np.array([token]))
        return constrained_log_probs(logits, [list(prefix)], len(prefix), 2, 0)[0]

    allowed = [t for t in range(12) if t not in (PAD_ID, CLS_ID, MASK_ID, SEP_ID)]
    first = step_log_probs([])
    candidates = {}
    for a in allowed:
        second = step_log_probs([a])
        for b in allowed:
            candidates[(a, b)] = (first[a] + second[b] + step_log_probs([a, b])[SEP_ID]) / length_penalty(3, alpha)
    best = max(candidates, key=candidates.get)
    assert len(candidates) == 64
    assert out.finished == [True]
    assert tuple(out.sequences[0]) == best
    assert out.scores[0] == pytest.approx(float(candidates[best]), rel=1e-10)


def test_min_length_max_length_and_stopping_at_sep():
    model = decoding_model(seed=3)
    model.params["mlm.bias"][SEP_ID] = 50.0                   # the model now always wants to stop
    assert generate(model, SOURCES, max_length=6).sequences == [[], [], []]
    for beam_size in (1, 3):
        out = generate(model, SOURCES, max_length=6, min_length=3, beam_size=beam_size)
        assert [len(s) for s in out.sequences] == [3, 3, 3] and out.finished == [True] * 3
        never = generate(model, SOURCES, max_length=5, min_length=5, beam_size=beam_size)
        assert [len(s) for s in never.sequences] == [5, 5, 5] and never.finished == [False] * 3
        for s in out.sequences + never.sequences:
            assert not set(s) & {PAD_ID, CLS_ID, MASK_ID, SEP_ID}


def has_repeated_ngram(sequence, n):
    grams = [tuple(sequence[k:k + n]) for k in range(len(sequence) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_size():
    model = decoding_model(seed=4)
    model.params["mlm.bias"][[7, 8]] = 30.0                   # two tokens dominate: repetition guaranteed
    free = generate(model, SOURCES, max_length=12, min_length=12)
    assert all(has_repeated_ngram(s, 2) for s in free.sequences)
    for beam_size in (1, 3):
        for n in (1, 2, 3):
            out = generate(model, SOURCES, max_length=12, min_length=12, beam_size=beam_size,
                           no_repeat_ngram_size=n)
            assert not any(has_repeated_ngram(s, n) for s in out.sequences), (beam_size, n, out.sequences)


def test_banned_by_ngrams_and_length_penalty():
    assert banned_by_ngrams([5, 6, 7, 5, 6], 3) == {7}
    assert banned_by_ngrams([5, 6, 5], 2) == {6}
    assert banned_by_ngrams([5, 6, 5, 7], 2) == set()
    assert banned_by_ngrams([5, 6], 1) == {5, 6}
    assert banned_by_ngrams([5, 6], 0) == set()
    assert banned_by_ngrams([], 3) == set()
    assert length_penalty(1, 1.0) == pytest.approx(1.0)
    assert length_penalty(7, 0.6) == pytest.approx(2.0 ** 0.6)
    assert length_penalty(10, 0.0) == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda m: generate(m, [5] * 38), "a source of 38 tokens needs 41 positions"),
    (lambda m: generate(m, []), "source_ids is empty"),
    (lambda m: generate(m, [[5, 6], []]), "source 1 is empty"),
    (lambda m: generate(m, [5, 6], beam_size=0), "beam_size=0"),
    (lambda m: generate(m, [5, 6], max_length=37), r"max_length=37 is invalid: expected an integer in \[1, 36\]"),
    (lambda m: generate(m, [5, 6], max_length=0), "max_length=0"),
    (lambda m: generate(m, [5, 30]), "token id 30"),
    (lambda m: generate(m, [5, 6], min_length=-1), "min_length=-1"),
    (lambda m: generate(m, [5, 6], length_penalty_alpha=float("nan")), "length_penalty_alpha=nan"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(decoding_model())


def test_unilm_segments_need_six_types():
    with pytest.raises(ValueError, match="type_vocab_size >= 6"):
        generate(decoding_model(type_vocab_size=2), [5, 6], unilm_segments=True)


# --- the command ------------------------------------------------------------------------------------
def run_cli(*argv) -> str:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli_main([str(a) for a in argv]) == 0
    return buffer.getvalue()


def test_generate_command_with_source_ids(tmp_path):
    model = decoding_model(seed=5)
    save_model(model, tmp_path)
    expected = generate(model, [[5, 17, 9], [8, 8]], max_length=6, beam_size=2)
    text = run_cli("generate", "--checkpoint", tmp_path, "--source-ids", "5 17 9", "--source-ids", "8 8",
                   "--max-length", 6, "--beam-size", 2, "--scores", "--dtype", "float64")
    lines = text.splitlines()
    assert len(lines) == 2
    for line, sequence, score in zip(lines, expected.sequences, expected.scores):
        shown_score, shown_ids = line.split("\t")
        assert [int(t) for t in shown_ids.split()] == sequence
        assert float(shown_score) == pytest.approx(score, abs=1e-6)
    uncached = run_cli("generate", "--checkpoint", tmp_path, "--source-ids", "5 17 9", "--source-ids", "8 8",
                       "--max-length", 6, "--beam-size", 2, "--no-cache", "--dtype", "float64")
    assert uncached.splitlines() == [line.split("\t")[1] for line in lines]


def test_generate_command_errors(tmp_path, capsys):
    save_model(decoding_model(), tmp_path)
    for argv, message in [(["--source", "hello"], r"needs a tokenizer at .*spiece.model"),
                          (["--source-ids", "5 x"], r"--source-ids '5 x' is invalid"),
                          (["--source-ids", "5", "--beam-size", 0], r"beam_size=0")]:
        assert cli_main(["generate", "--checkpoint", str(tmp_path), *(str(a) for a in argv)]) == 2
        captured = capsys.readouterr()
        found, error = captured.err.splitlines()   # the kind of directory found, then the error
        assert found.startswith("generate: found a ref-bert model directory"), captured.err
        assert re.match(r"error: .*" + message, error) and "Traceback" not in captured.err, captured.err
        assert captured.out == ""


# --- learning ---------------------------------------------------------------------------------------
LEARNING_SEED = 0
LEARNING_STEPS = 500          # Adam steps of 64 examples; the budget of the learning test
DIGITS = list(range(NUM_SPECIAL, NUM_SPECIAL + 10))


def digit_strings(rng, count):
    return [[int(t) for t in rng.choice(DIGITS, size=int(rng.integers(3, 7)))] for _ in range(count)]


def test_seq2seq_fine_tuning_learns_to_reverse_digit_strings():
    """Seed 0, budget 500 Adam steps (lr 2e-3, 100 warm-up steps) of 64 (source, reversed source) pairs,
    3 to 6 digits, fine-tuned with the seq2seq objective (mask_prob 0.7 of the target and final [SEP]).
    A tiny ALBERT (2 shared layers, H 64, E 32) must then reverse >= 90% of 200 held-out strings exactly
    with greedy decoding (typically 100%), and >= 90% of 50 with beam search."""
    cfg = Config(vocab_size=NUM_SPECIAL + 10, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=20, type_vocab_size=6,
                 hidden_act="gelu_new")
    model = Model(cfg, dtype="float32", seed=LEARNING_SEED)
    rng = np.random.default_rng(LEARNING_SEED)
    held_out = digit_strings(rng, 200)
    held_out_set = {tuple(s) for s in held_out}
    flat = model.params.flat
    first_moment, second_moment = np.zeros_like(flat), np.zeros_like(flat)
    beta1, beta2, epsilon, peak_lr, warmup = 0.9, 0.999, 1e-8, 2e-3, 100
    for step in range(1, LEARNING_STEPS + 1):
        sources = [s for s in digit_strings(rng, 72) if tuple(s) not in held_out_set][:64]
        batch = seq2seq_finetune_batch([(s, s[::-1]) for s in sources], 16, cfg.vocab_size, seed=[LEARNING_SEED, step])
        _result = model.loss_and_grads(**batch.model_inputs(model.backend))
        loss, grads = _result.loss, _result.grads
        gradient = np.concatenate([grads[name].reshape(-1) for name in model.params.keys()])
        first_moment = beta1 * first_moment + (1 - beta1) * gradient
        second_moment = beta2 * second_moment + (1 - beta2) * gradient * gradient
        lr = peak_lr * min(1.0, step / warmup)
        flat -= lr * (first_moment / (1 - beta1 ** step)) / (np.sqrt(second_moment / (1 - beta2 ** step)) + epsilon)
    assert float(loss) < 0.1
    out = generate(model, held_out, max_length=8)
    exact = np.mean([o == s[::-1] for o, s in zip(out.sequences, held_out)])
    print(f"learning test: seed {LEARNING_SEED}, {LEARNING_STEPS} steps, final loss {float(loss):.4f}, "
          f"greedy exact match {exact:.3f}")
    assert exact >= 0.9
    beam = generate(model, held_out[:50], max_length=8, beam_size=3, length_penalty_alpha=0.6)
    assert np.mean([o == s[::-1] for o, s in zip(beam.sequences, held_out[:50])]) >= 0.9
