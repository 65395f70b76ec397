"""Every op of ref_bert/ops that exponentiates (or could overflow otherwise), fed inputs at and beyond the
float32 and float64 overflow limits, against a 50-digit reference.

The inputs: logits within a few units of log(max float) (88.72 in float32, 709.78 in float64), where
each exp is finite but a row sum of a few of them overflows; beyond it (one exp overflows alone); far
below (every unshifted exp underflows to 0, so an unshifted softmax divides 0 by 0); +-1e4 and spreads up
to half the largest float; rows with one huge value, rows with -inf (masked) entries, the attention's
finite -10000 mask; activations at +-1e4 and where x^3 overflows; LayerNorm rows of 1e15 / 1e150 and
constant rows; L2 normalisation of zero rows.

The reference is independent of the code's arithmetic: mpmath at 50 significant digits, whose numbers
have an unbounded exponent, so exp(1e4) needs no shift at all (softmax is exp(x_i) / sum_j exp(x_j)
literally, log-softmax log of that, BCE -[y log sigma(z) + (1 - y) log(1 - sigma(z))] with
log sigma(z) = -log1p(exp(-z))). Each float result must be finite and within a stated bound of it.

Tolerances. eps is the dtype's machine epsilon (2^-23 for float32, 2^-52 for float64; one rounding is at
most eps/2 relative). A bound is ``K * eps * scale`` per element, where ``scale`` is the size of the
rounding errors the formula cannot avoid and K a small constant (4 unless said otherwise; the largest
measured ratio to ``eps * scale`` is in each docstring):

* softmax p_i = exp(d_i) / s with d_i = x_i - max(x): the shift d_i is rounded (error eps/2 |d_i|), which
  exp turns into a relative error eps/2 |d_i| of p_i (the condition number of exp at d_i is |d_i|); exp
  itself, the row sum of n terms and the division add about (n + 2) eps/2. So scale = p_i (|d_i| + n + 4).
  Entries whose exact value is below the smallest normal float carry an absolute error up to that
  number (a subnormal has fewer bits): that is the absolute floor.
* log-softmax d_i - log s: the same terms, absolute: scale = |d_i| + |log p_i| + n + 4.
* a sum of nonnegative terms (a loss) keeps the relative error of its terms: scale = the value's own
  size times the largest |d_i| + n + 4 of the rows it sums.
A missing max-subtraction is not off by a few ulps: it gives inf, nan or 0 for a whole row (planted: the
tests of softmax, log-softmax, the masked softmax and the cross-entropy fail).
"""
from __future__ import annotations

import contextlib

import mpmath
import numpy as np
import pytest

import backends
from backends import cupy_fast, numpy_fast
from backends.cupy_kernels import CupyKernels
from ref_bert import ops
from ref_bert.ops import activations

MP = mpmath.MPContext()
MP.dps = 50
DTYPES = [np.float32, np.float64]
K = 4


# --- which implementation runs ---------------------------------------------------------------------------
def _table(name):
    numpy_backend = backends.get("numpy")
    if name == "reference":
        return {}
    if name == "numpy_fast":
        return numpy_fast.fast_table(numpy_backend)
    from .test_fused_kernels import NumpyKernelInterpreter     # the CUDA kernels' source, run by NumPy

    return cupy_fast.fast_table(CupyKernels(NumpyKernelInterpreter), numpy_backend)


TABLES = ["reference", "numpy_fast", "cupy kernels (interpreted)"]


@contextlib.contextmanager
def running(name):
    """The NumPy backend runs the reference ops ("reference", what REF_BERT_FAST=0 runs), its default fast
    table ("numpy_fast") or the CuPy backend's kernels interpreted by NumPy, whatever the environment."""
    numpy_backend = backends.get("numpy")
    saved = numpy_backend.fast
    numpy_backend.fast = _table(name)
    try:
        yield
    finally:
        numpy_backend.fast = saved


# --- checks -------------------------------------------------------------------------------------------------
def eps_of(dtype):
    return float(np.finfo(dtype).eps)


