"""The optimisers' edge rules (issue #18): LAMB, every preset, and AdamW on all-zero tensors, zero
gradients and zero updates; the trust ratio's zero-norm fallback (its value and its condition) per
source; every preset's defaults against its source; the global gradient norm and the clip rule at the
threshold; the schedules where warmup or decay lasts a single step (or warmup none). Also the loss
path's gradient accumulation (ref_bert/pretrain/accumulation.py) with a SOP weight and in float32,
every refusal message of ref_bert.optim in full, and the backend each function computes with (a
recording stand-in for a second backend, through a patched ``backends.of``: what CuPy would be).

The references are written here from the sources, not from ref_bert.optim (docs/reference.md §4 and §5,
the sources themselves, named at each function):

* each source's zero-norm rule as its own code writes it (``ratio_*``);
* each source's step (``naive_lamb_step``, ``naive_adamw_step``): Python floats and ``math.sqrt`` over
  flat lists, no NumPy, with the hyperparameters of :data:`LAMB_SOURCE_DEFAULTS` (the sources' own
  values, a table checked against ref_bert's presets in ``test_preset_defaults_*``);
* where the source runs here, the source itself: ``torch_optimizer.Lamb`` and ``torch.optim.AdamW``
  in float64; and the installed files of torch_optimizer, optax and torch for their defaults. (optax
  itself is not run here: JAX's start-up and compilation take seconds; tests/test_optim.py compares
  the optax preset with optax.lamb over twelve steps.)

Tolerances (float64 on both sides, the same formula up to the order of rounding): a step's update
``du = w_new - w_old`` agrees to 1e-12 relative per element, plus 2 ulp of w for the final rounding of
``w + du`` (an update of 1e-5 |w| carries the rounding of w itself, 1e-16 |w|, which is 1e-11 of du).
About ten roundings per element (1e-16 each) and norms summed in a different order (1e-16 relative
each) put the true error near 1e-15: 1e-12 leaves three orders of headroom and still fails for any
wrong rule (the variants differ by 1e-3 or more). Where the source's update is exactly 0 (a tensor the
rule leaves alone), ours must leave w unchanged bit for bit; where the source's trust ratio is the
fallback 1, ours must be exactly 1.0.

All warnings are errors: the trust ratio promises that no 0/0 (or x/0) is ever evaluated.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
from fractions import Fraction

import numpy as np
import pytest

import backends
from ref_bert.optim import (ADAMW_PRESETS, ALBERT_EXCLUDE, LAMB_PRESETS, AdamW, Lamb, albert_schedule,
                            clip_factor, global_grad_norm, linear_warmup_decay, make_optimizer)
from ref_bert.optim import adamw as adamw_module
from ref_bert.optim import lamb as lamb_module
from ref_bert.optim.norms import sum_of_squares, total

pytestmark = pytest.mark.filterwarnings("error")

RTOL = 1e-12
NO_DECAY = ("LayerNorm", "layer_norm", "bias")     # the list the sources pass (see the defaults table)


# =============================================================================================
# The sources' defaults, one row per preset, each with its citation.
# =============================================================================================
# Fields: lr, betas, eps, weight_decay, bias correction ("none" / "moments" / "step_size"), the decay
# exclusion list, which tensors skip the trust ratio ("decay list", "none", or "wd == 0"), the weight
# norm clamp phi, the global clipping threshold, and the zero-norm ratio. ``lr=None`` where the source
# has no default rate (ref-bert's placeholder 1e-3 is then checked as such, and said to be one).
LAMB_SOURCE_DEFAULTS = {
    # google-research/albert optimization.py create_optimizer(optimizer="lamb"):
    #   LAMBOptimizer(weight_decay_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-6,
    #                 exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"])
    #   (grads, _) = tf.clip_by_global_norm(grads, clip_norm=1.0)
    # lamb_optimizer.py: u = m / (sqrt(v) + eps), no bias correction; exclude_from_layer_adaptation
    # None -> the decay list. lr: run_pretraining.py's learning_rate default / the paper's recipe,
    # 0.00176 (docs/reference.md §5).
    "albert": dict(lr=0.00176, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias="none",
                   decay_excluded=NO_DECAY, ratio_skipped="decay list", clamp=None, clip=1.0, zero_ratio=1.0),
    # tensorflow/addons tensorflow_addons/optimizers/lamb.py LAMB.__init__: learning_rate=0.001,
    # beta_1=0.9, beta_2=0.999, epsilon=1e-6, weight_decay=0.0, exclude_from_weight_decay=None,
    # exclude_from_layer_adaptation=None (-> the decay list); m_t_hat = m_t / (1 - beta_1_power) with
    # local_step = iterations + 1; no clipping.
    "tfa": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias="moments",
                decay_excluded=(), ratio_skipped="decay list", clamp=None, clip=None, zero_ratio=1.0),
    # NVIDIA DeepLearningExamples TensorFlow/LanguageModeling/BERT/optimization.py create_optimizer:
    #   LAMBOptimizer(weight_decay_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-6,
    #                 exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"])
    #   tf.clip_by_global_norm(grads, clip_norm=1.0); m_t_hat / (sqrt(v_t_hat) + eps); the ratio on
    #   every tensor (no layer-adaptation list). No default lr (docs/reference.md §4.2 gives wd only).
    "nvlamb": dict(lr=None, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias="moments",
                   decay_excluded=NO_DECAY, ratio_skipped="none", clamp=None, clip=1.0, zero_ratio=1.0),
    # NVIDIA/apex apex/optimizers/fused_lamb.py FusedLAMB.__init__: lr=1e-3, bias_correction=True,
    # betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, adam_w_mode=True, grad_averaging=True,
    # max_grad_norm=1.0, use_nvlamb=False; csrc/multi_tensor_lamb.cu: the ratio only where
    # use_nvlamb || decay != 0. The no-decay group: NVIDIA's BERT script builds it by name; ref-bert's
    # stand-in is the ALBERT list (presets.py; docs/reference.md §4.2).
    "apex": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias="moments",
                 decay_excluded=NO_DECAY, ratio_skipped="wd == 0", clamp=None, clip=1.0, zero_ratio=1.0),
    # jettify/pytorch-optimizer torch_optimizer/lamb.py Lamb.__init__: lr=1e-3, betas=(0.9, 0.999),
    # eps=1e-6, weight_decay=0, clamp_value=10, adam=False, debias=False (checked below against the
    # installed signature too); weight_norm = norm(p).clamp(0, clamp_value).
    "torch_optimizer": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias="none",
                            decay_excluded=(), ratio_skipped="none", clamp=(0.0, 10.0), clip=None,
                            zero_ratio=1.0),
    # deepmind/optax optax.lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0,
    # weight_decay=0.0, mask=None) = scale_by_adam (bias-corrected) -> add_decayed_weights(mask) ->
    # scale_by_trust_ratio (every tensor) -> scale by -lr (checked against the installed signature).
    # learning_rate has no default.
    "optax": dict(lr=None, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias="moments",
                  decay_excluded=(), ratio_skipped="none", clamp=None, clip=None, zero_ratio=1.0),
}
PLACEHOLDER_LR = 1e-3   # presets.py: "The script has no default lr; 1e-3 is a placeholder."

ADAMW_SOURCE_DEFAULTS = {
    # torch.optim.AdamW.__init__: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, bias
    # correction always on; no exclusions (parameter groups) and no clipping in the optimiser.
    "torch": dict(lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, bias_correction=True,
                  decay_excluded=(), clip=None),
    # google-research/bert (and albert) optimization.py create_optimizer:
    #   AdamWeightDecayOptimizer(weight_decay_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-6,
    #                            exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"])
    #   update = next_m / (sqrt(next_v) + epsilon): no bias correction; clip_by_global_norm(1.0).
    # lr 1e-4: Devlin et al. 2019 (BERT), appendix A.2, the pretraining rate.
    "bert": dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=False,
                 decay_excluded=NO_DECAY, clip=1.0),
}

def _tiny_params():
    return {"enc.query.weight": np.ones((2, 2)), "enc.query.bias": np.zeros(2),
            "enc.layer_norm.weight": np.ones(2), "pooler.weight": np.ones((2, 2))}


@pytest.mark.parametrize("preset", list(LAMB_SOURCE_DEFAULTS))
def test_preset_defaults_lamb(preset):
    """Every LAMB preset's hyperparameters, as the constructed optimiser holds them, against the table
    row written from its source (exact: the values are decimal literals on both sides)."""
    assert set(LAMB_PRESETS) == set(LAMB_SOURCE_DEFAULTS), "a preset without a source row (or the reverse)"
    src = LAMB_SOURCE_DEFAULTS[preset]
    params = _tiny_params()
    opt = Lamb.from_preset(preset, params)
    assert opt.lr == (PLACEHOLDER_LR if src["lr"] is None else src["lr"])
    assert opt.betas == src["betas"]
    assert opt.eps == src["eps"]
    assert opt.weight_decay == src["weight_decay"]
    assert opt.bias_correction == src["bias"]
    assert opt.weight_decay_mode == "inside_ratio"          # every source: u + wd w, then the ratio
    assert opt.weight_norm_clamp == src["clamp"]
    assert opt.zero_norm_ratio == src["zero_ratio"]
    assert tuple(opt.exclude_from_weight_decay) == src["decay_excluded"]
    assert opt.max_grad_norm == src["clip"]
    # Which tensors skip the ratio, in the source's own terms, on names that probe each rule.
    expected_skip = {
        "decay list": lambda n: any(re.search(p, n) for p in src["decay_excluded"]),
        "none": lambda n: False,
        "wd == 0": lambda n: any(re.search(p, n) for p in src["decay_excluded"]) or src["weight_decay"] == 0,
    }[src["ratio_skipped"]]
    assert opt.layer_adaptation == {n: not expected_skip(n) for n in params}
    expected_decay = {n: 0.0 if any(re.search(p, n) for p in src["decay_excluded"]) else src["weight_decay"]
                      for n in params}
    assert opt.tensor_weight_decay == expected_decay
    # The saved hyperparameters say the same (the state a resumed run is checked against).
    hyper = opt.state_dict()["hyper"]
    assert hyper["betas"] == list(src["betas"]) and hyper["eps"] == src["eps"]
    assert hyper["max_grad_norm"] == src["clip"] and hyper["zero_norm_ratio"] == src["zero_ratio"]


@pytest.mark.parametrize("preset", list(LAMB_SOURCE_DEFAULTS))
def test_preset_hyperparameters_saved_in_the_state(preset):
    """The hyperparameters a checkpoint records (state_dict()["hyper"], compared on resume) are the
    source row, every key, in JSON types (lists for tuples)."""
    src = LAMB_SOURCE_DEFAULTS[preset]
    decay_list = list(src["decay_excluded"])
    expected = dict(
        optimizer="Lamb", lr=PLACEHOLDER_LR if src["lr"] is None else src["lr"], betas=list(src["betas"]),
        eps=src["eps"], weight_decay=src["weight_decay"], bias_correction=src["bias"],
        weight_decay_mode="inside_ratio", weight_norm_clamp=None if src["clamp"] is None else list(src["clamp"]),
        zero_norm_ratio=src["zero_ratio"], exclude_from_weight_decay=decay_list,
        exclude_from_layer_adaptation=decay_list if src["ratio_skipped"] == "decay list" else [],
        adapt_only_decayed=src["ratio_skipped"] == "wd == 0", max_grad_norm=src["clip"])
    assert Lamb.from_preset(preset, _tiny_params()).state_dict()["hyper"] == expected
    if preset == "albert":
        for name in ADAMW_SOURCE_DEFAULTS:
            a = ADAMW_SOURCE_DEFAULTS[name]
            assert AdamW.from_preset(name, _tiny_params()).state_dict()["hyper"] == dict(
                optimizer="AdamW", lr=a["lr"], betas=list(a["betas"]), eps=a["eps"], weight_decay=a["weight_decay"],
                bias_correction=a["bias_correction"], exclude_from_weight_decay=list(a["decay_excluded"]),
                max_grad_norm=a["clip"])


@pytest.mark.parametrize("preset", list(ADAMW_SOURCE_DEFAULTS))
def test_preset_defaults_adamw(preset):
    assert set(ADAMW_PRESETS) == set(ADAMW_SOURCE_DEFAULTS)
    src = ADAMW_SOURCE_DEFAULTS[preset]
    params = _tiny_params()
    opt = AdamW.from_preset(preset, params)
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay) == (src["lr"], src["betas"], src["eps"], src["weight_decay"])
    assert opt.bias_correction is src["bias_correction"]
    assert tuple(opt.exclude_from_weight_decay) == src["decay_excluded"]
    assert opt.max_grad_norm == src["clip"]
    assert opt.tensor_weight_decay == {
        n: 0.0 if any(re.search(p, n) for p in src["decay_excluded"]) else src["weight_decay"] for n in params}


def test_make_optimizer_default_names_are_the_source_presets():
    # "lamb" is ALBERT's LAMB with its own lr (no override), "adamw" torch's AdamW.
    lamb_opt, adamw_opt = make_optimizer("lamb", _tiny_params()), make_optimizer("adamw", _tiny_params())
    assert lamb_opt.lr == 0.00176 and lamb_opt.bias_correction == "none" and lamb_opt.max_grad_norm == 1.0
    assert adamw_opt.lr == 0.001 and adamw_opt.eps == 1e-8 and adamw_opt.bias_correction is True
    assert ALBERT_EXCLUDE == NO_DECAY


def _installed_defaults(package, relative_path, function, cls=None):
    """The default arguments of ``[cls.]function`` as the installed source file of ``package`` writes
    them (read with ``ast``, without importing the package: torch and JAX take seconds to import)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    path = os.path.join(spec.submodule_search_locations[0], relative_path)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    scope = tree
    if cls is not None:
        scope = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    node = next(n for n in ast.walk(scope) if isinstance(n, ast.FunctionDef) and n.name == function)
    positional = [a.arg for a in node.args.posonlyargs + node.args.args]
    defaults = dict(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
    defaults.update({a.arg: d for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None})
    return {name: ast.literal_eval(value) for name, value in defaults.items()}


def test_make_optimizer_every_name_is_its_source_preset():
    """Every name ``ref-bert pretrain --optimizer`` accepts builds its preset (checked by the source
    table's eps, bias correction and clipping), with its own lr or the one given."""
    from ref_bert.optim import OPTIMIZERS
    for name in OPTIMIZERS:
        preset = {"lamb": "albert", "adamw": "torch"}.get(name, name.removeprefix("adamw-"))
        is_adamw = name.startswith("adamw")
        src = (ADAMW_SOURCE_DEFAULTS if is_adamw else LAMB_SOURCE_DEFAULTS)[preset]
        for lr in (None, 0.02):
            opt = make_optimizer(name, _tiny_params(), lr=lr)
            assert type(opt) is (AdamW if is_adamw else Lamb), name
            assert (opt.eps, opt.max_grad_norm) == (src["eps"], src["clip"]), name
            expected_lr = lr if lr is not None else (src["lr"] if src["lr"] is not None else PLACEHOLDER_LR)
            assert opt.lr == expected_lr, (name, lr)
            if is_adamw:
                assert opt.bias_correction is src["bias_correction"], name
            else:
                assert opt.bias_correction == src["bias"] and opt.weight_norm_clamp == src["clamp"], name


def test_preset_defaults_against_installed_sources():
    """Where the source is installed, its own file's defaults are the reference (exact)."""
    d = _installed_defaults("torch_optimizer", "lamb.py", "__init__", cls="Lamb")
    to = LAMB_PRESETS["torch_optimizer"]
    assert (to["lr"], tuple(to["betas"]), to["eps"], to["weight_decay"]) == (
        d["lr"], tuple(d["betas"]), d["eps"], d["weight_decay"])
    assert to["weight_norm_clamp"] == d["clamp_value"] == 10
    assert d["debias"] is False and to["bias_correction"] == "none"      # debias=False: no correction
    assert d["adam"] is False                                           # the trust ratio is on
    d = _installed_defaults("optax", "_src/alias.py", "lamb")
    ox = LAMB_PRESETS["optax"]
    assert (tuple(ox["betas"]), ox["eps"], ox["weight_decay"]) == ((d["b1"], d["b2"]), d["eps"], d["weight_decay"])
    assert d["eps_root"] == 0.0 and d["mask"] is None
    assert "learning_rate" not in d                                     # no default rate: a placeholder
    # optax.lamb calls scale_by_trust_ratio() with its defaults: what ratio_optax below assumes.
    assert _installed_defaults("optax", "_src/transform.py", "scale_by_trust_ratio") == dict(
        min_norm=0.0, trust_coefficient=1.0, eps=0.0)
    d = _installed_defaults("torch", "optim/adamw.py", "__init__", cls="AdamW")
    tw = ADAMW_PRESETS["torch"]
    assert (tw["lr"], tuple(tw["betas"]), tw["eps"], tw["weight_decay"]) == (
        d["lr"], tuple(d["betas"]), d["eps"], d["weight_decay"])
    assert d["amsgrad"] is False


# =============================================================================================
# The zero-norm rule, as each source writes it (w_norm, u_norm: host floats, norms >= 0)
# =============================================================================================
def ratio_tf(w_norm, u_norm):
    """google-research/albert lamb_optimizer.py, tensorflow_addons optimizers/lamb.py and NVIDIA's
    TensorFlow BERT optimization.py (LAMBOptimizer), the same lines:
        ratio = tf.where(tf.greater(w_norm, 0),
                         tf.where(tf.greater(g_norm, 0), (w_norm / g_norm), 1.0), 1.0)"""
    if w_norm > 0:
        return w_norm / u_norm if u_norm > 0 else 1.0
    return 1.0


def ratio_apex(w_norm, u_norm):
    """NVIDIA/apex csrc/multi_tensor_lamb.cu, LAMBStage2Functor (without the lr factor):
        ratio = (update_norm != 0.0f && param_norm != 0.0f) ? lr * (param_norm / update_norm) : lr;"""
    return w_norm / u_norm if (u_norm != 0.0 and w_norm != 0.0) else 1.0


def ratio_torch_optimizer(w_norm, u_norm, clamp_value=10.0):
    """jettify/pytorch-optimizer torch_optimizer/lamb.py:
        weight_norm = torch.norm(p.data).clamp(0, self.clamp_value)
        if weight_norm == 0 or adam_norm == 0: trust_ratio = 1
        else: trust_ratio = weight_norm / adam_norm"""
    weight_norm = min(max(w_norm, 0.0), clamp_value)
    if weight_norm == 0 or u_norm == 0:
        return 1.0
    return weight_norm / u_norm


def ratio_optax(w_norm, u_norm):
    """deepmind/optax scale_by_trust_ratio (min_norm=0.0, trust_coefficient=1.0, eps=0.0):
        trust_ratio = trust_coefficient * param_norm / (update_norm + eps)
        zero_norm = jnp.logical_or(param_norm == 0., update_norm == 0.)
        safe_trust_ratio = jnp.where(zero_norm, 1.0, trust_ratio)"""
    if w_norm == 0.0 or u_norm == 0.0:
        return 1.0
    return 1.0 * w_norm / (u_norm + 0.0)


SOURCE_RATIO = {"albert": ratio_tf, "tfa": ratio_tf, "nvlamb": ratio_tf, "apex": ratio_apex,
                "torch_optimizer": ratio_torch_optimizer, "optax": ratio_optax}

# Sums of squares probing the condition: 0, a tiny positive (norm 1e-150, squared still a normal
# float), below 1 (norm 0.5: a condition "norm > 1" would be wrong here), 4 and 400 (norm 20 > 10,
# torch_optimizer's clamp).
SQUARES = (0.0, 1e-300, 0.25, 4.0, 400.0)


@pytest.mark.parametrize("preset", list(LAMB_PRESETS))
def test_trust_ratio_condition_and_value_per_source(preset):
    """ref_bert's trust_ratio with the preset's clamp, against the source's rule, on every pair of
    norms from {0, 1e-150, 0.5, 2, 20}: exactly equal (both take the same correctly rounded sqrt and
    one division, or the fallback 1). The fallback fires when *either* norm is 0 (and only then), in
    every source; the clamp acts before the test (torch_optimizer: phi(0) = 0 still falls back)."""
    rule = SOURCE_RATIO[preset]
    clamp = LAMB_PRESETS[preset].get("weight_norm_clamp")
    clamp_pair = None if clamp is None else (0.0, float(clamp))
    fallbacks = 0
    for w_sq in SQUARES:
        for u_sq in SQUARES:
            ours = lamb_module.trust_ratio(np.float64(w_sq), np.float64(u_sq), weight_norm_clamp=clamp_pair)
            expected = rule(math.sqrt(w_sq), math.sqrt(u_sq))
            assert np.ndim(ours) == 0
            assert float(ours) == expected, (preset, w_sq, u_sq, float(ours), expected)
            fallbacks += (w_sq == 0 or u_sq == 0)
    assert fallbacks == 9                                   # the grid does hit the fallback (both ways)
    # The clamp is real for torch_optimizer only: ||w|| = 20 -> 10 / ||u||.
    big = float(lamb_module.trust_ratio(np.float64(400.0), np.float64(4.0), weight_norm_clamp=clamp_pair))
    assert big == (5.0 if preset == "torch_optimizer" else 10.0)


def test_trust_ratio_fallback_value_is_the_argument():
    """zero_norm_ratio is the value the fallback returns (1 in every source; 0 would freeze a zero
    tensor), on each zero-norm case, and never where both norms are positive."""
    for w_sq, u_sq in ((0.0, 4.0), (4.0, 0.0), (0.0, 0.0)):
        for value in (1.0, 0.25, 0.0):
            assert float(lamb_module.trust_ratio(np.float64(w_sq), np.float64(u_sq), zero_norm_ratio=value)) == value
        assert float(lamb_module.trust_ratio(np.float64(w_sq), np.float64(u_sq))) == 1.0    # the default
    assert float(lamb_module.trust_ratio(np.float64(4.0), np.float64(0.25), zero_norm_ratio=0.25)) == 4.0
    # A lower clamp bound above 0 makes phi(0) > 0: no fallback for a zero weight (ref-bert's clamp
    # pair; the paper's phi), ratio lo / ||u||.
    assert float(lamb_module.trust_ratio(np.float64(0.0), np.float64(4.0), weight_norm_clamp=(0.5, 2.0))) == 0.25
    # float32 sums stay float32 (the ratio is a 0-d array of the parameters' dtype).
    r32 = lamb_module.trust_ratio(np.float32(0.0), np.float32(4.0))
    assert r32.dtype == np.float32 and float(r32) == 1.0


# =============================================================================================
# One step of each source, naive (Python floats over flat lists)
# =============================================================================================
def _norm(xs):
    return math.sqrt(sum(x * x for x in xs))


def _excluded(name, patterns):
    return any(re.search(p, name) is not None for p in patterns)


def clip_tf(grads, clip_norm):
    """tf.clip_by_global_norm: scale = clip_norm * min(1 / global_norm, 1 / clip_norm) (1/0 = inf)."""
    global_norm = math.sqrt(sum(x * x for g in grads.values() for x in g))
    inv = 1.0 / global_norm if global_norm > 0 else math.inf
    scale = clip_norm * min(inv, 1.0 / clip_norm)
    return {n: [x * scale for x in g] for n, g in grads.items()}


def clip_apex(grads, max_grad_norm):
    """apex multi_tensor_lamb.cu: clipped_global_grad_norm = global_grad_norm > max_global_grad_norm ?
    global_grad_norm / max_global_grad_norm : 1.0f;  scaled_grad = g / clipped_global_grad_norm."""
    global_norm = math.sqrt(sum(x * x for g in grads.values() for x in g))
    c = global_norm / max_grad_norm if global_norm > max_grad_norm else 1.0
    return {n: [x / c for x in g] for n, g in grads.items()}


def naive_lamb_step(source, w, g, m, v, t, lr, wd, debias=False, l2=False):
    """One step of ``source`` on flat lists (w, m, v modified in place; g not). Returns the trust ratio
    per tensor (None where the source applies none). The source's structure:

    albert:  clip_tf; m, v; u = m / (sqrt(v) + eps); u += wd w unless excluded; ratio_tf unless the
             name is in the (decay) list; w -= lr * ratio * u                     (lamb_optimizer.py)
    tfa:     m, v; u = m_hat / (sqrt(v_hat) + eps), t = iterations + 1; u += wd w unless excluded;
             ratio_tf unless excluded from adaptation (the decay list)                     (lamb.py)
    nvlamb:  clip_tf; as tfa but the ratio on every tensor                             (optimization.py)
    apex:    clip_apex; m = b1 m + (1 - b1) g (grad_averaging); r = m_hat / (sqrt(v_hat) + eps)
             + decay w; ratio_apex only where decay != 0 (use_nvlamb=False)  (multi_tensor_lamb.cu)
             ``l2``: adam_w_mode=False (MOMENT_MODE_0): g += decay w after clipping, r without decay
    torch_optimizer: step_size = lr (debias: lr sqrt(1 - b2^t) / (1 - b1^t)); adam_step =
             m / (sqrt(v) + eps); + wd p if wd != 0; ratio_torch_optimizer; p -= step_size ratio step
    optax:   scale_by_adam (bias-corrected) -> + wd p -> trust ratio (every tensor) -> * -lr
    """
    src = LAMB_SOURCE_DEFAULTS[source]
    b1, b2 = src["betas"]
    eps = src["eps"]
    if src["clip"] is not None:
        g = (clip_apex if source == "apex" else clip_tf)(g, src["clip"])
    ratios = {}
    for name in w:
        decay = 0.0 if _excluded(name, src["decay_excluded"]) else wd
        grad = [gi + decay * wi for gi, wi in zip(g[name], w[name])] if l2 else g[name]
        for i, gi in enumerate(grad):
            m[name][i] = b1 * m[name][i] + (1.0 - b1) * gi
            v[name][i] = b2 * v[name][i] + (1.0 - b2) * gi * gi
        if src["bias"] == "moments":
            u = [(mi / (1.0 - b1 ** t)) / (math.sqrt(vi / (1.0 - b2 ** t)) + eps) for mi, vi in zip(m[name], v[name])]
        else:
            u = [mi / (math.sqrt(vi) + eps) for mi, vi in zip(m[name], v[name])]
        if not l2:
            u = [ui + decay * wi for ui, wi in zip(u, w[name])]
        if src["ratio_skipped"] == "decay list" and _excluded(name, src["decay_excluded"]):
            ratio = None
        elif src["ratio_skipped"] == "wd == 0" and decay == 0.0:
            ratio = None
        else:
            ratio = SOURCE_RATIO[source](_norm(w[name]), _norm(u))
        step_size = lr
        if debias:
            step_size = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        ratios[name] = ratio
        w[name] = [wi - step_size * (1.0 if ratio is None else ratio) * ui for wi, ui in zip(w[name], u)]
    return ratios


# The mix: every edge in one optimiser, on one step. Names pick the exclusion rules (LayerNorm, bias).
MIX_SHAPES = {
    "emb.zero.weight": (3, 4),        # w = 0, g != 0: ||w|| = 0 -> fallback; the tensor must move
    "enc.still.weight": (2, 3),       # w != 0, g = 0, m = v = 0: u = wd w (decayed) or u = 0 (a zero update)
    "enc.dead.weight": (4,),          # w = 0, g = 0: both norms 0, nothing moves
    "enc.small.weight": (1,),         # 0 < ||w|| < 1 and 0 < ||u|| < 1: a real ratio, not the fallback
    "pooler.big.weight": (5, 5),      # ||w|| ~ 20 > 10 (torch_optimizer's clamp); its first 7 entries 0
    "enc.layer_norm.weight": (4,),    # excluded by name (LayerNorm); w != 0, g = 0
    "enc.query.bias": (4,),           # a zero bias with a gradient: excluded by name, must move
    "enc.out.bias": (3,),             # a zero bias without a gradient
    "sop.weight": (3, 2),             # an ordinary tensor
}


def mix_params():
    rng = np.random.default_rng(11)
    p = {n: np.zeros(s) for n, s in MIX_SHAPES.items()}
    p["enc.still.weight"][...] = rng.standard_normal((2, 3))
    p["enc.small.weight"][...] = 0.3
    p["pooler.big.weight"][...] = 4.0 * rng.standard_normal((5, 5))
    p["pooler.big.weight"].reshape(-1)[:7] = 0.0
    p["enc.layer_norm.weight"][...] = 1.0 + 0.1 * rng.standard_normal(4)
    p["sop.weight"][...] = 0.5 * rng.standard_normal((3, 2))
    return p


def mix_grads():
    """Three steps: (1) the mix; (2) every gradient 0 (moments carry on, the global norm is 0);
    (3) the mix again with the zero tensor's and the ordinary tensor's gradients 0. Global norms
    about 2.3, 0 and 2.2: clipping at 1.0 active, idle at 0, active."""
    rng = np.random.default_rng(12)
    g1 = {n: np.zeros(s) for n, s in MIX_SHAPES.items()}
    g1["emb.zero.weight"][...] = 0.5 * rng.standard_normal((3, 4))
    g1["enc.small.weight"][...] = 1e-6                  # |g| ~ eps: |u| < 1
    g1["pooler.big.weight"][...] = 0.3 * rng.standard_normal((5, 5))
    g1["enc.query.bias"][...] = 0.2 * rng.standard_normal(4)
    g1["sop.weight"][...] = 0.4 * rng.standard_normal((3, 2))
    g2 = {n: np.zeros(s) for n, s in MIX_SHAPES.items()}
    g3 = {n: g.copy() for n, g in g1.items()}
    g3["emb.zero.weight"][...] = 0.0
    g3["sop.weight"][...] = 0.0
    g3["enc.still.weight"][...] = 0.3 * rng.standard_normal((2, 3))
    return [g1, g2, g3]


def _flat(d):
    return {n: a.ravel().tolist() for n, a in d.items()}


def assert_step_matches(name, w_old, w_new, w_ref, case):
    """w_new against the reference's w (flat lists): exact where the reference leaves w alone, else the
    update to RTOL plus 2 ulp of w (the module docstring)."""
    w_old, w_new, w_ref = (np.asarray(x, dtype=np.float64).ravel() for x in (w_old, w_new, w_ref))
    still = w_ref == w_old
    assert np.array_equal(w_new[still], w_old[still]), f"{case} {name}: moved where the source does not"
    du_ref, du_new = w_ref - w_old, w_new - w_old
    bound = RTOL * np.abs(du_ref) + 2 * np.spacing(np.abs(w_ref))
    bad = np.abs(du_new - du_ref) > bound
    assert not bad.any(), f"{case} {name}: update {du_new[bad]} expected {du_ref[bad]}"


def assert_ratio_matches(name, ours, ref, case):
    if ref is None or ref == 1.0:
        # Excluded from adaptation, or the fallback: exactly 1 in every source.
        assert float(ours) == 1.0, f"{case} {name}: ratio {float(ours)}, expected exactly 1"
    else:
        assert float(ours) == pytest.approx(ref, rel=RTOL, abs=0.0), f"{case} {name}"


@pytest.fixture(params=["whole", "pieces"])
def layout(request, monkeypatch):
    """Whole tensors, and the NumPy path large tensors take: pieces of 7 elements on 2 threads (the
    norms are sums over pieces; "pooler.big.weight" then has an all-zero first piece)."""
    if request.param == "pieces":
        monkeypatch.setattr(backends.get("numpy"), "piece_elements", 7)
        monkeypatch.setattr(backends.get("numpy"), "threads", 2)
    return request.param


# (preset, overrides of ours, the source's weight decay and debias)
LAMB_EDGE_CASES = {
    "albert": ("albert", {}, dict(wd=0.01)),
    "tfa": ("tfa", {}, dict(wd=0.0)),
    "tfa-decay": ("tfa", {"weight_decay": 0.01}, dict(wd=0.01)),
    "nvlamb": ("nvlamb", {}, dict(wd=0.01)),
    "apex": ("apex", {}, dict(wd=0.01)),
    "apex-no-decay": ("apex", {"weight_decay": 0.0}, dict(wd=0.0)),     # no ratio anywhere: plain Adam
    "apex-l2": ("apex", {"weight_decay_mode": "l2"}, dict(wd=0.01, l2=True)),   # adam_w_mode=False
    "torch_optimizer": ("torch_optimizer", {}, dict(wd=0.0)),
    "torch_optimizer-decay-debias": ("torch_optimizer", {"weight_decay": 0.01, "bias_correction": "step_size"},
                                     dict(wd=0.01, debias=True)),
    "optax": ("optax", {}, dict(wd=0.0)),
    "optax-decay": ("optax", {"weight_decay": 0.01}, dict(wd=0.01)),
}
LR = 0.05


@pytest.mark.parametrize("case", list(LAMB_EDGE_CASES))
def test_lamb_edges_against_the_source(case, layout):
    """Three steps of the mix (zero tensors, zero gradients, zero updates, excluded names, a zero
    global norm), each preset against its source's naive step: weights per the module tolerance,
    trust ratios exactly 1 where the source falls back or skips the ratio, moments to 1e-13."""
    preset, overrides, source_args = LAMB_EDGE_CASES[case]
    params = mix_params()
    opt = Lamb.from_preset(preset, params, lr=LR, **overrides)
    w_ref = _flat(params)
    m_ref = _flat({n: np.zeros(s) for n, s in MIX_SHAPES.items()})
    v_ref = _flat({n: np.zeros(s) for n, s in MIX_SHAPES.items()})
    fallbacks = 0
    for t, grads in enumerate(mix_grads(), start=1):
        w_old = _flat(params)
        ratios_ref = naive_lamb_step(preset, w_ref, _flat(grads), m_ref, v_ref, t, LR, **source_args)
        opt.step(grads)
        for name in MIX_SHAPES:
            assert_step_matches(name, w_old[name], params[name], w_ref[name], f"{case} t={t}")
            assert_ratio_matches(name, opt.trust_ratios[name], ratios_ref[name], f"{case} t={t}")
            # Moments to 1e-13: two or three roundings, magnified where the L2 mode's g + wd w cancels.
            np.testing.assert_allclose(opt.exp_avg[name].ravel(), m_ref[name], rtol=1e-13, atol=0)
            np.testing.assert_allclose(opt.exp_avg_sq[name].ravel(), v_ref[name], rtol=1e-13, atol=0)
            fallbacks += ratios_ref[name] == 1.0
    # What the mix must exercise (or the test proves nothing about the edges):
    assert np.all(params["emb.zero.weight"] != 0), "the zero tensor must move (ratio 1, not 0)"
    assert np.all(params["enc.query.bias"] != 0)
    assert not params["enc.dead.weight"].any() and not params["enc.out.bias"].any()
    if LAMB_SOURCE_DEFAULTS[preset]["ratio_skipped"] != "wd == 0" or source_args["wd"]:
        assert fallbacks > 0


def test_lamb_zero_tensor_first_step_by_hand():
    """The smallest case, by hand for each preset (rtol 1e-15: a handful of float64 roundings): an
    all-zero, adapted tensor with gradient g moves by exactly -lr * u on step 1 (ratio 1), u being
    g / (|g| + eps) with bias-corrected moments, and 0.1 g / (sqrt(0.001) |g| + eps) without."""
    g = np.array([0.5, -2.0, 0.25])
    for preset in LAMB_PRESETS:
        params = {"sop.weight": np.zeros(3)}
        opt = Lamb.from_preset(preset, params, lr=0.1, max_grad_norm=None)
        opt.step({"sop.weight": g.copy()})
        if LAMB_PRESETS[preset]["bias_correction"] == "moments":
            u = g / (np.abs(g) + 1e-6)
        else:
            u = 0.1 * g / (math.sqrt(0.001) * np.abs(g) + 1e-6)
        assert opt.layer_adaptation["sop.weight"]
        assert float(opt.trust_ratios["sop.weight"]) == 1.0
        np.testing.assert_allclose(params["sop.weight"], -0.1 * u, rtol=1e-15, err_msg=preset)


@pytest.mark.parametrize("preset", ["torch_optimizer", "torch_optimizer-debias"])
def test_lamb_edges_against_torch_optimizer(preset, layout):
    """The mix through jettify torch_optimizer.Lamb itself (float64), weight decay 0.01, debias off and on."""
    torch = pytest.importorskip("torch")
    torch_optimizer = pytest.importorskip("torch_optimizer")
    debias = preset.endswith("debias")
    tparams = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in mix_params().items()}
    ref = torch_optimizer.Lamb(list(tparams.values()), lr=LR, weight_decay=0.01, debias=debias)
    params = mix_params()
    opt = Lamb.from_preset("torch_optimizer", params, lr=LR, weight_decay=0.01,
                           bias_correction="step_size" if debias else "none")
    for t, grads in enumerate(mix_grads(), start=1):
        w_old = _flat(params)
        for n, p in tparams.items():
            p.grad = torch.from_numpy(grads[n].copy())
        ref.step()
        opt.step(grads)
        for n, p in tparams.items():
            assert_step_matches(n, w_old[n], params[n], p.detach().numpy(), f"{preset} t={t}")
    assert float(ref.state[tparams["pooler.big.weight"]]["weight_norm"]) == 10.0     # the clamp was active


