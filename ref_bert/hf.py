"""Hugging Face checkpoints in and out: ALBERT and BERT, with one name map in one place.

Supported architectures (``config.json`` "architectures", else "model_type" plus the tensor names),
one per :class:`Config` head (``Config.architecture``):

    AlbertModel, AlbertForPreTraining, AlbertForMaskedLM, AlbertForSequenceClassification,
    AlbertForTokenClassification, AlbertForQuestionAnswering, AlbertForMultipleChoice
                                                              tensors under "albert." (bare for AlbertModel)
    BertModel, BertForPreTraining, BertForMaskedLM, BertLMHeadModel, BertForNextSentencePrediction,
    BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering,
    BertForMultipleChoice                                     tensors under "bert."   (bare for BertModel)

A checkpoint can be read as another head of the same family (``read_hf(dir, head=...)``): the encoder
(and the pooler, and any head tensors with the same name and shape) come from the checkpoint, the rest
is reported ``missing`` (the model initialises it freshly, with a warning), and the checkpoint's head
tensors the new head does not use are reported ``unused``.

A sentence-transformers directory is read through its ``modules.json``: the weights and config are those of
its Transformer module (:func:`transformer_directory`; docs/reference.md §7.2). The tokenizer beside the
weights is :mod:`ref_bert.tokenization`'s business.

Everything a checkpoint depends on comes from its config.json (hidden_act, layer_norm_eps, groups,
sizes, pad_token_id, dropouts), with Hugging Face's own defaults for keys an old config omits.

The name map (:func:`hf_name_map`) pairs every ref-bert parameter with its Hugging Face name in the
*ForPreTraining layout and says whether it is transposed: our weights are (n_in, n_out) for ``x @ W``,
``nn.Linear`` stores (n_out, n_in). Loading, saving and :func:`hf_state_dict` all use it.

    ALBERT (HF groups: attention/ffn set a = g * K + m  <->  albert_layer_groups.g.albert_layers.m)
      embeddings.{word,position,token_type}_embeddings  albert.embeddings.*.weight
      embeddings.layer_norm.*                           albert.embeddings.LayerNorm.*
      embeddings.projection.*                           albert.encoder.embedding_hidden_mapping_in.*   (T)
      encoder.attention.a.{query,key,value}.*           ...albert_layers.m.attention.{query,key,value}.* (T)
      encoder.attention.a.output.*                      ...albert_layers.m.attention.dense.*           (T)
      encoder.attention.a.layer_norm.*                  ...albert_layers.m.attention.LayerNorm.*
      encoder.ffn.a.intermediate.* / output.*           ...albert_layers.m.ffn.* / ffn_output.*        (T)
      encoder.ffn.a.layer_norm.*                        ...albert_layers.m.full_layer_layer_norm.*
      pooler.*                                          albert.pooler.*                                (T)
      mlm.dense.* / mlm.layer_norm.* / mlm.bias         predictions.dense.* (T) / predictions.LayerNorm.* / predictions.bias
      sop.*                                             sop_classifier.classifier.*                    (T)
      classifier.* / qa_outputs.*                       classifier.* / qa_outputs.*                    (T)
    BERT (layer l owns attention set l and ffn set l)
      embeddings.*                                      bert.embeddings.* (as ALBERT, no projection)
      encoder.attention.l.{query,key,value}.*           bert.encoder.layer.l.attention.self.{query,key,value}.* (T)
      encoder.attention.l.output.* / layer_norm.*       bert.encoder.layer.l.attention.output.dense.* (T) / .LayerNorm.*
      encoder.ffn.l.intermediate.*                      bert.encoder.layer.l.intermediate.dense.*      (T)
      encoder.ffn.l.output.* / layer_norm.*             bert.encoder.layer.l.output.dense.* (T) / .LayerNorm.*
      pooler.*                                          bert.pooler.dense.*                            (T)
      mlm.dense.* / mlm.layer_norm.* / mlm.bias         cls.predictions.transform.dense.* (T) / .transform.LayerNorm.* / cls.predictions.bias
      sop.*                                             cls.seq_relationship.*  (ForPreTraining and
                                                        ForNextSentencePrediction alike)               (T)
      classifier.* / qa_outputs.*                       classifier.* / qa_outputs.*                    (T)

The MLM decoder is tied: ``predictions.decoder.weight`` is the word embedding table and
``predictions.decoder.bias`` is ``predictions.bias``; like ``save_pretrained`` we do not write them.
When a checkpoint has them they must equal the tensors they are tied to (transformers unties copies
that differ, which ref-bert cannot represent).

Behaviour differences that are *not* in the tensors, and how they map onto :class:`Config`:
* HF's AlbertLayer never applies its ffn_output dropout -> ``ffn_output_dropout=False``; BERT's
  BertOutput does -> ``True``.
* AlbertSOPHead applies ``classifier_dropout_prob``; BertOnlyNSPHead / BertPreTrainingHeads apply no
  dropout -> ``classifier_dropout_prob=0`` for BERT. The task heads read their dropout as transformers
  does (``Config.head_dropout_prob``); config.json's ``classifier_dropout`` (BERT), ``num_labels`` (or
  the length of ``id2label``), ``problem_type`` and ``is_decoder`` (BERT) are kept.
* HF ALBERT always has ``embedding_hidden_mapping_in``, even when E == H; ref-bert has no projection then.
  Such a checkpoint loads only if that projection is exactly the identity with zero bias (what
  :func:`write_hf` writes for an E == H ALBERT model); otherwise it is a ValueError.
* Masked attention: HF adds the dtype's most negative number, ref-bert ``attention_mask_value``
  (-10000); the softmax is identical whenever a query row sees at least one key.
* ``nn.Embedding(padding_idx=pad_token_id)`` gives the pad row of the word embeddings no gradient from
  the lookup (ref-bert does give it one); forward results are unaffected.

Where this module sits: it knows files, configs and names, never a :class:`ref_bert.Model`. It reads
a directory into a :class:`Config` and host arrays under our names (:func:`read_hf`) and writes such
arrays back (:func:`write_hf`); ``Model.from_hf`` / ``Model.save_hf`` / ``Model.hf_state_dict`` are
the thin methods that move them onto and off the model's backend. So ``model`` imports ``hf``, and
nothing here imports ``model``: no import circle.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ACTIVATIONS, BERT_ONLY_HEADS, HEADS, Config
from .files import atomic_write_json, check_finite, check_float_tensors, load_tensors, read_json, save_tensors
from .params import parameter_shapes

# name: (family, Config.head), e.g. "AlbertForSequenceClassification": ("albert", "sequence_classification")
ARCHITECTURES = {
    ("Albert" if family == "albert" else "Bert") + suffix: (family, head)
    for family in ("albert", "bert") for head, (suffix, _) in HEADS.items()
    if family == "bert" or head not in BERT_ONLY_HEADS
}
# The head-only options a config.json may carry (Config fields), read by config_from_hf.
HEAD_OPTIONS = ("num_labels", "problem_type", "classifier_dropout", "classifier_dropout_prob", "is_decoder")

# Hugging Face's defaults (AlbertConfig / BertConfig), used for keys an older config.json omits.
HF_DEFAULTS = {
    "albert": dict(vocab_size=30000, embedding_size=128, hidden_size=4096, num_hidden_layers=12,
                   num_hidden_groups=1, num_attention_heads=64, intermediate_size=16384, inner_group_num=1,
                   hidden_act="gelu_new", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
                   layer_norm_eps=1e-12, classifier_dropout_prob=0.1, pad_token_id=0),
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0),
}
BASE_PREFIX = {"albert": "albert.", "bert": "bert."}
DECODER_NAMES = {
    "albert": ("predictions.decoder.weight", "predictions.decoder.bias"),
    "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
}
PROJECTION_NAMES = ("albert.encoder.embedding_hidden_mapping_in.weight",
                    "albert.encoder.embedding_hidden_mapping_in.bias")
# Non-persistent buffers that some older checkpoints contain; they carry no weights.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


# --- the name map ------------------------------------------------------------------------------
def _albert_layout(config: Config) -> tuple[int, int]:
    """(number of HF groups, inner_group_num) if ``config`` is expressible as HF ALBERT, else ValueError.

    HF ALBERT runs, for layer i, the K blocks of group ``int(i / (L / G))``, each block owning its
    attention and FFN. So every layer's schedule must be [(g K + m, g K + m) for m < K] with that g.
    """
    K, L = config.inner_group_num, config.num_hidden_layers
    if config.num_attention_sets != config.num_ffn_sets:
        raise ValueError(f"Config.sharing={config.sharing!r} cannot be expressed as Hugging Face ALBERT: HF "
                         f"shares attention and FFN together (expected sharing 'all' or 'none')")
    G = config.num_attention_sets // K
    for i, blocks in enumerate(config.block_schedule()):
        g = int(i / (L / G))
        if blocks != [(g * K + m, g * K + m) for m in range(K)]:
            raise ValueError(
                f"layer {i} of this config runs blocks {blocks}, but Hugging Face ALBERT with "
                f"num_hidden_groups={G}, inner_group_num={K} runs group {g} there "
                f"(group_rule={config.group_rule!r}, sharing={config.sharing!r} cannot be expressed)")
    return G, K


def _check_bert_layout(config: Config) -> None:
    if config.has_projection:
        raise ValueError(f"a BERT export needs embedding_size == hidden_size, got "
                         f"{config.embedding_size} != {config.hidden_size}")
    expected = [[(i, i)] for i in range(config.num_hidden_layers)]
    if config.block_schedule() != expected:
        raise ValueError(f"Config (sharing={config.sharing!r}, num_hidden_groups={config.num_hidden_groups}, "
                         f"inner_group_num={config.inner_group_num}) cannot be expressed as Hugging Face BERT, "
                         f"which gives every layer its own attention and FFN (expected sharing='none')")


def hf_name_map(config: Config) -> list[tuple[str, str, bool]]:
    """``(our name, Hugging Face name, transposed)`` for every parameter of ``config``'s model (its head
    decides which), in our parameter order.

    HF names are those of ``config.architecture`` (base model under "albert."/"bert."). Raises
    ValueError when the config cannot be expressed in Hugging Face's layout.
    """
    entries: list[tuple[str, str, bool]] = []
    ours_names = parameter_shapes(config, heads=True)

    def add(ours, hf, transpose=False):
        entries.append((ours, hf, transpose))

    def linear(ours, hf):
        add(f"{ours}.weight", f"{hf}.weight", True)
        add(f"{ours}.bias", f"{hf}.bias")

    def norm(ours, hf):
        add(f"{ours}.weight", f"{hf}.weight")
        add(f"{ours}.bias", f"{hf}.bias")

    family = config.model_type
    base = BASE_PREFIX[family]
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        add(f"embeddings.{table}", f"{base}embeddings.{table}.weight")
    norm("embeddings.layer_norm", f"{base}embeddings.LayerNorm")
    if family == "albert":
        G, K = _albert_layout(config)
        if config.has_projection:
            linear("embeddings.projection", f"{base}encoder.embedding_hidden_mapping_in")
        for a in range(G * K):
            g, m = divmod(a, K)
            hf = f"{base}encoder.albert_layer_groups.{g}.albert_layers.{m}"
            for part in ("query", "key", "value"):
                linear(f"encoder.attention.{a}.{part}", f"{hf}.attention.{part}")
            linear(f"encoder.attention.{a}.output", f"{hf}.attention.dense")
            norm(f"encoder.attention.{a}.layer_norm", f"{hf}.attention.LayerNorm")
            linear(f"encoder.ffn.{a}.intermediate", f"{hf}.ffn")
            linear(f"encoder.ffn.{a}.output", f"{hf}.ffn_output")
            norm(f"encoder.ffn.{a}.layer_norm", f"{hf}.full_layer_layer_norm")
        linear("pooler", f"{base}pooler")
        linear("mlm.dense", "predictions.dense")
        norm("mlm.layer_norm", "predictions.LayerNorm")
        add("mlm.bias", "predictions.bias")
        linear("sop", "sop_classifier.classifier")
    else:
        _check_bert_layout(config)
        for l in range(config.num_hidden_layers):
            hf = f"{base}encoder.layer.{l}"
            for part in ("query", "key", "value"):
                linear(f"encoder.attention.{l}.{part}", f"{hf}.attention.self.{part}")
            linear(f"encoder.attention.{l}.output", f"{hf}.attention.output.dense")
            norm(f"encoder.attention.{l}.layer_norm", f"{hf}.attention.output.LayerNorm")
            linear(f"encoder.ffn.{l}.intermediate", f"{hf}.intermediate.dense")
            linear(f"encoder.ffn.{l}.output", f"{hf}.output.dense")
            norm(f"encoder.ffn.{l}.layer_norm", f"{hf}.output.LayerNorm")
        linear("pooler", f"{base}pooler.dense")
        linear("mlm.dense", "cls.predictions.transform.dense")
        norm("mlm.layer_norm", "cls.predictions.transform.LayerNorm")
        add("mlm.bias", "cls.predictions.bias")
        linear("sop", "cls.seq_relationship")
    linear("classifier", "classifier")
    linear("qa_outputs", "qa_outputs")
    return [entry for entry in entries if entry[0] in ours_names]


def _to_hf_layout(array: np.ndarray, transpose: bool) -> np.ndarray:
    return np.ascontiguousarray(array.T if transpose else array)


def to_hf_names(config: Config, tensors: dict) -> dict:
    """Map host arrays under our names (all parameters of ``config``'s model with heads; any dict with
    our names and shapes, such as the gradients of ``loss_and_grads``) to Hugging Face names and layouts.

    Keys are those of ``dict(hf_model.named_parameters())`` for ``config.architecture`` (a bare
    Albert/BertModel's with the base prefix, as ``hf_torch.parameters`` writes them): the tied decoder
    appears once, as the word embeddings and ``predictions.bias``. For an E == H ALBERT model the
    identity ``embedding_hidden_mapping_in`` that :func:`write_hf` adds is not included (ref-bert has
    no such parameter, so it has no gradient either).
    """
    shapes = parameter_shapes(config, heads=True)
    out = {}
    for ours, hf, transpose in hf_name_map(config):
        if ours not in tensors:
            raise ValueError(f"hf_state_dict: tensor {ours!r} is missing from the given dict")
        array = np.asarray(tensors[ours])
        if tuple(array.shape) != tuple(shapes[ours]):
            raise ValueError(f"hf_state_dict: tensor {ours!r} has shape {tuple(array.shape)}, expected {shapes[ours]}")
        out[hf] = _to_hf_layout(array, transpose)
    return out


# --- configs -----------------------------------------------------------------------------------
# The types of the config.json keys that config_from_hf reads (null is allowed where HF allows it).
_HF_INT_KEYS = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_hidden_groups",
                "num_attention_heads", "intermediate_size", "inner_group_num", "max_position_embeddings",
                "type_vocab_size", "pad_token_id", "num_labels")
_HF_FLOAT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob",
                  "classifier_dropout", "initializer_range", "layer_norm_eps")
_HF_STR_KEYS = ("hidden_act", "position_embedding_type", "model_type", "_name_or_path", "problem_type")
_HF_BOOL_KEYS = ("is_decoder", "add_cross_attention", "tie_word_embeddings")


def check_hf_config_types(hf, where: str = "config.json") -> dict:
    """``hf`` must be a JSON object whose keys read here have the right JSON types (integers for sizes
    and ids, never booleans; numbers for probabilities and epsilons; strings; booleans for flags);
    ValueError naming ``where``, the key, the value and the type expected. Returns ``hf``."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where} holds a JSON {type(hf).__name__}, expected an object (a Hugging Face config)")

    def bad(key, expected):
        raise ValueError(f"{where}: {key}={hf[key]!r:.80} is invalid; expected {expected}")

    for key in _HF_INT_KEYS:
        if hf.get(key) is not None and (not isinstance(hf[key], int) or isinstance(hf[key], bool)):
            bad(key, "an integer")
    for key in _HF_FLOAT_KEYS:
        value = hf.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            bad(key, "a number")
    for key in _HF_STR_KEYS:
        if hf.get(key) is not None and not isinstance(hf[key], str):
            bad(key, "a string")
    for key in _HF_BOOL_KEYS:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            bad(key, "true or false")
    archs = hf.get("architectures")
    if archs is not None and not isinstance(archs, str) and not (
            isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        bad("architectures", "a list of strings")
    if hf.get("id2label") is not None and not isinstance(hf["id2label"], dict):
        bad("id2label", "an object (label id -> name)")
    return hf


def config_from_hf(hf: dict, family: str, name: str = "hf", head: str = "pretraining") -> Config:
    """A Hugging Face config.json dict -> :class:`Config` (every checkpoint-relevant value from ``hf``),
    with the given ``head`` and the head options config.json records (num_labels or id2label,
    problem_type, classifier_dropout, is_decoder)."""
    check_hf_config_types(hf, f"config.json ({name})")
    d = {**HF_DEFAULTS[family], **{k: v for k, v in hf.items() if v is not None or k == "pad_token_id"}}
    act = d["hidden_act"]
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r} is not supported; expected one of {ACTIVATIONS}")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ValueError(f"config.json position_embedding_type={pos_type!r} is not supported; expected 'absolute'")
    if hf.get("add_cross_attention"):
        raise ValueError(f"config.json add_cross_attention={hf.get('add_cross_attention')!r}: ref-bert has no "
                         f"cross-attention (expected false)")
    if hf.get("is_decoder") and family != "bert":
        raise ValueError(f"config.json is_decoder={hf.get('is_decoder')!r}: only BERT has a decoder mode "
                         f"(expected false for {family})")
    if hf.get("tie_word_embeddings") is False:
        raise ValueError("config.json tie_word_embeddings=false: ref-bert always ties the MLM decoder to the "
                         "word embeddings (expected true)")
    # pad_token_id null means nn.Embedding has no padding row; it only matters for that gradient rule.
    pad = d["pad_token_id"] if d["pad_token_id"] is not None else 0
    common = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        hidden_act=act, hidden_dropout_prob=float(d["hidden_dropout_prob"]),
        attention_probs_dropout_prob=float(d["attention_probs_dropout_prob"]),
        max_position_embeddings=d["max_position_embeddings"], type_vocab_size=d["type_vocab_size"],
        layer_norm_eps=float(d["layer_norm_eps"]), initializer_range=float(d["initializer_range"]),
        initializer="normal", group_rule="hf", pad_token_id=pad, model_type=family, name=name)
    # transformers keeps num_labels as the length of id2label (and accepts num_labels itself)
    id2label = hf.get("id2label")
    num_labels = hf["num_labels"] if hf.get("num_labels") is not None else (
        len(id2label) if isinstance(id2label, dict) and id2label else 2)     # 0 reaches Config, which refuses it
    common.update(head=head, num_labels=num_labels, problem_type=hf.get("problem_type"))
    if family == "albert":
        prob = d["classifier_dropout_prob"]
        return Config(**common, embedding_size=d["embedding_size"], num_hidden_groups=d["num_hidden_groups"],
                      inner_group_num=d["inner_group_num"], sharing="all",
                      classifier_dropout_prob=None if prob is None else float(prob), ffn_output_dropout=False)
    classifier_dropout = hf.get("classifier_dropout")
    return Config(**common, embedding_size=d["hidden_size"], num_hidden_groups=1, inner_group_num=1,
                  sharing="none", classifier_dropout_prob=0.0, ffn_output_dropout=True,
                  classifier_dropout=None if classifier_dropout is None else float(classifier_dropout),
                  is_decoder=bool(hf.get("is_decoder", False)))