def check(got, ref, scale, dtype, what, k=K):
    """``got`` finite, of ``dtype``, and |got - ref| <= k * eps * scale + (the smallest normal float).
    ``scale`` must be finite (the tests order their products so that it cannot overflow). Returns the
    largest ratio |got - ref| / (eps * scale) (the docstrings' measured values)."""
    got = np.asarray(got)
    ref, scale = np.broadcast_arrays(np.asarray(ref, dtype=np.float64), np.asarray(scale, dtype=np.float64))
    assert got.dtype == dtype, (what, got.dtype)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.isfinite(got).all(), (what, got)
    assert np.isfinite(scale).all() and (scale >= 0).all(), (what, "a tolerance is not finite")
    err = np.abs(got.astype(np.float64) - ref)
    unit = eps_of(dtype) * scale
    bound = k * unit + float(np.finfo(dtype).tiny)
    bad = ~(err <= bound)
    assert not bad.any(), (what, got[bad][:5], ref[bad][:5], (err / bound)[bad][:5])
    ratio = np.where(err > float(np.finfo(dtype).tiny), err / np.maximum(unit, 1e-300), 0.0)
    RATIOS[what] = max(RATIOS.get(what, 0.0), float(ratio.max()) if ratio.size else 0.0)
    return RATIOS[what]


RATIOS: dict = {}      # the largest |got - ref| / (eps * scale) seen per check name (printed with -s)


@pytest.fixture(scope="module", autouse=True)
def _print_ratios():
    yield
    print("\nlargest |got - ref| / (eps * scale):", {k: round(v, 3) for k, v in sorted(RATIOS.items())})


# --- the 50-digit references -------------------------------------------------------------------------------
def mp_softmax_rows(x):
    """For every row of ``x`` (last axis): p, log p, and d = x - max(x), as float64 (rounded once from 50
    digits). No shift is used: exp(x_j) of a 50-digit number never overflows."""
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape(-1, x.shape[-1])
    p, logp = np.empty_like(rows), np.empty_like(rows)
    for r, row in enumerate(rows):
        e = [MP.exp(MP.mpf(v)) for v in row]
        s = MP.fsum(e)
        for j, v in enumerate(row):
            p[r, j] = float(e[j] / s)
            logp[r, j] = float(MP.mpf(v) - MP.log(s)) if np.isfinite(v) else -np.inf
    d = rows - rows.max(axis=-1, keepdims=True)
    return p.reshape(x.shape), logp.reshape(x.shape), d.reshape(x.shape)


def mp_softmax_grad_rows(x, dp):
    """dx_k = sum_i dp_i dp_i/dx_k = p_k (dp_k - sum_i dp_i p_i), in 50 digits."""
    x = np.asarray(x, dtype=np.float64)
    dp = np.asarray(dp, dtype=np.float64)
    rows, drows = x.reshape(-1, x.shape[-1]), np.broadcast_to(dp, x.shape).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    for r, (row, drow) in enumerate(zip(rows, drows)):
        e = [MP.exp(MP.mpf(v)) for v in row]
        s = MP.fsum(e)
        p = [ei / s for ei in e]
        dot = MP.fsum(MP.mpf(g) * pi for g, pi in zip(drow, p))
        for k, (pk, g) in enumerate(zip(p, drow)):
            out[r, k] = float(pk * (MP.mpf(g) - dot))
    return out.reshape(x.shape)


# --- inputs at the limits -----------------------------------------------------------------------------------
def extreme_rows(dtype, n=8, seed=0):
    """Rows of ``n`` logits at the overflow limits of ``dtype`` (module docstring), as ``dtype``."""
    rng = np.random.default_rng(seed)
    L = float(np.log(np.finfo(dtype).max))            # 88.72 (float32), 709.78 (float64)
    half_max = float(np.finfo(dtype).max) / 2
    u = lambda lo, hi: rng.uniform(lo, hi, n)         # noqa: E731
    rows = [
        u(L - 8, L - 0.01),             # each exp finite, their sum overflows
        np.full(n, L - 0.5),            # equal: exactly uniform
        u(L + 1, L + 40),               # each exp overflows
        u(-L - 40, -L - 1),             # each exp underflows: unshifted 0 / 0
        u(-L + 0.5, -L + 8),            # unshifted: subnormal terms, digits lost
        u(-1e4, 1e4),                   # a spread of 2e4
        np.r_[1e4, -1e4, rng.standard_normal(n - 2)],
        np.r_[L + 5, np.zeros(n - 1)],  # one huge value, the rest ordinary
        np.r_[0.0, np.full(n - 1, -1e4)],
        np.r_[half_max, -half_max, 0.0, 1.0, rng.standard_normal(n - 4)],   # spread: the largest float
        rng.standard_normal(n) * 3,     # ordinary
    ]
    return np.stack(rows).astype(dtype)


