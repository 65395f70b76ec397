"""The metrics each task reports, computed by the libraries the field uses where one exists.

    classification   accuracy; macro F1 (two classes: also F1 of class 1)      scikit-learn
    regression       Pearson r, Spearman rho, mean squared error                scipy.stats
    tokens           entity-level precision, recall, F1 (CoNLL rule: an entity
                     counts only when its type and both ends match); token accuracy   seqeval
    qa               SQuAD v1.1 exact match and F1 (normalised answers, the best
                     over the gold answers), in percent                         squad_scores below
    multiple-choice  accuracy                                                   scikit-learn
    seq2seq          exact match of the decoded target (whitespace-collapsed)   ours (a string compare)

SQuAD's scores have no offline library (the ``evaluate`` package fetches its script from the hub), so
:func:`squad_normalize` and :func:`squad_f1` restate the official evaluate-v1.1.py (docs/reference.md,
§12.3, "Metrics"): lower-case; drop punctuation (``string.punctuation``); drop the articles a,
an, the as whole words; collapse whitespace. Exact match: the normalised strings are equal. F1:
over the normalised whitespace tokens, common = the multiset intersection, precision = common /
predicted tokens, recall = common / gold tokens, F1 = 2PR / (P + R), 0 when nothing is in common. Each
prediction takes the maximum over its gold answers; the scores are means times 100.
"""
from __future__ import annotations

import collections
import re
import string


def classification_scores(gold: list, predicted: list, num_labels: int) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    scores = {"accuracy": float(accuracy_score(gold, predicted)),
              "f1_macro": float(f1_score(gold, predicted, average="macro", labels=list(range(num_labels)),
                                         zero_division=0))}
    if num_labels == 2:
        scores["f1"] = float(f1_score(gold, predicted, average="binary", zero_division=0))
    return scores


def regression_scores(gold: list, predicted: list) -> dict:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    gold, predicted = np.asarray(gold, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    constant = predicted.std() == 0 or gold.std() == 0     # r is undefined; report 0, not NaN
    return {"pearson": 0.0 if constant else float(pearsonr(gold, predicted)[0]),
            "spearman": 0.0 if constant else float(spearmanr(gold, predicted)[0]),
            "mse": float(np.mean((gold - predicted) ** 2))}


def token_scores(gold: list, predicted: list) -> dict:
    """``gold``, ``predicted``: one list of tag names per sentence (BIO tags for entities)."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"f1": float(f1_score(gold, predicted, zero_division=0)),
            "precision": float(precision_score(gold, predicted, zero_division=0)),
            "recall": float(recall_score(gold, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(gold, predicted))}


def squad_normalize(text: str) -> str:
    """evaluate-v1.1.py's normalize_answer: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    predicted_tokens, gold_tokens = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(golds: list, predicted: list) -> dict:
    """``golds``: a list of gold answer texts per question; ``predicted``: one text per question."""
    exact = [max(float(squad_normalize(p) == squad_normalize(g)) for g in gs) for gs, p in zip(golds, predicted)]
    f1 = [max(squad_f1(p, g) for g in gs) for gs, p in zip(golds, predicted)]
    n = max(len(predicted), 1)
    return {"exact_match": 100.0 * sum(exact) / n, "f1": 100.0 * sum(f1) / n}


def exact_match(gold: list, predicted: list) -> dict:
    same = [" ".join(g.split()) == " ".join(p.split()) for g, p in zip(gold, predicted)]
    return {"exact_match": sum(same) / max(len(same), 1)}


def format_table(scores: dict, title: str) -> str:
    """The scores as a two-column text table."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in scores.items()]
    width = max([len(k) for k, _ in rows] + [len("metric")])
    lines = [title, f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
