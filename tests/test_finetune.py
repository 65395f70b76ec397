"""Tests of ``ref-bert finetune`` (ref_bert/finetune/, ref_bert/cli/finetune.py): the embedded data is
what its functions make, bad input is refused before anything is written, gradient accumulation equals
one batch, an interrupted and resumed run is bit-identical to an uninterrupted one, the SQuAD rules,
and each task's head learns its embedded data clearly beyond chance.

Runs use the tiny config with one SentencePiece model trained once for the module; the learning tests'
budgets (seed, steps, the figure reached) are in LEARNING below.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ref_bert import files
from ref_bert.cli import main
from ref_bert.config import Config
from ref_bert.data import Tokenizer, default_corpus_path
from ref_bert.finetune import TASKS, embedded_path, finetune, load_task_file, make_examples
from ref_bert.finetune import loop
from ref_bert.finetune.embedded import LIMITS, jsonl_bytes
from ref_bert.finetune.heads import loss_and_grads
from ref_bert.finetune.metrics import squad_f1, squad_normalize, squad_scores
from ref_bert.model import Model


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer") / "spiece.model"
    Tokenizer.train(default_corpus_path(), vocab_size=Config.preset("tiny").vocab_size, out_path=path)
    return str(path)


def _write(path: Path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# --- the embedded data ---------------------------------------------------------------------------------
def test_embedded_files_are_what_the_functions_make():
    for task in TASKS:
        made = make_examples(task)
        for split in ("train", "eval"):
            assert Path(embedded_path(task, split)).read_bytes() == jsonl_bytes(made[split]), (task, split)
            data = load_task_file(task, embedded_path(task, split))       # and they pass validation
            assert len(data.records) == len(made[split]) and 100 <= len(data.records) <= LIMITS[split]


# --- bad input: error, exit 2, nothing written -----------------------------------------------------------
BAD_INPUTS = {
    "label outside num_labels": ("classification", [{"text": "a b", "label": 0}, {"text": "c d", "label": 3}],
                                 ["--num-labels", "2"], r"line 2: label 3 is outside num_labels=2"),
    "span outside its context": ("qa", [{"context": "one two three", "question": "q?",
                                         "answers": [{"text": "three", "answer_start": 11}]}], [],
                                 r"line 1: answers\[0\] spans characters \[11, 16\), outside its context of 13"),
    "malformed JSON line": ("seq2seq", ['{"source": "a b", "target": "c"}', '{"source": "a b", "target": '], [],
                            r"train.jsonl line 2: not valid JSON"),
    "tag count": ("tokens", [{"tokens": ["A", "b"], "tags": ["O"]}], [], r"line 1: has 2 tokens but 1 tags"),
    "choice label": ("multiple-choice", [{"context": "c", "choices": ["x", "y"], "label": 2}], [],
                     r"line 1: 'label' 2 is outside the 2 choices"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_written(case, tmp_path, capsys, spiece):
    task, lines, extra, message = BAD_INPUTS[case]
    train = _write(tmp_path / "train.jsonl", lines)
    out = tmp_path / "out"
    code = main(["finetune", "--task", task, "--train", train, "--out", str(out), "--tokenizer", spiece,
                 "--steps", "2", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    import re
    assert re.search(message, err), err
    assert not out.exists()


def test_an_eval_file_is_validated_whole_before_training(tmp_path, capsys, spiece):
    train = _write(tmp_path / "train.jsonl", [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}])
    evaluation = _write(tmp_path / "eval.jsonl", [{"text": "a b", "label": "x"}] * 3 + [{"text": "e", "label": "z"}])
    code = main(["finetune", "--task", "classification", "--train", train, "--eval", evaluation, "--out",
                 str(tmp_path / "out"), "--tokenizer", spiece, "--no-progress"])
    assert code == 2
    assert "eval.jsonl line 4: label 'z' is not one of the 2 classes ['x', 'y']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_task_and_mismatched_head(tmp_path, capsys, spiece):
    assert main(["finetune", "--task", "ner", "--out", str(tmp_path / "a")]) == 2
    assert "task='ner' is invalid: expected one of classification, regression" in capsys.readouterr().err
    # A checkpoint whose architecture is a token-classification head cannot start a classification run.
    from ref_bert.checkpoint import save_model

    model = Model(Config.preset("tiny").with_head("token_classification", num_labels=3))
    init = save_model(model, tmp_path / "tagger")
    Tokenizer.load(spiece).save(init / "spiece.model")
    assert main(["finetune", "--task", "classification", "--init", str(init), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a AlbertForTokenClassification checkpoint; --task classification needs a " \
           "AlbertForSequenceClassification" in err
    assert not (tmp_path / "b").exists()


# --- gradient accumulation and exact resume ---------------------------------------------------------------
def test_accumulated_micro_batches_equal_one_batch(spiece, tmp_path):
    """tokens: micro-batch losses are means over their labelled tokens, so the weights are n_i / N."""
    cfg = loop.FinetuneConfig(task="tokens", out=str(tmp_path / "o"), tokenizer=spiece, seq_len=24, dtype="float64",
                              config_overrides={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    job = loop.prepare(cfg)
    model, be = job.model, job.model.backend
    arrays = [loop._host_batch(job, np.arange(i * 3, i * 3 + 3), 0) for i in range(2)]
    assert arrays[0][1] != arrays[1][1]      # unequal label counts: weighting by examples would be wrong
    accumulated, _ = loop.effective_batch_gradients(model, "tokens", arrays, training=False)
    whole = {k: np.concatenate([arrays[0][0][k], arrays[1][0][k]]) for k in arrays[0][0]}
    one = loss_and_grads(model, "tokens", {k: be.from_host(v) for k, v in whole.items()}, False, 1.0)
    # Errors relative to the largest gradient entry: a few tensors' exact gradient is 0 (the key bias:
    # softmax ignores a constant per query), where a per-tensor relative error is rounding over rounding.
    # Float64 sums taken in another order agree to ~1e-16 relative; 1e-12 leaves room, a wrong weight
    # (n_i / N replaced by b_i / B) is off by ~1e-2.
    scale = max(float(np.max(np.abs(g))) for g in one.grads.values())
    worst = max(float(np.max(np.abs(accumulated[k] - one.grads[k]))) for k in one.grads) / scale
    assert worst < 1e-12, worst


def _run_files(out: Path) -> dict:
    names = ("model.safetensors", "optimizer.safetensors")
    latest = files.read_pointer(out / "latest")
    return {n: files.load_tensors(latest / n)[0] for n in names}


@pytest.mark.parametrize("task", ["seq2seq"])
def test_interrupted_and_resumed_equals_uninterrupted(task, spiece, tmp_path):
    """seq2seq with dropout on and two micro-batches a step: the data order, the seq2seq masks (seeded
    by step), the dropout generator and the optimiser all come back from the checkpoint."""
    settings = dict(task=task, tokenizer=spiece, steps=6, batch_size=3, grad_accum=2, seq_len=24, lr=2e-3,
                    checkpoint_every=2, progress=False, eval="")
    settings.pop("eval")
    straight = finetune(out=str(tmp_path / "straight"), **settings)
    first = finetune(out=str(tmp_path / "resumed"), until=3, **settings)
    assert first.step == 3 and first.scores is None
    resumed = finetune(out=str(tmp_path / "resumed"), resume=True, progress=False)
    assert resumed.step == 6
    a, b = _run_files(tmp_path / "straight"), _run_files(tmp_path / "resumed")
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert np.array_equal(a[name][key], b[name][key]), (name, key)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert straight.scores == resumed.scores
    # A resume that changes the run's arithmetic is refused.
    with pytest.raises(ValueError, match="a resume keeps the checkpoint's settings"):
        finetune(out=str(tmp_path / "resumed"), resume=True, batch_size=4, steps=8)
    # A resume from an earlier checkpoint of the finished run moves its evaluation aside with the newer
    # checkpoints: OUT/eval.json describes the model OUT holds, or is absent.
    out = tmp_path / "resumed"
    assert json.loads((out / "eval.json").read_text())["step"] == 6
    finetune(out=str(out), resume=str(out / "checkpoints" / "step-000004"), until=5, progress=False)
    archive = out / "superseded" / "after-step-000004"
    assert not (out / "eval.json").exists() and json.loads((archive / "eval.json").read_text())["step"] == 6


# --- metrics ------------------------------------------------------------------------------------------------
def test_squad_rules():
    """evaluate-v1.1.py: articles, punctuation, case and spacing do not count; F1 over tokens; max over golds."""
    assert squad_normalize("  The  Cat, sat!") == "cat sat"
    assert squad_normalize("an apple a day") == "apple day"
    assert squad_f1("the cat sat", "a cat sat on the mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)   # P 2/2, R 2/4
    assert squad_f1("dog", "cat") == 0.0
    scores = squad_scores([["Paris", "the city of Paris"], ["x y"]], ["city of paris.", "y"])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1.0 + 2 * 1.0 * 0.5 / 1.5) / 2)


# --- learning: each head beyond chance on its embedded data ---------------------------------------------------
# task -> (settings, metric, floor). Seed 0, the tiny config from scratch with its dropout (0.1), batch 16
# unless set. The floor is chance plus a margin; the figure reached (measured) is in each comment.
#   classification: chance = the majority class's share of the eval file, 58/150 = 0.387 (essay);
#                   reached accuracy 0.733 in 300 steps of 64 tokens (at 200 steps, with the per-micro-batch
#                   dropout masks data parallelism needs, it is still at chance: 0.387; 250 steps: 0.5).
#   regression:     chance = Pearson 0 (a prediction independent of the text); reached 0.565 in 40 steps
#                   of 8 examples of 32 tokens (the target is the length in words / 10).
#   seq2seq:        chance = always decoding the majority kind, exact match 0.387; reached 0.78 after 250
#                   steps of 24 tokens at lr 2e-3 (greedy decoding of the source's kind).
#   tokens:         chance = entity F1 0 (tagging every word O; a tagger guessing at the tags' rates
#                   finds almost no whole chunk); reached F1 0.269 in 100 steps of 32 tokens at lr 2e-3.
#   multiple-choice: chance = 1/4; reached accuracy 0.793 in 40 steps of 4 examples (16 rows) of 32 tokens.
#   qa:             chance = the best input-blind span rule (the best fixed word span; it is the window's
#                   last two words): exact match 24.2% (the first two words: 10.1%); reached exact match
#                   47.7% (F1 64.9) in 150 steps of 32 tokens at lr 2e-3.
LEARNING = {
    "tokens": (dict(steps=100, seq_len=32, lr=2e-3), "f1", 0.15),
    "multiple-choice": (dict(steps=40, batch_size=4, seq_len=32), "accuracy", 0.25 + 0.3),
    "qa": (dict(steps=150, seq_len=32, lr=2e-3), "exact_match", 24.2 + 15),
    "classification": (dict(steps=300, seq_len=64), "accuracy", 0.387 + 0.15),
    "regression": (dict(steps=40, batch_size=8, seq_len=32), "pearson", 0.4),
    "seq2seq": (dict(steps=250, seq_len=24, lr=2e-3), "exact_match", 0.387 + 0.2),
}


@pytest.mark.parametrize("task", sorted(LEARNING))
def test_each_head_learns_its_embedded_task(task, spiece, tmp_path):
    settings, metric, floor = LEARNING[task]
    result = finetune(task=task, out=str(tmp_path / task), tokenizer=spiece, progress=False, checkpoint_every=10_000,
                      **settings)
    assert result.scores[metric] > floor, (task, result.scores)
    written = json.loads((tmp_path / task / "eval.json").read_text())
    assert written[metric] == result.scores[metric]


# --- Hugging Face starting points ------------------------------------------------------------------------
def test_init_from_hugging_face_base_and_mismatched_head(spiece, tmp_path, capsys):
    """An AlbertModel directory gets a fresh sequence-classification head and trains; an
    AlbertForTokenClassification directory is refused for --task classification before OUT is made."""
    # Hugging Face directories written by save_hf (transformers loads them as these classes; tests of
    # save_hf check that), so that no torch import is needed here.
    for arch, head in (("Model", "base"), ("ForTokenClassification", "token_classification")):
        model = Model(Config.preset("tiny").with_head(head, num_labels=3), seed=1)
        model.save_hf(tmp_path / arch, allow_fresh=True)
        assert json.loads((tmp_path / arch / "config.json").read_text())["architectures"] == ["Albert" + arch]
        Tokenizer.load(spiece).save(tmp_path / arch / "spiece.model")
    train = _write(tmp_path / "train.jsonl", [{"text": "the sea is calm", "label": "calm"},
                                              {"text": "the storm breaks", "label": "rough"}])
    common = ["--task", "classification", "--train", train, "--steps", "2", "--seq-len", "16", "--no-progress"]
    assert main(["finetune", "--init", str(tmp_path / "Model"), "--out", str(tmp_path / "a"), *common]) == 0
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["head"] == "sequence_classification" and saved["num_labels"] == 2
    assert main(["finetune", "--init", str(tmp_path / "ForTokenClassification"), "--out", str(tmp_path / "b"),
                 *common]) == 2
    assert "is a AlbertForTokenClassification checkpoint; --task classification needs a " \
           "AlbertForSequenceClassification" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_qa_prints_the_table(spiece, tmp_path, capsys):
    """The command line prints OUT/eval.json's scores as a table."""
    out = tmp_path / "qa"
    assert main(["finetune", "--task", "qa", "--out", str(out), "--tokenizer", spiece, "--steps", "2",
                 "--seq-len", "32", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "eval.json").read_text())
    assert scores["examples"] == 149 and all(0 <= scores[k] <= 100 for k in ("exact_match", "f1"))
    assert f"exact_match  {scores['exact_match']:.4f}" in printed
    assert json.loads((out / "config.json").read_text())["head"] == "question_answering"


