"""What a sweep asks Ray for (a GPU fraction per trial when the cluster has or can grow GPUs, one CPU otherwise; as many
trial slots as the cluster runs at its ceiling), and the checks of its arguments before MLflow or Ray start."""

from __future__ import annotations

import dataclasses

from fewsound.errors import ConfigError
from fewsound.plan import FitTask
from tune.ray_env import (
    Capacity,
    capacity,
    check_gpu_fraction,
    fraction_text,
    trial_resources,
    trial_slots,
)


@dataclasses.dataclass
class SweepPlan:
    """What the sweep asks Ray for, and why."""

    capacity: Capacity
    resources: dict[str, float]  # per trial
    slots: int  # trials at once at the cluster's capacity (capped by max_concurrent)
    max_concurrent: int | None

    def describe(self) -> str:
        cap = f"; capped by --max-concurrent {self.max_concurrent}" if self.max_concurrent else ""
        return (
            f"planning for {self.capacity.describe()}: {self.slots} trial slots of {fraction_text(self.resources)}{cap}"
        )


def plan_sweep(cluster: dict, gpu_fraction: float, max_concurrent: int | None = None) -> SweepPlan:
    cap = capacity(cluster)
    resources = trial_resources(cap, gpu_fraction)
    return SweepPlan(cap, resources, trial_slots(cap, resources, max_concurrent), max_concurrent)


def check_arguments(
    name: str,
    tasks: list[FitTask],
    gpu_fraction: float,
    pack_size: int,
    max_retries: int,
    trial_failures: int,
    trials_per_slot: int | None,
    max_concurrent: int | None,
) -> None:
    """Bad arguments fail here, before MLflow or Ray start."""
    if not tasks:
        raise ConfigError(name, "the sweep has no fits (check --families/--clips/--lengths)")
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ConfigError(name, "the sweep lists the same fit (family, clip, config, length) twice")
    check_gpu_fraction(gpu_fraction)
    if pack_size < 1 or max_retries < 0 or trial_failures < 0:
        raise ConfigError(
            "pack_size/max_retries/trial_failures",
            f"need >= 1, >= 0, >= 0; got {pack_size}, {max_retries}, {trial_failures}",
        )
    if trials_per_slot is not None and trials_per_slot < 1:
        raise ConfigError("trials_per_slot", f"need >= 1 (or None: one trial per pack); got {trials_per_slot}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError("--max-concurrent", f"need >= 1; got {max_concurrent}")
