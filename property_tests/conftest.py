"""Hypothesis profiles: ``ci`` (default, minutes) and ``nightly`` (long). Select with
CERTKV_HYPOTHESIS_PROFILE=nightly; CERTKV_HYPOTHESIS_EXAMPLES overrides the example count."""

import os

from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=False
)
settings.register_profile("ci", max_examples=int(os.environ.get("CERTKV_HYPOTHESIS_EXAMPLES", 40)), **_common)
settings.register_profile("nightly", max_examples=int(os.environ.get("CERTKV_HYPOTHESIS_EXAMPLES", 5000)), **_common)
settings.load_profile(os.environ.get("CERTKV_HYPOTHESIS_PROFILE", "ci"))
