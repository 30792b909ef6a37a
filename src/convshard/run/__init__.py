"""Stage 5 of the pipeline: running a plan.

``config`` (the request, and the job that runs: plan and settings),
``trials`` (from flags to a plan: built, searched, tried), ``engines`` (the
sharded engine, PyTorch DDP, a process standing by), ``join`` (joining a
job), ``optim`` (the optimizer and its schedule), ``train`` (the loop every
rank runs), ``rebalance`` (a re-split plan while training), ``metrics``,
``checkpoint``; ``launch`` (one process per device, locally or under
torchrun), ``alone`` (the store protocol of one rank training while the
others stand by), ``local`` (a job on this host), ``inference`` and
``export`` (after training).
"""
