"""Sentence pooling over the tokens of a sequence, and L2 normalisation: what a sentence-transformers
directory's ``Pooling`` and ``Normalize`` modules compute (docs/reference.md §7.2).

Shapes: hidden states h (B, T, H); mask m (B, T), 1 for real tokens and 0 for padding (a constant,
no gradient); pooled outputs (B, H); n_b = sum_t m_bt.

    cls:            y_b = h[b, f_b]            f_b = the first t with m_bt = 1 (0 for right padding)
                    dh[b, f_b] = dy_b, zero elsewhere
    mean:           y_b = sum_t m_bt h_bt / max(n_b, 1e-9)
                    dh_bt = m_bt dy_b / max(n_b, 1e-9)
    mean_sqrt_len:  y_b = sum_t m_bt h_bt / sqrt(max(n_b, 1e-9))
                    dh_bt = m_bt dy_b / sqrt(max(n_b, 1e-9))
    max:            y_bk = max over real t of h_btk (padding never wins: it is set to -inf first)
                    dh_btk = dy_bk where t is the argmax of that (b, k), zero elsewhere (the first
                    maximum when several are equal, which random real inputs never are)
    l2 normalise:   z = x / max(|x|, eps)      eps = 1e-12 (torch.nn.functional.normalize's)
                    |x| > eps: dx = (dz - z (z . dz)) / |x|   (the Jacobian (I - z z^T) / |x| is symmetric)
                    |x| <= eps: dx = dz / eps
The 1e-9 clamp is sentence-transformers': it only matters for a row without real tokens.
"""
from __future__ import annotations

import backends

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
MIN_TOKENS = 1e-9
NORMALIZE_EPS = 1e-12


def pooling_forward(h, mask, mode: str):
    """Return ``(y, cache)``: the ``mode`` pooling of ``h`` (B, T, H) over the real tokens of ``mask``."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not supported; expected one of {POOLING_MODES}")
    xp = backends.of(h).xp
    m = mask.astype(h.dtype)
    B = h.shape[0]
    if mode == "cls":
        first = xp.argmax(mask, axis=1)                        # (B,)
        return h[xp.arange(B), first], (mode, h.shape, first)
    if mode == "max":
        filled = xp.where(m[:, :, None] > 0, h, -xp.inf)
        where = xp.argmax(filled, axis=1)                      # (B, H)
        return xp.take_along_axis(filled, where[:, None, :], axis=1)[:, 0, :], (mode, h.shape, where)
    count = xp.maximum(m.sum(axis=1), MIN_TOKENS)[:, None]     # (B, 1)
    denominator = count if mode == "mean" else xp.sqrt(count)
    return (h * m[:, :, None]).sum(axis=1) / denominator, (mode, m, denominator)


def pooling_backward(dy, cache):
    """Gradient with respect to ``h``."""
    mode = cache[0]
    xp = backends.of(dy).xp
    if mode in ("cls", "max"):                # route dy to the chosen position: a one-hot over t
        _, shape, chosen = cache                 # chosen: (B,) for cls, (B, H) for max
        positions = xp.arange(shape[1])[None, :, None]
        onehot = positions == (chosen[:, None, None] if chosen.ndim == 1 else chosen[:, None, :])
        return onehot.astype(dy.dtype) * dy[:, None, :]
    _, m, denominator = cache
    return m[:, :, None] * (dy / denominator)[:, None, :]


def l2_normalize_forward(x):
    """Return ``(z, cache)``, z = x / max(|x|, eps) over the last axis."""
    xp = backends.of(x).xp
    norm = xp.maximum(xp.sqrt((x * x).sum(axis=-1, keepdims=True)), NORMALIZE_EPS)
    z = x / norm
    return z, (z, norm)


def l2_normalize_backward(dz, cache):
    z, norm = cache
    projected = dz - z * (z * dz).sum(axis=-1, keepdims=True)
    # where the clamp is active z = x / eps is linear in x: dx = dz / eps
    return backends.of(dz).xp.where(norm > NORMALIZE_EPS, projected, dz) / norm
