"""Checkpoint tokenizers (ref_bert.Tokenizer) against transformers' own, on a text set written for the test.

Every tokenizer is made here: a SentencePiece unigram model trained on the packaged corpus (plus lines with
numbers, so that pieces ending in a digit and a comma exist), and a WordPiece vocabulary trained with the
`tokenizers` library. What transformers 5.24 offers: AlbertTokenizer only on the `tokenizers` backend
(the sentencepiece-based "slow" ALBERT tokenizer is gone), BertTokenizer on `tokenizers` and the pure-Python
BertTokenizerLegacy. Ids, token type ids and attention masks must be equal, with two documented
exceptions, each checked to be exactly what it is said to be (docs/reference.md §7.1):

* ALBERT's digit-comma re-split ("3.0," -> "3.0" pieces + ","), which transformers 5 does not perform;
* SentencePiece and `tokenizers`' Unigram break ties between equally scored segmentations differently
  ("000" = "0" + "00" or "00" + "0"): a difference is allowed only where both are segmentations of the
  same text with the same total score.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer
from transformers.models.bert import BertTokenizerLegacy

import ref_bert
from ref_bert.data import Tokenizer as PretrainingTokenizer
from ref_bert.data import default_corpus_path, read_corpus
from ref_bert.tokenization import TOKENIZER_FILES, WORD_START, albert_prepare, truncate_pair

transformers.logging.set_verbosity_error()

NUMBER_LINE = "It cost 3.0, and 4.0, and 5.0, then 10,000, 20,000, 1,000, 3,0,"
NUMBERS = "It cost 3.0, then 4.5, and 10,000, 20,000, 1,000,000 or 7,5, in all."
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",                     # ASCII prose
    "Café ÉLAN naïve résumé Über façade Ångström",                      # accents
    "MiXeD CaSe WoRdS and ALLCAPS",                                     # mixed case
    NUMBERS, "3.0, 2,5, 1.000,5", "It was 3.0, then 1,000,000.5 and 2,5, ok",# numbers with commas and decimals
    "汉字测试，中文。日本語のテキスト", "한국어 텍스트",                     # CJK
    "emoji 🎉👍🏽 and ❤️ done",                                          # emoji (with a modifier and a selector)
    "x\x01y\x1fz\x85w\x00v\ufffdu\x7ft",                                # control characters
    "  lots   of \t\n space  \u3000wide\u2003space ",                  # runs of whitespace
    "a" * 120, "b" * 250, "word " + "xy" * 60 + " end",                 # very long words (> 100, > 200 chars)
    "", " ",                                                            # empty
    "the [MASK] is here", "the[MASK]is [SEP] x [CLS]",                  # special tokens written in the text
    "``quoted'' text and \"plain\" quotes", "ﬁﬂ ① ＡＢＣ ½",            # ALBERT's quote rule; NFKC/NFKD forms
    "don't stop-believing!!! (really?) #1 @home",
]
PAIRS = [("The quick brown fox.", "jumps over the lazy dog"), (NUMBERS, "short"),
         ("汉字测试", "Café résumé " * 8), ("tiny", "a b c d e f g h i j k l m n o p")]


@pytest.fixture(scope="module")
def sentences():
    # number-heavy lines make pieces such as "0," (ALBERT's re-split) and "00" (a Viterbi tie: "000")
    return [s for doc in read_corpus(default_corpus_path()) for s in doc] + [NUMBER_LINE] * 50


@pytest.fixture(scope="module")
def spiece(sentences):
    return PretrainingTokenizer.train(sentences, vocab_size=1000)


@pytest.fixture(scope="module")
def wordpiece_vocab(sentences):
    trained = HfTokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=False)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(sentences + TEXTS, trainers.WordPieceTrainer(
        vocab_size=700, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    return [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]


def hf_encode(tok, text, pair=None, **kwargs):
    e = tok(text, pair, return_token_type_ids=True, return_attention_mask=True, **kwargs)
    return e["input_ids"], e["token_type_ids"], e["attention_mask"]


def ours_encode(tok, text, pair=None, **kwargs):
    e = tok.encode(text, pair, **kwargs)
    return e.input_ids, e.token_type_ids, e.attention_mask


def resplit_fires(spiece, text, lower=False, keep_accents=True) -> bool:
    """Whether SentencePiece makes a piece ending in a digit and a comma from ``text`` (ALBERT's re-split)."""
    pieces = spiece._sp.encode(albert_prepare(text, lower, keep_accents), out_type=str)
    return any(len(p) > 1 and p[-1] == "," and p[-2].isdigit() for p in pieces)


def assert_equal_or_tie(ours, theirs, ours_tok, theirs_tok, text):
    """Equal encodings, or (SentencePiece only) equally scored segmentations of the same text."""
    if ours == theirs:
        return
    assert ours_tok.kind == "sentencepiece", (text, ours, theirs)
    assert ours[1:] == theirs[1:] or len(ours[0]) == len(theirs[0]), text     # token types and mask agree
    a, b = ours[0], theirs[0]
    pieces_a = [ours_tok.id_to_token(i) for i in a]
    pieces_b = theirs_tok.convert_ids_to_tokens(b)
    assert "".join(pieces_a) == "".join(pieces_b), (text, pieces_a, pieces_b)
    score = ours_tok._sp.get_score
    assert sum(score(i) for i in a) == pytest.approx(sum(score(i) for i in b), abs=1e-5), (text, pieces_a, pieces_b)


# --- SentencePiece (ALBERT) --------------------------------------------------------------------------
@pytest.mark.parametrize("lower,keep_accents,expected_ties", [(True, False, 0), (False, True, 1)])
def test_sentencepiece_matches_transformers_albert(spiece, tmp_path, lower, keep_accents, expected_ties):
    """Cased, the trained model segments "000" of "1,000,000.5" as "0"+"00" in sentencepiece and "00"+"0" in
    tokenizers' Unigram (equal scores): the one tie of the set, checked to be one."""
    ours = ref_bert.Tokenizer.from_sentencepiece(spiece.model_proto, do_lower_case=lower, keep_accents=keep_accents,
                                                 split_digit_comma=False)
    ours.save_hf(tmp_path / "saved")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "saved")          # reads the tokenizer.json save_hf wrote
    (tmp_path / "bare").mkdir()
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "bare" / name).write_bytes((tmp_path / "saved" / name).read_bytes())
    converted = AutoTokenizer.from_pretrained(tmp_path / "bare")        # converts spiece.model itself (protobuf)
    assert type(theirs).__name__ == type(converted).__name__ == "AlbertTokenizer"
    plain = HfTokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))   # the file alone, as other readers use it
    ties = 0
    for text in TEXTS:
        a, b = ours_encode(ours, text), hf_encode(theirs, text)
        assert b == hf_encode(converted, text) and b[0] == plain.encode(text).ids, text
        ties += a != b
        assert_equal_or_tie(a, b, ours, theirs, text)
    for (x, y), m in itertools.product(PAIRS, (None, 9, 16)):
        kwargs = {} if m is None else dict(max_length=m, truncation=True)
        assert_equal_or_tie(ours_encode(ours, x, y, **kwargs), hf_encode(theirs, x, y, **kwargs),
                            ours, theirs, (x, y, m))
    assert ties == expected_ties


