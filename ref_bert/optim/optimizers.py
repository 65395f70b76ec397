"""The optimiser classes: the bookkeeping around the per-tensor formulas of ref_bert/optim/lamb.py and
ref_bert/optim/adamw.py.

What lives here and not there: checking the constructor's and each step's arguments; which tensors
get weight decay and the trust ratio (from their names); the moments m and v and the single step
counter; global-norm clipping (one factor for all tensors); splitting each tensor into pieces for the
backend's threads (``Backend.pieces`` and ``Backend.parallel_map``); and ``state_dict`` /
``load_state_dict``. Every state tensor has its parameter's dtype, on its parameter's backend.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import re
from typing import Any, Mapping, NamedTuple

import numpy as np

import backends

from . import lamb
from .adamw import adamw_update
from .checks import check_betas, check_clamp, check_patterns, check_positive
from .lamb import BIAS_CORRECTION, WEIGHT_DECAY_MODES
from .norms import clip_factor, global_grad_norm, sum_of_squares, total
from .presets import ADAMW_PRESETS, LAMB_PRESETS

__all__ = ["Lamb", "AdamW"]


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
            if backends.of(p) is not self.backend:
                raise ValueError(f"parameter {name!r} lives on {backends.of(p)!r}, expected "
                                 f"{self.backend!r} like the first parameter")
            if not hasattr(p, "shape") or np.dtype(p.dtype).kind != "f":
                raise ValueError(f"parameter {name!r} must be a floating-point array, got "
                                 f"{getattr(p, 'dtype', type(p).__name__)}")
        self.lr = check_positive("lr", lr)
        self.betas = check_betas(betas)
        self.eps = check_positive("eps", eps, allow_zero=True)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.exclude_from_weight_decay = check_patterns("exclude_from_weight_decay", exclude_from_weight_decay)
        self.max_grad_norm = None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
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
            if backends.of(g) is not self.backend:
                raise ValueError(f"grads[{name!r}] lives on {backends.of(g)!r}, expected {self.backend!r}")

    def _begin_step(self, grads, lr, grad_norm=None):
        """Validate, advance the global step, and return (lr, t, clip) with ``clip`` the 0-d clip
        factor on the backend (or None without clipping). ``grad_norm``: the global norm when
        ``grads`` are one shard of a larger model's (sharded optimiser state, which holds only its
        shard's tensors); None computes it from ``grads``."""
        lr = self.lr if lr is None else check_positive("lr", lr, allow_zero=True)  # schedules reach 0
        self._check_grads(grads)
        clip = None
        if self.max_grad_norm is not None:
            # Global clipping, as tf.clip_by_global_norm(grads, max_grad_norm) before the optimiser:
            # one norm over every tensor, one factor for all. Stays a 0-d device array.
            norm = global_grad_norm((grads[n] for n in self.params), self.xp) if grad_norm is None else grad_norm
            clip = clip_factor(norm, self.max_grad_norm, self.xp)
        self.step_count += 1
        return lr, self.step_count, clip

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
                if k != "lr" and (k not in theirs or k not in mine or theirs[k] != mine[k]):
                    problems.append(f"hyper[{k!r}] is {_shown(theirs, k)}, expected {_shown(mine, k)}")
        if problems:
            raise ValueError("optimiser state does not match: " + "; ".join(problems))
        for key, dst in ours["tensors"].items():
            dst[...] = self.xp.asarray(tensors[key])
        self.step_count = int(step)


def _shown(hyper: dict, key: str) -> str:
    """A hyperparameter as an error message shows it: its repr, or ``absent``."""
    return repr(hyper[key]) if key in hyper else "absent"


class _Direction(NamedTuple):
    """LAMB's part 1 for one piece: u, and the piece's sums of squares of w and u (None for tensors
    excluded from layer adaptation)."""
    u: Any
    w_sq: Any
    u_sq: Any


def _lamb_direction_piece(piece, *, adapt: bool, **hyper) -> _Direction:
    """:func:`~ref_bert.optim.lamb.lamb_direction` on one piece ``(w, g, m, v)``, with the sums of
    squares the tensor's trust ratio needs."""
    w, g, m, v = piece
    u = lamb.lamb_direction(w, g, m, v, **hyper)
    if not adapt:
        return _Direction(u, None, None)
    return _Direction(u, sum_of_squares(w), sum_of_squares(u))


def _lamb_apply_piece(w_and_u, **hyper) -> None:
    lamb.lamb_apply(*w_and_u, **hyper)


def _adamw_piece(piece, **hyper) -> None:
    adamw_update(*piece, **hyper)


