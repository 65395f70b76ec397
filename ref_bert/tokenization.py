"""Checkpoint tokenizers: text to model inputs exactly as a BERT or ALBERT checkpoint defines them.

    >>> tok = ref_bert.Tokenizer.from_hf("path/to/checkpoint")          # doctest: +SKIP
    >>> enc = tok.encode("How old are you?", "I am six.")                # doctest: +SKIP
    >>> enc.input_ids, enc.token_type_ids, enc.attention_mask            # doctest: +SKIP
    >>> batch = tok.batch(["one sentence", "another"], max_length=512)  # (B, T) int64 arrays, padded

Two kinds, chosen by the files of the directory (docs/reference.md §7.1 has the rules in full):

``wordpiece`` (BERT; ``vocab.txt`` or a WordPiece ``tokenizer.json``)
    Hugging Face's ``tokenizers`` library with BERT's basic tokenization: drop control characters and
    normalise whitespace, put spaces around CJK ideographs, lower-case and strip accents as the
    checkpoint's ``tokenizer_config.json`` says (``do_lower_case``, ``strip_accents``,
    ``tokenize_chinese_chars``; transformers' defaults where a key is absent), split punctuation;
    then WordPiece: greedy longest match, continuation pieces prefixed ``##``, a word of more than 100
    characters becomes the unknown token. The vocabulary comes from ``vocab.txt`` (one token a line,
    id = line number) or, without it, from ``tokenizer.json``'s model.
``sentencepiece`` (ALBERT; ``spiece.model``, or a Unigram ``tokenizer.json`` as transformers 5 saves it)
    The ``sentencepiece`` library (for a ``tokenizer.json``: the ``tokenizers`` library's Unigram with the
    file's character map, :class:`UnigramJson`) on text prepared by ALBERT's rules: `````/``''`` become ``"``;
    NFKD and dropping combining marks unless ``keep_accents``; lower-casing if ``do_lower_case``;
    runs of whitespace become one space; then SentencePiece (its own normaliser and the U+2581 word
    marker), and ALBERT's re-split of a piece that ends in a digit and a comma ("3.0," ->
    pieces of "3.0", then ","), unless ``split_digit_comma`` is false.

Special tokens ([CLS], [SEP], pad, unk, [MASK]) and their ids come from the checkpoint's files:
``special_tokens_map.json`` / ``tokenizer_config.json`` name them, the vocabulary gives their ids.
A special token written in the text (e.g. "[MASK]") is that token, as in transformers. Sequences are
laid out as BERT and ALBERT were trained: ``[CLS] A [SEP]`` (token type 0) and ``[CLS] A [SEP] B
[SEP]`` (B and its [SEP] type 1).

Length. :meth:`Tokenizer.encode` never shortens a text on its own: with ``max_length`` and
``truncation=False`` a longer text is a ValueError naming its length; ``truncation=True`` cuts it
the way Hugging Face's ``tokenizers`` does ("longest first": of a pair, the longer sequence is cut
first; when both must be cut, each keeps half the room, the longer one the odd token).

Saving: :meth:`Tokenizer.save_hf` writes the files transformers reads (``spiece.model`` or ``vocab.txt``,
each with the equivalent ``tokenizer.json``; ``tokenizer_config.json``, ``special_tokens_map.json``), so that
``transformers.AutoTokenizer.from_pretrained(dir)`` gives the same ids (the digit-comma re-split
aside, which transformers 5 does not perform: docs/reference.md §7.1).

The pretraining pipeline's own SentencePiece model is :class:`ref_bert.data.Tokenizer`;
:meth:`Tokenizer.from_sentencepiece` wraps it (or any ``spiece.model``) as a checkpoint tokenizer.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes, atomic_write_json, read_json

KINDS = ("wordpiece", "sentencepiece")
ROLES = ("cls", "sep", "pad", "unk", "mask")
DEFAULT_SPECIAL = {
    "wordpiece": {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"},
    "sentencepiece": {"cls": "[CLS]", "sep": "[SEP]", "pad": "<pad>", "unk": "<unk>", "mask": "[MASK]"},
}
# The files a checkpoint's tokenizer may consist of, in the order they are looked for.
TOKENIZER_FILES = ("spiece.model", "vocab.txt", "tokenizer.json")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
WORD_START = "\u2581"
MAX_WORDPIECE_CHARS = 100     # BERT's WordpieceTokenizer max_input_chars_per_word (transformers' default)
# Unicode White_Space (what WhitespaceSplit in transformers' ALBERT pipeline splits on). Python's str.split()
# also splits at U+001C..U+001F, which are not White_Space; ALBERT's own Python code does, transformers does not.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


@dataclass
class Encoding:
    """One encoded sequence (or pair): ids with [CLS]/[SEP], token types, attention mask, tokens."""

    input_ids: list
    token_type_ids: list
    attention_mask: list
    tokens: list

    def __len__(self) -> int:
        return len(self.input_ids)


def albert_prepare(text: str, do_lower_case: bool, keep_accents: bool) -> str:
    """ALBERT's ``preprocess_text`` (docs/reference.md §7.1): `` and '' -> ", NFKD and no combining marks
    (Unicode category Mn) unless ``keep_accents``, lower-case if asked, whitespace runs -> one space."""
    text = text.replace("``", '"').replace("''", '"')
    if not keep_accents:
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn")
    if do_lower_case:
        text = text.lower()
    return " ".join(_WHITESPACE.split(text)).strip(" ")


def albert_pieces(processor, text: str, split_digit_comma: bool = True) -> list:
    """SentencePiece pieces of prepared ``text``, with ALBERT's ``encode_pieces`` re-split: a piece of two or
    more characters ending in a digit and a comma is re-encoded without the comma (its U+2581 dropped
    when the original piece had none), and the comma follows as its own piece."""
    pieces = processor.encode(text, out_type=str)
    if not split_digit_comma:
        return pieces
    out = []
    for piece in pieces:
        if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
            again = processor.encode(piece[:-1].replace(WORD_START, ""), out_type=str)
            if piece[0] != WORD_START and again and again[0][0] == WORD_START:
                again = again[1:] if len(again[0]) == 1 else [again[0][1:]] + again[1:]
            out.extend(again + [","])
        else:
            out.append(piece)
    return out


class UnigramJson:
    """An ALBERT tokenizer saved as ``tokenizer.json`` only (what transformers 5's ``save_pretrained`` writes:
    no spiece.model), run as raw SentencePiece would run on prepared text: the ``tokenizers`` library's
    Unigram over the file's pieces and scores, after the file's SentencePiece character map, with
    whitespace split and the U+2581 marker. It offers the few ``SentencePieceProcessor`` methods
    :class:`Tokenizer` uses. (Segmentation ties are then broken as transformers breaks them: §7.1.)"""

    def __init__(self, text: str, source: str):
        import base64
        import json

        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, normalizers, pre_tokenizers
        from tokenizers.models import Unigram

        raw = json.loads(text)
        model = raw.get("model") if isinstance(raw, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, list) or not all(isinstance(v, list) and len(v) == 2 for v in vocab):
            raise ValueError(f"{source}: a Unigram tokenizer.json needs model.vocab as [piece, score] pairs")
        self.text, self.scores = text, [float(score) for _, score in vocab]
        self.unk = int(model.get("unk_id") or 0)
        tok = HfTokenizer(Unigram([(p, float(sc)) for p, sc in vocab], self.unk, byte_fallback=False))
        found = []

        def collect(node):                       # the precompiled SentencePiece character map, wherever it is
            if isinstance(node, dict):
                if node.get("type") == "Precompiled" and node.get("precompiled_charsmap"):
                    found.append(base64.b64decode(node["precompiled_charsmap"]))
                for child in node.get("normalizers") or []:
                    collect(child)

        collect(raw.get("normalizer"))
        if found:
            tok.normalizer = normalizers.Precompiled(found[0])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always")])
        tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
        self._tok = tok

    def encode(self, text: str, out_type=str):
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.tokens if out_type is str else enc.ids

    def get_piece_size(self) -> int:
        return len(self.scores)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        return self.unk if i is None else i

    def get_score(self, i: int) -> float:
        return self.scores[int(i)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def _token_text(value, where: str, role: str):
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or an
    AddedToken dict with "content"."""
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise ValueError(f"{where}: {role}_token={value!r} is not a token (expected a string or an object with "
                     f"\"content\")")