def test_zero_norm_ratio_override_reaches_every_fallback():
    """zero_norm_ratio=0.25 (not a source's value: a probe that the argument is used): the zero tensor
    moves by 0.25 lr u, a zero-update tensor reports 0.25, an adapted ordinary tensor its real ratio."""
    params = mix_params()
    opt = Lamb.from_preset("nvlamb", params, lr=LR, zero_norm_ratio=0.25, max_grad_norm=None)
    grads = mix_grads()[0]
    opt.step(grads)
    g = grads["emb.zero.weight"]
    u = g / (np.abs(g) + 1e-6)                  # t = 1, bias-corrected; wd w = 0 for a zero tensor
    np.testing.assert_allclose(params["emb.zero.weight"], -LR * 0.25 * u, rtol=1e-15)
    assert float(opt.trust_ratios["emb.zero.weight"]) == 0.25
    assert float(opt.trust_ratios["enc.dead.weight"]) == 0.25
    assert float(opt.trust_ratios["enc.out.bias"]) == 0.25        # nvlamb adapts the bias too
    assert float(opt.trust_ratios["sop.weight"]) not in (0.25, 1.0)
    # zero_norm_ratio also travels through the state's hyperparameters.
    assert opt.state_dict()["hyper"]["zero_norm_ratio"] == 0.25