def test_albert_directory_saved_by_transformers_has_only_tokenizer_json(spiece, tmp_path):
    """transformers 5 saves an ALBERT tokenizer as tokenizer.json alone (no spiece.model): it is read through
    the `tokenizers` library's Unigram, so even the sentencepiece tie of the cased test above agrees."""
    ours = ref_bert.Tokenizer.from_sentencepiece(spiece.model_proto, do_lower_case=False, keep_accents=True,
                                                 split_digit_comma=False)
    ours.save_hf(tmp_path / "ours")
    AutoTokenizer.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "spiece.model").exists() and (tmp_path / "saved" / "tokenizer.json").is_file()
    again = ref_bert.Tokenizer.from_hf(tmp_path / "saved")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again.kind == "sentencepiece" and again.vocab_size == ours.vocab_size
    for text in TEXTS:
        assert ours_encode(again, text) == hf_encode(theirs, text), text
    for x, y in PAIRS:
        assert ours_encode(again, x, y, max_length=9, truncation=True) == hf_encode(theirs, x, y, max_length=9,
                                                                                    truncation=True)
    again.save_hf(tmp_path / "round")                     # written back as read
    assert (tmp_path / "round" / "tokenizer.json").read_bytes() == (tmp_path / "saved" / "tokenizer.json").read_bytes()
    # with ALBERT's re-split (the default when the config does not say): only the re-split differs
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    del config["split_digit_comma"]
    (tmp_path / "saved" / "tokenizer_config.json").write_text(json.dumps(config))
    resplit = ref_bert.Tokenizer.from_hf(tmp_path / "saved")
    assert resplit.options["split_digit_comma"] is True
    assert "0," in theirs.tokenize(NUMBERS) and "0," not in resplit.tokenize(NUMBERS)