def config_to_hf(config: Config, dtype: str = "float32") -> dict:
    """:class:`Config` -> Hugging Face config.json dict for Albert/BertForPreTraining.

    ValueError for configs whose forward pass HF cannot express; a warning for training-only
    differences (dropout placement) that HF would not reproduce.
    """
    family = config.model_type
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"Config.hidden_act={config.hidden_act!r} has no Hugging Face equivalent here; "
                         f"expected one of {ACTIVATIONS}")
    d = dict(architectures=[config.architecture],
             model_type=family, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
             num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
             intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
             hidden_dropout_prob=config.hidden_dropout_prob,
             attention_probs_dropout_prob=config.attention_probs_dropout_prob,
             max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
             initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps,
             pad_token_id=config.pad_token_id, tie_word_embeddings=True, dtype=dtype, torch_dtype=dtype)
    training_only = []
    if family == "albert":
        G, K = _albert_layout(config)
        d.update(embedding_size=config.embedding_size, num_hidden_groups=G, inner_group_num=K,
                 classifier_dropout_prob=config.classifier_dropout_prob)
        if config.ffn_output_dropout and config.hidden_dropout_prob > 0:
            training_only.append("ffn_output_dropout=True (HF ALBERT never applies that dropout)")
    else:
        _check_bert_layout(config)
        d.update(position_embedding_type="absolute", is_decoder=config.is_decoder, add_cross_attention=False,
                 classifier_dropout=config.classifier_dropout)
        if not config.ffn_output_dropout and config.hidden_dropout_prob > 0:
            training_only.append("ffn_output_dropout=False (HF BERT applies that dropout)")
        if config.head == "pretraining" and config.classifier_dropout_prob > 0:
            training_only.append(f"classifier_dropout_prob={config.classifier_dropout_prob} "
                                 f"(HF's NSP head applies no dropout)")
    if config.head in ("sequence_classification", "token_classification", "question_answering"):
        d["num_labels"] = config.num_labels
    if config.head == "sequence_classification" and config.problem_type is not None:
        d["problem_type"] = config.problem_type
    if training_only:
        warnings.warn(f"save_hf: Hugging Face will not reproduce training-time behaviour of this config: "
                      f"{'; '.join(training_only)}. Inference is unaffected.", stacklevel=3)
    return d


