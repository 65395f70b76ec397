"""Fine-tuning data: the JSON-lines schemas, reading and validating a whole file, and encoding it.

One JSON object per line (blank lines are skipped; anything else that is not a JSON object is an
error naming the file and the line). The schema of each task:

    task             fields of one line                                          label space
    classification   {"text": str, "text_pair": str (optional), "label": int|str}  num_labels classes
    regression       {"text": str, "text_pair": str (optional), "label": number}   one real value
    tokens           {"tokens": [str, ...], "tags": [str, ...]}  (one tag per token, e.g. BIO tags)
    qa               {"context": str, "question": str,
                      "answers": [{"text": str, "answer_start": int}, ...]}        SQuAD v1.1's layout
    multiple-choice  {"context": str, "choices": [str, ...], "label": int}         index of the right choice
    seq2seq          {"source": str, "target": str}

Labels. classification: all ints (classes 0 .. num_labels - 1) or all strings (class names; class i
is the i-th name in sorted order, or in the order of ``label_names`` given). tokens: tag names; the
classes are the sorted tag names of the training file. An evaluation file uses the training file's
classes: a class it names that training does not have is an error, as is an int label outside
``[0, num_labels)``.

QA spans: ``answer_start`` is a character offset into ``context`` and ``context[answer_start:
answer_start + len(text)]`` must be ``text`` (else the span is outside its context, or does not match
it: an error). As in BERT's run_squad.py, the context is split on whitespace into words, the answer
is mapped to the words it covers, and each word is tokenized on its own; a predicted span is a range of
words, read back as the context's characters from its first word's start to its last word's end.

Tokens: the model's own tokenizer (:class:`ref_bert.tokenization.Tokenizer`: WordPiece for a BERT
checkpoint, SentencePiece for ALBERT or a ref-bert run); a text's ids are
:meth:`~ref_bert.tokenization.Tokenizer.token_ids`, a word's pieces the ids of that word alone (a word
with no tokens becomes the unknown token), and [CLS], [SEP], padding and [UNK] are the tokenizer's
special ids. Layouts:

    classification, regression   [CLS] text [SEP] (text_pair [SEP])     token types 0 / 1
    tokens                       [CLS] pieces of each word [SEP]; a word's tag labels its first piece,
                                 the other pieces are -100 (Hugging Face's convention)
    qa                           [CLS] question [SEP] context [SEP]; start/end labels are token positions
    multiple-choice              C rows [CLS] context [SEP] choice [SEP]
    seq2seq                      [CLS] source [SEP] target [SEP] under UniLM's seq2seq mask
                                 (:func:`ref_bert.unilm.seq2seq_finetune_batch`)

Truncation: an input longer than ``seq_len`` is cut, never refused: a pair loses tokens from the end
of its longer segment first (BERT's ``_truncate_seq_pair``), tokens / a QA context / a choice from
their end, a seq2seq source before its target. A QA answer that is cut off points at [CLS] (position 0),
as Hugging Face's run_qa.py does for a window without the answer; evaluation always scores against the
gold answer texts.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..ops import IGNORE_INDEX

TASKS = ("classification", "regression", "tokens", "qa", "multiple-choice", "seq2seq")


@dataclass
class TaskData:
    """A validated file: its records and its label space.

    records: the JSON objects, in file order; label_names: class names (classification with string
    labels, tokens' tags) or None; num_labels: classes (1 for regression, the number of choices for
    multiple-choice, 0 for qa and seq2seq, which have no label space).
    """

    task: str
    path: str
    records: list
    label_names: Optional[list] = None
    num_labels: int = 0


def check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid: expected one of {', '.join(TASKS)}")
    return task


def read_jsonl(path) -> list:
    """``(line_number, object)`` for each non-blank line of a UTF-8 JSON-lines file; a line that is not
    a JSON object is a ValueError naming the file and the line."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; expected a JSON-lines file (one JSON object per line)")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; expected a JSON-lines file (one JSON object per line)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 ({e.reason}); expected UTF-8 JSON lines") from None
    records = []
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                             f"expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path} line {number}: a JSON {type(obj).__name__}, expected a JSON object")
        records.append((number, obj))
    if not records:
        raise ValueError(f"{path} holds no JSON lines; expected at least one example")
    return records


# --- validation ------------------------------------------------------------------------------------
SCHEMAS = {
    "classification": '{"text": str, "text_pair": str (optional), "label": int or str}',
    "regression": '{"text": str, "text_pair": str (optional), "label": number}',
    "tokens": '{"tokens": [str, ...], "tags": [str, ...]}',
    "qa": '{"context": str, "question": str, "answers": [{"text": str, "answer_start": int}, ...]}',
    "multiple-choice": '{"context": str, "choices": [str, ...], "label": int}',
    "seq2seq": '{"source": str, "target": str}',
}


