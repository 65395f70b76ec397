"""Hypothesis profiles: "ci" (default; derandomized, bounded examples) and "dev" (longer, random).

Select with HYPOTHESIS_PROFILE=dev, or HYPOTHESIS_PROFILE=mutation for the mutation run (docs/testing.md:
a quarter of the examples, so that a surviving mutant does not cost minutes). Per-test ``max_examples`` set with @settings are scaled by the
profile through ``examples(n)``.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("mutation", parent=settings.get_profile("ci"))
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """Examples for a test: ``n`` under the CI profile, 10x under the dev profile, n/4 (at least 1) under
    the mutation profile."""
    if PROFILE == "mutation":
        return max(1, n // 4)
    return n * 10 if PROFILE == "dev" else n


def pytest_configure(config):
    """One BLAS thread for the whole session (``REF_BERT_TEST_BLAS_THREADS`` to change it).

    The test models are tiny (matrices of 64 x 128 and the like), and OpenBLAS's threads on such
    products cost more than they save: on 2 cores the seq2seq learning test took 83 s with OpenBLAS's
    default of one thread per core and 11 s with one (``ref-bert pretrain`` sets one thread for the
    same reason). Results do not depend on it: every comparison within a test runs under the same
    setting, and the tests that check thread-count independence set the backend's own threads.
    """
    import numpy  # noqa: F401  (threadpoolctl limits only the libraries loaded so far: load NumPy's BLAS first)
    from threadpoolctl import threadpool_limits

    threads = int(os.environ.get("REF_BERT_TEST_BLAS_THREADS", "1"))
    if threads > 0:
        config._blas_limit = threadpool_limits(limits=threads, user_api="blas")
