"""Wan2.1 VAE: shapes, streaming decode == whole-shot decode, loaders and full-size shapes."""
import pytest
import torch
from safetensors.torch import save_file

from shotstream_core.vae import (
    VAE_PRESETS,
    StreamingDecoder,
    VAEConfig,
    WanVAE,
    load_vae,
    vae_config_from_state_dict,
)

# Parameter count of the real Wan2.1 VAE (Wan2.1_VAE.pth: 126.9M fp32 values, 508 MB).
WAN21_VAE_PARAMS = 126_892_531


def random_vae(name="micro", seed=0, **changes) -> WanVAE:
    """A VAE with every parameter random (default init leaves norms at 1, which hides mistakes)."""
    torch.manual_seed(seed)
    vae = WanVAE(VAE_PRESETS[name].replace(**changes) if changes else name).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("gamma") else 0.0))
    return vae


@pytest.fixture(scope="module")
def vae():
    return random_vae()


# --- streaming decode ---------------------------------------------------------------------------

@pytest.mark.parametrize("latent_frames, blocks", [(9, [3, 3, 3]), (8, [3, 3, 2]), (7, [1, 3, 3])])
def test_streaming_equals_whole_shot(vae, latent_frames, blocks):
    torch.manual_seed(1)
    z = torch.randn(2, 16, latent_frames, 4, 6)
    with torch.no_grad():
        whole = vae.decode(z)
    assert whole.shape == (2, 3, 4 * (latent_frames - 1) + 1, 32, 48)

    dec = StreamingDecoder(vae)
    start, emitted = 0, 0
    for i, f in enumerate(blocks):
        frames = dec.feed(z[:, :, start:start + f])
        # Frames come back per block, before the next block exists: 1 for the shot's first latent, 4 after.
        n = (1 + 4 * (f - 1)) if i == 0 else 4 * f
        assert frames.shape == (2, 3, n, 32, 48)
        err = (frames - whole[:, :, emitted:emitted + n]).abs().max().item()
        assert err <= 1e-5, f"block {i}: max abs err {err}"
        start, emitted = start + f, emitted + n
    assert dec.finish() == whole.shape[2]


def test_chunked_decoder_matches_per_frame(vae):
    """Decoding 3 latent frames per call exercises every causal cache with multi-frame chunks."""
    z = torch.randn(1, 16, 7, 2, 2)
    with torch.no_grad():
        per_frame = vae.decode(z, chunk_frames=1)
        chunked = vae.decode(z, chunk_frames=3)
    # Not bitwise: convolutions over 3 frames sum in another order (random weights amplify that).
    assert (per_frame - chunked).abs().max().item() <= 1e-4
    # The cache matters: decoding the later frames without it gives different pixels.
    with torch.no_grad():
        cold = StreamingDecoder(vae).feed(z[:, :, 3:])
    assert (cold[:, :, 1:] - per_frame[:, :, 13:]).abs().max().item() > 1e-3


def test_streaming_lifecycle(vae):
    dec = StreamingDecoder(vae)
    z = torch.randn(1, 16, 3, 2, 2)
    first = dec.feed(z)
    with pytest.raises(ValueError, match="does not continue"):
        dec.feed(torch.randn(1, 16, 3, 2, 4))
    dec.finish()
    with pytest.raises(RuntimeError, match="reset"):
        dec.feed(z)
    dec.reset()
    assert torch.equal(dec.feed(z), first)  # a new shot starts from an empty cache


# --- shapes and validation ----------------------------------------------------------------------

