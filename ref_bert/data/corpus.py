"""The corpus: its file format, the packaged default, and the check that it can make sentence pairs.

Format (ALBERT's own): UTF-8 text, one sentence per line, documents separated by one or more blank
lines; a line whose first character is ``#`` is a comment. Sentence boundaries matter: A and B are
split between sentences, never inside one.
"""
from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


def default_corpus_path() -> str:
    """Path of the corpus shipped with the package (see the header of ``ref_bert/data/corpus.txt``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")


def read_corpus(path: PathLike) -> list[list[str]]:
    """Read a corpus file into documents, each a list of sentences (stripped, non-empty strings).

    Format: UTF-8, one sentence per line, blank lines (empty or whitespace only) between documents,
    lines starting with ``#`` ignored (they do not end a document). Raises ValueError for a missing
    file, a directory, bytes that are not UTF-8 (naming the byte offset and line) and a file with no sentences.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"corpus {path!r} is a directory; expected a file: UTF-8 text with one sentence per line "
                         f"and blank lines between documents (join a directory's files into one first)")
    if not os.path.isfile(path):
        raise ValueError(f"corpus file {path!r} does not exist; expected a UTF-8 text file with one sentence "
                         f"per line and blank lines between documents")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"corpus file {path!r} is not valid UTF-8: byte 0x{data[error.start]:02x} at byte "
                         f"offset {error.start} (line {line}) cannot be decoded ({error.reason}); "
                         f"expected UTF-8 text") from None
    documents: list[list[str]] = [[]]
    for line in text.lstrip("\ufeff").splitlines():
        if line.startswith("#"):
            continue
        sentence = line.strip()
        if sentence:
            documents[-1].append(sentence)
        elif documents[-1]:
            documents.append([])
    documents = [d for d in documents if d]
    if not documents:
        raise ValueError(f"corpus file {path!r} contains no sentences; expected one sentence per line "
                         f"with blank lines between documents")
    return documents


def check_pairable(documents: list, path: PathLike) -> None:
    """ValueError unless some document has two or more sentences: every example splits a document's
    consecutive sentences into segments A and B. ``documents`` are lists of sentences (text, or token
    ids after :func:`ref_bert.data.stream.tokenize_documents`, which drops sentences with no pieces)."""
    if not any(len(d) >= 2 for d in documents):
        raise ValueError(f"corpus {os.fspath(path)!r} has no document with at least two sentences "
                         f"({sum(len(d) for d in documents)} sentence(s) in {len(documents)} document(s)); expected "
                         f"at least one document of two or more sentences (one per line), since each example "
                         f"splits a document's consecutive sentences into segments A and B")
