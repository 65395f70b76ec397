"""The backend shim: the one place that knows whether arrays live in NumPy (CPU) or CuPy (GPU).

Model code never imports numpy-or-cupy directly for array math; it asks a :class:`Backend` for
``xp`` (the array module) and for the few operations the two array modules disagree on:

* ``erf``           -- NumPy has none (SciPy's ufunc is used); CuPy has it in ``cupyx.scipy.special``.
* ``scatter_add``   -- ``table[ids] += values`` with repeated ids summed (embedding gradients).
* ``to_host`` / ``from_host`` -- explicit transfers; nothing moves between host and device implicitly.
* ``synchronize``   -- wait for queued device work (needed before reading a host clock).
* randomness        -- every random number (initial weights, dropout masks, masking decisions) is drawn
  from a seeded ``numpy.random.Generator`` on the host and then transferred, so one seed gives the
  same numbers on both backends (CuPy's own generators produce different streams).

Memory on the NumPy backend: a training step allocates and frees hundreds of megabytes of
activations. glibc's malloc hands blocks above a dynamic threshold straight back to the kernel
(``munmap``, or trimming the top of the heap), so every step faulted the same memory in again, page by
zeroed page (docs/performance.md has the figures). Creating the NumPy
backend therefore asks glibc (``mallopt``) to serve blocks up to 32 MiB from the heap and to keep
freed heap memory for reuse: the effect of preallocated buffers, without changing any op. It is
process-wide, Linux/glibc only, and ``REF_BERT_MALLOC_TUNING=0`` turns it off
(``Backend.malloc_tuned`` says whether it was applied). CuPy keeps its own memory pool.

Fast variants: every op in ref_bert/ops is a plain reference, the formula of its docstring. A
backend may replace some of them (the ops wrapped with :func:`fast_path`) by a variant with the same
signature and the same results up to rounding, listed in ``Backend.fast`` and chosen here, in
:func:`_make`, and nowhere else. The NumPy backend runs the memory-optimised forms of
:mod:`backends.numpy_fast` (fewer passes over memory, bit-identical to the code the ops carried
before); the CuPy backend runs adapters (:mod:`backends.cupy_fast`) over the fused kernels of
:mod:`backends.cupy_kernels` (one kernel where the reference makes several passes), the
optimiser's among them (:mod:`backends.cupy_optim_fast`). ``REF_BERT_FAST=0`` (or the older
``REF_BERT_FUSED=0``) leaves every table empty, so the references run.

Select with ``backends.get("numpy")`` / ``backends.get("cupy")``; ``backends.get()`` reads the
``REF_BERT_BACKEND`` environment variable (default ``numpy``). Asking for CuPy where it is not
installed, or where no GPU is visible, raises :class:`BackendUnavailable` saying which; there is no
silent fallback to the CPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from typing import Any, Callable

import numpy as np

__all__ = ["Backend", "BackendUnavailable", "get", "of", "available", "fast_path", "ENV_VAR", "MALLOC_ENV_VAR",
           "FUSED_ENV_VAR", "FAST_ENV_VAR", "fast_enabled", "reference_ops"]

ENV_VAR = "REF_BERT_BACKEND"
_NAMES = ("numpy", "cupy")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (CuPy missing, or no GPU)."""


