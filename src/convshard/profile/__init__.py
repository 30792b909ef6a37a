"""Stage 2 of the pipeline: the profile, what the devices and links measure for one job.

``timings.measure`` times every channel group (``segments``) on every device,
in kernel and in batch mode, the replicated rest, the optimizer and each
collective; ``schema`` is the profile's typed schema and its check;
``cache`` keeps a measured profile for the same devices, threads, hosts and
model.
"""

from .cache import describe, format_profile, load, read, save
from .schema import VERSION, Profile, check
from .timings import job_key, measure, model_signature, profile_key

__all__ = ["VERSION", "Profile", "check", "describe", "format_profile", "job_key", "load", "measure",
           "model_signature", "profile_key", "read", "save"]