def truncate_pair(a: list, b, room: int) -> tuple:
    """Cut ``a`` (and ``b``) to ``room`` tokens in all, as Hugging Face ``tokenizers`` "longest_first" does:
    a single sequence keeps its first ``room``; of a pair, the shorter keeps its length when the longer can
    take the rest, otherwise the shorter keeps room // 2 and the longer room // 2 + room % 2 (the second
    one when they are equally long)."""
    if b is None:
        return a[:room], None
    n1, n2 = len(a), len(b)
    if n1 + n2 <= room:
        return a, b
    swap = n1 > n2
    short, long_ = (n2, n1) if swap else (n1, n2)
    long_ = short if short > room else max(short, room - short)
    if short + long_ > room:
        short, long_ = room // 2, room // 2 + room % 2
    k1, k2 = (long_, short) if swap else (short, long_)
    return a[:k1], b[:k2]


class Tokenizer:
    """A checkpoint's tokenizer (see the module docstring). Build one with :meth:`from_hf`,
    :meth:`from_sentencepiece` or :meth:`from_wordpiece_vocab`.

    Attributes: ``kind`` ("wordpiece" / "sentencepiece"), ``vocab_size``, ``special`` (role -> token
    text), ``special_ids`` (role -> id; also ``cls_id``, ``sep_id``, ``pad_id``, ``unk_id``,
    ``mask_id``), ``options`` (the normalisation flags), ``source`` (where it was read from).
    """

    def __init__(self, kind: str, *, special: dict, options: dict, source: str = "<memory>",
                 sp_proto: bytes | None = None, vocab: list | None = None, extra_config: dict | None = None,
                 unigram_json: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind {kind!r} is invalid: expected one of {KINDS}")
        self.kind, self.source = kind, source
        self.special = {role: special.get(role) or DEFAULT_SPECIAL[kind][role] for role in ROLES}
        self.options = dict(options)
        self.extra_config = dict(extra_config or {})
        if kind == "sentencepiece" and unigram_json is not None:
            self._sp, self._sp_proto = UnigramJson(unigram_json, source), None
            self.vocab_size = self._sp.get_piece_size()
            lookup = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        elif kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.LoadFromSerializedProto(sp_proto)
            except Exception as error:  # sentencepiece raises RuntimeError/OSError with its own text
                raise ValueError(f"{source} is not a SentencePiece model: {error}") from None
            self._sp_proto = bytes(sp_proto)
            self.vocab_size = self._sp.get_piece_size()
            lookup = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        else:
            self._vocab = list(vocab)
            lookup = {}
            for i, token in enumerate(self._vocab):
                lookup.setdefault(token, i)
            self.vocab_size = len(self._vocab)
        self.special_ids = {}
        for role in ROLES:
            token = self.special[role]
            if token not in lookup:
                raise ValueError(f"{source}: the {role} token {token!r} is not in the vocabulary "
                                 f"({self.vocab_size} tokens); expected the special tokens among them")
            self.special_ids[role] = lookup[token]
        self._lookup = lookup
        if kind == "wordpiece":
            self._wordpiece = self._build_wordpiece()
        # special tokens written in the text are those tokens (longest first, so "[SEP]x" cannot shadow one)
        tokens = sorted(set(self.special.values()), key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path) -> "Tokenizer":
        """The tokenizer of a checkpoint directory (transformers', sentence-transformers' transformer
        module, ``save_hf`` output or a ref-bert pretraining run, whose bare ``spiece.model`` is read with the
        job's settings: no lower-casing, accents kept). ValueError naming the files looked for when there
        is none."""
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory; expected a checkpoint directory with a tokenizer")
        config = {}
        for name in reversed(CONFIG_FILES):      # tokenizer_config.json wins over special_tokens_map.json
            if (directory / name).is_file():
                raw = read_json(directory / name, "tokenizer configuration")
                if not isinstance(raw, dict):
                    raise ValueError(f"{directory / name} holds a JSON {type(raw).__name__}, expected an object")
                config.update(raw)
        special = {role: _token_text(config.get(f"{role}_token"), str(directory), role) for role in ROLES}
        if (directory / "spiece.model").is_file():
            # transformers' AlbertTokenizer defaults, except in a ref-bert pretraining directory without settings
            # (the job's own: no lower-casing, accents kept)
            ours = not config and _is_ref_bert_directory(directory)
            options = {"do_lower_case": bool(config.get("do_lower_case", not ours)),
                       "keep_accents": bool(config.get("keep_accents", ours)),
                       "split_digit_comma": bool(config.get("split_digit_comma", True))}
            return cls("sentencepiece", special=special, options=options, source=str(directory / "spiece.model"),
                       sp_proto=(directory / "spiece.model").read_bytes(), extra_config=_carried(config))
        vocab = None
        if (directory / "vocab.txt").is_file():
            vocab = read_vocab_txt(directory / "vocab.txt")
        elif (directory / "tokenizer.json").is_file():
            text = (directory / "tokenizer.json").read_text(encoding="utf-8")
            if _json_model_type(text, directory / "tokenizer.json") == "Unigram":     # ALBERT saved by transformers 5
                options = {"do_lower_case": bool(config.get("do_lower_case", True)),
                           "keep_accents": bool(config.get("keep_accents", False)),
                           "split_digit_comma": bool(config.get("split_digit_comma", True))}
                return cls("sentencepiece", special=special, options=options, extra_config=_carried(config),
                           source=str(directory / "tokenizer.json"), unigram_json=text)
            vocab = _wordpiece_vocab_from_json(directory / "tokenizer.json")
        if vocab is None:
            present = sorted(p.name for p in directory.iterdir())[:12]
            raise ValueError(f"{directory} has no tokenizer: looked for {', '.join(TOKENIZER_FILES)} "
                             f"(with {' / '.join(CONFIG_FILES)} for its settings) and found {present}")
        options = {"do_lower_case": bool(config.get("do_lower_case", True)),
                   "strip_accents": config.get("strip_accents"),
                   "tokenize_chinese_chars": bool(config.get("tokenize_chinese_chars", True))}
        return cls("wordpiece", special=special, options=options, source=str(directory), vocab=vocab,
                   extra_config=_carried(config))

    @classmethod
    def from_sentencepiece(cls, model, do_lower_case: bool = False, keep_accents: bool = True,
                           split_digit_comma: bool = True, special: dict | None = None) -> "Tokenizer":
        """A SentencePiece tokenizer from a model file path, its bytes, or a :class:`ref_bert.data.Tokenizer`
        (the pretraining job's; its ``lower_case`` and ``keep_accents`` are used)."""
        if hasattr(model, "model_proto"):
            do_lower_case = bool(getattr(model, "lower_case", do_lower_case))
            keep_accents = bool(getattr(model, "keep_accents", keep_accents))
            proto, source = model.model_proto, repr(model)
        elif isinstance(model, (bytes, bytearray)):
            proto, source = bytes(model), "<bytes>"
        else:
            path = Path(os.fspath(model))
            if not path.is_file():
                raise ValueError(f"SentencePiece model file {str(path)!r} does not exist; expected a .model file")
            proto, source = path.read_bytes(), str(path)
        options = {"do_lower_case": bool(do_lower_case), "keep_accents": bool(keep_accents),
                   "split_digit_comma": bool(split_digit_comma)}
        return cls("sentencepiece", special=dict(special or {}), options=options, source=source, sp_proto=proto)

    @classmethod
    def from_wordpiece_vocab(cls, vocab, do_lower_case: bool = True, strip_accents=None,
                             tokenize_chinese_chars: bool = True, special: dict | None = None) -> "Tokenizer":
        """A WordPiece tokenizer from a list of tokens (id = position) or a ``vocab.txt`` path."""
        if isinstance(vocab, (str, os.PathLike)):
            vocab = read_vocab_txt(Path(vocab))
        options = {"do_lower_case": bool(do_lower_case), "strip_accents": strip_accents,
                   "tokenize_chinese_chars": bool(tokenize_chinese_chars)}
        return cls("wordpiece", special=dict(special or {}), options=options, vocab=list(vocab))

    def _build_wordpiece(self):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        vocab = {token: i for i, token in reversed(list(enumerate(self._vocab)))}   # first id of a duplicate wins
        tok = HfTokenizer(WordPiece(vocab, unk_token=self.special["unk"], max_input_chars_per_word=MAX_WORDPIECE_CHARS))
        o = self.options
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=o["tokenize_chinese_chars"],
                                                    strip_accents=o["strip_accents"], lowercase=o["do_lower_case"])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens([AddedToken(self.special[r], special=True, normalized=False) for r in ROLES])
        return tok

    # --- properties ----------------------------------------------------------------------------
    cls_id = property(lambda self: self.special_ids["cls"])
    sep_id = property(lambda self: self.special_ids["sep"])
    pad_id = property(lambda self: self.special_ids["pad"])
    unk_id = property(lambda self: self.special_ids["unk"])
    mask_id = property(lambda self: self.special_ids["mask"])

    def __repr__(self) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, {flags})"

    # --- text to tokens ------------------------------------------------------------------------
    def tokenize(self, text: str) -> list:
        """The tokens of ``text`` (no [CLS]/[SEP] added); special tokens written in it are kept whole."""
        return [t for t, _ in self._tokens_and_ids(text)]

    def token_ids(self, text: str) -> list:
        """The ids of ``text``'s tokens, no [CLS]/[SEP] added (what :meth:`encode` puts between them; the
        pieces of one word for word-level tasks)."""
        return [i for _, i in self._tokens_and_ids(text)]

    def _tokens_and_ids(self, text: str) -> list:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if self.kind == "wordpiece":
            enc = self._wordpiece.encode(text, add_special_tokens=False)
            return list(zip(enc.tokens, enc.ids))
        out = []
        by_token = {self.special[role]: self.special_ids[role] for role in ROLES}
        o = self.options
        for k, segment in enumerate(self._special_split.split(text)):
            if k % 2:                            # a special token written in the text
                out.append((segment, by_token[segment]))
                continue
            prepared = albert_prepare(segment, o["do_lower_case"], o["keep_accents"])
            if prepared:
                pieces = albert_pieces(self._sp, prepared, o["split_digit_comma"])
                out.extend((p, self._sp.piece_to_id(p)) for p in pieces)
        return out

    def encode(self, text: str, pair: str | None = None, *, max_length: int | None = None,
               truncation: bool = False) -> Encoding:
        """``[CLS] text [SEP]`` or ``[CLS] text [SEP] pair [SEP]`` as ids, token types (0, then 1 from the
        pair on) and attention mask (all 1). With ``max_length`` (tokens in all, [CLS] and [SEP]s
        included) a longer result is a ValueError unless ``truncation=True``, which cuts it (longest first)."""
        a = self._tokens_and_ids(text)
        b = None if pair is None else self._tokens_and_ids(pair)
        n_special = 2 if b is None else 3
        total = len(a) + (len(b) if b is not None else 0) + n_special
        if max_length is not None:
            if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length < n_special:
                raise ValueError(f"max_length={max_length!r} is invalid: expected an integer >= {n_special} "
                                 f"(room for [CLS] and the [SEP]s)")
            if total > max_length:
                if not truncation:
                    what = "text" if b is None else "text pair"
                    raise ValueError(f"the {what} tokenizes to {total} tokens ([CLS] and [SEP] included), more than "
                                     f"max_length={max_length}; shorten it or pass truncation=True "
                                     f"(ref-bert: --truncate) to cut it to {max_length}")
                a, b = truncate_pair(a, b, max_length - n_special)
        cls_, sep = (self.special["cls"], self.cls_id), (self.special["sep"], self.sep_id)
        seq = [cls_] + a + [sep]
        types = [0] * len(seq)
        if b is not None:
            seq += b + [sep]
            types += [1] * (len(b) + 1)
        return Encoding(input_ids=[i for _, i in seq], token_type_ids=types, attention_mask=[1] * len(seq),
                        tokens=[t for t, _ in seq])

    def batch(self, texts, pairs=None, *, max_length: int | None = None, truncation: bool = False) -> dict:
        """Model inputs for several texts (or text pairs): ``input_ids``, ``token_type_ids``,
        ``attention_mask`` as (B, T) int64 host arrays, T the longest encoding, shorter rows padded on the
        right with the pad id, token type 0 and mask 0. ``max_length`` / ``truncation`` as in :meth:`encode`
        (a ValueError names the text that is too long)."""
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, got one str (wrap it in a list)")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty; expected at least one text")
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"pairs has {len(pairs)} entries, texts {len(texts)}; expected one pair per text")
        encodings = []
        for k, text in enumerate(texts):
            try:
                encodings.append(self.encode(text, None if pairs is None else pairs[k], max_length=max_length,
                                             truncation=truncation))
            except ValueError as error:
                raise ValueError(f"text {k} ({text[:40]!r}{'...' if len(text) > 40 else ''}): {error}") from None
        B, T = len(encodings), max(len(e) for e in encodings)
        out = {"input_ids": np.full((B, T), self.pad_id, np.int64), "token_type_ids": np.zeros((B, T), np.int64),
               "attention_mask": np.zeros((B, T), np.int64)}
        for b, e in enumerate(encodings):
            for name in out:
                out[name][b, :len(e)] = getattr(e, name)
        return out

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of id ``i``."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._vocab[i] if self.kind == "wordpiece" else self._sp.id_to_piece(i)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (for reading results; not an exact inverse of the normalisation)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids.values()]
        if self.kind == "wordpiece":
            return self._wordpiece.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    # --- saving --------------------------------------------------------------------------------
    def save_hf(self, path) -> list:
        """Write the tokenizer's files into directory ``path`` (created if needed) so that transformers'
        ``AutoTokenizer.from_pretrained`` and :meth:`from_hf` read it back; returns the file names."""
        directory = Path(path)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} is not a directory; expected the checkpoint directory to write into")
        directory.mkdir(parents=True, exist_ok=True)
        special = {f"{role}_token": self.special[role] for role in ROLES}
        config = {**self.extra_config, **special}
        written = []
        if self.kind == "sentencepiece":
            if self._sp_proto is not None:
                atomic_write_bytes(directory / "spiece.model", self._sp_proto)
                json_text = self._unigram_tokenizer_json()
                written.append("spiece.model")
            else:                                # read from a tokenizer.json: written back as it was
                json_text = self._sp.text
            atomic_write_bytes(directory / "tokenizer.json", json_text.encode("utf-8"))
            written.append("tokenizer.json")
            config.update(tokenizer_class="AlbertTokenizer", do_lower_case=self.options["do_lower_case"],
                          keep_accents=self.options["keep_accents"],
                          split_digit_comma=self.options["split_digit_comma"], bos_token=self.special["cls"],
                          eos_token=self.special["sep"])
        else:
            atomic_write_bytes(directory / "vocab.txt", "".join(t + "\n" for t in self._vocab).encode("utf-8"))
            atomic_write_bytes(directory / "tokenizer.json", self._tokenizer_json().encode("utf-8"))
            written += ["vocab.txt", "tokenizer.json"]
            config.update(tokenizer_class="BertTokenizer", **self.options)
        atomic_write_json(directory / "special_tokens_map.json", special)
        atomic_write_json(directory / "tokenizer_config.json", config)
        return written + ["special_tokens_map.json", "tokenizer_config.json"]

    def save_to(self, directory) -> None:
        """:meth:`save_hf` under the name a run directory uses (:mod:`ref_bert.pretrain.rundir` calls
        ``tokenizer.save_to`` for OUT and every checkpoint). A run directory an earlier job wrote (taken
        over with ``--overwrite``) may hold an spiece.model, which :meth:`from_hf` reads before a
        vocab.txt: a WordPiece tokenizer removes it, so the directory holds one tokenizer."""
        if self.kind == "wordpiece":
            (Path(directory) / "spiece.model").unlink(missing_ok=True)
        self.save_hf(directory)

    def fingerprint(self) -> tuple:
        """What defines the ids: kind, options, special ids and every vocabulary entry (two tokenizers with
        the same fingerprint encode every text alike)."""
        if self.kind == "sentencepiece":     # the model itself: pieces with their scores
            vocab = self._sp_proto if self._sp_proto is not None else self._sp.text
        else:
            vocab = tuple(self._vocab)
        return (self.kind, tuple(sorted(self.options.items())), tuple(sorted(self.special_ids.items())), vocab)

    def _unigram_tokenizer_json(self) -> str:
        """The SentencePiece model as transformers' AlbertTokenizer builds it (docs/reference.md §7.1), as a
        ``tokenizer.json``: the pieces and scores, the model's precompiled character map (read from the
        model file with protobuf), the text rules of ``options``. transformers reads it without converting
        spiece.model itself (which would need protobuf on the reader's side)."""
        from sentencepiece import sentencepiece_model_pb2

        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import Unigram

        proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp_proto)
        vocab = [(p.piece, float(p.score)) for p in proto.pieces]
        tok = HfTokenizer(Unigram(vocab, self._sp.unk_id(), byte_fallback=False))
        steps = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
        if not self.options["keep_accents"]:
            steps += [normalizers.NFKD(), normalizers.StripAccents()]
        if self.options["do_lower_case"]:
            steps.append(normalizers.Lowercase())
        charsmap = proto.normalizer_spec.precompiled_charsmap
        if charsmap:
            steps.append(normalizers.Precompiled(charsmap))
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always")])
        tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
        cls_, sep = self.special["cls"], self.special["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_}:0 $A:0 {sep}:0", pair=f"{cls_}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls_, self.cls_id), (sep, self.sep_id)])
        tok.add_special_tokens([AddedToken(self.special[r], special=True, normalized=False) for r in ROLES])
        return tok.to_str()

    def _tokenizer_json(self) -> str:
        """Our WordPiece pipeline as a complete ``tokenizer.json`` (with BERT's [CLS]/[SEP] template)."""
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import processors

        tok = HfTokenizer.from_str(self._wordpiece.to_str())
        cls_, sep = self.special["cls"], self.special["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_}:0 $A:0 {sep}:0", pair=f"{cls_}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls_, self.cls_id), (sep, self.sep_id)])
        return tok.to_str()


# keys of a checkpoint's tokenizer_config.json that save_hf carries over unchanged
_CARRIED_KEYS = ("model_max_length", "name_or_path")


def _carried(config: dict) -> dict:
    return {k: config[k] for k in _CARRIED_KEYS if k in config}


def read_vocab_txt(path: Path) -> list:
    """BERT's vocab.txt: one token a line, id = line number (a trailing newline ends the last line)."""
    text = Path(path).read_text(encoding="utf-8")
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    tokens = [t.rstrip("\r") for t in tokens]
    if not tokens:
        raise ValueError(f"{path} is empty; expected one WordPiece token a line")
    return tokens


def _json_model_type(text: str, path: Path):
    from .files import parse_json

    raw = parse_json(text, str(path))
    model = raw.get("model") if isinstance(raw, dict) else None
    return model.get("type") if isinstance(model, dict) else None


def _wordpiece_vocab_from_json(path: Path) -> list:
    raw = read_json(path, "tokenizer.json")
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{path} holds a {kind or 'non-WordPiece'} tokenizer; expected a WordPiece (BERT) or "
                         f"Unigram (ALBERT) tokenizer.json, or an spiece.model (ALBERT)")
    vocab = model["vocab"]
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: the WordPiece vocabulary's ids are not 0..{len(ids) - 1}")
    tokens = [None] * len(ids)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens


def _is_ref_bert_directory(directory: Path) -> bool:
    """Whether ``directory`` holds a ref-bert config.json (every key a :class:`ref_bert.Config` field), as a
    pretraining run or ``checkpoint.save_model`` writes it."""
    import dataclasses

    from .config import Config

    path = directory / "config.json"
    if not path.is_file():
        return False
    raw = read_json(path, "model config")
    return isinstance(raw, dict) and set(raw) <= {f.name for f in dataclasses.fields(Config)}


def find_tokenizer(path) -> Tokenizer | None:
    """:meth:`Tokenizer.from_hf` of ``path`` when it holds tokenizer files, else None."""
    directory = Path(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    return Tokenizer.from_hf(directory)


def check_vocab_size(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer fits a model when it has exactly as many tokens as the model's embedding rows."""
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's word "
                         f"embeddings have {vocab_size} rows (config.json vocab_size); expected the same number")


__all__ = ["Tokenizer", "Encoding", "TOKENIZER_FILES", "albert_prepare", "albert_pieces", "truncate_pair",
           "find_tokenizer", "check_vocab_size", "read_vocab_txt"]
