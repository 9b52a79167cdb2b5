"""The gpu tier: what only a CUDA device can show. Runs only where CUDA exists, with the devices left visible:

    FEWSOUND_TEST_GPU=1 python -m pytest -m gpu tests/test_gpu.py      # or benchmarks/gpu_check.sh

Elsewhere every test here is skipped ("no CUDA device"); tests/conftest.py hides the GPUs from every other test
(CUDA_VISIBLE_DEVICES) unless FEWSOUND_TEST_GPU=1, so the CPU tests mean the same on a GPU machine.

Determinism. On the CPU a fit on one thread is bitwise reproducible: same config, seeds and clips give the same
bits (a resumed fit ends bit-identical to an uninterrupted one; tests/test_fit.py checks it with equality); a pack's
chunks run on worker threads agree with the chunks run in sequence to float32 rounding (a worker thread's
vectorized reductions may round differently). On CUDA results agree to float rounding only: the STFT's backward
(the loss's five resolutions) and index_add/scatter-add kernels sum with atomics, whose order varies from run to
run, and cuBLAS may pick different kernels for different batch sizes (a pack of B vs a single clip). So here packed
== separate and resumed == uninterrupted are checked to a tolerance, never bitwise. Matmuls and convolutions run
in full float32 (no TF32: fewsound.device.set_numerics), so a CUDA result is within float32 rounding of the CPU's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import REPO  # tests/support.py

from fewsound.fit import FitConfig, fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device (the gpu tier runs with FEWSOUND_TEST_GPU=1 on a machine with CUDA)",
    ),
]


def speech(speech_clips, n: int, length: int) -> np.ndarray:
    out = []
    for clip in speech_clips[:n]:
        x = clip.load(sr=22_050)
        x = np.resize(x, length)
        out.append(x / np.abs(x).max())
    return np.stack(out).astype(np.float32)


def test_auto_means_cuda_with_full_float32_numerics_and_cdpam_on_the_gpu():
    from fewsound.device import resolve_device
    from fewsound.metrics.cdpam import default_device

    assert resolve_device("auto").type == "cuda" and default_device() == "cuda"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


def test_a_fit_runs_on_the_gpu_and_matches_the_cpu_to_rounding(speech_clips):
    clips = speech(speech_clips, 2, 8192)
    torch.cuda.reset_peak_memory_stats()
    gpu = fit(FitConfig(family="kan", steps=5, device="auto"), clips)
    assert torch.cuda.max_memory_allocated() > 0  # the fit's tensors were on the device
    cpu = fit(FitConfig(family="kan", steps=5, device="cpu"), clips)
    for g, c in zip(gpu, cpu):
        assert g.loss == pytest.approx(c.loss, rel=1e-3)
        np.testing.assert_allclose(g.reconstruction, c.reconstruction, atol=2e-3)


@pytest.mark.parametrize("family", ["kan", "siren", "wire"])
def test_packed_equals_separate_fits_on_cuda_to_a_tolerance(speech_clips, family):
    clips = speech(speech_clips, 3, 8192)
    cfg = FitConfig(family=family, steps=8, log_every=1, device="cuda", dtype="float64")
    packed = fit(cfg, clips, seeds=[3, 4, 5])
    for b in range(3):
        (alone,) = fit(cfg, clips[b], seeds=[3 + b])
        np.testing.assert_allclose(packed[b].reconstruction, alone.reconstruction, rtol=1e-5, atol=1e-6)
        assert packed[b].loss == pytest.approx(alone.loss, rel=1e-6)
    assert abs(packed[0].loss - packed[1].loss) > 1e-3


def test_a_pack_beyond_its_memory_share_is_split_on_the_real_device(speech_clips):
    """A process capped below what a whole pack needs: the real torch.OutOfMemoryError splits it, and the fit ends
    where a pack run in small chunks ends (to rounding)."""
    from fewsound import device as dev

    clips = speech(speech_clips, 8, 65_536)
    cfg = FitConfig(family="wire", steps=3, log_every=1, device="cuda")
    small = fit(cfg, clips, clips_per_chunk=1)
    per_clip = dev.bytes_per_sample("wire") * 65_536
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 3 * per_clip / total))  # room for ~2 clips, not 8
    try:
        split = fit(cfg, clips, clips_per_chunk=8)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    for s, r in zip(split, small):
        assert not s.diverged and s.loss == pytest.approx(r.loss, rel=1e-4)


def test_a_claimed_share_caps_the_process_and_cached_memory_goes_back(monkeypatch):
    """claim_gpu_share(1/4), as a 1/4-GPU trial calls it: an allocation beyond a quarter of the card raises
    torch.OutOfMemoryError (what split_on_oom handles), chunks are sized for the quarter, and
    release_cached_memory (between packs) hands the allocator's freed blocks back to the card."""
    from fewsound import device as dev
    from fewsound.fit import auto_clips_per_chunk

    monkeypatch.setattr(dev, "_share", 1.0)  # restored after the test (the cap itself is lifted below)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    try:
        assert dev.claim_gpu_share(0.25) == 0.25
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
        block = torch.empty(int(0.1 * total), dtype=torch.uint8, device="cuda")
        free, _ = torch.cuda.mem_get_info()
        want = dev.clips_per_chunk("wire", 65_536, 64, free_bytes=free, total_bytes=total, share=0.25)
        assert dev.cuda_clips_per_chunk(torch.device("cuda"), "wire", 65_536, 64) == want
        assert auto_clips_per_chunk(torch.device("cuda"), 64, 65_536, family="wire") == want < 64  # what fit() uses
        del block
        assert torch.cuda.memory_reserved() >= int(0.1 * total)  # freed, still cached by the allocator
        dev.release_cached_memory()
        assert torch.cuda.memory_reserved() < int(0.1 * total)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_chunks_are_sized_from_the_free_memory_of_the_share():
    from fewsound import device as dev

    free, total = torch.cuda.mem_get_info()
    want = dev.clips_per_chunk("wire", 65_536, 64, free_bytes=free, total_bytes=total, share=0.25)
    assert dev.cuda_clips_per_chunk(torch.device("cuda"), "wire", 65_536, 64) >= want  # share 1 here: no smaller
    assert 1 <= want < 64