class _Line:
    """Error messages for one line: ``FILE line N: ...``."""

    def __init__(self, path: str, number: int, task: str):
        self.where, self.task = f"{path} line {number}", task

    def fail(self, message: str):
        raise ValueError(f"{self.where}: {message} (a {self.task} line is {SCHEMAS[self.task]})")

    def text(self, obj: dict, key: str, optional: bool = False, allow_empty: bool = False):
        if key not in obj:
            if optional:
                return None
            self.fail(f"has no {key!r}")
        value = obj[key]
        if not isinstance(value, str):
            self.fail(f"{key!r} is a {type(value).__name__}, expected a string")
        if not allow_empty and not value.strip():
            self.fail(f"{key!r} is empty, expected text")
        return value

    def int_(self, obj: dict, key: str):
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{key!r} is {value!r}, expected an integer")
        return value


def _check_record(task: str, line: _Line, obj: dict) -> None:
    """The schema of one line (types and spans); the label space is checked by :func:`load_task_file`."""
    if task in ("classification", "regression"):
        line.text(obj, "text")
        line.text(obj, "text_pair", optional=True)
        if "label" not in obj:
            line.fail("has no 'label'")
        label = obj["label"]
        if task == "regression":
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
                line.fail(f"'label' is {label!r}, expected a finite number")
        elif isinstance(label, bool) or not isinstance(label, (int, str)):
            line.fail(f"'label' is {label!r}, expected an integer class or a class name")
    elif task == "tokens":
        tokens, tags = obj.get("tokens"), obj.get("tags")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() and
                                                                 not any(c.isspace() for c in t) for t in tokens):
            line.fail(f"'tokens' is {tokens!r:.80}, expected a non-empty list of words (strings without spaces)")
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            line.fail(f"'tags' is {tags!r:.80}, expected a list of tag names")
        if len(tags) != len(tokens):
            line.fail(f"has {len(tokens)} tokens but {len(tags)} tags, expected one tag per token")
    elif task == "qa":
        context = line.text(obj, "context")
        line.text(obj, "question")
        answers = obj.get("answers")
        if not isinstance(answers, list) or not answers:
            line.fail(f"'answers' is {answers!r:.80}, expected a non-empty list of answers")
        for k, answer in enumerate(answers):
            if not isinstance(answer, dict):
                line.fail(f"answers[{k}] is {answer!r:.60}, expected an object")
            text = line.text(answer, "text")
            start = answer.get("answer_start")
            if isinstance(start, bool) or not isinstance(start, int):
                line.fail(f"answers[{k}]['answer_start'] is {start!r}, expected a character offset (integer)")
            end = start + len(text)
            if start < 0 or end > len(context):
                line.fail(f"answers[{k}] spans characters [{start}, {end}), outside its context of "
                          f"{len(context)} characters")
            if context[start:end] != text:
                line.fail(f"answers[{k}] text {text!r:.40} does not match the context at [{start}, {end}) "
                          f"({context[start:end]!r:.40})")
            if not text.strip() or text != text.strip():
                line.fail(f"answers[{k}] text {text!r:.40} starts or ends with whitespace; expected the "
                          f"span of the answer's words")
    elif task == "multiple-choice":
        line.text(obj, "context")
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                        for c in choices):
            line.fail(f"'choices' is {choices!r:.80}, expected a list of at least two texts")
        label = line.int_(obj, "label")
        if not 0 <= label < len(choices):
            line.fail(f"'label' {label} is outside the {len(choices)} choices, expected 0 .. {len(choices) - 1}")
    elif task == "seq2seq":
        line.text(obj, "source")
        line.text(obj, "target")


def load_task_file(task: str, path, label_names: Optional[list] = None, num_labels: Optional[int] = None) \
        -> TaskData:
    """Read and validate every line of ``path`` for ``task`` before anything else happens.

    ``label_names`` / ``num_labels``: the label space to check against (the training file's, or a
    checkpoint's); None infers it from this file. Returns a :class:`TaskData`.
    """
    check_task(task)
    path = os.fspath(path)
    lines = read_jsonl(path)
    records = []
    for number, obj in lines:
        _check_record(task, _Line(path, number, task), obj)
        records.append(obj)
    data = TaskData(task, path, records)
    if task == "classification":
        _classification_labels(data, lines, label_names, num_labels)
    elif task == "regression":
        data.num_labels = 1
    elif task == "tokens":
        found = sorted({tag for r in records for tag in r["tags"]})
        names = list(label_names) if label_names is not None else found
        for number, obj in lines:
            unknown = [t for t in obj["tags"] if t not in names]
            if unknown:
                raise ValueError(f"{path} line {number}: tag {unknown[0]!r} is not one of the {len(names)} tags "
                                 f"{names} (num_labels={len(names)}, the training file's tags)")
        data.label_names, data.num_labels = names, len(names)
    elif task == "multiple-choice":
        counts = {len(r["choices"]) for r in records}
        if len(counts) != 1 or (num_labels is not None and counts != {num_labels}):
            expected = num_labels if num_labels is not None else len(records[0]["choices"])
            for number, obj in lines:
                if len(obj["choices"]) != expected:
                    raise ValueError(f"{path} line {number}: has {len(obj['choices'])} choices, expected "
                                     f"{expected} like {'the training file' if num_labels else 'the first line'} "
                                     f"(every example needs the same number of choices)")
        data.num_labels = counts.pop()
    return data


