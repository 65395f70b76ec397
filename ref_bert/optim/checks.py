"""Argument checks shared by the optimisers and the schedules: each returns the checked value or
raises ValueError saying what was expected."""
from __future__ import annotations

import math
import numbers
import re


def check_positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")
    return float(value)


def check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, numbers.Real) or isinstance(b, bool) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    return float(betas[0]), float(betas[1])


def check_patterns(arg: str, patterns) -> tuple[str, ...]:
    """A tuple of regex patterns. A bare string is refused: iterating it would give one pattern per
    character ("bias" -> "b", "i", "a", "s", which match almost every name), the classic pitfall."""
    if isinstance(patterns, (str, bytes)):
        raise ValueError(f"{arg} must be a list or tuple of regex patterns, got the string {patterns!r}; "
                         f"write [{patterns!r}] for one pattern")
    if patterns is None:
        return ()
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise ValueError(f"{arg} must be a list or tuple of regex patterns, got {patterns!r}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{arg} must hold regex strings, got {p!r} ({type(p).__name__})")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{arg}: {p!r} is not a valid regular expression ({e})") from None
    return patterns


def check_clamp(clamp):
    """LAMB's weight_norm_clamp: None, an upper bound hi (lower bound 0), or a pair (lo, hi) with
    0 <= lo <= hi; returned as None or (lo, hi)."""
    if clamp is None:
        return None
    if isinstance(clamp, numbers.Real) and not isinstance(clamp, bool):
        return (0.0, check_positive("weight_norm_clamp", clamp))
    if isinstance(clamp, (tuple, list)) and len(clamp) == 2:
        lo = check_positive("weight_norm_clamp[0]", clamp[0], allow_zero=True)
        hi = check_positive("weight_norm_clamp[1]", clamp[1])
        if lo <= hi:
            return (lo, hi)
    raise ValueError(f"weight_norm_clamp must be None, an upper bound > 0, or a pair (lo, hi) with "
                     f"0 <= lo <= hi, got {clamp!r}")