def test_lamb_update_returns_the_fallback():
    """lamb_update (the one-tensor form) on the three zero cases: ratio 1, w exactly as the formula."""
    for w0, g, expect_move in ((np.zeros(3), np.array([1.0, -1.0, 2.0]), True),      # ||w|| = 0
                               (np.array([1.0, 2.0, 2.0]), np.zeros(3), False),     # ||u|| = 0 (wd 0)
                               (np.zeros(3), np.zeros(3), False)):                  # both
        w, m, v = w0.copy(), np.zeros(3), np.zeros(3)
        ratio = lamb_module.lamb_update(w, g, m, v, lr=0.1, t=1, wd=0.0)
        assert float(ratio) == 1.0
        expected = w0 - 0.1 * g / (np.abs(g) + 1e-6)
        np.testing.assert_allclose(w, expected, rtol=1e-15, atol=0)
        assert (not np.array_equal(w, w0)) == expect_move
        w = w0.copy()
        assert float(lamb_module.lamb_update(w, g, np.zeros(3), np.zeros(3), lr=0.1, t=1, zero_norm_ratio=0.5)) == 0.5
    # ||w|| > 0 and ||u|| > 0: the ratio itself, ||w|| / ||u|| = 3 / (sqrt(3) * (1 / (1 + 1e-6))).
    w = np.array([1.0, 2.0, 2.0])
    ratio = lamb_module.lamb_update(w, np.ones(3), np.zeros(3), np.zeros(3), lr=0.1, t=1, wd=0.0)
    assert float(ratio) == pytest.approx(3.0 / (math.sqrt(3.0) / (1.0 + 1e-6)), rel=1e-15)
    assert lamb_module.lamb_update(w, np.ones(3), np.zeros(3), np.zeros(3), lr=0.1, t=1, adapt=False) == 1.0


