"""FewSound / HyperSound models: parameter counts pinned to the paper's code, shapes, the theta + delta algebra,
gradients, checkpoints, encoders, and windowed long-audio reconstruction. Big presets are built and counted only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewsound.config import cfg_hash, flatten, from_flat
from fewsound.errors import ConfigError
from fewsound.hyper import (
    HyperConfig,
    build_model,
    crossfade_weights,
    load_model,
    reconstruct_long,
    save_model,
    window_starts,
)
from fewsound.hyper.encoders import SnacEncoder, SoundStreamEncoder, SpectralEncoder
from fewsound.hyper.model import CompactWeightEncoder, HyperMLP, ReferenceWeightEncoder
from fewsound.inr import build_inr, coordinates
from fewsound.losses import fit_loss

TINY = 4096


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def tiny(**kw) -> torch.nn.Module:
    return build_model(HyperConfig(preset="tiny", **kw), verbose=False)


@pytest.fixture(scope="module")
def speech(speech_clips):
    """Three real speech clips of TINY samples, peak-normalised: [3, TINY]."""
    rows = []
    for clip in speech_clips[:3]:
        x = clip.load()[2000 : 2000 + TINY]
        rows.append(x / np.abs(x).max())
    return torch.tensor(np.stack(rows))


# --- parameter counts (reference-code-facts 1.5 / 2) --------------------------------------------------------


def test_hypernetwork_17_5m_for_kan_l8_is_the_reference_count():
    kan = build_inr(HyperConfig(target="kan").target_config())
    assert kan.num_params() == 31_080
    h = HyperMLP(2 * 3296, (400, 768, 768, 768, 768, 400), kan.num_params())
    assert count(h) == 17_487_624


@pytest.mark.parametrize(
    "kind,target,expected",
    [
        ("fewsound", "siren", 17_532_135),  # SIREN 31,191
        ("fewsound", "nerf", 18_362_205),  # NeRF L = 12 (Table 1's 33,261)
        ("hypersound", "nerf", 17_637_285),  # HyperSound NeRF 5 x [90], L = 10 (34,741)
        ("hypersound", "siren", 16_951_575),  # HyperSound SIREN 5 x [90] (33,031)
    ],
)
def test_hypernetwork_counts_for_other_targets(kind, target, expected):
    cfg = HyperConfig(kind=kind, target=target)
    n_in = 3296 * (2 if kind == "fewsound" else 1)
    assert count(HyperMLP(n_in, cfg.hyper_widths, build_inr(cfg.target_config()).num_params())) == expected


def test_target_sizes_per_kind():
    sizes = {
        (k, t): build_inr(HyperConfig(kind=k, target=t).target_config()).num_params()
        for k in ("fewsound", "hypersound")
        for t in ("nerf", "kan", "siren")
    }
    assert sizes == {
        ("fewsound", "nerf"): 33_261,
        ("fewsound", "kan"): 31_080,
        ("fewsound", "siren"): 31_191,
        ("hypersound", "nerf"): 34_741,
        ("hypersound", "kan"): 19_908,
        ("hypersound", "siren"): 33_031,
    }


def test_large_preset_and_weight_encoders():
    cfg = HyperConfig(target="kan", preset="41.2M")
    assert count(HyperMLP(6592, cfg.hyper_widths, 31_080)) == 41_015_784
    assert abs(41_015_784 - 41.2e6) / 41.2e6 < 0.005
    assert count(ReferenceWeightEncoder(31_080, 3296, 8101)) == 49_063_980  # G for KAN(L8)
    assert count(ReferenceWeightEncoder(33_768, 3296, 8101)) == 57_923_628  # G for KAN(L10)
    assert count(CompactWeightEncoder(31_080, 3296)) < 2_000_000


@pytest.mark.parametrize("norm,expected", [("none", 1_173_536), ("layer", 21_045_792), ("group", 1_177_408)])
def test_soundstream_encoder_counts_and_output(norm, expected):
    enc = SoundStreamEncoder(32_768, 16, 32, norm)
    assert count(enc) == expected
    assert (enc.frames, enc.out_dim) == (103, 3296)


def test_full_reference_model_count_and_param_counts():
    """The reference's FewSound-KAN(L8) with its G and LayerNorm encoder: 87,628,476 (built, not run)."""
    model = build_model(HyperConfig(target="kan", weight_encoder="reference", encoder_norm="layer"), verbose=False)
    c = model.param_counts()
    assert c == {
        "encoder": 21_045_792,
        "weight_encoder": 49_063_980,
        "hypernetwork": 17_487_624,
        "universal": 31_080,
        "total": 87_628_476,
        "target_inr": 31_080,
    }
    assert "hypernetwork 17,487,624" in model.describe() and "total 87,628,476" in model.describe()


