"""Stage 4 of the pipeline: the parallel layers that run a plan.

``wire`` (the one door every collective goes through: strict devices, the
wire's record, completion timing), ``comm`` (collectives and their autograd
Functions) and ``shm`` (their bytes through shared memory on one host) carry
the data; ``sharded`` holds the kernel-split layers, ``batch`` the row-split
ones; ``layouts`` decides every activation's layout; ``shard`` builds a
sharded model from a plan's styles and returns its handle; ``reshard``
moves kernel slices to a new split.
"""
