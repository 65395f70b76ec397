"""``python -m gradcheck``: the battery, through the one command-line layer (``ref-bert gradcheck``)."""
import sys

from ref_bert.cli import main

sys.exit(main(["gradcheck", *sys.argv[1:]]))
