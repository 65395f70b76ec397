"""Live Hugging Face models in PyTorch: the one module that knows transformers' torch module tree.

:mod:`ref_bert.hf` is the *file* adapter (tensor names in checkpoints, config.json) and knows no torch.
This module is about running ``transformers`` models next to ref-bert, for ``ref-bert verify --hf``,
the benchmark's PyTorch side and the parity tests:

    from_config(config, architecture, dtype, weights=..., device=..., train=..., seed=..., init=...)
                                  a transformers model built from a ref-bert Config (or an HF config dict)
    from_model(ours, ...)         the same, holding ref-bert model ``ours``'s weights
    from_pretrained(directory, dtype)        a saved HF directory, eager attention, eval mode (quietly:
                                  quiet_transformers() silences transformers' progress bars and logging)
    model_class(family, architecture)        e.g. ("albert", "ForPreTraining") -> AlbertForPreTraining
    forward_kwargs(inputs, family, labels)   ref-bert's batch dict -> the model's keyword arguments (a task
                                  head's ``labels`` / ``start_positions`` / ``end_positions`` when present)
    parameters(hf_model, grads=False)        parameters (or their gradients) by checkpoint name
    capture_hooks(hf_model, store) / capture(hf_model)
                                  forward hooks recording activations under ref-bert's trace names
    word_lookup(hf_model)         the word-embedding lookup's output, its gradient retained

Every model runs with ``attn_implementation="eager"`` (the attention probabilities are a module
output, which the hooks read). ``torch`` and ``transformers`` are imported inside the functions only,
so that importing ref_bert never needs them.
"""
from __future__ import annotations

from contextlib import contextmanager

DTYPES = ("float32", "float64")
# The keyword under which each family's *ForPreTraining takes the sentence-order / next-sentence label.
ORDER_LABEL = {"albert": "sentence_order_label", "bert": "next_sentence_label"}


def torch_dtype(dtype: str):
    """"float32" / "float64" -> the torch dtype."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    return getattr(torch, dtype)


def model_class(family: str, architecture: str = "ForPreTraining"):
    """The transformers class: ``architecture`` is a suffix ("ForPreTraining", "ForMaskedLM", "Model")
    or a full name ("AlbertForPreTraining")."""
    import transformers

    prefix = {"albert": "Albert", "bert": "Bert"}.get(family)
    if prefix is None:
        raise ValueError(f"model family {family!r}: expected 'albert' or 'bert'")
    name = architecture if architecture.startswith(prefix) else prefix + architecture
    from .hf import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is not supported; expected one of {sorted(ARCHITECTURES)}")
    return getattr(transformers, name)


def hf_config(config):
    """A transformers config (eager attention) from a ref-bert :class:`~ref_bert.config.Config`, or from
    a dict of config.json keys that names its ``model_type``. Returns (family, transformers config)."""
    import transformers

    if isinstance(config, dict):
        d = dict(config)
    else:
        from .hf import config_to_hf

        d = config_to_hf(config)
    family = d.pop("model_type")
    for key in ("architectures", "dtype", "torch_dtype"):
        d.pop(key, None)
    cls = transformers.AlbertConfig if family == "albert" else transformers.BertConfig
    return family, cls(**d, attn_implementation="eager")


def from_config(config, architecture: str = "ForPreTraining", dtype: str = "float32", weights=None,
                device: str = "cpu", train: bool = False, seed: int | None = None, init=None):
    """A transformers model for ``config`` (a ref-bert Config or an HF config dict with ``model_type``).

    In order: ``torch.manual_seed(seed)`` when given; the model is built (float32, transformers'
    initialisation); ``init(model)`` runs under ``torch.no_grad()`` when given; the model moves to
    ``device`` and ``dtype``; ``weights`` (a dict of arrays by HF checkpoint name, e.g.
    ``Model.hf_state_dict()``) are loaded in that dtype, every parameter but the tied decoder required,
    and the decoder re-tied; then the model is put in eval mode (dropout off), or train mode when ``train``.
    """
    import torch

    family, cfg = hf_config(config)
    cls = model_class(family, architecture)
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(cfg)
    if init is not None:
        with torch.no_grad():
            init(model)
    # to the target dtype *before* the weights are copied in: a float64 weight copied into the float32
    # model transformers builds would be rounded to float32 on the way
    model = model.to(device=device, dtype=torch_dtype(dtype))
    if weights is not None:
        # a bare Albert/BertModel's own parameter names lack the base prefix its checkpoint names (and
        # Model.hf_state_dict()) carry: "albert.encoder..." is its "encoder..."
        prefix = f"{model.base_model_prefix}." if _base(model) is model else ""
        state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: torch.from_numpy(v)
                 for k, v in weights.items()}
        result = model.load_state_dict(state, strict=False)
        untied = [k for k in result.missing_keys if ".decoder." not in k]
        if untied or result.unexpected_keys:
            raise RuntimeError(f"weights do not map onto {cls.__name__}: missing {untied}, "
                               f"unexpected {result.unexpected_keys}")
        model.tie_weights()
    if weights is not None and model.get_output_embeddings() is not None and (
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()):
        raise RuntimeError("the MLM decoder is not tied to the word embeddings in the torch model")
    return model.train(train)


def from_model(ours, architecture: str = "ForPreTraining", dtype: str | None = None, device: str = "cpu",
               train: bool = False):
    """A transformers model holding the weights of ref-bert model ``ours``, through ref-bert's one name
    map (:meth:`~ref_bert.model.Model.hf_state_dict`); ``dtype`` defaults to the model's."""
    return from_config(ours.config, architecture, dtype or ours.dtype.name, weights=ours.hf_state_dict(),
                       device=device, train=train)


