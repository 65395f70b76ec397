"""SentencePiece tokenizer with ALBERT's special-token layout.

ALBERT tokenizes with a SentencePiece *unigram* model (google-research/albert README: ``spm_train
--model_type=unigram --pad_id=0 --unk_id=1 --eos_id=-1 --bos_id=-1
--control_symbols=[CLS],[SEP],[MASK]``). That fixes the ids every part of ref-bert relies on:

    id  piece     role
    0   <pad>     padding (Config.pad_token_id)
    1   <unk>     unknown
    2   [CLS]     start of every sequence; the pooler and the SOP head read this position
    3   [SEP]     end of each segment
    4   [MASK]    replaces a token selected for masked-language-model prediction

The pieces of ids 0 and 1 are spelled ``<pad>``/``<unk>`` as in ALBERT's own ``spiece.model``; their
roles are [PAD] and [UNK]. [CLS]/[SEP]/[MASK] are *control* symbols: ``encode`` never produces them
from text (the string "[CLS]" in a sentence is split into ordinary pieces), and ``decode`` drops them.

A piece starts a word when it begins with U+2581 ("▁"), SentencePiece's marker for a preceding space
(docs/reference.md §7). ALBERT's ``_is_start_piece_sp`` additionally treats punctuation pieces and
pieces with non-ASCII letters as word starts; here the U+2581 rule alone defines a word.

Text preparation: :meth:`Tokenizer.encode` prepares text as ALBERT's own tokenizer does and as
:class:`ref_bert.Tokenizer` does for a checkpoint's spiece.model (docs/reference.md §7.1): `` and '' become
", whitespace runs one space, lower-casing when ``lower_case``, accents kept, and a piece ending in a
digit and a comma is re-split ("3.0," -> "3.0" pieces, ","). So the pretraining data and a saved
model's tokenizer give the same ids.

Lower-casing: ALBERT's uncased models lower-case text before SentencePiece (``preprocess_text(line,
lower=FLAGS.do_lower_case)``), a flag kept next to the model file rather than inside it. ``lower_case``
plays that role here, and, as in ALBERT, it is not stored in the model file.
"""
from __future__ import annotations

import io
import os
import re
from typing import Iterable, Union

import numpy as np
import sentencepiece as spm

from ..tokenization import albert_pieces, albert_prepare
from .corpus import PathLike, default_corpus_path, read_corpus

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
NUM_SPECIAL = len(SPECIAL_IDS)  # the special ids are exactly 0 .. NUM_SPECIAL - 1
CONTROL_PIECES = ("[CLS]", "[SEP]", "[MASK]")  # ids 2, 3, 4 in this order
WORD_START = "\u2581"


