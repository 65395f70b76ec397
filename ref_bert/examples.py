"""Deterministic synthetic batches: the one place that makes model inputs from a seed.

:func:`make_batch` is used by golden files (:func:`ref_bert.golden.make_inputs`), the benchmark
(``benchmarks.bench.make_batch``), the gradient-check battery (``gradcheck.battery.model_inputs``) and
the tests. Everything is drawn on the host from ``numpy.random.default_rng(seed)`` (``seed`` may be a
sequence, as golden files' ``[seed, 2]``) and returned as host int64 arrays: ``input_ids``,
``token_type_ids``, ``attention_mask``, ``position_ids``, ``mlm_labels``, ``sop_labels``.

Three recipes, each a fixed order of draws (golden files, benchmark numbers and gradient-check
results depend on it, so none may change):

``"rows"`` (the default; golden files, the Hugging Face parity tests)
    Row by row. Lengths: ``lengths`` when given, else row 0 full and the others random in
    [max(2, T // 2), T - 1]. Real tokens avoid ``pad_token_id`` and padded positions hold it; token
    type 0 for the first half of each row's real tokens and 1 after (when ``type_vocab_size > 1``);
    MLM labels on about ``label_rate`` of the real positions, at least one per row, -100 elsewhere.
``"matrix"`` (the gradient-check battery, model tests)
    Whole (B, T) draws: padding only where ``lengths`` says (padded positions keep random ids), labels
    where a uniform draw is below ``label_rate`` on real positions (ids may be the pad id), token types
    uniform in [0, type_vocab_size).
``"counted"`` (the benchmark)
    No padding; ids uniform in [5, V) (above the special tokens); token type 1 from T // 2 on;
    exactly ``min(T - 1, max(1, round(label_rate * T)))`` labelled positions per row, never position 0,
    label ids in [5, V).

SOP labels are uniform 0/1 in every recipe.

:func:`task_batch` makes a batch for any head (``Config.head``): the ``"rows"`` recipe (B * C rows for
multiple choice, viewed (B, C, T)), then the head's labels drawn from ``default_rng([*seed, 3])``
(:func:`task_labels`), so the pretraining batch of the same seed is unchanged by them.
"""
from __future__ import annotations

import numpy as np

BATCH_NAMES = ("input_ids", "token_type_ids", "attention_mask", "position_ids", "mlm_labels", "sop_labels")
RECIPES = ("rows", "matrix", "counted")


