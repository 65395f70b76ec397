"""Pretraining data: SentencePiece tokenizer, ALBERT example creation (SOP + whole-word n-gram
masking) and a small packaged corpus, all host-side NumPy.

    >>> from ref_bert.data import PretrainingDataset
    >>> data = PretrainingDataset(batch_size=8, max_seq_length=128, vocab_size=1000, seed=0)  # doctest: +SKIP
    >>> batch = next(data)  # input_ids, token_type_ids, attention_mask, mlm_labels (B, T); sop_labels (B,)
"""
from .pretraining import (BATCH_KEYS, MaskedLmPredictions, PretrainingDataset, SentencePair, assemble_pair,
                          create_masked_lm_predictions, create_sentence_pairs, default_corpus_path,
                          masking_budget, ngram_probabilities, read_corpus, tokenize_documents,
                          truncate_seq_pair, whole_words)
from .tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_IDS, UNK_ID, Tokenizer

__all__ = [
    "PAD_ID", "UNK_ID", "CLS_ID", "SEP_ID", "MASK_ID", "SPECIAL_IDS", "Tokenizer",
    "BATCH_KEYS", "MaskedLmPredictions", "PretrainingDataset", "SentencePair", "assemble_pair",
    "create_masked_lm_predictions", "create_sentence_pairs", "default_corpus_path", "masking_budget",
    "ngram_probabilities", "read_corpus", "tokenize_documents", "truncate_seq_pair", "whole_words",
]
