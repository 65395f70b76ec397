"""Every op of ref_bert/ops that exponentiates (or could overflow otherwise), fed inputs at and beyond the
float32 and float64 overflow limits, against a 50-digit reference, on the reference ops (what
REF_BERT_FAST=0 runs), the NumPy backend's default fast table and the CUDA kernels' source interpreted by
NumPy (where the op has such variants).

The inputs: logits within a few units of log(max float) (88.72 in float32, 709.78 in float64), where
each exp is finite but a row sum of a few of them overflows; beyond it (one exp overflows alone); far
below (every unshifted exp underflows to 0, so an unshifted softmax divides 0 by 0); +-1e4 and spreads up
to half the largest float; rows with one huge value, rows with -inf (masked) entries, the attention's
finite -10000 mask and a query whose keys are all masked; attention scores past both limits; losses on
vanishing probabilities; activations at +-1e4 and where x^3 overflows; LayerNorm rows of 1e15 / 1e150
and zero rows; pooling with the largest floats in the padding; L2 normalisation of huge, tiny and zero
rows.

The reference is independent of the code's arithmetic: mpmath at 50 significant digits, whose numbers
have an unbounded exponent, so exp(1e4) needs no shift at all (softmax is exp(x_i) / sum_j exp(x_j)
literally, log-softmax log of that, BCE -[y log sigma(z) + (1 - y) log(1 - sigma(z))] with
log sigma(z) = -log1p(exp(-z))); pooling's is math.fsum. Each float result must be finite, of the
input's dtype, and within a stated bound of it.

Tolerances. eps is the dtype's machine epsilon (2^-23 for float32, 2^-52 for float64; one rounding is at
most eps/2 relative). A bound is ``K * eps * scale`` per element, where ``scale`` is the size of the
rounding errors the formula cannot avoid (derived in each test's docstring) and K = 4 unless a test
says otherwise, plus the smallest normal float as an absolute floor (an entry whose exact value is
below it is a subnormal, with fewer bits). The softmax family's scale, for example:

* softmax p_i = exp(d_i) / s with d_i = x_i - max(x): the shift d_i is rounded (error eps/2 |d_i|), which
  exp turns into a relative error eps/2 |d_i| of p_i (the condition number of exp at d_i is |d_i|); exp
  itself, the row sum of n terms and the division add about (n + 2) eps/2. So scale = p_i (|d_i| + n + 4).
* log-softmax d_i - log s: the same terms, absolute: scale = |d_i| + |log p_i| + n + 4.

The largest measured |got - ref| / (eps * scale) over every check is 0.75 (``pytest -s`` prints them per
check): the bounds hold with room, and the errors found are rounding. A missing max-subtraction is not
off by a few ulps: it gives inf, nan or 0 for a whole row. Planted once each, and each failed here:
softmax's shift removed or flipped (reference, NumPy fast, CUDA kernels), log-softmax's, a naive
log(softmax) in the cross-entropy, the attention scale inverted or sqrt of the wrong axis, "=" for
"+=" in the attention's gradient accumulation, LayerNorm's epsilon outside the square root, BCE's
naive form and log(1 + e) for log1p, max pooling without the padding mask, a tanh GELU for the erf one,
and the L2 clamp at 1e-13.

Limits found (not tested, outside any model's values): LayerNorm and L2 normalisation overflow the
sum of squares above sqrt(max) (1.8e19 in float32); gelu_new's backward gives nan above about
1.7 cbrt(max) in the fast variants (0.2 x^3 overflows, times 1 - h = 0) and sqrt(max / 0.134) in the
reference (x^2); the cross-entropy's smoothing term overflows when a row spreads over +-max/2.
And one that is not an overflow: LayerNorm of a constant row whose mean does not round back to the
value (7 x 0.1 or 12 x 10000.3 in float32) gives xhat up to +-1 where the exact value is 0 (the mean's
rounding divided by sqrt(var + eps)); torch's layer_norm returns exactly b there. Only the zero row is
tested here.
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
    50 digits: bound 4 eps (|d_i| + |log p_i|) + 8 eps (n + 4) absolute (module docstring; the scale is
    formed in halves, as both terms reach the largest float in the row spread over +-max/2). Masked
    entries are exactly -inf."""
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
    f = lambda a: np.asarray(a, dtype=np.float64)   # noqa: E731
    A = lambda a: np.abs(f(a))                      # noqa: E731
    # the magnitudes the roundings scale with: every product and sum above taken of absolute values
    # (a gradient that cancels, like the key bias's, is exactly 0, and its computed value is that noise)
    mag = {"query": A(merge(q)), "key": A(merge(k)), "value": A(merge(v)), "probs": A(probs),
           "context": f(merge(np.einsum("bhij,bhjd->bhid", A(dropped), A(v))))}
    mag_dz = A(probs) * (A(dprobs) + (A(dprobs) * A(probs)).sum(axis=-1, keepdims=True))
    mag_dt = {"query": merge(np.einsum("bhij,bhjd->bhid", mag_dz, A(k))) * float(s),
              "key": merge(np.einsum("bhij,bhid->bhjd", mag_dz, A(q))) * float(s),
              "value": merge(np.einsum("bhij,bhid->bhjd", A(dropped), A(dctx)))}
    grads, dx, mag["dx"] = {}, 0, 0
    for name, dt in (("query", merge(dq)), ("key", merge(dk)), ("value", merge(dv))):
        grads[f"{name}.weight"] = f(np.einsum("bti,btj->ij", X, dt))
        grads[f"{name}.bias"] = f(dt.sum(axis=(0, 1)))
        dx = dx + dt @ to_mp(p[f"{name}.weight"]).T
        mag[f"{name}.weight"] = np.einsum("bti,btj->ij", np.abs(x), mag_dt[name])
        mag[f"{name}.bias"] = mag_dt[name].sum(axis=(0, 1))
        mag["dx"] = mag["dx"] + mag_dt[name] @ np.abs(p[f"{name}.weight"]).T
    return f(merge(q)), f(merge(k)), f(merge(v)), f(probs), f(merge(context)), f(dx), grads, mag


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
    """self_attention_forward / _backward (with attention dropout) against mp_attention: every traced
    activation, the context, dx and the six parameter gradients (accumulated onto buffers that already
    hold a value, as a shared ALBERT layer's are). Bound per tensor: 32 eps of the largest magnitude its
    roundings scale with (mp_attention's ``mag``: the same products and sums of absolute values; a
    normwise bound). The op chains a few dozen roundings (sums of up to 3H = 24 products, the softmax's
    n + 4), and the softmax's inputs are exact, so nothing is amplified; an unstable softmax is off by
    O(1) or gives nan."""
    x, p, M, heads = integer_attention_case(dtype, case)
    B, T, H = x.shape
    drop = keep_mask((B, heads, T, T), 0.8, seed=6).astype(dtype)
    rng = np.random.default_rng(7)
    dcontext = rng.standard_normal((B, T, H)).astype(dtype)
    q, k, v, probs, context, dx, grads, mag = mp_attention(x, p, M, heads, drop, dcontext)
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
    expected = dict(query=q, key=k, value=v, probs=probs, context=context)
    scale = lambda name: 8 * np.abs(mag[name]).max()   # noqa: E731   (K * 8 = 32 eps)
    for name, a in traced:
        check(a, expected[name], scale(name), dtype, f"attention {name}")
    check(out, context, scale("context"), dtype, "attention context")
    check(got_dx, dx, scale("dx"), dtype, "attention dx")
    for key in p:          # the accumulation g0 + gradient rounds once more, at g's size
        check(g[key] - g0[key], grads[key], scale(key) + np.abs(g[key]).max(), dtype, f"attention d{key}")


