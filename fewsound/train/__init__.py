"""Training FewSound and HyperSound: config, one optimizer step, the epoch loop, validation, training state.

Pure torch, no Ray and no MLflow: the same functions run in one process (tests, benchmarks, a laptop) and inside
every Ray Train worker (tune/hyper/ wraps the model in DDP and feeds the batches from Ray Data).

    cfg = TrainConfig(model=HyperConfig(target="kan", preset="tiny"), epochs=20, samples_per_epoch=64)
    model = build_model(cfg.model); optimizer, scheduler = make_optimizer(model, cfg)
    stream = random_batches(train_segments, cfg.batch_size, cfg.model.clip_length, seed=cfg.seed)
    for epoch in range(cfg.epochs):
        stats = run_epoch(model, stream, optimizer, scheduler, cfg, epoch)
    rows = validate(model, val_clips, val_kinds, cfg)

Decisions (where the paper's text and its code differ, the choice is said):
- The loss is the paper's (fewsound.losses): lambda_t * L1 + lambda_f * multi-resolution mel-STFT, averaged over
  the clips of the (global) batch.
- AdamW (torch's default weight decay 0.01) and OneCycleLR as in the paper's code: `lr` is the code's
  `learning_rate`, the schedule's START rate; the peak is `lr * div_factor` (div_factor 25, pct_start 0.05,
  final rate peak / final_div_factor), planned over epochs * steps_per_epoch steps. Default lr: the paper's text,
  1e-5 (SIREN 1e-6); the code's runs used 5e-5.
- `schedule_step="batch"` (our default) steps the schedule after every optimizer step, i.e. the schedule that
  the code's `steps_per_epoch=625` describes actually happens: warm-up to the peak over the first 5% of all
  steps, then cosine annealing. `"epoch"` steps it once per epoch, which is what the paper's code most likely
  did (Lightning's default interval for a scheduler returned that way): after 2,500 of 1,562,500 planned steps
  the rate has moved from lr to lr * 1.06, i.e. it trained at a practically constant `lr`. Pick "epoch" to
  reproduce that; tests/test_train.py checks both behaviours.
- An epoch is `samples_per_epoch` (10,000) random training clips, not a pass over the corpus (the code's
  RandomSampler(num_samples=10,000)): `steps_per_epoch = samples_per_epoch // batch_size` (drop_last).
  Each clip is a random `clip_length` crop of a stored 65,536-sample segment, peak-normalised after the crop.
- Augmentations of the paper's code (not in its text), off by default: `phase_mangle` (the probability that a
  training crop goes through a random all-pass biquad: pole radius 0.99, pole angle log-uniform in 20-2,000 Hz;
  the code's 0.8) changes the waveform's phase but not its magnitude spectrum; `dequantize_bits` (the code's 16)
  adds uniform noise of one quantisation step, U(-0.5, 0.5) / 2^bits. Both act on the crop before the peak
  normalisation, as the code's transforms do; validation crops are never augmented.
- `batch_size` is the GLOBAL batch: with W data-parallel workers each takes batch_size / W clips, and DDP's
  gradient averaging makes one step equal to one single-process step on the whole batch (tested).
- The delta warm-up lives in the model (HyperConfig.delta_warmup_epochs); the loop calls
  `model.set_epoch(epoch + 1)`: 1-based, as the paper's code counted, so warm-up 50 gives factor 0.02 in the
  first epoch.
- Validation: the deterministic crop (start 0) of a fixed subset of the validation clips (up to `val_clips`,
  512 as in the code, chosen with seed 0); every metric of fewsound.metrics (`val_metrics`, default all) for
  FewSound's reconstructions AND for its universal weights alone (delta = 0): the gap is what the
  hypernetwork contributes.

The package, by concern:
    config.py      TrainConfig (the paper's hyper-parameters), TrainingDiverged
    step.py        make_optimizer, train_step, run_epoch: one optimizer step and the epoch loop
    augment.py     the paper's code's augmentations of a training crop (Augment: phase mangling, dequantisation)
    batches.py     random crops, peak-normalised, and the validation crop
    validation.py  the validation subset, reconstructions, metrics and their summary; evaluate_model
    state.py       training state on disk (weights-only, plain data), its digest, the model from a checkpoint
    loop.py        train(): the local loop (Ray Train's workers run the same steps: tune.hyper.worker)
"""

from fewsound.train.augment import Augment, allpass_coefficients, dequantize, phase_mangle
from fewsound.train.batches import SILENCE_PEAK, crop_batch, peak_normalize_batch, random_batches, validation_crop
from fewsound.train.config import DEFAULT_LR, SCHEDULE_STEPS, TrainConfig, TrainingDiverged, train_config_from_dict
from fewsound.train.loop import torch_threads, train
from fewsound.train.state import (
    META_FILE,
    STATE_FILE,
    STATE_FORMAT,
    load_state_file,
    load_training_state,
    model_from_training_state,
    save_training_state,
    state_digest,
)
from fewsound.train.step import EpochStats, make_optimizer, run_epoch, train_step, unwrap
from fewsound.train.validation import (
    choose_validation,
    evaluate_model,
    reconstruct,
    summarize_validation,
    universal_reconstruction,
    validate,
)

__all__ = [
    "Augment",
    "DEFAULT_LR",
    "EpochStats",
    "META_FILE",
    "SCHEDULE_STEPS",
    "SILENCE_PEAK",
    "STATE_FILE",
    "STATE_FORMAT",
    "TrainConfig",
    "TrainingDiverged",
    "allpass_coefficients",
    "choose_validation",
    "crop_batch",
    "dequantize",
    "evaluate_model",
    "load_state_file",
    "load_training_state",
    "make_optimizer",
    "model_from_training_state",
    "peak_normalize_batch",
    "phase_mangle",
    "random_batches",
    "reconstruct",
    "run_epoch",
    "save_training_state",
    "state_digest",
    "summarize_validation",
    "torch_threads",
    "train",
    "train_config_from_dict",
    "train_step",
    "universal_reconstruction",
    "unwrap",
    "validate",
    "validation_crop",
]
