"""Optimisers and learning-rate schedules: LAMB with every published variant as an explicit switch,
AdamW beside it, and the two schedules BERT-family pretraining uses.

LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes") is Adam
with one extra idea: every parameter tensor's step is rescaled by a *trust ratio* ||w|| / ||u||, so a
tensor moves by about ``lr * ||w||`` per step whatever the size of its gradient. The implementations
people compare against disagree on five details (shared/REFERENCE.md section 4); here each one is a
named constructor argument, and :meth:`Lamb.from_preset` sets them the way one implementation does:

    preset            bias correction  decay        phi (clamp)  excluded from ratio        grad clipping
    "albert"          none             in ratio     none         LayerNorm, bias (= decay)  global 1.0
    "tfa"             moments          in ratio     none         decay list (default none)  none
    "nvlamb"          moments          in ratio     none         none                       global 1.0
    "apex"            moments          in ratio     none         tensors with wd 0          global 1.0
    "torch_optimizer" none (or lr)     in ratio     ||w|| <= 10  none                       none
    "optax"           moments          in ratio     none         none (mask: decay only)    none

Every variant uses the same zero-norm rule: when ||w|| or ||u|| is 0 the trust ratio is 1 (a naive
``||w|| / ||u||`` would be 0 for an all-zero tensor, freezing a zero-initialised weight forever).

Arrays stay on their backend. The optimiser gets the array module from the parameters
(``backends.of(array).xp``); per-step quantities that depend on array values (norms, trust ratios,
the clip factor) are 0-d arrays of that module and are never read on the host, so a step on CuPy
queues kernels and returns without synchronising. Host-side numbers (the step counter, bias
corrections, the learning rate) are plain Python values. Every state tensor has its parameter's
dtype: float32 stays float32.

Schedules are plain functions of the step returning Python floats; pass their value as
``opt.step(grads, lr=schedule(step, ...))``.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
import re
from typing import Any, Mapping, NamedTuple

import numpy as np

import backends

__all__ = ["Lamb", "AdamW", "LAMB_PRESETS", "ADAMW_PRESETS", "global_grad_norm", "clip_factor",
           "albert_schedule", "linear_warmup_decay"]

ALBERT_EXCLUDE = ("LayerNorm", "layer_norm", "bias")
BIAS_CORRECTION = ("moments", "none", "step_size")
WEIGHT_DECAY_MODES = ("inside_ratio", "outside_ratio", "l2")


# --- presets ---------------------------------------------------------------------------------------
# Each preset is the source's own defaults (its constructor defaults, or the values its pretraining
# script passes); anything can be overridden: Lamb.from_preset("albert", params, lr=1e-3).
LAMB_PRESETS: dict[str, dict[str, Any]] = {
    # google-research/albert lamb_optimizer.py + optimization.py (create_optimizer, optimizer="lamb"):
    # no bias correction; clip_by_global_norm(1.0) before the optimiser; the decay exclusion list also
    # excludes from adaptation (exclude_from_layer_adaptation=None falls back to it). lr: the paper's
    # recipe (batch 4096).
    "albert": dict(lr=0.00176, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction="none",
                   exclude_from_weight_decay=ALBERT_EXCLUDE, exclude_from_layer_adaptation=None,
                   max_grad_norm=1.0),
    # tensorflow_addons.optimizers.LAMB: Adam bias correction with one global step count; constructor
    # defaults (weight_decay 0, no exclusions, adaptation exclusions fall back to the decay list).
    "tfa": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction="moments",
                exclude_from_weight_decay=(), exclude_from_layer_adaptation=None, max_grad_norm=None),
    # NVIDIA DeepLearningExamples BERT (TensorFlow) LAMBOptimizer as created by create_optimizer:
    # bias-corrected, decay excluded for LayerNorm/bias but the trust ratio applied to every tensor,
    # clip_by_global_norm(1.0). (The script has no default lr; 1e-3 is a placeholder.)
    "nvlamb": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction="moments",
                   exclude_from_weight_decay=ALBERT_EXCLUDE, exclude_from_layer_adaptation=(),
                   max_grad_norm=1.0),
    # NVIDIA apex FusedLAMB (adam_w_mode=True, grad_averaging=True, use_nvlamb=False): global-norm
    # clipping inside the optimiser; a tensor whose weight decay is 0 gets no trust ratio unless
    # use_nvlamb (here: adapt_only_decayed=False). apex excludes by parameter group; the exclusion
    # list stands in for the no-decay group NVIDIA's PyTorch BERT script builds.
    "apex": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction="moments",
                 exclude_from_weight_decay=ALBERT_EXCLUDE, exclude_from_layer_adaptation=(),
                 adapt_only_decayed=True, max_grad_norm=1.0),
    # jettify torch_optimizer.Lamb (0.3): ||w|| clamped to [0, 10]; debias=False by default ("none");
    # debias=True is bias_correction="step_size" (it rescales lr, not m and v). Decay on every tensor.
    "torch_optimizer": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction="none",
                            weight_norm_clamp=10.0, exclude_from_weight_decay=(),
                            exclude_from_layer_adaptation=(), max_grad_norm=None),
    # optax.lamb = scale_by_adam -> add_decayed_weights(mask) -> scale_by_trust_ratio -> scale by -lr.
    # Its mask selects decay only; the trust ratio is applied to every tensor.
    "optax": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction="moments",
                  exclude_from_weight_decay=(), exclude_from_layer_adaptation=(), max_grad_norm=None),
}

ADAMW_PRESETS: dict[str, dict[str, Any]] = {
    # torch.optim.AdamW defaults.
    "torch": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, bias_correction=True,
                  exclude_from_weight_decay=(), max_grad_norm=None),
    # google-research/bert and albert AdamWeightDecayOptimizer (optimization.py): no bias correction,
    # decay excluded for LayerNorm/bias, clip_by_global_norm(1.0).
    "bert": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=False,
                 exclude_from_weight_decay=ALBERT_EXCLUDE, max_grad_norm=1.0),
}


# --- shared pieces -----------------------------------------------------------------------------------
def _sum_of_squares(x, xp):
    """sum(x^2) as a 0-d array of ``xp`` (never ``numpy.linalg.norm``, which returns a host float).
    On CuPy one fused reduction (``backend.fused``), without the x^2 temporary."""
    fused = backends.of(x).fused
    if fused is not None:
        return fused.sum_of_squares(x)
    return xp.sum(x * x)


# On NumPy the optimisers work on each tensor in pieces of this many elements (512 KiB of float32),
# spread over the backend's threads (Backend.parallel_map). A piece's temporaries stay in cache, and
# a large tensor's update no longer runs on one core: LAMB over bert-base's 110M parameters took
# 1.1 s a step whole, 0.63 s in pieces on one core, 0.45 s on two (docs/performance.md). The piece
# size is fixed, not derived from the thread count, so the numbers (the order of every sum) are the
# same whatever the thread count.
PIECE_ELEMENTS = 1 << 17


def _pieces(backend, *arrays) -> list[tuple]:
    """Split same-shaped arrays into matching pieces: a list of tuples of views, one tuple per piece.

    One piece (the arrays themselves) on CuPy, for small tensors, or when any array is not
    C-contiguous (a flattened view would be a copy, and in-place updates would be lost); otherwise
    consecutive runs of PIECE_ELEMENTS elements of the flattened arrays. Every update in the
    optimisers is elementwise, and norms are sums of the pieces' sums of squares."""
    size = arrays[0].size
    if (backend.name != "numpy" or size <= PIECE_ELEMENTS
            or not all(a.flags.c_contiguous for a in arrays)):
        return [arrays]
    flat = [a.reshape(-1) for a in arrays]
    return [tuple(f[start:start + PIECE_ELEMENTS] for f in flat) for start in range(0, size, PIECE_ELEMENTS)]


