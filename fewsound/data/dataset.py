"""The clips a model trains or validates on: load-time crops of a prepared corpus's stored clips.

    ds = CropDataset(open_corpus("data/builtin"), "train")     # 32,768-sample random crops of 65,536 segments
    ds.set_epoch(3); x = ds[0]                                  # float32 [32768], peak-normalised

A map-style dataset (`__len__`, `__getitem__`): torch's DataLoader takes it as is. Crops follow
`protocols.crop_start` (random per (seed, epoch, index) for "train", start 0 otherwise), so every worker and
every re-run sees the same crop. Peak normalisation comes last, as in the paper.
"""

from __future__ import annotations

import numpy as np

from fewsound.data.audio import peak_normalize
from fewsound.data.protocols import load_crop
from fewsound.data.shards import Corpus


class CropDataset:
    def __init__(self, corpus: Corpus, split: str, *, length: int | None = None, seed: int = 0,
                 normalize: bool = True):  # fmt: skip
        self.audio, self.meta = corpus.arrays(split)  # [n, stored_length] float32, held in memory
        self.split, self.seed, self.normalize = split, seed, normalize
        self.length = length or corpus.clip_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.audio)

    def __getitem__(self, i: int) -> np.ndarray:
        x = load_crop(self.audio[i], self.length, split=self.split, seed=self.seed, index=i, epoch=self.epoch)
        return peak_normalize(x, where=self.meta[i]["clip_id"]) if self.normalize else x.copy()