def test_encoding_layouts(spiece, tmp_path):
    """Pairs as [CLS] a [SEP] b [SEP] with types 0/1, cut longest-first; a word's tag on its first piece
    only; QA labels on the answer's pieces, read back to the answer's words; C rows per choice."""
    from ref_bert.data import CLS_ID, SEP_ID
    from ref_bert.finetune.data import encode
    from ref_bert.tokenization import Tokenizer as CheckpointTokenizer

    tok = CheckpointTokenizer.from_sentencepiece(spiece)
    assert (tok.cls_id, tok.sep_id) == (CLS_ID, SEP_ID)
    pair = load_task_file("classification", _write(tmp_path / "c.jsonl", [
        {"text": "the sea is calm today and the wind has dropped", "text_pair": "calm", "label": 1},
        {"text": "x y", "label": 0}]))
    enc = encode(pair, tok, 12)
    a, b = tok.token_ids("the sea is calm today and the wind has dropped"), tok.token_ids("calm")
    expected = [CLS_ID, *a[:12 - 3 - len(b)], SEP_ID, *b, SEP_ID]          # only the longer side loses tokens
    assert enc.arrays["input_ids"][0].tolist() == expected
    assert enc.arrays["token_type_ids"][0].tolist() == [0] * (len(expected) - len(b) - 1) + [1] * (len(b) + 1)
    assert enc.arrays["attention_mask"][1].tolist() == [1] * (len(tok.token_ids("x y")) + 2) + \
        [0] * (12 - len(tok.token_ids("x y")) - 2)

    tags = load_task_file("tokens", _write(tmp_path / "t.jsonl", [{"tokens": ["Unalienable", "rights"],
                                                                   "tags": ["B-NP", "I-NP"]}]))
    enc = encode(tags, tok, 16)
    first = tok.token_ids("Unalienable")
    assert len(first) > 1
    labels = enc.arrays["labels"][0].tolist()
    assert labels[1] == tags.label_names.index("B-NP") and labels[2:1 + len(first)] == [-100] * (len(first) - 1)
    assert labels[1 + len(first)] == tags.label_names.index("I-NP") and labels[0] == -100

    context = "Call me Ishmael, some years ago."
    qa = load_task_file("qa", _write(tmp_path / "q.jsonl", [{"context": context, "question": "Who?",
                                                           "answers": [{"text": "Ishmael", "answer_start": 8}]}]))
    enc = encode(qa, tok, 32)
    s, e = int(enc.arrays["start_positions"][0]), int(enc.arrays["end_positions"][0])
    assert tok.decode(enc.arrays["input_ids"][0][s:e + 1].tolist()) == "Ishmael,"     # the whole word
    meta = enc.meta[0]
    assert context[meta["words"][2][0]:meta["words"][2][1]] == "Ishmael,"
    assert s == meta["offset"] + meta["first_piece"][2] and e == meta["offset"] + meta["last_piece"][2]

    mc = load_task_file("multiple-choice", _write(tmp_path / "m.jsonl", [{"context": "c", "choices": ["x", "y", "z"],
                                                                        "label": 2}]))
    enc = encode(mc, tok, 8)
    assert enc.arrays["input_ids"].shape == (1, 3, 8) and enc.arrays["labels"].tolist() == [2]


