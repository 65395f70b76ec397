"""Tests for ref_bert.data: tokenizer, ALBERT example creation, n-gram masking, the dataset stream.

Statistical tests use binomial standard deviations: a frequency estimated from N independent
Bernoulli(p) draws has standard deviation sqrt(p (1 - p) / N). The tolerance is 4 of them, so a
correct implementation fails by chance with probability about 6e-5 per check (and the seeds are fixed,
so a run is reproducible), while the alternatives the checks guard against (uniform n, reversed
preference, 1/n^2, no keep/random split) sit tens of deviations away at these sample sizes.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ref_bert import Config, Model
from ref_bert.data import (BATCH_KEYS, CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, PretrainingDataset, SentencePair,
                           SentencePairStream, Tokenizer,
                           assemble_pair, create_masked_lm_predictions, create_sentence_pairs, default_corpus_path,
                           masking_budget, ngram_probabilities, read_corpus, truncate_seq_pair, whole_words)

IGNORE = -100
T = 64  # sequence length for most dataset tests: short keeps them fast, long enough for real pairs


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(None, vocab_size=1000)


@pytest.fixture(scope="module")
def config():
    return Config.preset("tiny")  # vocab_size 1000, max_position_embeddings 128


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def binomial_tolerance(p, n, k=4.0):
    return k * np.sqrt(p * (1 - p) / n)


# --- tokenizer ---------------------------------------------------------------------------------
def test_special_ids_and_pieces(tokenizer):
    assert (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID) == (0, 1, 2, 3, 4)
    pieces = [tokenizer.id_to_piece(i) for i in range(5)]
    assert pieces == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.vocab_size == 1000
    assert tokenizer.piece_to_id("[MASK]") == MASK_ID
    assert not set(tokenizer.ordinary_ids.tolist()) & {0, 1, 2, 3, 4}
    assert len(tokenizer.ordinary_ids) == 995


def test_encode_decode_round_trip_without_specials(tokenizer):
    text = "The Congress shall have Power to lay and collect Taxes."
    ids = tokenizer.encode(text)
    assert ids and all(i not in (PAD_ID, CLS_ID, SEP_ID, MASK_ID) for i in ids)
    assert tokenizer.decode(ids) == text
    # The string "[CLS]" in text is ordinary characters: control symbols never come from encode.
    assert CLS_ID not in tokenizer.encode("a [CLS] b [SEP] c [MASK]")
    assert tokenizer.decode([CLS_ID, *ids, SEP_ID, PAD_ID]) == text


def test_is_word_start_is_the_u2581_marker(tokenizer):
    starts = [i for i in range(tokenizer.vocab_size) if tokenizer.is_word_start(i)]
    assert starts == [i for i in range(tokenizer.vocab_size) if tokenizer.id_to_piece(i).startswith("\u2581")]
    assert 0 < len(starts) < tokenizer.vocab_size
    ids = tokenizer.encode("House of Representatives")
    assert tokenizer.is_word_start(ids[0])
    assert sum(tokenizer.is_word_start(i) for i in ids) == 3


def test_save_load_is_byte_identical(tokenizer, tmp_path):
    path = tmp_path / "spiece.model"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert path.read_bytes() == tokenizer.model_proto == loaded.model_proto
    text = "It was the best of times, it was the worst of times."
    assert loaded.encode(text) == tokenizer.encode(text)


def test_training_is_deterministic_and_depends_on_corpus(tmp_path):
    sentences = read_corpus(default_corpus_path())
    flat = [s for doc in sentences for s in doc]
    a = Tokenizer.train(flat[:400], vocab_size=300, seed=0, out_path=tmp_path / "a.model")
    b = Tokenizer.train(flat[:400], vocab_size=300, seed=0)
    c = Tokenizer.train(flat[400:800], vocab_size=300, seed=0)
    assert a.model_proto == b.model_proto == (tmp_path / "a.model").read_bytes()
    assert a.model_proto != c.model_proto


def test_lower_case_flag():
    sentences = [s for doc in read_corpus(default_corpus_path())[:20] for s in doc]
    tok = Tokenizer.train(sentences, vocab_size=200, lower_case=True)
    assert tok.lower_case
    assert tok.encode("THE CAT") == tok.encode("the cat")
    assert not any(tok.id_to_piece(i).lower() != tok.id_to_piece(i) for i in range(5, tok.vocab_size))


def test_tokenizer_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.load(write(tmp_path, "junk.model", b"\x00\x01 not a model"))
    with pytest.raises(ValueError, match=r"too small for vocab_size=30000: .* at most (\d+) pieces") as info:
        Tokenizer.train(None, vocab_size=30000)
    largest = int(re.search(r"--set vocab_size=(\d+)", str(info.value)).group(1))
    assert Tokenizer.train(None, vocab_size=largest).vocab_size == largest   # the size named works
    with pytest.raises(ValueError, match="vocab_size=3 is invalid"):
        Tokenizer.train(["a b c"], vocab_size=3)
    with pytest.raises(ValueError, match="no non-empty sentences"):
        Tokenizer.train(["", "   "], vocab_size=100)


def test_load_rejects_a_model_with_another_id_layout(tmp_path):
    import io

    import sentencepiece as spm
    writer = io.BytesIO()
    # SentencePiece's defaults: unk 0, bos 1, eos 2, no pad. Not ALBERT's layout.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["the cat sat on the mat"] * 50), model_writer=writer,
                                   vocab_size=15, minloglevel=2, num_threads=1)
    with pytest.raises(ValueError, match="pad_id=-1, expected 0"):
        Tokenizer(writer.getvalue())


# --- corpus ------------------------------------------------------------------------------------
def test_default_corpus_is_packaged_and_usable():
    path = default_corpus_path()
    with open(path, "rb") as f:
        size = len(f.read())
    assert 100_000 <= size <= 300_000
    documents = read_corpus(path)
    assert len(documents) >= 80
    assert all(len(d) >= 2 for d in documents)  # every document can give a SOP pair
    assert not any(s.startswith("#") for d in documents for s in d)  # header/source comments skipped
    assert sum(len(d) for d in documents) >= 800


def test_corpus_format(tmp_path):
    text = ("# a comment\nFirst one.\nFirst two.\n# comments do not end a document\nFirst three.\n"
            "\n \t \n\nSecond one.\n  Second two.  \n\n")
    assert read_corpus(write(tmp_path, "c.txt", text)) == [
        ["First one.", "First two.", "First three."], ["Second one.", "Second two."]]
    crlf = "\ufeffA.\r\nB.\r\n\r\nC.\r\nD.\r\n"
    assert read_corpus(write(tmp_path, "d.txt", crlf)) == [["A.", "B."], ["C.", "D."]]


def test_corpus_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="is a directory; expected a file"):
        read_corpus(tmp_path)
    with pytest.raises(ValueError, match="contains no sentences"):
        read_corpus(write(tmp_path, "empty.txt", ""))
    with pytest.raises(ValueError, match="contains no sentences"):
        read_corpus(write(tmp_path, "blank.txt", "# only a comment\n\n   \n"))
    bad = "Good line.\nAnother good line.\nBad \xe9 here.".encode("utf-8")
    bad = bad.replace("\xe9".encode("utf-8"), b"\xff")
    with pytest.raises(ValueError, match=r"byte 0xff at byte offset 34 \(line 3\)"):
        read_corpus(write(tmp_path, "bad.txt", bad))
    with pytest.raises(ValueError, match="no document with at least two sentences"):
        PretrainingDataset(write(tmp_path, "one.txt", "Only one sentence here.\n"), tokenizer)
    with pytest.raises(ValueError, match=r"no document with at least two sentences \(3 sentence\(s\) in 3"):
        PretrainingDataset(write(tmp_path, "three.txt", "One doc.\n\nTwo doc.\n\nThree doc.\n"), tokenizer)


# --- sentence-order pairs ----------------------------------------------------------------------
def synthetic_document(num_sentences=12, rng=None):
    """Sentences of distinct ids (sentence k holds ids 100k, 100k+1, ...), so order is checkable."""
    rng = rng or np.random.default_rng(0)
    return [[100 * k + j for j in range(int(rng.integers(1, 9)))] for k in range(1, num_sentences + 1)]


def test_pairs_split_at_sentence_boundaries_and_swap_is_labelled():
    labels = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        document = synthetic_document(rng=rng)
        for pair in create_sentence_pairs(document, max_seq_length=1000, short_seq_prob=0.0, rng=rng):
            first, second = (pair.tokens_a, pair.tokens_b) if pair.sop_label == 0 else (pair.tokens_b, pair.tokens_a)
            # Untruncated (length 1000): "first" ends a sentence and "second" starts the next one.
            sentence_of = lambda t: t // 100
            assert first[-1] == document[sentence_of(first[-1]) - 1][-1]
            assert second[0] == document[sentence_of(first[-1])][0]
            assert first + second == [t for s in document[sentence_of(first[0]) - 1:sentence_of(second[-1])]
                                      for t in s]
            labels.append(pair.sop_label)
    # Label 1 with probability 1/2 per pair.
    assert abs(np.mean(labels) - 0.5) < binomial_tolerance(0.5, len(labels))


def test_pairs_fill_the_target_and_short_seq_prob_shortens():
    max_seq_length = 40
    full, short = [], []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        document = synthetic_document(30, rng)
        for prob, lengths in ((0.0, full), (1.0, short)):
            pairs = create_sentence_pairs(document, max_seq_length, prob, rng)
            # All but the document's last pair are closed by reaching the target, then truncated.
            lengths += [len(p.tokens_a) + len(p.tokens_b) for p in pairs[:-1]]
            assert all(len(p.tokens_a) >= 1 and len(p.tokens_b) >= 1 for p in pairs)
    assert set(full) == {max_seq_length - 3}
    assert max(short) <= max_seq_length - 3 and np.mean(np.array(short) < max_seq_length - 3) > 0.5


def test_lone_last_sentence_is_dropped_not_paired_with_another_document():
    rng = np.random.default_rng(0)
    # Target 7 - 3 = 4 tokens: the first two sentences close a chunk, the third is left alone.
    pairs = create_sentence_pairs([[10, 11, 12], [20, 21], [30]], max_seq_length=7, short_seq_prob=0.0, rng=rng)
    assert len(pairs) == 1
    assert len(pairs[0].tokens_a) + len(pairs[0].tokens_b) == 4
    assert set(pairs[0].tokens_a + pairs[0].tokens_b) <= {10, 11, 12, 20, 21}
    assert 30 not in pairs[0].tokens_a + pairs[0].tokens_b


def test_truncate_seq_pair_trims_the_longer_side_from_random_ends():
    front = back = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        a, b = list(range(10)), list(range(100, 104))
        truncate_seq_pair(a, b, 9, rng)
        assert len(a) + len(b) == 9 and b == [100, 101, 102, 103]  # only the longer side (A) shrinks
        assert a == list(range(a[0], a[0] + 5))  # a contiguous run: tokens left from the ends only
        front += a[0] > 0
        back += a[-1] < 9
    assert front > 0 and back > 0
    a, b = [1, 2], [3, 4]
    truncate_seq_pair(a, b, 3, np.random.default_rng(0))
    assert a == [1, 2] and len(b) == 1  # tie: B is trimmed, as in ALBERT


def test_assemble_pair_layout():
    tokens, types = assemble_pair([7, 8], [9, 10, 11])
    assert tokens.tolist() == [CLS_ID, 7, 8, SEP_ID, 9, 10, 11, SEP_ID]
    assert types.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# --- masking -----------------------------------------------------------------------------------
def test_masking_budget_is_albert_formula():
    assert masking_budget(128, 0.15, 20) == 19
    assert masking_budget(512, 0.15, 20) == 20  # capped by max_predictions_per_seq
    assert masking_budget(3, 0.15, 20) == 1  # at least one
    assert masking_budget(30, 0.15, 20) == 4  # Python round of 4.4999...
    assert np.allclose(ngram_probabilities(3), [6 / 11, 3 / 11, 2 / 11])


def word_start_table_for(vocab_size, continuation_ids):
    table = np.ones(vocab_size, dtype=bool)
    table[list(continuation_ids)] = False
    return table


def test_whole_words_grouping():
    table = word_start_table_for(50, {21, 22})
    tokens = np.array([CLS_ID, 10, 21, 22, 11, SEP_ID, 21, 12, 21, SEP_ID])
    assert whole_words(tokens, table) == [[1, 2, 3], [4], [6], [7, 8]]


def test_masks_are_whole_words_within_budget_and_never_specials(tokenizer):
    dataset = PretrainingDataset(tokenizer=tokenizer, max_seq_length=T, seed=3)
    rng = np.random.default_rng(0)
    for document in dataset.documents[:40]:
        for pair in create_sentence_pairs(document, T, 0.1, rng):
            tokens, _ = assemble_pair(pair.tokens_a, pair.tokens_b)
            result = create_masked_lm_predictions(tokens, tokenizer.word_start_table, tokenizer.ordinary_ids, rng)
            selected = result.mlm_labels != IGNORE
            assert 1 <= selected.sum() <= masking_budget(len(tokens), 0.15, 20)
            assert not selected[(tokens == CLS_ID) | (tokens == SEP_ID)].any()
            assert np.array_equal(result.mlm_labels[selected], tokens[selected])  # labels are the originals
            assert np.array_equal(result.input_ids[~selected], tokens[~selected])  # nothing else changes
            for word in whole_words(tokens, tokenizer.word_start_table):
                assert selected[word].all() or not selected[word].any()
            assert sum(used for _, used in result.ngram_draws) <= len(result.ngram_draws) * 3


def test_overflowing_ngrams_fall_back_to_shorter_ones():
    # Budget 1 (7 tokens * 0.15 rounds to 1). Words: [10 21] [11 22] [12] [13 23]: only the single-piece
    # word fits. Without the shorter-n fallback, a draw of n >= 2 starting at it would be skipped and
    # (each start word being visited once) nothing would be masked in about 5/11 of the seeds.
    table = word_start_table_for(50, {21, 22, 23})
    tokens = np.array([CLS_ID, 10, 21, 11, 22, 12, 13, 23, SEP_ID])
    budget = masking_budget(len(tokens), 0.15, 20)
    assert budget == 1
    shortened = 0
    for seed in range(200):
        result = create_masked_lm_predictions(tokens, table, np.arange(5, 50), np.random.default_rng(seed))
        assert (result.mlm_labels != IGNORE).nonzero()[0].tolist() == [5]
        shortened += any(drawn > used > 0 for drawn, used in result.ngram_draws)
    assert shortened > 50  # the fallback was exercised, not just single draws of n = 1


def test_ngram_lengths_masked_fraction_and_80_10_10(tokenizer):
    """Statistics over 8 epochs of the default corpus at T=128 (about 2000 sequences, 230k tokens,
    16k n-gram draws, 34k selected tokens).

    n-gram length: measured as drawn, before budget shortening and before overlap skips, one draw per
    candidate start word visited; these draws are independent categorical(6/11, 3/11, 2/11), so each
    frequency has a binomial standard deviation. (What ends up masked is biased toward short n-grams
    by the budget and by overlaps; measured here about 0.64 / 0.23 / 0.13, not asserted.)

    Masked fraction: each sequence masks min(20, round(0.15 n)) tokens when whole words can fill
    the budget; with no cap it should be 0.15 of all tokens. Checked (a) that the budget is filled
    (>= 99% of it overall: only a budget remainder smaller than every remaining word goes unused) and
    (b) that the fraction is within 4 binomial deviations of 0.15 for the token count. A per-token
    Bernoulli variance overstates the noise (the count per sequence is fixed), so (b) is a loose
    bound; its systematic part, rounding round(0.15 n) / n (19/128 = 0.1484 for a full sequence), was
    measured at 0.1488, about 1.6 deviations below 0.15.

    80/10/10: independent per selected token. "Kept" also includes random draws that happen to pick
    the original (probability 0.1 / 995), negligible at this sample size.
    """
    EPOCHS = 8
    dataset = PretrainingDataset(tokenizer=tokenizer, max_seq_length=128, seed=0)
    rng = np.random.default_rng(1)
    drawn, tokens_total, selected_total, budget_total = [], 0, 0, 0
    mask_count = keep_count = 0
    for _ in range(EPOCHS):
        for document in dataset.documents:
            for pair in create_sentence_pairs(document, 128, 0.1, rng):
                tokens, _ = assemble_pair(pair.tokens_a, pair.tokens_b)
                result = create_masked_lm_predictions(tokens, tokenizer.word_start_table, tokenizer.ordinary_ids,
                                                      rng, max_predictions_per_seq=10**6)
                drawn += [n for n, _ in result.ngram_draws]
                selected = result.mlm_labels != IGNORE
                tokens_total += len(tokens)
                selected_total += int(selected.sum())
                budget_total += masking_budget(len(tokens), 0.15, 10**6)
                mask_count += int((result.input_ids[selected] == MASK_ID).sum())
                keep_count += int((result.input_ids[selected] == tokens[selected]).sum())
    drawn = np.array(drawn)
    assert len(drawn) > 15_000
    for n, p in zip((1, 2, 3), (6 / 11, 3 / 11, 2 / 11)):
        assert abs(np.mean(drawn == n) - p) < binomial_tolerance(p, len(drawn)), (n, np.mean(drawn == n))
    print(f"n-gram draws {len(drawn)}: " + ", ".join(f"{np.mean(drawn == n):.4f}" for n in (1, 2, 3))
          + f"; masked {selected_total}/{tokens_total} = {selected_total / tokens_total:.4f} (budget "
          f"{budget_total}); [MASK] {mask_count / selected_total:.4f}, kept {keep_count / selected_total:.4f}")
    assert tokens_total > 200_000
    assert selected_total >= 0.99 * budget_total
    assert abs(selected_total / tokens_total - 0.15) < binomial_tolerance(0.15, tokens_total)
    assert abs(mask_count / selected_total - 0.8) < binomial_tolerance(0.8, selected_total)
    assert abs(keep_count / selected_total - 0.1) < binomial_tolerance(0.1, selected_total)


def test_no_masking_when_prob_is_zero():
    tokens = np.array([CLS_ID, 10, 11, SEP_ID, 12, SEP_ID])
    result = create_masked_lm_predictions(tokens, np.ones(50, bool), np.arange(5, 50), np.random.default_rng(0),
                                          masked_lm_prob=0.0)
    assert (result.mlm_labels == IGNORE).all() and np.array_equal(result.input_ids, tokens)


def test_custom_ngram_probs():
    tokens = np.array([CLS_ID, *range(10, 40), SEP_ID, *range(10, 40), SEP_ID])
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(20):
        result = create_masked_lm_predictions(tokens, np.ones(50, bool), np.arange(5, 50), rng,
                                              ngram_probs=[0.0, 1.0])
        draws += [n for n, _ in result.ngram_draws]
    assert set(draws) == {2}
    with pytest.raises(ValueError, match="ngram_probs"):
        create_masked_lm_predictions(tokens, np.ones(50, bool), np.arange(5, 50), rng, ngram_probs=[0.5, 0.4])


# --- dataset -----------------------------------------------------------------------------------
def test_batch_layout(tokenizer, config):
    dataset = PretrainingDataset(tokenizer=tokenizer, batch_size=16, max_seq_length=T, config=config, seed=0)
    batch = next(dataset)
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        assert batch[key].dtype == np.int64
        assert batch[key].shape == ((16,) if key == "sop_labels" else (16, T))
    ids, types, attention, labels = (batch[k] for k in ("input_ids", "token_type_ids", "attention_mask",
                                                        "mlm_labels"))
    for b in range(16):
        n = int(attention[b].sum())
        assert attention[b, :n].all() and not attention[b, n:].any()
        assert (ids[b, n:] == PAD_ID).all() and (labels[b, n:] == IGNORE).all() and (types[b, n:] == 0).all()
        assert ids[b, 0] == CLS_ID and ids[b, n - 1] == SEP_ID
        seps = np.flatnonzero(ids[b, :n] == SEP_ID)
        assert len(seps) == 2
        assert (types[b, :seps[0] + 1] == 0).all() and (types[b, seps[0] + 1:n] == 1).all()
        assert ((labels[b] != IGNORE) == (labels[b] >= 0)).all()
    assert set(np.unique(batch["sop_labels"])) <= {0, 1}
    assert ids.max() < config.vocab_size and labels.max() < config.vocab_size


def test_batch_feeds_the_model(tokenizer, config):
    dataset = PretrainingDataset(tokenizer=tokenizer, batch_size=2, max_seq_length=32, config=config, seed=0)
    model = Model(config, backend="numpy", dtype="float64", seed=0)
    _result = model.loss_and_grads(**next(dataset))
    loss, grads, parts = _result.loss, _result.grads, _result.parts
    # Untrained: MLM loss near ln(V) = 6.9, SOP near ln 2 = 0.69.
    assert 6.0 < float(parts["mlm"]) < 8.0 and 0.4 < float(parts["sop"]) < 1.0
    assert all(np.isfinite(g).all() for g in grads.values())


def test_same_seed_same_batches_different_seed_different(tokenizer):
    def batches(seed, k=5):
        dataset = PretrainingDataset(tokenizer=tokenizer, batch_size=8, max_seq_length=T, seed=seed)
        return [next(dataset) for _ in range(k)]

    first, again, other = batches(0), batches(0), batches(1)
    for a, b in zip(first, again):
        for key in BATCH_KEYS:
            assert np.array_equal(a[key], b[key])
    assert not all(np.array_equal(a["input_ids"], c["input_ids"]) for a, c in zip(first, other))


def test_epochs_reshuffle_and_remask(tokenizer):
    dataset = PretrainingDataset(tokenizer=tokenizer, max_seq_length=T, seed=0)
    e0, e1 = dataset.epoch_examples(0), dataset.epoch_examples(1)
    assert not np.array_equal(e0["input_ids"][:10], e1["input_ids"][:10])
    # Same text, different cut: the number of examples per epoch is about the same, not equal by design.
    assert abs(len(e0["sop_labels"]) - len(e1["sop_labels"])) < 0.2 * len(e0["sop_labels"])


def test_stream_crosses_epochs_without_gap_or_repeat(tokenizer):
    dataset = PretrainingDataset(tokenizer=tokenizer, batch_size=64, max_seq_length=T, seed=0)
    n0 = len(dataset.epoch_examples(0)["sop_labels"])
    stream = np.concatenate([dataset.epoch_examples(0)["input_ids"], dataset.epoch_examples(1)["input_ids"]])
    got = np.concatenate([next(dataset)["input_ids"] for _ in range(n0 // 64 + 2)])
    assert np.array_equal(got, stream[:len(got)])
    assert dataset.epoch == 1 and dataset.position == len(got) - n0


def test_state_dict_resumes_exactly(tokenizer):
    kwargs = dict(tokenizer=tokenizer, batch_size=48, max_seq_length=T, seed=7)
    original = PretrainingDataset(**kwargs)
    for _ in range(11):  # past the end of epoch 0, so the saved position is inside epoch 1
        next(original)
    state = json.loads(json.dumps(original.state_dict()))
    assert state["epoch"] >= 1
    expected = [next(original) for _ in range(3)]
    resumed = PretrainingDataset(**kwargs)
    resumed.load_state_dict(state)
    for a, b in zip(expected, (next(resumed) for _ in range(3))):
        for key in BATCH_KEYS:
            assert np.array_equal(a[key], b[key])


def test_load_state_dict_rejects_other_streams(tokenizer):
    dataset = PretrainingDataset(tokenizer=tokenizer, max_seq_length=T, seed=0)
    state = dataset.state_dict()
    with pytest.raises(ValueError, match="seed=1, expected this dataset's seed=0"):
        dataset.load_state_dict({**state, "seed": 1})
    other = PretrainingDataset(tokenizer=tokenizer, max_seq_length=T + 1, seed=0)
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="expected less than"):
        dataset.load_state_dict({**state, "position": 10**6})
    with pytest.raises(ValueError, match="keys"):
        dataset.load_state_dict({"epoch": 0})


def test_dataset_argument_errors(tokenizer, config, tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_length=4 is invalid: expected an integer >= 5"):
        PretrainingDataset(tokenizer=tokenizer, max_seq_length=4)
    with pytest.raises(ValueError, match=r"max_seq_length=129 is invalid: expected at most "
                                         r"config.max_position_embeddings=128"):
        PretrainingDataset(tokenizer=tokenizer, max_seq_length=129, config=config)
    with pytest.raises(ValueError, match=r"tokenizer vocab_size=1000 does not match config.vocab_size=30000"):
        PretrainingDataset(tokenizer=tokenizer, max_seq_length=T, config=Config.preset("albert-base"))
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        PretrainingDataset(tokenizer=tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="masked_lm_prob=1.5 is invalid"):
        PretrainingDataset(tokenizer=tokenizer, masked_lm_prob=1.5)
    with pytest.raises(ValueError, match="does not exist"):
        PretrainingDataset(tmp_path / "missing.txt", tokenizer)
    with pytest.raises(ValueError, match="tokenizer model file"):
        PretrainingDataset(tokenizer=tmp_path / "missing.model")


def test_defaults_train_a_tokenizer_from_the_config(config):
    dataset = PretrainingDataset(config=config, batch_size=2, max_seq_length=T)
    assert dataset.tokenizer.vocab_size == config.vocab_size
    assert next(dataset)["input_ids"].shape == (2, T)


# --- the stream of sentence pairs (UniLM's source) --------------------------------------------------
def test_sentence_pair_stream_yields_unmasked_pairs_and_resumes_exactly(tokenizer):
    kwargs = dict(tokenizer=tokenizer, batch_size=48, max_seq_length=T, seed=7)
    stream = SentencePairStream(**kwargs)
    for _ in range(11):  # past the end of epoch 0
        pairs = next(stream)
        assert len(pairs) == 48 and all(isinstance(p, SentencePair) for p in pairs)
        for pair in pairs:
            assert MASK_ID not in pair.tokens_a + pair.tokens_b            # nothing masked
            assert 2 <= len(pair.tokens_a) + len(pair.tokens_b) <= T - 3
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["epoch"] >= 1
    expected = [next(stream) for _ in range(3)]
    resumed = SentencePairStream(**kwargs)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(3)] == expected
    # A pair shorter than T - 3 was not truncated: in document order it is sentences i..j-1 and j..k-1
    # of one document.
    def runs(document):
        return {(i, j): [t for s in document[i:j] for t in s]
                for i in range(len(document)) for j in range(i + 1, len(document) + 1)}

    documents = [runs(d) for d in stream.documents]
    untruncated = [p for p in expected[0] if len(p.tokens_a) + len(p.tokens_b) < T - 3]
    assert untruncated
    for pair in untruncated:
        first, second = pair.in_document_order()
        assert any(first == d[i, j] and any(second == d.get((j, k)) for k in range(j + 1, j + 40))
                   for d in documents for (i, j) in d), pair
    # The ALBERT dataset is another consumer of the same stream: its state is not this stream's.
    with pytest.raises(ValueError, match="fingerprint"):
        PretrainingDataset(**kwargs).load_state_dict(state)


def test_in_document_order_undoes_the_swap():
    assert SentencePair([1, 2], [3], 0).in_document_order() == ([1, 2], [3])
    assert SentencePair([3], [1, 2], 1).in_document_order() == ([1, 2], [3])