class Backend:
    """Array module plus the handful of operations that differ between NumPy and CuPy.

    Attributes:
        name: ``"numpy"`` or ``"cupy"``.
        xp:   the array module (``numpy`` or ``cupy``).
        host_blas: whether the model's matrix products run in the host's BLAS library (NumPy's
              OpenBLAS), so that the BLAS thread count matters: True for numpy, False for cupy.
    """

    def __init__(self, name: str, xp: Any, erf: Any):
        self.name = name
        self.xp = xp
        self._erf = erf
        self.host_blas = name == "numpy"
        self.malloc_tuned = False
        self.threads = _thread_count()
        self._thread_pool = None
        # How large tensors are split for elementwise work on the threads (:meth:`pieces`): runs of this
        # many elements on NumPy (512 KiB of float32: a piece's temporaries stay in cache, and one
        # large tensor no longer runs on one core); None on CuPy, where a tensor is one piece.
        self.piece_elements = PIECE_ELEMENTS if name == "numpy" else None
        # Fast variants of reference ops, chosen here and nowhere else: the key is the reference
        # function's "module.name" (see :func:`fast_path`), the value a function with the same
        # signature and the same results up to rounding. Empty means every op runs its reference code.
        self.fast: dict[str, Callable] = {}

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    # --- math the array modules lack -------------------------------------------------------
    def erf(self, x, out=None):
        """Elementwise error function, keeping the dtype of ``x`` (float32 stays float32); ``out``
        (which may be ``x``) receives the result when given.

        On NumPy, SciPy's erf is a scalar loop (the exact GELU's main cost); it releases the GIL, so large contiguous arrays are split across ``threads`` threads (the
        count BLAS uses: $OMP_NUM_THREADS, else $OPENBLAS_NUM_THREADS, else every core)."""
        if (self.name == "numpy" and self.threads > 1 and x.size >= _PARALLEL_MIN_SIZE and x.flags.c_contiguous
                and (out is None or out.flags.c_contiguous)):
            out = np.empty_like(x) if out is None else out
            flat_x, flat_out = x.reshape(-1), out.reshape(-1)
            bounds = np.linspace(0, x.size, self.threads + 1).astype(int)
            chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            self.parallel_map(lambda c: self._erf(flat_x[c], out=flat_out[c]), chunks)
            return out
        return self._erf(x) if out is None else self._erf(x, out=out)

    def parallel_map(self, fn, items) -> list:
        """``[fn(item) for item in items]``, the results in the items' order.

        On NumPy, with more than one thread and more than one item, the calls are spread over the
        backend's thread pool: NumPy releases the GIL inside its loops, so elementwise work on
        separate slices runs on separate cores. ``fn`` must therefore write only memory that no other
        item touches; then the results do not depend on the thread count. On CuPy the calls run one
        after another (each only queues kernels on the device)."""
        items = list(items)
        if (self.name != "numpy" or self.threads <= 1 or len(items) <= 1
                or getattr(_pool_thread, "active", False)):   # called from the pool itself: run inline
            return [fn(item) for item in items]
        return list(self._pool().map(fn, items))

    def map_shards(self, fn, items, combine) -> None:
        """``combine(fn(item))`` for every item, in the items' order: the shards of a batch.

        ``fn`` computes one shard (a micro-batch's gradient, say) and ``combine`` folds its result into
        a total on the calling thread. On NumPy every ``fn`` call runs with one-thread BLAS, and with more
        than one thread the calls run side by side on the backend's threads (up to ``threads`` at once;
        results wait for their turn to be combined). Each shard's arithmetic is therefore the same
        whatever the thread count (OpenBLAS splits a product differently on 1 and 2 threads, and the
        float32 sums then round differently), so anything combined in the items' order is identical
        bit for bit with 1, 2 or more threads. Both cores work because two shards run at once, not
        because one product is split. ``fn`` must share no mutable state with the other calls (each
        shard its own dropout seed, not one generator drawn from in turn). On CuPy the calls run one
        after another (each only queues kernels on the device)."""
        items = list(items)
        host = self.name == "numpy"
        side_by_side = (host and self.threads > 1 and len(items) > 1
                        and not getattr(_pool_thread, "active", False))   # not from the pool itself
        with _one_thread_blas() if host else contextlib.nullcontext():
            for result in (self._pool().map if side_by_side else map)(fn, items):   # in the items' order
                combine(result)

    def pieces(self, *arrays) -> list[tuple]:
        """Split same-shaped arrays into matching pieces: a list of tuples of views, one tuple per piece,
        for elementwise work spread over the threads with :meth:`parallel_map`.

        Consecutive runs of ``piece_elements`` elements of the flattened arrays (the last run shorter)
        on NumPy; one piece, the arrays themselves, on CuPy, for arrays of at most ``piece_elements``
        elements, and when any array is not C-contiguous (its flattened view would be a copy, and
        in-place updates of it would be lost). The piece size is fixed, never derived from the thread
        count, so that work summed piece by piece in a fixed order gives the same numbers whatever the
        thread count."""
        size = arrays[0].size
        step = self.piece_elements
        if step is None or size <= step or not all(a.flags.c_contiguous for a in arrays):
            return [arrays]
        flat = [a.reshape(-1) for a in arrays]
        return [tuple(f[start:start + step] for f in flat) for start in range(0, size, step)]

    def set_threads(self, threads: int) -> None:
        """Set how many threads the NumPy backend's own parallel loops use (erf, the optimisers'
        pieces); by default the BLAS count from the environment. ``ref-bert pretrain`` sets it with
        its BLAS limit. Results do not depend on it."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if threads != self.threads and self._thread_pool is not None:
            self._thread_pool.shutdown(wait=True)
            self._thread_pool = None
        self.threads = threads

    def _pool(self):
        if self._thread_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            if self.malloc_tuned:
                _one_malloc_arena()

            self._thread_pool = ThreadPoolExecutor(self.threads, thread_name_prefix=_POOL_PREFIX,
                                                   initializer=_mark_pool_thread)
        return self._thread_pool

    def scatter_add(self, table, ids, values) -> None:
        """In place: ``table[ids[n]] += values[n]`` for every n, repeated ids summed.

        ``table``: (V, E); ``ids``: (N,) integers in [0, V); ``values``: (N, E).

        On NumPy ``numpy.add.at`` is exact but slow (one Python-level ufunc call per element
        internally), so we sort the ids once and sum runs of equal ids with ``add.reduceat``;
        the order of summation within a run is fixed by the stable sort, so the result is
        deterministic. CuPy's ``scatter_add`` uses atomics (fast; order-dependent rounding only); its
        add accepts float32 and float64 tables (the note in its docstring, "float32" only, predates
        float64 support). Newer CuPy sources deprecate ``ndarray.scatter_add`` (which it calls) in favour
        of ``cupy.add.at``, the same kernel; CuPy 14.2 does not warn yet.
        """
        ids = ids.reshape(-1)
        if ids.shape[0] == 0:        # nothing to add (and (0, -1) is no shape to reshape to)
            return
        values = values.reshape(ids.shape[0], -1)
        if self.name == "cupy":
            import cupyx  # only backends/ imports cupy

            cupyx.scatter_add(table, ids, values)
            return
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        run_starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        table[sorted_ids[run_starts]] += np.add.reduceat(values[order], run_starts, axis=0)

    # --- host <-> device ----------------------------------------------------------------------
    def to_host(self, a) -> np.ndarray:
        """Copy an array of this backend to a NumPy array (a no-op view on NumPy)."""
        if self.name == "cupy":
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def from_host(self, a, dtype=None):
        """Copy a NumPy array (or anything array-like) onto this backend, optionally casting."""
        a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        return self.xp.asarray(a)

    def is_array(self, a) -> bool:
        """True when ``a`` is an array of this backend (not a NumPy array on a CuPy backend)."""
        return isinstance(a, self.xp.ndarray)

    def synchronize(self) -> None:
        """Block until all queued device work is done (no-op on NumPy)."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    # --- memory accounting (benchmarks) ------------------------------------------------------------
    def reset_peak_memory(self) -> None:
        """Start a peak-device-memory measurement: on CuPy, return the memory pool's unused blocks to
        the driver, so that the pool's size afterwards is what was held at once since (no-op on NumPy,
        whose memory the benchmark reads from the process's peak resident set instead)."""
        if self.name == "cupy":
            self.synchronize()
            self.xp.get_default_memory_pool().free_all_blocks()

    def peak_memory(self) -> dict:
        """Device memory since :meth:`reset_peak_memory`, in MiB: ``{"device_pool_mib": bytes held by
        CuPy's pool, "device_in_use_mib": bytes in use now}``; ``{}`` on NumPy."""
        if self.name != "cupy":
            return {}
        self.synchronize()
        pool = self.xp.get_default_memory_pool()
        return {"device_pool_mib": pool.total_bytes() / 2 ** 20, "device_in_use_mib": pool.used_bytes() / 2 ** 20}

    def device_name(self) -> str:
        """"cpu" on NumPy; the GPU's name on CuPy."""
        if self.name != "cupy":
            return "cpu"
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    # --- randomness: always host NumPy, then transferred ---------------------------------------
    @staticmethod
    def rng(seed) -> np.random.Generator:
        """The one random-number policy: a host ``numpy.random.Generator`` (PCG64) from ``seed``."""
        return np.random.default_rng(seed)

    def normal(self, rng: np.random.Generator, shape, std: float, dtype, truncated: bool = False):
        """N(0, std^2) draws on the host, moved to this backend in ``dtype``.

        ``truncated=True`` redraws values beyond two standard deviations (TensorFlow's
        ``truncated_normal_initializer``, which ALBERT's TF code uses).
        """
        values = rng.standard_normal(shape)
        if truncated:
            bad = np.abs(values) > 2.0
            while bad.any():
                values[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(values) > 2.0
        return self.from_host(values * std, dtype=dtype)

    def keep_mask(self, rng: np.random.Generator, shape, keep_prob: float, dtype):
        """Inverted-dropout multiplier: 1/keep_prob where kept (probability keep_prob), else 0.

        The uniform draws are float64 whatever ``dtype`` is, so a seed gives the same mask in float32
        and float64 models; the mask itself is built in ``dtype`` directly, its kept value
        ``dtype(1 / keep_prob)``, exactly what casting a float64 ``keep / keep_prob`` would give."""
        keep = rng.random(shape) < keep_prob
        mask = keep.astype(dtype)
        mask *= np.asarray(1.0 / keep_prob, dtype=dtype)
        return self.from_host(mask)


_cache: dict[str, Backend] = {}
PIECE_ELEMENTS = 1 << 17         # Backend.pieces on NumPy
_PARALLEL_MIN_SIZE = 1 << 16      # elements: below this, a thread pool's hand-off costs more than it saves
_POOL_PREFIX = "ref-bert-numpy"
_pool_thread = threading.local()     # .active is True in the pool's own threads


def _mark_pool_thread() -> None:
    _pool_thread.active = True


def _forget_thread_pools() -> None:
    """In a forked child the parent's pool threads do not exist: make a fresh pool on next use."""
    for backend in _cache.values():
        backend._thread_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_thread_pools)