def global_grad_norm(grads, xp=None):
    """||G|| = sqrt(sum over tensors of sum(g^2)), a 0-d array on the gradients' backend.

    ``grads``: an iterable of arrays (e.g. ``grads.values()``). Not read on the host. On NumPy the
    sums of squares are taken per piece (see :data:`PIECE_ELEMENTS`) on the backend's threads and
    added in a fixed order.
    """
    grads = list(grads)
    if not grads:
        raise ValueError("global_grad_norm needs at least one gradient, got none")
    backend = backends.of(grads[0])
    if xp is None:
        xp = backend.xp
    pieces = [piece for g in grads for (piece,) in _pieces(backend, g)]
    return xp.sqrt(_total(backend.parallel_map(lambda g: _sum_of_squares(g, xp), pieces)))


def _total(values):
    """values[0] + values[1] + ..., in order (unlike ``sum``, no ``0 +`` first: one kernel fewer on CuPy)."""
    return functools.reduce(operator.add, values)


class _Direction(NamedTuple):
    """What Lamb.step computes for one piece before the trust ratio: u, and the piece's sums of
    squares of w and u (None for tensors excluded from layer adaptation)."""
    u: Any
    w_sq: Any
    u_sq: Any


def clip_factor(norm, max_norm: float, xp):
    """TensorFlow's ``clip_by_global_norm`` factor: max_norm / max(norm, max_norm), a 0-d array.

    1 when ``norm <= max_norm`` (the gradients are left alone), ``max_norm / norm`` above it.
    A NaN or inf norm gives NaN / 0, as in TensorFlow (the step then poisons the weights visibly).
    apex computes ``g / (norm / max_norm)``: the same number up to one rounding.
    """
    return max_norm / xp.maximum(norm, max_norm)


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")
    return float(value)


