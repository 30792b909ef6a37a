"""Suite-wide settings.

Hypothesis fails an example that runs longer than its deadline (200 ms by
default); on a busy 2-core machine speed drifts by tens of percent, so no
example carries a deadline: property tests check results, never speed.
"""

from hypothesis import settings

settings.register_profile("convshard", deadline=None)
settings.load_profile("convshard")