def test_default_model_counts_and_construction_log(capsys):
    model = build_model(HyperConfig(target="kan"))
    c = model.param_counts()
    assert c["hypernetwork"] == 17_487_624 and c["encoder"] == 1_177_408 and c["universal"] == 31_080
    assert c["total"] == c["encoder"] + c["weight_encoder"] + c["hypernetwork"] + c["universal"]
    line = capsys.readouterr().err.strip()
    assert line == model.describe() and "\n" not in line


# --- forward, target params, the theta + delta algebra ------------------------------------------------------


@pytest.mark.parametrize("target", ["nerf", "kan", "siren"])
def test_fewsound_shapes_and_target_params(target, speech):
    model = tiny(target=target)
    recon = model(speech)
    assert recon.shape == speech.shape and torch.isfinite(recon).all()
    params, buffers = model.target_params(speech)
    specs = model.inr.param_specs()
    assert set(params) == set(specs)
    for name, spec in specs.items():
        assert params[name].shape == (3, *spec.shape)
    # the same per-sound params through the INR directly give the model's output
    torch.testing.assert_close(model.inr(params, coordinates(TINY), buffers), recon)


def test_delta_factor_zero_is_the_universal_inr(speech):
    model = tiny(target="kan", delta_warmup_epochs=50)
    model.set_epoch(0)
    assert model.delta_factor == 0.0
    flat = model.target_flat(speech)
    assert torch.equal(flat, model.theta.detach().expand(3, -1))  # theta' = theta exactly
    recon = model(speech)
    uni = model.universal()
    assert uni.shape == (1, TINY)
    # equal up to the summation order of a batch-3 vs batch-1 matmul
    torch.testing.assert_close(recon, uni.expand(3, -1), rtol=0, atol=1e-6)
    model.set_epoch(25)
    assert model.delta_factor == 0.5
    model.set_epoch(1000)
    assert model.delta_factor == 1.0
    assert (model(speech) - uni).abs().max() > 1e-4  # the delta does change the reconstruction
    assert model.universal(1000).shape == (1, 1000)


def test_default_has_no_warmup_and_linear_in_factor(speech):
    model = tiny()
    assert model.delta_factor == 1.0  # the paper's formula theta' = theta + delta
    model2 = tiny(delta_warmup_epochs=10)
    model2.load_state_dict(model.state_dict())
    model2.set_epoch(5)
    flat = model.target_flat(speech)
    flat_half = model2.target_flat(speech)
    torch.testing.assert_close(flat_half - model2.theta, 0.5 * (flat - model.theta))


def test_per_sound_params_differ_and_identical_sounds_agree(speech):
    model = tiny(target="kan")
    audio = torch.cat([speech, speech[:1]])
    params, _ = model.target_params(audio)
    for p in params.values():
        torch.testing.assert_close(p[3], p[0])  # same sound -> same network
    flat = model.target_flat(audio)
    assert (flat[0] - flat[1]).abs().max() > 1e-6 and (flat[1] - flat[2]).abs().max() > 1e-6


def test_gradients_reach_every_part(speech):
    model = tiny(target="kan")
    loss = fit_loss(model(speech), speech).mean()
    loss.backward()
    parts = {"encoder": model.encoder, "weight_encoder": model.weight_encoder, "hypernetwork": model.hyper}
    for name, part in parts.items():
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert model.theta.grad is not None and model.theta.grad.abs().sum() > 0


