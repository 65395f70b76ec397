"""ref-bert against Hugging Face transformers on PyTorch: training step and forward pass.

    ref-bert bench                                    # albert-base, batch 8, sequence 128
    ref-bert bench --config tiny albert-base bert-base --json results.json
    python -m benchmarks --steps 3 --warmup 1         # the same harness without installing
    ref-bert bench --backend cupy                     # GPU: CuPy against PyTorch CUDA

(the command is ref_bert/cli/bench.py; this module measures: :func:`run_benchmark`).

One run measures, on the same machine, with the same config, weights and batch:

* ref-bert: the pretraining loop's step: the batch in ``shards`` micro-batches (default 2) computed side
  by side on the threads with one-thread BLAS each (``Backend.map_shards``), their gradients summed in
  index order (``DataParallel.gradients``), then ``Lamb.from_preset("albert").step``; forward only:
  ``effective_batch_loss`` over the same shards (eval mode). ``shards=1``: ``model.loss_and_grads(...,
  training=True)`` and ``model.loss(...)`` over the whole batch, BLAS on every thread.
* PyTorch eager: ``AlbertForPreTraining`` / ``BertForPreTraining`` with ``attn_implementation="eager"``
  holding the same weights, ``loss.backward()`` then :class:`TorchAlbertLamb`, the same ALBERT LAMB
  update (global clipping to 1.0, no bias correction, LayerNorm/bias excluded from decay and trust
  ratio) written with ``torch._foreach_*`` ops as torch.optim's own optimisers are; forward only:
  the model under ``torch.no_grad()`` in eval mode, loss included.
* the machine's float32 matmul peak: the best of several NumPy sgemms of 2048^3 (CuPy 8192^3 on a GPU),
  and PyTorch's for comparison.

Each system runs in a fresh subprocess with the same thread count, so that its peak memory is its own:
the peak resident set (Linux ``VmHWM`` from /proc/self/status, reset through /proc/self/clear_refs after
set-up and warm-up, so it covers the timed steps; ``ru_maxrss`` where that reset is unavailable). That
includes everything resident in the process (interpreter, libraries, weights, optimiser state); the
resident size before the timed steps is reported beside it. tracemalloc is not used: it does not see
BLAS or PyTorch allocations. On a GPU: CuPy's memory pool after the steps (pool emptied before them)
against ``torch.cuda.max_memory_reserved`` (both caching allocators; allocated bytes are reported too).

Times are medians over the timed steps after warm-up; on a GPU every step ends with a synchronisation.
GFLOP/s use the exact matmul count of :mod:`benchmarks.flops` (each system's own: Hugging Face's
pretraining model computes MLM logits at every position, ref-bert only at labelled ones).
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

SYSTEMS = ("ref-bert", "torch")
DEFAULT_CONFIGS = ("albert-base",)


# --- small utilities ----------------------------------------------------------------------------------
def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> dict:
    """Peak resident set in MiB: VmHWM (resettable) and ru_maxrss (lifetime), and the current VmRSS."""
    import resource

    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"vmhwm_mib": None if hwm is None else hwm / 1024, "vmrss_mib": None if rss is None else rss / 1024,
            "ru_maxrss_mib": maxrss / 1024}


def timed(fn, warmup: int, steps: int, sync, cpu_times: list | None = None) -> list[float]:
    """Wall-clock seconds of each of ``steps`` calls after ``warmup`` untimed ones (``sync`` after
    each); the process CPU seconds of each call are appended to ``cpu_times`` when given."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        cpu, start = time.process_time(), time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu)
    return times


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for key in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
            if m:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = m.group(1).strip()
    except OSError:
        pass
    import numpy as np

    info["numpy"] = np.__version__
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')} ({blas.get('openblas configuration', '')})"
    except Exception:  # older NumPy: no dict mode
        info["numpy_blas"] = "unknown"
    return info


# --- the batch, the weights, the Hugging Face model ---------------------------------------------------
def bench_config(entry):
    """The config measured: ``entry`` is a preset name, a :class:`~ref_bert.Config`, or a Config's
    ``to_dict()`` (how it reaches a worker process); with the one behaviour Hugging Face fixes made to
    match it: HF's AlbertLayer never applies its FFN-output dropout (BERT's does), so
    ``ffn_output_dropout`` follows the family."""
    from ref_bert import Config

    if isinstance(entry, str):
        config = Config.preset(entry)
    elif isinstance(entry, dict):
        config = Config.from_dict(entry)
    else:
        config = entry
    return config.replace(ffn_output_dropout=config.model_type == "bert")


