"""Packing fits and bundling packs into Tune trials (fewsound.plan): pure planning, no Ray."""

from __future__ import annotations

from fewsound.fit import FitConfig
from fewsound.plan import FitTask, bundle, pack, pack_cost


def tasks(n_configs: int, clips: int, steps=lambda i: 10) -> list[FitTask]:
    return [
        FitTask(FitConfig(family="nerf", steps=steps(i), seed=i), f"c{j}", "speech", 4096)
        for i in range(n_configs)
        for j in range(clips)
    ]


def test_packs_share_one_config_and_length_and_respect_the_size():
    packs = pack(tasks(3, 5), pack_size=2)
    assert [len(p) for p in packs] == [2, 2, 1] * 3
    assert all(len({(t.cfg.key_hash(16), t.length) for t in p}) == 1 for p in packs)


def test_bundles_cover_every_pack_once_in_order_and_balance_the_cost():
    packs = pack(tasks(53, 19), pack_size=19)
    bins = bundle(packs, 8)
    assert len(bins) == 8 and sorted(i for b in bins for i in b) == list(range(len(packs)))
    assert all(b == sorted(b) for b in bins)
    cost = [sum(pack_cost(packs[i]) for i in b) for b in bins]
    assert max(cost) - min(cost) <= max(pack_cost(p) for p in packs)  # within one pack of each other


def test_uneven_packs_are_balanced_longest_first():
    packs = pack(tasks(6, 1, steps=lambda i: [100, 10, 10, 10, 10, 50][i]), pack_size=1)
    bins = bundle(packs, 2)
    assert sorted(sum(pack_cost(packs[i]) for i in b) for b in bins) == sorted([100 * 4096, 90 * 4096])


def test_never_more_trials_than_packs_and_never_an_empty_one():
    packs = pack(tasks(3, 1), pack_size=1)
    assert bundle(packs, 10) == [[0], [1], [2]]
    assert bundle(packs, 1) == [[0, 1, 2]]
    assert bundle(packs, 0) == [[0, 1, 2]]