class Lamb(_AdamFamily):
    r"""LAMB with every published variant as an explicit switch (presets: :data:`LAMB_PRESETS`).

    The update is the formula in ref_bert/optim/lamb.py's docstring, for every parameter tensor, with
    one step counter t for the whole optimiser and ``wd`` each tensor's own decay rate (0 when its name
    matches ``exclude_from_weight_decay``; see ``tensor_weight_decay``).

    Args:
        params: dict name -> array (e.g. ``model.state_dict()``); updated in place.
        lr: default learning rate (> 0); ``step(grads, lr=...)`` overrides it per step.
        betas, eps, weight_decay: as in the formula.
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
        self.weight_norm_clamp = check_clamp(weight_norm_clamp)
        self.zero_norm_ratio = check_positive("zero_norm_ratio", zero_norm_ratio, allow_zero=True)
        if exclude_from_layer_adaptation is None:
            self.exclude_from_layer_adaptation = self.exclude_from_weight_decay
        else:
            self.exclude_from_layer_adaptation = check_patterns("exclude_from_layer_adaptation",
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

    def step(self, grads: Mapping, lr: float | None = None, grad_norm=None) -> None:
        """One LAMB update of every parameter, in place. ``grads``: name -> array with exactly the
        parameters' names, shapes and dtypes (not modified). ``lr``: this step's learning rate.
        ``grad_norm``: the global gradient norm for clipping, when this optimiser holds one shard of
        the model's tensors (ZeRO stage 1, :mod:`ref_bert.pretrain.data_parallel`); None: from ``grads``.

        Each tensor goes through ref_bert/optim/lamb.py's three parts: the direction piece by piece
        (``Backend.pieces``: a tensor is one piece on CuPy and when small), one trust ratio from the
        pieces' sums of squares, then the update piece by piece. With one piece this is exactly
        :func:`~ref_bert.optim.lamb.lamb_update`."""
        lr, t, clip = self._begin_step(grads, lr, grad_norm)
        b1, b2 = self.betas
        bias1, bias2, step_size = lamb.step_constants(lr, t, b1, b2, self.bias_correction)
        backend = self.backend
        for name, w in self.params.items():
            wd_l2, wd_inside, wd_outside = lamb.decay_terms(self.tensor_weight_decay[name], self.weight_decay_mode)
            adapt = self.layer_adaptation[name]
            pieces = backend.pieces(w, grads[name], self.exp_avg[name], self.exp_avg_sq[name])
            # 1. per piece: u (m and v updated in place), and the sums of squares of w and u
            directions = backend.parallel_map(
                functools.partial(_lamb_direction_piece, adapt=adapt, clip=clip, b1=b1, b2=b2, eps=self.eps,
                                  bias1=bias1, bias2=bias2, wd_l2=wd_l2, wd_inside=wd_inside),
                pieces)
            # 2. per tensor: the trust ratio, from the pieces' sums added in order
            if adapt:
                ratio = lamb.trust_ratio(total([d.w_sq for d in directions]), total([d.u_sq for d in directions]),
                                         weight_norm_clamp=self.weight_norm_clamp,
                                         zero_norm_ratio=self.zero_norm_ratio)
            else:
                ratio = 1.0
            self.trust_ratios[name] = ratio
            # 3. per piece: w <- w - step_size * ratio * u [- lr * wd * w]
            backend.parallel_map(
                functools.partial(_lamb_apply_piece, scale=step_size * ratio, decay_outside=lr * wd_outside),
                [(piece[0], d.u) for piece, d in zip(pieces, directions)])


class AdamW(_AdamFamily):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), for comparison with LAMB.

    The update is the formula in ref_bert/optim/adamw.py's docstring. Presets (:data:`ADAMW_PRESETS`):
    "torch" (``torch.optim.AdamW``'s defaults) and "bert" (google-research/bert and albert
    ``optimization.py``). Arguments as :class:`Lamb`; ``bias_correction`` is True or False.
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

    def step(self, grads: Mapping, lr: float | None = None, grad_norm=None) -> None:
        """One AdamW update of every parameter, in place (``grads`` and ``grad_norm`` as
        :meth:`Lamb.step`): every tensor's pieces (``Backend.pieces``) through
        :func:`~ref_bert.optim.adamw.adamw_update`."""
        lr, t, clip = self._begin_step(grads, lr, grad_norm)
        for name, w in self.params.items():
            self.backend.parallel_map(
                functools.partial(_adamw_piece, lr=lr, t=t, betas=self.betas, eps=self.eps,
                                  wd=self.tensor_weight_decay[name], bias_correction=self.bias_correction,
                                  clip=clip),
                self.backend.pieces(w, grads[name], self.exp_avg[name], self.exp_avg_sq[name]))


def _merge_overrides(cls, preset: dict, overrides: dict) -> dict:
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; expected some of {allowed}")
    return {**preset, **overrides}
