"""Input checks. Every error is a ``ValueError`` naming the argument, what it was and what was expected.

Checking ids on the device costs a reduction and one small device->host read (the min and max);
that is the price of CuPy wrapping out-of-range indices silently instead of failing.
"""
from __future__ import annotations

import numpy as np

from .ops import IGNORE_INDEX
from .tasks import sequence_problem_type


def _describe(a) -> str:
    return f"{type(a).__module__.split('.')[0]}.{type(a).__name__}"


def require_array(name: str, a, backend):
    if isinstance(a, np.ma.MaskedArray):   # its mask would be silently ignored
        raise ValueError(f"{name} is a numpy masked array, whose mask ref-bert would ignore; expected a plain "
                         f"array (fill the masked entries first, e.g. a.filled(0), and pass attention_mask)")
    if not backend.is_array(a):
        hint = ""
        if isinstance(a, np.ndarray):    # a NumPy array the backend does not take: the model lives elsewhere
            hint = f"; move it explicitly with backend.from_host(...) (the model lives on {backend.name})"
        raise ValueError(f"{name} must be a {backend.name} array, got {_describe(a)}{hint}")
    return a


def require_int(name: str, a, shape=None):
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def require_range(name: str, a, low: int, high: int, allow=None):
    """All values in [low, high), except the optional ``allow`` value (e.g. the ignore label)."""
    if a.size == 0:
        return a
    values = a if allow is None else a[a != allow]
    if values.size == 0:
        return a
    lo, hi = int(values.min()), int(values.max())
    if lo < low or hi >= high:
        extra = f" (or {allow})" if allow is not None else ""
        bad = lo if lo < low else hi
        raise ValueError(f"{name} contains {bad}, outside the valid range [{low}, {high}){extra}")
    return a


def check_inputs(config, backend, input_ids, token_type_ids=None, attention_mask=None, position_ids=None):
    """Validate the model inputs and fill in the defaults. Returns the four arrays."""
    xp = backend.xp
    require_array("input_ids", input_ids, backend)
    require_int("input_ids", input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"input_ids must be non-empty, got shape {(B, T)}")
    if T > config.max_position_embeddings:
        raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    require_range("input_ids", input_ids, 0, config.vocab_size)

    if token_type_ids is None:
        token_type_ids = xp.zeros((B, T), dtype=input_ids.dtype)
    require_array("token_type_ids", token_type_ids, backend)
    require_int("token_type_ids", token_type_ids, (B, T))
    require_range("token_type_ids", token_type_ids, 0, config.type_vocab_size)

    if position_ids is None:
        position_ids = xp.broadcast_to(xp.arange(T, dtype=input_ids.dtype), (B, T))
    require_array("position_ids", position_ids, backend)
    require_int("position_ids", position_ids, (B, T))
    require_range("position_ids", position_ids, 0, config.max_position_embeddings)

    if attention_mask is None:
        attention_mask = xp.ones((B, T), dtype=input_ids.dtype)
    require_array("attention_mask", attention_mask, backend)
    if tuple(attention_mask.shape) not in ((B, T), (B, T, T)):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)} "
                         f"(padding mask) or {(B, T, T)} (per-query mask)")
    if attention_mask.dtype.kind not in "biuf":
        raise ValueError(f"attention_mask must be boolean or numeric 0/1, got dtype {attention_mask.dtype}")
    if attention_mask.dtype.kind != "b" and attention_mask.size:
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must contain only 0 and 1 (1 = may attend)")
    return input_ids, token_type_ids, attention_mask, position_ids


def check_labels(config, backend, batch_shape, mlm_labels=None, sop_labels=None):
    B, T = batch_shape
    if mlm_labels is None and sop_labels is None:
        raise ValueError("loss_and_grads needs mlm_labels, sop_labels or both (got neither)")
    if mlm_labels is not None:
        require_array("mlm_labels", mlm_labels, backend)
        require_int("mlm_labels", mlm_labels, (B, T))
        require_range("mlm_labels", mlm_labels, 0, config.vocab_size, allow=IGNORE_INDEX)
    if sop_labels is not None:
        require_array("sop_labels", sop_labels, backend)
        require_int("sop_labels", sop_labels, (B,))
        require_range("sop_labels", sop_labels, 0, 2, allow=IGNORE_INDEX)


def flatten_choices(config, input_ids, token_type_ids=None, attention_mask=None, position_ids=None):
    """Multiple choice: (B, C, T) inputs -> (B * C, T) rows, as transformers' *ForMultipleChoice views
    them; returns the four arrays and C (None for every other head, whose inputs pass unchanged)."""
    if config.head != "multiple_choice":
        return input_ids, token_type_ids, attention_mask, position_ids, None
    if getattr(input_ids, "ndim", None) != 3:
        raise ValueError(f"input_ids of a multiple-choice model must be 3-D (batch, num_choices, seq_len), got "
                         f"shape {tuple(getattr(input_ids, 'shape', ()))}")
    B, C, T = input_ids.shape
    flat = []
    for name, a in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask),
                    ("position_ids", position_ids)):
        if a is not None and tuple(getattr(a, "shape", ())) != (B, C, T):
            raise ValueError(f"{name} has shape {tuple(getattr(a, 'shape', ()))}, expected {(B, C, T)} "
                             f"(batch, num_choices, seq_len) like input_ids")
        flat.append(None if a is None else a.reshape(B * C, T))
    return (input_ids.reshape(B * C, T), *flat, C)


