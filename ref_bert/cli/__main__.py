"""``python -m ref_bert.cli``: the ``ref-bert`` command without installing."""
import sys

from . import main

sys.exit(main())
