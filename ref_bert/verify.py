"""The divergence report: compare two runs tensor by tensor, in forward order, and name the first one
that differs.

    ref-bert verify --hf DIR                              transformers vs ref-bert on the same inputs and weights
    ref-bert verify --golden FILE --candidate FILE        another implementation's dump vs a golden file

(the command is :mod:`ref_bert.cli.verify`; this module is its library: :func:`verify_hf`,
:func:`verify_files`, :func:`compare`, :func:`format_report`).

The table lists each tensor with its shape, max abs error, max rel error (= max abs error / max |reference|)
and whether it is within tolerance; the first failing row is marked, a summary line follows, and the
exit status is 1 when anything is out of tolerance (0 when all match, 2 for a usage error).

Tolerance. A tensor passes when

    max |candidate - reference|  <=  rtol * max |reference|  +  atol * (largest |reference| in its section)

Sections are the golden-file sections (params, forward, loss, grads, after_steps); integer inputs must
match exactly. Defaults per dtype (override with --rtol / --atol):

    float64: rtol 1e-10, atol 1e-12     float32: rtol 1e-5, atol 1e-6

Why: two correct implementations differ only by summation order, ~1e-16 per operation in float64 and
~1e-7 in float32, growing with depth and width. Measured against Hugging Face: on the tiny models of
tests/test_hf_parity.py float64 <= 5e-15 and float32 <= 3e-6; on a randomly initialised albert-base
(H 768, 12 layers, V 30000, batch 2 x 32) float64 <= 1.1e-14 and float32 <= 4.1e-6 (activations and
gradients alike, relative to each tensor's own scale). The defaults leave
orders of magnitude of headroom above that, yet sit far below the smallest real modelling differences:
erf GELU vs tanh GELU (~1e-4), LayerNorm epsilon 1e-5 vs 1e-12 (~1e-5 relative), a dropped bias. The
``atol`` term, relative to the section's largest value so that it is unit-free, is for tensors that are
zero in exact arithmetic, where only rounding noise remains: the attention key-bias gradient (softmax
ignores a per-row constant), or the gradients of fully saturated attention. float32 candidates of
large models may need --rtol 1e-4.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

DEFAULT_TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (1e-5, 1e-6)}


@dataclass
class Row:
    name: str
    shape: tuple
    max_abs: float = math.nan
    max_rel: float = math.nan
    ok: bool = False
    status: str = ""


@dataclass
class Report:
    rows: list = field(default_factory=list)
    rtol: float = 0.0
    atol: float = 0.0
    dtype: str = ""
    notes: list = field(default_factory=list)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.ok]

    @property
    def first_failure(self):
        return next((r for r in self.rows if not r.ok), None)

    @property
    def compared(self) -> int:
        """Rows whose tensor was present on both sides and compared (missing ones are not)."""
        return sum(1 for r in self.rows if not r.status.startswith("missing"))

    @property
    def ok(self) -> bool:
        """Nothing out of tolerance, and something was compared: an empty comparison is never OK."""
        return not self.failures and self.compared > 0


def check_tolerance(name: str, value) -> float:
    """A tolerance must be a finite number >= 0 (a NaN would make every comparison fail silently, an
    infinite one pass everything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0")
    return float(value)


def tolerances(dtype: str, rtol=None, atol=None) -> tuple[float, float]:
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(f"no default tolerances for dtype {dtype!r}; expected one of {sorted(DEFAULT_TOLERANCES)}")
    default_rtol, default_atol = DEFAULT_TOLERANCES[dtype]
    return (check_tolerance("rtol", default_rtol if rtol is None else rtol),
            check_tolerance("atol", default_atol if atol is None else atol))


def section_of(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else ""


def compare(reference: "OrderedDict[str, np.ndarray]", candidate: dict, rtol: float, atol: float,
            allow_missing: bool = False, dtype: str = "", equal_nan: bool = False) -> Report:
    """Compare ``candidate`` with ``reference`` tensor by tensor, in the reference's order.

    Integer (and boolean) reference tensors, the inputs, must be matched exactly by an integer candidate;
    a floating-point candidate for them fails. Floating-point tensors pass within the tolerance above;
    an infinity matches the same infinity exactly; a NaN matches nothing (a NaN on both sides is a
    mismatch: it says both computations broke) unless ``equal_nan``. The report is OK only if at least one
    tensor was compared."""
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
    report = Report(rtol=rtol, atol=atol, dtype=dtype)
    scales: dict[str, float] = {}
    for name, ref in reference.items():
        finite = np.abs(ref[np.isfinite(ref)].astype(np.float64)) if ref.dtype.kind == "f" else None
        if finite is not None and finite.size:
            s = section_of(name)
            scales[s] = max(scales.get(s, 0.0), float(finite.max()))
    for name, ref in reference.items():
        row = Row(name, tuple(ref.shape))
        report.rows.append(row)
        if name not in candidate:
            row.ok, row.status = allow_missing, "missing" + (" (allowed)" if allow_missing else "")
            continue
        cand = np.asarray(candidate[name])
        if tuple(cand.shape) != tuple(ref.shape):
            row.status = f"shape {tuple(cand.shape)}"
            continue
        if ref.dtype.kind in "iub":
            if cand.dtype.kind not in "iub":
                row.status = f"FAIL (candidate dtype {cand.dtype}; the reference holds integers, compared exactly)"
                continue
            row.max_abs = float(np.abs(cand.astype(np.int64) - ref.astype(np.int64)).max()) if ref.size else 0.0
            row.max_rel = 0.0 if row.max_abs == 0 else math.inf
            row.ok = row.max_abs == 0
            row.status = "ok" if row.ok else "FAIL (inputs must be identical)"
            continue
        a, b = np.atleast_1d(cand.astype(np.float64)), np.atleast_1d(ref.astype(np.float64))
        if not ref.size:
            row.max_abs = row.max_rel = 0.0
            row.ok, row.status = True, "ok"
            continue
        if cand.dtype.kind not in "fiub":
            row.status = f"FAIL (candidate dtype {cand.dtype}, expected numbers)"
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a - b)
        same_inf = np.isinf(a) & (a == b)                   # inf - inf is NaN; equal infinities agree exactly
        diff[same_inf] = 0.0
        if equal_nan:
            diff[np.isnan(a) & np.isnan(b)] = 0.0
        row.max_abs = float(diff.max()) if not np.isnan(diff).any() else math.nan
        finite_b = np.abs(b[np.isfinite(b)])
        scale = float(finite_b.max()) if finite_b.size else 0.0
        row.max_rel = row.max_abs / scale if scale > 0 else (0.0 if row.max_abs == 0 else math.inf)
        limit = rtol * scale + atol * scales.get(section_of(name), 0.0)
        row.ok = bool(row.max_abs <= limit)  # NaN compares False
        row.status = ("ok" if row.max_abs <= rtol * scale else "ok by atol") if row.ok else "FAIL"
    return report


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.2e}")