# --- reading checkpoint files -------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict:
    """Host NumPy arrays from a safetensors file (bfloat16 widened exactly to float32), the header checked
    whole before any tensor is read (:func:`ref_bert.files.load_tensors`)."""
    return load_tensors(path)[0]


def _read_torch_bin(path: Path) -> dict:
    """A pickle-based ``pytorch_model.bin``, read with ``torch.load(weights_only=True)``, whose restricted
    unpickler only rebuilds tensors and plain containers and refuses anything that could run code."""
    try:
        import torch  # optional: only for this legacy format
    except ImportError:
        raise ValueError(f"{path} is a pickle-based PyTorch checkpoint; reading it safely needs torch "
                         f"(torch.load(weights_only=True)), which is not installed. Convert it to "
                         f"model.safetensors, or install torch.") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler raises UnpicklingError for anything but tensors
        raise ValueError(f"refusing to load {path}: torch.load(weights_only=True) rejected it ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a dict of tensors (a state_dict)")
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}, expected a tensor")
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # exact: every bfloat16 is a float32
        out[name] = t.numpy().copy()
    return out


def _safe_shard_name(directory: Path, name) -> Path:
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"{directory}: shard index names file {name!r}, expected a plain file name in that directory")
    return directory / name


def _shard_files(directory: Path, index: str) -> list:
    """The shard files a ``*.index.json`` names, each checked to be a file of ``directory``."""
    path = directory / index
    index_json = read_json(path, "shard index")
    weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path} is not a valid shard index: weight_map is {weight_map!r:.80}, expected a "
                         f"non-empty object mapping tensor names to shard file names")
    bad = [v for v in weight_map.values() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{path}: weight_map value {bad[0]!r:.60} is invalid; expected a shard file name")
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = _safe_shard_name(directory, name)
        if not shard.is_file():
            raise ValueError(f"{path} names shard {name!r}, but {shard} "
                             f"{'is a directory' if shard.is_dir() else 'does not exist'}; expected a weights file")
        shards.append(shard)
    return shards


def read_hf_tensors(directory) -> dict:
    """Every tensor of a Hugging Face model directory, as host NumPy arrays keyed by HF name.

    Looks for model.safetensors, then model.safetensors.index.json (shards), then pytorch_model.bin and
    its index (through torch.load(weights_only=True) only)."""
    directory = Path(directory)
    for weights, index, reader in (("model.safetensors", "model.safetensors.index.json", _read_safetensors),
                                   ("pytorch_model.bin", "pytorch_model.bin.index.json", _read_torch_bin)):
        if (directory / weights).is_file():
            return reader(directory / weights)
        if (directory / index).is_file():
            out = {}
            for shard in _shard_files(directory, index):
                out.update(reader(shard))
            return out
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise ValueError(f"{directory} has no model.safetensors or pytorch_model.bin (nor a shard index); "
                     f"found {present}")


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json (expected a Hugging Face model directory)")
    return check_hf_config_types(read_json(path, "Hugging Face config"), str(path))


def _normalise_names(tensors: dict) -> dict:
    """Old checkpoints call LayerNorm parameters gamma/beta; drop the non-persistent id buffers."""
    out = {}
    for name, array in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if "LayerNorm." in name or "layer_norm." in name:
            if name.endswith(".gamma"):
                name = name[: -len("gamma")] + "weight"
            elif name.endswith(".beta"):
                name = name[: -len("beta")] + "bias"
        out[name] = array
    return out


def detect_architecture(hf_config: dict, tensors: dict) -> tuple[str, str, bool]:
    """(architecture, family, tensors carry the "albert."/"bert." prefix). ValueError when unsupported."""
    archs = hf_config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    has = {fam: any(k.startswith(BASE_PREFIX[fam]) for k in tensors) for fam in BASE_PREFIX}
    bare = any(k.startswith("embeddings.") for k in tensors)
    if archs:
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise ValueError(f"config.json architectures={archs} is not supported; expected one of "
                             f"{sorted(ARCHITECTURES)}")
        arch = known[0]
        family = ARCHITECTURES[arch][0]
    else:
        family = hf_config.get("model_type")
        if family not in BASE_PREFIX:
            raise ValueError(f"config.json has no architectures and model_type={family!r}; expected "
                             f"'albert' or 'bert'")
        heads = any(k.startswith(("predictions.", "cls.predictions.")) for k in tensors)
        nsp = any(k.startswith(("sop_classifier.", "cls.seq_relationship.")) for k in tensors)
        pooler = any(".pooler." in "." + k for k in tensors)
        name = "Albert" if family == "albert" else "Bert"
        task = sorted({k.split(".")[0] for k in tensors if k.startswith(("classifier.", "qa_outputs."))})
        if task:
            raise ValueError(f"config.json has no architectures, and the checkpoint has {', '.join(task)} tensors, "
                             f"which several {name} heads use; add \"architectures\": [\"{name}For...\"] to config.json")
        arch = (f"{name}ForPreTraining" if nsp else f"{name}ForMaskedLM" if heads and not pooler
                else f"{name}ForPreTraining" if heads else f"{name}Model")
    other = "bert" if family == "albert" else "albert"
    if has[other] and not has[family]:
        raise ValueError(f"architecture {arch} expects tensors under {BASE_PREFIX[family]!r}, but the "
                         f"checkpoint's are under {BASE_PREFIX[other]!r}")
    if has[family]:
        return arch, family, True
    if bare:
        return arch, family, False
    raise ValueError(f"cannot find the {family} embeddings in the checkpoint (expected "
                     f"'{BASE_PREFIX[family]}embeddings.word_embeddings.weight' or "
                     f"'embeddings.word_embeddings.weight')")


def architecture_of(directory) -> tuple[str, str]:
    """(architecture, family) of a Hugging Face model directory, as :func:`read_hf` detects them."""
    directory = Path(directory)
    arch, family, _ = detect_architecture(_read_hf_config(directory), _normalise_names(read_hf_tensors(directory)))
    return arch, family


# --- sentence-transformers directories ---------------------------------------------------------------
SENTENCE_TRANSFORMERS_MODULES = "modules.json"


def sentence_transformers_modules(directory) -> list | None:
    """The module list of a sentence-transformers directory (its ``modules.json``: entries with "idx",
    "name", "path", "type"), or None when ``directory`` has no modules.json. ValueError when it is malformed
    or names a path outside the directory."""
    path = Path(directory) / SENTENCE_TRANSFORMERS_MODULES
    if not path.is_file():
        return None
    modules = read_json(path, "sentence-transformers module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str)
                                                and isinstance(m.get("type"), str) for m in modules):
        raise ValueError(f"{path} is not a sentence-transformers module list (expected a JSON list of objects "
                         f"with \"path\" and \"type\")")
    for m in modules:
        parts = Path(m["path"]).parts
        if Path(m["path"]).is_absolute() or ".." in parts:
            raise ValueError(f"{path}: module path {m['path']!r} leaves the directory; expected a sub-directory")
    return sorted(modules, key=lambda m: m.get("idx", 0))


def transformer_directory(path) -> Path:
    """Where the transformer's config.json and weights are: ``path`` itself, or, in a sentence-transformers
    directory, the path of its ``...models.Transformer`` module (often "" = the directory itself)."""
    directory = Path(path)
    modules = sentence_transformers_modules(directory)
    if modules is None:
        return directory
    found = [m for m in modules if m["type"].rsplit(".", 1)[-1] == "Transformer"]
    if not found:
        raise ValueError(f"{directory / SENTENCE_TRANSFORMERS_MODULES} lists no Transformer module (types: "
                         f"{[m['type'] for m in modules]}); expected sentence_transformers.models.Transformer")
    return directory / found[0]["path"]


# --- loading -----------------------------------------------------------------------------------
@dataclass
class HfCheckpoint:
    """What :func:`read_hf` finds in a Hugging Face directory.

    config:  the :class:`Config` of the model to build: config.json's, with the head asked for
             (the checkpoint's own by default).
    tensors: host arrays under our names and in our layout: every parameter of that model the
             checkpoint has (the encoder always; the pooler and head tensors where names and shapes match).
    missing: our names of the parameters of that model the checkpoint lacks (the pooler of *ForMaskedLM
             asked for as a classifier, a head added to *Model, ...): a model built from ``config``
             keeps its fresh initialisation for them.
    unused:  Hugging Face names of the checkpoint's head tensors the asked-for head does not use.
    architecture, family: the checkpoint's, e.g. ("AlbertForPreTraining", "albert").
    """

    config: Config
    tensors: dict
    missing: list
    architecture: str
    family: str
    directory: Path
    unused: list = None


def read_hf(path, head: str | None = None, allow_nonfinite: bool = False, **options) -> HfCheckpoint:
    """Read a Hugging Face ALBERT/BERT directory into a config and host arrays under our names.

    ``head`` (a :class:`Config` head, e.g. "sequence_classification") and ``options`` (Config fields such
    as ``num_labels``, ``problem_type``, ``classifier_dropout``) describe the model to build when it is not
    the checkpoint's own architecture. A missing encoder tensor, an unexpected tensor, a tensor of the
    wrong shape or dtype (weights are floating point), a non-finite weight (unless ``allow_nonfinite``,
    for debugging) or an unsupported config is a ValueError naming the directory and the tensor.
    Everything is checked before a model is built from the result: the config's sizes against the
    tensors' shapes, so a config.json that claims more than its weights hold fails here, not in an
    allocation.
    """
    directory = Path(path)
    hf_config = _read_hf_config(directory)
    tensors = _normalise_names(read_hf_tensors(directory))
    check_float_tensors(tensors, str(directory))
    if not allow_nonfinite:
        check_finite(tensors, str(directory))
    arch, family, prefixed = detect_architecture(hf_config, tensors)
    source_head = ARCHITECTURES[arch][1]
    config = config_from_hf(hf_config, family, name=str(hf_config.get("_name_or_path") or directory.name),
                            head=source_head)
    shapes = parameter_shapes(config, heads=True)
    base = BASE_PREFIX[family]
    decoder_bias = DECODER_NAMES[family][1]
    if _mlm_bias_name(family) not in tensors and decoder_bias in tensors:  # some checkpoints keep only this copy
        tensors[_mlm_bias_name(family)] = tensors.pop(decoder_bias)

    def file_name(hf_name: str) -> str:
        return hf_name if prefixed or not hf_name.startswith(base) else hf_name[len(base):]

    found, used, hf_of = {}, set(), {}
    for ours, hf, transpose in hf_name_map(config):
        key = file_name(hf)
        hf_of[ours] = key
        if key not in tensors:
            if ours.startswith(("mlm.", "sop.", "pooler.", "classifier.", "qa_outputs.")):
                continue    # a head the checkpoint lacks: fresh (reported as missing below)
            raise ValueError(f"{directory}: tensor {key!r} (ref-bert {ours!r}) is missing from the {arch} checkpoint")
        array = tensors[key]
        expected = tuple(reversed(shapes[ours])) if transpose else tuple(shapes[ours])
        if tuple(array.shape) != expected:
            raise ValueError(f"{directory}: tensor {key!r} has shape {tuple(array.shape)}, expected {expected} "
                             f"from config.json")
        found[ours] = array.T if transpose else array
        used.add(key)

    if family == "albert" and not config.has_projection:
        used |= _check_identity_projection(tensors, [file_name(n) for n in PROJECTION_NAMES], directory)
    used |= _check_tied_decoder(tensors, file_name(f"{base}embeddings.word_embeddings.weight"),
                                _mlm_bias_name(family), DECODER_NAMES[family], directory)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"{directory}: tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} are not "
                         f"part of {arch}; ref-bert cannot represent them")

    if head is not None or options:
        unknown = sorted(set(options) - set(HEAD_OPTIONS))
        if unknown:
            raise ValueError(f"read_hf: unknown head options {unknown}; expected some of {list(HEAD_OPTIONS)}")
        config = config.replace(head=source_head if head is None else head, **options)
    target = parameter_shapes(config, heads=True)
    tensors_out = {ours: a for ours, a in found.items() if ours in target and tuple(a.shape) == tuple(target[ours])}
    missing = [ours for ours in target if ours not in tensors_out]
    unused = sorted(hf_of[ours] for ours in found if ours not in tensors_out)
    return HfCheckpoint(config, tensors_out, missing, arch, family, directory, unused)


