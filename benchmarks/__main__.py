"""``python -m benchmarks``: the benchmark, through the one command-line layer (``ref-bert bench``)."""
import sys

from ref_bert.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
