"""The ``convshard`` command: ``train``, ``profile``, ``plan``, ``evaluate``, ``predict``, ``report``, ``bench``, ``download``.

A pipeline, as torchrun's own: ``build_parser()`` -> ``config_from_args()``
-> ``validate()`` -> ``run()``, entered through ``main(argv=None)``.
Bad input exits with code 2 and one line naming the bad value; a failed
worker exits with code 1 and a message naming its rank and device.

One module per command (``train``; ``plan``: profile and plan; ``bench``;
``report``; ``inference``: evaluate and predict; ``download``), each adding
its sub-parser with a ``handler``; ``options`` holds what several share,
``job`` the pipeline, ``main`` the parser and the dispatch.
"""

from .job import config_from_args, run, validate
from .main import build_parser, entry, main

__all__ = ["build_parser", "config_from_args", "entry", "main", "run", "validate"]
