"""``ref-bert generate``: argument parsing and error reporting (the work is in :mod:`ref_bert.generate_cli`)."""
from ref_bert.generate_cli import add_arguments, run  # noqa: F401  (being moved here from ref_bert.generate_cli)