def test_delta_scale_matches_the_target_blocks(speech):
    """block_rms: the initial delta of each block is of the size of that block's own init weights, even for
    KAN's spline coefficients (~100x smaller than its base weights); 'none' (the reference) is not."""

    @torch.no_grad()
    def ratios(model):
        delta = model.unflatten(model.delta(speech))
        theta = model.unflatten(model.theta.unsqueeze(0))
        return {k: float(delta[k].pow(2).mean().sqrt() / theta[k].pow(2).mean().sqrt()) for k in delta}

    scaled = ratios(tiny(target="kan"))
    assert all(0.01 < r < 10 for r in scaled.values()), scaled
    raw = ratios(tiny(target="kan", output_scaling="none"))
    assert max(raw.values()) > 10, raw


def test_theta_init_options():
    model = tiny(target="kan")
    params, _ = model.inr.init([model.config.seed])
    torch.testing.assert_close(model.theta.detach(), torch.cat([params[k].reshape(-1) for k in model.specs]))
    ref = tiny(target="kan", theta_init="reference")
    blocks = ref.unflatten(ref.theta.detach().unsqueeze(0))
    for name, block in blocks.items():
        if name.startswith("ss"):
            assert (block == 0).all(), name  # the code's zeros: the universal spline branch starts at 0
        else:
            assert block.abs().max() <= math.sqrt(6 / block.numel()) and block.abs().max() > 0, name


def test_hypersound_shapes_and_no_universal(speech):
    for target in ("nerf", "kan", "siren"):
        model = tiny(kind="hypersound", target=target)
        assert model(speech).shape == speech.shape
        c = model.param_counts()
        assert c["weight_encoder"] == 0 and c["universal"] == 0 and not hasattr(model, "theta")
        model.set_epoch(3)  # a no-op for HyperSound
        with pytest.raises(ConfigError):
            model.universal()
    # block_rms: at init the generated weights sit around the target's own init
    model = tiny(kind="hypersound", target="kan")
    params, _ = model.target_params(speech)
    init, _ = model.inr.init([0])
    for k in params:
        r = float(params[k].detach().pow(2).mean().sqrt() / init[k].pow(2).mean().sqrt())
        assert 0.3 < r < 10, (k, r)


def test_training_steps_reduce_the_loss_and_beat_the_universal_inr(speech):
    """25 AdamW steps on three real speech clips: the loss falls, and the per-sound networks theta + delta beat
    the universal network theta alone (what FewSound adds over a single shared INR)."""
    torch.manual_seed(0)
    model = tiny(target="nerf")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = fit_loss(model(speech), speech).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(fit_loss(model(speech), speech).mean())
        universal = float(fit_loss(model.universal().expand(3, -1), speech).mean())
    assert final < 0.9 * losses[0], losses
    assert final < 0.9 * universal, (final, universal)


# --- config, determinism, checkpoints -----------------------------------------------------------------------


def test_config_validation_and_round_trip():
    for bad in (
        dict(kind="maml"),
        dict(target="wire"),
        dict(encoder="wav2vec"),
        dict(preset="huge"),
        dict(weight_encoder="big"),
        dict(encoder_norm="batch"),
        dict(delta_warmup_epochs=-1),
        dict(hyper_widths=(0, 4)),
        dict(clip_length=100),
    ):
        with pytest.raises(ConfigError):
            HyperConfig(**bad)
    with pytest.raises(ConfigError):
        HyperConfig(target="kan", target_overrides={"no_such_key": 1}).target_config()
    cfg = HyperConfig(target="kan", preset="tiny", target_overrides={"widths": [8, 8]})
    assert cfg.target_config().widths == (8, 8)
    assert cfg.clip_length == TINY and cfg.hyper_widths == (64, 64)
    back = from_flat(HyperConfig, flatten(cfg))
    assert back == cfg and cfg_hash(back) == cfg_hash(cfg)
    assert HyperConfig().clip_length == 32_768 and HyperConfig().target == "nerf"


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny(seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = tiny(seed=5)
    c = tiny(seed=6)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.hyper.out.weight, c.hyper.out.weight)


