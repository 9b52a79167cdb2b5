"""What a sweep fits (pure planning, no Ray): the list of fits (family x clip x length x config), their stable
keys, and their packing.

A fit's key is `{family}-{clip_id}-{cfg_hash8}` where the hash covers everything that determines the result
(the fit config without runtime fields, and the clip length). Re-running a sweep skips every key that already
has a FINISHED run in MLflow, so resume is idempotent whatever happened to Ray's own state.

Fits with the same config and length are packed: one Ray Tune trial fits up to `pack_size` clips at once with
the packed fitting engine (fewsound.fit), because Ray's per-trial overhead is seconds while a small fit's step
is milliseconds. A Tune trial then runs one or more packs in turn (`bundle`): Tune's own cost per trial (a fixed
scheduling cost, with actor reuse) is paid per trial, not per pack, while every pack still reports and logs
as soon as it is done.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Any

from fewsound.config import cfg_hash, flatten, to_dict
from fewsound.fit import FitConfig


@dataclasses.dataclass(frozen=True)
class FitTask:
    """One fit: one INR configuration on one clip at one length."""

    cfg: FitConfig
    clip_id: str
    kind: str  # speech | noisy_speech | music | environment (which metrics apply)
    length: int  # samples (32,768 = the paper's "1.5 s", 65,536 = "3 s")
    label: str = ""  # row label in the tables (e.g. the family, or "grid_size=5" in an ablation)

    @property
    def family(self) -> str:
        return self.cfg.family

    # computed once per task (a sweep looks keys up many times: planning, resume, packing, the summary); a frozen
    # dataclass's cached_property lives in the instance's __dict__, outside its fields (equality, hashing)
    @functools.cached_property
    def cfg_hash(self) -> str:
        return cfg_hash({"fit": self.cfg.key_hash(16), "length": self.length})

    @functools.cached_property
    def key(self) -> str:
        return f"{self.family}-{self.clip_id}-{self.cfg_hash}"

    def params(self) -> dict[str, Any]:
        """MLflow params of this fit's child run."""
        p = {f"fit.{k}": v for k, v in flatten(self.cfg).items()}
        p.update(
            {
                "fit.lr_resolved": self.cfg.resolved_lr,
                "clip_id": self.clip_id,
                "clip.kind": self.kind,
                "clip.length": self.length,
                "label": self.label,
                "family": self.family,
            }
        )
        return p


def pack(tasks: list[FitTask], pack_size: int) -> list[list[FitTask]]:
    """Group tasks that share (config, length) into packs of at most `pack_size`, in a stable order."""
    assert pack_size >= 1
    groups: dict[tuple[str, int], list[FitTask]] = defaultdict(list)
    for t in tasks:
        groups[(t.cfg_hash, t.length)].append(t)
    packs = []
    for group in groups.values():
        for i in range(0, len(group), pack_size):
            packs.append(group[i : i + pack_size])
    return packs


def pack_to_config(tasks: list[FitTask]) -> dict[str, Any]:
    """A pack as plain data (what travels to a Ray Tune trial in its param_space)."""
    first = tasks[0]
    return {
        "cfg": to_dict(first.cfg),
        "length": first.length,
        "clips": [t.clip_id for t in tasks],
        "kinds": [t.kind for t in tasks],
        "labels": [t.label for t in tasks],
    }


def pack_from_config(d: dict[str, Any]) -> list[FitTask]:
    from fewsound.config import from_dict

    cfg = from_dict(FitConfig, d["cfg"])
    return [FitTask(cfg, c, k, int(d["length"]), lab) for c, k, lab in zip(d["clips"], d["kinds"], d["labels"])]


def pack_cost(tasks: list[FitTask]) -> float:
    """A pack's relative cost for load balancing: fits x steps x samples (the same model costs alike per sample)."""
    return float(len(tasks) * tasks[0].cfg.steps * tasks[0].length)


def bundle(packs: list[list[FitTask]], n_trials: int) -> list[list[int]]:
    """Split pack indices into at most `n_trials` trials of near-equal cost (longest pack first onto the least
    loaded trial), each trial's packs in their original order; no empty trial."""
    n = max(1, min(n_trials, len(packs)))
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    for i in sorted(range(len(packs)), key=lambda i: -pack_cost(packs[i])):
        j = min(range(n), key=lambda j: (load[j], len(bins[j])))
        bins[j].append(i)
        load[j] += pack_cost(packs[i])
    return [sorted(b) for b in bins if b]
