"""Device and memory policy (fewsound.device): chunk sizing for a GPU share, the out-of-memory split, GPU hiding in
0-GPU workers (a real local Ray), the numerics. CPU only: the CUDA side of the same code is tests/test_gpu.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fewsound import device as dev
from fewsound.fit import FitConfig, fit
from fewsound.losses import fit_loss

GiB = 2**30
SECONDS_3 = 65_536  # a 3 s clip at 22,050 Hz


# --- chunk sizing (pure) ---------------------------------------------------------------------------------------


def test_the_table_is_the_benchmark_result():
    """fewsound.device's bytes per clip-sample are benchmarks/clip_memory.py's result (a re-run updates both)."""
    measured = dev._load_table()
    assert measured, f"missing {dev.CLIP_MEMORY_RESULT}: run benchmarks/clip_memory.py"
    assert dev.BYTES_PER_SAMPLE == pytest.approx(measured, rel=1e-6)
    from fewsound.inr import FAMILIES

    assert set(dev.BYTES_PER_SAMPLE) == set(FAMILIES)


def test_a_quarter_of_a_24_gb_card_holds_what_its_family_allows():
    free = total = 24 * GiB
    per = {
        f: dev.clips_per_chunk(f, SECONDS_3, 16, free_bytes=free, total_bytes=total, share=0.25)
        for f in "kan wire siren".split()
    }
    for family, chunk in per.items():  # what the budget holds, evened over the pack's chunks
        budget = total * 0.25 - dev.RESERVE_BYTES
        cost = dev.bytes_per_sample(family) * SECONDS_3 * dev.PEAK_FACTOR
        fits = int(budget // cost)
        assert chunk <= fits and chunk * cost <= budget, (family, chunk, fits)
        assert chunk == -(-16 // -(-16 // fits))  # ceil(16 / ceil(16 / fits)): even chunks
    assert per["wire"] <= per["siren"] <= per["kan"]  # the heavier family, the smaller its chunks
    assert per["wire"] < 16 == per["kan"]  # 16 three-second WIRE clips do not fit a quarter card; KAN's do
    # the whole card: four times the budget, bigger chunks; a short clip: the whole pack
    assert dev.clips_per_chunk("wire", SECONDS_3, 16, free_bytes=free, total_bytes=total) > per["wire"]
    assert dev.clips_per_chunk("wire", 4096, 16, free_bytes=free, total_bytes=total, share=0.25) == 16


def test_chunks_shrink_with_free_memory_and_never_go_below_one_clip():
    total = 80 * GiB
    sizes = [
        dev.clips_per_chunk("finer", SECONDS_3, 64, free_bytes=free * GiB, total_bytes=total, share=0.5)
        for free in (80, 40, 20, 10, 5, 1)
    ]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert sizes[0] == sizes[1]  # more free memory than the share does not grow the chunk past the share
    assert sizes[-1] == 1  # 1 GiB free: less than a clip after the reserve, still one clip (split_on_oom's floor)
    assert dev.clips_per_chunk("kan", SECONDS_3, 5, free_bytes=0, total_bytes=total, share=0.125) == 1
    # even chunks: 10 clips of which 4 fit -> 4 + 3 + 3 (ceil(10 / 3) = 4), 7 of which 6 fit -> 4 + 3
    per_clip = dev.bytes_per_sample("kan") * 1000 * dev.PEAK_FACTOR
    four = int(4.5 * per_clip) + dev.RESERVE_BYTES
    assert dev.clips_per_chunk("kan", 1000, 10, free_bytes=four, total_bytes=four) == 4
    six = int(6.5 * per_clip) + dev.RESERVE_BYTES
    assert dev.clips_per_chunk("kan", 1000, 7, free_bytes=six, total_bytes=six) == 4


def test_an_unknown_family_is_sized_as_the_dearest_and_bad_input_is_refused():
    assert dev.bytes_per_sample("new-family") == max(dev.BYTES_PER_SAMPLE.values())
    with pytest.raises(ValueError, match="share"):
        dev.clips_per_chunk("kan", 1000, 4, free_bytes=GiB, total_bytes=GiB, share=0)
    with pytest.raises(ValueError, match="n_clips"):
        dev.clips_per_chunk("kan", 1000, 0, free_bytes=GiB, total_bytes=GiB)


# --- out of memory: split and retry ----------------------------------------------------------------------------


def test_split_on_oom_halves_until_it_fits_and_releases_between_tries():
    tried, released = [], []

    def run(chunk: int) -> str:
        tried.append(chunk)
        if chunk > 3:
            raise torch.OutOfMemoryError(f"chunk {chunk} does not fit")
        return f"ran {chunk}"

    assert dev.split_on_oom(run, 16, release=lambda: released.append(1)) == ("ran 2", 2)
    assert tried == [16, 8, 4, 2] and len(released) == 3
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # what CUDA raises is what we catch

    def never(chunk: int) -> None:
        raise torch.OutOfMemoryError("nothing fits")

    with pytest.raises(torch.OutOfMemoryError):  # one clip that does not fit: the pack fails (Tune retries it)
        dev.split_on_oom(never, 4, release=lambda: None)

    def other(chunk: int) -> None:
        raise RuntimeError("not a memory error")

    with pytest.raises(RuntimeError, match="not a memory error"):  # anything else is not retried
        dev.split_on_oom(other, 4, release=lambda: None)


def crops_of(speech_clips, n: int, length: int) -> np.ndarray:
    """[n, length] peak-normalised crops of n different real recordings, from their middle."""
    out = []
    for clip in speech_clips[:n]:
        x = clip.load(sr=22_050)
        x = x[(x.size - length) // 2 :][:length]
        assert x.size == length, clip.clip_id
        out.append(x / np.abs(x).max())
    return np.stack(out).astype(np.float32)


class OutOfMemoryAbove:
    """The paper's loss per chunk, raising torch.OutOfMemoryError (as CUDA would) for chunks of more than `limit`
    clips: a pack that does not fit in one go."""

    def __init__(self, limit: int):
        self.limit, self.sizes = limit, []

    def __call__(self, pred, target):
        self.sizes.append(pred.shape[0])
        if pred.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (emulated): {pred.shape[0]} clips")
        return fit_loss(pred, target)


@pytest.mark.parametrize("family", ["kan", "siren"])
def test_a_pack_that_runs_out_of_memory_is_split_and_ends_where_the_unsplit_pack_ends(speech_clips, family):
    clips = crops_of(speech_clips, 4, 2048)
    cfg = FitConfig(family=family, steps=3, log_every=1, dtype="float64")
    seeds = [3, 4, 5, 6]
    unsplit = fit(cfg, clips, seeds=seeds, loss_fn=fit_loss, clips_per_chunk=4)
    oom = OutOfMemoryAbove(1)
    split = fit(cfg, clips, seeds=seeds, loss_fn=oom, clips_per_chunk=4)
    # step 0 tried 4 clips, then 2, then ran in ones; every later step (and the final evaluation) in ones
    assert oom.sizes[:4] == [4, 2, 1, 1] and set(oom.sizes[4:]) == {1}
    assert len(oom.sizes) == 2 + 4 * (cfg.steps + 1)
    for b in range(4):
        assert not split[b].diverged and split[b].steps == cfg.steps
        np.testing.assert_allclose(split[b].reconstruction, unsplit[b].reconstruction, rtol=1e-6, atol=1e-9)
        assert [v for _, v in split[b].history] == pytest.approx([v for _, v in unsplit[b].history], rel=1e-9)
        for k, v in unsplit[b].params.items():
            torch.testing.assert_close(split[b].params[k], v, rtol=1e-7, atol=1e-10)


def test_a_single_clip_that_does_not_fit_fails_the_fit(speech_clips):
    with pytest.raises(torch.OutOfMemoryError):
        fit(
            FitConfig(family="nerf", steps=2),
            crops_of(speech_clips, 2, 2048),
            loss_fn=OutOfMemoryAbove(0),
            clips_per_chunk=2,
        )


# --- numerics ---------------------------------------------------------------------------------------------------


def test_resolving_a_device_sets_full_float32_numerics():
    from fewsound.device import resolve_device

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        assert resolve_device("auto").type == "cpu"  # tests hide CUDA (tests/conftest.py)
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        dev.set_numerics()


def tf32_on() -> None:
    """Torch's TF32 switches on (what a user's code, or another library in the process, may have done)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def full_float32() -> bool:
    return (
        torch.get_float32_matmul_precision() == "highest"
        and not torch.backends.cuda.matmul.allow_tf32
        and not torch.backends.cudnn.allow_tf32
    )