@pytest.mark.parametrize("frames, height, width", [(1, 16, 16), (5, 32, 48), (9, 48, 32), (13, 16, 64)])
def test_encode_decode_shapes(vae, frames, height, width):
    video = torch.rand(1, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        assert z.shape == (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        assert z.dtype == torch.float32
        out = vae.decode(z)
    assert out.shape == video.shape
    assert out.min() >= -1 and out.max() <= 1


def test_encode_frames_encodes_each_frame_alone(vae):
    frames = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode_frames(frames)
        alone = vae.encode(frames[1:2].unsqueeze(2))[:, :, 0]
    assert z.shape == (3, 16, 4, 4)
    assert torch.allclose(z[1:2], alone, atol=1e-4)


def test_encode_chunking_is_causal(vae):
    """Later frames never change earlier latents (first frame alone, then chunks of 4)."""
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        z9 = vae.encode(video)
        z5 = vae.encode(video[:, :, :5])
    assert torch.allclose(z9[:, :, :2], z5, atol=1e-4)


@pytest.mark.parametrize("shape, hint", [
    ((1, 3, 5, 36, 48), "height 36 -> 32 or 40"),  # the VAE alone: multiples of its stride, any DiT patch
    ((1, 3, 5, 32, 20), "width 20 -> 16 or 24"),
    ((1, 3, 8, 32, 32), "use 5 or 9"),
    ((1, 3, 6, 32, 32), "use 5 or 9"),
])
def test_bad_sizes_name_the_nearest_valid(vae, shape, hint):
    with pytest.raises(ValueError, match=hint):
        vae.encode(torch.zeros(shape))


def test_any_latent_grid_decodes_but_other_channels_are_refused(vae):
    assert vae.decode(torch.zeros(1, 16, 2, 3, 5)).shape[-2:] == (24, 40)  # any grid decodes: odd ones too
    with pytest.raises(ValueError, match=r"expected latents \[B, 16"):
        vae.decode(torch.zeros(1, 4, 3, 4, 4))


def test_tiny_vae_trains():
    """The tiny preset must be trainable: gradients reach every parameter and a few steps lower the loss."""
    torch.manual_seed(0)
    vae = WanVAE("micro").train()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    losses = []
    for _ in range(8):
        mu, log_var = vae.encode_moments(video)
        assert mu.shape == log_var.shape == (2, 16, 2, 2, 2)
        z = vae.normalize(mu + torch.randn_like(mu) * (0.5 * log_var).exp())
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).mean()
        loss = (vae.decode(z, clamp=False) - video).pow(2).mean() + 1e-3 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in vae.parameters())
    assert losses[-1] < losses[0]


# --- loading ------------------------------------------------------------------------------------

