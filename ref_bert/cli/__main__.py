"""``python -m ref_bert.cli``: the ``ref-bert`` command."""
import sys

from . import main

sys.exit(main())
