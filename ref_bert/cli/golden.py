"""``ref-bert golden``: argument parsing and error reporting (the work is in :mod:`ref_bert.golden`)."""
from ref_bert.golden import add_arguments, run  # noqa: F401  (being moved here from ref_bert.golden)
