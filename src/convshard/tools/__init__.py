"""Stage 6, apart from the library: ``report`` (where a run's time went),
``bench`` (the benchmark sweeps) and ``netns`` (hosts as network namespaces
with shaped links, for the bench and the tests).
"""