def test_loading_cdpam_sets_full_float32_numerics():
    """CDPAM (convolutions) runs at fewsound's numerics whoever loads it: a sweep's evaluation, the evaluate
    command, a training's validation."""
    from fewsound.metrics.cdpam import load_cdpam

    tf32_on()
    try:
        load_cdpam("cpu")
        assert full_float32()
    finally:
        dev.set_numerics()


def test_claiming_a_share_without_cuda_caps_nothing():
    assert not torch.cuda.is_available()
    assert dev.claim_gpu_share(0.25) == 1.0 and dev._share == 1.0
    dev.release_cached_memory()  # a no-op without CUDA, not an error


def test_tests_run_with_cuda_hidden():
    from conftest import NO_GPUS

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == NO_GPUS and torch.cuda.device_count() == 0


# --- CPU means CPU: a real local Ray whose node lists two GPUs ------------------------------------------------


@pytest.mark.integration  # a local Ray
def test_a_ray_task_given_no_gpu_sees_none(monkeypatch):
    import ray

    from tune.ray_env import cpu_means_cpu

    def probe(hide: bool) -> tuple[str | None, str, str]:
        from fewsound.device import resolve_device
        from fewsound.metrics.cdpam import default_device

        if hide:
            cpu_means_cpu()
        return os.environ.get("CUDA_VISIBLE_DEVICES"), str(resolve_device("auto")), str(default_device())

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the node's environment: Ray's workers inherit it
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=1, max_calls=1)(probe)  # max_calls=1: a fresh worker process per call
        assert ray.get(task.remote(False))[0] == "0,1"  # what Ray does by itself: every GPU visible
        assert ray.get(task.remote(True)) == ("", "cpu", "cpu")  # hidden: torch and CDPAM on the CPU
    finally:
        ray.shutdown()


