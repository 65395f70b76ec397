"""Child process of tests/test_reliability.py's kill tests: run (or resume) a tiny pretraining job in OUT and
print each completed step on stdout, so that the parent can SIGKILL it at a moment of its choosing.

    python tests/_kill_child.py OUT SPIECE SETTINGS_JSON
"""
import json
import sys
from pathlib import Path

from ref_bert.pretrain import pretrain

out, spiece, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
resume = (Path(out) / "latest").is_file()
pretrain(out=out, tokenizer=spiece, resume=resume, on_step=lambda step, _: print(step, flush=True), **settings)