def test_lamb_update_decay_modes_by_hand():
    """lamb_update with its default mode and the other two, on w = (3, 4) (norm 5) with a zero
    gradient and zero moments, wd 0.1, lr 0.1, t = 1 (rtol 1e-15: a few float64 roundings):
    inside the ratio (the default): u = wd w = (0.3, 0.4), ratio 5 / 0.5 = 10, w - lr * 10 * u;
    outside: u = 0, ratio 1 (the fallback), w - lr wd w; l2: g = wd w, m_hat = g, v_hat = g^2,
    u = g / (|g| + eps), ratio ||w|| / ||u||."""
    def run(**kwargs):
        w = np.array([3.0, 4.0])
        ratio = lamb_module.lamb_update(w, np.zeros(2), np.zeros(2), np.zeros(2), lr=0.1, t=1, wd=0.1, **kwargs)
        return w, float(ratio)

    w, ratio = run()
    assert ratio == pytest.approx(10.0, rel=1e-15)
    np.testing.assert_allclose(w, [3.0 - 0.1 * 10 * 0.3, 4.0 - 0.1 * 10 * 0.4], rtol=1e-15)
    w, ratio = run(weight_decay_mode="outside_ratio")
    assert ratio == 1.0
    np.testing.assert_allclose(w, [3.0 * (1 - 0.01), 4.0 * (1 - 0.01)], rtol=1e-15)
    w, ratio = run(weight_decay_mode="l2")
    g = np.array([0.3, 0.4])
    u = g / (g + 1e-6)
    assert ratio == pytest.approx(5.0 / math.sqrt(float(u @ u)), rel=1e-15)
    np.testing.assert_allclose(w, np.array([3.0, 4.0]) - 0.1 * ratio * u, rtol=1e-15)
    w, ratio = run(weight_decay_mode="inside_ratio", bias_correction="none")
    assert ratio == pytest.approx(10.0, rel=1e-15)                     # u = wd w whatever the correction
    w, ratio = run(weight_norm_clamp=(0.0, 2.0))                       # phi(5) = 2: ratio 2 / 0.5
    assert ratio == pytest.approx(4.0, rel=1e-15)
    np.testing.assert_allclose(w, [3.0 - 0.1 * 4 * 0.3, 4.0 - 0.1 * 4 * 0.4], rtol=1e-15)
    # Outside the ratio with a gradient: w - lr ratio u - lr wd w, u = g / (|g| + eps), ratio ||w|| / ||u||.
    w = np.array([3.0, 4.0])
    ratio = float(lamb_module.lamb_update(w, np.array([1.0, -1.0]), np.zeros(2), np.zeros(2), lr=0.1, t=1, wd=0.1,
                                          weight_decay_mode="outside_ratio"))
    u = np.array([1.0, -1.0]) / (1.0 + 1e-6)
    assert ratio == pytest.approx(5.0 / math.sqrt(float(u @ u)), rel=1e-15)
    np.testing.assert_allclose(w, [3.0 - 0.1 * ratio * u[0] - 0.01 * 3.0, 4.0 - 0.1 * ratio * u[1] - 0.01 * 4.0],
                               rtol=1e-15)
    # Lamb.step with the decay outside the ratio: a zero gradient with zero moments gives u = 0, ratio 1,
    # and w <- w - lr wd w; an excluded name keeps w.
    params = {"x.weight": np.array([3.0, 4.0]), "x.bias": np.array([1.0, 2.0])}
    Lamb(params, lr=0.1, weight_decay=0.1, weight_decay_mode="outside_ratio",
         exclude_from_weight_decay=["bias"]).step({"x.weight": np.zeros(2), "x.bias": np.zeros(2)})
    np.testing.assert_allclose(params["x.weight"], [3.0 * 0.99, 4.0 * 0.99], rtol=1e-15)
    assert np.array_equal(params["x.bias"], [1.0, 2.0])
    # The clip factor scales g before the moments: m = (1 - b1) * c * g.
    w, m, v = np.array([3.0, 4.0]), np.zeros(2), np.zeros(2)
    lamb_module.lamb_update(w, np.array([1.0, -2.0]), m, v, lr=0.1, t=1, clip=np.float64(0.5))
    np.testing.assert_allclose(m, [0.05, -0.1], rtol=1e-15)
    np.testing.assert_allclose(v, [0.001 * 0.25, 0.001 * 1.0], rtol=1e-15)


