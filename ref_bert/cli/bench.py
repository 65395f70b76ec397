"""``ref-bert bench``: argument parsing and error reporting (the work is in :mod:`benchmarks.bench`)."""
from benchmarks.bench import add_arguments, run  # noqa: F401  (being moved here from benchmarks.bench)
