"""``ref-bert verify``: argument parsing and error reporting (the work is in :mod:`ref_bert.verify`)."""
from ref_bert.verify import add_arguments, run  # noqa: F401  (being moved here from ref_bert.verify)