def test_a_sweep_of_quarter_gpu_trials_shares_the_real_gpu(env):
    sys.path.insert(0, str(REPO / "tests"))
    from test_sweep_gpu import max_overlap, sweep

    from tune.jobs import resolve_corpus

    corpus = resolve_corpus(None, 4096)
    s = sweep(corpus, seed=11, experiment="test-gpu-real", num_cpus=4, num_gpus=1)
    assert s.resources == {"cpu": 1, "gpu": 0.25} and (s.done, s.failed) == (8, 0)
    assert {t["device"] for t in s.packs} == {"cuda"}  # a real device in every trial, not the CPU
    assert all(t["assigned_GPU"] == 0.25 and t["gpu_share"] == 0.25 for t in s.packs)  # each process capped
    assert max_overlap(s.packs) <= 4


def test_ddp_with_nccl_in_one_process(tmp_path):
    """One NCCL process group (world size 1): a DDP step equals the plain step to rounding."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Linear(64, 8).cuda()
        ddp = DDP(torch.nn.Linear(64, 8).cuda(), device_ids=[0])
        ddp.module.load_state_dict(plain.state_dict())
        x = torch.randn(32, 64, device="cuda")
        for m in (plain, ddp):
            m(x).square().mean().backward()
        torch.testing.assert_close(ddp.module.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-6)
        assert dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()


def test_the_training_smoke_test_trains_with_nccl_on_every_gpu(tmp_path):
    """jobs/train_fewsound.py --smoke-test with one worker per GPU: the workers see CUDA and use NCCL."""
    n = torch.cuda.device_count()
    env = dict(os.environ, FEWSOUND_HOME=str(tmp_path), PYTHONPATH=str(REPO), RAY_ADDRESS="", FEWSOUND_USE_GPU="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(REPO / "jobs" / "train_fewsound.py"), "--smoke-test", "--num-workers", str(n)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "training on their CPUs (gloo)" not in log, log[-4000:]


def test_validation_runs_on_the_gpu_and_matches_the_cpu_to_rounding(speech_clips):
    """Validation's reconstructions, loss and universal output stay on the model's CUDA device; its rows agree
    with the same model's on the CPU to float32 rounding."""
    from fewsound.hyper import HyperConfig, build_model
    from fewsound.train import TrainConfig, validate
    from fewsound.train.validation import reconstruct_on_device

    cfg = TrainConfig(
        model=HyperConfig(target="kan", preset="tiny", clip_length=16_384),
        batch_size=4,
        samples_per_epoch=8,
        val_metrics=("mse", "lsd", "pesq", "stoi"),
    )
    clips = speech(speech_clips, 4, 16_384)
    cpu = build_model(cfg.model, verbose=False)
    gpu = build_model(cfg.model, verbose=False).cuda()
    out = reconstruct_on_device(gpu, clips, cfg, batch_size=3)
    assert out.universal is not None and out.universal_losses is not None
    for t in (out.recs, out.losses, out.universal, out.universal_losses):
        assert t.device == next(gpu.parameters()).device and t.device.type == "cuda"
    on_gpu = validate(gpu, clips, ["speech"] * 4, cfg, workers=2)
    on_cpu = validate(cpu, clips, ["speech"] * 4, cfg)
    for g, c in zip(on_gpu, on_cpu):
        assert g["loss"] == pytest.approx(c["loss"], rel=1e-3)
        assert g["universal_loss"] == pytest.approx(c["universal_loss"], rel=1e-3)
        assert g["metrics"]["mse"] == pytest.approx(c["metrics"]["mse"], rel=1e-3)
        assert g["metrics"].keys() == c["metrics"].keys()