HEAD_GROUPS = ("albert.pooler", "bert.pooler", "pooler", "cls.predictions", "cls.seq_relationship", "predictions",
               "sop_classifier", "classifier", "qa_outputs")


def head_group(hf_name: str) -> str:
    """The head a Hugging Face tensor name belongs to, e.g. "cls.predictions" for
    "cls.predictions.transform.dense.weight" (the name itself when it is none of them)."""
    return next((g for g in HEAD_GROUPS if hf_name.startswith(g + ".")), hf_name)


def _mlm_bias_name(family: str) -> str:
    return "predictions.bias" if family == "albert" else "cls.predictions.bias"


def _check_identity_projection(tensors: dict, names, directory) -> set:
    weight_name, bias_name = names
    if weight_name not in tensors or bias_name not in tensors:
        raise ValueError(f"{directory}: ALBERT checkpoint lacks {weight_name!r}/{bias_name!r}")
    w, b = tensors[weight_name], tensors[bias_name]
    if w.ndim != 2 or w.shape[0] != w.shape[1] or not np.array_equal(w, np.eye(w.shape[0], dtype=w.dtype)) \
            or np.any(b != 0):
        raise ValueError(f"{directory}: embedding_size == hidden_size but {weight_name!r} is not the identity "
                         f"with zero bias; ref-bert has no E->H projection when E == H, so it cannot represent "
                         f"this checkpoint")
    return {weight_name, bias_name}


