"""The published LAMB and AdamW implementations, as constructor arguments of :class:`~ref_bert.optim.Lamb`
and :class:`~ref_bert.optim.AdamW` (``Lamb.from_preset(name, params, **overrides)``).

The LAMB implementations people compare against disagree on five details (their sources: docs/reference.md,
LAMB variants); each detail is a named argument, and each preset sets them the way one implementation does:

    preset            bias correction  decay        phi (clamp)  excluded from ratio        grad clipping
    "albert"          none             in ratio     none         LayerNorm, bias (= decay)  global 1.0
    "tfa"             moments          in ratio     none         decay list (default none)  none
    "nvlamb"          moments          in ratio     none         none                       global 1.0
    "apex"            moments          in ratio     none         tensors with wd 0          global 1.0
    "torch_optimizer" none (or lr)     in ratio     ||w|| <= 10  none                       none
    "optax"           moments          in ratio     none         none (mask: decay only)    none

(All of them add eps after the square root, ``sqrt(v_hat) + eps``.) Each preset is the source's
own defaults (its constructor defaults, or the values its pretraining script passes); anything can be
overridden: ``Lamb.from_preset("albert", params, lr=1e-3)``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["LAMB_PRESETS", "ADAMW_PRESETS", "ALBERT_EXCLUDE"]

# The names ALBERT's and BERT's optimisers exclude from weight decay (regex patterns, searched in the name).
ALBERT_EXCLUDE = ("LayerNorm", "layer_norm", "bias")

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
