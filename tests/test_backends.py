"""The backend shim: selection, the operations NumPy and CuPy disagree on, and the RNG policy."""
import os
import pathlib
import re

import numpy as np
import pytest

import backends


def test_numpy_backend_by_name_and_default(monkeypatch):
    bk = backends.get("numpy")
    assert bk.name == "numpy" and bk.xp is np
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.get() is bk
    monkeypatch.setenv(backends.ENV_VAR, "NumPy")
    assert backends.get() is bk


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'jax'.*numpy, cupy"):
        backends.get("jax")
    monkeypatch.setenv(backends.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="'tpu'"):
        backends.get()


@pytest.mark.skipif(backends.available("cupy"), reason="checks the error raised where CuPy cannot run")
def test_cupy_unavailable_says_why_and_never_falls_back():
    with pytest.raises(backends.BackendUnavailable, match="cupy.*(not installed|no GPU)"):
        backends.get("cupy")


def test_scatter_add_matches_add_at_with_repeated_ids():
    rng = np.random.default_rng(0)
    bk = backends.get("numpy")
    ids = rng.integers(0, 7, size=50)
    values = rng.standard_normal((50, 3))
    table = rng.standard_normal((7, 3))
    expected = table.copy()
    np.add.at(expected, ids, values)
    bk.scatter_add(table, ids, values)
    # Summation order differs from add.at (runs of equal ids after a stable sort): float64 rounding only.
    np.testing.assert_allclose(table, expected, rtol=1e-13, atol=1e-13)


def test_erf_keeps_float32_and_is_accurate():
    bk = backends.get("numpy")
    x = np.linspace(-3, 3, 13)
    assert bk.erf(x.astype(np.float32)).dtype == np.float32
    import math
    np.testing.assert_allclose(bk.erf(x), [math.erf(v) for v in x], rtol=1e-15, atol=1e-16)


def test_randomness_is_host_numpy_and_reproducible():
    bk = backends.get("numpy")
    a = bk.normal(bk.rng(3), (4, 5), 0.02, np.float32)
    b = bk.normal(bk.rng(3), (4, 5), 0.02, np.float32)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    expected = np.random.default_rng(3).standard_normal((4, 5)) * 0.02
    np.testing.assert_array_equal(a, expected.astype(np.float32))
    t = bk.normal(bk.rng(0), (20000,), 1.0, np.float64, truncated=True)
    assert np.abs(t).max() <= 2.0 and 0.85 < t.std() < 0.9  # truncated-at-2 normal: std 0.8796


def test_keep_mask_is_inverted_dropout():
    bk = backends.get("numpy")
    m = bk.keep_mask(bk.rng(0), (200000,), 0.9, np.float32)
    assert m.dtype == np.float32 and set(np.unique(m)) == {np.float32(0), np.float32(1 / 0.9)}
    # Bernoulli(0.9) over 2e5 draws: sd of the kept fraction ~ 6.7e-4; 5 sd tolerance.
    assert abs((m > 0).mean() - 0.9) < 5 * np.sqrt(0.9 * 0.1 / 2e5)


def test_of_recognises_numpy_arrays():
    assert backends.of(np.zeros(2)).name == "numpy"


SOURCE_FOLDERS = ("ref_bert", "gradcheck", "benchmarks", "tests")    # the project's code outside backends/


def project_sources(root: pathlib.Path) -> list:
    """The project's own Python files outside backends/: its source folders only, never build output
    (``pip install .`` leaves a copy of every package under build/lib) or a virtual environment."""
    return sorted(p for folder in SOURCE_FOLDERS for p in (root / folder).rglob("*.py"))


