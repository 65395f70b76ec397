"""The two learning-rate schedules BERT-family pretraining uses: plain functions of the step returning
Python floats; pass their value as ``opt.step(grads, lr=schedule(step, ...))``."""
from __future__ import annotations

import numbers

from .checks import check_positive

__all__ = ["albert_schedule", "linear_warmup_decay"]


def _check_schedule(step, init_lr, num_train_steps, num_warmup_steps):
    for arg, value in (("step", step), ("num_train_steps", num_train_steps), ("num_warmup_steps", num_warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{arg} must be an integer >= 0, got {value!r}")
    if num_train_steps == 0:
        raise ValueError(f"num_train_steps must be > 0, got {num_train_steps!r}")
    check_positive("init_lr", init_lr)


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
    power = check_positive("power", power)
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