def _classification_labels(data: TaskData, lines: list, label_names, num_labels) -> None:
    kinds = {type(obj["label"]) for _, obj in lines}
    if len(kinds) > 1:
        number = next(n for n, obj in lines if type(obj["label"]) is not type(lines[0][1]["label"]))
        raise ValueError(f"{data.path} line {number}: label {dict(lines)[number]['label']!r} mixes class names and "
                         f"integer classes; expected all labels integers or all names")
    if kinds == {str}:
        names = list(label_names) if label_names is not None else sorted({obj["label"] for _, obj in lines})
        for number, obj in lines:
            if obj["label"] not in names:
                raise ValueError(f"{data.path} line {number}: label {obj['label']!r} is not one of the "
                                 f"{len(names)} classes {names}")
        if num_labels is not None and num_labels != len(names):
            raise ValueError(f"{data.path}: {len(names)} class names {names}, but num_labels={num_labels}")
        data.label_names, data.num_labels = names, len(names)
        return
    if label_names is not None:
        raise ValueError(f"{data.path}: integer labels, but the classes are the names {label_names}; expected "
                         f"class names like the training file's")
    count = num_labels if num_labels is not None else max(obj["label"] for _, obj in lines) + 1
    for number, obj in lines:
        if not 0 <= obj["label"] < count:
            raise ValueError(f"{data.path} line {number}: label {obj['label']} is outside num_labels={count}; "
                             f"expected a class in [0, {count})")
    if count < 2:
        raise ValueError(f"{data.path}: every label is 0, so num_labels would be 1; expected at least two "
                         f"classes (pass --num-labels, or use --task regression for one real value)")
    data.num_labels = count


