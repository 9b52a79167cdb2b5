"""Whether jobs ask Ray for GPUs: decided from the cluster, never hard-coded.

FEWSOUND_USE_GPU (environment):
  auto (default)  GPUs when the cluster has some now (a laptop or CI without GPUs asks for CPUs only: a GPU
                  request there would pend forever);
  1               always: a cluster whose GPU nodes scale from zero shows no GPU until a job asks for one, so
                  cluster.yaml sets this on its nodes and the autoscaler starts GPU workers for the request;
  0               never (CPU-only runs on a GPU cluster).
"""

from __future__ import annotations

import os

from fewsound.errors import ConfigError


def use_gpus(cluster: dict) -> bool:
    mode = os.environ.get("FEWSOUND_USE_GPU", "auto").strip().lower()
    if mode in ("1", "true", "yes"):
        return True
    if mode in ("0", "false", "no"):
        return False
    if mode != "auto":
        raise ConfigError("FEWSOUND_USE_GPU", f"{mode!r} is not one of auto, 1, 0")
    return cluster.get("GPU", 0) > 0