def test_a_finetuned_directory_starts_the_same_task_with_its_classes(spiece, tmp_path, capsys):
    """--init a finetune OUT: its head and class names are kept; a class it lacks is refused by line."""
    lines = [{"text": "the sea is calm", "label": "calm"}, {"text": "the storm breaks", "label": "rough"}]
    train = _write(tmp_path / "train.jsonl", lines)
    common = ["--task", "classification", "--steps", "2", "--seq-len", "16", "--no-progress"]
    assert main(["finetune", "--train", train, "--out", str(tmp_path / "a"), "--tokenizer", spiece, *common]) == 0
    assert main(["finetune", "--train", train, "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                 *common]) == 0
    a = files.load_tensors(tmp_path / "a" / "model.safetensors")[0]
    b_first = json.loads((tmp_path / "b" / "task.json").read_text())
    assert b_first["label_names"] == ["calm", "rough"] and "classifier.weight" in a
    more = _write(tmp_path / "more.jsonl", lines + [{"text": "fog", "label": "grey"}])
    assert main(["finetune", "--train", more, "--init", str(tmp_path / "a"), "--out", str(tmp_path / "c"),
                 *common]) == 2
    assert "more.jsonl line 3: label 'grey' is not one of the 2 classes ['calm', 'rough']" in capsys.readouterr().err
    assert main(["finetune", "--task", "regression", "--train", _write(tmp_path / "r.jsonl", [{"text": "a", "label": 1.5}]),
                 "--init", str(tmp_path / "a"), "--out", str(tmp_path / "d"), "--steps", "2", "--no-progress"]) == 2
    assert "--task regression needs a AlbertForSequenceClassification with problem_type regression" in \
        capsys.readouterr().err


# --- the model's own tokenizer ----------------------------------------------------------------------------
TEXTS = [("The Quick brown fox, naïve CAFÉ!", None), ("short", "a second segment, with punctuation."),
         ("汉字 and émigré résumé", "Unalienable RIGHTS")]


def _wordpiece_with_moved_specials():
    """A WordPiece vocabulary trained on the packaged corpus with its special tokens away from ids 0..4
    ([PAD] 7, [UNK] 9, [CLS] 11, [SEP] 12, [MASK] 13, as a real BERT has them at 0/100..103), so that
    constant ids anywhere in fine-tuning give other inputs than the tokenizer's."""
    import ref_bert
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    from ref_bert.data import read_corpus

    sentences = [s for doc in read_corpus(default_corpus_path()) for s in doc]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trained = HfTokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    ordinary = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = ordinary[:7] + ["[PAD]"] + ordinary[7:8] + ["[UNK]"] + ordinary[8:9] + specials[2:] + ordinary[9:]
    tok = ref_bert.Tokenizer.from_wordpiece_vocab(vocab)
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [7, 9, 11, 12, 13]
    return tok


def test_a_wordpiece_checkpoint_is_finetuned_with_its_own_tokenizer(spiece, tmp_path, capsys):
    """--init a BERT directory with a vocab.txt whose special ids are not ALBERT's: the encoded inputs are
    transformers' AutoTokenizer's for the same texts and pairs (ids, token types, mask with its [PAD]),
    a word-level task's pieces are its per-word pieces, the fine-tuned OUT carries the tokenizer (OUT
    restarts a run, loads with it, and transformers reads the same ids from it), and a tokenizer whose
    vocabulary is not the model's is refused before OUT is made."""
    from transformers import AutoTokenizer

    from ref_bert.checkpoint import load_any
    from ref_bert.finetune.data import encode

    tok = _wordpiece_with_moved_specials()
    bert = Config.preset("bert-base", vocab_size=tok.vocab_size, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=48, max_position_embeddings=40).with_head("base")
    init = tmp_path / "bert"
    Model(bert, seed=3).save_hf(init)
    tok.save_hf(init)
    train = _write(tmp_path / "train.jsonl", [{"text": a, **({"text_pair": b} if b else {}), "label": n % 2}
                                              for n, (a, b) in enumerate(TEXTS)])
    seq_len = 32
    job = loop.prepare(loop.FinetuneConfig(task="classification", train=train, init=str(init), seq_len=seq_len,
                                           out=str(tmp_path / "unused")))
    hf = AutoTokenizer.from_pretrained(str(init))
    for n, (a, b) in enumerate(TEXTS):
        expected = hf(a, b, padding="max_length", max_length=seq_len)
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert job.train_encoded.arrays[key][n].tolist() == expected[key], (n, key)
    assert job.train_encoded.arrays["input_ids"][0, 0] == 11 and 7 in job.train_encoded.arrays["input_ids"][0]

    # Word-level: each word's pieces as transformers gives them for pre-split words, the tag on the first.
    words = ["Unalienable", "rights", "naïve", "CAFÉ!"]
    tags = load_task_file("tokens", _write(tmp_path / "t.jsonl", [{"tokens": words, "tags": ["B", "I", "O", "B"]}]))
    enc = encode(tags, job.tokenizer, seq_len)
    expected = hf(words, is_split_into_words=True, padding="max_length", max_length=seq_len)
    assert enc.arrays["input_ids"][0].tolist() == expected["input_ids"]
    word_ids = expected.word_ids()
    first = [k for k, w in enumerate(word_ids) if w is not None and (k == 0 or word_ids[k - 1] != w)]
    assert np.nonzero(enc.arrays["labels"][0] != -100)[0].tolist() == first
    assert len(first) < len([w for w in word_ids if w is not None])     # some word has several pieces

    # Two steps; OUT carries the tokenizer.
    out = tmp_path / "out"
    common = ["--task", "classification", "--train", train, "--steps", "2", "--seq-len", str(seq_len), "--no-progress"]
    assert main(["finetune", "--init", str(init), "--out", str(out), *common]) == 0
    model, _ = load_any(out)
    assert model.tokenizer.fingerprint() == tok.fingerprint()
    again = AutoTokenizer.from_pretrained(str(out))
    assert [again(a, b)["input_ids"] for a, b in TEXTS] == [hf(a, b)["input_ids"] for a, b in TEXTS]
    # --init OUT works; --overwrite onto a directory holding an spiece.model leaves only the WordPiece files.
    again = tmp_path / "again"
    again.mkdir()
    (again / "spiece.model").write_bytes(Path(spiece).read_bytes())
    assert main(["finetune", "--init", str(out), "--out", str(again), "--overwrite", *common]) == 0
    assert not (again / "spiece.model").exists() and load_any(again)[0].tokenizer.fingerprint() == tok.fingerprint()

    # A tokenizer of another vocabulary size is refused, naming both sizes; nothing is written.
    capsys.readouterr()
    assert main(["finetune", "--init", str(init), "--tokenizer", spiece, "--out", str(tmp_path / "bad"),
                 *common]) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer has {Config.preset('tiny').vocab_size} tokens but the model's word embeddings have " \
           f"{tok.vocab_size} rows" in err, err
    assert not (tmp_path / "bad").exists()


def test_an_albert_directory_gives_albert_ids(spiece, tmp_path):
    """--init an ALBERT directory: its spiece.model with its tokenizer_config.json's rules (lower-casing,
    accents stripped), so the inputs are transformers' AlbertTokenizer's, not the raw SentencePiece ids."""
    import ref_bert
    from transformers import AutoTokenizer

    init = tmp_path / "albert"
    Model(Config.preset("tiny").with_head("base"), seed=1).save_hf(init)
    ref_bert.Tokenizer.from_sentencepiece(spiece, do_lower_case=True, keep_accents=False).save_hf(init)
    texts = [("The Quick brown FOX, naïve CAFÉ", "Résumé of the STORM")]
    train = _write(tmp_path / "train.jsonl", [{"text": a, "text_pair": b, "label": 1} for a, b in texts]
                   + [{"text": "the sea", "label": 0}])
    job = loop.prepare(loop.FinetuneConfig(task="classification", train=train, init=str(init), seq_len=40,
                                           out=str(tmp_path / "unused")))
    expected = AutoTokenizer.from_pretrained(str(init))(*texts[0], padding="max_length", max_length=40,
                                                                  return_token_type_ids=True)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert job.train_encoded.arrays[key][0].tolist() == expected[key], key
    raw = Tokenizer.load(spiece).encode(texts[0][0])           # the pretraining settings: case kept
    assert job.train_encoded.arrays["input_ids"][0, 1:1 + len(raw)].tolist() != raw


# --- the run directory: one writer, nothing that is not this run's overwritten, nothing non-finite published ---
def test_one_writer_per_out_an_out_that_is_not_a_run_and_no_non_finite_checkpoint(spiece, tmp_path, capsys):
    """Pretraining's run-directory rules hold for finetune: a second writer on the same --out is refused
    naming the holder; a non-empty directory that is not a fine-tuning run, or an existing run without
    --resume, is refused untouched unless --overwrite; an update that makes the weights non-finite is
    never checkpointed (the error names the last finite checkpoint)."""
    train = _write(tmp_path / "train.jsonl", [{"text": "the sea is calm", "label": "calm"},
                                              {"text": "the storm breaks", "label": "rough"}])
    common = ["--task", "classification", "--train", train, "--tokenizer", spiece, "--steps", "2", "--seq-len", "16",
              "--no-progress"]
    out = tmp_path / "run"
    with files.claim_run_directory(out):
        assert main(["finetune", "--out", str(out), *common]) == 2
        assert f"{out} is in use by another run (pid " in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".lock-holder"]      # nothing of the run

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["finetune", "--out", str(mine), *common]) == 2
    assert "--out " + str(mine) + " is an existing directory that is not a fine-tuning run (it holds notes.txt)" \
        in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert main(["finetune", "--out", str(mine), "--overwrite", *common]) == 0
    assert (mine / "checkpoints" / "step-000002").is_dir()
    assert main(["finetune", "--out", str(mine), *common]) == 2
    assert "already holds a fine-tuning run" in capsys.readouterr().err

    # AdamW without clipping at lr 1e39, one warmup step: step 1 runs at rate 0, step 2's update overflows.
    poisoned = tmp_path / "poisoned"
    with np.errstate(all="ignore"):
        assert main(["finetune", "--out", str(poisoned), *common[:-5], "--steps", "3", "--seq-len", "16",
                     "--optimizer", "adamw", "--lr", "1e39", "--warmup", "2", "--checkpoint-every", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the update of step 2 made parameter" in err and "step-000001" in err, err
    assert [p.name for p in (poisoned / "checkpoints").iterdir()] == ["step-000001"]
    assert files.read_pointer(poisoned / "latest").name == "step-000001"


def test_a_run_given_relative_paths_resumes_from_another_directory(spiece, tmp_path, monkeypatch):
    """The training file is recorded as an absolute path: a resume started elsewhere finds it, and giving
    the same file by its absolute path is not taken for a different setting."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.jsonl").write_bytes(Path(embedded_path("classification", "train")).read_bytes())
    monkeypatch.chdir(work)
    settings = dict(task="classification", tokenizer=spiece, steps=3, batch_size=4, seq_len=16, progress=False)
    first = finetune(out="run", train="train.jsonl", until=1, **settings)
    assert first.step == 1
    monkeypatch.chdir(tmp_path)
    resumed = finetune(out=str(work / "run"), resume=True, train=str(work / "train.jsonl"), progress=False)
    assert resumed.step == 3


@pytest.mark.parametrize("settings, message", [
    (dict(no_such_setting=1), r"unknown finetune settings \['no_such_setting'\]"),
    (dict(out=None), "out=None is invalid: expected a directory path"),
    (dict(resume=3), "resume=3 is invalid: expected True"),
    (dict(train=5), "train=5 is invalid: expected None or a path"),
])
def test_bad_settings_from_python_are_value_errors(settings, message, tmp_path):
    settings.setdefault("out", str(tmp_path / "run"))
    with pytest.raises(ValueError, match=message):
        finetune(**settings)
    assert not (tmp_path / "run").exists()