def _check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, numbers.Real) or isinstance(b, bool) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    return float(betas[0]), float(betas[1])


def _check_patterns(arg: str, patterns) -> tuple[str, ...]:
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


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True when any pattern is found anywhere in the name (``re.search``, as TF's optimisers do)."""
    return any(re.search(p, name) is not None for p in patterns)


def _jsonable(value):
    """Tuples -> lists, recursively, so hyperparameters compare equal after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class _AdamFamily:
    """What Lamb and AdamW share: parameters, moments m and v, one step counter, validation, state."""

    def __init__(self, params, lr, betas, eps, weight_decay, exclude_from_weight_decay, max_grad_norm):
        if not hasattr(params, "items"):
            raise ValueError(f"params must be a dict name -> array, got {type(params).__name__}")
        self.params = dict(params.items())
        if not self.params:
            raise ValueError("params is empty; expected at least one name -> array")
        first = next(iter(self.params.values()))
        self.backend = backends.of(first)
        self.xp = self.backend.xp
        for name, p in self.params.items():
            if not isinstance(name, str):
                raise ValueError(f"parameter names must be strings, got {name!r}")
            if backends.of(p).name != self.backend.name:
                raise ValueError(f"parameter {name!r} lives on {backends.of(p).name}, expected "
                                 f"{self.backend.name} like the first parameter")
            if not hasattr(p, "shape") or np.dtype(p.dtype).kind != "f":
                raise ValueError(f"parameter {name!r} must be a floating-point array, got "
                                 f"{getattr(p, 'dtype', type(p).__name__)}")
        self.lr = _check_positive("lr", lr)
        self.betas = _check_betas(betas)
        self.eps = _check_positive("eps", eps, allow_zero=True)
        self.weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)
        self.exclude_from_weight_decay = _check_patterns("exclude_from_weight_decay", exclude_from_weight_decay)
        self.max_grad_norm = None if max_grad_norm is None else _check_positive("max_grad_norm", max_grad_norm)
        # The decay rate each tensor actually gets: 0 for names matching an exclusion pattern.
        self.tensor_weight_decay = {
            name: 0.0 if _matches(name, self.exclude_from_weight_decay) else self.weight_decay
            for name in self.params}
        xp = self.xp
        self.exp_avg = {name: xp.zeros_like(p) for name, p in self.params.items()}      # m, like w
        self.exp_avg_sq = {name: xp.zeros_like(p) for name, p in self.params.items()}   # v, like w
        # One step counter for the whole optimiser (t = 1 on the first update). Per-tensor counters
        # are a known pitfall: a tensor whose counter started late gets the wrong bias correction.
        self.step_count = 0

    # --- per-step checks and the shared first half of the update --------------------------------
    def _check_grads(self, grads) -> None:
        if not hasattr(grads, "items"):
            raise ValueError(f"grads must be a dict name -> array, got {type(grads).__name__}")
        missing = [n for n in self.params if n not in grads]
        unexpected = [n for n in grads if n not in self.params]
        if missing or unexpected:
            raise ValueError(f"grads must have exactly the parameter names; missing {missing}, "
                             f"unexpected {unexpected}")
        for name, p in self.params.items():
            g = grads[name]
            if tuple(getattr(g, "shape", ())) != tuple(p.shape) or not hasattr(g, "dtype"):
                raise ValueError(f"grads[{name!r}] has shape {tuple(getattr(g, 'shape', ()))}, "
                                 f"expected {tuple(p.shape)}")
            if np.dtype(g.dtype) != np.dtype(p.dtype):
                raise ValueError(f"grads[{name!r}] has dtype {np.dtype(g.dtype)}, expected {np.dtype(p.dtype)} "
                                 f"(the parameter's; no silent casting)")
            if backends.of(g).name != self.backend.name:
                raise ValueError(f"grads[{name!r}] lives on {backends.of(g).name}, expected {self.backend.name}")

    def _begin_step(self, grads, lr):
        """Validate, advance the global step, and return (lr, t, clip) with ``clip`` the 0-d clip
        factor on the backend (or None without clipping)."""
        lr = self.lr if lr is None else _check_positive("lr", lr, allow_zero=True)  # schedules reach 0
        self._check_grads(grads)
        clip = None
        if self.max_grad_norm is not None:
            # Global clipping, as tf.clip_by_global_norm(grads, max_grad_norm) before the optimiser:
            # one norm over every tensor, one factor for all. Stays a 0-d device array.
            norm = global_grad_norm((grads[n] for n in self.params), self.xp)
            clip = clip_factor(norm, self.max_grad_norm, self.xp)
        self.step_count += 1
        return lr, self.step_count, clip

    def _update_moments(self, m, v, g):
        """In place: m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2 (a tensor or a piece of it)."""
        b1, b2 = self.betas
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        return m, v

    # --- checkpointing ------------------------------------------------------------------------
    def _hyper(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``{"step": int, "tensors": {"exp_avg/<name>": m, "exp_avg_sq/<name>": v}, "hyper": {...}}``.

        The tensors are the optimiser's live backend arrays (not copies): move them to the host
        (``backend.to_host``) before stepping again if the state is to be kept. ``hyper`` holds
        only JSON-friendly values (floats, strings, bools, lists, None).
        """
        tensors = {}
        for name in self.params:
            tensors[f"exp_avg/{name}"] = self.exp_avg[name]
            tensors[f"exp_avg_sq/{name}"] = self.exp_avg_sq[name]
        return {"step": self.step_count, "tensors": tensors, "hyper": self._hyper()}

    def load_state_dict(self, state: Mapping, check_hyper: bool = True) -> None:
        """Restore the step counter and the moments from :meth:`state_dict` output (host NumPy arrays
        are copied onto this backend). Everything is checked before anything is written: tensor names,
        shapes and dtypes must match this optimiser's, and with ``check_hyper`` every hyperparameter
        except ``lr`` (which a schedule overrides anyway) must equal this optimiser's. Raises
        ValueError naming each mismatch."""
        if not isinstance(state, Mapping) or "step" not in state or "tensors" not in state:
            raise ValueError("state must be a dict with keys 'step', 'tensors' (and 'hyper'), got "
                             f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state['step'] must be an integer >= 0, got {step!r}")
        ours = self.state_dict()
        tensors = state["tensors"]
        missing = [k for k in ours["tensors"] if k not in tensors]
        unexpected = [k for k in tensors if k not in ours["tensors"]]
        problems = []
        if missing:
            problems.append(f"missing tensors {missing}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected}")
        for key, dst in ours["tensors"].items():
            if key not in tensors:
                continue
            src = tensors[key]
            if not hasattr(src, "shape") or not hasattr(src, "dtype"):
                problems.append(f"{key} is a {type(src).__name__}, expected an array")
            elif tuple(src.shape) != tuple(dst.shape):
                problems.append(f"{key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            elif np.dtype(src.dtype) != np.dtype(dst.dtype):
                problems.append(f"{key} has dtype {np.dtype(src.dtype)}, expected {np.dtype(dst.dtype)}")
        if check_hyper and "hyper" in state:
            theirs, mine = _jsonable(dict(state["hyper"])), _jsonable(ours["hyper"])
            for k in sorted(set(theirs) | set(mine)):
                if k != "lr" and theirs.get(k, "<absent>") != mine.get(k, "<absent>"):
                    problems.append(f"hyper[{k!r}] is {theirs.get(k, '<absent>')!r}, expected "
                                    f"{mine.get(k, '<absent>')!r}")
        if problems:
            raise ValueError("optimiser state does not match: " + "; ".join(problems))
        for key, dst in ours["tensors"].items():
            dst[...] = self.xp.asarray(tensors[key])
        self.step_count = int(step)


class Lamb(_AdamFamily):
    r"""LAMB with every published variant as an explicit switch (see :data:`LAMB_PRESETS`).

    One step, with t the optimiser's single step counter (1 on the first step), for every parameter
    tensor w with gradient g; ``wd`` is the tensor's own decay rate (0 when its name matches
    ``exclude_from_weight_decay``; see ``tensor_weight_decay``):

        g  <- g * c / max(||G||, c)                with c = max_grad_norm, ||G|| over *all* tensors
        g  <- g + wd * w                           only weight_decay_mode="l2"
        m  <- b1 m + (1 - b1) g
        v  <- b2 v + (1 - b2) g^2
        r   = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   bias_correction="moments" (True)
        r   = m / (sqrt(v) + eps)                               "none" (False) and "step_size"
        u   = r + wd * w                           weight_decay_mode="inside_ratio" (the default)
        u   = r                                    "outside_ratio" and "l2"
        ratio = phi(||w||) / ||u||                 if phi(||w||) > 0 and ||u|| > 0
              = zero_norm_ratio                    otherwise (1: every published implementation)
              = 1                                  tensors excluded from layer adaptation
        phi(x) = min(max(x, lo), hi)               weight_norm_clamp=(lo, hi) or hi; identity if None
        w  <- w - lr * s_t * ratio * u  [- lr * wd * w   only "outside_ratio"]
        s_t = sqrt(1 - b2^t) / (1 - b1^t)          bias_correction="step_size" (torch_optimizer's
                                                   debias=True); 1 otherwise

    Norms are per tensor (Frobenius for matrices). Args:
        params: dict name -> array (e.g. ``model.named_parameters()``); updated in place.
        lr: default learning rate (> 0); ``step(grads, lr=...)`` overrides it per step.
        betas, eps, weight_decay: as above.
        bias_correction: "moments"/True, "none"/False, or "step_size".
        weight_decay_mode: "inside_ratio" (decay joins u before the trust ratio; all presets),
            "outside_ratio" (decoupled, outside the ratio), "l2" (added to g before the moments; apex
            FusedLAMB with adam_w_mode=False).
        weight_norm_clamp: None, an upper bound hi (lower bound 0), or a pair (lo, hi).
        zero_norm_ratio: the trust ratio used when phi(||w||) or ||u|| is 0.
        exclude_from_weight_decay: regex patterns searched in the name; matches get wd = 0.
        exclude_from_layer_adaptation: regex patterns; matches get ratio 1. None means "the same
            list as exclude_from_weight_decay" (ALBERT's and tfa's convention); () adapts everything.
            (In ALBERT/tfa an *empty* list also falls back to the decay list; here () means none.)
        adapt_only_decayed: tensors whose wd is 0 also get ratio 1 (apex FusedLAMB without
            use_nvlamb; with weight_decay=0 that makes the whole optimiser plain Adam).
        max_grad_norm: None (no clipping) or the global-norm clipping threshold.

    Lists given as a bare string are refused with ValueError (they would be iterated per character).
    After a step, ``trust_ratios[name]`` holds each tensor's ratio (a 0-d backend array, or 1.0).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction="moments", weight_decay_mode: str = "inside_ratio",
                 weight_norm_clamp=None, zero_norm_ratio: float = 1.0, exclude_from_weight_decay=(),
                 exclude_from_layer_adaptation=None, adapt_only_decayed: bool = False, max_grad_norm=None):
        super().__init__(params, lr, betas, eps, weight_decay, exclude_from_weight_decay, max_grad_norm)
        if bias_correction is True:
            bias_correction = "moments"
        elif bias_correction is False:
            bias_correction = "none"
        if bias_correction not in BIAS_CORRECTION:
            raise ValueError(f"bias_correction must be True, False or one of {BIAS_CORRECTION}, "
                             f"got {bias_correction!r}")
        self.bias_correction = bias_correction
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        self.weight_decay_mode = weight_decay_mode
        self.weight_norm_clamp = self._check_clamp(weight_norm_clamp)
        self.zero_norm_ratio = _check_positive("zero_norm_ratio", zero_norm_ratio, allow_zero=True)
        if exclude_from_layer_adaptation is None:
            self.exclude_from_layer_adaptation = self.exclude_from_weight_decay
        else:
            self.exclude_from_layer_adaptation = _check_patterns("exclude_from_layer_adaptation",
                                                                 exclude_from_layer_adaptation)
        if not isinstance(adapt_only_decayed, bool):
            raise ValueError(f"adapt_only_decayed must be True or False, got {adapt_only_decayed!r}")
        self.adapt_only_decayed = adapt_only_decayed
        # Whether each tensor gets the trust ratio, decided once from its name (and its decay rate).
        self.layer_adaptation = {
            name: not _matches(name, self.exclude_from_layer_adaptation)
            and not (adapt_only_decayed and self.tensor_weight_decay[name] == 0.0)
            for name in self.params}
        self.trust_ratios: dict[str, Any] = {}

    @staticmethod
    def _check_clamp(clamp):
        if clamp is None:
            return None
        if isinstance(clamp, numbers.Real) and not isinstance(clamp, bool):
            return (0.0, _check_positive("weight_norm_clamp", clamp))
        if isinstance(clamp, (tuple, list)) and len(clamp) == 2:
            lo = _check_positive("weight_norm_clamp[0]", clamp[0], allow_zero=True)
            hi = _check_positive("weight_norm_clamp[1]", clamp[1])
            if lo <= hi:
                return (lo, hi)
        raise ValueError(f"weight_norm_clamp must be None, an upper bound > 0, or a pair (lo, hi) with "
                         f"0 <= lo <= hi, got {clamp!r}")

    @classmethod
    def from_preset(cls, name: str, params, **overrides) -> "Lamb":
        """A Lamb configured like one published implementation (:data:`LAMB_PRESETS`), with any
        constructor argument overridden, e.g. ``Lamb.from_preset("torch_optimizer", p, weight_decay=0.01,
        bias_correction="step_size")`` for torch_optimizer's ``debias=True``."""
        if name not in LAMB_PRESETS:
            raise ValueError(f"unknown LAMB preset {name!r}; expected one of {sorted(LAMB_PRESETS)}")
        return cls(params, **_merge_overrides(cls, LAMB_PRESETS[name], overrides))

    def _hyper(self) -> dict:
        return _jsonable(dict(
            optimizer="Lamb", lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
            bias_correction=self.bias_correction, weight_decay_mode=self.weight_decay_mode,
            weight_norm_clamp=self.weight_norm_clamp, zero_norm_ratio=self.zero_norm_ratio,
            exclude_from_weight_decay=self.exclude_from_weight_decay,
            exclude_from_layer_adaptation=self.exclude_from_layer_adaptation,
            adapt_only_decayed=self.adapt_only_decayed, max_grad_norm=self.max_grad_norm))

    def _trust_ratio(self, w_sq, u_sq):
        """phi(||w||) / ||u|| from the tensor's sums of squares, or zero_norm_ratio when either norm
        is 0; a 0-d backend array.

        Written with ``where`` so that nothing is read on the host; the division uses a denominator
        of 1 where ||u|| = 0 so that no 0/0 is ever evaluated.
        """
        xp = self.xp
        w_norm, u_norm = xp.sqrt(w_sq), xp.sqrt(u_sq)
        if self.weight_norm_clamp is not None:
            lo, hi = self.weight_norm_clamp
            w_norm = xp.clip(w_norm, lo, hi)
        both_positive = (w_norm > 0) & (u_norm > 0)
        safe_u_norm = xp.where(u_norm > 0, u_norm, 1.0)
        return xp.where(both_positive, w_norm / safe_u_norm, self.zero_norm_ratio)

    def _direction(self, g, w, m, v, wd, clip, bias1, bias2):
        """The docstring's lines up to u, for one tensor or one piece of it (all elementwise):
        clipping, L2 decay, the moments (m and v in place) and u. Returns u, a new array."""
        xp = self.xp
        fused = self.backend.fused
        if fused is not None:
            # CuPy: clipping, L2 decay, both moments and u (with decay inside the ratio) in one
            # kernel; the same arithmetic as the lines below (backends/cupy_kernels.py).
            moments = self.bias_correction == "moments"
            return fused.lamb_direction(
                g, w, m, v, xp.asarray(1.0 if clip is None else clip, dtype=w.dtype), *self.betas,
                bias1 if moments else 1.0, bias2 if moments else 1.0, self.eps,
                wd if self.weight_decay_mode == "l2" else 0.0,
                wd if self.weight_decay_mode == "inside_ratio" else 0.0)
        if clip is not None:
            g = g * clip
        if self.weight_decay_mode == "l2" and wd:
            g = g + wd * w
        m, v = self._update_moments(m, v, g)
        if self.bias_correction == "moments":
            u = (m / bias1) / (xp.sqrt(v / bias2) + self.eps)
        else:
            u = m / (xp.sqrt(v) + self.eps)
        if self.weight_decay_mode == "inside_ratio" and wd:
            u += wd * w
        return u

    def step(self, grads: Mapping, lr: float | None = None) -> None:
        """One LAMB update of every parameter, in place. ``grads``: name -> array with exactly the
        parameters' names, shapes and dtypes (not modified). ``lr``: this step's learning rate.

        Per tensor: u piece by piece (:func:`_pieces`; one piece on CuPy and for small tensors),
        the tensor's two norms from the pieces' sums of squares, its trust ratio, then the update
        piece by piece."""
        lr, t, clip = self._begin_step(grads, lr)
        b1, b2 = self.betas
        bias1, bias2 = 1.0 - b1 ** t, 1.0 - b2 ** t          # host floats: t is a host integer
        step_size = lr * math.sqrt(bias2) / bias1 if self.bias_correction == "step_size" else lr
        backend = self.backend
        for name, w in self.params.items():
            wd = self.tensor_weight_decay[name]
            adapt = self.layer_adaptation[name]
            pieces = _pieces(backend, grads[name], w, self.exp_avg[name], self.exp_avg_sq[name])
            directions = backend.parallel_map(
                functools.partial(self._piece_direction, wd=wd, adapt=adapt, clip=clip, bias1=bias1, bias2=bias2),
                pieces)
            if adapt:
                ratio = self._trust_ratio(_total([d.w_sq for d in directions]), _total([d.u_sq for d in directions]))
            else:
                ratio = 1.0
            self.trust_ratios[name] = ratio
            decay_outside = lr * wd if self.weight_decay_mode == "outside_ratio" else 0.0
            backend.parallel_map(
                functools.partial(self._piece_apply, scale=step_size * ratio, decay_outside=decay_outside),
                [(piece[1], d.u) for piece, d in zip(pieces, directions)])

    def _piece_direction(self, piece, wd, adapt, clip, bias1, bias2) -> _Direction:
        """u for one piece ``(g, w, m, v)`` (updating its m and v), with its sums of squares."""
        g, w, m, v = piece
        u = self._direction(g, w, m, v, wd, clip, bias1, bias2)
        if not adapt:
            return _Direction(u, None, None)
        return _Direction(u, _sum_of_squares(w, self.xp), _sum_of_squares(u, self.xp))

    def _piece_apply(self, w_and_u, scale, decay_outside) -> None:
        """In place, for one piece: w <- w - scale * u [- decay_outside * w]; ``scale`` is
        lr x step factor x the whole tensor's trust ratio."""
        w, u = w_and_u
        fused = self.backend.fused
        if fused is not None:   # CuPy: one kernel
            fused.lamb_apply(w, u, self.xp.asarray(scale, dtype=w.dtype), decay_outside)
            return
        delta = scale * u
        if decay_outside:
            delta += decay_outside * w
        w -= delta


class AdamW(_AdamFamily):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), for comparison with LAMB.

    One step, t the single global step counter, ``wd`` the tensor's decay rate (0 when excluded):

        g  <- g * c / max(||G||, c)                        with c = max_grad_norm (optional)
        m  <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        r   = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     bias_correction=True
            = m / (sqrt(v) + eps)                                 False (BERT's AdamWeightDecayOptimizer)
        w  <- w - lr * (r + wd * w)

    ``torch.optim.AdamW`` writes the same update as ``w <- w (1 - lr wd) - lr r``. Presets
    (:data:`ADAMW_PRESETS`): "torch" (its defaults) and "bert" (google-research/bert and albert
    ``optimization.py``). Arguments as :class:`Lamb`.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, bias_correction: bool = True, exclude_from_weight_decay=(),
                 max_grad_norm=None):
        super().__init__(params, lr, betas, eps, weight_decay, exclude_from_weight_decay, max_grad_norm)
        if not isinstance(bias_correction, bool):
            raise ValueError(f"bias_correction must be True or False, got {bias_correction!r}")
        self.bias_correction = bias_correction

    @classmethod
    def from_preset(cls, name: str, params, **overrides) -> "AdamW":
        """An AdamW configured like ``torch.optim.AdamW`` ("torch") or BERT's TF optimiser ("bert")."""
        if name not in ADAMW_PRESETS:
            raise ValueError(f"unknown AdamW preset {name!r}; expected one of {sorted(ADAMW_PRESETS)}")
        return cls(params, **_merge_overrides(cls, ADAMW_PRESETS[name], overrides))

    def _hyper(self) -> dict:
        return _jsonable(dict(
            optimizer="AdamW", lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
            bias_correction=self.bias_correction, exclude_from_weight_decay=self.exclude_from_weight_decay,
            max_grad_norm=self.max_grad_norm))

    def step(self, grads: Mapping, lr: float | None = None) -> None:
        """One AdamW update of every parameter, in place (``grads`` as :meth:`Lamb.step`)."""
        lr, t, clip = self._begin_step(grads, lr)
        b1, b2 = self.betas
        bias1, bias2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        for name, w in self.params.items():
            pieces = _pieces(self.backend, grads[name], w, self.exp_avg[name], self.exp_avg_sq[name])
            self.backend.parallel_map(
                functools.partial(self._piece_update, wd=self.tensor_weight_decay[name], lr=lr, clip=clip,
                                  bias1=bias1, bias2=bias2),
                pieces)

    def _piece_update(self, piece, wd, lr, clip, bias1, bias2) -> None:
        """The whole AdamW update, in place, for one piece ``(g, w, m, v)`` (every line is elementwise)."""
        g, w, m, v = piece
        xp = self.xp
        if clip is not None:
            g = g * clip
        m, v = self._update_moments(m, v, g)
        if self.bias_correction:
            update = (m / bias1) / (xp.sqrt(v / bias2) + self.eps)
        else:
            update = m / (xp.sqrt(v) + self.eps)
        if wd:
            update += wd * w
        w -= lr * update


def _merge_overrides(cls, preset: dict, overrides: dict) -> dict:
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; expected some of {allowed}")
    return {**preset, **overrides}


# --- learning-rate schedules ---------------------------------------------------------------------------
def _check_schedule(step, init_lr, num_train_steps, num_warmup_steps):
    for arg, value in (("step", step), ("num_train_steps", num_train_steps), ("num_warmup_steps", num_warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{arg} must be an integer >= 0, got {value!r}")
    if num_train_steps == 0:
        raise ValueError(f"num_train_steps must be > 0, got {num_train_steps!r}")
    _check_positive("init_lr", init_lr)


def albert_schedule(step: int, init_lr: float, num_train_steps: int, num_warmup_steps: int = 0,
                    power: float = 1.0) -> float:
    """ALBERT's (and BERT's) TF schedule, google-research/albert optimization.py::

        decayed = init_lr * (1 - min(step, T) / T) ** power      (tf.train.polynomial_decay, end 0)
        lr      = init_lr * step / warmup   if step < warmup      (warmup *replaces* the decay)
                = decayed                   otherwise

    The decay counts from step 0, not from the end of warmup, so at ``step == warmup`` the rate
    drops from ``init_lr * (warmup - 1) / warmup`` to ``init_lr * (1 - warmup / T) ** power``.
    Step 0 with warmup gives lr 0. Returns a Python float.
    """
    _check_schedule(step, init_lr, num_train_steps, num_warmup_steps)
    power = _check_positive("power", power)
    if num_warmup_steps and step < num_warmup_steps:
        return init_lr * step / num_warmup_steps
    return init_lr * (1.0 - min(step, num_train_steps) / num_train_steps) ** power


def linear_warmup_decay(step: int, init_lr: float, num_train_steps: int, num_warmup_steps: int) -> float:
    """Hugging Face's ``get_linear_schedule_with_warmup``, times ``init_lr``::

        lr = init_lr * step / max(1, warmup)                         if step < warmup
           = init_lr * max(0, (T - step) / max(1, T - warmup))       otherwise

    Linear from 0 up to ``init_lr`` at ``step == warmup``, then linear down to 0 at ``step == T``
    (decaying from the end of warmup, unlike :func:`albert_schedule`). Returns a Python float.
    """
    _check_schedule(step, init_lr, num_train_steps, num_warmup_steps)
    if num_warmup_steps > num_train_steps:
        raise ValueError(f"num_warmup_steps must be <= num_train_steps ({num_train_steps}), got {num_warmup_steps}")
    if step < num_warmup_steps:
        return init_lr * step / max(1, num_warmup_steps)
    return init_lr * max(0.0, (num_train_steps - step) / max(1, num_train_steps - num_warmup_steps))
