"""Audio data: loading and validation, resampling and cropping, dataset importers, Parquet shards, built-in corpus."""

from fewsound.data.audio import DEFAULT_SR, load_audio, save_audio

__all__ = ["DEFAULT_SR", "load_audio", "save_audio"]
