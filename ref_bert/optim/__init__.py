"""Optimisers and learning-rate schedules: LAMB with every published variant as an explicit switch,
AdamW beside it, and the two schedules BERT-family pretraining uses.

Read in this order:

* ``lamb.py``       LAMB's formula in its docstring, and the pure per-tensor functions that compute it
                    (:func:`~ref_bert.optim.lamb.lamb_update`, and its three parts: direction, trust
                    ratio, apply).
* ``adamw.py``      AdamW's formula and :func:`~ref_bert.optim.adamw.adamw_update`.
* ``presets.py``    how each published implementation sets the variants (:data:`LAMB_PRESETS`,
                    :data:`ADAMW_PRESETS`), with its source.
* ``norms.py``      sums of squares, the global gradient norm, the clip factor.
* ``schedules.py``  :func:`albert_schedule`, :func:`linear_warmup_decay`.
* ``optimizers.py`` the bookkeeping: :class:`Lamb` and :class:`AdamW` (validation, which tensors get
                    decay and the ratio, moments and step counter, pieces over the backend's threads,
                    ``state_dict``).

:func:`make_optimizer` builds one by name (:data:`OPTIMIZERS`), as ``ref-bert pretrain --optimizer``.
"""
from __future__ import annotations

from .lamb import BIAS_CORRECTION, WEIGHT_DECAY_MODES
from .norms import clip_factor, global_grad_norm
from .optimizers import AdamW, Lamb
from .presets import ADAMW_PRESETS, ALBERT_EXCLUDE, LAMB_PRESETS
from .schedules import albert_schedule, linear_warmup_decay

__all__ = ["Lamb", "AdamW", "LAMB_PRESETS", "ADAMW_PRESETS", "global_grad_norm", "clip_factor",
           "albert_schedule", "linear_warmup_decay", "make_optimizer", "OPTIMIZERS"]

# "lamb" is ALBERT's LAMB; the other LAMB names are the presets; "adamw" is torch.optim.AdamW's
# defaults and "adamw-<preset>" an AdamW preset ("adamw-bert": BERT's AdamWeightDecayOptimizer).
OPTIMIZERS = ("lamb",) + tuple(LAMB_PRESETS) + ("adamw",) + tuple(f"adamw-{k}" for k in ADAMW_PRESETS)


def make_optimizer(name: str, params, lr: float | None = None):
    """The optimiser called ``name`` (one of :data:`OPTIMIZERS`) over ``params`` with base rate ``lr``
    (None: the preset's own rate). ``make_optimizer("lamb", params)`` is ALBERT's LAMB as the golden
    files use it."""
    overrides = {} if lr is None else {"lr": lr}
    if name == "lamb":
        return Lamb.from_preset("albert", params, **overrides)
    if name in LAMB_PRESETS:
        return Lamb.from_preset(name, params, **overrides)
    if name == "adamw":
        return AdamW.from_preset("torch", params, **overrides)
    if name.startswith("adamw-") and name[len("adamw-"):] in ADAMW_PRESETS:
        return AdamW.from_preset(name[len("adamw-"):], params, **overrides)
    raise ValueError(f"optimizer={name!r} is invalid: expected one of {OPTIMIZERS}")