# =============================================================================================
# AdamW
# =============================================================================================
def naive_adamw_step(preset, w, g, m, v, t, lr):
    """torch: torch.optim.AdamW (_single_tensor_adamw): p *= 1 - lr wd; step_size = lr / bc1;
    denom = sqrt(v) / sqrt(bc2) + eps; p -= step_size m / denom.
    bert: google-research/bert optimization.py AdamWeightDecayOptimizer.apply_gradients after
    clip_by_global_norm(1.0): update = next_m / (sqrt(next_v) + eps); update += wd param unless the
    name is excluded; param -= lr update."""
    src = ADAMW_SOURCE_DEFAULTS[preset]
    b1, b2 = src["betas"]
    if src["clip"] is not None:
        g = clip_tf(g, src["clip"])
    for name in w:
        decay = 0.0 if _excluded(name, src["decay_excluded"]) else src["weight_decay"]
        for i, gi in enumerate(g[name]):
            m[name][i] = b1 * m[name][i] + (1.0 - b1) * gi
            v[name][i] = b2 * v[name][i] + (1.0 - b2) * gi * gi
        if preset == "torch":
            bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
            w[name] = [wi * (1.0 - lr * decay) for wi in w[name]]
            w[name] = [wi - (lr / bc1) * mi / (math.sqrt(vi) / math.sqrt(bc2) + src["eps"])
                       for wi, mi, vi in zip(w[name], m[name], v[name])]
        else:
            w[name] = [wi - lr * (mi / (math.sqrt(vi) + src["eps"]) + decay * wi)
                       for wi, mi, vi in zip(w[name], m[name], v[name])]


@pytest.mark.parametrize("preset", list(ADAMW_PRESETS))
def test_adamw_edges_against_the_source(preset, layout):
    """The mix, three steps, each AdamW preset against its source's naive step (module tolerance).
    A zero gradient with zero moments gives r = 0 exactly: w changes only by the decay (torch: every
    tensor; bert: not LayerNorm/bias, which stay bit for bit)."""
    params = mix_params()
    opt = AdamW.from_preset(preset, params, lr=LR)
    w_ref = _flat(params)
    m_ref = _flat({n: np.zeros(s) for n, s in MIX_SHAPES.items()})
    v_ref = _flat({n: np.zeros(s) for n, s in MIX_SHAPES.items()})
    for t, grads in enumerate(mix_grads(), start=1):
        w_old = _flat(params)
        naive_adamw_step(preset, w_ref, _flat(grads), m_ref, v_ref, t, LR)
        opt.step(grads)
        for name in MIX_SHAPES:
            assert_step_matches(name, w_old[name], params[name], w_ref[name], f"{preset} t={t}")
            np.testing.assert_allclose(opt.exp_avg[name].ravel(), m_ref[name], rtol=1e-15, atol=0)
    assert np.all(params["emb.zero.weight"] != 0) and not params["enc.dead.weight"].any()
    ln = params["enc.layer_norm.weight"]
    assert np.array_equal(ln, mix_params()["enc.layer_norm.weight"]) == (preset == "bert")


def test_adamw_edges_against_torch():
    """The mix through torch.optim.AdamW itself (float64, foreach off), the "torch" preset."""
    torch = pytest.importorskip("torch")
    tparams = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in mix_params().items()}
    ref = torch.optim.AdamW(list(tparams.values()), lr=LR, foreach=False)
    params = mix_params()
    opt = AdamW.from_preset("torch", params, lr=LR)
    for t, grads in enumerate(mix_grads(), start=1):
        w_old = _flat(params)
        for n, p in tparams.items():
            p.grad = torch.from_numpy(grads[n].copy())
        ref.step()
        opt.step(grads)
        for n, p in tparams.items():
            assert_step_matches(n, w_old[n], params[n], p.detach().numpy(), f"torch t={t}")


def test_adamw_zero_gradient_is_pure_decay_by_hand():
    """g = 0 with m = v = 0: r = 0 / (0 + eps) = 0, so w <- w - lr wd w (rtol 1e-15), on t = 1 and 2,
    with bias correction on and off; excluded names and wd 0 leave w bit for bit."""
    for bias_correction in (True, False):
        w0 = np.array([1.5, -2.0, 0.0])
        params = {"a.weight": w0.copy(), "a.bias": w0.copy()}
        opt = AdamW(params, lr=0.1, weight_decay=0.2, bias_correction=bias_correction,
                    exclude_from_weight_decay=["bias"])
        zeros = {"a.weight": np.zeros(3), "a.bias": np.zeros(3)}
        opt.step(zeros)
        np.testing.assert_allclose(params["a.weight"], w0 * (1 - 0.1 * 0.2), rtol=1e-15, atol=0)
        opt.step(zeros)
        np.testing.assert_allclose(params["a.weight"], w0 * (1 - 0.1 * 0.2) ** 2, rtol=1e-15, atol=0)
        assert np.array_equal(params["a.bias"], w0)
        assert not opt.exp_avg["a.weight"].any() and not opt.exp_avg_sq["a.weight"].any()


def test_adamw_update_defaults_by_hand():
    """adamw_update's defaults: torch.optim.AdamW's betas (0.9, 0.999), eps 1e-8 and bias correction,
    and no decay (wd 0, the signature's); two steps by hand in Python floats (rtol 1e-14: a dozen
    roundings). Step 2's bias corrections 1 - 0.9^2 and 1 - 0.999^2 check the betas themselves."""
    w0, g1, g2 = [1.0, -2.0], [0.5, 0.25], [-1.0, 0.5]
    w, m, v = np.array(w0), np.zeros(2), np.zeros(2)
    adamw_module.adamw_update(w, np.array(g1), m, v, lr=0.1, t=1)
    adamw_module.adamw_update(w, np.array(g2), m, v, lr=0.1, t=2)
    expected = []
    for wi, a, b in zip(w0, g1, g2):
        mi, vi = 0.1 * a, 0.001 * a * a
        wi -= 0.1 * (mi / 0.1) / (math.sqrt(vi / 0.001) + 1e-8)
        mi, vi = 0.9 * mi + 0.1 * b, 0.999 * vi + 0.001 * b * b
        wi -= 0.1 * (mi / (1 - 0.9 ** 2)) / (math.sqrt(vi / (1 - 0.999 ** 2)) + 1e-8)
        expected.append(wi)
    np.testing.assert_allclose(w, expected, rtol=1e-14)


def test_adamw_step_uses_its_own_betas():
    """AdamW.step passes the optimiser's betas (not adamw_update's defaults): without bias correction
    one step is w - lr (1 - b1) g / (sqrt(1 - b2) |g| + eps), here b = (0.5, 0.75) (rtol 1e-15)."""
    params = {"a.weight": np.array([1.0, -1.0])}
    opt = AdamW(params, lr=0.1, betas=(0.5, 0.75), eps=1e-8, weight_decay=0.0, bias_correction=False)
    opt.step({"a.weight": np.array([2.0, 2.0])})
    r = 0.5 * 2.0 / (math.sqrt(0.25 * 4.0) + 1e-8)
    np.testing.assert_allclose(params["a.weight"], [1.0 - 0.1 * r, -1.0 - 0.1 * r], rtol=1e-15)
    np.testing.assert_allclose(opt.exp_avg_sq["a.weight"], [1.0, 1.0], rtol=1e-15)


def test_adamw_update_uses_the_arrays_backend(monkeypatch):
    xp = _RecordingXp()
    asked = xp.asked

    other = type("OtherBackend", (), {"xp": xp, "fast": {}})()
    _route_other_arrays(monkeypatch, other)
    w = np.array([1.0, 2.0]).view(_OtherDeviceArray)
    adamw_module.adamw_update(w, np.ones(2), np.zeros(2), np.zeros(2), lr=0.1, t=1)
    assert asked == ["sqrt"]
    np.testing.assert_allclose(np.asarray(w), [1.0 - 0.1 / (1 + 1e-8), 2.0 - 0.1 / (1 + 1e-8)], rtol=1e-15)


# =============================================================================================
# The global gradient norm and the clip rule
# =============================================================================================
def _fsum_norm(arrays):
    return math.sqrt(math.fsum(float(x) * float(x) for a in arrays for x in np.ravel(a)))


@pytest.mark.parametrize("layout_name", ["whole", "pieces"])
def test_global_grad_norm_single_and_several(layout_name, monkeypatch):
    """Against sqrt(math.fsum(squares)) (exactly rounded sum): 1e-14 relative. NumPy's float64 sum of
    n positive terms errs by at most about n * 1.1e-16 (n <= 60 here: 7e-15), halved by the sqrt."""
    if layout_name == "pieces":
        monkeypatch.setattr(backends.get("numpy"), "piece_elements", 7)
        monkeypatch.setattr(backends.get("numpy"), "threads", 2)
    rng = np.random.default_rng(4)
    single = rng.standard_normal((6, 5))
    several = [rng.standard_normal((3, 4)), np.zeros(5), rng.standard_normal(1), 1e3 * rng.standard_normal((2, 7))]
    for grads in ([single], several, [several[2]]):
        norm = global_grad_norm(grads)
        assert np.ndim(norm) == 0 and isinstance(norm, np.ndarray | np.floating)
        assert float(norm) == pytest.approx(_fsum_norm(grads), rel=1e-14, abs=0.0)
        assert float(global_grad_norm(iter(grads))) == float(norm)            # any iterable: a generator
        assert float(global_grad_norm(grads, np)) == float(norm)              # xp given
    # Exact small cases: one tensor, one element; one 0-d tensor; a Pythagorean triple split in two.
    assert float(global_grad_norm([np.array([-3.0])])) == 3.0
    assert float(global_grad_norm([np.array(2.5)])) == 2.5
    assert float(global_grad_norm([np.zeros((4, 4))])) == 0.0
    assert float(global_grad_norm([np.array([3.0, 0.0]), np.array([[4.0]])])) == 5.0
    assert float(global_grad_norm([np.full(16, 0.5)])) == 2.0          # 16 * 0.25 = 4, over 3 pieces of 7
    # float32 stays float32.
    assert global_grad_norm([np.ones(3, dtype=np.float32)]).dtype == np.float32
    # A given xp is the one that takes the square root (the optimisers pass their backend's).
    calls = []

    class RecordingXp:
        def sqrt(self, x):
            calls.append(float(x))
            return np.sqrt(x)

    assert float(global_grad_norm([np.array([3.0, 4.0])], RecordingXp())) == 5.0 and calls == [25.0]
    _raises_exactly("global_grad_norm needs at least one gradient, got none", global_grad_norm, [])


def test_sum_of_squares_and_total():
    assert float(sum_of_squares(np.array([[1.0, -2.0], [2.0, 0.0]]))) == 9.0
    assert np.ndim(sum_of_squares(np.array([1.0]))) == 0
    assert total([np.float64(1.0)]) == 1.0                               # one value: itself
    assert total([1.0, 2.0, 4.0]) == 7.0


def test_clip_factor_at_exactly_the_threshold():
    """||G|| = 5 exactly (3-4-5). At max_norm = 5 the factor is exactly 1 in every source's form
    (TF: 5 * min(1/5, 1/5); apex: norm > max false -> 1); just below, max/norm; far above, 1."""
    norm = global_grad_norm([np.array([3.0]), np.array([4.0])])
    assert float(norm) == 5.0
    assert float(clip_factor(norm, 5.0, np)) == 1.0
    assert 5.0 * min(1.0 / 5.0, 1.0 / 5.0) == 1.0          # TF's clip_by_global_norm at the threshold
    below = math.nextafter(5.0, 0.0)
    assert float(clip_factor(norm, below, np)) == below / 5.0 < 1.0
    assert float(clip_factor(norm, 4.0, np)) == 0.8
    assert float(clip_factor(norm, 5.0000001, np)) == 1.0
    assert float(clip_factor(np.float64(0.0), 1.0, np)) == 1.0          # a zero gradient: no 0/0


