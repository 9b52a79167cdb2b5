"""Where training's validation and resumed optimizer state live: validation's reconstructions and loss on the
model's device, PESQ/STOI in a process pool with the sequential values, and a resumed AdamW whose state has the
exact layout of a fresh one (so a GPU run resumes without host syncs; tests/test_gpu.py checks that on CUDA).

Real audio (the built-in corpus's speech), the real tiny FewSound models, the paper's loss; no mocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fewsound.hyper import HyperConfig, build_model
from fewsound.losses import fit_loss
from fewsound.train import (
    TrainConfig,
    load_training_state,
    make_optimizer,
    random_batches,
    save_training_state,
    state_digest,
    train_step,
    validate,
)
from fewsound.train.validation import reconstruct_on_device

CLIP = 2048  # the shortest window the loss's 2048-point STFT accepts
LONG = 16_384  # 0.74 s at 22,050 Hz: long enough for PESQ (1/4 s) and STOI (30 frames of speech)


def tiny(target: str = "kan", clip: int = CLIP, **kw) -> TrainConfig:
    model = HyperConfig(target=target, preset="tiny", clip_length=clip)
    return TrainConfig(model=model, **{"lr": 2e-4, "batch_size": 4, "samples_per_epoch": 8, "epochs": 2, **kw})


def speech(speech_clips, n: int, length: int) -> np.ndarray:
    """n real speech recordings, 0.5 s in (past the leading silence): [n, length] float32."""
    return np.stack([c.load()[11_025 : 11_025 + length] for c in speech_clips[:n]]).astype(np.float32)


def optimizer_layout(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """Per parameter (by position) and state key: the type, and for a tensor its device, dtype and shape."""
    out: dict[int, dict[str, Any]] = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        out[i] = {
            k: (type(v).__name__, v.device, v.dtype, tuple(v.shape)) if torch.is_tensor(v) else type(v).__name__
            for k, v in optimizer.state[p].items()
        }
    return out


def test_validation_reconstructs_and_scores_on_the_model_device(speech_clips):
    """The reconstructions, the loss and the universal output stay on the model's device (the host gets them in
    one transfer afterwards); the loss is the paper's loss of those reconstructions, and validate's rows carry it."""
    cfg = tiny(val_metrics=("mse",))
    clips = speech(speech_clips, 5, CLIP)
    model = build_model(cfg.model, verbose=False)
    out = reconstruct_on_device(model, clips, cfg, batch_size=2)  # 3 batches, the last one short
    where = next(model.parameters()).device
    assert out.universal is not None and out.universal_losses is not None
    for t in (out.recs, out.losses, out.universal, out.universal_losses):
        assert t.device == where and t.dtype == torch.float32
    assert out.recs.shape == (5, CLIP) and out.losses.shape == out.universal_losses.shape == (5,)
    assert torch.equal(out.losses, fit_loss(out.recs, torch.from_numpy(clips), sr=cfg.model.sample_rate))
    uni = out.universal.expand(5, CLIP).contiguous()
    assert torch.equal(out.universal_losses, fit_loss(uni, torch.from_numpy(clips), sr=cfg.model.sample_rate))
    rows = validate(model, clips, ["speech"] * 5, cfg)
    assert [r["loss"] for r in rows] == out.losses.tolist()
    assert [r["universal_loss"] for r in rows] == out.universal_losses.tolist()
    assert model.training  # validation left the model in the mode it found it in

    # The meta device holds no data: any host round trip in the path (a .cpu() or .numpy()) would raise here.
    meta = build_model(tiny("nerf").model, verbose=False).to("meta")
    on_meta = reconstruct_on_device(meta, clips, tiny("nerf"), batch_size=2)
    assert {t.device.type for t in (on_meta.recs, on_meta.losses, on_meta.universal, on_meta.universal_losses)} == {
        "meta"
    }


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Equal rows; STOI to its last bits (its float sums may round differently between calls: test_metrics)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ("metrics", "universal"):
            stoi_a = {k: ra[key].pop(k) for k in ("stoi", "estoi") if k in ra[key]}
            stoi_b = {k: rb[key].pop(k) for k in ("stoi", "estoi") if k in rb[key]}
            assert stoi_a.keys() == stoi_b.keys()
            for k in stoi_a:
                assert stoi_a[k] == pytest.approx(stoi_b[k], rel=1e-12, abs=0)
        assert ra == rb


@pytest.mark.integration  # the pool's worker processes
def test_pesq_and_stoi_in_a_process_pool_equal_the_sequential_values(speech_clips):
    """Validation with workers=2 (PESQ and STOI in two processes, overlapping the rest) gives the values of
    workers=0, clip for clip, for FewSound's reconstructions and for its universal weights alone."""
    cfg = tiny("nerf", LONG, val_metrics=("pesq", "stoi", "mse", "lsd"))
    clips = speech(speech_clips, 4, LONG)
    kinds = ["speech", "speech", "music", "speech"]  # a non-speech clip: PESQ/STOI not applicable there
    model = build_model(cfg.model, verbose=False)
    sequential = validate(model, clips, kinds, cfg, workers=0)
    parallel = validate(model, clips, kinds, cfg, workers=2)
    scored = [r for r in sequential if r["kind"] == "speech"]
    assert all({"pesq", "stoi"} <= r["metrics"].keys() and {"pesq", "stoi"} <= r["universal"].keys() for r in scored)
    assert set(sequential[2]["metrics"]["not_applicable"]) == {"pesq", "stoi"}
    _same_rows(parallel, sequential)


