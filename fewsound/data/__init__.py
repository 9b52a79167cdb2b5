"""Audio data: loading and validation, resampling and cropping, dataset importers, protocols, Parquet shards.

load_audio(path)                                   float32 mono [N] at 22,050 Hz (AudioError when faulty)
scan(folder, layout="auto")                        (layout, [SourceRecord]) of a dataset folder
prepare_corpus(source, out=..., protocol=...)      source -> Parquet shards + manifest.json (serial)
open_corpus(location)                              a prepared corpus (folder, s3://, gs://, builtin:<protocol>):
                                                   .manifest, .infos(), .clips(), .clip(id), .shard_paths()
CropDataset(corpus, "train")                       load-time crops a model sees
"""

from fewsound.data.audio import DEFAULT_SR, load_audio, save_audio
from fewsound.data.corpus import open_corpus
from fewsound.data.dataset import CropDataset
from fewsound.data.importers import IMPORTERS, LAYOUTS, SourceRecord, scan
from fewsound.data.prepare import plan_corpus, prepare_corpus
from fewsound.data.protocols import PROTOCOLS, get_protocol, load_crop
from fewsound.data.shards import Clip, Corpus, process_shard

__all__ = [
    "DEFAULT_SR", "IMPORTERS", "LAYOUTS", "PROTOCOLS", "Clip", "Corpus", "CropDataset", "SourceRecord", "get_protocol",
    "load_audio", "load_crop", "open_corpus", "plan_corpus", "prepare_corpus", "process_shard", "save_audio", "scan",
]  # fmt: skip