def check_task_labels(config, backend, batch_shape, labels=None, start_positions=None, end_positions=None):
    """The labels of a fine-tuning head (Config.head), as transformers takes them. ``batch_shape`` is
    (B, T), or (B, C) for multiple choice. Returns (labels, start_positions, end_positions), with
    sequence-classification float targets in the model's dtype left to the loss."""
    head, B, L = config.head, batch_shape[0], config.num_labels
    if head == "question_answering":
        if labels is not None:
            raise ValueError("question answering takes start_positions and end_positions, not labels")
        if start_positions is None or end_positions is None:
            raise ValueError("question answering needs both start_positions and end_positions (B,), got "
                             f"start_positions={'given' if start_positions is not None else None}, "
                             f"end_positions={'given' if end_positions is not None else None}")
        for name, a in (("start_positions", start_positions), ("end_positions", end_positions)):
            require_array(name, a, backend)
            require_int(name, a)
            if tuple(a.shape) not in ((B,), (B, 1)):
                raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {(B,)}")
        return None, start_positions, end_positions
    if start_positions is not None or end_positions is not None:
        raise ValueError(f"start_positions / end_positions are for question answering; the {config.architecture} "
                         f"head takes labels")
    if labels is None:
        raise ValueError(f"the {config.architecture} head needs labels")
    require_array("labels", labels, backend)
    if head in ("masked_lm", "causal_lm", "token_classification"):
        T = batch_shape[1]
        require_int("labels", labels, (B, T))
        high = config.vocab_size if head != "token_classification" else L
        require_range("labels", labels, 0, high, allow=IGNORE_INDEX)
    elif head in ("next_sentence", "multiple_choice"):
        require_int("labels", labels, (B,))
        require_range("labels", labels, 0, 2 if head == "next_sentence" else batch_shape[1], allow=IGNORE_INDEX)
    else:   # sequence classification: the problem type decides what labels are
        problem = sequence_problem_type(config.problem_type, L, labels)
        if problem == "single_label_classification":
            require_int("labels", labels)
            if tuple(labels.shape) not in ((B,), (B, 1)):
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {(B,)} class ids "
                                 f"(single_label_classification)")
            require_range("labels", labels, 0, L, allow=IGNORE_INDEX)
        else:
            expected = ((B,), (B, 1)) if (problem == "regression" and L == 1) else ((B, L),)
            if tuple(labels.shape) not in expected:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {expected[0]} ({problem} with "
                                 f"num_labels={L})")
            if labels.dtype.kind not in "fiub":
                raise ValueError(f"labels must be numeric for {problem}, got dtype {labels.dtype}")
            if labels.size and not bool(backend.xp.isfinite(labels.astype(float)).all()):
                raise ValueError(f"labels contain a non-finite value ({problem} needs finite targets)")
    return labels, None, None


# --- settings -------------------------------------------------------------------------------------
def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A finite Python or NumPy real number, not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and bool(np.isfinite(value)))


def check_dtype(name: str, dtype, allowed) -> np.dtype:
    """``dtype`` (a name or a NumPy dtype) as a NumPy dtype, one of ``allowed``; else a ValueError."""
    try:
        resolved = np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or str(resolved) not in allowed or isinstance(dtype, bool):
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {dtype!r}")
    return resolved


def check_seed(name: str, seed, allow_sequence: bool = False):
    """A non-negative integer seed (or, with ``allow_sequence``, a non-empty list/tuple of them, as
    ``numpy.random.default_rng`` takes); else a ValueError."""
    if is_int(seed) and seed >= 0:
        return seed
    if allow_sequence and isinstance(seed, (list, tuple)) and seed and all(is_int(s) and s >= 0 for s in seed):
        return seed
    expected = "a non-negative integer" + (" or a non-empty sequence of them" if allow_sequence else "")
    raise ValueError(f"{name}={seed!r:.80} is invalid: expected {expected}")


def check_loss_weights(weights) -> tuple[float, float]:
    """``loss_weights=(w_mlm, w_sop)``: two finite real numbers; else a ValueError."""
    if not isinstance(weights, (tuple, list)) or len(weights) != 2 or not all(is_real(w) for w in weights):
        raise ValueError(f"loss_weights={weights!r:.80} is invalid: expected a pair (w_mlm, w_sop) of finite numbers")
    return float(weights[0]), float(weights[1])


def check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r:.40} is invalid: expected True or False")
    return bool(value)


def require(condition: bool, name: str, value, expected: str) -> None:
    """ValueError ``name=value is invalid: expected ...`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")