def test_a_resumed_optimizer_has_the_state_layout_of_a_fresh_one(tmp_path, speech_clips):
    """After a resume, AdamW's state has exactly the types, devices, dtypes and shapes of a fresh optimizer's after
    one step: `step` a 0-dim float32 CPU tensor (torch's choice for a non-fused AdamW: no device kernel, no sync
    to read it), the moments on their parameter's device in its dtype."""
    cfg = tiny()
    batch = next(random_batches(speech(speech_clips, 6, 4 * CLIP), 4, CLIP, seed=1))
    fresh = build_model(cfg.model, verbose=False)
    opt, sched = make_optimizer(fresh, cfg)
    train_step(fresh, batch, opt, scheduler=sched)
    save_training_state(tmp_path, fresh, opt, sched, cfg, epoch=0, step=1)
    resumed = build_model(cfg.model, verbose=False)
    opt_r, sched_r = make_optimizer(resumed, cfg)
    load_training_state(tmp_path, resumed, opt_r, sched_r)
    layout = optimizer_layout(opt_r)
    assert layout == optimizer_layout(opt) and len(layout) == len(list(resumed.parameters()))
    for p in resumed.parameters():
        state = opt_r.state[p]
        assert state["step"].device.type == "cpu" and state["step"].dim() == 0
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 1.0
        assert state["exp_avg"].device == p.device and state["exp_avg_sq"].dtype == p.dtype


def test_a_resume_continues_bitwise_for_several_steps(tmp_path, speech_clips):
    """Saved after two steps and restored into a fresh model: three more steps (with the schedule) give the
    same state, bit for bit, after every step, as the run that never stopped."""
    cfg = tiny(epochs=3)  # a OneCycle schedule of 6 steps
    stream = random_batches(speech(speech_clips, 6, 4 * CLIP), 4, CLIP, seed=2)
    batches = [next(stream) for _ in range(5)]
    a = build_model(cfg.model, verbose=False)
    opt_a, sched_a = make_optimizer(a, cfg)
    for batch in batches[:2]:
        train_step(a, batch, opt_a, scheduler=sched_a)
    meta = save_training_state(tmp_path, a, opt_a, sched_a, cfg, epoch=0, step=2)
    b = build_model(cfg.model, verbose=False)
    opt_b, sched_b = make_optimizer(b, cfg)
    assert load_training_state(tmp_path, b, opt_b, sched_b)["digest_loaded"] == meta["digest"]
    for batch in batches[2:]:
        train_step(a, batch, opt_a, scheduler=sched_a)
        train_step(b, batch, opt_b, scheduler=sched_b)
        assert state_digest(a, opt_a, sched_a) == state_digest(b, opt_b, sched_b)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_training_runs_at_full_float32_numerics(speech_clips):
    """The training loop (and Ray Train's workers, through the same fewsound.device.resolve_device) sets fewsound's
    numerics: the encoders' convolutions and the matmuls in full float32 on a GPU, whatever the process had set."""
    from test_device import full_float32, tf32_on

    from fewsound.device import set_numerics
    from fewsound.train import train

    tf32_on()
    try:
        model, history, _ = train(tiny(epochs=1, samples_per_epoch=4), speech(speech_clips, 6, 4 * CLIP))
        assert len(history) == 1 and full_float32()
    finally:
        set_numerics()