def test_albert_digit_comma_resplit(spiece, tmp_path):
    """ALBERT's rule on the trained model: the raw pieces of "3.0," end in the piece "0,"; ALBERT re-encodes
    "0" and appends ","; transformers 5 (no re-split) keeps "0,"."""
    ours = ref_bert.Tokenizer.from_sentencepiece(spiece.model_proto, do_lower_case=True, keep_accents=False)
    raw = spiece._sp.encode(albert_prepare("It was 3.0, yes", True, False), out_type=str)
    assert raw == ["▁It", "▁was", "▁", "3", ".", "0,", "▁yes"] or "0," in raw   # precondition: "0," is a piece
    assert "0," in raw
    tokens = ours.tokenize("It was 3.0, yes")
    assert "0," not in tokens and tokens[tokens.index(",") - 1] == "0"
    # on the number-heavy text: no piece ends in a digit and a comma, and the text covered is the same
    pieces = ours.tokenize(NUMBERS)
    assert not any(len(p) > 1 and p[-1] == "," and p[-2].isdigit() for p in pieces)
    raw = spiece._sp.encode(albert_prepare(NUMBERS, True, False), out_type=str)
    assert "".join(pieces) == "".join(raw) and len(pieces) > len(raw)
    # exactly where the rule fires does transformers differ
    ours.save_hf(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["split_digit_comma"] is True
    assert theirs.convert_ids_to_tokens(theirs(NUMBERS)["input_ids"])[1:-1] != pieces
    for text in TEXTS:
        if not resplit_fires(spiece, text, True, False):
            assert_equal_or_tie(ours_encode(ours, text), hf_encode(theirs, text), ours, theirs, text)


def test_pretraining_tokenizer_is_the_checkpoint_tokenizer(spiece, tmp_path):
    """The pretraining data's ids are the checkpoint tokenizer's (same text preparation), and a run directory's
    tokenizer reaches save_hf: transformers then gives the same ids (where the re-split does not fire)."""
    ours = ref_bert.Tokenizer.from_sentencepiece(spiece)
    assert ours.options == {"do_lower_case": False, "keep_accents": True, "split_digit_comma": True}
    for text in TEXTS:
        if "[" not in text:                # the pretraining tokenizer never makes specials from text
            assert spiece.encode(text) == ours.encode(text).input_ids[1:-1], text
    model = ref_bert.Model(ref_bert.Config.preset("tiny"), dtype="float32", seed=0)
    from ref_bert.checkpoint import load_any, save_model
    save_model(model, tmp_path / "run")
    spiece.save_to(tmp_path / "run")
    loaded, _ = load_any(tmp_path / "run")
    assert loaded.tokenizer is not None and loaded.tokenizer.options == ours.options
    assert ref_bert.Tokenizer.from_hf(tmp_path / "run").options == ours.options     # a bare spiece.model: the job's
    loaded.save_hf(tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (t for t in TEXTS if not resplit_fires(spiece, t)):
        assert_equal_or_tie(ours_encode(ours, text), hf_encode(theirs, text), ours, theirs, text)
    # settings other than the job's defaults travel in tokenizer_config.json
    lowered = PretrainingTokenizer(spiece.model_proto, lower_case=True, keep_accents=False)
    lowered.save_to(tmp_path / "lowered")
    again = PretrainingTokenizer.load(tmp_path / "lowered")
    assert (again.lower_case, again.keep_accents) == (True, False)
    assert again.encode("Café ÉLAN") == ref_bert.Tokenizer.from_hf(tmp_path / "lowered").encode("Café ÉLAN").input_ids[1:-1]


# --- WordPiece (BERT) --------------------------------------------------------------------------------
@pytest.mark.parametrize("lower,strip,chinese", [(True, None, True), (False, None, True), (True, False, True),
                                                 (False, True, False)])
def test_wordpiece_matches_transformers_bert_fast_and_slow(wordpiece_vocab, tmp_path, lower, strip, chinese):
    ours = ref_bert.Tokenizer.from_wordpiece_vocab(wordpiece_vocab, do_lower_case=lower, strip_accents=strip,
                                                   tokenize_chinese_chars=chinese)
    ours.save_hf(tmp_path)
    again = ref_bert.Tokenizer.from_hf(tmp_path)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=lower, strip_accents=strip,
                               tokenize_chinese_chars=chinese)
    assert type(fast).__name__ == "BertTokenizer"
    for text in TEXTS:
        expected = ours_encode(ours, text)
        assert expected == hf_encode(fast, text) == hf_encode(slow, text) == ours_encode(again, text), text
    assert ours.tokenize("a" * 100) != ["[UNK]"] and ours.tokenize("a" * 101) == ["[UNK]"]   # BERT's 100 characters
    for x, y in PAIRS:
        assert ours_encode(ours, x, y) == hf_encode(fast, x, y) == hf_encode(slow, x, y), (x, y)
        assert ours_encode(ours, x, y, max_length=12, truncation=True) == hf_encode(
            fast, x, y, max_length=12, truncation=True), (x, y)


def test_truncation_is_longest_first_as_tokenizers_does(wordpiece_vocab, tmp_path):
    """Every pair of lengths 1..6 and max_length 3..11 against transformers' BertTokenizer (tokenizers'
    longest_first). The pure-Python BertTokenizerLegacy cuts one token at a time, the pair first on ties,
    so with an odd room it gives the extra token to the other sequence: that, and only that, differs."""
    ours = ref_bert.Tokenizer.from_wordpiece_vocab(wordpiece_vocab)
    ours.save_hf(tmp_path)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"))
    swapped = 0
    for n1, n2, m in itertools.product(range(1, 7), range(1, 7), range(3, 12)):
        a, b = " ".join(["the"] * n1), " ".join(["of"] * n2)
        expected = ours_encode(ours, a, b, max_length=m, truncation=True)
        assert expected == hf_encode(fast, a, b, max_length=m, truncation=True), (n1, n2, m)
        old = hf_encode(slow, a, b, max_length=m, truncation=True)
        if old != expected:
            k1, k2 = expected[1].count(0) - 2, expected[1].count(1) - 1
            assert old[1].count(0) - 2 == k2 and old[1].count(1) - 1 == k1 and abs(k1 - k2) == 1, (n1, n2, m)
            swapped += 1
    assert swapped > 0
    assert truncate_pair(list(range(5)), None, 3) == ([0, 1, 2], None)


# --- bad input ---------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_value_error(wordpiece_vocab, tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer: looked for " + ", ".join(TOKENIZER_FILES)):
        ref_bert.Tokenizer.from_hf(tmp_path)
    tok = ref_bert.Tokenizer.from_wordpiece_vocab(wordpiece_vocab)
    with pytest.raises(ValueError, match="tokenizes to 52 tokens .* more than max_length=20"):
        tok.encode(" ".join(["the"] * 50), max_length=20)
    assert len(tok.encode(" ".join(["the"] * 50), max_length=20, truncation=True)) == 20
    with pytest.raises(ValueError, match=r"text 1 \('the the"):
        tok.batch(["short", "the " * 30], max_length=20)
    batch = tok.batch(["short", "the " * 30], max_length=20, truncation=True)
    n = len(tok.encode("short"))
    assert batch["input_ids"].shape == (2, 20) and batch["attention_mask"][0].sum() == n
    assert (batch["input_ids"][0, n:] == tok.pad_id).all() and batch["input_ids"][0, n - 1] == tok.sep_id
    with pytest.raises(ValueError, match="max_length=2 is invalid"):
        tok.encode("a", "b", max_length=2, truncation=True)
    (tmp_path / "vocab.txt").write_text("a\nb\n[UNK]\n")
    with pytest.raises(ValueError, match=r"the cls token '\[CLS\]' is not in the vocabulary"):
        ref_bert.Tokenizer.from_hf(tmp_path)


def test_vocab_size_must_match_the_embedding_rows(wordpiece_vocab, tmp_path):
    tok = ref_bert.Tokenizer.from_wordpiece_vocab(wordpiece_vocab)
    config = ref_bert.Config(vocab_size=len(wordpiece_vocab) + 3, embedding_size=16, hidden_size=16,
                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=16, model_type="bert", sharing="none")
    model = ref_bert.Model(config, dtype="float32")
    model.save_hf(tmp_path)
    tok.save_hf(tmp_path)
    message = f"the tokenizer has {len(wordpiece_vocab)} tokens but the model's word embeddings have {len(wordpiece_vocab) + 3} rows"
    with pytest.raises(ValueError, match=message):
        ref_bert.Model.from_hf(tmp_path)
    assert ref_bert.Model.from_hf(tmp_path, tokenizer=False).tokenizer is None
    with pytest.raises(ValueError, match=message):
        model.tokenizer = tok
        model.save_hf(tmp_path / "again")
