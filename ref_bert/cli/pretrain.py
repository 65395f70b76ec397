"""``ref-bert pretrain``: argument parsing and error reporting (the work is in :mod:`ref_bert.train`)."""
from ref_bert.train import add_arguments, run  # noqa: F401  (being moved here from ref_bert.train)