_blas_controller = None   # threadpoolctl's view of the loaded BLAS libraries, made on first use


def _one_thread_blas():
    """A context in which the BLAS library NumPy loaded uses one thread (threadpoolctl calls its own
    setter, process-wide; the previous count is restored on leaving). The controller, which scans the
    loaded libraries once, is kept: that scan costs milliseconds, the limit itself microseconds."""
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


def _thread_count() -> int:
    """Threads for the NumPy backend's own parallel loops: what BLAS is told to use."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

MALLOC_ENV_VAR = "REF_BERT_MALLOC_TUNING"
FUSED_ENV_VAR = "REF_BERT_FUSED"
FAST_ENV_VAR = "REF_BERT_FAST"


def fast_enabled() -> bool:
    """False when $REF_BERT_FAST or $REF_BERT_FUSED is "0": then no backend gets fast variants and every
    op runs its reference code. Read when a backend is made (the first :func:`get` of its name)."""
    return all(os.environ.get(var, "1").strip() != "0" for var in (FAST_ENV_VAR, FUSED_ENV_VAR))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8   # glibc <malloc.h>


def _tune_malloc() -> bool:
    """Keep freed memory in the process for reuse (see the module docstring). True when applied.

    ``M_MMAP_THRESHOLD`` 32 MiB (glibc's maximum): blocks up to that size come from the heap instead
    of a fresh ``mmap`` each; ``M_TRIM_THRESHOLD`` 2 GiB: free memory at the top of the heap is not
    returned to the kernel until it exceeds that. The peak resident size is what the program needs at
    once either way; what changes is that the next step reuses those pages instead of faulting them in.
    With the thread pool, one arena as well (:func:`_one_malloc_arena`).
    """
    if os.environ.get(MALLOC_ENV_VAR, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _one_malloc_arena() -> None:
    """glibc's ``M_ARENA_MAX`` 1, set when the NumPy backend first starts its thread pool (and only where
    the malloc tuning is on): from then on every new thread allocates from the one heap. Each thread
    otherwise gets an arena of its own, and with trimming off each arena keeps its own high-water mark:
    two shards of a step on two threads (``map_shards``) held 2227 MiB for albert-base where one heap
    needs 1379 (measured). Not set earlier, so that a process that never starts the pool (one thread)
    leaves other libraries' threads (PyTorch's, in the tests) their own arenas."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)