# --- encoding --------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """A file encoded for the model: ``arrays`` are host NumPy arrays with the examples on axis 0
    (input_ids, token_type_ids, attention_mask and the task's labels); ``meta`` holds per-example
    host data evaluation needs (QA words and offsets, tokens' word counts); ``pairs`` the seq2seq
    (source ids, target ids)."""

    arrays: dict = field(default_factory=dict)
    meta: list = field(default_factory=list)
    pairs: list = field(default_factory=list)

    def __len__(self) -> int:
        if self.pairs:
            return len(self.pairs)
        return len(next(iter(self.arrays.values())))


def truncate_longest_first(a: list, b: list, max_tokens: int) -> tuple:
    """BERT's ``_truncate_seq_pair`` (run_classifier.py): drop the last token of the longer list until
    the two fit in ``max_tokens``."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        (a if len(a) > len(b) else b).pop()
    return a, b


def _row(tokenizer, first: list, second: Optional[list], seq_len: int) -> tuple:
    """``[CLS] first [SEP] (second [SEP])`` padded to seq_len with the tokenizer's special ids:
    (input_ids, token_type_ids, attention_mask)."""
    ids = [tokenizer.cls_id, *first, tokenizer.sep_id]
    types = [0] * len(ids)
    if second is not None:
        ids += [*second, tokenizer.sep_id]
        types += [1] * (len(second) + 1)
    input_ids = np.full(seq_len, tokenizer.pad_id, dtype=np.int64)
    token_type_ids = np.zeros(seq_len, dtype=np.int64)
    attention_mask = np.zeros(seq_len, dtype=np.int64)
    input_ids[:len(ids)], token_type_ids[:len(ids)], attention_mask[:len(ids)] = ids, types, 1
    return input_ids, token_type_ids, attention_mask


def split_words(text: str) -> list:
    """``(word, start, end)`` for each whitespace-separated word of ``text`` (character offsets)."""
    words, start = [], None
    for i, ch in enumerate(text + " "):
        if ch.isspace():
            if start is not None:
                words.append((text[start:i], start, i))
                start = None
        elif start is None:
            start = i
    return words


def _stack(rows: list) -> dict:
    ids, types, mask = zip(*rows)
    return {"input_ids": np.stack(ids), "token_type_ids": np.stack(types), "attention_mask": np.stack(mask)}


def encode(data: TaskData, tokenizer, seq_len: int) -> Encoded:
    """Token ids, masks and labels of every record of ``data`` (see the module docstring's layouts);
    ``tokenizer`` a :class:`ref_bert.tokenization.Tokenizer`."""
    if seq_len < 4:
        raise ValueError(f"seq_len={seq_len} is invalid: expected at least 4 ([CLS] a [SEP] b [SEP])")
    task, records = data.task, data.records
    out = Encoded()
    if task in ("classification", "regression"):
        rows = []
        for r in records:
            a = tokenizer.token_ids(r["text"])
            b = tokenizer.token_ids(r["text_pair"]) if r.get("text_pair") is not None else None
            if b is None:
                a = a[:seq_len - 2]
            else:
                a, b = truncate_longest_first(a, b, seq_len - 3)
            rows.append(_row(tokenizer, a, b, seq_len))
        out.arrays = _stack(rows)
        if task == "regression":
            out.arrays["labels"] = np.array([float(r["label"]) for r in records], dtype=np.float64)
        else:
            names = data.label_names
            out.arrays["labels"] = np.array([names.index(r["label"]) if names else r["label"] for r in records],
                                            dtype=np.int64)
    elif task == "tokens":
        rows, labels = [], np.full((len(records), seq_len), IGNORE_INDEX, dtype=np.int64)
        for n, r in enumerate(records):
            pieces, kept = [], 0
            for word, tag in zip(r["tokens"], r["tags"]):
                ids = tokenizer.token_ids(word) or [tokenizer.unk_id]
                if len(pieces) + len(ids) > seq_len - 2:
                    break
                labels[n, 1 + len(pieces)] = data.label_names.index(tag)
                pieces += ids
                kept += 1
            rows.append(_row(tokenizer, pieces, None, seq_len))
            out.meta.append({"words": len(r["tokens"]), "kept": kept})
        out.arrays = {**_stack(rows), "labels": labels}
    elif task == "qa":
        rows, starts, ends = [], [], []
        for r in records:
            question = tokenizer.token_ids(r["question"])[:max(1, (seq_len - 3) // 2)]
            room = seq_len - 3 - len(question)
            words = split_words(r["context"])
            first_piece, last_piece, pieces = [], [], []
            for word, _, _ in words:
                ids = tokenizer.token_ids(word) or [tokenizer.unk_id]
                if len(pieces) + len(ids) > room:
                    break
                first_piece.append(len(pieces))
                pieces += ids
                last_piece.append(len(pieces) - 1)
            offset = len(question) + 2          # [CLS] question [SEP]
            answer = r["answers"][0]
            a_start, a_end = answer["answer_start"], answer["answer_start"] + len(answer["text"])
            covered = [k for k, (_, s, e) in enumerate(words) if s < a_end and e > a_start]
            if covered and covered[-1] < len(first_piece):
                starts.append(offset + first_piece[covered[0]])
                ends.append(offset + last_piece[covered[-1]])
            else:                               # cut off by truncation: points at [CLS]
                starts.append(0)
                ends.append(0)
            rows.append(_row(tokenizer, question, pieces, seq_len))
            out.meta.append({"offset": offset, "first_piece": first_piece, "last_piece": last_piece,
                             "words": [(s, e) for _, s, e in words[:len(first_piece)]]})
        out.arrays = {**_stack(rows), "start_positions": np.array(starts, dtype=np.int64),
                      "end_positions": np.array(ends, dtype=np.int64)}
    elif task == "multiple-choice":
        rows = []
        for r in records:
            context = tokenizer.token_ids(r["context"])
            for choice in r["choices"]:
                a, b = truncate_longest_first(context, tokenizer.token_ids(choice), seq_len - 3)
                rows.append(_row(tokenizer, a, b, seq_len))
        C = data.num_labels
        out.arrays = {k: v.reshape(len(records), C, seq_len) for k, v in _stack(rows).items()}
        out.arrays["labels"] = np.array([r["label"] for r in records], dtype=np.int64)
    elif task == "seq2seq":
        for r in records:
            source, target = tokenizer.token_ids(r["source"]), tokenizer.token_ids(r["target"])
            target = target[:seq_len - 4]               # room for [CLS], one source token, two [SEP]s
            source = source[:seq_len - 3 - len(target)]
            if not source:
                source = [tokenizer.unk_id]
            out.pairs.append((source, target))
    return out


def label_name(data: TaskData, index: int):
    return data.label_names[index] if data.label_names else index


__all__ = ["TASKS", "SCHEMAS", "TaskData", "Encoded", "check_task", "read_jsonl", "load_task_file", "encode",
           "split_words", "truncate_longest_first", "label_name"]
