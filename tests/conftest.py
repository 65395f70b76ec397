"""Hypothesis profiles: "ci" (default; derandomized, bounded examples) and "dev" (longer, random).

Select with HYPOTHESIS_PROFILE=dev. Per-test ``max_examples`` set with @settings are scaled by the
profile through ``examples(n)``.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """Examples for a test: ``n`` under the CI profile, 10x under the dev profile."""
    return n * 10 if PROFILE == "dev" else n
