r"""LAMB for one tensor: the formula, and the pure functions that compute it.

LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes") is Adam
with one extra idea: every parameter tensor's step is rescaled by a *trust ratio* ||w|| / ||u||, so a
tensor moves by about ``lr * ||w||`` per step whatever the size of its gradient.

One step, with t the optimiser's single step counter (1 on the first step), for a parameter tensor w
with gradient g, moments m and v, and ``wd`` the tensor's own decay rate (0 when its name is excluded
from decay):

    g  <- g * c                      c = clip_factor(||G||, max_grad_norm), ||G|| over *all* tensors (optional)
    g  <- g + wd * w                 only weight_decay_mode="l2"
    m  <- b1 m + (1 - b1) g
    v  <- b2 v + (1 - b2) g^2
    u   = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     bias_correction="moments"
    u   = m / (sqrt(v) + eps)                                 "none" and "step_size"
    u  <- u + wd * w                 only weight_decay_mode="inside_ratio" (the default)
    ratio = phi(||w||) / ||u||       if phi(||w||) > 0 and ||u|| > 0
          = zero_norm_ratio          otherwise (1 in every published implementation)
          = 1                        tensors excluded from layer adaptation
    phi(x) = min(max(x, lo), hi)     weight_norm_clamp=(lo, hi); the identity without a clamp
    w  <- w - lr * s_t * ratio * u   [ - lr * wd * w   only weight_decay_mode="outside_ratio" ]
    s_t = sqrt(1 - b2^t) / (1 - b1^t)    bias_correction="step_size" (torch_optimizer's debias=True); 1 otherwise

Which published implementation uses which variant: presets.py (their sources: docs/reference.md,
LAMB variants). Norms are per tensor (Frobenius for matrices). The zero-norm rule matters: a naive ``||w|| / ||u||``
would be 0 for an all-zero tensor, freezing a zero-initialised weight forever.

Why three functions and not one: every line is elementwise except the trust ratio, which needs ||w||
and ||u|| over the *whole* tensor. The optimiser may split a large tensor into pieces for the threads
(``Backend.pieces``), so the update is written in three parts:

    1. per piece   :func:`lamb_direction`   the lines from g to u (m and v updated in place); with the
                   piece's sums of squares of w and u (:func:`~ref_bert.optim.norms.sum_of_squares`)
    2. per tensor  :func:`trust_ratio`      from the pieces' sums of squares, added
    3. per piece   :func:`lamb_apply`       the last line, w updated in place

:func:`lamb_update` runs the three on one whole tensor, the formula above in one call; it is what
``Lamb.step`` does to a tensor that is one piece. The variants are chosen by
:func:`step_constants` (bias correction) and :func:`decay_terms` (where the decay goes). A backend
may replace :func:`lamb_direction` and :func:`lamb_apply` by fused kernels (``backends.fast_path``;
on CuPy, backends/cupy_optim_fast.py); the code here is the reference.

Arrays stay on their backend; per-step values that depend on array values (the clip factor, the
norms, the ratio) are 0-d arrays, never read on the host. Host numbers (t, lr, the bias corrections)
are Python floats. Every array keeps its dtype.
"""
from __future__ import annotations

import math

import backends

from .norms import sum_of_squares

__all__ = ["BIAS_CORRECTION", "WEIGHT_DECAY_MODES", "step_constants", "decay_terms", "lamb_direction",
           "trust_ratio", "lamb_apply", "lamb_update"]

BIAS_CORRECTION = ("moments", "none", "step_size")
WEIGHT_DECAY_MODES = ("inside_ratio", "outside_ratio", "l2")


def step_constants(lr: float, t: int, b1: float, b2: float, bias_correction: str):
    """The host numbers of step t: ``(bias1, bias2, step_size)``.

    bias1 = 1 - b1^t and bias2 = 1 - b2^t with bias_correction="moments", else None (u uses m and v
    as they are); step_size = lr * s_t, which is lr except with "step_size"."""
    bias1, bias2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    step_size = lr * math.sqrt(bias2) / bias1 if bias_correction == "step_size" else lr
    if bias_correction != "moments":
        bias1 = bias2 = None
    return bias1, bias2, step_size


def decay_terms(wd: float, weight_decay_mode: str):
    """Where the tensor's decay rate ``wd`` enters: ``(wd_l2, wd_inside, wd_outside)``, the one that
    ``weight_decay_mode`` names equal to wd, the other two 0."""
    return (wd if weight_decay_mode == "l2" else 0.0,
            wd if weight_decay_mode == "inside_ratio" else 0.0,
            wd if weight_decay_mode == "outside_ratio" else 0.0)