@pytest.mark.parametrize("opt_cls", [Lamb, AdamW])
def test_clipping_at_the_threshold_in_the_optimiser(opt_cls):
    """At max_grad_norm == ||G|| the step is bit for bit the unclipped one; one ulp below the norm it
    differs (m = 0.1 g c, c < 1); an explicit grad_norm (a shard's) replaces the computed one."""
    def run(**kwargs):
        params = {"a.weight": np.array([1.0, 2.0]), "b.weight": np.array([[0.5]])}
        opt = opt_cls(params, lr=0.01, **kwargs)
        opt.step({"a.weight": np.array([3.0, 0.0]), "b.weight": np.array([[4.0]])})
        return params, opt

    unclipped, opt_none = run(max_grad_norm=None)
    at, opt_at = run(max_grad_norm=5.0)
    below, opt_below = run(max_grad_norm=math.nextafter(5.0, 0.0))
    for name in unclipped:
        assert np.array_equal(at[name], unclipped[name]), name
        assert np.array_equal(opt_at.exp_avg[name], opt_none.exp_avg[name])
    c = math.nextafter(5.0, 0.0) / 5.0
    np.testing.assert_allclose(opt_below.exp_avg["a.weight"], [0.1 * 3.0 * c, 0.0], rtol=1e-15, atol=0)
    assert not np.array_equal(opt_below.exp_avg["a.weight"], opt_none.exp_avg["a.weight"])
    # A sharded optimiser passes the global norm of all shards: 10 with max 5 halves the gradient.
    params = {"a.weight": np.array([1.0, 2.0]), "b.weight": np.array([[0.5]])}
    opt = opt_cls(params, lr=0.01, max_grad_norm=5.0)
    opt.step({"a.weight": np.array([3.0, 0.0]), "b.weight": np.array([[4.0]])}, grad_norm=np.float64(10.0))
    np.testing.assert_allclose(opt.exp_avg["b.weight"], [[0.1 * 4.0 * 0.5]], rtol=1e-15, atol=0)
    # Without max_grad_norm a given grad_norm is ignored (nothing is clipped).
    params = {"a.weight": np.array([1.0, 2.0]), "b.weight": np.array([[0.5]])}
    opt = opt_cls(params, lr=0.01, max_grad_norm=None)
    opt.step({"a.weight": np.array([3.0, 0.0]), "b.weight": np.array([[4.0]])}, grad_norm=np.float64(10.0))
    np.testing.assert_allclose(opt.exp_avg["b.weight"], [[0.1 * 4.0]], rtol=1e-15, atol=0)


# =============================================================================================
# Schedules at their edges: warmup of 0 or 1 step, decay of a single step
# =============================================================================================
def tf_albert_lr(step, init_lr, T, W, power=1):
    """google-research/albert optimization.py create_optimizer, in exact rationals:
        learning_rate = tf.train.polynomial_decay(init_lr, global_step, num_train_steps,
                                                  end_learning_rate=0.0, power=1.0, cycle=False)
          (polynomial_decay: step = min(global_step, decay_steps);
           (lr - end) * (1 - step / decay_steps) ** power + end)
        if num_warmup_steps:
          warmup_learning_rate = init_lr * global_step / num_warmup_steps
          is_warmup = float(global_step < num_warmup_steps)
          learning_rate = (1.0 - is_warmup) * learning_rate + is_warmup * warmup_learning_rate"""
    init_lr = Fraction(init_lr)
    s = min(step, T)
    lr = (init_lr - 0) * (1 - Fraction(s, T)) ** power + 0
    if W:
        warm = init_lr * Fraction(step, W)
        is_warmup = 1 if step < W else 0
        lr = (1 - is_warmup) * lr + is_warmup * warm
    return lr


def hf_linear_lr(step, init_lr, T, W):
    """transformers optimization.py get_linear_schedule_with_warmup, lr_lambda, times init_lr, exact:
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - current_step)
                   / float(max(1, num_training_steps - num_warmup_steps)))"""
    if step < W:
        return Fraction(init_lr) * Fraction(step, max(1, W))
    return Fraction(init_lr) * max(Fraction(0), Fraction(T - step, max(1, T - W)))


def _close(value, exact):
    """A Python float against the exact rational: within 2 ulp (a few correctly rounded operations:
    the division, the product with init_lr, and the power)."""
    return abs(Fraction(value) - exact) <= 2 * Fraction(math.ulp(float(exact))) and isinstance(value, float)


def test_albert_schedule_single_step_edges():
    """Every (T, W) with T in 1..4 and W in 0..T+1 (warmup 0 and 1, a one-step decay T = 1, warmup as
    long as or longer than training), every step 0..T+2, against the TF formula in rationals."""
    init_lr = 0.00176
    for T in range(1, 5):
        for W in range(0, T + 2):
            for step in range(0, T + 3):
                assert _close(albert_schedule(step, init_lr, T, W), tf_albert_lr(step, init_lr, T, W)), (T, W, step)
    # Spelled out: a one-step decay, and a one-step warmup (step 0 gives 0, then the step-0-based decay).
    assert [albert_schedule(s, 2.0, 1) for s in (0, 1, 2)] == [2.0, 0.0, 0.0]
    assert [albert_schedule(s, 2.0, 4, 1) for s in (0, 1, 2)] == [0.0, 1.5, 1.0]
    assert [albert_schedule(s, 2.0, 4, 0) for s in (0, 1)] == [2.0, 1.5]           # zero-step warmup
    assert albert_schedule(2, 2.0, 2, 2, power=2.0) == 0.0 and albert_schedule(1, 2.0, 2, 2, power=2.0) == 1.0
    assert albert_schedule(2, 2.0, 4, 1, power=2.0) == 0.5                           # 2 * (1/2)^2


def test_linear_warmup_decay_single_step_edges():
    """Every (T, W) with T in 1..4 and W in 0..T, every step 0..T+2, against Hugging Face's lr_lambda
    in rationals; then the one-step cases spelled out."""
    init_lr = 3e-4
    for T in range(1, 5):
        for W in range(0, T + 1):
            for step in range(0, T + 3):
                assert _close(linear_warmup_decay(step, init_lr, T, W), hf_linear_lr(step, init_lr, T, W)), (T, W, step)
    assert [linear_warmup_decay(s, 2.0, 1, 0) for s in (0, 1, 2)] == [2.0, 0.0, 0.0]     # decay of one step
    assert [linear_warmup_decay(s, 2.0, 3, 2) for s in (0, 1, 2, 3, 4)] == [0.0, 1.0, 2.0, 0.0, 0.0]
    assert [linear_warmup_decay(s, 2.0, 3, 1) for s in (0, 1, 2, 3)] == [0.0, 2.0, 1.0, 0.0]  # warmup of one
    assert [linear_warmup_decay(s, 2.0, 1, 1) for s in (0, 1, 2)] == [0.0, 0.0, 0.0]     # all warmup
    assert [linear_warmup_decay(s, 2.0, 2, 0) for s in (0, 1, 2)] == [2.0, 1.0, 0.0]     # zero-step warmup


# =============================================================================================
# Gradient accumulation (ref_bert/pretrain/accumulation.py): the loss path's weights
# =============================================================================================
def test_micro_batch_weights_are_exact_shares():
    """(n_i / N, b_i / B) against exact rationals (each a single correctly rounded division, so equal
    to the float nearest the fraction); no masks anywhere gives MLM weight 0 (the MLM loss is then 0)."""
    from ref_bert.pretrain.accumulation import micro_batch_weights
    for counts, sizes in (([3, 0, 7], [2, 1, 4]), ([5], [3]), ([1, 2], [1, 1]), ([0, 0], [2, 3])):
        weights = micro_batch_weights(counts, sizes)
        assert len(weights) == len(counts)
        for (mlm, sop), n, b in zip(weights, counts, sizes):
            expected_mlm = float(Fraction(n, sum(counts))) if sum(counts) else 0.0
            assert mlm == expected_mlm and sop == float(Fraction(b, sum(sizes)))
            assert isinstance(mlm, float) and isinstance(sop, float)
    assert micro_batch_weights([0, 0], [2, 3]) == [(0.0, 0.4), (0.0, 0.6)]
    assert micro_batch_weights([2, 6], [1, 3]) == [(0.25, 0.25), (0.75, 0.75)]


def _accumulation_case(dropout):
    from ref_bert import Config, Model
    config = Config.preset("tiny", vocab_size=40, num_hidden_layers=1, hidden_dropout_prob=dropout,
                           attention_probs_dropout_prob=dropout)
    rng = np.random.default_rng(21)
    B, T = 5, 7
    ids = rng.integers(4, 40, (B, T))
    labels = np.full((B, T), -100)
    for row, positions in enumerate(([1, 2, 5], [3], [], [1, 4], [2, 3, 4, 6])):   # mask counts 3, 1, 0, 2, 4
        labels[row, positions] = rng.integers(4, 40, len(positions))
    batch = dict(input_ids=ids, token_type_ids=(np.arange(T) >= 4).astype(np.int64)[None].repeat(B, 0),
                 attention_mask=np.ones((B, T), dtype=np.int64), mlm_labels=labels,
                 sop_labels=np.array([0, 1, 1, 0, 1]))
    return config, batch, (lambda seed=5: Model(config, dtype="float64", seed=seed))


@pytest.mark.parametrize("bounds", [[0, 5], [0, 2, 5], [0, 1, 3, 5]])
def test_accumulated_loss_and_gradient_with_a_sop_weight(bounds):
    """k = 1, 2, 3 micro-batches (uneven sizes and mask counts) with sop_weight 3 against one pass over
    the whole batch with loss_weights=(1, 3) (the loss's definition, docs in accumulation.py): grads to
    1e-12 of the largest entry, and "loss" = MLM + 3 SOP, "mlm", "sop" (unweighted) to 1e-12 relative
    (float64, the same sums in a different order, dropout off)."""
    from ref_bert.pretrain.accumulation import effective_batch_gradients
    _, batch, make_model = _accumulation_case(0.0)
    model = make_model()
    whole = model.loss_and_grads(**batch, loss_weights=(1.0, 3.0))
    micro = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds, bounds[1:])]
    counts = [int((m["mlm_labels"] != -100).sum()) for m in micro]
    grads, parts = effective_batch_gradients(model, micro, counts, training=False, sop_weight=3.0)
    assert grads.keys() == whole.grads.keys() and set(parts) == {"loss", "mlm", "sop"}
    scale = max(float(np.max(np.abs(g))) for g in whole.grads.values())
    for name, g in whole.grads.items():
        assert float(np.max(np.abs(grads[name] - g))) <= 1e-12 * scale, name
    mlm, sop = float(whole.parts["mlm"]), float(whole.parts["sop"])
    assert float(parts["mlm"]) == pytest.approx(mlm, rel=1e-12)
    assert float(parts["sop"]) == pytest.approx(sop, rel=1e-12)
    assert float(parts["loss"]) == pytest.approx(mlm + 3.0 * sop, rel=1e-12)
    assert float(whole.loss) == pytest.approx(mlm + 3.0 * sop, rel=1e-12)
    for value in parts.values():
        assert np.ndim(value) == 0 and value.dtype == np.float64