def _make(name: str) -> Backend:
    if name == "numpy":
        try:
            from scipy.special import erf
        except ImportError as e:  # pragma: no cover - scipy is a hard dependency
            raise BackendUnavailable("the numpy backend needs scipy (for erf): pip install scipy") from e
        backend = Backend("numpy", np, erf)
        backend.malloc_tuned = _tune_malloc()
        if fast_enabled():
            from .numpy_fast import fast_table

            backend.fast = fast_table(backend)
        return backend
    try:
        import cupy
        import cupyx.scipy.special
    except ImportError as e:
        raise BackendUnavailable(
            "backend 'cupy' was requested but CuPy is not installed "
            "(pip install 'ref-bert[gpu]' for CUDA 12, 'ref-bert[gpu-cuda13]' for CUDA 13); "
            "no fallback to numpy is made"
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise BackendUnavailable(f"backend 'cupy' was requested but no GPU is usable: {e}") from e
    if count < 1:
        raise BackendUnavailable("backend 'cupy' was requested but no GPU is visible (device count 0)")
    backend = Backend("cupy", cupy, cupyx.scipy.special.erf)
    if fast_enabled():
        from .cupy_fast import fast_table
        from .cupy_kernels import CupyKernels
        from .cupy_optim_fast import optimizer_fast_table

        kernels = CupyKernels(cupy)       # compiled by CuPy on first use
        backend.fast = {**fast_table(kernels, backend), **optimizer_fast_table(kernels)}
    return backend


def get(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name`` ("numpy" or "cupy"); None reads $REF_BERT_BACKEND."""
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get(ENV_VAR, "numpy")
    key = str(name).strip().lower()
    if key not in _NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(_NAMES)}")
    if key not in _cache:
        _cache[key] = _make(key)
    return _cache[key]


def of(array) -> Backend:
    """The backend an array belongs to (CuPy arrays -> cupy, anything else -> numpy)."""
    if type(array).__module__.split(".")[0] == "cupy":
        return get("cupy")
    return get("numpy")


def fast_path(reference: Callable) -> Callable:
    """Mark ``reference`` (a readable op whose first argument is an array) as one a backend may replace.

    The returned function looks up the backend of its first argument and calls that backend's fast
    variant registered under ``"module.name"`` of ``reference`` (``Backend.fast``), or ``reference``
    itself when the backend has none. The choice is the backend's alone: the op's module holds only
    the reference code. ``op.reference`` is the reference (tests compare the two), ``op.fast_key``
    the key.
    """
    key = f"{reference.__module__}.{reference.__name__}"

    @functools.wraps(reference)
    def op(first, *args, **kwargs):
        return of(first).fast.get(key, reference)(first, *args, **kwargs)

    op.reference = reference
    op.fast_key = key
    return op


@contextlib.contextmanager
def reference_ops():
    """Inside the block every backend made so far (and the NumPy one) has an empty fast table, so every op
    runs its reference code; the tables are restored on leaving. For tests and gradient checks: the
    references are what the docstrings derive, the fast variants are checked against them."""
    made = [get("numpy"), *(b for name, b in _cache.items() if name != "numpy")]
    saved = [b.fast for b in made]
    for b in made:
        b.fast = {}
    try:
        yield
    finally:
        for b, table in zip(made, saved):
            b.fast = table


def available(name: str) -> bool:
    """True when :func:`get` would succeed for ``name``."""
    try:
        get(name)
        return True
    except BackendUnavailable:
        return False