def test_a_resumed_fit_keeps_the_optimizer_step_on_the_host(tmp_path, speech_clips):
    """fewsound.fit's checkpoint restored into a pack on CUDA: AdamW's moments on the GPU, its `step` on the host
    (as a fresh optimizer's), so the resumed fit's steps do not read `step` back from the device."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_fit import resumed_optimizer_state

    layout = resumed_optimizer_state(tmp_path, speech(speech_clips, 2, 4096), torch.device("cuda"))
    assert layout == {"step": ("cpu",), "exp_avg": ("cuda",), "exp_avg_sq": ("cuda",)}


def test_a_resumed_optimizer_steps_on_the_gpu_without_host_syncs(tmp_path, speech_clips):
    """After a resume on CUDA, AdamW's state has the layout of a fresh optimizer's (moments on the GPU in float32,
    `step` a 0-dim float32 CPU tensor), and its steps run with CUDA's sync debug mode set to "error". Read straight
    onto the GPU (map_location="cuda", the old loader), `step` lands on the GPU and the first step syncs."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_train_device import optimizer_layout, tiny

    from fewsound.hyper import build_model
    from fewsound.losses import fit_loss
    from fewsound.train import load_training_state, make_optimizer, save_training_state, train_step
    from fewsound.train.state import STATE_FILE, load_state_file

    cfg = tiny(epochs=4)
    batch = torch.from_numpy(speech(speech_clips, 4, 2048)).cuda()
    fresh = build_model(cfg.model, verbose=False).cuda()
    opt, sched = make_optimizer(fresh, cfg)
    train_step(fresh, batch, opt, scheduler=sched)
    save_training_state(tmp_path, fresh, opt, sched, cfg, epoch=0, step=1)

    def steps(model, optimizer, scheduler, n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            fit_loss(model(batch), batch).mean().backward()
            torch.cuda.set_sync_debug_mode("error")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            scheduler.step()

    steps(fresh, opt, sched, 1)  # a fresh optimizer passes: the check is fair
    resumed = build_model(cfg.model, verbose=False).cuda()
    opt_r, sched_r = make_optimizer(resumed, cfg)
    load_training_state(tmp_path, resumed, opt_r, sched_r)
    assert optimizer_layout(opt_r) == optimizer_layout(opt)
    assert all(s["step"].device.type == "cpu" and s["exp_avg"].is_cuda for s in opt_r.state.values())
    steps(resumed, opt_r, sched_r, 3)

    old = build_model(cfg.model, verbose=False).cuda()
    opt_o, _ = make_optimizer(old, cfg)
    opt_o.load_state_dict(load_state_file(tmp_path / STATE_FILE, map_location="cuda")["optimizer"])
    assert all(s["step"].is_cuda for s in opt_o.state.values())
    fit_loss(old(batch), batch).mean().backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            opt_o.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