def test_accumulation_training_flag_and_errors():
    """training=True applies dropout (the gradient differs from training=False by far more than
    rounding); one micro-batch with training=True is exactly one training pass of the same model state
    (same dropout draws, loss_weights (1, w)); bad arguments are refused with their message."""
    from ref_bert.pretrain.accumulation import effective_batch_gradients
    _, batch, make_model = _accumulation_case(0.1)
    assert int((batch["mlm_labels"] != -100).sum()) == 10
    for k_bounds in ([0, 5], [0, 2, 5]):
        micro = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(k_bounds, k_bounds[1:])]
        counts = [int((m["mlm_labels"] != -100).sum()) for m in micro]
        off, _ = effective_batch_gradients(make_model(), micro, counts, training=False)
        on, _ = effective_batch_gradients(make_model(), micro, counts, training=True)
        whole_off = make_model().loss_and_grads(**batch, training=False).grads
        scale = max(float(np.max(np.abs(g))) for g in whole_off.values())
        assert max(float(np.max(np.abs(on[n] - off[n]))) for n in on) > 1e-3 * scale
        assert max(float(np.max(np.abs(whole_off[n] - off[n]))) for n in off) <= 1e-12 * scale
    reference = make_model().loss_and_grads(**batch, training=True, loss_weights=(1.0, 2.0))
    grads, parts = effective_batch_gradients(make_model(), [batch], [10], training=True, sop_weight=2.0)
    for name in grads:
        assert np.array_equal(grads[name], reference.grads[name]), name
    assert float(parts["loss"]) == float(reference.loss)
    assert float(parts["mlm"]) == float(reference.parts["mlm"]) and float(parts["sop"]) == float(reference.parts["sop"])
    _raises_exactly("effective_batch_gradients needs at least one micro-batch, got none",
                    effective_batch_gradients, make_model(), [], [])
    _raises_exactly("mlm_counts has 1 entries, expected one per micro-batch (2)",
                    effective_batch_gradients, make_model(), [batch, batch], [10])
    # training defaults to True (a training step's gradient): the same draws as training=True.
    default, _ = effective_batch_gradients(make_model(), [batch], [10], sop_weight=2.0)
    for name in grads:
        assert np.array_equal(default[name], reference.grads[name]), name


def test_accumulation_keeps_float32():
    """A float32 model's accumulated gradients and losses stay float32 (no silent float64 buffers);
    they equal one float32 whole-batch pass to float32 rounding (1e-5 of the largest entry)."""
    from ref_bert import Model
    from ref_bert.pretrain.accumulation import effective_batch_gradients
    config, batch, _ = _accumulation_case(0.0)
    model = Model(config, dtype="float32", seed=5)
    micro = [{k: v[a:b] for k, v in batch.items()} for a, b in ((0, 2), (2, 5))]
    counts = [int((m["mlm_labels"] != -100).sum()) for m in micro]
    grads, parts = effective_batch_gradients(model, micro, counts, training=False)
    whole = model.loss_and_grads(**batch)
    scale = max(float(np.max(np.abs(g))) for g in whole.grads.values())
    for name, g in grads.items():
        assert g.dtype == np.float32, name
        assert float(np.max(np.abs(g - whole.grads[name]))) <= 1e-5 * scale, name
    for key, value in parts.items():
        assert value.dtype == np.float32, key


# =============================================================================================
# Refused input: every message in full (a message is part of the contract: it names the argument,
# the value, and what was expected)
# =============================================================================================
def _raises_exactly(message, fn, *args, **kwargs):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        fn(*args, **kwargs)


def test_refused_constructor_arguments_messages():
    p = {"a.weight": np.ones(2)}
    _raises_exactly("optimizer='sgd' is invalid: expected one of ('lamb', 'albert', 'tfa', 'nvlamb', 'apex', "
                    "'torch_optimizer', 'optax', 'adamw', 'adamw-torch', 'adamw-bert')", make_optimizer, "sgd", p)
    for name in ("lamb--bert", "adamw-lamb", "Adamw-torch"):      # near misses of "adamw-<preset>"
        with pytest.raises(ValueError, match="^" + re.escape(f"optimizer={name!r} is invalid: expected one of (")):
            make_optimizer(name, p)
    _raises_exactly("params must be a dict name -> array, got list", Lamb, [np.ones(2)])
    _raises_exactly("params is empty; expected at least one name -> array", Lamb, {})
    _raises_exactly("parameter names must be strings, got 1", AdamW, {1: np.ones(2)})
    _raises_exactly("parameter 'b' must be a floating-point array, got int32", Lamb,
                    {"a": np.ones(2), "b": np.ones(2, np.int32)})
    _raises_exactly("parameter 'b' must be a floating-point array, got list", Lamb, {"a": np.ones(2), "b": [1.0]})
    _raises_exactly("exclude_from_weight_decay must be a list or tuple of regex patterns, got 3", Lamb, p,
                    exclude_from_weight_decay=3)
    _raises_exactly("exclude_from_layer_adaptation must hold regex strings, got 3 (int)", Lamb, p,
                    exclude_from_layer_adaptation=["bias", 3])
    _raises_exactly("exclude_from_weight_decay must be a list or tuple of regex patterns, got the string 'bias'; "
                    "write ['bias'] for one pattern", AdamW, p, exclude_from_weight_decay="bias")
    _raises_exactly("adapt_only_decayed must be True or False, got 1", Lamb, p, adapt_only_decayed=1)
    _raises_exactly("zero_norm_ratio must be a finite number >= 0, got -1", Lamb, p, zero_norm_ratio=-1)
    _raises_exactly("lr must be a finite number > 0, got 0", Lamb, p, lr=0)
    _raises_exactly("lr must be a finite number > 0, got -0.001", AdamW, p, lr=-0.001)
    _raises_exactly("weight_decay must be a finite number >= 0, got -0.1", AdamW, p, weight_decay=-0.1)
    _raises_exactly("eps must be a finite number >= 0, got nan", Lamb, p, eps=float("nan"))
    _raises_exactly("max_grad_norm must be a finite number > 0, got inf", AdamW, p, max_grad_norm=float("inf"))
    _raises_exactly("bias_correction must be True or False, got 'moments'", AdamW, p, bias_correction="moments")
    _raises_exactly("bias_correction must be True, False or one of ('moments', 'none', 'step_size'), got 1",
                    Lamb, p, bias_correction=1)
    _raises_exactly("weight_decay_mode must be one of ('inside_ratio', 'outside_ratio', 'l2'), got 'decoupled'",
                    Lamb, p, weight_decay_mode="decoupled")
    _raises_exactly("betas[1] must be in [0, 1), got True", Lamb, p, betas=[0.9, True])
    for bad in (False, 1.0, 1.5, -0.5, "0.9", None):               # the range is [0, 1), booleans refused
        _raises_exactly(f"betas[0] must be in [0, 1), got {bad!r}", AdamW, p, betas=(bad, 0.999))
    _raises_exactly("betas must be a pair (beta1, beta2), got 0.9", AdamW, p, betas=0.9)
    _raises_exactly("weight_norm_clamp must be a finite number > 0, got 0", Lamb, p, weight_norm_clamp=0)
    _raises_exactly("weight_norm_clamp[0] must be a finite number >= 0, got -1", Lamb, p, weight_norm_clamp=(-1, 2))
    _raises_exactly("weight_norm_clamp[1] must be a finite number > 0, got 0", Lamb, p, weight_norm_clamp=(0, 0))
    with pytest.raises(ValueError, match=r"^exclude_from_weight_decay: '\(' is not a valid regular expression \(.+\)$"):
        Lamb(p, exclude_from_weight_decay=["("])
    for clamp in ((1.0,), True, (2.0, 1.0), "10"):
        _raises_exactly(f"weight_norm_clamp must be None, an upper bound > 0, or a pair (lo, hi) with 0 <= lo <= hi, "
                        f"got {clamp!r}", Lamb, p, weight_norm_clamp=clamp)
    _raises_exactly("unknown Lamb option(s) ['foo']; expected some of ['lr', 'betas', 'eps', 'weight_decay', "
                    "'bias_correction', 'weight_decay_mode', 'weight_norm_clamp', 'zero_norm_ratio', "
                    "'exclude_from_weight_decay', 'exclude_from_layer_adaptation', 'adapt_only_decayed', "
                    "'max_grad_norm']", Lamb.from_preset, "albert", p, foo=1)
    _raises_exactly("unknown AdamW option(s) ['weight_norm_clamp']; expected some of ['lr', 'betas', 'eps', "
                    "'weight_decay', 'bias_correction', 'exclude_from_weight_decay', 'max_grad_norm']",
                    AdamW.from_preset, "bert", p, weight_norm_clamp=1)
    _raises_exactly("unknown LAMB preset 'lars'; expected one of ['albert', 'apex', 'nvlamb', 'optax', 'tfa', "
                    "'torch_optimizer']", Lamb.from_preset, "lars", p)
    _raises_exactly("unknown AdamW preset 'adam'; expected one of ['bert', 'torch']", AdamW.from_preset, "adam", p)
    # What is accepted: the clamp forms, patterns None, betas as a list, bias_correction booleans.
    assert Lamb(p, weight_norm_clamp=2).weight_norm_clamp == (0.0, 2.0)
    assert Lamb(p, weight_norm_clamp=[0.5, 2]).weight_norm_clamp == (0.5, 2.0)
    assert Lamb(p, weight_norm_clamp=(1.0, 1.0)).weight_norm_clamp == (1.0, 1.0)     # lo == hi is allowed
    assert Lamb(p, weight_norm_clamp=(0, 3)).weight_norm_clamp == (0.0, 3.0)         # lo == 0 is allowed
    assert Lamb(p, exclude_from_weight_decay=None).exclude_from_weight_decay == ()
    assert AdamW(p, betas=[0, 0.5]).betas == (0.0, 0.5)
    assert Lamb(p, bias_correction=True).bias_correction == "moments"
    assert Lamb(p, bias_correction=False).bias_correction == "none"
    assert Lamb(p, eps=0).eps == 0.0 and Lamb(p, weight_decay=0).weight_decay == 0.0


def test_refused_step_and_state_messages():
    p = {"a.weight": np.ones(2)}
    for opt in (Lamb(p), AdamW(p)):
        _raises_exactly("grads must be a dict name -> array, got list", opt.step, [np.ones(2)])
        _raises_exactly("grads must have exactly the parameter names; missing ['a.weight'], unexpected ['b']",
                        opt.step, {"b": np.ones(2)})
        _raises_exactly("grads['a.weight'] has shape (), expected (2,)", opt.step, {"a.weight": 1.0})
        _raises_exactly("grads['a.weight'] has shape (3,), expected (2,)", opt.step, {"a.weight": np.ones(3)})
        _raises_exactly("grads must have exactly the parameter names; missing ['a.weight'], unexpected []",
                        opt.step, {})
        _raises_exactly("grads must have exactly the parameter names; missing [], unexpected ['b']",
                        opt.step, {"a.weight": np.ones(2), "b": np.ones(2)})
        _raises_exactly("grads['a.weight'] has dtype float32, expected float64 (the parameter's; no silent casting)",
                        opt.step, {"a.weight": np.ones(2, np.float32)})
        _raises_exactly("lr must be a finite number >= 0, got -1", opt.step, {"a.weight": np.ones(2)}, lr=-1)
        assert opt.step_count == 0
        _raises_exactly("state must be a dict with keys 'step', 'tensors' (and 'hyper'), got list",
                        opt.load_state_dict, [1])
        _raises_exactly("state must be a dict with keys 'step', 'tensors' (and 'hyper'), got ['step']",
                        opt.load_state_dict, {"step": 0})
        for step in (True, 1.0, -1):
            _raises_exactly(f"state['step'] must be an integer >= 0, got {step!r}", opt.load_state_dict,
                            {"step": step, "tensors": {}})
    # float32 parameters take float32 gradients, and refuse float64 ones (no silent casting either way).
    for opt_cls in (Lamb, AdamW):
        p32 = {"a.weight": np.ones(2, np.float32)}
        opt = opt_cls(p32)
        _raises_exactly("grads['a.weight'] has dtype float64, expected float32 (the parameter's; no silent casting)",
                        opt.step, {"a.weight": np.ones(2)})
        opt.step({"a.weight": np.ones(2, np.float32)})
        assert opt.step_count == 1 and p32["a.weight"].dtype == np.float32
    saved = Lamb(p).state_dict()
    hyper = dict(saved["hyper"])
    del hyper["eps"]
    hyper["extra"] = 1
    _raises_exactly("optimiser state does not match: hyper['eps'] is absent, expected 1e-06; "
                    "hyper['extra'] is 1, expected absent", Lamb(p).load_state_dict,
                    {"step": 1, "tensors": saved["tensors"], "hyper": hyper})
    # A hyperparameter only one side has is a mismatch whatever its value, even the string the message
    # prints for a missing one (a "<absent>" default in the comparison accepted it).
    odd = dict(saved["hyper"], extra="<absent>")
    _raises_exactly("optimiser state does not match: hyper['extra'] is '<absent>', expected absent",
                    Lamb(p).load_state_dict, {"step": 1, "tensors": saved["tensors"], "hyper": odd})
    # check_hyper=False skips the hyperparameters (and a state without "hyper" is not compared).
    opt = Lamb(p)
    opt.load_state_dict({"step": 1, "tensors": saved["tensors"], "hyper": hyper}, check_hyper=False)
    opt.load_state_dict({"step": 2, "tensors": saved["tensors"]})
    assert opt.step_count == 2


