"""Engine and story state (issue 2, acceptance 1 at engine level and 7)."""
import warnings

import pytest
import torch

from shotstream_core.engine import ShotInterrupted, ShotRequest
from shotstream_core.loading import load_engine
from shotstream_core.model import block_causal_mask
from shotstream_core.state import StoryState

G = "a red circle and a blue square on a meadow."
CAPTIONS = ["wide shot, the red circle moves left", "close-up, the blue square is still", "medium shot, both move up"]


@pytest.fixture(scope="module")
def engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_engine(preset="micro", device="cpu")


@pytest.fixture(scope="module")
def story(engine):
    return engine.generate_story(G, CAPTIONS[:2], seeds=[11, 12])


def test_blocks_stream_and_match_block_causal_masked_forward(engine, story):
    """Second shot through the engine: each block equals a masked full forward over [ctx | clean blocks | block]."""
    dit, sch = engine.dit, engine.schedule
    geo = story.geometry
    stream = engine.stream_shot(story.truncate(1), ShotRequest(G, CAPTIONS[1], seed=12))
    blocks = list(stream)
    assert [b.block_index for b in blocks] == list(range(blocks[0].num_blocks))
    assert sum(b.frames.shape[0] for b in blocks) == geo.frames_per_shot
    torch.testing.assert_close(stream.frames, story.shot_frames(1), atol=1 / 255, rtol=0)

    # Rebuild the inputs exactly as the engine does, then check the last step of every block.
    from shotstream_core.context import plan_context

    plan = plan_context([story.shots[0].num_frames], 6)
    ctx = engine._context_latents(story.truncate(1), plan, (geo.latent_height, geo.latent_width))
    flags = torch.tensor([list(plan.flags) + [plan.shot_flag] * geo.latent_frames])
    text, ids = engine.shot_text(story.truncate(1), ShotRequest(G, CAPTIONS[1], seed=12), flags)
    tpf = dit.config.tokens_per_frame(geo.latent_height, geo.latent_width)
    clean = [b.latents for b in blocks]
    t_last = float(engine.timesteps[-1])
    # The last step's input is x0 of step 3 re-noised; recover it by running the engine's own noise stream.
    gen = torch.Generator().manual_seed(12)
    noise = torch.randn(1, 16, geo.latent_frames, geo.latent_height, geo.latent_width, generator=gen)
    with torch.no_grad():
        for b, f0 in enumerate(range(0, geo.latent_frames, 3)):
            x = noise[:, :, f0:f0 + 3]
            for k, t in enumerate(engine.timesteps):
                tf = torch.full((1, x.shape[2]), float(t))
                seq = torch.cat([ctx, *clean[:b], x], 2)
                t_all = torch.cat([torch.zeros(1, 6 + f0), tf], 1)
                n = seq.shape[2]
                mask = block_causal_mask(6, n - 6, 3, tpf)
                flow = dit(seq, t_all, text, flags[:, :n], ids[:, :n], mask=mask)[:, :, -x.shape[2]:]
                x0 = sch.x0_from_flow(x, flow, tf)
                if k + 1 < len(engine.timesteps):
                    x = sch.add_noise(x0, torch.randn(x.shape, generator=gen), torch.full_like(tf, float(engine.timesteps[k + 1])))
            rel = ((x0 - clean[b]).norm() / clean[b].norm()).item()
            assert rel <= 1e-5, (b, rel, t_last)


def test_same_seed_same_frames_and_new_state_each_shot(engine, story):
    again = engine.generate_story(G, CAPTIONS[:2], seeds=[11, 12])
    assert torch.equal(again.frames(), story.frames())
    other = engine.generate_story(G, CAPTIONS[:2], seeds=[11, 99])
    assert torch.equal(other.shot_frames(0), story.shot_frames(0))
    assert not torch.equal(other.shot_frames(1), story.shot_frames(1))
    assert [s.flag for s in story.shots] == [1, 1]


def test_interrupted_shot_leaves_state_untouched(engine, story):
    before = story.frames().clone()

    def stop(done, total):
        if done == 3:
            raise ShotInterrupted("user pressed cancel")

    with pytest.raises(ShotInterrupted):
        engine.generate_shot(story, ShotRequest(G, CAPTIONS[2], seed=3), on_step=stop)
    assert story.num_shots == 2 and torch.equal(story.frames(), before)
    # and the engine is still usable: the next shot equals an uninterrupted one
    s1, f1 = engine.generate_shot(story, ShotRequest(G, CAPTIONS[2], seed=3))
    s2, f2 = engine.generate_shot(story, ShotRequest(G, CAPTIONS[2], seed=3))
    assert torch.equal(f1, f2) and s1.num_shots == 3