@contextmanager
def quiet_transformers():
    """No foreign progress output while loading: transformers' own "Loading weights" bar and its
    info/warning logging would interleave with ref-bert's output (ref-bert reports what it compares
    itself). Both settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def from_pretrained(directory, dtype: str = "float64", architecture: str | None = None,
                    output_loading_info: bool = False):
    """A saved HF model directory, with eager attention, in eval mode. ``architecture`` defaults to
    config.json's; with ``output_loading_info`` returns (model, loading info) as transformers does."""
    from .hf import architecture_of

    arch, family = architecture_of(directory)
    cls = model_class(family, architecture or arch)
    with quiet_transformers():
        loaded = cls.from_pretrained(directory, attn_implementation="eager", dtype=torch_dtype(dtype),
                                     output_loading_info=output_loading_info)
    model = loaded[0] if output_loading_info else loaded
    model.eval()
    return loaded


def forward_kwargs(inputs: dict, family: str, labels: bool = True, device: str | None = None, **extra) -> dict:
    """ref-bert's batch dict (input_ids, token_type_ids, attention_mask, optional position_ids; with
    ``labels`` also the labels: a task head's ``labels`` / ``start_positions`` / ``end_positions`` when the
    dict has them, else mlm_labels and sop_labels) -> keyword arguments of the transformers model.
    Float labels (regression, multi-label) should already have the model's dtype."""
    import torch

    def t(key):
        x = torch.from_numpy(inputs[key])
        return x if device is None else x.to(device)

    kwargs = dict(input_ids=t("input_ids"), token_type_ids=t("token_type_ids"), attention_mask=t("attention_mask"))
    if "position_ids" in inputs:
        kwargs["position_ids"] = t("position_ids")
    task_labels = [key for key in ("labels", "start_positions", "end_positions") if key in inputs]
    if labels and task_labels:
        kwargs.update({key: t(key) for key in task_labels})
    elif labels:
        kwargs["labels"] = t("mlm_labels")
        kwargs[ORDER_LABEL[family]] = t("sop_labels")
    kwargs.update(extra)
    return kwargs


def parameters(hf_model, grads: bool = False) -> dict:
    """NumPy copies of the parameters (or of their gradients, where there is one) by checkpoint name:
    the names of :meth:`Model.hf_state_dict` (a bare Albert/BertModel's get its base prefix)."""
    prefix = "" if _base(hf_model) is not hf_model else f"{hf_model.base_model_prefix}."
    out = {}
    for name, p in hf_model.named_parameters():
        value = p.grad if grads else p
        if value is not None:
            out[prefix + name] = value.detach().cpu().numpy().copy()
    return out


def _base(hf_model):
    return getattr(hf_model, hf_model.base_model_prefix, hf_model)


def _grab(x):
    x = x[0] if isinstance(x, tuple) else x
    return x.detach().cpu().numpy().copy()