def masked_rows(dtype, n=8, seed=1):
    """Rows with -inf entries (a hard mask), one of them all -inf but one."""
    x = extreme_rows(dtype, n, seed)[[0, 2, 5, 10]].copy()
    x[0, ::2] = -np.inf
    x[1, 1] = -np.inf
    x[2, 3:] = -np.inf
    x[3, 1:] = -np.inf
    return x


# --- softmax and log-softmax --------------------------------------------------------------------------------
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_forward_and_backward_at_the_overflow_limits(dtype, table):
    """softmax_forward and softmax_backward against 50 digits; both bounds from the module docstring
    (the backward: dx_k = p_k (dp_k - c), c = sum_i dp_i p_i, so its scale is
    p_k (|dp_k - c| (|d_k| + n + 4) + max|dp| (sum_i p_i |d_i| + n + 4)))."""
    x = np.concatenate([extreme_rows(dtype), masked_rows(dtype)])
    n = x.shape[-1]
    p_ref, _, d = mp_softmax_rows(x)
    rng = np.random.default_rng(2)
    dp = rng.standard_normal(x.shape).astype(dtype)
    with running(table):
        p, cache = ops.softmax_forward(x.copy())
        dx = ops.softmax_backward(dp.copy(), cache)
    ad = np.where(np.isfinite(d), np.abs(d), 0.0)
    check(p, p_ref, p_ref * (ad + n + 4), dtype, "p")
    np.testing.assert_allclose(p.astype(np.float64).sum(axis=-1), 1.0, rtol=(n + 4) * eps_of(dtype))
    dx_ref = mp_softmax_grad_rows(x, dp)
    c = (p_ref * dp).sum(axis=-1, keepdims=True)
    spread = (p_ref * ad).sum(axis=-1, keepdims=True)
    scale = (p_ref * (ad + n + 4)) * np.abs(dp - c) + p_ref * np.abs(dp).max(axis=-1, keepdims=True) * (spread + n + 4)
    check(dx, dx_ref, scale, dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_at_the_overflow_limits(dtype):
    """log_softmax over the last axis of a (3, 5, 8) array (rows of extreme_rows and masked_rows) against
    50 digits: bound 4 eps (|d_i| + |log p_i| + n + 4) absolute (module docstring). Masked entries are
    exactly -inf."""
    x = np.concatenate([extreme_rows(dtype), masked_rows(dtype)])[:15].reshape(3, 5, 8)
    n = x.shape[-1]
    _, logp_ref, d = mp_softmax_rows(x)
    got = ops.log_softmax(x)
    masked = np.isneginf(x)
    assert np.isneginf(got[masked]).all()
    keep = ~masked
    check(got[keep], logp_ref[keep], np.abs(d[keep]) / 2 + np.abs(logp_ref[keep]) / 2 + n + 4, dtype, "log p", k=2 * K)


# --- the attention's masked softmax, and self-attention itself ----------------------------------------------
def keep_mask(shape, keep, seed):
    """An inverted-dropout multiplier: 1/keep with probability keep, else 0."""
    rng = np.random.default_rng(seed)
    return (rng.random(shape) < keep) / keep


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_softmax_at_the_overflow_limits(dtype, table):
    """softmax(s S + M) with dropout, forward and backward, for raw scores S at the limits (the rows of
    extreme_rows times 4, s = 1/4 as for d = 16, so s S is exact), a padding mask and a (B, T, T) mask
    with a query row whose keys are all masked (-10000 added to every key of that row, which the softmax
    ignores). The reference takes z = s S + M as the op rounds it (one IEEE addition, done here in the
    same dtype) and computes softmax(z) in 50 digits; bounds as test_softmax_forward_and_backward_...,
    the backward's times s (exact)."""
    n = T = 8
    rows = extreme_rows(dtype, n)
    rows = rows[np.abs(rows).max(axis=-1) < 1e30]                 # 4 S finite
    B, h = 2, 2
    S = (np.resize(rows, (B * h * T, n)) * 4).reshape(B, h, T, n).astype(dtype)
    padding = np.ones((B, T)); padding[1, -3:] = 0
    pair = np.ones((B, T, T)); pair[0, 2, :] = 0; pair[1, :, 5] = 0; pair[1, 4, :4] = 0
    for mask in (padding, pair):
        M = ops.additive_mask_from(mask, dtype, -10000.0)
        drop = keep_mask(S.shape, 0.9, seed=3).astype(dtype)
        z = S * dtype(0.25) + M                                    # what the op feeds its softmax
        p_ref, _, d = mp_softmax_rows(z)
        rng = np.random.default_rng(4)
        ddropped = rng.standard_normal(S.shape).astype(dtype)
        with running(table):
            (probs, dropped), cache = ops.masked_softmax_forward(S.copy(), 0.25, M, drop)
            dS = ops.masked_softmax_backward(ddropped.copy(), cache)
        ad = np.abs(d)
        check(probs, p_ref, p_ref * (ad + n + 4), dtype, "masked p")
        check(dropped, p_ref * drop, p_ref * drop * (ad + n + 5), dtype, "masked dropped")
        dp = ddropped.astype(np.float64) * drop
        dS_ref = 0.25 * mp_softmax_grad_rows(z, dp)
        c = (p_ref * dp).sum(axis=-1, keepdims=True)
        spread = (p_ref * ad).sum(axis=-1, keepdims=True)
        scale = 0.25 * ((p_ref * (ad + n + 4)) * np.abs(dp - c)
                        + p_ref * np.abs(dp).max(axis=-1, keepdims=True) * (spread + n + 5))
        check(dS, dS_ref, scale, dtype, "masked dS")


def to_mp(a):
    return np.vectorize(MP.mpf, otypes=[object])(np.asarray(a, dtype=np.float64))


def mp_attention(x, p, additive_mask, num_heads, drop, dcontext):
    """Self-attention from its definition, in 50 digits on object arrays of mpf: softmax(q k^T / sqrt(d)
    + M) (no shift), dropout, times v; and its gradients by the chain rule (ops/attention.py's docstring
    derivation). Returns (q, k, v, probs, context, dx, grads) as float64 arrays."""
    B, T, H = x.shape
    d = H // num_heads
    X = to_mp(x)
    lin = {n: X @ to_mp(p[f"{n}.weight"]) + to_mp(p[f"{n}.bias"]) for n in ("query", "key", "value")}
    heads = lambda t: t.reshape(B, T, num_heads, d).transpose(0, 2, 1, 3)   # noqa: E731
    q, k, v = heads(lin["query"]), heads(lin["key"]), heads(lin["value"])
    s = 1 / MP.sqrt(d)
    z = np.einsum("bhid,bhjd->bhij", q, k) * s + to_mp(np.broadcast_to(additive_mask, (B, num_heads, T, T)))
    e = np.vectorize(MP.exp, otypes=[object])(z)
    probs = e / e.sum(axis=-1, keepdims=True)
    dropped = probs * to_mp(drop)
    context = np.einsum("bhij,bhjd->bhid", dropped, v)
    dctx = heads(to_mp(dcontext))
    ddropped = np.einsum("bhid,bhjd->bhij", dctx, v)
    dv = np.einsum("bhij,bhid->bhjd", dropped, dctx)
    dprobs = ddropped * to_mp(drop)
    dz = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))
    dq = np.einsum("bhij,bhjd->bhid", dz, k) * s
    dk = np.einsum("bhij,bhid->bhjd", dz, q) * s
    merge = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, H)   # noqa: E731
    grads, dx = {}, 0
    for name, dt in (("query", merge(dq)), ("key", merge(dk)), ("value", merge(dv))):
        grads[f"{name}.weight"] = np.einsum("bti,btj->ij", X, dt)
        grads[f"{name}.bias"] = dt.sum(axis=(0, 1))
        grads[f"{name}.bias terms"] = np.abs(dt).sum(axis=(0, 1))       # what the bias sum's rounding scales with
        dx = dx + dt @ to_mp(p[f"{name}.weight"]).T
    f = lambda a: np.asarray(a, dtype=np.float64)   # noqa: E731
    return (f(merge(q)), f(merge(k)), f(merge(v)), f(probs), f(merge(context)), f(dx),
            {key: f(val) for key, val in grads.items()})