def format_report(report: Report, title: str = "", show: str = "all") -> str:
    """The table (forward order), the first divergence marked, and a summary line.
    ``show="failures"`` prints only the rows that are out of tolerance."""
    width = max([len(r.name) for r in report.rows] + [6])
    lines = []
    if title:
        lines.append(title)
    lines.extend(report.notes)
    lines.append(f"{'#':>4}  {'tensor':<{width}}  {'shape':<18} {'max abs err':>11} {'max rel err':>11}  within tolerance?")
    first = report.first_failure
    for i, r in enumerate(report.rows):
        if show == "failures" and r.ok:
            continue
        mark = "   <-- first divergence" if r is first else ""
        shape = str(tuple(r.shape))
        verdict = "yes" if r.ok else "NO"
        status = "" if r.status in ("ok", "FAIL") else f" [{r.status}]"
        lines.append(f"{i:>4}  {r.name:<{width}}  {shape:<18} {_fmt(r.max_abs):>11} {_fmt(r.max_rel):>11}  "
                     f"{verdict}{status}{mark}")
    tol = f"rtol {report.rtol:g}, atol {report.atol:g} x section max" + (f", {report.dtype}" if report.dtype else "")
    if report.ok:
        missing = len(report.rows) - report.compared
        lines.append(f"verify: OK: all {report.compared} compared tensors within tolerance ({tol})"
                     + (f"; {missing} missing from the candidate (allowed)" if missing else ""))
    elif not report.compared:
        lines.append(f"verify: FAIL: nothing was compared ({len(report.rows)} reference tensors, none in the "
                     f"candidate)")
    else:
        lines.append(f"verify: FAIL: first divergence at {first.name} (max rel err {_fmt(first.max_rel)}"
                     f"{'' if first.status in ('FAIL',) else ', ' + first.status}); {len(report.failures)} of "
                     f"{len(report.rows)} tensors out of tolerance ({tol})")
    return "\n".join(lines)