def _check_tied_decoder(tensors: dict, word_name: str, bias_name: str, decoder_names, directory) -> set:
    """A checkpoint may contain the tied copies decoder.weight (= word embeddings) and decoder.bias
    (= predictions.bias). Equal copies are redundant. Different ones make transformers (5.x) *untie*
    them, which ref-bert, whose decoder is the embedding table, cannot represent: ValueError."""
    used = set()
    for copy_name, source_name in zip(decoder_names, (word_name, bias_name)):
        if copy_name not in tensors:
            continue
        if source_name in tensors and not np.array_equal(tensors[copy_name], tensors[source_name]):
            raise ValueError(f"{directory}: {copy_name} differs from {source_name}, i.e. the MLM decoder is not "
                             f"tied; ref-bert always ties it (expected identical tensors)")
        used.add(copy_name)
    return used


# --- saving ------------------------------------------------------------------------------------
def write_hf(path, config: Config, tensors: dict, dtype: str) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers loads as ``config.architecture``.

    ``tensors``: host arrays under our names (every parameter, heads included), kept in ``dtype``; the
    tied decoder is left out (as ``save_pretrained`` does). An E == H ALBERT model gets the identity
    ``embedding_hidden_mapping_in`` HF requires. Reading it back with :func:`read_hf` gives every
    parameter bit for bit.
    """
    directory = Path(path)
    hf_config = config_to_hf(config, dtype=dtype)
    out = to_hf_names(config, tensors)
    if config.model_type == "albert" and not config.has_projection:
        H = config.hidden_size
        out[PROJECTION_NAMES[0]] = np.eye(H, dtype=dtype)
        out[PROJECTION_NAMES[1]] = np.zeros(H, dtype=dtype)
    save_tensors(directory / "model.safetensors", out, metadata={"format": "pt"})
    atomic_write_json(directory / "config.json", hf_config)
    return directory


__all__ = ["ARCHITECTURES", "HEAD_OPTIONS", "HfCheckpoint", "sentence_transformers_modules", "transformer_directory",
           "hf_name_map", "to_hf_names", "config_from_hf", "config_to_hf",
           "read_hf_tensors", "detect_architecture", "architecture_of", "read_hf", "write_hf"]
