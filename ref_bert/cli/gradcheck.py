"""``ref-bert gradcheck``: argument parsing and error reporting (the work is in :mod:`gradcheck.battery`)."""
from gradcheck.battery import add_arguments, run  # noqa: F401  (being moved here from gradcheck.battery)