# --- golden vs candidate ---------------------------------------------------------------------------
def verify_files(golden_path, candidate_path, rtol=None, atol=None, allow_missing=False,
                 equal_nan: bool = False) -> Report:
    """Compare a candidate dump (same format, produced by another implementation) with a golden file.
    A malformed file of either side is a ValueError (the CLI's exit status 2), never a mismatch; so is a
    floating-point candidate where the golden file holds integers (the inputs)."""
    from .golden import read_golden

    reference, meta = read_golden(golden_path)
    dtype = meta["dtype"]
    tols = tolerances(dtype, rtol, atol)
    candidate, cmeta = read_golden(candidate_path)
    for name, ref in reference.items():    # the inputs are integers: a float candidate for them is malformed
        if ref.dtype.kind in "iub" and name in candidate and np.asarray(candidate[name]).dtype.kind not in "iub":
            raise ValueError(f"candidate {candidate_path}: tensor {name} has dtype {candidate[name].dtype}, but the "
                             f"golden file holds integers there ({ref.dtype}); expected an integer tensor (inputs are "
                             f"compared exactly)")
    report = compare(reference, candidate, *tols, allow_missing=allow_missing, dtype=dtype, equal_nan=equal_nan)
    if cmeta.get("dtype") != dtype:
        report.notes.append(f"note: candidate dtype {cmeta.get('dtype')} differs from the golden file's {dtype}")
    extra = [n for n in candidate if n not in reference]
    if extra:
        report.notes.append(f"note: {len(extra)} candidate tensors are not in the golden file (ignored), "
                            f"e.g. {extra[0]}")
    return report


# --- transformers vs ref-bert ----------------------------------------------------------------------
def require_transformers():
    """The transformers module; a ValueError saying plainly that torch or transformers is missing."""
    try:
        import torch  # noqa: F401  (only to say early, and plainly, that it is missing)
        import transformers
    except ImportError as e:
        raise ValueError(f"ref-bert verify --hf needs torch and transformers ({e}); "
                         f"install them with pip install 'ref-bert[test]'") from None
    return transformers


def verify_hf(directory, dtype="float64", seed=0, batch=2, seq_len=16, rtol=None, atol=None,
              progress: bool = False, inputs: dict | None = None) -> Report:
    """Run transformers and ref-bert on the same inputs and weights and compare parameters, every
    activation, the loss and every gradient, for every architecture (:data:`ref_bert.hf.ARCHITECTURES`).
    The inputs and labels are :func:`ref_bert.golden.make_inputs`'s for the checkpoint's head; a bare
    Albert/BertModel has no loss, so both sides backpropagate the same random upstream gradient
    (d_last_hidden_state, d_pooled_output) and report <upstream, outputs> as the loss.
    ``directory`` is a Hugging Face model directory (transformers' or ``save_hf``'s); ``progress`` shows
    a bar on stderr, one update per stage (loading each side, then running each side). ``inputs``: a batch
    under :data:`ref_bert.examples.BATCH_NAMES` (e.g. :func:`ref_bert.examples.text_batch` of the user's
    text) in place of the synthetic ``batch`` x ``seq_len`` one."""
    import sys

    from tqdm import tqdm

    transformers = require_transformers()
    from .hf import architecture_of, transformer_directory

    directory = transformer_directory(directory)      # a sentence-transformers directory: its transformer
    arch, family = architecture_of(directory)
    bar = tqdm(total=5, desc="verify", unit="stage", disable=not progress, file=sys.stderr, leave=False)

    def advance(stage):
        bar.set_postfix_str(stage, refresh=False)
        bar.update(1)

    try:
        return _verify_hf(directory, arch, family, dtype, seed, batch, seq_len, rtol, atol, advance,
                          transformers.__version__, inputs)
    finally:
        bar.close()