def test_editing_a_later_prompt_reuses_earlier_state(engine, story):
    base = story.truncate(1)
    edited, _ = engine.generate_shot(base, ShotRequest(G, "close-up, the red circle moves right", seed=12))
    fresh = engine.generate_story(G, [CAPTIONS[0], "close-up, the red circle moves right"], seeds=[11, 12])
    assert torch.equal(edited.frames(), fresh.frames())


def test_save_load_round_trip_is_exact(engine, story, tmp_path):
    path = story.save(tmp_path / "story")
    loaded = StoryState.load(path)
    assert loaded.model_id == story.model_id and loaded.geometry == story.geometry
    assert loaded.story_id == story.story_id
    for a, b in zip(loaded.shots, story.shots):
        assert (a.global_caption, a.caption, a.negative, a.seed, a.flag) == (b.global_caption, b.caption, b.negative, b.seed, b.flag)
        assert torch.equal(a.frames, b.frames)
    # a loaded state continues exactly like the original
    _, f1 = engine.generate_shot(loaded, ShotRequest(G, CAPTIONS[2], seed=5))
    _, f2 = engine.generate_shot(story, ShotRequest(G, CAPTIONS[2], seed=5))
    assert torch.equal(f1, f2)


def test_fork_and_truncate(story):
    fork = story.fork()
    assert fork.story_id != story.story_id and fork.num_shots == story.num_shots
    assert story.truncate(1).num_shots == 1 and story.num_shots == 2
    with pytest.raises(ValueError, match="roll back to shot 5"):
        story.truncate(5)


def test_bad_requests_and_foreign_states(engine, story):
    with pytest.raises(ValueError, match="caption is empty"):
        ShotRequest(G, "   ")
    foreign = StoryState("someothermodel", story.geometry, story.shots)
    with pytest.raises(ValueError, match="not the loaded model"):
        engine.generate_shot(foreign, ShotRequest(G, "x"))
    with pytest.raises(ValueError, match="4k\\+1"):
        engine.new_story(story.geometry.replace(frames_per_shot=20))
    with pytest.raises(ValueError, match="divisible by 16"):
        engine.new_story(story.geometry.replace(width=40))


def test_engine_latent_grid_follows_a_vae_of_another_stride():
    """A 4x VAE gives the engine a latent grid twice as fine; stories of the other grid are refused by name."""
    from shotstream_core.vae import VAEConfig, WanVAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_engine(preset="micro", device="cpu")
    z_dim = base.vae.config.z_dim
    vae4 = WanVAE(VAEConfig(dim=4, z_dim=z_dim, dim_mult=(1, 2, 2), num_res_blocks=1,
                            temporal_downsample=(True, True), latent_mean=None, latent_std=None))
    eng4 = type(base)(base.dit, vae4, base.prompts.encoder, base.preset, base.model_id)
    geo8, geo4 = base.geometry, eng4.geometry
    assert (geo4.latent_height, geo4.latent_width) == (2 * geo8.latent_height, 2 * geo8.latent_width)
    assert base.geometry.spatial_stride == 8  # the base engine's preset is left as it was
    state, frames = eng4.generate_shot(eng4.new_story(geo8), ShotRequest(G, CAPTIONS[0], seed=3))
    assert state.geometry.spatial_stride == 4
    assert frames.shape == (geo8.frames_per_shot, geo8.height, geo8.width, 3)
    state, _ = eng4.generate_shot(state, ShotRequest(G, CAPTIONS[1], seed=4))  # history encoded on the 4x grid
    assert state.num_shots == 2
    with pytest.raises(ValueError, match="load the VAE it was made with"):
        base.generate_shot(state, ShotRequest(G, CAPTIONS[2]))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_engine_runs_and_stays_near_fp32(story, dtype):
    """The node's precision choice: a bf16/fp16 engine tells the same story as fp32, to rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = load_engine(preset="micro", device="cpu", dtype=dtype)
    assert half.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    again = half.generate_story(G, CAPTIONS[:2], seeds=[11, 12])
    assert again.frames().shape == story.frames().shape
    assert float((again.frames() - story.frames()).abs().mean()) < 0.03