def config_label(entry) -> str:
    """How a config entry is named in the progress lines, the table and the JSON."""
    return entry if isinstance(entry, str) else (entry.get("name") if isinstance(entry, dict) else entry.name)


def _portable(entry):
    """A config entry as a worker process receives it (JSON): a preset name stays a name."""
    return entry if isinstance(entry, (str, dict)) else entry.to_dict()


def make_batch(config, batch: int, seq: int, masked_fraction: float, seed: int) -> dict:
    """A host batch: random ids (never the pad id), two segments, ``round(masked_fraction * seq)``
    labelled positions per sequence (never position 0), random SOP/NSP labels. int64 everywhere.
    :func:`ref_bert.examples.make_batch`'s ``"counted"`` recipe, without position ids (both systems use
    their default positions)."""
    from ref_bert.examples import make_batch as make_example_batch

    if seq > config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq} exceeds max_position_embeddings={config.max_position_embeddings} "
                         f"of {config.name}")
    x = make_example_batch(config, batch, seq, seed, recipe="counted", label_rate=masked_fraction)
    del x["position_ids"]
    return x


class TorchAlbertLamb:
    """``Lamb.from_preset("albert")`` in PyTorch, with ``torch._foreach_*`` ops (one step):

        g <- g * c / max(||G||, c), c = 1;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        u = m / (sqrt(v) + eps) + wd w      (wd = 0 for names matching LayerNorm/layer_norm/bias)
        w <- w - lr * r * u,  r = ||w|| / ||u|| when both > 0 else 1 (r = 1 for excluded names)
    """

    def __init__(self, named_parameters, lr=0.00176, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 exclude=("LayerNorm", "layer_norm", "bias"), max_grad_norm=1.0):
        import torch

        self.torch = torch
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.max_grad_norm = max_grad_norm
        self.adapted = [not any(re.search(e, n) for e in exclude) for n in self.names]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def step(self):
        torch = self.torch
        b1, b2 = self.betas
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            clip = self.max_grad_norm / torch.clamp(norm, min=self.max_grad_norm)
            grads = torch._foreach_mul(grads, clip)
            torch._foreach_mul_(self.m, b1)
            torch._foreach_add_(self.m, grads, alpha=1.0 - b1)
            torch._foreach_mul_(self.v, b2)
            torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - b2)
            denom = torch._foreach_sqrt(self.v)
            torch._foreach_add_(denom, self.eps)
            updates = torch._foreach_div(self.m, denom)
            idx = [i for i, a in enumerate(self.adapted) if a]
            w_ad, u_ad = [self.params[i] for i in idx], [updates[i] for i in idx]
            torch._foreach_add_(u_ad, w_ad, alpha=self.weight_decay)
            w_norms = torch.stack(torch._foreach_norm(w_ad))
            u_norms = torch.stack(torch._foreach_norm(u_ad))
            ratios = torch.where((w_norms > 0) & (u_norms > 0), w_norms / torch.where(u_norms > 0, u_norms, 1.0),
                                 1.0)
            for u, r in zip(u_ad, ratios.unbind()):
                u.mul_(r)
            torch._foreach_add_(self.params, updates, alpha=-self.lr)


# --- workers (each in its own subprocess) ------------------------------------------------------------
def _worker_peak(spec: dict) -> dict:
    """Best-of-``repeats`` float32 matmul of ``n``^3: NumPy (or CuPy) and PyTorch (when importable)."""
    import numpy as np

    import backends

    n, repeats = spec["n"], spec["repeats"]
    bk = backends.get(spec["backend"])
    rng = np.random.default_rng(0)
    a = bk.from_host(rng.standard_normal((n, n), dtype=np.float32))
    b = bk.from_host(rng.standard_normal((n, n), dtype=np.float32))
    out = {}
    times = timed(lambda: a @ b, 2, repeats, bk.synchronize)
    out["sgemm_gflops"] = 2 * n ** 3 / min(times) / 1e9
    out["sgemm_n"] = n
    if spec.get("torch", True):
        try:
            import torch
        except ImportError:
            return out
        torch.set_num_threads(spec["threads"])
        device = "cuda" if spec["backend"] == "cupy" else "cpu"
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        ta, tb = (torch.from_numpy(bk.to_host(x)).to(device) for x in (a, b))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        times = timed(lambda: ta @ tb, 2, repeats, sync)
        out["torch_mm_gflops"] = 2 * n ** 3 / min(times) / 1e9
    return out