class Tokenizer:
    """A loaded SentencePiece model plus the lookups the pretraining pipeline needs.

    Build one with :meth:`load` (an existing ``spiece.model``, e.g. ALBERT's) or :meth:`train`.
    The serialized model is kept in memory, so :meth:`save` writes back exactly the loaded bytes.
    """

    def __init__(self, model_proto: bytes, lower_case: bool = False, source: str = "<bytes>",
                 keep_accents: bool = True):
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError with its own text
            raise ValueError(f"{source} is not a SentencePiece model: {error}") from None
        self._model_proto = bytes(model_proto)
        self._sp = processor
        self.lower_case = bool(lower_case)
        self.keep_accents = bool(keep_accents)   # False: NFKD and no combining marks, as ALBERT's keep_accents=False
        self._check_special_ids(source)
        V = processor.get_piece_size()
        # Lookup tables over the whole vocabulary, used per token by the masking code.
        self.word_start_table = np.array(
            [processor.id_to_piece(i).startswith(WORD_START) for i in range(V)], dtype=bool)  # (V,)
        # Ids a masked token may be replaced with ("10% random token"): every ordinary piece.
        # ALBERT draws from the whole vocabulary, specials included; excluding [CLS]/[SEP]/[MASK]/pad/unk
        # keeps the random replacement from planting structure tokens in the text.
        ordinary = [i for i in range(V) if i not in SPECIAL_IDS and not (
            processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i))]
        if not ordinary:
            raise ValueError(f"{source} has no ordinary pieces besides the special tokens (vocab_size={V})")
        self.ordinary_ids = np.array(ordinary, dtype=np.int64)

    def _check_special_ids(self, source: str):
        sp = self._sp
        V = sp.get_piece_size()
        if V <= MASK_ID:
            raise ValueError(f"{source} has vocab_size={V}; expected more than {NUM_SPECIAL} pieces")
        found = {"pad": sp.pad_id(), "unk": sp.unk_id()}
        expected = {"pad": PAD_ID, "unk": UNK_ID}
        for role in found:
            if found[role] != expected[role]:
                raise ValueError(f"{source} has {role}_id={found[role]}, expected {expected[role]} "
                                 f"(ALBERT layout: pad 0, unk 1, [CLS] 2, [SEP] 3, [MASK] 4)")
        for i, piece in zip((CLS_ID, SEP_ID, MASK_ID), CONTROL_PIECES):
            if sp.id_to_piece(i) != piece:
                raise ValueError(f"{source} has piece {sp.id_to_piece(i)!r} at id {i}, expected {piece!r} "
                                 f"(ALBERT layout: pad 0, unk 1, [CLS] 2, [SEP] 3, [MASK] 4)")

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: PathLike, lower_case: bool = False) -> "Tokenizer":
        """Load a SentencePiece model file (e.g. ALBERT's ``spiece.model``; use ``lower_case=True``
        for ALBERT's uncased checkpoints, as their ``do_lower_case`` flag does), or the ``spiece.model`` of a
        checkpoint directory (a Hugging Face ALBERT one, ``save_hf`` output, a pretraining run), whose
        ``tokenizer_config.json`` then gives ``do_lower_case`` and ``keep_accents`` (without one: the
        pretraining job's settings, no lower-casing and accents kept)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls._load_directory(path)
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer model file {path!r} does not exist; expected a SentencePiece .model file")
        with open(path, "rb") as f:
            return cls(f.read(), lower_case=lower_case, source=repr(path))

    @classmethod
    def _load_directory(cls, path: str) -> "Tokenizer":
        from ..files import read_json
        from ..hf import transformer_directory

        directory = transformer_directory(path)
        model = directory / "spiece.model"
        if not model.is_file():
            found = [n for n in ("vocab.txt", "tokenizer.json") if (directory / n).is_file()]
            what = f"a WordPiece tokenizer ({', '.join(found)})" if found else "no tokenizer"
            raise ValueError(f"tokenizer directory {path!r} has {what}, but pretraining needs a SentencePiece "
                             f"model in ALBERT's layout (spiece.model with pad 0, unk 1, [CLS] 2, [SEP] 3, [MASK] 4)")
        settings = {}
        if (directory / "tokenizer_config.json").is_file():
            settings = read_json(directory / "tokenizer_config.json", "tokenizer configuration")
            if not isinstance(settings, dict):
                raise ValueError(f"{directory / 'tokenizer_config.json'} is not a JSON object")
            settings.setdefault("do_lower_case", True)       # transformers' AlbertTokenizer defaults
            settings.setdefault("keep_accents", False)
        return cls(model.read_bytes(), lower_case=bool(settings.get("do_lower_case", False)), source=repr(str(model)),
                   keep_accents=bool(settings.get("keep_accents", True)))

    @classmethod
    def train(cls, texts_or_corpus_path: Union[PathLike, Iterable[str], None] = None, vocab_size: int = 1000,
              out_path: PathLike | None = None, seed: int = 0, lower_case: bool = False,
              character_coverage: float = 1.0) -> "Tokenizer":
        """Train a unigram SentencePiece model in-process, with ALBERT's special-token layout.

        Args:
            texts_or_corpus_path: a corpus file in the format of :func:`ref_bert.data.read_corpus`
                (a ``str`` or path-like is always taken as a path), an iterable of sentences, or None
                for the packaged default corpus.
            vocab_size: pieces in the model, the five specials included. SentencePiece refuses a size
                the corpus cannot fill; that refusal is raised as a ValueError with its limit.
            out_path: where to write the ``.model`` file too (optional; the model is kept in memory).
            seed: passed to SentencePiece's global generator. Unigram training on every sentence with one
                thread (as here) does not consult it: the same corpus gives byte-identical models.
            lower_case: lower-case the training text, and the text given to :meth:`encode` later.

        Determinism: ``num_threads=1`` (EM statistics summed in a fixed order), ``input_sentence_size=0``
        (no sentence sampling) and ``shuffle_input_sentence=False``.
        """
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= NUM_SPECIAL:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: expected an integer > {NUM_SPECIAL}")
        if texts_or_corpus_path is None:
            texts_or_corpus_path = default_corpus_path()
        if isinstance(texts_or_corpus_path, (str, os.PathLike)):
            sentences = [s for doc in read_corpus(texts_or_corpus_path) for s in doc]
        else:
            sentences = [str(s).strip() for s in texts_or_corpus_path]
            sentences = [s for s in sentences if s]
            if not sentences:
                raise ValueError("Tokenizer.train got no non-empty sentences; expected at least one line of text")
        if lower_case:
            sentences = [s.lower() for s in sentences]

        writer = io.BytesIO()
        spm.set_random_generator_seed(int(seed))
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=writer, model_type="unigram",
                vocab_size=vocab_size, character_coverage=character_coverage,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1, control_symbols=list(CONTROL_PIECES),
                pad_piece="<pad>", unk_piece="<unk>",
                num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
                hard_vocab_limit=True, minloglevel=2)
        except RuntimeError as error:
            # e.g. "Vocabulary size too high (30000). Please set it to a value <= 904."
            message = str(error).split('] ')[-1]
            largest = re.search(r"value <= (\d+)", message)
            if largest:
                n = int(largest.group(1))
                raise ValueError(f"the corpus is too small for vocab_size={vocab_size}: SentencePiece can make at "
                                 f"most {n} pieces from its {len(sentences)} sentences; choose vocab_size <= {n} "
                                 f"(ref-bert pretrain: --set vocab_size={n}) or a larger corpus") from None
            raise ValueError(f"SentencePiece training with vocab_size={vocab_size} failed: {message}") from None
        tokenizer = cls(writer.getvalue(), lower_case=lower_case, source="trained model")
        if out_path is not None:
            tokenizer.save(out_path)
        return tokenizer

    def save_to(self, directory: PathLike):
        """Write ``spiece.model`` into ``directory`` (atomically), and, when the text settings differ from the
        pretraining job's defaults (lower-casing, or accents stripped), a ``tokenizer_config.json`` that records
        them for :meth:`load` and for checkpoint readers (``ref_bert.Tokenizer.from_hf``, transformers)."""
        from ..files import atomic_write_bytes, atomic_write_json

        directory = os.fspath(directory)
        atomic_write_bytes(os.path.join(directory, "spiece.model"), self._model_proto)
        if self.lower_case or not self.keep_accents:
            atomic_write_json(os.path.join(directory, "tokenizer_config.json"), {
                "tokenizer_class": "AlbertTokenizer", "do_lower_case": self.lower_case,
                "keep_accents": self.keep_accents, "split_digit_comma": True})

    def save(self, path: PathLike):
        """Write the model file: the exact bytes that were loaded or trained."""
        with open(os.fspath(path), "wb") as f:
            f.write(self._model_proto)

    # --- use ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        return self._model_proto

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``'s pieces (text prepared as ALBERT's tokenizer does, see above); no [CLS]/[SEP]."""
        pieces = albert_pieces(self._sp, albert_prepare(text, self.lower_case, self.keep_accents))
        return [self._sp.piece_to_id(p) for p in pieces]

    def decode(self, ids) -> str:
        """Text of ``ids``; control symbols ([CLS], [SEP], [MASK], pad) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def is_word_start(self, i: int) -> bool:
        """Whether piece ``i`` begins with U+2581, i.e. starts a whole word."""
        return bool(self.word_start_table[int(i)])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, lower_case={self.lower_case}, keep_accents={self.keep_accents})"