def test_no_module_outside_backends_imports_cupy():
    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(import cupy|from cupy|import cupyx|from cupyx)", re.M)
    sources = project_sources(root)
    assert any(p.name == "model.py" for p in sources) and len(sources) > 50
    offenders = [str(p.relative_to(root)) for p in sources if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_cupy_scan_reads_no_build_output(tmp_path):
    """What command 1 of the README leaves behind (build/lib/backends/...) is not the project's source."""
    (tmp_path / "build" / "lib" / "backends").mkdir(parents=True)
    (tmp_path / "build" / "lib" / "backends" / "__init__.py").write_text("import cupy\n")
    (tmp_path / "ref_bert").mkdir()
    (tmp_path / "ref_bert" / "model.py").write_text("import numpy\n")
    assert [p.relative_to(tmp_path).as_posix() for p in project_sources(tmp_path)] == ["ref_bert/model.py"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_erf_equals_scipy_erf(dtype, monkeypatch):
    """Large arrays are split across threads; the values are SciPy's own, bit for bit, in place too."""
    import scipy.special

    bk = backends.get("numpy")
    monkeypatch.setattr(bk, "threads", 3)
    x = np.random.default_rng(0).standard_normal((300, 301)).astype(dtype)   # not a multiple of 3 chunks
    expected = scipy.special.erf(x)
    got = bk.erf(x)
    assert got.dtype == dtype and np.array_equal(got, expected)
    y = x.copy()
    assert bk.erf(y, out=y) is y and np.array_equal(y, expected)
    strided = x[:, ::2]                                                     # not contiguous: one call
    assert np.array_equal(bk.erf(strided), scipy.special.erf(strided))


@pytest.fixture
def numpy_threads():
    """The NumPy backend, its thread count (and pool) restored after the test."""
    bk = backends.get("numpy")
    before = bk.threads
    yield bk
    bk.set_threads(before)


def test_parallel_map_keeps_order_and_uses_threads(numpy_threads):
    import threading

    bk = numpy_threads
    bk.set_threads(2)
    seen = set()

    def work(i):
        seen.add(threading.current_thread().name)
        return i * i

    assert bk.parallel_map(work, range(50)) == [i * i for i in range(50)]
    assert all(name.startswith("ref-bert-numpy") for name in seen)     # ran on the pool, not inline
    # A call made from a pool thread runs inline: with every worker waiting on inner calls queued
    # behind them, a nested submit would deadlock.
    assert bk.parallel_map(lambda i: sum(bk.parallel_map(abs, [-i, i])), range(4)) == [0, 2, 4, 6]
    bk.set_threads(1)
    seen.clear()
    assert bk.parallel_map(work, range(5)) == [0, 1, 4, 9, 16]
    assert seen == {threading.current_thread().name}                    # one thread: inline


def test_set_threads_checks_its_argument(numpy_threads):
    bk = numpy_threads
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            bk.set_threads(bad)
    bk.set_threads(3)
    assert bk.threads == 3 and bk.parallel_map(abs, [-1, 2, -3]) == [1, 2, 3]


def test_malloc_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(backends.MALLOC_ENV_VAR, "0")
    assert backends._tune_malloc() is False


def test_each_backend_fills_its_fast_table_from_backends(monkeypatch):
    """The NumPy backend's table is backends/numpy_fast.py's (unless the environment turns fast variants
    off); every key names a reference op (tests/test_fast_variants.py checks the entries themselves)."""
    from backends import numpy_fast

    monkeypatch.delenv(backends.FAST_ENV_VAR, raising=False)
    monkeypatch.delenv(backends.FUSED_ENV_VAR, raising=False)
    table = backends._make("numpy").fast
    assert table and {k: f.__func__ for k, f in table.items()} == {k: f.__func__ for k, f in numpy_fast.fast_table(backends.get("numpy")).items()}
    assert all(key.startswith("ref_bert.ops.") and callable(fn) for key, fn in table.items())
    assert all(fn.__module__ == "backends.numpy_fast" for fn in table.values())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_threaded_erf_works_in_a_forked_child(monkeypatch):
    """The thread pool made before a fork is not inherited half-dead: the child makes its own."""
    import multiprocessing

    bk = backends.get("numpy")
    monkeypatch.setattr(bk, "threads", 2)
    x = np.linspace(-3, 3, 1 << 17)
    bk.erf(x)                                              # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply(_erf_sum, (x,))
    assert result is not None, "the forked child inherited the parent's thread pool"
    assert result == pytest.approx(float(bk.erf(x).sum()))


def _erf_sum(x):
    bk = backends.get("numpy")
    if bk._thread_pool is not None:   # the parent's pool, whose threads do not exist here: erf would hang
        return None
    bk.threads = 2
    return float(bk.erf(x).sum())