def _measure(step, forward, warmup, steps, sync, memory) -> dict:
    """Time ``step`` then ``forward``; the peak-memory counters are reset before each timed phase."""
    result = {}
    for phase, fn in (("train", step), ("forward", forward)):
        for _ in range(warmup):
            fn()
        sync()
        result[f"{phase}_rss_before_mib"] = peak_rss()["vmrss_mib"]
        reset_ok = reset_peak_rss()
        memory["reset"]()
        cpu_times = []
        times = timed(fn, 0, steps, sync, cpu_times)
        mem = peak_rss()
        result[f"{phase}_times_s"] = times
        result[f"{phase}_cpu_times_s"] = cpu_times
        result[f"{phase}_median_s"] = statistics.median(times)
        result[f"{phase}_peak_rss_mib"] = mem["vmhwm_mib"] if reset_ok else mem["ru_maxrss_mib"]
        result[f"{phase}_peak_rss_source"] = "VmHWM after clear_refs" if reset_ok else "ru_maxrss (lifetime)"
        result.update({f"{phase}_{k}": v for k, v in memory["read"]().items()})
    return result


def split_batch(host: dict, shards: int) -> tuple[list, list, list]:
    """``host`` cut into ``shards`` consecutive runs of examples (sizes as ``numpy.array_split``):
    ``(micro_batches, mlm_counts, sizes)``, the micro-batches still host arrays."""
    import numpy as np

    n = len(host["input_ids"])
    if not 1 <= shards <= n:
        raise ValueError(f"--shards {shards} must be between 1 and the batch size {n}")
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    micro = [{k: v[a:b] for k, v in host.items()} for a, b in zip(bounds[:-1], bounds[1:])]
    return micro, [int((m["mlm_labels"] != -100).sum()) for m in micro], [len(m["input_ids"]) for m in micro]


def _worker_ref_bert(spec: dict) -> dict:
    import numpy as np

    import backends
    from ref_bert import Model
    from ref_bert.optim import Lamb
    from ref_bert.pretrain.accumulation import effective_batch_loss
    from ref_bert.pretrain.data_parallel import DataParallel

    bk = backends.get(spec["backend"])
    config = bench_config(spec["config"])
    model = Model(config, backend=bk, dtype="float32", seed=spec["seed"])
    host = make_batch(config, spec["batch"], spec["seq"], spec["masked_fraction"], spec["seed"])
    batch = {k: bk.from_host(v) for k, v in host.items()}
    eval_loss = float(model.loss(**batch))
    opt = Lamb.from_preset("albert", model.state_dict())
    # The pretraining loop's step (ref_bert/pretrain/loop.py): the batch in ``shards`` micro-batches,
    # each with its own dropout seed, computed side by side on the backend's threads with one-thread BLAS
    # (Backend.map_shards) and summed in index order; then the optimiser. shards = 1 is one
    # loss_and_grads over the whole batch, BLAS on every thread.
    shards = spec.get("shards", 1)
    micro_host, mlm_counts, sizes = split_batch(host, shards)
    micro = [{k: bk.from_host(v) for k, v in m.items()} for m in micro_host]
    parallel = DataParallel(backends.comm.SingleProcess(), model)
    counter = [0]
    sharded_eval_loss = float(effective_batch_loss(model, micro, mlm_counts)) if shards > 1 else None

    def step():
        if shards == 1:
            grads = model.loss_and_grads(**batch, training=True).grads
        else:
            grads, _ = parallel.gradients(model, micro, list(range(shards)), mlm_counts, sizes, 1.0,
                                          spec["seed"], counter[0])
        counter[0] += 1
        opt.step(grads)

    def forward():
        if shards == 1:
            model.loss(**batch)
        else:
            effective_batch_loss(model, micro, mlm_counts)

    memory = {"reset": bk.reset_peak_memory, "read": lambda: bk.peak_memory()}
    if spec.get("profile"):
        import cProfile
        import pstats

        step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(spec["profile"]):
            step()
        bk.synchronize()
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    result = _measure(step, forward, spec["warmup"], spec["steps"], bk.synchronize, memory)
    result.update(eval_loss=eval_loss, shards=shards, sharded_eval_loss=sharded_eval_loss,
                  mlm_rows=int(np.sum(host["mlm_labels"] != -100)), device=bk.device_name(),
                  malloc_tuned=bk.malloc_tuned, fast_variants=len(bk.fast),
                  optimizer="ref_bert.optim.Lamb.from_preset('albert')")
    return result


