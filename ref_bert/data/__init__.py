"""Pretraining data: the corpus, SentencePiece tokenizer, the corpus stream of sentence-order pairs,
and ALBERT's examples made from it (SOP + whole-word n-gram masking), all host-side NumPy.

    >>> from ref_bert.data import PretrainingDataset
    >>> data = PretrainingDataset(batch_size=8, max_seq_length=128, vocab_size=1000, seed=0)  # doctest: +SKIP
    >>> batch = next(data)  # input_ids, token_type_ids, attention_mask, mlm_labels (B, T); sop_labels (B,)
"""
from .corpus import check_pairable, default_corpus_path, read_corpus
from .pretraining import (BATCH_KEYS, MaskedLmPredictions, PretrainingDataset, assemble_pair,
                          create_masked_lm_predictions, masking_budget, ngram_probabilities, whole_words)
from .stream import (SentencePair, SentencePairStream, create_sentence_pairs, tokenize_documents,
                     truncate_seq_pair)
from .tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, SPECIAL_IDS, UNK_ID, Tokenizer

__all__ = [
    "PAD_ID", "UNK_ID", "CLS_ID", "SEP_ID", "MASK_ID", "SPECIAL_IDS", "NUM_SPECIAL", "Tokenizer",
    "BATCH_KEYS", "MaskedLmPredictions", "PretrainingDataset", "SentencePair", "SentencePairStream",
    "assemble_pair", "check_pairable", "create_masked_lm_predictions", "create_sentence_pairs",
    "default_corpus_path", "masking_budget", "ngram_probabilities", "read_corpus", "tokenize_documents",
    "truncate_seq_pair", "whole_words",
]
