"""The whole battery: every op and every parameter of the full model, gradient-checked in float64.

    python -m gradcheck            # or: ref-bert gradcheck (the command is ref_bert/cli/gradcheck.py)
    python -m gradcheck --verbose  # per-tensor tables

Prints one row per check (what was checked, how many tensors, the largest relative error, pass or
fail) and exits with status 1 if anything fails. The model configurations cover every sharing
variant, E < H and E == H, several groups and inner blocks, padding, token types, both GELU forms
and dropout (masks frozen by a dropout seed).
"""
from __future__ import annotations

import sys

import backends

from .core import DEFAULT_FLOOR, DEFAULT_RTOL

# name -> Config overrides on top of BASE (all tiny, float64)
BASE = dict(vocab_size=23, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=8, type_vocab_size=2, hidden_act="gelu_new",
            initializer_range=0.3, name="battery")
MODEL_CASES = {
    "albert: E<H, all shared": {},
    "albert: attention shared only": {"sharing": "attention"},
    "albert: ffn shared only": {"sharing": "ffn"},
    "bert: E==H, no sharing, erf gelu": {"sharing": "none", "embedding_size": 8, "hidden_act": "gelu",
                                         "model_type": "bert"},
    "albert: 2 groups x 2 inner, 3 layers": {"num_hidden_layers": 3, "num_hidden_groups": 2,
                                             "inner_group_num": 2},
    "albert: tf group rule, 3 layers/2 groups": {"num_hidden_layers": 3, "num_hidden_groups": 2,
                                                 "group_rule": "tf"},
    "albert: dropout on (frozen masks)": {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2,
                                          "classifier_dropout_prob": 0.2, "ffn_output_dropout": True},
    # ReLU is checked at op level only, with inputs kept away from 0: in the full model some
    # pre-activation always lies within h of the kink, where no derivative exists to compare against.
    "albert: 4 heads, erf gelu, LN eps 1e-5": {"num_attention_heads": 4, "hidden_act": "gelu",
                                               "layer_norm_eps": 1e-5},
}


def model_inputs(config, seed: int, B: int = 3, T: int = 7) -> dict:
    """A padded batch with token types, MLM labels on about half the real positions, SOP labels:
    :func:`ref_bert.examples.make_batch`'s ``"matrix"`` recipe (rows 1 and 2 padded after 5 and 3 tokens),
    with one label forced so that the MLM loss is never empty."""
    from ref_bert.examples import make_batch

    x = make_batch(config, B, T, seed, recipe="matrix", lengths=[T, 5, 3], label_rate=0.5)
    del x["position_ids"]           # the model's default positions, as before
    x["mlm_labels"][0, 1] = 3
    return dict(x, training=True, dropout_seed=seed)


def run_battery(seed: int = 0, rtol: float = DEFAULT_RTOL, floor: float = DEFAULT_FLOOR, verbose: bool = False,
                out=None, progress: bool = False) -> bool:
    """Run every check, print the table to ``out`` (stdout); ``progress`` shows a bar on stderr, one
    update per case (each op twice: fast and reference ops; each model configuration)."""
    from tqdm import tqdm

    from ref_bert import Config, Model

    out = out or sys.stdout
    from .cases import check_model, check_op_case, op_cases

    rows = []
    reports = []
    cases = op_cases(seed=seed)
    bar = tqdm(total=2 * len(cases) + len(MODEL_CASES), desc="gradcheck", unit="case", disable=not progress,
               file=sys.stderr, leave=False)

    def record(title, report):
        rows.append((title, len(report.results), report))
        reports.append(report)
        bar.set_postfix_str(title, refresh=False)
        bar.update(1)

    try:
        for case in cases:
            record(f"op {case.name}", check_op_case(case, seed=seed, rtol=rtol, floor=floor, title=f"op {case.name}"))
        with backends.reference_ops():      # the reference ops themselves, where a backend has fast variants
            for case in op_cases(seed=seed):
                title = f"op {case.name} (reference ops)"
                record(title, check_op_case(case, seed=seed, rtol=rtol, floor=floor, title=title))
        for name, overrides in MODEL_CASES.items():
            config = Config(**{**BASE, **overrides})
            model = Model(config, dtype="float64", seed=seed)
            record(f"model {name}", check_model(model, model_inputs(config, seed), seed=seed, rtol=rtol,
                                                floor=floor, title=f"model {name}"))
    finally:
        bar.close()

    header = ("check", "tensors", "max rel err", "result")
    table = [header] + [(n, str(k), f"{r.max_rel_error:.2e}", "ok" if r.passed else "FAIL") for n, k, r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in table[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    if verbose:
        for report in reports:
            print("\n" + report.table(), file=out)
    failed = [n for n, _, r in rows if not r.passed]
    worst = max(r.max_rel_error for _, _, r in rows)
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed "
          f"(float64; tolerance {rtol:g} relative, floor {floor:g}; worst {worst:.2e})", file=out)
    for report in reports:
        if not report.passed:
            print("\n" + report.table(), file=out)
    return not failed
