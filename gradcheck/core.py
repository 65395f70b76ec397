"""Finite-difference gradient checking, usable on anyone's functions.

The numerical derivative (default ``order=6``) is the Richardson extrapolation of the fourth-order
central difference (five-point stencil)

    f'(x) ~ [ -f(x + 2h) + 8 f(x + h) - 8 f(x - h) + f(x - 2h) ] / (12 h)        error O(h^4)

at h and h/2, which cancels the h^4 term (error O(h^6), six evaluations); ``order=4`` is the plain
stencil and ``order=2`` the classic [f(x + h) - f(x - h)] / (2h) with error O(h^2). In float64 with
h = 1e-4 the fourth-order stencil's truncation error (~h^4 f^(5) / 30 ~ 1e-17 f^(5)) is far below its
round-off error (~eps |f| / h ~ 1e-12 |f|); but on a network with large weights the fifth derivative
is large too, and h = 1e-3 with the plain stencil measured 5e-4 relative error on a correct gradient
of 24. Richardson at h = 1e-3 brought that case to 2e-6 and keeps round-off near 1e-11.

Two kinds of check (docs/reference.md §8):

* element-wise: perturb one entry at a time (every entry of a small tensor, a sample of a large one,
  half of the sample drawn among entries whose analytic gradient is non-zero so that sparse gradients
  such as embedding tables are really exercised);
* directional (dot-product): for a random unit direction u, compare <grad, u> with the derivative of
  t -> f(x + t u). One check covers every entry of any size of tensor at once.

Errors are relative with a floor: |a - n| / max(floor, |a| + |n|). The floor (default 1e-4) makes
entries whose true gradient is ~0 count in absolute terms: the default tolerance 1e-6 at the floor is
1e-10 absolute, ten times the measured round-off of a difference quotient on these functions (a
gradient that is exactly zero, such as the key bias's -- softmax ignores a per-row constant --,
shows ~6e-12). For comparison, torch.autograd.gradcheck passes at atol 1e-5 + rtol 1e-3.

Arrays may be NumPy or CuPy; they are perturbed in place and restored exactly (the original values
are saved and written back, never "subtract h again").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

import backends

DEFAULT_RTOL = 1e-6
DEFAULT_FLOOR = 1e-4


@dataclass
class Result:
    """The outcome for one input tensor."""

    name: str
    shape: tuple
    checked: int            # element-wise entries checked
    directions: int         # random directions checked
    max_rel_error: float
    max_abs_error: float
    worst: str              # where the largest relative error occurred
    rtol: float

    @property
    def passed(self) -> bool:
        return bool(self.max_rel_error <= self.rtol)


@dataclass
class Report:
    """All results of one check; ``bool(report)`` is True when everything passed."""

    results: list = field(default_factory=list)
    title: str = ""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_rel_error(self) -> float:
        return max((r.max_rel_error for r in self.results), default=0.0)

    def table(self) -> str:
        rows = [("tensor", "shape", "entries", "dirs", "max rel err", "max abs err", "result")]
        for r in self.results:
            rows.append((r.name, "x".join(map(str, r.shape)) or "scalar", str(r.checked), str(r.directions),
                         f"{r.max_rel_error:.2e}", f"{r.max_abs_error:.2e}", "ok" if r.passed else "FAIL"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.title:
            lines.insert(0, self.title)
        return "\n".join(lines)

    def assert_ok(self) -> "Report":
        if not self.passed:
            bad = [f"{r.name} (max rel err {r.max_rel_error:.3e} > {r.rtol:g} at {r.worst})"
                   for r in self.results if not r.passed]
            raise AssertionError("gradient check failed for " + "; ".join(bad) + "\n" + self.table())
        return self


def relative_error(analytic: float, numeric: float, floor: float = DEFAULT_FLOOR) -> float:
    """|a - n| / max(floor, |a| + |n|)."""
    return abs(analytic - numeric) / max(floor, abs(analytic) + abs(numeric))


def _stencil(g: Callable[[float], float], h: float, order: int) -> float:
    """Derivative at t = 0 of the scalar function g(t)."""
    if order == 2:
        return (g(h) - g(-h)) / (2 * h)
    if order == 4:
        return (-g(2 * h) + 8 * g(h) - 8 * g(-h) + g(-2 * h)) / (12 * h)
    if order == 6:
        # Richardson extrapolation of the five-point stencil: D(h) = f' + c h^4 + O(h^6), so
        # (16 D(h/2) - D(h)) / 15 cancels the h^4 term. Six evaluations (+-h/2, +-h, +-2h).
        values = {t: g(t) for t in (-2 * h, -h, -h / 2, h / 2, h, 2 * h)}
        d_h = (-values[2 * h] + 8 * values[h] - 8 * values[-h] + values[-2 * h]) / (12 * h)
        d_half = (-values[h] + 8 * values[h / 2] - 8 * values[-h / 2] + values[-h]) / (6 * h)
        return (16 * d_half - d_h) / 15
    raise ValueError(f"order must be 2, 4 or 6, got {order!r}")


def check_inplace(f: Callable[[], float], arrays: Mapping[str, object], grads: Mapping[str, object], *,
                  rtol: float = DEFAULT_RTOL, floor: float = DEFAULT_FLOOR, h: float | None = None,
                  order: int = 6, max_elements: int = 16, samples: int = 8, directions: int = 2,
                  seed: int = 0, title: str = "") -> Report:
    """Check ``grads[name]`` = d f / d ``arrays[name]`` for every name in ``arrays``.

    ``f()`` takes no arguments and reads the arrays, which are perturbed *in place* (and restored).
    Tensors with at most ``max_elements`` entries are checked entry by entry; larger ones on
    ``samples`` entries plus ``directions`` random unit directions. Use float64 arrays: in float32 the
    round-off error of a finite difference (~1e-7 |f| / h) swamps any useful tolerance.
    """
    if h is None:
        h = 1e-6 if order == 2 else 1e-3
    rng = np.random.default_rng(seed)
    report = Report(title=title)
    for name, x in arrays.items():
        if name not in grads:
            raise ValueError(f"no analytic gradient given for {name!r}")
        bk = backends.of(x)
        if x.dtype != np.float64:
            raise ValueError(f"{name} has dtype {x.dtype}; gradient checks need float64 arrays")
        grad = bk.to_host(grads[name]).astype(np.float64)
        if grad.shape != tuple(x.shape):
            raise ValueError(f"gradient for {name} has shape {grad.shape}, expected {tuple(x.shape)}")
        worst_rel, worst_abs, worst_at = 0.0, 0.0, "-"

        def record(analytic, numeric, where):
            nonlocal worst_rel, worst_abs, worst_at
            rel = relative_error(analytic, numeric, floor)
            worst_abs = max(worst_abs, abs(analytic - numeric))
            if rel > worst_rel or worst_at == "-":
                worst_rel, worst_at = max(rel, worst_rel), f"{where}: analytic {analytic:.6e}, numeric {numeric:.6e}"

        # element-wise
        n = x.size
        if n <= max_elements:
            flat_indices = np.arange(n)
        else:
            nonzero = np.flatnonzero(grad.reshape(-1))
            k_nz = min(len(nonzero), samples // 2)
            chosen = list(rng.choice(nonzero, size=k_nz, replace=False)) if k_nz else []
            chosen += list(rng.choice(n, size=samples - k_nz, replace=False))
            flat_indices = np.unique(np.asarray(chosen, dtype=np.int64))
        for flat in flat_indices:
            idx = np.unravel_index(int(flat), x.shape)
            original = x[idx].copy()

            def g(t, idx=idx, original=original):
                x[idx] = original + t
                return float(f())

            numeric = _stencil(g, h, order)
            x[idx] = original
            record(float(grad[idx]), numeric, f"index {tuple(int(i) for i in idx)}")
        # directional
        n_dirs = directions if n > max_elements else 0
        for d in range(n_dirs):
            u = rng.standard_normal(x.shape)
            u /= np.linalg.norm(u)
            u_dev = bk.from_host(u)
            original = x.copy()

            def g(t, u_dev=u_dev, original=original):
                x[...] = original + t * u_dev
                return float(f())

            numeric = _stencil(g, h, order)
            x[...] = original
            record(float(np.sum(grad * u)), numeric, f"direction {d}")
        report.results.append(Result(name, tuple(x.shape), len(flat_indices), n_dirs, worst_rel, worst_abs,
                                     worst_at, rtol))
    return report


def _named(inputs) -> dict:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return {f"input{i}": x for i, x in enumerate(inputs)}


def check(f: Callable, inputs, grads, *, wrt: Sequence[str] | None = None, **options) -> Report:
    """Check the analytic gradients ``grads`` of a scalar function ``f`` at ``inputs``.

    ``inputs``: a list/tuple (``f(*inputs)``) or a dict (``f(**inputs)``) of float64 arrays;
    ``grads``: the same structure with d f / d input (entries may be None for inputs not to check).
    The inputs are copied first, so the caller's arrays are never touched. ``options`` are those of
    :func:`check_inplace`.

        >>> import numpy as np, gradcheck
        >>> x = np.random.default_rng(0).standard_normal((3, 4))
        >>> gradcheck.check(lambda x: np.sin(x).sum(), [x], [np.cos(x)]).passed
        True
    """
    as_dict = isinstance(inputs, Mapping)
    names = _named(inputs)
    copies = {k: v.copy() for k, v in names.items()}
    grad_map = _named(grads)
    if set(grad_map) != set(copies):
        raise ValueError(f"grads must match inputs: got {sorted(grad_map)}, expected {sorted(copies)}")
    selected = [k for k in copies if grad_map[k] is not None and (wrt is None or k in wrt)]

    def f0():
        return f(**copies) if as_dict else f(*copies.values())

    return check_inplace(f0, {k: copies[k] for k in selected}, {k: grad_map[k] for k in selected}, **options)


def check_vjp(forward: Callable, backward: Callable, inputs, *, seed: int = 0, **options) -> Report:
    """Check a forward/backward pair the way jax's check_vjp and chainer's check_backward do.

    ``out = forward(*inputs)`` (or ``**inputs``); a random upstream gradient ``dout`` (standard normal,
    never all ones, so sign and index errors cannot cancel) is drawn; ``backward(dout)`` must return
    the input gradients in the structure of ``inputs`` (None for inputs that are not differentiable).
    The checked scalar is L(inputs) = sum(dout * forward(inputs)).
    """
    as_dict = isinstance(inputs, Mapping)
    names = _named(inputs)
    out = forward(**names) if as_dict else forward(*names.values())
    bk = backends.of(out)
    dout = bk.from_host(np.random.default_rng(seed + 1).standard_normal(np.shape(out)), dtype=np.float64)
    grads = backward(dout)
    if not as_dict:
        grads = list(grads) if isinstance(grads, (list, tuple)) else [grads]
        if len(grads) != len(names):
            raise ValueError(f"backward returned {len(grads)} gradients for {len(names)} inputs")

    def scalar(*args, **kwargs):
        return (forward(*args, **kwargs) * dout).sum()

    return check(scalar, inputs, grads, seed=seed, **options)
