"""Tests for ref_bert.optim: every LAMB preset against an independent implementation, AdamW against
torch.optim.AdamW, the schedules at chosen steps, the known pitfalls, and bad input.

Independent implementations:
* torch_optimizer.Lamb, optax.lamb and torch.optim.AdamW run here, in float64.
* google-research/albert, tensorflow-addons, NVIDIA NVLAMB (TF), apex FusedLAMB and BERT's
  AdamWeightDecayOptimizer have no runnable reference here (TF1 / CUDA-only). Each is transliterated
  below from its published source into a deliberately naive loop over Python floats (``math.sqrt``,
  no NumPy, no ref_bert.optim), keeping the source's own structure and order of operations.

Tolerance for every preset comparison: 1e-10 relative. Both sides compute the same formula in
float64 and differ only in the order of rounding (a few ulps, ~1e-16 per operation, grown by a few
orders of magnitude through the trust-ratio division over 12 steps). The error is measured on each
step's *update* (w_t - w_{t-1}), not on w_t, so that a wrong update cannot hide behind a large w.

All warnings are errors here: a 0/0 or an overflow inside the optimiser fails the test.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import backends
from ref_bert import optim
from ref_bert.optim import adamw, lamb
from ref_bert.optim import (ADAMW_PRESETS, LAMB_PRESETS, AdamW, Lamb, albert_schedule, clip_factor,
                            global_grad_norm, linear_warmup_decay)

pytestmark = pytest.mark.filterwarnings("error")

TOL = 1e-10
N_STEPS = 12
B1, B2 = 0.9, 0.999
NO_DECAY = ("LayerNorm", "layer_norm", "bias")

# Names shaped like the model's (ref_bert/params.py). Each tensor is there for a reason:
SHAPES = {
    "embeddings.word_embeddings": (13, 6),
    "embeddings.layer_norm.weight": (6,),
    "embeddings.layer_norm.bias": (6,),          # starts at zero; excluded from decay (and ratio in ALBERT)
    "encoder.attention.0.query.weight": (6, 6),
    "encoder.attention.0.query.bias": (6,),
    "pooler.weight": (24, 24),                   # ||w|| ~ 24 > 10: torch_optimizer's clamp is active
    "pooler.bias": (5,),                         # zero, and zero gradient every step: ||w|| = ||u|| = 0
    "sop.weight": (6, 2),                        # zero but adapted: the zero-norm rule (ratio 1, not 0)
}
INIT_STD = {"embeddings.word_embeddings": 0.5, "embeddings.layer_norm.weight": 0.1,
            "encoder.attention.0.query.weight": 0.3, "encoder.attention.0.query.bias": 0.1, "pooler.weight": 1.0}
# Gradient scales per step: the global norm (about 1.3 * scale) is below 1 on some steps and above on
# others, so global-norm clipping is exercised both inactive and active.
GRAD_SCALES = [0.4, 3.0, 1.0, 0.2, 5.0, 0.6, 2.0, 0.3, 1.5, 0.5, 4.0, 0.7]
# Learning rates per step from ALBERT's schedule (warmup 3 of 16): they change every step, so each
# implementation's per-step lr override is exercised too.
LRS = [albert_schedule(k + 1, 0.05, 16, num_warmup_steps=3) for k in range(N_STEPS)]


def make_params(dtype=np.float64, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in SHAPES.items():
        std = INIT_STD.get(name, 0.0)
        base = 1.0 if name.endswith("layer_norm.weight") else 0.0
        params[name] = (base + std * rng.standard_normal(shape)).astype(dtype)
    return params


def make_grads(dtype=np.float64, seed=1) -> list[dict]:
    rng = np.random.default_rng(seed)
    steps = []
    for scale in GRAD_SCALES[:N_STEPS]:
        g = {name: (0.05 * scale * rng.standard_normal(shape)).astype(dtype) for name, shape in SHAPES.items()}
        g["pooler.bias"][...] = 0.0
        steps.append(g)
    return steps


def run_ours(make_opt, dtype=np.float64) -> list[dict]:
    """Trajectory [w_0, w_1, ..., w_N] (flat float64 lists per name) of one of our optimisers."""
    params = make_params(dtype)
    opt = make_opt(params)
    traj = [{n: p.astype(np.float64).ravel().tolist() for n, p in params.items()}]
    for grads, lr in zip(make_grads(dtype), LRS):
        opt.step(grads, lr=lr)
        traj.append({n: p.astype(np.float64).ravel().tolist() for n, p in params.items()})
    return traj


def max_update_error(ours: list[dict], ref: list[dict]) -> float:
    """max over steps and tensors of max|du_ours - du_ref| / max|du_ref|, du = w_t - w_{t-1}.
    Where the reference does not move a tensor, ours must not move it either (error = |du_ours|/1e-300)."""
    assert len(ours) == len(ref) == N_STEPS + 1
    worst = 0.0
    for t in range(1, N_STEPS + 1):
        for name in SHAPES:
            du_o = np.subtract(ours[t][name], ours[t - 1][name])
            du_r = np.subtract(ref[t][name], ref[t - 1][name])
            scale = max(np.max(np.abs(du_r)), 1e-300)
            worst = max(worst, float(np.max(np.abs(du_o - du_r)) / scale))
    return worst


def moved(traj, name) -> bool:
    return traj[-1][name] != traj[0][name]


# =============================================================================================
# Naive per-element references, one per source. Python floats and loops only.
# =============================================================================================
def _flat_params():
    return {n: p.ravel().tolist() for n, p in make_params().items()}


def _flat_grads():
    return [{n: g.ravel().tolist() for n, g in step.items()} for step in make_grads()]


def _norm(xs):
    return math.sqrt(sum(x * x for x in xs))


def _tf_clip_by_global_norm(grads: dict, clip_norm: float) -> dict:
    """tf.clip_by_global_norm: scale = clip_norm * min(1 / global_norm, 1 / clip_norm)."""
    global_norm = math.sqrt(sum(x * x for g in grads.values() for x in g))
    scale = clip_norm * min(1.0 / global_norm, 1.0 / clip_norm)
    return {n: [x * scale for x in g] for n, g in grads.items()}


def _snapshot(params):
    return {n: list(p) for n, p in params.items()}


def reference_albert(weight_decay_rate=0.01, epsilon=1e-6, exclude_from_weight_decay=NO_DECAY):
    """google-research/albert: optimization.py create_optimizer(optimizer="lamb") + lamb_optimizer.py."""
    params = _flat_params()
    m = {n: [0.0] * len(p) for n, p in params.items()}
    v = {n: [0.0] * len(p) for n, p in params.items()}
    exclude_from_layer_adaptation = exclude_from_weight_decay  # "if exclude_from_layer_adaptation: ... else"

    def do_use_weight_decay(name):
        if not weight_decay_rate:
            return False
        return not any(re.search(r, name) is not None for r in exclude_from_weight_decay)

    def do_layer_adaptation(name):
        return not any(re.search(r, name) is not None for r in exclude_from_layer_adaptation)

    traj = [_snapshot(params)]
    for grads, learning_rate in zip(_flat_grads(), LRS):
        grads = _tf_clip_by_global_norm(grads, clip_norm=1.0)   # "This is how the model was pre-trained."
        for name, param in params.items():
            grad = grads[name]
            next_m = [B1 * m_i + (1.0 - B1) * g_i for m_i, g_i in zip(m[name], grad)]
            next_v = [B2 * v_i + (1.0 - B2) * g_i * g_i for v_i, g_i in zip(v[name], grad)]
            update = [m_i / (math.sqrt(v_i) + epsilon) for m_i, v_i in zip(next_m, next_v)]
            if do_use_weight_decay(name):
                update = [u_i + weight_decay_rate * p_i for u_i, p_i in zip(update, param)]
            ratio = 1.0
            if do_layer_adaptation(name):
                w_norm, g_norm = _norm(param), _norm(update)
                ratio = (w_norm / g_norm if g_norm > 0 else 1.0) if w_norm > 0 else 1.0
            params[name] = [p_i - ratio * learning_rate * u_i for p_i, u_i in zip(param, update)]
            m[name], v[name] = next_m, next_v
        traj.append(_snapshot(params))
    return traj


def reference_tfa(weight_decay=0.01, epsilon=1e-6, exclude_from_weight_decay=None,
                  exclude_from_layer_adaptation=None):
    """tensorflow_addons/optimizers/lamb.py (_resource_apply_dense); local_step = iterations + 1."""
    params = _flat_params()
    m = {n: [0.0] * len(p) for n, p in params.items()}
    v = {n: [0.0] * len(p) for n, p in params.items()}
    if not exclude_from_layer_adaptation:
        exclude_from_layer_adaptation = exclude_from_weight_decay

    def do_use_weight_decay(name):
        return not (exclude_from_weight_decay and any(re.search(r, name) for r in exclude_from_weight_decay))

    def do_layer_adaptation(name):
        return not (exclude_from_layer_adaptation and any(re.search(r, name) for r in exclude_from_layer_adaptation))

    traj = [_snapshot(params)]
    for iterations, (grads, lr_t) in enumerate(zip(_flat_grads(), LRS)):
        local_step = iterations + 1
        beta_1_power, beta_2_power = B1 ** local_step, B2 ** local_step
        for name, var in params.items():
            grad = grads[name]
            m[name] = [mi * B1 + gi * (1.0 - B1) for mi, gi in zip(m[name], grad)]
            v[name] = [vi * B2 + (gi * gi) * (1.0 - B2) for vi, gi in zip(v[name], grad)]
            m_t_hat = [mi / (1.0 - beta_1_power) for mi in m[name]]
            v_t_hat = [vi / (1.0 - beta_2_power) for vi in v[name]]
            update = [mh / (math.sqrt(vh) + epsilon) for mh, vh in zip(m_t_hat, v_t_hat)]
            if do_use_weight_decay(name):
                update = [u + weight_decay * x for u, x in zip(update, var)]
            ratio = 1.0
            if do_layer_adaptation(name):
                w_norm, g_norm = _norm(var), _norm(update)
                ratio = (w_norm / g_norm if g_norm > 0 else 1.0) if w_norm > 0 else 1.0
            params[name] = [x - ratio * lr_t * u for x, u in zip(var, update)]
        traj.append(_snapshot(params))
    return traj


def reference_nvlamb(weight_decay_rate=0.01, epsilon=1e-6, exclude_from_weight_decay=NO_DECAY):
    """NVIDIA DeepLearningExamples BERT (TF) optimization.py: LAMBOptimizer + clip_by_global_norm(1.0);
    global_step is incremented before apply_gradients, so steps = 1 on the first update."""
    params = _flat_params()
    m = {n: [0.0] * len(p) for n, p in params.items()}
    v = {n: [0.0] * len(p) for n, p in params.items()}

    def do_use_weight_decay(name):
        if not weight_decay_rate:
            return False
        return not any(re.search(r, name) is not None for r in exclude_from_weight_decay)

    traj = [_snapshot(params)]
    for global_step, (grads, learning_rate) in enumerate(zip(_flat_grads(), LRS), start=1):
        clipped = _tf_clip_by_global_norm(grads, clip_norm=1.0)
        steps = float(global_step)
        for name, param in params.items():
            grad = clipped[name]
            next_m = [B1 * mi + (1.0 - B1) * gi for mi, gi in zip(m[name], grad)]
            next_v = [B2 * vi + (1.0 - B2) * gi * gi for vi, gi in zip(v[name], grad)]
            beta1_correction = 1 - B1 ** steps
            beta2_correction = 1 - B2 ** steps
            next_m_unbiased = [mi / beta1_correction for mi in next_m]
            next_v_unbiased = [vi / beta2_correction for vi in next_v]
            update = [mu / (math.sqrt(vu) + epsilon) for mu, vu in zip(next_m_unbiased, next_v_unbiased)]
            if do_use_weight_decay(name):
                update = [u + weight_decay_rate * p for u, p in zip(update, param)]
            w_norm, g_norm = _norm(param), _norm(update)
            ratio = (w_norm / g_norm if g_norm > 0 else 1.0) if w_norm > 0 else 1.0
            params[name] = [p - ratio * learning_rate * u for p, u in zip(param, update)]
            m[name], v[name] = next_m, next_v
        traj.append(_snapshot(params))
    return traj


def reference_apex(adam_w_mode=True, use_nvlamb=False, weight_decay=0.01, eps=1e-6, max_grad_norm=1.0,
                   no_decay=NO_DECAY):
    """apex/optimizers/fused_lamb.py + csrc/multi_tensor_lamb.cu (stage 1 and stage 2), with two parameter
    groups built like NVIDIA's PyTorch BERT run_pretraining.py (substring test on the name)."""
    params = _flat_params()
    m = {n: [0.0] * len(p) for n, p in params.items()}
    v = {n: [0.0] * len(p) for n, p in params.items()}
    groups = [{"names": [n for n in params if not any(nd in n for nd in no_decay)], "weight_decay": weight_decay},
              {"names": [n for n in params if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
    traj = [_snapshot(params)]
    for grads, lr in zip(_flat_grads(), LRS):
        global_grad_norm_ = math.sqrt(sum(x * x for g in grads.values() for x in g))
        clipped_global_grad_norm = (global_grad_norm_ / max_grad_norm if global_grad_norm_ > max_grad_norm
                                    else 1.0)
        for group in groups:
            group["step"] = group.get("step", 0) + 1
            beta1_correction = 1 - B1 ** group["step"]
            beta2_correction = 1 - B2 ** group["step"]
            beta3 = 1 - B1                                                    # grad_averaging=True
            decay = group["weight_decay"]
            for name in group["names"]:
                p, g = params[name], grads[name]
                param_norm = _norm(p)                                         # before stage 1
                update = []
                for i in range(len(p)):
                    scaled_grad = g[i] / clipped_global_grad_norm
                    r_p = p[i] if decay != 0 else 0.0
                    if not adam_w_mode:                                       # MOMENT_MODE_0: L2
                        scaled_grad = scaled_grad + decay * r_p
                    m[name][i] = m[name][i] * B1 + beta3 * scaled_grad
                    v[name][i] = v[name][i] * B2 + (1 - B2) * scaled_grad * scaled_grad
                    next_m_unbiased = m[name][i] / beta1_correction
                    next_v_unbiased = v[name][i] / beta2_correction
                    denom = math.sqrt(next_v_unbiased) + eps
                    update.append(next_m_unbiased / denom if not adam_w_mode
                                  else (next_m_unbiased / denom) + (decay * r_p))
                update_norm = _norm(update)
                ratio = lr                                                    # stage 2
                if use_nvlamb or decay != 0.0:
                    ratio = lr * (param_norm / update_norm) if (update_norm != 0.0 and param_norm != 0.0) else lr
                params[name] = [p[i] - ratio * update[i] for i in range(len(p))]
        traj.append(_snapshot(params))
    return traj


def reference_bert_adamw(weight_decay_rate=0.01, epsilon=1e-6, exclude_from_weight_decay=NO_DECAY):
    """google-research/bert (and albert) optimization.py: AdamWeightDecayOptimizer + clip_by_global_norm(1.0)."""
    params = _flat_params()
    m = {n: [0.0] * len(p) for n, p in params.items()}
    v = {n: [0.0] * len(p) for n, p in params.items()}
    traj = [_snapshot(params)]
    for grads, learning_rate in zip(_flat_grads(), LRS):
        grads = _tf_clip_by_global_norm(grads, clip_norm=1.0)
        for name, param in params.items():
            next_m = [B1 * mi + (1.0 - B1) * gi for mi, gi in zip(m[name], grads[name])]
            next_v = [B2 * vi + (1.0 - B2) * gi * gi for vi, gi in zip(v[name], grads[name])]
            update = [mi / (math.sqrt(vi) + epsilon) for mi, vi in zip(next_m, next_v)]
            if weight_decay_rate and not any(re.search(r, name) for r in exclude_from_weight_decay):
                update = [u + weight_decay_rate * p for u, p in zip(update, param)]
            params[name] = [p - learning_rate * u for p, u in zip(param, update)]
            m[name], v[name] = next_m, next_v
        traj.append(_snapshot(params))
    return traj


# =============================================================================================
# Presets against the naive references (tolerance 1e-10 relative, see the module docstring)
# =============================================================================================
NAIVE_CASES = {
    "albert": (lambda p: Lamb.from_preset("albert", p), reference_albert),
    "tfa-defaults-with-decay": (lambda p: Lamb.from_preset("tfa", p, weight_decay=0.01),
                                lambda: reference_tfa(weight_decay=0.01)),
    "tfa-exclusions": (lambda p: Lamb.from_preset("tfa", p, weight_decay=0.01, exclude_from_weight_decay=NO_DECAY),
                       lambda: reference_tfa(weight_decay=0.01, exclude_from_weight_decay=list(NO_DECAY))),
    "nvlamb": (lambda p: Lamb.from_preset("nvlamb", p), reference_nvlamb),
    "apex": (lambda p: Lamb.from_preset("apex", p), reference_apex),
    "apex-use_nvlamb": (lambda p: Lamb.from_preset("apex", p, adapt_only_decayed=False),
                        lambda: reference_apex(use_nvlamb=True)),
    "apex-l2-mode": (lambda p: Lamb.from_preset("apex", p, weight_decay_mode="l2"),
                     lambda: reference_apex(adam_w_mode=False)),
    "adamw-bert": (lambda p: AdamW.from_preset("bert", p), reference_bert_adamw),
}


@pytest.fixture(params=["whole", "pieces"])
def layout(request, monkeypatch):
    """Run the test twice: with every tensor updated whole (as these small tensors are by default),
    and with the NumPy path that large tensors take (``Backend.pieces``): pieces of 7 elements
    instead of 2^17, on two threads. 7 divides none of the sizes, so every split tensor ends in a short
    piece, and the norms are sums over pieces."""
    if request.param == "pieces":
        monkeypatch.setattr(backends.get("numpy"), "piece_elements", 7)
        monkeypatch.setattr(backends.get("numpy"), "threads", 2)
    return request.param


@pytest.mark.parametrize("case", list(NAIVE_CASES))
def test_preset_matches_naive_reference(case, layout):
    # float64 on both sides, same formula up to rounding order -> 1e-10 relative on every step's update.
    make_opt, reference = NAIVE_CASES[case]
    ours, ref = run_ours(make_opt), reference()
    err = max_update_error(ours, ref)
    assert err < TOL, f"{case}: max relative update error {err:.3e}"
    assert moved(ours, "sop.weight"), "a zero-initialised weight must move (zero-norm rule gives ratio 1)"


def test_naive_references_differ_from_each_other():
    # Guards against a comparison that cannot fail: the variants really produce different updates
    # (differences of order 1e-3 and more, far above the 1e-10 tolerance).
    albert, nvlamb, apex = reference_albert(), reference_nvlamb(), reference_apex()
    assert max_update_error(albert, nvlamb) > 1e-3
    assert max_update_error(nvlamb, apex) > 1e-3       # apex: no ratio for the no-decay group
    assert max_update_error(run_ours(lambda p: Lamb.from_preset("albert", p, bias_correction="moments")),
                            albert) > 1e-3


# =============================================================================================
# Presets against runnable implementations
# =============================================================================================
def run_torch_optimizer(debias: bool, weight_decay: float):
    torch = pytest.importorskip("torch")
    torch_optimizer = pytest.importorskip("torch_optimizer")
    params = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in make_params().items()}
    opt = torch_optimizer.Lamb(list(params.values()), lr=LRS[0], weight_decay=weight_decay, debias=debias)
    traj = [{n: p.detach().numpy().ravel().tolist() for n, p in params.items()}]
    for grads, lr in zip(make_grads(), LRS):
        for n, p in params.items():
            p.grad = torch.from_numpy(grads[n].copy())
        opt.param_groups[0]["lr"] = lr
        opt.step()
        traj.append({n: p.detach().numpy().ravel().tolist() for n, p in params.items()})
    clamped = float(opt.state[params["pooler.weight"]]["weight_norm"])
    return traj, clamped


@pytest.mark.parametrize("debias", [False, True])
def test_torch_optimizer_preset(debias, layout):
    # float64 torch vs float64 NumPy, same formula up to rounding order -> 1e-10 relative per update.
    ref, clamped_norm = run_torch_optimizer(debias, weight_decay=0.01)
    assert clamped_norm == 10.0, "the test must exercise torch_optimizer's clamp of ||w|| at 10"
    ours = run_ours(lambda p: Lamb.from_preset("torch_optimizer", p, weight_decay=0.01,
                                               bias_correction="step_size" if debias else "none"))
    err = max_update_error(ours, ref)
    assert err < TOL, f"torch_optimizer debias={debias}: {err:.3e}"
    # Without the clamp the big tensor's updates differ by ~2.4x: the comparison can fail.
    unclamped = run_ours(lambda p: Lamb.from_preset("torch_optimizer", p, weight_decay=0.01, weight_norm_clamp=None,
                                                    bias_correction="step_size" if debias else "none"))
    assert max_update_error(unclamped, ref) > 0.5


def run_optax(mask):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        lrs = jnp.asarray(LRS, dtype=jnp.float64)
        tx = optax.lamb(learning_rate=lambda count: lrs[count], weight_decay=0.01, mask=mask)
        params = {n: jnp.asarray(p) for n, p in make_params().items()}
        state = tx.init(params)
        traj = [{n: np.asarray(p).ravel().tolist() for n, p in params.items()}]
        for grads in make_grads():
            updates, state = tx.update({n: jnp.asarray(g) for n, g in grads.items()}, state, params)
            params = optax.apply_updates(params, updates)
            assert all(p.dtype == jnp.float64 for p in params.values())
            traj.append({n: np.asarray(p).ravel().tolist() for n, p in params.items()})
    return traj


def test_optax_preset(layout):
    # float64 JAX vs float64 NumPy, same formula up to rounding order -> 1e-10 relative per update.
    ref = run_optax(mask=None)
    ours = run_ours(lambda p: Lamb.from_preset("optax", p, weight_decay=0.01))
    err = max_update_error(ours, ref)
    assert err < TOL, f"optax (no mask): {err:.3e}"


def test_optax_preset_with_mask_affects_decay_only():
    # optax's mask removes weight decay but keeps the trust ratio; our equivalent is a decay exclusion
    # list with exclude_from_layer_adaptation=() (the preset's default). Tolerance 1e-10 as above.
    mask = lambda params: {n: not any(re.search(r, n) for r in NO_DECAY) for n in params}  # noqa: E731
    ref = run_optax(mask=mask)
    ours = run_ours(lambda p: Lamb.from_preset("optax", p, weight_decay=0.01, exclude_from_weight_decay=NO_DECAY))
    assert max_update_error(ours, ref) < TOL
    # If the exclusion list also removed the trust ratio (the ALBERT convention), results would differ.
    albert_like = run_ours(lambda p: Lamb.from_preset("optax", p, weight_decay=0.01,
                                                      exclude_from_weight_decay=NO_DECAY,
                                                      exclude_from_layer_adaptation=None))
    assert max_update_error(albert_like, ref) > 1e-3


def test_adamw_matches_torch(layout):
    # torch.optim.AdamW in float64 with a decay and a no-decay parameter group; 1e-10 relative per update
    # (identical formula; torch writes the decay as w * (1 - lr wd) before the Adam step).
    torch = pytest.importorskip("torch")
    params = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in make_params().items()}
    decay = [p for n, p in params.items() if not any(re.search(r, n) for r in NO_DECAY)]
    no_decay = [p for n, p in params.items() if any(re.search(r, n) for r in NO_DECAY)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LRS[0], eps=1e-8, foreach=False)
    ref = [{n: p.detach().numpy().ravel().tolist() for n, p in params.items()}]
    for grads, lr in zip(make_grads(), LRS):
        for n, p in params.items():
            p.grad = torch.from_numpy(grads[n].copy())
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ref.append({n: p.detach().numpy().ravel().tolist() for n, p in params.items()})
    ours = run_ours(lambda p: AdamW.from_preset("torch", p, exclude_from_weight_decay=NO_DECAY))
    assert max_update_error(ours, ref) < TOL
    without_exclusions = run_ours(lambda p: AdamW.from_preset("torch", p))
    assert max_update_error(without_exclusions, ref) > 1e-3


def test_pieces_and_threads_do_not_change_the_numbers(monkeypatch):
    """Large tensors are updated in pieces on the backend's threads (``Backend.pieces``, 2^17 elements):
    the result is bit-identical whatever the thread count, because the pieces and the order of every
    sum are fixed; and within rounding (1e-12 relative, float64, 12 steps) of updating whole tensors."""
    numpy_backend = backends.get("numpy")

    def run(piece_elements, threads):
        monkeypatch.setattr(numpy_backend, "piece_elements", piece_elements)
        monkeypatch.setattr(numpy_backend, "threads", threads)
        params = make_params()
        opt = Lamb.from_preset("albert", params)
        for grads, lr in zip(make_grads(), LRS):
            opt.step(grads, lr=lr)
        return params

    one, two, whole = run(7, 1), run(7, 2), run(10 ** 9, 1)
    for name in one:
        assert np.array_equal(one[name], two[name]), name
        np.testing.assert_allclose(one[name], whole[name], rtol=1e-12, atol=1e-15, err_msg=name)
    monkeypatch.setattr(numpy_backend, "piece_elements", 7)
    pieces = numpy_backend.pieces(np.zeros((24, 24)))
    assert [p[0].size for p in pieces] == [7] * 82 + [2]
    assert len(numpy_backend.pieces(np.zeros((24, 24)).T)) == 1   # not contiguous: whole


# =============================================================================================
# The pure per-tensor functions alone reproduce the optimisers
# =============================================================================================
PURE_LAMB_CASES = {name: dict(weight_decay=0.01) for name in LAMB_PRESETS}
PURE_LAMB_CASES.update({
    "torch_optimizer-debias": dict(weight_decay=0.01, bias_correction="step_size"),
    "apex-l2-mode": dict(weight_decay_mode="l2"),
    "outside-ratio-clamp-pair": dict(weight_decay=0.02, weight_decay_mode="outside_ratio",
                                     weight_norm_clamp=(0.5, 2.0)),
    "zero-norm-ratio": dict(zero_norm_ratio=0.5),
})


def _one_piece_updates(opt, params, grads, update_one):
    """Run ``update_one(name, w, g, m, v, t, clip)`` on copies of every tensor (one whole tensor, no
    pieces, no class), with the clip factor the optimiser would use; return the new w, m, v."""
    clip = None
    if opt.max_grad_norm is not None:
        clip = clip_factor(global_grad_norm(grads[n] for n in params), opt.max_grad_norm, np)
    out = {}
    for name in params:
        w, m, v = params[name].copy(), opt.exp_avg[name].copy(), opt.exp_avg_sq[name].copy()
        update_one(name, w, grads[name], m, v, opt.step_count + 1, clip)
        out[name] = (w, m, v)
    return out


@pytest.mark.parametrize("case", list(PURE_LAMB_CASES))
def test_lamb_update_alone_reproduces_lamb_step(case):
    """lamb_update on each whole tensor gives exactly (bit for bit: the same operations in the same
    order) what Lamb.step does, its trust ratio included, on three consecutive steps (t = 1, 2, 3,
    so the bias corrections and non-zero moments are exercised)."""
    preset = case.split("-")[0] if case.split("-")[0] in LAMB_PRESETS else "tfa"
    params = make_params()
    opt = Lamb.from_preset(preset, params, **PURE_LAMB_CASES[case])
    ratios = {}

    def update_one(name, w, g, m, v, t, clip):
        ratios[name] = lamb.lamb_update(
            w, g, m, v, lr=lr, t=t, betas=opt.betas, eps=opt.eps, wd=opt.tensor_weight_decay[name],
            bias_correction=opt.bias_correction, weight_decay_mode=opt.weight_decay_mode,
            weight_norm_clamp=opt.weight_norm_clamp, zero_norm_ratio=opt.zero_norm_ratio,
            adapt=opt.layer_adaptation[name], clip=clip)

    for grads, lr in list(zip(make_grads(), LRS))[:3]:
        expected = _one_piece_updates(opt, params, grads, update_one)
        opt.step(grads, lr=lr)
        for name, (w, m, v) in expected.items():
            assert np.array_equal(w, params[name]), f"{case}: {name}"
            assert np.array_equal(m, opt.exp_avg[name]) and np.array_equal(v, opt.exp_avg_sq[name]), name
            assert np.array_equal(ratios[name], opt.trust_ratios[name]), name


@pytest.mark.parametrize("preset", list(ADAMW_PRESETS))
def test_adamw_update_alone_reproduces_adamw_step(preset):
    """adamw_update on each whole tensor gives exactly what AdamW.step does, on three steps."""
    params = make_params()
    opt = AdamW.from_preset(preset, params)

    def update_one(name, w, g, m, v, t, clip):
        adamw.adamw_update(w, g, m, v, lr=lr, t=t, betas=opt.betas, eps=opt.eps,
                           wd=opt.tensor_weight_decay[name], bias_correction=opt.bias_correction, clip=clip)

    for grads, lr in list(zip(make_grads(), LRS))[:3]:
        expected = _one_piece_updates(opt, params, grads, update_one)
        opt.step(grads, lr=lr)
        for name, (w, m, v) in expected.items():
            assert np.array_equal(w, params[name]), f"{preset}: {name}"
            assert np.array_equal(m, opt.exp_avg[name]) and np.array_equal(v, opt.exp_avg_sq[name]), name


def test_make_optimizer_names():
    # ref-bert pretrain's names: "lamb" is ALBERT's LAMB, the LAMB presets, "adamw" torch's, "adamw-<preset>".
    params = make_params()
    assert optim.OPTIMIZERS == ("lamb", *LAMB_PRESETS, "adamw", *(f"adamw-{k}" for k in ADAMW_PRESETS))
    for name in optim.OPTIMIZERS:
        opt = optim.make_optimizer(name, params, lr=0.02)
        preset = {"lamb": "albert", "adamw": "torch"}.get(name, name.removeprefix("adamw-"))
        expected = (AdamW if name.startswith("adamw") else Lamb).from_preset(preset, params, lr=0.02)
        assert type(opt) is type(expected) and opt.state_dict()["hyper"] == expected.state_dict()["hyper"], name
    golden = optim.make_optimizer("lamb", params)           # no lr: the preset's (the golden files' optimiser)
    assert golden.state_dict()["hyper"] == Lamb.from_preset("albert", params).state_dict()["hyper"]
    with pytest.raises(ValueError, match=r"optimizer='sgd' is invalid: expected one of \('lamb', 'albert'"):
        optim.make_optimizer("sgd", params, lr=0.1)
    with pytest.raises(ValueError, match="is invalid"):
        optim.make_optimizer("adamw-nope", params, lr=0.1)


def test_optimiser_never_asks_which_backend():
    # The backend chooses pieces and fused kernels (Backend.pieces, backends.fast_path); the optimiser
    # code names no backend and no fused kernel object.
    import pathlib

    for path in pathlib.Path(optim.__file__).parent.glob("*.py"):
        source = path.read_text()
        for word in ('"numpy"', '"cupy"', ".fused", "backend.name"):
            assert word not in source, f"{path.name} mentions {word}"


def test_backend_pieces():
    # NumPy: fixed-size runs (views: writes reach the arrays); None (CuPy's policy): one piece.
    numpy_backend = backends.get("numpy")
    assert numpy_backend.piece_elements == 2 ** 17
    a, b = np.arange(20.0), np.zeros(20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numpy_backend, "piece_elements", 8)
        pieces = numpy_backend.pieces(a, b)
        assert [len(p) for p in pieces] == [2, 2, 2] and [p[0].size for p in pieces] == [8, 8, 4]
        for pa, pb in pieces:
            pb += pa
        assert np.array_equal(a, b)
        mp.setattr(numpy_backend, "piece_elements", None)
        (whole,) = numpy_backend.pieces(a, b)
        assert whole[0] is a and whole[1] is b


# =============================================================================================
# Pitfalls
# =============================================================================================
def test_zero_tensor_gets_ratio_one_not_zero():
    # With ratio 1 the first step of an all-zero weight is lr * u, u = m_hat / (sqrt(v_hat) + eps) with
    # m_hat = g and v_hat = g^2 at t = 1: -0.1 * 0.5 / (0.5 + 1e-6). rtol 1e-15: a few float64 roundings.
    w = {"sop.weight": np.zeros((3, 2)), "other.weight": np.ones((3, 2))}
    g = {"sop.weight": np.full((3, 2), 0.5), "other.weight": np.full((3, 2), 0.5)}
    opt = Lamb(w, lr=0.1, bias_correction=True, weight_decay=0.0)
    opt.step(g)
    assert float(opt.trust_ratios["sop.weight"]) == 1.0
    np.testing.assert_allclose(w["sop.weight"], np.full((3, 2), -0.1 * 0.5 / (0.5 + 1e-6)), rtol=1e-15)
    assert float(opt.trust_ratios["other.weight"]) != 1.0     # the non-zero tensor does get a real ratio
    # The naive rule ||w|| / ||u|| = 0 (zero_norm_ratio=0) freezes the zero tensor forever.
    frozen = {"sop.weight": np.zeros((3, 2))}
    opt0 = Lamb(frozen, lr=0.1, weight_decay=0.0, zero_norm_ratio=0.0)
    for _ in range(3):
        opt0.step({"sop.weight": np.full((3, 2), 0.5)})
    assert not frozen["sop.weight"].any()


def test_one_global_step_counter():
    # Exact equality: identical tensors under different names (first and last in the dict) must get
    # identical updates at every step; a per-tensor counter incremented inside the loop would not.
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((4, 4))
    params = {"a.weight": w0.copy(), "middle.weight": rng.standard_normal(7), "z.weight": w0.copy()}
    for opt_cls, kwargs in ((Lamb, dict(bias_correction="moments")), (Lamb, dict(bias_correction="step_size")),
                            (AdamW, {})):
        p = {n: x.copy() for n, x in params.items()}
        opt = opt_cls(p, lr=0.01, **kwargs)
        for step in range(1, 6):
            g = rng.standard_normal((4, 4))
            opt.step({"a.weight": g, "middle.weight": rng.standard_normal(7), "z.weight": g.copy()})
            np.testing.assert_array_equal(p["a.weight"], p["z.weight"])
            assert opt.state_dict()["step"] == step
    # And t = 1 on the first step: Adam's first bias-corrected update is g / (|g| + eps), exactly.
    p = {"b": np.array([2.0, -3.0])}
    AdamW(p, lr=1.0, weight_decay=0.0, eps=0.5).step({"b": np.array([1.0, 1.0])})
    np.testing.assert_allclose(p["b"], [2.0 - 1 / 1.5, -3.0 - 1 / 1.5], rtol=1e-15)


@pytest.mark.parametrize("arg", ["exclude_from_weight_decay", "exclude_from_layer_adaptation"])
def test_exclusion_list_given_as_string_is_refused(arg):
    params = make_params()
    with pytest.raises(ValueError, match=r"got the string 'bias'.*\['bias'\]"):
        Lamb(params, **{arg: "bias"})
    with pytest.raises(ValueError, match="got the string"):
        Lamb.from_preset("albert", params, **{arg: "LayerNorm"})
    if arg == "exclude_from_weight_decay":
        with pytest.raises(ValueError, match="got the string"):
            AdamW(params, exclude_from_weight_decay="bias")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Lamb(params, **{arg: ["("]})


def test_exclusion_patterns_per_preset():
    # Which tensors get decay and the trust ratio, by name (regex search).
    params = make_params()
    decayed = {"embeddings.word_embeddings", "encoder.attention.0.query.weight", "pooler.weight", "sop.weight"}
    albert = Lamb.from_preset("albert", params)
    assert {n for n, wd in albert.tensor_weight_decay.items() if wd == 0.01} == decayed
    assert {n for n, a in albert.layer_adaptation.items() if a} == decayed          # same list (fallback)
    nvlamb = Lamb.from_preset("nvlamb", params)
    assert {n for n, wd in nvlamb.tensor_weight_decay.items() if wd} == decayed
    assert all(nvlamb.layer_adaptation.values())                                    # ratio on every tensor
    apex = Lamb.from_preset("apex", params)
    assert {n for n, a in apex.layer_adaptation.items() if a} == decayed            # wd 0 -> no ratio
    assert not any(Lamb.from_preset("apex", params, weight_decay=0.0).layer_adaptation.values())
    assert all(Lamb.from_preset("apex", params, adapt_only_decayed=False).layer_adaptation.values())
    optax_like = Lamb.from_preset("optax", params, weight_decay=0.01, exclude_from_weight_decay=NO_DECAY)
    assert all(optax_like.layer_adaptation.values())
    # A pattern is searched anywhere in the name, not matched at the start.
    assert Lamb(params, exclude_from_weight_decay=["query"]).tensor_weight_decay[
        "encoder.attention.0.query.weight"] == 0.0


# =============================================================================================
# Global gradient clipping
# =============================================================================================
def test_global_norm_and_clip_factor():
    # Exact small numbers: ||(3, 4)|| = 5 over two tensors; factor max/max(norm, max).
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    norm = global_grad_norm(grads.values())
    assert np.ndim(norm) == 0 and float(norm) == 5.0
    assert float(clip_factor(norm, 1.0, np)) == 0.2
    assert float(clip_factor(norm, 10.0, np)) == 1.0
    assert float(clip_factor(np.float64(0.0), 1.0, np)) == 1.0


def test_clipping_is_global_not_per_tensor():
    # m after one step is (1 - b1) * clipped g: 0.1 * (3, 4) / 5 with one global factor (per-tensor
    # clipping would give 0.1 * (1, 1)). Tolerance 1e-15: a handful of float64 operations.
    for opt_cls in (Lamb, AdamW):
        p = {"a": np.array([1.0]), "b": np.array([1.0])}
        opt = opt_cls(p, max_grad_norm=1.0)
        opt.step({"a": np.array([3.0]), "b": np.array([4.0])})
        np.testing.assert_allclose([opt.exp_avg["a"][0], opt.exp_avg["b"][0]], [0.06, 0.08], rtol=1e-15)
        # Below the threshold nothing is scaled.
        p = {"a": np.array([1.0]), "b": np.array([1.0])}
        opt = opt_cls(p, max_grad_norm=10.0)
        opt.step({"a": np.array([3.0]), "b": np.array([4.0])})
        np.testing.assert_allclose([opt.exp_avg["a"][0], opt.exp_avg["b"][0]], [0.3, 0.4], rtol=1e-15)


def test_caller_grads_not_modified():
    # apex overwrites the gradients with the update; ours must leave the caller's arrays alone (exact).
    params, grads = make_params(), make_grads()[1]
    before = {n: g.copy() for n, g in grads.items()}
    Lamb.from_preset("apex", params, weight_decay_mode="l2").step(grads)
    for n in grads:
        np.testing.assert_array_equal(grads[n], before[n])


# =============================================================================================
# Other switches
# =============================================================================================
def test_outside_ratio_and_clamp_pair():
    # One step by hand (float64, same operations up to order -> 1e-14 relative):
    # u = r (decay not inside), ratio = clip(||w||, lo, hi) / ||u||, w -= lr * ratio * u + lr * wd * w.
    rng = np.random.default_rng(5)
    w0, g = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    p = {"x.weight": w0.copy()}
    Lamb(p, lr=0.1, weight_decay=0.02, weight_decay_mode="outside_ratio", weight_norm_clamp=(0.5, 2.0),
         bias_correction=False).step({"x.weight": g})
    r = (0.1 * g) / (np.sqrt(0.001 * g * g) + 1e-6)
    ratio = min(max(np.linalg.norm(w0), 0.5), 2.0) / np.linalg.norm(r)
    assert np.linalg.norm(w0) > 2.0                       # the upper bound is the one in effect
    np.testing.assert_allclose(p["x.weight"], w0 - 0.1 * ratio * r - 0.1 * 0.02 * w0, rtol=1e-14)


def test_float32_stays_float32():
    # Every preset on float32 params and grads: params, moments and ratios stay float32, and the
    # trajectory agrees with the float64 one to 1e-4 relative per update (float32 rounding, ~6e-8 per
    # operation, grown through the norms and 12 steps; measured at most 1.7e-5).
    for make_opt in [lambda p, n=n: Lamb.from_preset(n, p, weight_decay=0.01) for n in LAMB_PRESETS] + \
                    [lambda p, n=n: AdamW.from_preset(n, p) for n in ADAMW_PRESETS]:
        params = make_params(np.float32)
        opt = make_opt(params)
        for grads in make_grads(np.float32)[:2]:
            opt.step(grads, lr=0.01)
        for n in params:
            assert params[n].dtype == np.float32
            assert opt.exp_avg[n].dtype == np.float32 and opt.exp_avg_sq[n].dtype == np.float32
        for ratio in getattr(opt, "trust_ratios", {}).values():
            assert not hasattr(ratio, "dtype") or ratio.dtype == np.float32
        assert max_update_error(run_ours(make_opt, np.float32), run_ours(make_opt)) < 1e-4


class DeviceLike(np.ndarray):
    """A NumPy array that behaves like a device array on the host boundary: results of reductions stay
    0-d arrays of this class, and any conversion to a Python number or bool raises."""

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return np.asarray(arr).view(DeviceLike)

    def _host_read(self, *args):
        raise AssertionError("host read of a device value (float/bool/int/item) inside the optimiser")

    __float__ = __bool__ = __int__ = __index__ = item = tolist = _host_read


def test_no_host_reads_during_step():
    # Exact equality with a plain NumPy run: same operations, so the same bits.
    for name, factory in [(n, lambda p, n=n: Lamb.from_preset(n, p, weight_decay=0.01)) for n in LAMB_PRESETS] + \
                         [("adamw-" + n, lambda p, n=n: AdamW.from_preset(n, p)) for n in ADAMW_PRESETS]:
        plain, grads = make_params(), make_grads()
        flat = np.concatenate([p.ravel() for p in plain.values()]).view(DeviceLike)
        device, offset = {}, 0
        for n, p in plain.items():                        # named views of one flat buffer, as FlatBuffer
            device[n] = flat[offset:offset + p.size].reshape(p.shape)
            offset += p.size
        opt_dev, opt_plain = factory(device), factory(plain)
        for g, lr in zip(grads[:3], LRS):
            opt_dev.step({n: x.view(DeviceLike) for n, x in g.items()}, lr=lr)
            opt_plain.step(g, lr=lr)
        for n in plain:
            assert type(device[n]) is DeviceLike
            np.testing.assert_array_equal(device[n].view(np.ndarray), plain[n], err_msg=f"{name}: {n}")
        assert np.shares_memory(device["pooler.weight"], flat)   # updated in place, still views


# =============================================================================================
# State dict
# =============================================================================================
def _to_host(state):
    """What a checkpoint writer does: copies of the tensors on the host, hyper through JSON."""
    return {"step": state["step"], "tensors": {k: np.array(v) for k, v in state["tensors"].items()},
            "hyper": json.loads(json.dumps(state["hyper"]))}


@pytest.mark.parametrize("make_opt", [lambda p: Lamb.from_preset("albert", p),
                                      lambda p: Lamb.from_preset("torch_optimizer", p, weight_norm_clamp=(0.1, 5.0)),
                                      lambda p: AdamW.from_preset("bert", p)])
def test_state_dict_round_trip(make_opt):
    # Exact: resuming from a saved state gives bit-identical parameters to never stopping.
    grads = make_grads()
    p_run, p_resume = make_params(), make_params()
    run = make_opt(p_run)
    for g, lr in zip(grads[:4], LRS):
        run.step(g, lr=lr)
    saved, saved_params = _to_host(run.state_dict()), {n: x.copy() for n, x in p_run.items()}
    assert saved["step"] == 4 and set(saved) == {"step", "tensors", "hyper"}
    for n in p_resume:
        p_resume[n][...] = saved_params[n]
    resumed = make_opt(p_resume)
    resumed.load_state_dict(saved)
    for g, lr in zip(grads[4:], LRS[4:]):
        run.step(g, lr=lr)
        resumed.step(g, lr=lr)
    for n in p_run:
        np.testing.assert_array_equal(p_run[n], p_resume[n])
    assert resumed.state_dict()["step"] == run.state_dict()["step"] == N_STEPS


def test_load_state_dict_rejects_mismatches():
    params = make_params()
    opt = Lamb.from_preset("albert", params)
    opt.step(make_grads()[0])
    good = _to_host(opt.state_dict())

    def variant(**changes):
        s = {"step": good["step"], "tensors": dict(good["tensors"]), "hyper": dict(good["hyper"])}
        for k, v in changes.items():
            s[k] = v
        return s

    fresh = Lamb.from_preset("albert", make_params())
    missing = dict(good["tensors"])
    del missing["exp_avg/pooler.bias"]
    with pytest.raises(ValueError, match=r"missing tensors \['exp_avg/pooler.bias'\]"):
        fresh.load_state_dict(variant(tensors=missing))
    with pytest.raises(ValueError, match=r"unexpected tensors \['exp_avg/extra'\]"):
        fresh.load_state_dict(variant(tensors={**good["tensors"], "exp_avg/extra": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"exp_avg_sq/sop.weight has shape \(2, 6\), expected \(6, 2\)"):
        fresh.load_state_dict(variant(tensors={**good["tensors"], "exp_avg_sq/sop.weight": np.zeros((2, 6))}))
    with pytest.raises(ValueError, match=r"exp_avg/sop.weight has dtype float32, expected float64"):
        fresh.load_state_dict(variant(tensors={**good["tensors"],
                                               "exp_avg/sop.weight": np.zeros((6, 2), np.float32)}))
    with pytest.raises(ValueError, match=r"hyper\['bias_correction'\] is 'moments', expected 'none'"):
        fresh.load_state_dict(variant(hyper={**good["hyper"], "bias_correction": "moments"}))
    with pytest.raises(ValueError, match=r"hyper\['optimizer'\] is 'AdamW', expected 'Lamb'"):
        fresh.load_state_dict(_to_host(AdamW.from_preset("bert", make_params()).state_dict()))
    with pytest.raises(ValueError, match=r"exp_avg/sop.weight is a list, expected an array"):
        fresh.load_state_dict(variant(tensors={**good["tensors"], "exp_avg/sop.weight": [0.0] * 12}))
    with pytest.raises(ValueError, match=r"state\['step'\] must be an integer >= 0, got -1"):
        fresh.load_state_dict(variant(step=-1))
    # Nothing was written by the failed loads.
    assert fresh.state_dict()["step"] == 0 and not any(v.any() for v in fresh.state_dict()["tensors"].values())
    # A different lr is allowed (schedules override it), and the load then succeeds.
    fresh.load_state_dict(variant(hyper={**good["hyper"], "lr": 0.5}))
    assert fresh.step_count == 1
    np.testing.assert_array_equal(fresh.exp_avg["sop.weight"], good["tensors"]["exp_avg/sop.weight"])


# =============================================================================================
# Bad input
# =============================================================================================
def test_bad_constructor_input():
    params = make_params()
    with pytest.raises(ValueError, match=r"unknown LAMB preset 'lars'; expected one of \['albert', 'apex'"):
        Lamb.from_preset("lars", params)
    with pytest.raises(ValueError, match=r"unknown AdamW preset 'adam'; expected one of \['bert', 'torch'\]"):
        AdamW.from_preset("adam", params)
    with pytest.raises(ValueError, match=r"unknown Lamb option\(s\) \['clamp_value'\]"):
        Lamb.from_preset("torch_optimizer", params, clamp_value=10)
    for lr in (0, 0.0, -1e-3, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match=re.escape(f"lr must be a finite number > 0, got {lr!r}")):
            Lamb(params, lr=lr)
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            AdamW(params, lr=lr)
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\), got 1.0"):
        Lamb(params, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got -0.1"):
        AdamW(params, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\), got \(0.9,\)"):
        Lamb(params, betas=(0.9,))
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1e-06"):
        Lamb(params, eps=-1e-6)
    with pytest.raises(ValueError, match=r"bias_correction must be True, False or one of"):
        Lamb(params, bias_correction="lr")
    with pytest.raises(ValueError, match=r"weight_decay_mode must be one of"):
        Lamb(params, weight_decay_mode="decoupled")
    with pytest.raises(ValueError, match=r"weight_norm_clamp must be None, an upper bound > 0, or a pair"):
        Lamb(params, weight_norm_clamp=(5.0, 1.0))
    with pytest.raises(ValueError, match=r"max_grad_norm must be a finite number > 0, got 0"):
        Lamb(params, max_grad_norm=0)
    with pytest.raises(ValueError, match=r"parameter 'i' must be a floating-point array, got int64"):
        Lamb({"i": np.zeros(3, np.int64)})
    with pytest.raises(ValueError, match="params is empty"):
        AdamW({})


def test_bad_step_input():
    params = make_params()
    grads = make_grads()[0]
    for opt in (Lamb.from_preset("albert", params), AdamW.from_preset("torch", params)):
        missing = {n: g for n, g in grads.items() if n != "pooler.weight"}
        with pytest.raises(ValueError, match=r"missing \['pooler.weight'\], unexpected \[\]"):
            opt.step(missing)
        with pytest.raises(ValueError, match=r"missing \[\], unexpected \['pooler.wieght'\]"):
            opt.step({**grads, "pooler.wieght": grads["pooler.weight"]})
        with pytest.raises(ValueError, match=r"grads\['sop.weight'\] has shape \(2, 6\), expected \(6, 2\)"):
            opt.step({**grads, "sop.weight": grads["sop.weight"].T})
        with pytest.raises(ValueError, match=r"grads\['sop.weight'\] has dtype float32, expected float64"):
            opt.step({**grads, "sop.weight": grads["sop.weight"].astype(np.float32)})
        with pytest.raises(ValueError, match=r"lr must be a finite number >= 0, got -0.1"):
            opt.step(grads, lr=-0.1)
        assert opt.step_count == 0                       # a refused step changes nothing
        opt.step(grads, lr=0.0)                          # schedules reach 0: allowed
        assert opt.step_count == 1


# =============================================================================================
# Schedules (exact values; expected numbers written out by hand)
# =============================================================================================
def test_albert_schedule_values():
    # Equality up to 1 ulp of the hand-written decimal literals (rel 1e-15).
    T = 10
    approx = lambda x: pytest.approx(x, rel=1e-15, abs=0.0)  # noqa: E731
    assert albert_schedule(0, 1.0, T) == 1.0                      # decay counts from step 0
    assert albert_schedule(5, 1.0, T) == 0.5
    assert albert_schedule(10, 1.0, T) == 0.0                     # end of training
    assert albert_schedule(15, 1.0, T) == 0.0                     # min(step, T): no cycling
    assert albert_schedule(5, 1.0, T, power=2.0) == 0.25
    assert albert_schedule(7, 2.0, T, power=0.5) == approx(2.0 * math.sqrt(0.3))
    # Warmup of 4 replaces the decay for steps 0..3, then the step-0-based decay takes over.
    assert albert_schedule(0, 1.0, T, num_warmup_steps=4) == 0.0
    assert albert_schedule(1, 1.0, T, num_warmup_steps=4) == 0.25
    assert albert_schedule(3, 1.0, T, num_warmup_steps=4) == 0.75
    assert albert_schedule(4, 1.0, T, num_warmup_steps=4) == approx(0.6)   # 1 - 4/10, not 1.0
    # ALBERT's recipe: lr 0.00176, 125k steps, 3125 warmup.
    assert albert_schedule(3124, 0.00176, 125000, 3125) == approx(0.00176 * 3124 / 3125)
    assert albert_schedule(3125, 0.00176, 125000, 3125) == approx(0.001716)
    assert albert_schedule(125000, 0.00176, 125000, 3125) == 0.0
    assert isinstance(albert_schedule(3, 1.0, T), float)


def test_linear_warmup_decay_values():
    # Exact up to 1 ulp (rel 1e-15): warmup 4 of 10, peak at the end of warmup, 0 at T and after.
    approx = lambda x: pytest.approx(x, rel=1e-15, abs=0.0)  # noqa: E731
    expected = {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 5: 5 / 6, 7: 0.5, 9: 1 / 6, 10: 0.0, 12: 0.0}
    for step, value in expected.items():
        assert linear_warmup_decay(step, 1.0, 10, 4) == approx(value), step
    assert linear_warmup_decay(0, 3e-4, 10, 0) == 3e-4                    # no warmup: starts at peak
    assert linear_warmup_decay(5, 3e-4, 10, 0) == approx(1.5e-4)
    assert linear_warmup_decay(9, 1.0, 10, 10) == 0.9                     # warmup == T: all warmup,
    assert linear_warmup_decay(10, 1.0, 10, 10) == 0.0                    # then 0 (max(1, T - W) guards 0/0)


def test_linear_warmup_decay_matches_hugging_face():
    # Same float64 expression as transformers' lr_lambda -> equal to 1e-15 relative.
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for T, W in ((10, 4), (100, 0), (50, 50), (7, 3)):
        lr_lambda = transformers.get_linear_schedule_with_warmup(opt, W, T).lr_lambdas[0]
        for step in range(T + 3):
            assert linear_warmup_decay(step, 2.0, T, W) == pytest.approx(2.0 * lr_lambda(step), rel=1e-15)


def test_schedule_bad_input():
    with pytest.raises(ValueError, match=r"num_train_steps must be > 0, got 0"):
        albert_schedule(0, 1.0, 0)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, got -1"):
        linear_warmup_decay(-1, 1.0, 10, 2)
    with pytest.raises(ValueError, match=r"init_lr must be a finite number > 0, got 0.0"):
        albert_schedule(1, 0.0, 10)
    with pytest.raises(ValueError, match=r"num_warmup_steps must be <= num_train_steps \(10\), got 11"):
        linear_warmup_decay(1, 1.0, 10, 11)
    with pytest.raises(ValueError, match=r"power must be a finite number > 0, got -1.0"):
        albert_schedule(1, 1.0, 10, power=-1.0)


# =============================================================================================
# With the model
# =============================================================================================
def test_lamb_trains_tiny_model_in_place():
    # A real loss_and_grads: 8 ALBERT-preset LAMB steps on one fixed batch lower the loss (an easy
    # property at lr 2e-2: it drops by about 28%), parameters stay float32 views of the flat buffer.
    from ref_bert import Model

    model = Model("tiny", backend="numpy", dtype="float32", seed=0)
    be = model.backend
    rng = np.random.default_rng(0)
    ids = be.from_host(rng.integers(5, 1000, size=(2, 16)))
    labels = np.full((2, 16), -100)
    labels[:, [2, 5, 9]] = rng.integers(5, 1000, size=(2, 3))
    labels, sop = be.from_host(labels), be.from_host(np.array([0, 1]))
    params = model.state_dict()
    opt = Lamb.from_preset("albert", params)
    losses = []
    for step in range(8):
        _result = model.loss_and_grads(ids, mlm_labels=labels, sop_labels=sop)
        loss, grads = _result.loss, _result.grads
        losses.append(float(loss))
        opt.step(grads, lr=albert_schedule(step + 1, 2e-2, 100))
    assert losses[-1] < 0.9 * losses[0], losses
    for name, view in params.items():
        assert view.dtype == np.float32 and np.shares_memory(view, model.params.flat), name
    assert model.params["pooler.weight"] is params["pooler.weight"]


@pytest.mark.gpu
@pytest.mark.skipif(not backends.available("cupy"), reason="needs CuPy and a GPU")
def test_cupy_matches_numpy():
    # Same float64 formula on GPU and CPU; only reduction order differs -> 1e-10 relative per update.
    be = backends.get("cupy")
    for make_opt in [lambda p, n=n: Lamb.from_preset(n, p, weight_decay=0.01) for n in LAMB_PRESETS] + \
                    [lambda p, n=n: AdamW.from_preset(n, p) for n in ADAMW_PRESETS]:
        host, dev = make_params(), {n: be.from_host(p) for n, p in make_params().items()}
        opt_h, opt_d = make_opt(host), make_opt(dev)
        traj_h = [{n: p.ravel().tolist() for n, p in host.items()}]
        traj_d = [{n: be.to_host(p).ravel().tolist() for n, p in dev.items()}]
        for g, lr in zip(make_grads(), LRS):
            opt_h.step(g, lr=lr)
            opt_d.step({n: be.from_host(x) for n, x in g.items()}, lr=lr)
            traj_h.append({n: p.ravel().tolist() for n, p in host.items()})
            traj_d.append({n: be.to_host(p).ravel().tolist() for n, p in dev.items()})
        assert max_update_error(traj_d, traj_h) < TOL
        assert all(type(p).__module__.startswith("cupy") for p in opt_d.exp_avg.values())