def test_full_size_wan21_on_meta():
    with torch.device("meta"):
        vae = WanVAE("wan2.1")
    sd = vae.state_dict()
    assert sum(p.numel() for p in vae.parameters()) == WAN21_VAE_PARAMS
    # A few shapes of the real file.
    assert sd["encoder.conv1.weight"].shape == (96, 3, 3, 3, 3)
    assert sd["encoder.downsamples.5.time_conv.weight"].shape == (192, 192, 3, 1, 1)
    assert sd["encoder.head.2.weight"].shape == (32, 384, 3, 3, 3)
    assert sd["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert sd["decoder.upsamples.4.residual.2.weight"].shape == (384, 192, 3, 3, 3)
    assert sd["decoder.middle.1.to_qkv.weight"].shape == (1152, 384, 1, 1)
    assert sd["decoder.head.0.gamma"].shape == (96, 1, 1, 1)
    # The config inferred from the shapes is the wan2.1 preset, with Wan's latent statistics.
    assert vae_config_from_state_dict(sd) == VAE_PRESETS["wan2.1"]


def _wan_file_state(vae: WanVAE) -> dict:
    """The state dict as Wan's own files have it: no latent statistics."""
    return {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith("latent_")}


def test_load_wan_pth_and_comfy_safetensors(vae, tmp_path):
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(_wan_file_state(vae), pth)
    st = tmp_path / "wan_2.1_vae.safetensors"
    save_file({k: v.half() for k, v in _wan_file_state(vae).items()}, str(st))

    z = torch.randn(1, 16, 3, 2, 2)
    with torch.no_grad():
        want = vae.decode(z)
        with pytest.warns(UserWarning, match="no latent_mean/latent_std"):
            from_pth = load_vae(pth)
        assert from_pth.config == vae.config.replace(latent_mean=None, latent_std=None)
        assert torch.equal(from_pth.decode(z), want)
        with pytest.warns(UserWarning):
            from_st = load_vae(st, dtype=torch.float16)
        assert from_st.dtype == torch.float16
        assert from_st.latent_mean.dtype == torch.float32
    # a Wan2.1 model folder: its VAE is the .pth beside the DiT's safetensors shards
    wan = tmp_path / "Wan2.1-T2V-1.3B"
    wan.mkdir()
    pth.rename(wan / "Wan2.1_VAE.pth")
    save_file({"patch_embedding.weight": torch.zeros(1)}, str(wan / "diffusion_pytorch_model.safetensors"))
    with pytest.warns(UserWarning), torch.no_grad():
        assert torch.equal(load_vae(wan).decode(z), want)
    (wan / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(ValueError, match="a folder with no VAE file in it"):
        load_vae(wan)


def test_trained_statistics_travel_with_weights(tmp_path):
    vae = WanVAE("micro")
    vae.latent_mean.copy_(torch.linspace(-1, 1, 16))
    vae.latent_std.copy_(torch.linspace(0.5, 2, 16))
    path = tmp_path / "tiny_vae.safetensors"
    save_file({("vae." + k): v.contiguous() for k, v in vae.state_dict().items()}, str(path))  # prefixed
    loaded = load_vae(path)
    assert torch.equal(loaded.latent_mean, vae.latent_mean)
    assert torch.equal(loaded.latent_std, vae.latent_std)


def test_first_frame_statistics_apply_to_a_shots_first_latent_frame_only(tmp_path):
    """A VAE with first_frame_stats normalises a clip's first latent frame (coded alone) with its own
    statistics and the rest with the shared ones; decoding undoes exactly that, block by block as whole;
    the file carries the statistics, and one of the pair alone is refused."""
    vae, plain = random_vae(first_frame_stats=True), random_vae()  # the same weights
    g = torch.Generator().manual_seed(3)
    for net in (vae, plain):
        net.latent_mean.copy_(torch.randn(16, generator=torch.Generator().manual_seed(4)))
        net.latent_std.copy_(torch.rand(16, generator=torch.Generator().manual_seed(5)) + 0.5)
    vae.first_latent_mean.copy_(torch.randn(16, generator=g))
    vae.first_latent_std.copy_(torch.rand(16, generator=g) + 0.2)
    fm, fs = vae.first_latent_mean.view(1, -1, 1, 1), vae.first_latent_std.view(1, -1, 1, 1)

    video = torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        raw = plain.encode_moments(video)[0].float()  # [1, 16, 3, 4, 4]
        z = vae.encode(video)
        assert torch.allclose(z[:, :, 0], (raw[:, :, 0] - fm) / fs, atol=1e-5)
        assert torch.allclose(z[:, :, 1:], plain.encode(video)[:, :, 1:], atol=1e-5)
        frames = vae.encode_frames(video[0].transpose(0, 1)[:2])  # each frame alone: its own first frame
        assert torch.allclose(frames, (plain.encode_frames(video[0].transpose(0, 1)[:2]) *
                                       plain.latent_std.view(1, -1, 1, 1) + plain.latent_mean.view(1, -1, 1, 1)
                                       - fm) / fs, atol=1e-4)
        whole = vae.decode(z)
        assert torch.allclose(whole, plain.decode(plain.normalize(raw)), atol=1e-5)
        dec = StreamingDecoder(vae)
        streamed = torch.cat([dec.feed(z[:, :, :1]), dec.feed(z[:, :, 1:])], dim=2)
        assert torch.allclose(streamed, whole, atol=1e-5)

    loaded = load_vae(_saved(vae, tmp_path / "vae.safetensors"))
    assert loaded.config.first_frame_stats and torch.equal(loaded.first_latent_std, vae.first_latent_std)
    assert not load_vae(_saved(plain, tmp_path / "plain.safetensors")).config.first_frame_stats
    alone = {k: v.contiguous() for k, v in vae.state_dict().items() if k != "first_latent_std"}
    save_file(alone, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['first_latent_std'\]"):
        load_vae(tmp_path / "half.safetensors")


def _saved(vae, path):
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


def test_wan21_statistics_used_for_real_file_without_them(tmp_path):
    with torch.device("meta"):
        sd = WanVAE("wan2.1").state_dict()
    cfg = vae_config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("latent_")})
    assert cfg.latent_mean[0] == pytest.approx(-0.7571) and cfg.latent_std[-1] == pytest.approx(1.9160)


@pytest.mark.parametrize("keys, found", [
    ({"blocks.0.self_attn.norm_q.weight": (4,), "blocks.0.cross_attn.q.weight": (4, 4)}, "diffusion transformer"),
    ({"shared.weight": (8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4)}, "text encoder"),
    ({"decoder.conv_in.weight": (4, 4, 3, 3)}, "diffusers"),
])
def test_wrong_file_is_named(tmp_path, keys, found):
    path = tmp_path / "not_a_vae.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(ValueError, match=f"found .*{found}.*expected a Wan2.1 VAE"):
        load_vae(path)


def test_mismatched_file_is_reported(vae, tmp_path):
    sd = _wan_file_state(vae)
    sd["decoder.head.2.weight"] = torch.zeros(3, 5, 3, 3, 3)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="wrong shapes .*decoder.head.2.weight"):
        load_vae(path)