def test_refused_schedule_messages():
    for fn, args in ((albert_schedule, (1.0, 10)), (linear_warmup_decay, (1.0, 10, 2))):
        for step in (1.5, True, -1):
            _raises_exactly(f"step must be an integer >= 0, got {step!r}", fn, step, *args)
    _raises_exactly("num_warmup_steps must be an integer >= 0, got -2", albert_schedule, 1, 1.0, 10,
                    num_warmup_steps=-2)
    _raises_exactly("num_train_steps must be an integer >= 0, got 10.0", linear_warmup_decay, 1, 1.0, 10.0, 2)
    _raises_exactly("num_train_steps must be > 0, got 0", linear_warmup_decay, 0, 1.0, 0, 0)
    _raises_exactly("init_lr must be a finite number > 0, got -1.0", linear_warmup_decay, 0, -1.0, 5, 0)
    _raises_exactly("power must be a finite number > 0, got 0", albert_schedule, 1, 1.0, 10, power=0)
    _raises_exactly("num_warmup_steps must be <= num_train_steps (3), got 4", linear_warmup_decay, 0, 1.0, 3, 4)


class _OtherDeviceArray(np.ndarray):
    """A NumPy array that the patched ``backends.of`` below assigns to another backend (as a CuPy array
    would be): the backend checks can be tested without a GPU."""


class _RecordingXp:
    """NumPy as a stand-in backend's xp, noting the name of every function asked of it in ``asked``."""

    def __init__(self):
        self.asked = []

    def __getattr__(self, name):
        self.asked.append(name)
        return getattr(np, name)


def _route_other_arrays(monkeypatch, backend):
    """Patch ``backends.of`` so that every :class:`_OtherDeviceArray` belongs to ``backend``."""
    real_of = backends.of
    monkeypatch.setattr(backends, "of", lambda a: backend if isinstance(a, _OtherDeviceArray) else real_of(a))


def test_refused_arrays_on_another_backend(monkeypatch):
    other = type("OtherBackend", (), {"__repr__": lambda self: "Backend('other')", "xp": np, "fast": {}})()
    _route_other_arrays(monkeypatch, other)
    foreign = np.ones(2).view(_OtherDeviceArray)
    _raises_exactly("parameter 'b' lives on Backend('other'), expected Backend('numpy') like the first parameter",
                    Lamb, {"a": np.ones(2), "b": foreign})
    _raises_exactly("parameter 'b' lives on Backend('numpy'), expected Backend('other') like the first parameter",
                    AdamW, {"a": foreign, "b": np.ones(2)})
    for opt in (Lamb({"a": np.ones(2)}), AdamW({"a": np.ones(2)})):
        _raises_exactly("grads['a'] lives on Backend('other'), expected Backend('numpy')", opt.step, {"a": foreign})
        assert opt.step_count == 0


def test_global_grad_norm_uses_the_gradients_backend(monkeypatch):
    """The pieces (and the threads that sum them) are those of the gradients' own backend, found from
    the first gradient: here a recording stand-in for a second backend (CuPy's on a GPU)."""
    numpy_backend = backends.get("numpy")
    seen = []

    xp_recording = _RecordingXp()
    asked = xp_recording.asked

    class OtherBackend:
        xp = xp_recording
        fast = {}          # no fast variants: the reference ops

        def pieces(self, *arrays):
            seen.append(arrays[0].shape)
            return numpy_backend.pieces(*arrays)

        def parallel_map(self, fn, items):
            return [fn(x) for x in items]

    other = OtherBackend()
    _route_other_arrays(monkeypatch, other)
    grads = [np.array([3.0, 0.0]).view(_OtherDeviceArray), np.array([[4.0]]).view(_OtherDeviceArray)]
    assert float(global_grad_norm(grads)) == 5.0
    assert seen == [(2,), (1, 1)]
    assert sorted(asked) == ["sqrt", "sum", "sum"]      # each piece's sum of squares, and the root


def test_trust_ratio_uses_the_arrays_backend(monkeypatch):
    """trust_ratio computes with the xp of its arrays' backend (on CuPy: no host round trip), here a
    stand-in backend whose xp records what it is asked for and delegates to NumPy."""
    xp = _RecordingXp()
    asked = xp.asked

    other = type("OtherBackend", (), {"xp": xp, "fast": {}})()
    _route_other_arrays(monkeypatch, other)
    w_sq, u_sq = np.array(4.0).view(_OtherDeviceArray), np.array(0.25).view(_OtherDeviceArray)
    assert float(lamb_module.trust_ratio(w_sq, u_sq)) == 4.0
    assert "sqrt" in asked and "where" in asked
    # The direction too: its square root is the arrays' backend's.
    asked.clear()
    w = np.array([1.0, 2.0]).view(_OtherDeviceArray)
    u = lamb_module.lamb_direction(w, np.ones(2), np.zeros(2), np.zeros(2), clip=None, b1=0.9, b2=0.999, eps=1e-6,
                                   bias1=None, bias2=None, wd_l2=0.0, wd_inside=0.0)
    assert asked == ["sqrt"]
    np.testing.assert_allclose(np.asarray(u), 0.1 / (math.sqrt(0.001) + 1e-6), rtol=1e-15)


class _ShapeOnly:
    """Has a shape but no dtype: not an array."""
    shape = (1,)


def test_load_state_dict_reports_every_problem_at_once():
    """One state with every kind of mismatch: all of them in one message, in order (missing, unexpected,
    then each of our tensors in order, then the hyperparameters sorted by name); nothing written. The
    lr may differ (a schedule sets it), and step 0 is a valid step."""
    p = {"a.weight": np.ones(2), "b.weight": np.ones(3), "c.weight": np.ones(1)}
    opt = Lamb(p)
    state = opt.state_dict()
    assert set(state) == {"step", "tensors", "hyper"} and state["step"] == 0
    tensors = {k: np.array(v) for k, v in state["tensors"].items()}
    del tensors["exp_avg/a.weight"]
    tensors["exp_avg/z"] = np.zeros(1)
    tensors["exp_avg_sq/a.weight"] = np.zeros(3)
    tensors["exp_avg/b.weight"] = np.zeros(3, np.float32)
    tensors["exp_avg_sq/b.weight"] = [0.0, 0.0, 0.0]
    tensors["exp_avg/c.weight"] = _ShapeOnly()
    hyper = {**state["hyper"], "eps": 1e-8, "lr": 0.5, "extra": None}
    del hyper["weight_norm_clamp"]                      # ours is None: absent is still a mismatch
    _raises_exactly("optimiser state does not match: missing tensors ['exp_avg/a.weight']; unexpected tensors "
                    "['exp_avg/z']; exp_avg_sq/a.weight has shape (3,), expected (2,); exp_avg/b.weight has dtype "
                    "float32, expected float64; exp_avg_sq/b.weight is a list, expected an array; exp_avg/c.weight "
                    "is a _ShapeOnly, expected an array; hyper['eps'] is 1e-08, expected 1e-06; hyper['extra'] is "
                    "None, expected absent; hyper['weight_norm_clamp'] is absent, expected None",
                    opt.load_state_dict, {"step": 3, "tensors": tensors, "hyper": hyper})
    _raises_exactly("state must be a dict with keys 'step', 'tensors' (and 'hyper'), got ['tensors']",
                    opt.load_state_dict, {"tensors": state["tensors"]})
    assert opt.step_count == 0 and not any(v.any() for v in opt.state_dict()["tensors"].values())
    # A different lr alone is accepted, at step 0 as at any other.
    good = {k: np.full(v.shape, 0.5) for k, v in state["tensors"].items()}
    opt.load_state_dict({"step": 0, "tensors": good, "hyper": {**state["hyper"], "lr": 0.5}})
    assert opt.step_count == 0 and np.array_equal(opt.exp_avg["b.weight"], np.full(3, 0.5))
    opt.step({n: np.ones_like(w) for n, w in p.items()})
    assert opt.state_dict()["step"] == 1
    # float32 state loads into a float32 optimiser, float64 does not.
    opt32 = AdamW({"a.weight": np.ones(2, np.float32)})
    state32 = opt32.state_dict()
    opt32.load_state_dict({**state32, "tensors": {k: np.full(2, 0.25, np.float32) for k in state32["tensors"]}})
    assert opt32.exp_avg["a.weight"].dtype == np.float32 and opt32.exp_avg["a.weight"][0] == 0.25
    wrong = {**state32, "tensors": {**state32["tensors"], "exp_avg/a.weight": np.ones(2)}}
    _raises_exactly("optimiser state does not match: exp_avg/a.weight has dtype float64, expected float32",
                    opt32.load_state_dict, wrong)


def test_constructor_defaults():
    """Without a preset: AdamW's defaults are torch.optim.AdamW's (its installed source's), with bias
    correction, no exclusions and no clipping; Lamb's are its signature's (apex FusedLAMB's lr, eps and
    weight decay, bias-corrected, without clipping)."""
    p = {"a.weight": np.ones(2)}
    d = _installed_defaults("torch", "optim/adamw.py", "__init__", cls="AdamW")
    assert AdamW(p).state_dict()["hyper"] == dict(
        optimizer="AdamW", lr=d["lr"], betas=list(d["betas"]), eps=d["eps"], weight_decay=d["weight_decay"],
        bias_correction=True, exclude_from_weight_decay=[], max_grad_norm=None)
    assert Lamb(p).state_dict()["hyper"] == dict(
        optimizer="Lamb", lr=1e-3, betas=[0.9, 0.999], eps=1e-6, weight_decay=0.01, bias_correction="moments",
        weight_decay_mode="inside_ratio", weight_norm_clamp=None, zero_norm_ratio=1.0, exclude_from_weight_decay=[],
        exclude_from_layer_adaptation=[], adapt_only_decayed=False, max_grad_norm=None)