def _worker_torch(spec: dict) -> dict:
    import torch

    from ref_bert import Model, hf_torch

    torch.set_num_threads(spec["threads"])
    device = "cuda" if spec["backend"] == "cupy" else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--backend cupy compares against PyTorch CUDA, but torch.cuda.is_available() is "
                               f"False (torch {torch.__version__}); install a CUDA build of torch")
        torch.backends.cuda.matmul.allow_tf32 = False  # full float32, as CuPy's default matmul
        torch.backends.cudnn.allow_tf32 = False
    config = bench_config(spec["config"])
    # the same weights, through ref-bert's one name map (ref_bert.hf), in an eager-attention *ForPreTraining
    model = hf_torch.from_model(Model(config, backend="numpy", dtype="float32", seed=spec["seed"]),
                                dtype="float32", device=device)
    host = make_batch(config, spec["batch"], spec["seq"], spec["masked_fraction"], spec["seed"])
    kwargs = hf_torch.forward_kwargs(host, config.model_type, labels=True, device=device)
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(**kwargs).loss)
    opt = TorchAlbertLamb(model.named_parameters())

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        model(**kwargs).loss.backward()
        opt.step()

    def forward():
        model.eval()
        with torch.no_grad():
            model(**kwargs).loss

    if device == "cuda":
        sync = torch.cuda.synchronize

        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def read():
            return {"device_peak_reserved_mib": torch.cuda.max_memory_reserved() / 2 ** 20,
                    "device_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2 ** 20}
    else:
        def sync():
            return None

        def reset():
            return None

        def read():
            return {}
    result = _measure(step, forward, spec["warmup"], spec["steps"], sync, {"reset": reset, "read": read})
    result.update(eval_loss=eval_loss, torch=torch.__version__, device=device,
                  optimizer="TorchAlbertLamb (torch._foreach ops; ALBERT LAMB as Lamb.from_preset('albert'))")
    return result


WORKERS = {"peak": _worker_peak, "ref-bert": _worker_ref_bert, "torch": _worker_torch}


def _run_worker(kind: str, spec: dict, threads: int | None) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result (plus load averages)."""
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    before = loadavg()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--worker", kind, json.dumps(spec)],
                          env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} measurement failed (exit status {proc.returncode}); see its error above")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_before"], result["loadavg_after"] = before, loadavg()
    return result


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from several rounds of the same system: every timed step pooled (the median is over
    all of them), the largest peak memory, and each round's own figures kept under "rounds"."""
    result = dict(rounds[0])
    for phase in ("train", "forward"):
        for key in (f"{phase}_times_s", f"{phase}_cpu_times_s"):
            result[key] = [t for r in rounds for t in r[key]]
        result[f"{phase}_median_s"] = statistics.median(result[f"{phase}_times_s"])
        result[f"{phase}_min_s"] = min(result[f"{phase}_times_s"])
        result[f"{phase}_cpu_median_s"] = statistics.median(result[f"{phase}_cpu_times_s"])
        for key in [k for k in result if k.startswith(phase) and k.endswith("_mib")]:
            values = [r[key] for r in rounds if r.get(key) is not None]
            result[key] = max(values) if values else None
    result["loadavg_before"], result["loadavg_after"] = rounds[0]["loadavg_before"], rounds[-1]["loadavg_after"]
    result["rounds"] = [{k: r[k] for k in ("train_median_s", "forward_median_s", "train_peak_rss_mib",
                                           "loadavg_before", "loadavg_after")} for r in rounds]
    return result


def worker_main(kind: str, spec_json: str) -> int:
    result = WORKERS[kind](json.loads(spec_json))
    print(json.dumps(result))
    return 0


# --- the run ---------------------------------------------------------------------------------------------
def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def report_table(results: list[dict], peak: dict) -> str:
    """The markdown table printed at the end (one row per config and system, then the ratios)."""
    lines = ["| config | system | train step (s): median (min) | CPU s/step | GFLOP/step | GFLOP/s | % of sgemm peak "
             "| peak RSS train (MiB) | forward (s): median (min) | peak RSS fwd (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['system']} | {_fmt(r['train_median_s'])} ({_fmt(r['train_min_s'])}) | "
                     f"{_fmt(r['train_cpu_median_s'], '.2f')} | {r['train_gflop']:.1f} | "
                     f"{r['train_gflops']:.1f} | {_fmt(r.get('train_pct_peak'), '.0f')} | "
                     f"{_fmt(r['train_peak_rss_mib'], '.0f')} | {_fmt(r['forward_median_s'])} "
                     f"({_fmt(r['forward_min_s'])}) | {_fmt(r['forward_peak_rss_mib'], '.0f')} |")
    lines.append("")
    lines.append(f"sgemm peak: {peak.get('sgemm_gflops', 0):.1f} GFLOP/s (n={peak.get('sgemm_n')})"
                 + (f"; torch mm {peak['torch_mm_gflops']:.1f} GFLOP/s" if "torch_mm_gflops" in peak else ""))
    by_config: dict[str, dict] = {}
    for r in results:
        by_config.setdefault(r["config"], {})[r["system"]] = r
    for name, pair in by_config.items():
        if "ref-bert" in pair and "torch" in pair:
            ours, theirs = pair["ref-bert"], pair["torch"]
            train_ratio = ours["train_median_s"] / theirs["train_median_s"]
            forward_ratio = ours["forward_median_s"] / theirs["forward_median_s"]
            lines.append(f"{name}: ref-bert / torch time ratio: train {train_ratio:.2f}, "
                         f"forward {forward_ratio:.2f}; peak RSS train "
                         f"{ours['train_peak_rss_mib']:.0f} vs {theirs['train_peak_rss_mib']:.0f} MiB; eval loss "
                         f"{ours['eval_loss']:.6f} vs {theirs['eval_loss']:.6f}")
            if ours.get("train_device_pool_mib") is not None and theirs.get("train_device_peak_reserved_mib"):
                lines.append(f"{name}: GPU memory in the training step: CuPy pool {ours['train_device_pool_mib']:.0f} "
                             f"MiB vs torch reserved {theirs['train_device_peak_reserved_mib']:.0f} MiB "
                             f"(allocated {theirs['train_device_peak_allocated_mib']:.0f} MiB)")
    return "\n".join(lines)


def _measure_all(record, configs, batch, seq, masked_fraction, warmup, steps, rounds, systems, backend, threads,
                 shards, peak_spec, profile, seed, bar, step_flops) -> None:
    """The measurements of :func:`run_benchmark`, into ``record`` ("results", "peak", "peak_measurements")."""
    def measured(kind, spec, what):
        bar.set_postfix_str(what, refresh=False)
        result = _run_worker(kind, spec, threads)
        bar.update(1)
        return result

    peaks = [measured("peak", peak_spec, "sgemm peak")]
    print(f"sgemm peak {peaks[0]['sgemm_gflops']:.1f} GFLOP/s (measured again at the end; the best counts)",
          flush=True)
    for entry in configs:
        name = config_label(entry)
        config = bench_config(entry)
        labelled = int((make_batch(config, batch, seq, masked_fraction, seed)["mlm_labels"]
                        != -100).sum())
        runs: dict[str, list] = {system: [] for system in systems}
        for round_index in range(rounds):   # systems alternate, so that both see the same load
            for system in systems:
                spec = dict(config=_portable(entry), batch=batch, seq=seq, masked_fraction=masked_fraction,
                            warmup=warmup, steps=steps, backend=backend, threads=threads, shards=shards,
                            seed=seed, profile=profile if system == "ref-bert" and round_index == 0 else 0)
                run_result = measured(system, spec, f"{name} {system} round {round_index + 1}/{rounds}")
                runs[system].append(run_result)
                print(f"{name} {system} (round {round_index + 1}/{rounds}): train "
                      f"{run_result['train_median_s']:.3f} s, forward {run_result['forward_median_s']:.3f} s, "
                      f"peak RSS {run_result['train_peak_rss_mib']:.0f} MiB; load {run_result['loadavg_after']}",
                      flush=True)
        for system, system_rounds in runs.items():
            result = merge_rounds(system_rounds)
            # ref-bert's loss gathers the labelled rows before the MLM head, forward-only too;
            # Hugging Face's pretraining forward computes logits at every position.
            mlm_rows = labelled if system == "ref-bert" else batch * seq
            train = step_flops(config, batch, seq, mlm_rows)
            result.update(config=name, system=system, mlm_rows=mlm_rows, flops=train,
                          train_gflop=train["train_step"] / 1e9, forward_gflop=train["forward"] / 1e9)
            result["train_gflops"] = result["train_gflop"] / result["train_median_s"]
            result["forward_gflops"] = result["forward_gflop"] / result["forward_median_s"]
            record["results"].append(result)
    peaks.append(measured("peak", peak_spec, "sgemm peak"))
    # The peak is the best of the two measurements (a busy machine only ever lowers it).
    peak = {k: max(p[k] for p in peaks if k in p) for k in peaks[0]}
    record["peak"], record["peak_measurements"] = peak, peaks
    for result in record["results"]:
        result["train_pct_peak"] = 100 * result["train_gflops"] / peak["sgemm_gflops"]
        result["forward_pct_peak"] = 100 * result["forward_gflops"] / peak["sgemm_gflops"]


def run_benchmark(configs=DEFAULT_CONFIGS, batch: int = 8, seq: int = 128, masked_fraction: float = 0.15,
                  warmup: int = 2, steps: int = 5, rounds: int = 1, systems=SYSTEMS, backend: str = "numpy",
                  threads: int | None = None, shards: int = 2, peak_size: int | None = None, peak_repeats: int = 5,
                  decode=None, profile: int = 0, seed: int = 0, json_path=None, progress: bool = False) -> dict:
    """Measure every system on every config (each in fresh subprocesses), print the progress and the
    table, write ``json_path`` when given, and return the record (every number). ``configs``: preset
    names or :class:`~ref_bert.Config` objects. ``decode``: None, or the target lengths of the
    cached-decoding timing (empty: 16, 64, 256). ``progress`` shows a bar on stderr, one update per
    measurement (the two sgemm peaks, then each system of each round of each config)."""
    from tqdm import tqdm

    from .flops import step_flops

    threads = threads or os.cpu_count() or 1
    peak_n = peak_size or (8192 if backend == "cupy" else 2048)
    record = {"argv": list(sys.argv),
              "machine": machine_info(), "backend": backend, "threads": threads, "shards": shards,
              "loadavg_start": loadavg(),
              "batch": batch, "seq": seq, "warmup": warmup, "steps": steps, "results": []}
    print(f"# ref-bert bench: backend {backend}, {threads} threads, {shards} shard(s), batch {batch}, seq {seq}, "
          f"{warmup} warm-up + {steps} timed steps; load average {record['loadavg_start']}", flush=True)
    peak_spec = {"n": peak_n, "repeats": peak_repeats, "backend": backend, "threads": threads,
                 "torch": "torch" in systems}
    bar = tqdm(total=2 + len(configs) * rounds * len(systems), desc="bench", unit="run", disable=not progress,
               file=sys.stderr, leave=False)
    try:
        _measure_all(record, configs, batch, seq, masked_fraction, warmup, steps, rounds, systems, backend, threads,
                     shards, peak_spec, profile, seed, bar, step_flops)
    finally:
        bar.close()
    peak = record["peak"]
    if decode is not None:
        from .decode_cache import measure

        lengths = decode or [16, 64, 256]
        record["decode"] = measure(lengths, backend=backend)
    record["loadavg_end"] = loadavg()
    print()
    print(report_table(record["results"], peak))
    if "decode" in record:
        print("\ncached decoding, ms per token: " + ", ".join(
            f"length {row['length']}: {row['ms_per_token_cache']:.2f} (no cache {row['ms_per_token_no_cache']:.2f})"
            for row in record["decode"]))
    print(f"\nload average at start {record['loadavg_start']}, at end {record['loadavg_end']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {json_path}")
    return record


if __name__ == "__main__":   # a worker: python -m benchmarks.bench --worker KIND SPEC_JSON (see _run_worker)
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m benchmarks.bench --worker KIND SPEC_JSON (the command is ref-bert bench)")
    sys.exit(worker_main(sys.argv[2], sys.argv[3]))