def lamb_direction(w, g, m, v, *, clip, b1, b2, eps, bias1, bias2, wd_l2, wd_inside):
    """Part 1, elementwise: the formula's lines from g to u, for a tensor or a piece of it.

    Updates m and v in place; returns u (a new array). g is not modified. ``clip``: the 0-d clip
    factor c, or None without clipping; ``bias1``/``bias2``: from :func:`step_constants`;
    ``wd_l2``/``wd_inside``: from :func:`decay_terms`."""
    xp = backends.of(w).xp
    if clip is not None:
        g = g * clip                                            # g <- g * c
    if wd_l2:
        g = g + wd_l2 * w                                       # g <- g + wd * w          ("l2")
    m *= b1
    m += (1.0 - b1) * g                                         # m <- b1 m + (1 - b1) g
    v *= b2
    v += (1.0 - b2) * (g * g)                                   # v <- b2 v + (1 - b2) g^2
    if bias1 is not None:
        u = (m / bias1) / (xp.sqrt(v / bias2) + eps)            # u = m_hat / (sqrt(v_hat) + eps)
    else:
        u = m / (xp.sqrt(v) + eps)                              # u = m / (sqrt(v) + eps)
    if wd_inside:
        u += wd_inside * w                                      # u <- u + wd * w    ("inside_ratio")
    return u
lamb_direction = backends.fast_path(lamb_direction)   # a backend may run its fast variant instead


def trust_ratio(w_sq, u_sq, *, weight_norm_clamp=None, zero_norm_ratio: float = 1.0):
    """Part 2, per tensor: phi(||w||) / ||u||, or ``zero_norm_ratio`` when either is 0; a 0-d array.

    ``w_sq``, ``u_sq``: the whole tensor's sums of squares of w and u (0-d arrays).
    ``weight_norm_clamp``: None or (lo, hi). Written with ``where`` so that nothing is read on the host;
    the division uses a denominator of 1 where ||u|| = 0, so that no 0/0 is ever evaluated."""
    xp = backends.of(w_sq).xp
    w_norm, u_norm = xp.sqrt(w_sq), xp.sqrt(u_sq)
    if weight_norm_clamp is not None:
        lo, hi = weight_norm_clamp
        w_norm = xp.clip(w_norm, lo, hi)                        # phi(||w||)
    both_positive = (w_norm > 0) & (u_norm > 0)
    safe_u_norm = xp.where(u_norm > 0, u_norm, 1.0)
    return xp.where(both_positive, w_norm / safe_u_norm, zero_norm_ratio)


def lamb_apply(w, u, *, scale, decay_outside):
    """Part 3, elementwise, in place: w <- w - scale * u - decay_outside * w, for a tensor or a piece.

    ``scale`` = lr * s_t * ratio (``step_size * ratio``; the ratio is the *whole* tensor's);
    ``decay_outside`` = lr * wd with weight_decay_mode="outside_ratio", else 0."""
    delta = scale * u
    if decay_outside:
        delta += decay_outside * w
    w -= delta
lamb_apply = backends.fast_path(lamb_apply)   # a backend may run its fast variant instead


def lamb_update(w, g, m, v, *, lr: float, t: int, betas=(0.9, 0.999), eps: float = 1e-6, wd: float = 0.0,
                bias_correction: str = "moments", weight_decay_mode: str = "inside_ratio",
                weight_norm_clamp=None, zero_norm_ratio: float = 1.0, adapt: bool = True, clip=None):
    """One LAMB step of one whole tensor, in place (w, m and v): the module docstring's formula.

    ``t``: the step counter (1 on the first step); ``adapt``: False for a tensor excluded from layer
    adaptation (ratio 1); ``clip``: the 0-d global clip factor, or None. Arguments are not validated
    (``Lamb`` does that). Returns the trust ratio (1.0 without adaptation)."""
    b1, b2 = betas
    bias1, bias2, step_size = step_constants(lr, t, b1, b2, bias_correction)
    wd_l2, wd_inside, wd_outside = decay_terms(wd, weight_decay_mode)
    u = lamb_direction(w, g, m, v, clip=clip, b1=b1, b2=b2, eps=eps, bias1=bias1, bias2=bias2,
                       wd_l2=wd_l2, wd_inside=wd_inside)
    if adapt:
        ratio = trust_ratio(sum_of_squares(w), sum_of_squares(u), weight_norm_clamp=weight_norm_clamp,
                            zero_norm_ratio=zero_norm_ratio)
    else:
        ratio = 1.0
    lamb_apply(w, u, scale=step_size * ratio, decay_outside=lr * wd_outside)
    return ratio