def make_batch(config, batch_size: int = 2, seq_len: int = 16, seed=0, *, recipe: str = "rows",
               lengths=None, label_rate: float = 0.15) -> dict:
    """A deterministic pretraining batch as host int64 arrays (see the module docstring for the recipes).

    ``config`` needs ``vocab_size``, ``type_vocab_size``, ``pad_token_id`` and ``max_position_embeddings``.
    ``lengths`` (one per row, each in [1, seq_len]) pads the rows; ``None`` means random lengths for
    ``"rows"`` and no padding for ``"matrix"``; ``"counted"`` never pads.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is invalid: expected one of {', '.join(RECIPES)}")
    shortest = 2 if recipe == "rows" else 1
    if batch_size < 1 or seq_len < shortest:
        raise ValueError(f"need batch >= 1 and seq_len >= {shortest}, got batch={batch_size}, seq_len={seq_len}")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds max_position_embeddings={config.max_position_embeddings}")
    if lengths is not None:
        lengths = [int(n) for n in lengths]
        if recipe == "counted":
            raise ValueError("the 'counted' recipe does not pad: lengths must be None")
        if len(lengths) != batch_size or not all(1 <= n <= seq_len for n in lengths):
            raise ValueError(f"lengths={lengths} is invalid: expected {batch_size} lengths in [1, {seq_len}]")
    rng = np.random.default_rng(seed)
    B, T, V = batch_size, seq_len, config.vocab_size
    if recipe == "rows":
        x = _rows(rng, config, B, T, lengths, label_rate)
    elif recipe == "matrix":
        x = _matrix(rng, config, B, T, lengths, label_rate)
    else:
        x = _counted(rng, config, B, T, label_rate)
    x["position_ids"] = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    return {name: x[name] for name in BATCH_NAMES}


def _rows(rng, config, B, T, lengths, label_rate) -> dict:
    V, pad = config.vocab_size, config.pad_token_id
    if V < 2:
        raise ValueError(f"vocab_size={V} leaves no id besides the pad id")
    if lengths is None:
        shortest = max(2, T // 2)
        lengths = [T] + [int(rng.integers(shortest, max(shortest, T - 1) + 1)) for _ in range(B - 1)]
    x = dict(input_ids=np.full((B, T), pad, np.int64), token_type_ids=np.zeros((B, T), np.int64),
             attention_mask=np.zeros((B, T), np.int64), mlm_labels=np.full((B, T), -100, np.int64))
    for b, n in enumerate(lengths):
        ids = rng.integers(0, V - 1, size=n)
        x["input_ids"][b, :n] = ids + (ids >= pad)          # skip the pad id
        x["attention_mask"][b, :n] = 1
        if config.type_vocab_size > 1:
            x["token_type_ids"][b, n // 2:n] = 1
        chosen = rng.random(n) < label_rate
        chosen[rng.integers(n)] = True
        x["mlm_labels"][b, :n][chosen] = rng.integers(0, V, size=int(chosen.sum()))
    x["sop_labels"] = rng.integers(0, 2, size=B).astype(np.int64)
    return x


def _matrix(rng, config, B, T, lengths, label_rate) -> dict:
    V = config.vocab_size
    attention_mask = np.ones((B, T), dtype=np.int64)
    for b, n in enumerate(lengths or ()):
        attention_mask[b, n:] = 0
    mlm_labels = np.where((rng.random((B, T)) < label_rate) & (attention_mask == 1),
                          rng.integers(0, V, (B, T)), -100)
    return dict(input_ids=rng.integers(0, V, (B, T)), token_type_ids=rng.integers(0, config.type_vocab_size, (B, T)),
                attention_mask=attention_mask, mlm_labels=mlm_labels, sop_labels=rng.integers(0, 2, B))


def _counted(rng, config, B, T, label_rate) -> dict:
    V = config.vocab_size
    input_ids = rng.integers(5, V, (B, T), dtype=np.int64)
    token_type_ids = np.zeros((B, T), dtype=np.int64)
    if config.type_vocab_size > 1:
        token_type_ids[:, T // 2:] = 1
    masked = min(T - 1, max(1, round(label_rate * T))) if T > 1 else 1
    mlm_labels = np.full((B, T), -100, dtype=np.int64)
    for b in range(B):
        where = rng.choice(np.arange(1 if T > 1 else 0, T), size=masked, replace=False)
        mlm_labels[b, where] = rng.integers(5, V, masked)
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=np.ones((B, T), dtype=np.int64),
                mlm_labels=mlm_labels, sop_labels=rng.integers(0, 2, B, dtype=np.int64))


TASK_LABEL_NAMES = ("labels", "start_positions", "end_positions")


def task_labels(config, inputs: dict, rng, dtype="float64") -> dict:
    """Labels for ``config.head`` on ``inputs`` (host arrays, (B, T) or (B, C, T) for multiple choice),
    drawn from ``rng`` (a numpy Generator). Empty for pretraining (``inputs`` has its labels) and base.

    masked_lm: the inputs' ``mlm_labels``; causal_lm: the input ids at real positions (-100 at pads:
    transformers shifts them inside the loss); next_sentence: ``sop_labels``; sequence classification
    by problem type (``config.problem_type``, else regression for one label and single-label
    otherwise): class ids, 0/1 multi-label targets (B, L) or N(0, 1) regression targets ((B,) for one
    label) in ``dtype``; token classification: class ids at real positions, -100 at pads; question
    answering: a start in the real tokens and an end at or after it; multiple choice: a choice id.
    """
    head, L = config.head, config.num_labels
    mask = inputs["attention_mask"]
    B = mask.shape[0]
    if head in ("pretraining", "base"):
        return {}
    if head == "masked_lm":
        return {"labels": inputs["mlm_labels"]}
    if head == "causal_lm":
        return {"labels": np.where(mask == 1, inputs["input_ids"], -100)}
    if head == "next_sentence":
        return {"labels": inputs["sop_labels"]}
    if head == "multiple_choice":
        return {"labels": rng.integers(0, mask.shape[1], B)}
    if head == "token_classification":
        return {"labels": np.where(mask == 1, rng.integers(0, L, mask.shape), -100)}
    if head == "question_answering":
        lengths = mask.sum(axis=1)
        start = np.array([rng.integers(0, n) for n in lengths], dtype=np.int64)
        end = np.array([rng.integers(s, n) for s, n in zip(start, lengths)], dtype=np.int64)
        return {"start_positions": start, "end_positions": end}
    problem = config.problem_type or ("regression" if L == 1 else "single_label_classification")
    if problem == "single_label_classification":
        return {"labels": rng.integers(0, L, B)}
    if problem == "multi_label_classification":
        return {"labels": (rng.random((B, L)) < 0.5).astype(dtype)}
    return {"labels": rng.standard_normal(B if L == 1 else (B, L)).astype(dtype)}


def task_batch(config, batch_size: int = 2, seq_len: int = 16, seed=0, *, lengths=None, num_choices: int = 2,
               label_rate: float = 0.15, dtype="float64") -> dict:
    """A deterministic padded batch with the labels of ``config.head`` (module docstring): host arrays
    input_ids, token_type_ids, attention_mask, position_ids and the head's labels (pretraining: mlm_labels
    and sop_labels). Multiple choice: ``batch_size * num_choices`` rows (``lengths`` one per row) viewed
    (B, C, T)."""
    seed = list(np.atleast_1d(seed))
    rows = batch_size * num_choices if config.head == "multiple_choice" else batch_size
    x = make_batch(config, rows, seq_len, seed, recipe="rows", lengths=lengths, label_rate=label_rate)
    if config.head == "multiple_choice":
        x = {k: v.reshape(batch_size, num_choices, seq_len) for k, v in x.items() if v.ndim == 2}
    labels = task_labels(config, x, np.random.default_rng([*seed, 3]), dtype=dtype)
    if config.head != "pretraining":
        x = {k: v for k, v in x.items() if k not in ("mlm_labels", "sop_labels")}
    return {**x, **labels}
# --- inputs from text ------------------------------------------------------------------------------
def text_batch(tokenizer, config, texts, pairs=None, *, truncation: bool = False, seed=0,
               label_rate: float = 0.15) -> dict:
    """A pretraining batch made from real text with the checkpoint's tokenizer (``ref-bert verify --hf DIR
    --text ...``, ``ref-bert golden --hf DIR --text ...``), as host int64 arrays under :data:`BATCH_NAMES`.

    ``input_ids``, ``token_type_ids``, ``attention_mask``: ``tokenizer.batch(texts, pairs)``, padded on
    the right, at most ``config.max_position_embeddings`` tokens: a longer text is a ValueError naming its
    length unless ``truncation`` (then it is cut, longest first). The text is not altered: no [MASK] is
    put in. MLM labels: on about ``label_rate`` of each row's real positions after [CLS] (at least one),
    chosen from ``default_rng([seed, 3])``, each the token id already there. SOP labels 0 (the pair as
    given is in order).
    """
    if tokenizer is None:
        raise ValueError("inputs from text need the checkpoint's tokenizer, and there is none")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's word embeddings have "
                         f"{config.vocab_size} rows; expected the same number")
    try:
        x = tokenizer.batch(texts, pairs, max_length=config.max_position_embeddings, truncation=truncation)
    except ValueError as error:
        raise ValueError(f"{error} (max_length is the model's position table, config max_position_embeddings="
                         f"{config.max_position_embeddings})") from None
    if pairs is not None and config.type_vocab_size < 2:
        raise ValueError(f"text pairs need token type 1, but the model has type_vocab_size={config.type_vocab_size}")
    B, T = x["input_ids"].shape
    rng = np.random.default_rng(seed if isinstance(seed, (list, tuple)) else [seed, 3])
    labels = np.full((B, T), -100, np.int64)
    for b in range(B):
        n = int(x["attention_mask"][b].sum())
        chosen = rng.random(n - 1) < label_rate
        chosen[rng.integers(n - 1)] = True
        positions = 1 + np.flatnonzero(chosen)
        labels[b, positions] = x["input_ids"][b, positions]
    x["position_ids"] = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    x["mlm_labels"] = labels
    x["sop_labels"] = np.zeros(B, np.int64)
    return {name: x[name] for name in BATCH_NAMES}