def integer_attention_case(dtype, case, seed=5):
    """x, weights and biases of small integers, so q, k, v and q k^T are exact in float32 (below 2^24) and
    s = 1/2 (d = 4) keeps s q k^T + M exact: the only roundings are the op's own. B 2, T 5, H 8, 2 heads
    (d = 4 differs from T and from h). ``case``:
    "near": the first dimension of every head's q and k is a constant c (bias c, weight 0) and the rest
            are small, so every score is about c^2 / 2 = 98 (float32, c = 14) or 722 (float64, c = 38),
            past exp's limit, within a few units of each other (the probabilities are far from 0 and 1);
    "spread": large weights, scores up to about +-2e4 (every row of probabilities nearly one-hot)."""
    rng = np.random.default_rng(seed)
    B, T, H, heads = 2, 5, 8, 2
    size = 1 if case == "near" else 7
    x = rng.integers(-size, size + 1, (B, T, H)).astype(dtype)
    p = {}
    for name in ("query", "key", "value"):
        p[f"{name}.weight"] = rng.integers(-size, size + 1, (H, H)).astype(dtype)
        p[f"{name}.bias"] = rng.integers(-size, size + 1, H).astype(dtype)
        if case == "near" and name != "value":
            c = 14 if dtype == np.float32 else 38
            p[f"{name}.weight"][:, ::H // heads] = 0
            p[f"{name}.bias"][::H // heads] = c
    mask = np.ones((B, T)); mask[1, 3:] = 0
    return x, p, ops.additive_mask_from(mask, dtype, -10000.0), heads


@pytest.mark.parametrize("case", ["near", "spread"])
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention_with_scores_past_the_overflow_limits(dtype, table, case):
    """self_attention_forward / _backward (with attention dropout) against mp_attention. Every traced
    activation, the context, dx and the six parameter gradients (accumulated onto buffers that already
    hold a value, as a shared ALBERT layer's are) must match to 64 eps of the tensor's largest value:
    the op chains a few dozen roundings (sums of up to 3H products, the softmax's n + 4), and the inputs
    to the softmax are exact, so nothing is amplified; an unstable softmax is off by O(1) or gives nan."""
    x, p, M, heads = integer_attention_case(dtype, case)
    B, T, H = x.shape
    drop = keep_mask((B, heads, T, T), 0.8, seed=6).astype(dtype)
    rng = np.random.default_rng(7)
    dcontext = rng.standard_normal((B, T, H)).astype(dtype)
    q, k, v, probs, context, dx, grads = mp_attention(x, p, M, heads, drop, dcontext)
    scores = np.einsum("bhid,bhjd->bhij", *(t.reshape(B, T, heads, -1).transpose(0, 2, 1, 3) for t in (q, k))) / 2
    assert scores.max() > np.log(np.finfo(dtype).max)                  # an unshifted exp overflows
    if case == "near":                                                 # and the softmax is not one-hot
        assert ((probs > 0.05) & (probs < 0.95)).sum() > 20
    traced = []
    with running(table):
        out, cache = ops.self_attention_forward(x, p, M, heads, drop, trace=lambda n, a: traced.append((n, a.copy())))
        g0 = {key: rng.standard_normal(val.shape).astype(dtype) for key, val in p.items()}
        g = {key: val.copy() for key, val in g0.items()}
        got_dx = ops.self_attention_backward(dcontext, cache, g)
    assert [n for n, _ in traced] == ["query", "key", "value", "probs", "context"]
    expected = dict(query=q, key=k, value=v, probs=probs.reshape(B, heads, T, T), context=context)
    tol = lambda ref: 64 * eps_of(dtype) * np.abs(ref).max()   # noqa: E731
    for name, a in traced:
        check(a, expected[name], tol(expected[name]) / K / eps_of(dtype), dtype, f"attention {name}")
    check(out, context, tol(context) / K / eps_of(dtype), dtype, "attention context")
    check(got_dx, dx, tol(dx) / K / eps_of(dtype), dtype, "attention dx")
    for key in p:
        # key.bias: softmax ignores a constant added to a query's scores, so its gradient is exactly 0 and
        # what is computed is the rounding of a sum that cancels: measured against the terms summed
        terms = tol(grads[key + " terms"]) if key.endswith("bias") else 0.0
        check(g[key] - g0[key], grads[key], (tol(grads[key]) + terms + 2 * tol(g0[key])) / K / eps_of(dtype), dtype,
              f"attention d{key}")