def test_config_rejects_other_temporal_strides():
    with pytest.raises(ValueError, match="engine expects 4x"):
        VAEConfig(dim=8, dim_mult=(1, 2, 4), temporal_downsample=(True, False))


def test_vae_of_another_spatial_stride_round_trips_and_loads(tmp_path):
    """A 3-level VAE compresses space 4x: its latent grid, its file and its streaming decoder follow."""
    cfg = VAEConfig(dim=4, z_dim=8, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True),
                    latent_mean=None, latent_std=None)
    assert cfg.spatial_stride == 4 and cfg.temporal_stride == 4
    torch.manual_seed(0)
    vae = WanVAE(cfg).eval()
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        assert z.shape == (1, 8, 3, 8, 12)
        whole = vae.decode(z)
        assert whole.shape == video.shape
        decoder = StreamingDecoder(vae)
        decoder.reset()
        streamed = torch.cat([decoder.feed(z[:, :, :2]), decoder.feed(z[:, :, 2:])], dim=2)
        decoder.finish()
    torch.testing.assert_close(streamed, whole)
    path = tmp_path / "vae_s4.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    loaded = load_vae(path)
    assert loaded.config.spatial_stride == 4 and loaded.config.dim_mult == (1, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video), z)
    with pytest.raises(ValueError, match="divisible by 4 \\(VAE stride 4\\)"):
        vae.encode(torch.zeros(1, 3, 5, 32, 34))


def test_the_cpu_inference_path_matches_the_training_path_and_caches_copies():
    """Without autograd on the CPU the VAE runs oneDNN convolutions, a written-out RMS norm and, for a frame
    coded alone, the last kernel tap only: the same numbers as the path training takes, within float32
    rounding. Its causal cache holds copies of each chunk's tail, not views that keep whole chunks alive."""
    from shotstream_core.loading import bundled_path
    from shotstream_core.vae import CausalConv3d, StreamingDecoder, load_vae

    vae = load_vae(bundled_path("tiny", "vae"))
    x = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.enable_grad():  # the training path (no tensor needs a grad: only the mode differs)
        z_train, f_train = vae.encode(x), vae.encode_frames(x[0].transpose(0, 1)[:3])
        d_train = vae.decode(z_train)
    with torch.no_grad():
        z, f, d = vae.encode(x), vae.encode_frames(x[0].transpose(0, 1)[:3]), vae.decode(z_train)
        decoder = StreamingDecoder(vae)
        decoder.reset()
        streamed = torch.cat([decoder.feed(z_train[:, :, :1]), decoder.feed(z_train[:, :, 1:])], dim=2)
        cached = [v for k, v in decoder._cache.items() if isinstance(k, CausalConv3d)]
    for fast, slow in ((z, z_train), (f, f_train), (d, d_train), (streamed, d_train)):
        assert not torch.equal(fast, torch.zeros_like(fast))
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert cached and all(t._base is None for t in cached)  # copies, not views into a chunk