def _hf_loss(out, x, head):
    """transformers' loss for ``head`` as a torch scalar, and notes. The causal LM loss is recomputed in
    the model's dtype (transformers' ForCausalLMLoss upcasts with ``logits.float()``, which turns float64
    into float32); the bare model's is <upstream, outputs>."""
    import torch

    if head == "base":
        d_last = torch.from_numpy(x["d_last_hidden_state"]).to(out.last_hidden_state.dtype)
        d_pooled = torch.from_numpy(x["d_pooled_output"]).to(out.pooler_output.dtype)
        return (out.last_hidden_state * d_last).sum() + (out.pooler_output * d_pooled).sum(), \
            ["note: BertModel/AlbertModel has no loss: both sides backpropagate the same random upstream "
             "gradient (inputs d_last_hidden_state, d_pooled_output); loss/total is <upstream, outputs>"]
    if head == "causal_lm":
        logits, labels = out.logits, torch.from_numpy(x["labels"])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1))
        return loss, ["note: BertLMHeadModel's loss is transformers' shifted cross-entropy recomputed in the "
                      "model's dtype (transformers upcasts the logits with .float(), i.e. to float32)"]
    return out.loss, []


def _verify_hf(directory, arch, family, dtype, seed, batch, seq_len, rtol, atol, advance,
               transformers_version, inputs=None) -> Report:
    from . import hf_torch
    from .golden import head_loss_and_grads, make_inputs, text_inputs
    from .model import Model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fresh heads: those rows are simply not compared
        ours = Model.from_hf(directory, dtype=dtype, seed=seed, tokenizer=False)
    advance("ref-bert loaded")
    hf = hf_torch.from_pretrained(directory, dtype=dtype)
    advance("transformers loaded")
    cfg = ours.config
    head = cfg.head
    x = make_inputs(cfg, batch, seq_len, seed, dtype=dtype) if inputs is None else text_inputs(cfg, inputs, seed, dtype)
    batch, seq_len = x["input_ids"].shape[0], x["input_ids"].shape[-1]

    # transformers, with hooks: forward, its loss (or the upstream product), backward
    # (the causal LM's labels stay out of the call: its loss is recomputed in _hf_loss)
    kwargs = hf_torch.forward_kwargs(x, family, labels=head not in ("base", "causal_lm"))
    with hf_torch.capture(hf) as captured:
        hf.zero_grad(set_to_none=True)
        out = hf(**kwargs)
        hf_loss, notes = _hf_loss(out, x, head)
        hf_loss.backward()
    advance("transformers ran")

    # ref-bert, in the same order
    reference: OrderedDict = OrderedDict()
    candidate: dict = {}
    hf_params = hf_torch.parameters(hf)
    for name, value in ours.hf_state_dict().items():
        if name in hf_params:
            reference[f"params/{name}"] = hf_params[name]
            candidate[f"params/{name}"] = value

    order = []

    def trace(name, array):
        order.append(name)
        candidate[f"forward/{name}"] = np.array(array)

    ours.forward(x["input_ids"], x["token_type_ids"], x["attention_mask"], x["position_ids"], trace=trace)
    advance("ref-bert forward")
    skipped = [n for n in order if n not in captured]
    for name in order:
        if name in captured:
            reference[f"forward/{name}"] = captured[name]
    if skipped:
        notes.append(f"note: {arch} does not compute {len(skipped)} of ref-bert's activations (not compared): "
                     f"{', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''}")
    dev = {k: ours.backend.from_host(v, dtype=ours.dtype) if v.dtype.kind == "f" else ours.backend.from_host(v)
           for k, v in x.items()}
    result = head_loss_and_grads(ours, dev)
    reference["loss/total"] = hf_loss.detach().cpu().numpy()
    candidate["loss/total"] = np.asarray(ours.backend.to_host(result.loss))
    hf_grads = hf_torch.parameters(hf, grads=True)
    missing = []
    for name, g in ours.hf_state_dict(result.grads).items():
        if name in hf_grads:
            reference[f"grads/{name}"] = hf_grads[name]
            candidate[f"grads/{name}"] = g
        else:
            missing.append(name)
    if missing:
        notes.append(f"note: transformers gives no gradient for {len(missing)} parameters (not compared): "
                     f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
    advance("ref-bert gradients")
    report = compare(reference, candidate, *tolerances(dtype, rtol, atol), dtype=dtype)
    report.notes = [f"reference: transformers {transformers_version} {arch} (eager attention); "
                    f"candidate: ref-bert; batch {batch} x {seq_len}, seed {seed}"] + notes
    return report
