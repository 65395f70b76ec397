"""Test helpers: tiny Hugging Face ALBERT/BERT models with random weights, and matching inputs.

Nothing is downloaded: every model is built from a config in the test and saved to a temporary
directory with ``save_pretrained``. Weights are redrawn so that LayerNorm gammas are not 1, biases
not 0, and pre-activations are O(1) (where gelu and gelu_new differ by ~1e-4, so a swapped
activation cannot hide).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ref_bert import hf_torch
from ref_bert.examples import make_batch

torch.set_num_threads(1)

ALBERT_SHARED = dict(family="albert", vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=48, hidden_act="gelu_new",
                     max_position_embeddings=24, type_vocab_size=2)
# G = 2 groups of K = 2 blocks over L = 4 layers; exact gelu; non-default pad id, eps and type vocabulary.
ALBERT_GROUPS = dict(family="albert", vocab_size=80, embedding_size=16, hidden_size=24, num_hidden_layers=4,
                     num_hidden_groups=2, inner_group_num=2, num_attention_heads=3, intermediate_size=40,
                     hidden_act="gelu", max_position_embeddings=20, type_vocab_size=3, pad_token_id=1,
                     layer_norm_eps=1e-6)
ALBERT_RELU = dict(ALBERT_SHARED, hidden_act="relu", num_hidden_layers=2)
BERT = dict(family="bert", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, hidden_act="gelu", max_position_embeddings=24, type_vocab_size=2)
BERT_GELU_NEW = dict(BERT, hidden_act="gelu_new", num_hidden_layers=1, layer_norm_eps=1e-5)



def hf_config_dict(spec: dict) -> dict:
    """The config.json keys of ``spec`` (its "family" as "model_type")."""
    return dict({k: v for k, v in spec.items() if k != "family"}, model_type=spec["family"])


def _redraw(model):
    for pname, p in model.named_parameters():
        if pname.endswith("LayerNorm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif pname.endswith("bias"):
            p.copy_(0.2 * torch.randn_like(p))
        else:
            p.copy_(0.3 * torch.randn_like(p))


def hf_model(spec: dict, arch: str = "ForPreTraining", dtype: str = "float64", seed: int = 0):
    """A randomly initialised transformers model (eval mode: dropout off), e.g. arch "ForMaskedLM".
    The weights are drawn in float32 from ``torch.manual_seed(seed)``, then cast to ``dtype``."""
    return hf_torch.from_config(hf_config_dict(spec), arch, dtype=dtype, seed=seed, init=_redraw)


def batch(spec: dict, seed: int = 0, lengths=(10, 8, 6), pad_at_real_positions: bool = False) -> dict:
    """A padded batch with two segments, MLM labels on ~30% of real tokens and SOP/NSP labels: the
    ``"rows"`` recipe of :func:`ref_bert.examples.make_batch` with these ``lengths``, second segments
    typed 1 or 2 alternately by row (where the type vocabulary allows), and no position ids.

    Real tokens avoid the pad id (unless ``pad_at_real_positions``): see the pad-row note in
    test_hf_parity.py. Padded positions hold the pad id, token type 0 and label -100.
    """
    lengths = tuple(lengths)
    shape = SimpleNamespace(vocab_size=spec["vocab_size"], pad_token_id=spec.get("pad_token_id", 0),
                            type_vocab_size=spec["type_vocab_size"],
                            max_position_embeddings=spec.get("max_position_embeddings", 512))
    x = make_batch(shape, len(lengths), max(lengths), seed, recipe="rows", lengths=lengths, label_rate=0.3)
    del x["position_ids"]
    for b, n in enumerate(lengths):
        if pad_at_real_positions:
            x["input_ids"][b, 1] = shape.pad_token_id
        x["token_type_ids"][b, n // 2:n] = min(1 + b % 2, spec["type_vocab_size"] - 1)
    return x


def hf_run(model, inputs: dict, family: str, backward: bool = True):
    """Forward (and backward of the pretraining loss) through transformers. Returns the output and a
    dict of gradients by HF parameter name."""
    kwargs = hf_torch.forward_kwargs(inputs, family, labels=backward, output_hidden_states=True)
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    grads = {}
    if backward:
        out.loss.backward()
        grads = hf_torch.parameters(model, grads=True)
        without = [n for n, p in model.named_parameters() if p.grad is None]
        assert not without, f"no gradient for {without}"
    return out, grads


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the tensor's scale (robust near zeros)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.abs(ref).max()
    return float(np.abs(ours - ref).max() / scale) if scale > 0 else float(np.abs(ours).max())
