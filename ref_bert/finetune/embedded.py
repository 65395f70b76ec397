"""The embedded fine-tuning data: one small train/eval pair of JSON-lines files per task, made from the
packaged corpus (ref_bert/data/corpus.txt) by the deterministic functions below and shipped in the
package (ref_bert/finetune/data/TASK.train.jsonl and TASK.eval.jsonl). ``ref-bert finetune --task T``
with no --train uses them. Regenerate them with ``python -m ref_bert.finetune.embedded`` (tests check
that the shipped files are exactly what these functions make).

Every example starts from the corpus's sentences. Each document's ``# source:`` comment gives it one
of five kinds (:func:`source_kind`):

    state      the Declaration of Independence, the Constitution, the Bill of Rights, Lincoln
    scripture  the King James Bible
    novel      19th-century prose (Austen, Dickens, Melville, Carroll, Thoreau, Emerson, Shelley)
    fable      the retold Aesop fables
    essay      the short expository essays written for the project

Sentences of fewer than 4 words are skipped. Sentence i (in corpus order, counting the kept ones) goes
to the evaluation file when i % 5 == 0 and to the training file otherwise; each file keeps at most
600 (train) or 150 (eval) examples. What each task asks:

    classification   the kind of the sentence's source (five classes)
    regression       the sentence's length in words, divided by 10
    tokens           noun-phrase chunks by one rule: a determiner (DETERMINERS, any case, punctuation
                     aside) starts an NP chunk (B-NP) and the word after it, unless it is a determiner
                     too, continues it (I-NP); every other word is O
    qa               the context is the first window of 8 consecutive words of the sentence that holds
                     exactly one noun-phrase chunk of the tokens rule (a determiner and the word after
                     it, not ending the window); the question is "Which noun phrase is in the text?";
                     the answer is that chunk (trailing punctuation aside). Sentences without such a
                     window give no qa example
    multiple-choice  the context is the sentence's first half (words[:n // 2]); the four choices are its
                     true second half (which ends the sentence) and the first halves of three sentences
                     of the other kinds (which do not); the right choice's position is i % 4
    seq2seq          the source is the sentence, the target the kind of its source
"""
from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

from ..data.corpus import default_corpus_path

KINDS = ("state", "scripture", "novel", "fable", "essay")
MIN_WORDS = 4
LIMITS = {"train": 600, "eval": 150}
DATA_DIR = Path(__file__).resolve().parent / "data"
QA_QUESTION = "Which noun phrase is in the text?"
QA_CONTEXT_WORDS = 8
DETERMINERS = frozenset("the a an this that these those his her its their my your our".split())


def embedded_path(task: str, split: str) -> str:
    """The shipped file of ``task`` (one of :data:`ref_bert.finetune.data.TASKS`) and ``split``
    ("train" or "eval")."""
    return str(DATA_DIR / f"{task}.{split}.jsonl")


def source_kind(comment: str) -> str:
    """The kind of a document from its ``# source:`` comment."""
    if "King James" in comment:
        return "scripture"
    if "Aesop" in comment:
        return "fable"
    if "Written for this project" in comment:
        return "essay"
    if any(k in comment for k in ("Declaration", "Constitution", "Bill of Rights", "Lincoln")):
        return "state"
    return "novel"


def corpus_sentences(path=None) -> list:
    """``(kind, sentence)`` for every kept sentence of the corpus, in order."""
    kind, out = None, []
    with open(path or default_corpus_path(), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("# source:"):
                kind = source_kind(line)
            elif line and not line.startswith("#") and kind is not None and len(line.split()) >= MIN_WORDS:
                out.append((kind, line))
    return out


def _bare(word: str) -> tuple:
    """``word`` without leading/trailing punctuation, and the offset of what is left within it."""
    stripped = word.strip(string.punctuation + "\u201c\u201d\u2018\u2019")
    return (stripped, word.index(stripped)) if stripped else (word, 0)


def np_tags(words: list) -> list:
    """The tagging rule (module docstring): B-NP on a determiner, I-NP on the word after it."""
    tags = []
    for word in words:
        if _bare(word)[0].lower() in DETERMINERS:
            tags.append("B-NP")
        elif tags and tags[-1] == "B-NP":
            tags.append("I-NP")
        else:
            tags.append("O")
    return tags


def qa_example(sentence: str):
    """The qa record of ``sentence`` (module docstring), or None when it has no suitable window."""
    words = sentence.split()
    for first in range(max(1, len(words) - QA_CONTEXT_WORDS + 1)):
        window = words[first:first + QA_CONTEXT_WORDS]
        found = [k for k, w in enumerate(window) if _bare(w)[0].lower() in DETERMINERS]
        if len(found) != 1 or found[0] == len(window) - 1:
            continue
        k = found[0]
        following, _ = _bare(window[k + 1])
        if following.lower() in DETERMINERS or not following:
            continue
        context = " ".join(window)
        start = len(" ".join(window[:k])) + (1 if k else 0)
        text = window[k] + " " + following
        if context[start:start + len(text)] == text and text.strip() == text:
            return {"context": context, "question": QA_QUESTION, "answers": [{"text": text, "answer_start": start}]}
    return None


def make_examples(task: str, sentences=None) -> dict:
    """``{"train": [...], "eval": [...]}``: the records of ``task`` (module docstring)."""
    sentences = corpus_sentences() if sentences is None else sentences
    by_kind = {kind: [s for k, s in sentences if k == kind] for kind in KINDS}
    splits = {"train": [], "eval": []}
    for i, (kind, sentence) in enumerate(sentences):
        split = "eval" if i % 5 == 0 else "train"
        words = sentence.split()
        if task == "classification":
            record = {"text": sentence, "label": kind}
        elif task == "regression":
            record = {"text": sentence, "label": len(words) / 10}
        elif task == "tokens":
            record = {"tokens": words, "tags": np_tags(words)}
        elif task == "qa":
            record = qa_example(sentence)
            if record is None:
                continue
        elif task == "multiple-choice":
            half = len(words) // 2
            others = [k for k in KINDS if k != kind]
            distractors = []
            for j, other in enumerate(others[:3]):
                pool = by_kind[other]
                other_words = pool[(i * 7 + j * 13) % len(pool)].split()
                distractors.append(" ".join(other_words[:len(other_words) // 2]))
            choices = list(distractors)
            choices.insert(i % 4, " ".join(words[half:]))
            record = {"context": " ".join(words[:half]), "choices": choices, "label": i % 4}
        elif task == "seq2seq":
            record = {"source": sentence, "target": kind}
        else:
            raise ValueError(f"task={task!r} has no embedded data")
        splits[split].append(record)
    return {split: _evenly(records, LIMITS[split]) for split, records in splits.items()}


def _evenly(records: list, limit: int) -> list:
    """At most ``limit`` records, spread evenly over the corpus (so every kind keeps its share)."""
    if len(records) <= limit:
        return records
    return [records[(j * len(records)) // limit] for j in range(limit)]


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_all(directory=DATA_DIR) -> list:
    """Write every task's two files into ``directory``; returns their paths."""
    from ..files import atomic_write_bytes
    from .data import TASKS

    os.makedirs(directory, exist_ok=True)
    sentences = corpus_sentences()
    written = []
    for task in TASKS:
        for split, records in make_examples(task, sentences).items():
            path = Path(directory) / f"{task}.{split}.jsonl"
            atomic_write_bytes(path, jsonl_bytes(records))
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else DATA_DIR):
        print(p)