def test_the_grid_evaluation_asks_for_cpus_and_a_gpu_share():
    from tune.hyper.evaluation import EVAL_CPUS, EVAL_GPU, eval_resources

    assert eval_resources([2.0], gpus=False) == {"num_cpus": 1.0}  # a 2-CPU machine: one left to the others
    assert eval_resources([4.0, 16.0], gpus=False) == {"num_cpus": float(EVAL_CPUS)}
    assert eval_resources([0.0, 8.0], gpus=True) == {"num_cpus": float(EVAL_CPUS), "num_gpus": EVAL_GPU}
    assert eval_resources([], gpus=True)["num_cpus"] == 1.0  # never a 0-CPU (one-thread, unaccounted) evaluation


# --- the first GPU's one call, where there is none ------------------------------------------------------------


def test_gpu_check_says_there_is_no_cuda_device_and_runs_nothing(processes, tmp_path):
    """benchmarks/gpu_check.sh on a machine without CUDA: one line on stderr saying so, exit 2, no step run and
    nothing written (neither its log under benchmarks/results/ nor anything in $OUT)."""
    import sys

    from conftest import NO_GPUS
    from support import REPO

    log = REPO / "benchmarks" / "results" / "gpu_check.log"
    before = log.stat().st_mtime_ns if log.exists() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=NO_GPUS, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("FEWSOUND_TEST_GPU", None)
    done = processes.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device here" in lines[0] and "nothing run" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []
    assert (log.stat().st_mtime_ns if log.exists() else None) == before
