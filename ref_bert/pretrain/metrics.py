"""Metrics: OUT/metrics.jsonl (one JSON line per logged step), the progress bar, and OUT/loss.png.

A logged line: step, loss (the weighted total), mlm, sop, lr, grad_norm (before clipping),
tokens_per_s (real tokens since the previous logged line over the time since it), elapsed (seconds,
earlier runs of a resumed job included) and tokens (real tokens consumed so far).
"""
from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import files

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def read_metrics(path) -> list:
    """The JSON lines of a metrics file (an absent file is an empty history). A last line cut short
    (a process killed while appending it: no final newline) is dropped; any other bad line is a
    ValueError."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):   # the unterminated tail
                break
            raise ValueError(f"{path} line {number} is not JSON: {e}") from e
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"{path} line {number} is {line[:80]!r}; expected a JSON object with a positive "
                             f"integer 'step' (a metrics line)")
        records.append(record)
    return records


def metrics_bytes(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class StepLog:
    """The metrics file (appended to), the progress bar and the clock of one run of the loop.

    :meth:`count` every step; :meth:`record` and :meth:`write` on logged steps. Throughput is measured
    between logged steps; elapsed time adds ``elapsed_before`` (earlier runs of a resumed job).
    ``writer=False`` (data-parallel ranks other than 0): no file and no progress bar, the records only.
    """

    def __init__(self, out: Path, steps: int, initial_step: int, elapsed_before: float, progress: bool,
                 desc: str = "pretrain", writer: bool = True):
        from tqdm import tqdm

        self.elapsed_before = elapsed_before
        self.progress = tqdm(total=steps, initial=initial_step, disable=not (progress and writer), unit="step",
                             dynamic_ncols=True, desc=desc, file=sys.stderr)
        self.file = open(out / METRICS_NAME, "a", encoding="utf-8") if writer else None
        self.start = time.perf_counter()
        self.window_start, self.window_tokens = self.start, 0

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.start)

    def count(self, tokens: int) -> None:
        """One more step done, of ``tokens`` real tokens."""
        self.window_tokens += tokens
        self.progress.update(1)

    def record(self, step: int, lr: float, losses: dict, grad_norm: float, tokens_seen: int) -> dict:
        """The metrics line of ``step``; starts the next throughput window. Read the clock only after
        the step's host sync, so that on a GPU the step's kernels are done. ``losses``: name -> value,
        "loss" (the total) first (pretraining: loss, mlm, sop)."""
        now = time.perf_counter()
        record = {"step": step, **losses, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
                  "elapsed": self.elapsed_before + (now - self.start), "tokens": tokens_seen}
        self.window_start, self.window_tokens = now, 0
        return record

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        losses = {k: f"{record[k]:.3f}" for k in ("loss", "mlm", "sop") if k in record}
        self.progress.set_postfix(**losses, lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                  refresh=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.progress.close()


# --- the plot ----------------------------------------------------------------------------------------
def _moving_average(values: list, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.r_[0.0, values])
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def write_plot(out: Path, records: list, sop_weight: Optional[float] = None) -> Optional[Path]:
    """OUT/loss.png, four panels against the step: the MLM loss, the SOP loss (with chance level
    ln 2), the weighted total MLM + w * SOP that the optimiser minimises, and the learning rate. Each
    loss has its own axis, so that neither is flattened by the other's scale; thin lines are the
    logged steps, thick ones a moving average; each loss panel's title gives its first and last values
    (means of the moving-average window). Returns None (with a printed note) where matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {out / PLOT_NAME} was not drawn "
              f"(pip install matplotlib); the numbers are in {out / METRICS_NAME}", file=sys.stderr)
        return None
    if not records:
        return None
    steps = [r["step"] for r in records]
    window = max(1, len(records) // 50)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (ax_mlm, ax_sop), (ax_total, ax_lr) = axes
    total_name = "total: MLM + SOP" if sop_weight is None else f"total: MLM + {sop_weight:g} × SOP"
    panels = ((ax_mlm, "mlm", "MLM loss (masked-token cross-entropy)", "C1"),
              (ax_sop, "sop", "SOP loss (sentence-order cross-entropy)", "C2"),
              (ax_total, "loss", f"{total_name} (what the optimiser minimises)", "C0"))
    for ax, key, title, color in panels:
        values = [r[key] for r in records]
        smooth = _moving_average(values, window)
        ax.plot(steps, values, color=color, linewidth=0.6, alpha=0.35, label="each logged step")
        ax.plot(steps, smooth, color=color, linewidth=2,
                label=f"mean of {window} steps" if window > 1 else "loss")
        first = float(np.mean(values[:window]))
        ax.set_title(f"{title}\n{first:.3f} → {smooth[-1]:.3f}", fontsize=10)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    ax_sop.axhline(math.log(2), color="gray", linestyle="--", linewidth=1, label="chance (ln 2 = 0.693)")
    for ax in (ax_mlm, ax_sop, ax_total):
        ax.legend(fontsize=8, loc="upper right")
    ax_lr.plot(steps, [r["lr"] for r in records], color="C4", linewidth=1.5)
    ax_lr.set_title(f"learning rate (highest {max(r['lr'] for r in records):.3g})", fontsize=10)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)
    for ax in (ax_total, ax_lr):
        ax.set_xlabel("step")
    fig.suptitle(f"{out.name}: {steps[-1]} steps", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    files.atomic_write_bytes(out / PLOT_NAME, buffer.getvalue())
    return out / PLOT_NAME
