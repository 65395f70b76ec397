"""Model configuration: one validated dataclass, with the published ALBERT and BERT sizes as presets.

Every behaviour a checkpoint depends on (activation, LayerNorm epsilon, groups, sizes) lives here,
never as a constant in the math. Field names follow Hugging Face's ``AlbertConfig`` / ``BertConfig``
so that a ``config.json`` maps onto it directly.

Cross-layer sharing (ALBERT section 3.1 and its ablation, Table 4) is expressed by two things:

* ``num_hidden_groups`` G and ``inner_group_num`` K, exactly as Hugging Face: the L layers are split
  into G groups; layer ``i`` runs the K blocks of group ``group_of_layer(i)`` in sequence.
* ``sharing``: which sublayers the layers *of one group* share. ``"all"`` (ALBERT's default: one
  parameter set per group, reused by every layer of the group), ``"attention"`` (attention shared,
  each layer its own FFN), ``"ffn"`` (FFN shared, each layer its own attention), ``"none"`` (every
  layer its own parameters: BERT). ``sharing="all"`` with ``num_hidden_groups == num_hidden_layers``
  is parameter-for-parameter the same model as ``sharing="none"``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .ops.activations import ACTIVATIONS

SHARING = ("all", "attention", "ffn", "none")
GROUP_RULES = ("hf", "tf")
INITIALIZERS = ("normal", "truncated_normal")
# Sane upper bounds on the sizes, far above any published model (ALBERT-xxlarge: H 4096, I 16384; the
# largest vocabularies ~1e6), so that a mistyped or hostile config.json fails here instead of asking
# for terabytes when the model is allocated.
SIZE_LIMITS = {"vocab_size": 1 << 24, "embedding_size": 1 << 16, "hidden_size": 1 << 16,
               "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12, "intermediate_size": 1 << 18,
               "max_position_embeddings": 1 << 20, "type_vocab_size": 1 << 16, "num_hidden_groups": 1 << 12,
               "inner_group_num": 1 << 8}
MASK_VALUE_LIMIT = 1e30
MAX_LABELS = 1 << 20     # a head's classes: a config.json cannot ask for a terabyte classifier

# The head on top of the encoder, and the Hugging Face class each one is (``Config.architecture``):
#   head                      Hugging Face class suffix      pooler  head parameters
HEADS = {
    "pretraining":             ("ForPreTraining", True),            # mlm.*, sop.*  (MLM + SOP / NSP)
    "base":                    ("Model", True),                     # none          (AlbertModel / BertModel)
    "masked_lm":               ("ForMaskedLM", False),              # mlm.*
    "causal_lm":               ("LMHeadModel", False),              # mlm.*         (BERT only: BertLMHeadModel)
    "next_sentence":           ("ForNextSentencePrediction", True),  # sop.*        (BERT only)
    "sequence_classification": ("ForSequenceClassification", True),  # classifier.* (H, num_labels)
    "token_classification":    ("ForTokenClassification", False),   # classifier.*  (H, num_labels)
    "question_answering":      ("ForQuestionAnswering", False),     # qa_outputs.*  (H, num_labels = 2)
    "multiple_choice":         ("ForMultipleChoice", True),         # classifier.*  (H, 1)
}
BERT_ONLY_HEADS = ("causal_lm", "next_sentence")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass(frozen=True)
class Config:
    """ALBERT/BERT architecture. Validated on construction; errors name the field and value.

    Sizes: V ``vocab_size``, E ``embedding_size``, H ``hidden_size``, I ``intermediate_size``,
    L ``num_hidden_layers``, heads ``num_attention_heads`` (head_dim = H / heads).
    """

    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    # ALBERT's head dropout (SOP, sequence classification, multiple choice; token classification falls
    # back to hidden_dropout_prob when it is None). For BERT it is ref-bert's own NSP-head dropout in
    # pretraining (0 in Hugging Face). See ``head_dropout_prob``.
    classifier_dropout_prob: Optional[float] = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    initializer: str = "normal"
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    sharing: str = "all"
    group_rule: str = "hf"
    pad_token_id: int = 0
    # Dropout after the FFN output projection: TF ALBERT and BERT apply it, HF's AlbertLayer defines
    # it but never applies it (docs/reference.md §1.2).
    ffn_output_dropout: bool = True
    # Added to attention scores at masked keys. -10000 is TF ALBERT's and UniLM's value. HF now uses
    # the dtype's most negative number; both give identical softmax outputs whenever a query row has
    # at least one visible key (exp(-10000) underflows to exactly 0 in float32 and float64), and a
    # finite value keeps fully masked rows (UniLM pad queries) finite and differentiable.
    attention_mask_value: float = -10000.0
    model_type: str = "albert"
    # --- the head (docs/reference.md §11): which Hugging Face architecture this model is -------------
    head: str = "pretraining"
    num_labels: int = 2                   # classifier width (sequence/token classification; QA needs 2)
    problem_type: Optional[str] = None    # sequence classification: None = chosen from labels, as HF
    classifier_dropout: Optional[float] = None   # BERT's head dropout; None falls back to hidden_dropout_prob
    is_decoder: bool = False              # BERT: causal self-attention in every layer (BertLMHeadModel)
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        def need(cond: bool, fieldname: str, expected: str):
            if not cond:
                raise ValueError(
                    f"Config.{fieldname}={getattr(self, fieldname)!r} is invalid: expected {expected}"
                )

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for f, most in SIZE_LIMITS.items():
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= most, f,
                 f"a positive integer at most {most}")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"a multiple of num_attention_heads={self.num_attention_heads}")
        for f, choices in (("hidden_act", ACTIVATIONS), ("sharing", SHARING), ("group_rule", GROUP_RULES),
                           ("initializer", INITIALIZERS), ("model_type", ("albert", "bert"))):
            need(isinstance(getattr(self, f), str) and getattr(self, f) in choices, f, f"one of {tuple(choices)}")
        for f in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, f)
            need(is_number(v) and 0.0 <= v < 1.0, f, "a probability in [0, 1)")
        for f in ("classifier_dropout_prob", "classifier_dropout"):
            v = getattr(self, f)
            need(v is None or (is_number(v) and 0.0 <= v < 1.0), f, "a probability in [0, 1) or None")
        need(is_number(self.layer_norm_eps) and 0 < self.layer_norm_eps <= 1, "layer_norm_eps",
             "a finite positive number at most 1")
        need(is_number(self.initializer_range) and 0 < self.initializer_range <= 1e3, "initializer_range",
             "a finite positive number at most 1000")
        need(self.num_hidden_groups <= self.num_hidden_layers, "num_hidden_groups",
             f"at most num_hidden_layers={self.num_hidden_layers}")
        need(isinstance(self.pad_token_id, int) and not isinstance(self.pad_token_id, bool)
             and 0 <= self.pad_token_id < self.vocab_size, "pad_token_id", f"an id in [0, vocab_size={self.vocab_size})")
        need(isinstance(self.ffn_output_dropout, bool), "ffn_output_dropout", "true or false")
        # Added to float32 scores: it must stay far from float32's range (3.4e38) so that a score plus
        # the mask cannot overflow to -inf (a fully masked row would then be NaN, not uniform).
        need(is_number(self.attention_mask_value) and -MASK_VALUE_LIMIT <= self.attention_mask_value < 0,
             "attention_mask_value", f"a finite negative number no smaller than -{MASK_VALUE_LIMIT:g} "
                                     f"(representable with headroom in float32)")
        need(isinstance(self.name, str), "name", "a string")
        need(isinstance(self.head, str) and self.head in HEADS, "head", f"one of {sorted(HEADS)}")
        need(self.model_type == "bert" or self.head not in BERT_ONLY_HEADS, "head",
             f"an ALBERT head (transformers has {', '.join(BERT_ONLY_HEADS)} for BERT only)")
        need(isinstance(self.num_labels, int) and not isinstance(self.num_labels, bool)
             and 0 < self.num_labels <= MAX_LABELS, "num_labels", f"a positive integer at most {MAX_LABELS}")
        need(self.head != "question_answering" or self.num_labels == 2, "num_labels",
             "2 for question answering (start and end logits)")
        need(self.problem_type is None or self.problem_type in PROBLEM_TYPES, "problem_type",
             f"None or one of {PROBLEM_TYPES}")
        need(isinstance(self.is_decoder, bool), "is_decoder", "a bool")
        need(not self.is_decoder or self.model_type == "bert", "is_decoder",
             "False for ALBERT (transformers' ALBERT has no decoder mode)")
        need(self.model_type == "bert" or self.classifier_dropout is None, "classifier_dropout",
             "None for ALBERT (ALBERT's heads read classifier_dropout_prob)")
        if self.head in ("pretraining", "sequence_classification", "multiple_choice") and self.model_type == "albert":
            need(self.classifier_dropout_prob is not None, "classifier_dropout_prob",
                 f"a probability for ALBERT's {self.head} head (only token classification falls back to "
                 f"hidden_dropout_prob when it is None)")
        if self.head == "pretraining" and self.model_type == "bert":
            need(self.classifier_dropout_prob is not None, "classifier_dropout_prob",
                 "a probability (ref-bert's NSP-head dropout in BERT pretraining)")
        # Every group must be used by at least one layer, or its parameters would never train.
        used = {self.group_of_layer(i) for i in range(self.num_hidden_layers)}
        need(len(used) == self.num_hidden_groups, "num_hidden_groups",
             f"a count whose groups are all reached by the {self.group_rule!r} layer-to-group rule "
             f"(groups used: {sorted(used)})")

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projection(self) -> bool:
        """ALBERT's factorized embedding: a dense E->H after the embeddings when E != H."""
        return self.embedding_size != self.hidden_size

    def group_of_layer(self, i: int) -> int:
        """Group used by layer i: HF ``int(i / (L / G))`` or TF ``int(i / L * G)`` (they can differ)."""
        L, G = self.num_hidden_layers, self.num_hidden_groups
        return int(i / (L / G)) if self.group_rule == "hf" else int(i / L * G)

    def block_schedule(self) -> list[list[tuple[int, int]]]:
        """For each layer, the (attention_set, ffn_set) indices of the K blocks it runs in order.

        A shared sublayer uses one set per (group, inner block): index ``g * K + m``; an unshared one
        uses one set per (layer, inner block): index ``i * K + m``.
        """
        K = self.inner_group_num
        share_attn = self.sharing in ("all", "attention")
        share_ffn = self.sharing in ("all", "ffn")
        schedule = []
        for i in range(self.num_hidden_layers):
            g = self.group_of_layer(i)
            schedule.append([
                ((g if share_attn else i) * K + m, (g if share_ffn else i) * K + m) for m in range(K)
            ])
        return schedule

    @property
    def num_attention_sets(self) -> int:
        n = self.num_hidden_groups if self.sharing in ("all", "attention") else self.num_hidden_layers
        return n * self.inner_group_num

    @property
    def num_ffn_sets(self) -> int:
        n = self.num_hidden_groups if self.sharing in ("all", "ffn") else self.num_hidden_layers
        return n * self.inner_group_num

    # --- the head ------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        """The Hugging Face class this model is, e.g. "AlbertForSequenceClassification", "BertModel"."""
        return ("Albert" if self.model_type == "albert" else "Bert") + HEADS[self.head][0]

    @property
    def has_pooler(self) -> bool:
        """Whether the architecture has the pooler (HF builds *ForMaskedLM, *ForTokenClassification,
        *ForQuestionAnswering and BertLMHeadModel with ``add_pooling_layer=False``)."""
        return HEADS[self.head][1]

    @property
    def head_dropout_prob(self) -> float:
        """The dropout probability the head applies to its input, read exactly as transformers reads it:

        ALBERT  SOP, sequence classification, multiple choice: classifier_dropout_prob;
                token classification: classifier_dropout_prob, or hidden_dropout_prob when it is None.
        BERT    sequence / token classification, multiple choice: classifier_dropout, or
                hidden_dropout_prob when it is None; pretraining's NSP head: classifier_dropout_prob
                (ref-bert's own; HF's is 0); next-sentence prediction: 0.
        Question answering and the MLM heads apply no dropout (0)."""
        if self.head in ("base", "masked_lm", "causal_lm", "question_answering", "next_sentence"):
            return 0.0
        if self.head == "pretraining":
            return float(self.classifier_dropout_prob)
        if self.model_type == "albert":
            prob = self.classifier_dropout_prob
        else:
            prob = self.classifier_dropout
        return float(self.hidden_dropout_prob if prob is None else prob)

    def with_head(self, head: str, **changes) -> "Config":
        """This config with another head (and e.g. ``num_labels``, ``problem_type``); validated."""
        return self.replace(head=head, **changes)

    # --- construction helpers ------------------------------------------------------------------
    def replace(self, **changes) -> "Config":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown Config fields {unknown}; known fields are "
                             f"{sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise ValueError(f"a Config is read from a JSON object of its fields, got a {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Config fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        """Published sizes: albert-{base,large,xlarge,xxlarge}, bert-{base,large}, and 'tiny'."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})


_ALBERT = dict(vocab_size=30000, embedding_size=128, hidden_act="gelu_new", max_position_embeddings=512,
               type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               classifier_dropout_prob=0.1, model_type="albert", ffn_output_dropout=False)
_BERT = dict(vocab_size=30522, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.0,
             sharing="none", model_type="bert", ffn_output_dropout=True)

PRESETS: dict[str, dict[str, Any]] = {
    "albert-base": {**_ALBERT, "hidden_size": 768, "intermediate_size": 3072,
                    "num_attention_heads": 12, "num_hidden_layers": 12},
    "albert-large": {**_ALBERT, "hidden_size": 1024, "intermediate_size": 4096,
                     "num_attention_heads": 16, "num_hidden_layers": 24},
    "albert-xlarge": {**_ALBERT, "hidden_size": 2048, "intermediate_size": 8192,
                      "num_attention_heads": 16, "num_hidden_layers": 24},
    "albert-xxlarge": {**_ALBERT, "hidden_size": 4096, "intermediate_size": 16384,
                       "num_attention_heads": 64, "num_hidden_layers": 12},
    "bert-base": {**_BERT, "embedding_size": 768, "hidden_size": 768, "intermediate_size": 3072,
                  "num_attention_heads": 12, "num_hidden_layers": 12},
    "bert-large": {**_BERT, "embedding_size": 1024, "hidden_size": 1024, "intermediate_size": 4096,
                   "num_attention_heads": 16, "num_hidden_layers": 24},
    # Small enough for tests and the two-minute CPU demo; E < H so the projection is exercised.
    "tiny": dict(vocab_size=1000, embedding_size=32, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=128,
                 type_vocab_size=2, hidden_act="gelu_new", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.0, model_type="albert"),
}