def capture_hooks(hf_model, store: dict) -> list:
    """Forward hooks that record the activations of ``hf_model`` (eager attention, eval mode) into
    ``store`` under ref-bert's trace names (those ``Model.forward(trace=...)`` reports), e.g.
    ``encoder.layer.{i}.block.{m}.attention.probs``. Returns the hook handles; ``h.remove()`` each.
    An ALBERT block is numbered by call order: the n-th AlbertLayer call is layer n // K, block n % K."""
    handles = []
    family = hf_model.config.model_type
    base = _base(hf_model)
    state = {"prefix": "", "calls": 0}

    def out_hook(module, name, index=None):
        def hook(mod, args, output):
            value = output[index] if index is not None else output
            if value is not None:
                store[state["prefix"] + name] = _grab(value)
        handles.append(module.register_forward_hook(hook))

    def in_hook(module, name):
        def hook(mod, args):
            store[state["prefix"] + name] = _grab(args[0])
        handles.append(module.register_forward_pre_hook(hook))

    def global_out(module, name):
        def hook(mod, args, output):
            store[name] = _grab(output)
        handles.append(module.register_forward_hook(hook))

    def global_in(module, name):
        def hook(mod, args):
            store[name] = _grab(args[0])
        handles.append(module.register_forward_pre_hook(hook))

    def block_start(layer_index_fn):
        def hook(mod, args):
            i, m = layer_index_fn(mod)
            state["prefix"] = f"encoder.layer.{i}.block.{m}."
        return hook

    emb = base.embeddings
    global_in(emb.LayerNorm, "embeddings.sum")
    global_out(emb.LayerNorm, "embeddings.layer_norm")
    if family == "albert":
        global_out(base.encoder.embedding_hidden_mapping_in, "embeddings.output")
        K = hf_model.config.inner_group_num

        def albert_index(mod):
            n = state["calls"]
            state["calls"] += 1
            return divmod(n, K)

        for group in base.encoder.albert_layer_groups:
            for layer in group.albert_layers:
                handles.append(layer.register_forward_pre_hook(block_start(albert_index)))
                att = layer.attention
                for part in ("query", "key", "value"):
                    out_hook(getattr(att, part), f"attention.{part}")
                in_hook(att.dense, "attention.context")
                out_hook(att.dense, "attention.output_projection")
                out_hook(att, "attention.probs", index=1)
                out_hook(att, "attention_output", index=0)
                out_hook(layer.ffn, "ffn.intermediate")
                out_hook(layer.activation, "ffn.activation")
                out_hook(layer.ffn_output, "ffn.output_projection")
                out_hook(layer, "ffn_output")
        if getattr(base, "pooler", None) is not None:
            global_out(base.pooler, "pooler.dense")
            global_out(base.pooler_activation, "pooled_output")
        if hasattr(hf_model, "sop_classifier"):
            global_out(hf_model.sop_classifier, "sop_logits")
        _task_hooks(hf_model, global_out)
        if hasattr(hf_model, "predictions"):
            head = hf_model.predictions
            global_out(head.dense, "mlm.dense")
            global_out(head.activation, "mlm.activation")
            global_out(head.LayerNorm, "mlm.layer_norm")
            global_out(head, "mlm_logits")
    else:
        global_out(emb.LayerNorm, "embeddings.output")
        for l, layer in enumerate(base.encoder.layer):
            handles.append(layer.register_forward_pre_hook(block_start(lambda mod, l=l: (l, 0))))
            sa = layer.attention.self
            for part in ("query", "key", "value"):
                out_hook(getattr(sa, part), f"attention.{part}")
            out_hook(sa, "attention.probs", index=1)
            out_hook(sa, "attention.context", index=0)
            out_hook(layer.attention.output.dense, "attention.output_projection")
            out_hook(layer.attention, "attention_output", index=0)
            out_hook(layer.intermediate.dense, "ffn.intermediate")
            out_hook(layer.intermediate.intermediate_act_fn, "ffn.activation")
            out_hook(layer.output.dense, "ffn.output_projection")
            out_hook(layer, "ffn_output")
        if getattr(base, "pooler", None) is not None:
            global_out(base.pooler.dense, "pooler.dense")
            global_out(base.pooler, "pooled_output")
        _task_hooks(hf_model, global_out)
        cls = getattr(hf_model, "cls", None)
        if cls is not None and hasattr(cls, "predictions"):
            transform = cls.predictions.transform
            global_out(transform.dense, "mlm.dense")
            global_out(transform.transform_act_fn, "mlm.activation")
            global_out(transform.LayerNorm, "mlm.layer_norm")
            global_out(cls.predictions, "mlm_logits")
        if cls is not None and hasattr(cls, "seq_relationship"):
            global_out(cls.seq_relationship, "sop_logits")
    return handles


def _task_hooks(hf_model, global_out) -> None:
    """The task heads' raw output, traced by ref-bert as "head.logits": the classifier's (B, L),
    (B, T, L) or (B * C, 1) for multiple choice, or qa_outputs' (B, T, 2)."""
    for attr in ("classifier", "qa_outputs"):
        module = getattr(hf_model, attr, None)
        if module is not None:
            global_out(module, "head.logits")


@contextmanager
def capture(hf_model):
    """``with capture(hf) as store: hf(...)``: ``store`` fills with the activations by ref-bert trace
    name (see :func:`capture_hooks`); the hooks are removed on leaving the block."""
    store: dict = {}
    handles = capture_hooks(hf_model, store)
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def word_lookup(hf_model):
    """``with word_lookup(hf) as kept: hf(...)``: ``kept["output"]`` is the word-embedding lookup's
    output (before the position and token-type embeddings are added), its gradient retained, so that
    after ``backward`` ``kept["output"].grad`` is the gradient that reaches the lookup."""
    kept: dict = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["output"] = out

    handle = hf_model.get_input_embeddings().register_forward_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()


__all__ = ["DTYPES", "ORDER_LABEL", "torch_dtype", "model_class", "hf_config", "from_config", "from_model",
           "from_pretrained", "quiet_transformers", "forward_kwargs", "parameters", "capture_hooks", "capture", "word_lookup"]