def test_save_load_round_trip_and_errors(tmp_path, speech):
    model = tiny(target="kan", delta_warmup_epochs=10)
    model.set_epoch(4)
    with torch.no_grad():
        model.theta.add_(0.01)  # a state that differs from a fresh build
    path = save_model(tmp_path / "m.pt", model)
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.delta_factor == pytest.approx(0.4) and not loaded.training
    model.eval()
    torch.testing.assert_close(loaded(speech), model(speech))
    with pytest.raises(ConfigError, match="no such model file"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="not a readable"):
        load_model(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="not a fewsound model"):
        load_model(tmp_path / "foreign.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["hyper_widths"] = [32, 32]  # weights no longer fit the config
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(ConfigError, match="do not match"):
        load_model(tmp_path / "mismatch.pt")


# --- encoders -----------------------------------------------------------------------------------------------


def test_other_encoders_shapes(speech):
    e = 104
    for enc in (SpectralEncoder(e, 22_050, channels=32), SnacEncoder(TINY, e, d_model=8)):
        z = enc(speech)
        assert z.shape == (3, e) and torch.isfinite(z).all()
    model = tiny(encoder="spectral", spectral_channels=32)
    assert model(speech).shape == speech.shape


def test_whisper_needs_a_local_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="whisper_checkpoint.*local pretrained checkpoint"):
        tiny(encoder="whisper")
    with pytest.raises(ConfigError, match="no such checkpoint"):
        tiny(encoder="whisper", whisper_checkpoint=str(tmp_path / "nowhere"))


# --- windowed reconstruction --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 100, 4096, 4097, 10_000, int(3.3 * 4096), 5 * 3072 + 1024])
def test_crossfade_weights_partition_unity(n):
    window, overlap = 4096, 1024
    starts = window_starts(max(n, window), window, overlap)
    assert starts[0] == 0 and starts[-1] + window == max(n, window)
    w = crossfade_weights(starts, window, overlap, dtype=torch.float64)
    total = torch.zeros(max(n, window), dtype=torch.float64)
    for s, wi in zip(starts, w):
        total[s : s + window] += wi
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_identity_model_gives_back_the_input_exactly(speech_clips):
    x = speech_clips[0].load()
    n = int(3.3 * TINY)
    x = x[:n]
    identity = lambda w: w.clone()  # noqa: E731
    for normalize in (True, False):
        y = reconstruct_long(identity, x, window=TINY, batch_size=3, normalize=normalize)
        assert y.shape == (n,)
        torch.testing.assert_close(y, torch.from_numpy(x), rtol=0, atol=1e-6)
    short = reconstruct_long(identity, x[:1000], window=TINY)
    torch.testing.assert_close(short, torch.from_numpy(x[:1000]), rtol=0, atol=1e-7)


def test_seams_are_smooth():
    """Windows that disagree (a constant offset of +-0.5 per window) change gradually across each seam with the
    crossfade, and jump by the full offset difference without it."""
    n = int(3.3 * TINY)
    flip = {"k": 0}

    def offset(w):  # window i -> its own constant (+0.5 / -0.5 alternating, in call order)
        out = torch.empty_like(w)
        for i in range(w.shape[0]):
            out[i] = 0.5 if (flip["k"] % 2 == 0) else -0.5
            flip["k"] += 1
        return out

    y = reconstruct_long(offset, torch.zeros(n), window=TINY, overlap=1024, normalize=False)
    assert y.shape == (n,) and y.max() > 0.49 and y.min() < -0.49
    assert y.diff().abs().max() < 2e-3  # a 1.0 swing spread over 1,024 samples: max slope ~ pi/2/1024
    flip["k"] = 0
    hard = reconstruct_long(offset, torch.zeros(n), window=TINY, overlap=0, normalize=False)
    assert hard.diff().abs().max() > 0.99


def test_real_model_long_audio(speech_clips):
    model = tiny(target="kan").eval()
    x = speech_clips[1].load()[: int(3.3 * TINY)]
    y1 = reconstruct_long(model, x, batch_size=1)
    y8 = reconstruct_long(model, x, batch_size=8)
    assert y1.shape == (len(x),) and torch.isfinite(y1).all()
    torch.testing.assert_close(y1, y8, rtol=1e-4, atol=1e-5)  # batching over windows changes nothing