# --- losses -------------------------------------------------------------------------------------------------
def mp_cross_entropy(z, labels, eps, normalization, dloss, ignore_index=-100):
    """torch's CrossEntropyLoss(label_smoothing=eps) (mean) or TF ALBERT's sum / (count + 1e-5), and its
    gradient, in 50 digits: log p_c = z_c - log sum_j exp(z_j), l_n = -sum_c q_c log p_c with
    q = (1 - eps) onehot(y) + eps / C."""
    N, C = z.shape
    total, grad = MP.mpf(0), np.zeros((N, C))
    valid = [n for n in range(N) if labels[n] != ignore_index]
    D = MP.mpf(max(len(valid), 1)) if normalization == "mean" else len(valid) + MP.mpf("1e-5")
    for n in valid:
        e = [MP.exp(MP.mpf(v)) for v in z[n].astype(np.float64)]
        s = MP.fsum(e)
        logs = MP.log(s)
        q = [MP.mpf(eps) / C + (1 - MP.mpf(eps) if c == labels[n] else 0) for c in range(C)]
        total += -MP.fsum(qc * (MP.mpf(v) - logs) for qc, v in zip(q, z[n].astype(np.float64)))
        for c in range(C):
            grad[n, c] = float(MP.mpf(dloss) * (e[c] / s - q[c]) / D)
    return float(total / D), grad


