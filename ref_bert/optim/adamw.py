r"""AdamW for one tensor: the formula, and the pure function that computes it.

Adam with decoupled weight decay (Loshchilov & Hutter), for comparison with LAMB. One step, t the
optimiser's single step counter (1 on the first step), ``wd`` the tensor's decay rate (0 when its
name is excluded from decay):

    g  <- g * c                      c = clip_factor(||G||, max_grad_norm), ||G|| over *all* tensors (optional)
    m  <- b1 m + (1 - b1) g
    v  <- b2 v + (1 - b2) g^2
    r   = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     bias_correction=True
        = m / (sqrt(v) + eps)                                 False (BERT's AdamWeightDecayOptimizer)
    w  <- w - lr * (r + wd * w)

``torch.optim.AdamW`` writes the same update as ``w <- w (1 - lr wd) - lr r``. Every line is
elementwise (no norm of the tensor), so :func:`adamw_update` works on a whole tensor or on any piece
of it alike; ``AdamW.step`` calls it on each piece (``Backend.pieces``).
"""
from __future__ import annotations

import backends

__all__ = ["adamw_update"]


def adamw_update(w, g, m, v, *, lr: float, t: int, betas=(0.9, 0.999), eps: float = 1e-8, wd: float = 0.0,
                 bias_correction: bool = True, clip=None) -> None:
    """One AdamW step of one tensor (or piece), in place (w, m and v): the module docstring's formula.

    ``clip``: the 0-d global clip factor, or None. g is not modified. Arguments are not validated
    (``AdamW`` does that)."""
    xp = backends.of(w).xp
    b1, b2 = betas
    if clip is not None:
        g = g * clip                                            # g <- g * c
    m *= b1
    m += (1.0 - b1) * g                                         # m <- b1 m + (1 - b1) g
    v *= b2
    v += (1.0 - b2) * (g * g)                                   # v <- b2 v + (1 - b2) g^2
    if bias_correction:
        bias1, bias2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        r = (m / bias1) / (xp.sqrt(v / bias2) + eps)            # r = m_hat / (sqrt(v_hat) + eps)
    else:
        r = m / (xp.sqrt(v) + eps)                              # r = m / (sqrt(v) + eps)
    if wd:
        r += wd * w                                             # r + wd * w
    w -= lr * r                                                 # w <- w - lr * (r + wd * w)
