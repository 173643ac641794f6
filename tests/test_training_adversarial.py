"""The VAE stage's adversarial loss (training.adversarial): discriminator, adaptive weight, stage wiring."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shotstream_core.config import get_preset
from shotstream_core.vae import WanVAE
from training.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from training.common import Checkpointer, StageInterrupted
from training.data import write_training_set

REPO = Path(__file__).resolve().parents[1]


def test_discriminator_judges_every_frame_in_patches():
    disc = PatchDiscriminator(width=16)
    logits = disc(torch.rand(2, 3, 5, 32, 48) * 2 - 1)
    assert logits.shape == (2 * 5, 1, 32 // 8, 48 // 8)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_layer():
    layer = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    rec = layer(x).pow(2).mean()
    adv = 5.0 * rec  # the same direction, five times the pull: the weight that evens them out is 1/5
    torch.testing.assert_close(adaptive_weight(rec, adv, layer.weight), torch.tensor(0.2), rtol=1e-3, atol=1e-6)
    assert not adaptive_weight(rec, adv, layer.weight).requires_grad


def test_discriminator_learns_to_tell_sharp_frames_from_blurred_ones():
    """The signal the decoder gets: a few steps teach the discriminator to score blur as fake, and the
    generator loss of a blurred clip ends above that of a sharp one (the comparison can fail)."""
    g = torch.Generator().manual_seed(0)

    def sharp_clips(n):  # flat sky and ground with a small coloured square: a Story World frame in small
        clips = torch.full((n, 3, 1, 32, 32), -0.5)
        clips[:, 2, :, :20] = 0.8
        clips[:, 1, :, 20:] = 0.4
        for i in range(n):
            y, x = torch.randint(4, 24, (2,), generator=g).tolist()
            clips[i, :, :, y:y + 5, x:x + 5] = (torch.rand(3, 1, 1, 1, generator=g) * 2 - 1)
        return clips

    def blur(clips):
        frames = clips[:, :, 0]
        return F.avg_pool2d(F.pad(frames, (2, 2, 2, 2), mode="replicate"), 5, stride=1)[:, :, None]

    torch.manual_seed(0)
    disc = PatchDiscriminator(width=16)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(60):
        real = sharp_clips(8)
        loss = discriminator_loss(disc, real, blur(real))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[:5]) / 5 > 1.5 and sum(losses[-5:]) / 5 < 0.5, losses
    held = sharp_clips(16)
    assert generator_loss(disc, blur(held)) > generator_loss(disc, held) + 1.0


def _decoder_argv(tmp_path, out, *extra):
    argv = ["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "num_stories=2", "--set", "crop=0", "--set", "phases=[]", "--set", "clip_frames=5",
            "--set", f"init_from={tmp_path / 'init.safetensors'}", "--set", "train_part=decoder",
            "--set", f"out_dir={tmp_path / out}", "--set", "max_steps=4", "--set", "ckpt_every=1",
            "--set", "adv_weight=0.5", "--set", "adv_start_step=1", "--set", "disc_width=8"]
    for item in extra:
        argv += ["--set", item]
    return argv


def test_vae_stage_with_adversarial_loss_trains_checkpoints_and_resumes_exactly(tmp_path):
    from training import vae_stage

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    torch.manual_seed(0)
    vae_stage.save_vae(WanVAE("micro"), tmp_path / "init.safetensors")
    whole = vae_stage.main(_decoder_argv(tmp_path, "whole"))
    assert whole["steps"] == 4 and whole["final"]["adv_w"] > 0 and "disc" in whole["final"]
    with pytest.raises(StageInterrupted):
        vae_stage.main(_decoder_argv(tmp_path, "cut", "stop_after=2"))
    assert vae_stage.main(_decoder_argv(tmp_path, "cut"))["resumed_from"] == 2  # from the cut, not step 0
    for name in ("vae", "disc"):  # the discriminator is checkpointed with the VAE, so resume is exact
        a, b = Checkpointer(tmp_path / "whole").weights(name), Checkpointer(tmp_path / "cut").weights(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # and the adversarial term changes what the decoder learns (the comparison can fail)
    vae_stage.main(_decoder_argv(tmp_path, "plain", "adv_weight=0"))
    a, c = Checkpointer(tmp_path / "whole").weights("vae"), Checkpointer(tmp_path / "plain").weights("vae")
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("decoder."))
    assert not (Checkpointer(tmp_path / "plain").path() / "disc.safetensors").exists()


@pytest.mark.parametrize("bad", ["adv_weight=-1", "disc_width=12"])
def test_bad_adversarial_settings_are_refused_by_name(tmp_path, bad):
    from training import vae_stage

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    vae_stage.save_vae(WanVAE("micro"), tmp_path / "init.safetensors")
    with pytest.raises(ValueError, match="adv_weight must be >= 0 .*disc_width a positive multiple of 8"):
        vae_stage.main(_decoder_argv(tmp_path, "bad", bad))
