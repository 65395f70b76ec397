"""``ref-bert masks``: argument parsing and error reporting (the work is in :mod:`ref_bert.masks_cli`)."""
from ref_bert.masks_cli import add_arguments, run  # noqa: F401  (being moved here from ref_bert.masks_cli)