def ce_case(dtype):
    """extreme_rows but the one spread to +-max/2 (10 rows of 8), with labels on the largest logit, on
    vanishing ones (log p = -2e4, -1e4, -4e3) and on ordinary ones, two rows ignored. The row left out:
    with smoothing, its sum_c log p_c is about -4 max, which overflows before the eps / C scaling (the
    loss, 4 max eps / (C D), would be representable): a limit of that sum, far from any model's logits."""
    z = np.delete(extreme_rows(dtype), 9, axis=0)
    labels = np.array([3, 0, 7, 2, -100, 1, 1, 0, 5, -100])
    return z, labels


def check_cross_entropy(z, labels, smoothing, normalization, dloss, dtype, what):
    """cross_entropy_forward / _backward against mp_cross_entropy. Loss bound: every term -q_c log p_c >= 0
    carries the log-softmax error eps (|d_c| + |log p_c| + n + 4), and the sums add (N + C) eps/2 of the
    total: scale = sum_n,c q_c (|d_c| + |log p_c| + n + 4) / D + (N + C) loss. Gradient dloss (p - q) / D:
    scale = |dloss| / D (p (|d| + n + 4) + 2 |p - q|) + |ref| (p's error, the subtraction, the product).
    Rows of an ignored label have zero gradient exactly."""
    N, C = z.shape
    loss_ref, grad_ref = mp_cross_entropy(z, labels, smoothing, normalization, dloss)
    p_ref, logp_ref, d = mp_softmax_rows(z)
    valid = labels != -100
    count = int(valid.sum())
    D = max(count, 1) if normalization == "mean" else count + 1e-5
    q = smoothing / C + (1 - smoothing) * (np.arange(C) == np.where(valid, labels, 0)[:, None])
    ad = np.abs(d)
    loss, cache = ops.cross_entropy_forward(z.copy(), labels, label_smoothing=smoothing, normalization=normalization)
    dz = ops.cross_entropy_backward(dtype(dloss), cache)
    terms = (q * (ad / 2 + np.abs(logp_ref) / 2 + 0.5 * (C + 4)))[valid].sum() * 2 / D
    check(loss, loss_ref, terms + (N + C) * abs(loss_ref), dtype, what + " loss")
    check(dz, grad_ref, dloss / D * (p_ref * (ad + C + 4) + 2 * np.abs(p_ref - q)) * valid[:, None]
          + np.abs(grad_ref), dtype, what + " dz")
    assert not dz[~valid].any()
    return logp_ref


