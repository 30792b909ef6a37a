"""Stage 5 of the pipeline: running a plan.

``config`` (the run's flags and its plan), ``trials`` (from flags to a plan:
built, searched, tried), ``engines`` (the sharded engine and PyTorch DDP),
``train`` (the loop every rank runs), ``metrics``, ``checkpoint``;
``launch`` (one process per device, locally or under torchrun), ``alone``
(one rank training while the others stand by) and ``local`` (a job on this
host).
"""