@pytest.mark.parametrize("table", ["reference", "numpy_fast"])
@pytest.mark.parametrize("smoothing, normalization", [(0.0, "mean"), (0.1, "mean"), (1.0, "mean"),
                                                       (0.0, "tf_albert"), (0.3, "tf_albert")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_at_the_overflow_limits(dtype, smoothing, normalization, table):
    """Cross-entropy with an ignore index, label smoothing up to the uniform target 1.0 and both
    normalisations, on ce_case, against 50 digits (bounds: check_cross_entropy)."""
    z, labels = ce_case(dtype)
    with running(table):      # cross-entropy has no fast variant: the tables must not matter
        logp_ref = check_cross_entropy(z, labels, smoothing, normalization, 0.7, dtype, "cross-entropy")
    valid = labels != -100
    assert logp_ref[valid, labels[valid]].min() < -4000          # labels on vanishing probabilities


@pytest.mark.parametrize("normalization", ["mean", "tf_albert"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_with_one_or_no_labelled_row(dtype, normalization):
    """One labelled row: D = 1 (mean) or 1 + 1e-5 (TF ALBERT); none: the loss is 0 (torch gives nan for the
    mean) and so is the gradient."""
    z = extreme_rows(dtype)[[0, 5]]
    for labels in (np.array([-100, 1]), np.array([-100, -100])):
        check_cross_entropy(z, labels, 0.0, normalization, 1.0, dtype, "cross-entropy, <= 1 row")


def mp_bce(z, y):
    """Per element -[y log sigma(z) + (1 - y) log(1 - sigma(z))] = y log1p(exp(-z)) + (1 - y) log1p(exp(z)),
    and sigma(z) = 1 / (1 + exp(-z)), in 50 digits."""
    loss, sig = np.empty(z.shape), np.empty(z.shape)
    for i, (zi, yi) in enumerate(zip(z.reshape(-1).astype(np.float64), y.reshape(-1).astype(np.float64))):
        zi, yi = MP.mpf(zi), MP.mpf(yi)
        loss.flat[i] = float(yi * MP.log1p(MP.exp(-zi)) + (1 - yi) * MP.log1p(MP.exp(zi)))
        sig.flat[i] = float(1 / (1 + MP.exp(-zi)))
    return loss, sig


def bce_case(dtype, case):
    """"mixed": logits at +-1e4, past +-log(max), in sigma's tails and ordinary ones, hard and soft targets;
    "well classified": every logit on its target's side (the losses are exp(-|z|), down to 1e-4343 and
    below the smallest float): the loss is a mean of tail values, which log1p keeps accurate."""
    L = float(np.log(np.finfo(dtype).max))
    if case == "well classified":
        z = np.array([[30.0, -30.0, 40.0, -17.0], [100.0, -100.0, L, -L], [1e4, -1e4, 25.0, -60.0]])
        return z.astype(dtype), (z > 0).astype(dtype)
    z = np.array([[1e4, -1e4, L + 5, -L - 5, L - 1, -L + 1],
                  [100.0, -100.0, 40.0, -40.0, 17.0, -17.0],
                  [1e4, -1e4, 2.5, -2.5, 0.0, -0.0],
                  [L + 30, -L - 30, 1e-3, -1e-3, 30.0, -30.0]]).astype(dtype)
    y = np.array([[1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0.25, 0.75], [0.25, 0.75, 1, 0, 0, 1], [1, 0, 1, 0, 0.5, 0.5]],
                 dtype=dtype)
    return z, y


@pytest.mark.parametrize("case", ["mixed", "well classified"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits_and_sigmoid_at_the_overflow_limits(dtype, case):
    """bce_with_logits_forward / _backward and sigmoid against mp_bce. Per element the stable form
    max(z, 0) - z y + log1p(exp(-|z|)) rounds z y and the difference only for a soft target (for y in
    {0, 1} both are exact), and log1p(exp(-|z|)) to a few eps of itself: scale_l = |z| (1 + y) (soft y)
    + 3 l; the loss scale is sum(scale_l) / N + N loss (the mean's sum). sigma is exp of -|z| (exact)
    and one division: scale 2 sigma, relative even where sigma is 3.7e-44 (float64). Gradient
    (sigma - y) dloss / N: scale (2 sigma + |sigma - y|) |dloss| / N."""
    z, y = bce_case(dtype, case)
    N = z.size
    l_ref, sig_ref = mp_bce(z, y)
    loss, cache = ops.bce_with_logits_forward(z, y)
    dz = ops.bce_with_logits_backward(dtype(0.7), cache)
    az, soft = np.abs(z.astype(np.float64)), (y != 0) & (y != 1)
    scale_l = np.where(soft, az * (1 + y), 0.0) + 3 * l_ref
    check(loss, l_ref.mean(), scale_l.sum() / N + N * l_ref.mean(), dtype, f"bce loss, {case}")
    check(ops.sigmoid(z), sig_ref, 2 * sig_ref, dtype, "sigmoid")
    check(dz, (sig_ref - y) * 0.7 / N, (2 * sig_ref + np.abs(sig_ref - y)) * 0.7 / N, dtype, "bce dz")
    if case == "well classified":
        assert 0 < l_ref.mean() < 1e-8                  # every term is a tail value


# --- activations --------------------------------------------------------------------------------------------
GELU_CUBIC = 0.044715


def mp_activation(name, x):
    """y and dy/dx in 50 digits, from the definitions (ops/activations.py's docstring) written so that no
    digit cancels: Phi(x) = erfc(-x / sqrt 2) / 2; 0.5 x (1 + tanh u) = x / (1 + exp(-2u));
    1 - tanh(u)^2 = sech(u)^2."""
    y, dy = np.empty(x.shape), np.empty(x.shape)
    for i, v in enumerate(x.reshape(-1).astype(np.float64)):
        v = MP.mpf(v)
        if name == "gelu":
            cdf = MP.erfc(-v / MP.sqrt(2)) / 2
            y.flat[i], dy.flat[i] = v * cdf, cdf + v * MP.exp(-v * v / 2) / MP.sqrt(2 * MP.pi)
        elif name == "gelu_new":
            c = MP.sqrt(2 / MP.pi)
            u = c * (v + GELU_CUBIC * v ** 3)
            y.flat[i] = v / (1 + MP.exp(-2 * u))
            dy.flat[i] = 1 / (1 + MP.exp(-2 * u)) + v / 2 * MP.sech(u) ** 2 * c * (1 + 3 * GELU_CUBIC * v * v)
        else:
            y.flat[i], dy.flat[i] = MP.tanh(v), MP.sech(v) ** 2
    return y, dy


def activation_inputs(dtype):
    """+-1e4, past +-log(max), the tanh saturation region, ordinary values, 0, and +-1.3 cbrt(max), where
    x^3 overflows (gelu_new's u is +-inf; its backward's x^2 terms still fit: the formulas are finite up
    to about 1.7 cbrt(max) in the fast gelu_new backward, where 0.2 x^3 overflows and inf * 0 gives
    nan, and up to sqrt(max / 0.134) in the reference one, where x^2 does; torch's tanh-GELU backward has
    the same x^2 term)."""
    L = float(np.log(np.finfo(dtype).max))
    big = 1.3 * float(np.finfo(dtype).max) ** (1 / 3)
    v = np.array([1e4, L + 5, 100.0, 20.0, 10.0, 5.5, 2.7, 1.0, 0.3, big])
    return np.concatenate([v, -v, [0.0]]).astype(dtype).reshape(3, 7)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")    # gelu_new's x^3, on purpose
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("name", ["gelu", "gelu_new", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_at_large_inputs(dtype, name, table):
    """activation_forward / _backward against mp_activation. Bounds (absolute, per element, dy the
    upstream gradient): gelu y: |y| + |x| (1 + erf(x / sqrt 2) is formed in float: an absolute error
    eps, times x / 2); gelu dy: |dy| (|y'| + 1 + |x| phi(x) (x^2 + 2)) (exp(-x^2 / 2) has the condition
    number x^2 / 2); gelu_new y: |y| + 2 |x| (1 + tanh u likewise); gelu_new and tanh dy: |dy| (|y'| + 3 +
    |x| u' S) with S = min(4 + 2 |u|, sech(u)^2 / eps) the error of 1 - t^2 (where sech^2 < eps, t rounds
    to +-1 and 1 - t^2 to 0, off by sech^2 only), for tanh |x| u' is 1 and u = x."""
    x = activation_inputs(dtype)
    y_ref, d_ref = mp_activation(name, x)
    dy = np.random.default_rng(8).standard_normal(x.shape).astype(dtype)
    with running(table):
        y, cache = ops.activation_forward(name, x.copy())
        dx = ops.activation_backward(dy.copy(), cache)
    xf, ady = np.abs(x.astype(np.float64)), np.abs(dy.astype(np.float64))
    eps = eps_of(dtype)
    if name == "gelu":
        pdf = np.exp(-np.minimum(xf, 1e150) ** 2 / 2) / np.sqrt(2 * np.pi)
        y_scale, d_scale = np.abs(y_ref) + xf, ady * (np.abs(d_ref) + 1 + xf * pdf * (np.minimum(xf, 1e150) ** 2 + 2))
    else:
        if name == "gelu_new":
            c = np.sqrt(2 / np.pi)
            with np.errstate(over="ignore"):
                u = c * (xf + GELU_CUBIC * xf ** 3)
                du = c * (1 + 3 * GELU_CUBIC * xf * xf)
            y_scale = np.abs(y_ref) + 2 * xf
        else:
            u, du, y_scale = xf, np.ones_like(xf), np.abs(y_ref)
        sech2 = 4 * np.exp(-2 * np.minimum(u, 400.0)) / (1 + np.exp(-2 * np.minimum(u, 400.0))) ** 2
        S = np.minimum(4 + 2 * np.minimum(u, 1e10), sech2 / eps)
        d_scale = ady * (np.abs(d_ref) + 3 + np.where(S > 0, xf * du * S, 0.0))
    check(y, y_ref, y_scale, dtype, f"{name} y")
    check(dx, d_ref * dy, d_scale, dtype, f"{name} dx")


def test_relu_at_large_inputs_and_at_zero():
    """relu: max(x, 0) and the gradient 1 where x > 0 else 0 (so 0 at x = 0, as torch), exactly."""
    x = np.array([1e4, -1e4, 3e38, -3e38, 0.0, -0.0, 1e-45, -1e-45], dtype=np.float32)
    y, cache = ops.activation_forward("relu", x)
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    assert y.dtype == np.float32 and y[4] == 0 and y[2] == x[2] and y[6] == x[6]
    np.testing.assert_array_equal(ops.activation_backward(np.full(8, 2.0, np.float32), cache),
                                  [2, 0, 2, 0, 0, 0, 2, 0])


# --- layer norm ---------------------------------------------------------------------------------------------
def mp_layer_norm(x, w, b, eps, dout):
    """LayerNorm and its gradients (ops/layer_norm.py's docstring) in 50 digits: out, dx, dw, db."""
    X, W, Bb, G = to_mp(x), to_mp(w), to_mp(b), to_mp(dout)
    C = x.shape[-1]
    mean = X.sum(axis=-1, keepdims=True) / C
    var = ((X - mean) ** 2).sum(axis=-1, keepdims=True) / C
    rstd = 1 / np.vectorize(MP.sqrt, otypes=[object])(var + MP.mpf(eps))
    xhat = (X - mean) * rstd
    g = G * W
    dx = rstd * (g - g.sum(axis=-1, keepdims=True) / C - xhat * (g * xhat).sum(axis=-1, keepdims=True) / C)
    f = lambda a: np.asarray(a, dtype=np.float64)   # noqa: E731
    rows = lambda a: a.reshape(-1, C)               # noqa: E731
    return f(xhat * W + Bb), f(dx), f(rows(G * xhat).sum(axis=0)), f(rows(G).sum(axis=0)), f(rstd)


def layer_norm_rows(dtype, C=12, seed=9):
    rng = np.random.default_rng(seed)
    huge = 1e15 if dtype == np.float32 else 1e150
    return np.stack([rng.standard_normal(C) * huge,               # (x - mean)^2 about 1e30 / 1e300
                     1e4 + rng.standard_normal(C),                 # a large offset: the mean's rounding
                     np.r_[1e4, -1e4, rng.standard_normal(C - 2)],
                     np.r_[huge, np.zeros(C - 1)],                 # one outlier
                     np.zeros(C),                                  # var = 0: rstd = 1 / sqrt(eps)
                     rng.standard_normal(C)]).astype(dtype).reshape(2, 3, C)     # (B, T, H), as the model's


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_at_large_and_zero_rows(dtype, table):
    """layer_norm_forward / _backward (eps 1e-12) over the last axis of (2, 3, 12) rows, against
    mp_layer_norm. The rounding that matters is
    the mean's (C eps / 2 of max|x|), which the centring passes on and rstd multiplies: per row
    kappa = max|x| rstd + 1, and the bounds are C kappa for xhat, |w| C kappa + |out| for the output,
    2 C kappa rstd max|g| + |dx| for dx (g = dout w), sum over rows of |dout| C kappa for dw and
    N |dout| for db. A zero row gives out = b and dx = 1e6 (g - mean(g)) exactly (the epsilon is inside
    the square root). Rows of |x| above sqrt(max) (1.8e19 in float32) overflow (x - mean)^2: not tested."""
    x = layer_norm_rows(dtype)
    C = x.shape[-1]
    N = x.size // C
    rng = np.random.default_rng(10)
    w = (1 + rng.standard_normal(C) / 4).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    out_ref, dx_ref, dw_ref, db_ref, rstd = mp_layer_norm(x, w, b, 1e-12, dout)
    dw0, db0 = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    dw, db = dw0.copy(), db0.copy()
    with running(table):
        out, cache = ops.layer_norm_forward(x.copy(), w, b, 1e-12)
        dx = ops.layer_norm_backward(dout.copy(), cache, dw, db)
    kappa = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True) * rstd + 1
    g = np.abs(dout.astype(np.float64) * w)
    check(out, out_ref, np.abs(w) * C * kappa + np.abs(out_ref), dtype, "layer norm out")
    check(dx, dx_ref, 2 * C * kappa * rstd * g.max(axis=-1, keepdims=True) + np.abs(dx_ref), dtype, "layer norm dx")
    check(dw - dw0, dw_ref, (np.abs(dout) * C * kappa).reshape(-1, C).sum(axis=0) + 2 * np.abs(dw0), dtype,
          "layer norm dw")
    check(db - db0, db_ref, N * np.abs(dout).reshape(-1, C).sum(axis=0) + 2 * np.abs(db0), dtype, "layer norm db")
    np.testing.assert_array_equal(out[1, 1], b)                  # the zero row


# --- pooling and L2 normalisation ---------------------------------------------------------------------------
def pooling_case(dtype):
    """B 3, T 5, H 4. Padding holds the largest finite values (and +-1e4), real tokens hold huge and tiny
    ones; row 1 is left-padded (its first real token is t = 2)."""
    rng = np.random.default_rng(11)
    big = float(np.finfo(dtype).max) / 8
    h = rng.standard_normal((3, 5, 4)) * 1e4
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    h[mask == 0] = big                                   # padding: larger than any real token
    h[0, 1, 0], h[2, 0, 3] = -big, big / 4               # real tokens at the extremes
    return h.astype(dtype), mask


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len_tokens"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_with_huge_padding(dtype, mode):
    """pooling_forward / _backward against sentence-transformers' definitions, summed with math.fsum
    (docs/reference.md 7.2): cls the first real token, max over real tokens only (padding never wins,
    however large), mean = sum / n and mean_sqrt_len_tokens = sum / sqrt(n) over the n real tokens.
    The gradient is dy routed to the chosen token (cls, max) or dy / n, dy / sqrt(n) on every real one.
    Bounds: exact for cls and max; the sums (T + 2) eps/2 of sum|h| / n."""
    import math

    h, mask = pooling_case(dtype)
    B, T, H = h.shape
    y, cache = ops.pooling_forward(h, mask, mode)
    dy = np.random.default_rng(12).standard_normal((B, H)).astype(dtype)
    dh = ops.pooling_backward(dy, cache)
    y_ref, dh_ref, scale = np.zeros((B, H)), np.zeros((B, T, H)), np.zeros((B, H))
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        n = len(real)
        for k in range(H):
            column = [float(h[b, t, k]) for t in real]
            if mode == "cls":
                y_ref[b, k], dh_ref[b, real[0], k] = column[0], dy[b, k]
            elif mode == "max":
                y_ref[b, k] = max(column)
                dh_ref[b, real[column.index(max(column))], k] = dy[b, k]
            else:
                den = n if mode == "mean" else math.sqrt(n)
                y_ref[b, k] = math.fsum(column) / den
                scale[b, k] = math.fsum(abs(c) for c in column) / den * (T + 2)
                for t in real:
                    dh_ref[b, t, k] = dy[b, k] / den
    check(y, y_ref, scale, dtype, f"pooling {mode} y", k=1)
    check(dh, dh_ref, 2 * np.abs(dh_ref), dtype, f"pooling {mode} dh", k=1)
    assert np.abs(y).max() < float(np.finfo(dtype).max) / 8      # padding's value never came through


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_normalize_of_huge_tiny_and_zero_rows(dtype):
    """l2_normalize_forward / _backward over the last axis of a (2, 3, 6) array, against 50 digits:
    z = x / max(|x|, 1e-12); dx = (dz - z (z . dz)) / |x| where |x| > 1e-12, dz / 1e-12 where not (the
    docstring's rule, also at |x| = 1e-12 exactly; torch's clamp_min would pass the gradient through the
    norm at that one point). Rows: huge (1e15 / 1e150: |x|^2 fits), tiny (1e-8), zero, |x| = 1e-12
    exactly, below it, ordinary. Bounds: z (C/2 + 2) |z| (the sum of squares, the square root, the
    division); dx ((|dz| + (C + 4) |z| sum|z dz|) / max(|x|, 1e-12) + (C/2 + 3) |dx|). Rows of |x| above
    sqrt(max) overflow the sum of squares: not tested."""
    rng = np.random.default_rng(13)
    C = 6
    huge = 1e15 if dtype == np.float32 else 1e150
    x = rng.standard_normal((6, C))
    x[0] *= huge
    x[1] *= 1e-8
    x[2] = 0.0
    x[3] = np.r_[1e-12, np.zeros(C - 1)]
    x[4] = np.r_[3e-13, -4e-13, np.zeros(C - 2)]
    x = x.astype(dtype).reshape(2, 3, C)
    dz = rng.standard_normal(x.shape).astype(dtype)
    z_ref, dx_ref, scale = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
    for i in np.ndindex(x.shape[:-1]):
        row, g = [MP.mpf(float(v)) for v in x[i]], [MP.mpf(float(v)) for v in dz[i]]
        norm = MP.sqrt(MP.fsum(v * v for v in row))
        den = max(norm, MP.mpf(1e-12))
        z = [v / den for v in row]
        dot = MP.fsum(a * b for a, b in zip(z, g))
        dx = [(gi - zi * dot) / norm if norm > MP.mpf(1e-12) else gi / MP.mpf(1e-12) for zi, gi in zip(z, g)]
        z_ref[i], dx_ref[i] = [float(v) for v in z], [float(v) for v in dx]
        adot = float(MP.fsum(abs(a * b) for a, b in zip(z, g)))
        scale[i] = (np.abs(dz[i]) + (C + 4) * np.abs(z_ref[i]) * adot) / float(den) + (C / 2 + 3) * np.abs(dx_ref[i])
    assert np.sqrt((x[1, 0] * x[1, 0]).sum()) == dtype(1e-12)      # the boundary row, as the op computes it
    z, cache = ops.l2_normalize_forward(x)
    dx = ops.l2_normalize_backward(dz, cache)
    check(z, z_ref, (C / 2 + 2) * np.abs(z_ref), dtype, "l2 normalize z")
    check(dx, dx_ref, scale, dtype, "l2 normalize dx")
    np.testing.assert_allclose(np.sqrt((z[0, :2].astype(np.float64) ** 2).sum(-1)), 1.0, rtol=C * eps_of(dtype))
