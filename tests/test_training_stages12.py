"""VAE stage, pre-encoding, stage 1 teacher, ODE pairs, stage 2 (micro preset): data layout, the context
rule, and an overfit test per stage (loss over a fixed small batch goes down clearly)."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shotstream_core.config import get_preset
from shotstream_core.context import plan_context, select_frame_indices
from shotstream_core.model import CausalWanDiT, WanDiT, block_causal_mask
from shotstream_core.schedule import FlowSchedule
from shotstream_core.vae import WanVAE, get_vae_config, load_vae
from training.common import Dist

PRESET = get_preset("micro")
GEO, SAMPLER, DIT = PRESET.geometry, PRESET.sampler, PRESET.dit
FC = SAMPLER.context_frames



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3 Story World stories (1-3 shots) rendered at micro size, a random micro VAE, pre-encoded."""
    from training.data import write_training_set
    from training.preencode import PreencodeConfig, preencode
    from training.vae_stage import save_vae

    root = tmp_path_factory.mktemp("s12")
    write_training_set(root / "data", 3, GEO, 1, 3)
    torch.manual_seed(0)
    save_vae(WanVAE("micro"), root / "vae.safetensors")
    cfg = PreencodeConfig(out_dir=str(root / "latents"), data_dir=str(root / "data"), preset="micro",
                          vae_path=str(root / "vae.safetensors"), num_stories=3, shard_size=2)
    summary = preencode(cfg, Dist())
    assert summary["stories"] == 3 and summary["shots"] == 6
    return root


def overfit(params, loss_fn, steps=30, lr=3e-3):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


# --- VAE stage --------------------------------------------------------------------------------------

def test_vae_overfits_a_fixed_clip_batch():
    from training.storyworld.render import render_story
    from training.storyworld.world import make_split
    from training.vae_stage import VAEAutoencoder, sample_clips

    frames, _ = render_story(make_split("train", 1, num_shots=1)[0], GEO)
    shots = torch.from_numpy(frames[None])  # [1, F, H, W, 3]
    clips = sample_clips(shots, [0, 0], 5, 16, torch.Generator().manual_seed(0))
    assert clips.shape == (2, 3, 5, 16, 16) and clips.min() >= -1 and clips.max() <= 1
    torch.manual_seed(0)
    model = VAEAutoencoder(WanVAE("micro"), sample_latent=False)
    eps = torch.zeros(2, 16, 2, 2, 2)
    losses = overfit(model.parameters(), lambda: (model(clips, eps)[0] - clips).abs().mean(), steps=40)
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_vae_latent_statistics_normalise_to_unit_scale():
    from training.vae_stage import latent_statistics

    torch.manual_seed(0)
    vae = WanVAE("micro").eval()
    shots = torch.randint(0, 256, (2, 5, 32, 32, 3), dtype=torch.uint8)
    stats = latent_statistics(vae, shots)
    assert set(stats) == {"latent_mean", "latent_std"}
    assert torch.equal(vae.latent_mean, torch.zeros(16))  # restored after measuring
    for name, value in stats.items():
        getattr(vae, name).copy_(value)
    z = vae.encode(shots.permute(0, 4, 1, 2, 3).float() / 127.5 - 1)
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert torch.allclose(per_channel.std(1), torch.ones(16), atol=1e-3)


def test_first_frame_statistics_put_every_latent_frame_at_unit_scale():
    """With first_frame_stats, the first latent frame (one pixel frame, coded alone) is fitted apart: after
    fitting, it and the later frames each come out at zero mean and unit spread per channel, where one
    set of statistics leaves the first frame off both. Decoding is unchanged by the statistics."""
    from shotstream_core.vae import get_vae_config
    from training.vae_stage import latent_statistics, neutralise_stats

    torch.manual_seed(0)
    vae = WanVAE(get_vae_config("micro").replace(first_frame_stats=True)).eval()
    shots = torch.randint(0, 256, (3, 9, 32, 32, 3), dtype=torch.uint8)
    video = shots.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    raw = vae.encode(video)  # statistics still 0 / 1
    stats = latent_statistics(vae, shots)
    assert set(stats) == {"latent_mean", "latent_std", "first_latent_mean", "first_latent_std"}
    assert torch.equal(vae.first_latent_std, torch.ones(16))  # restored after measuring
    for name, value in stats.items():
        getattr(vae, name).copy_(value)
    z = vae.encode(video)
    for frames in (z[:, :, :1], z[:, :, 1:]):
        per_channel = frames.transpose(0, 1).flatten(1)
        assert per_channel.mean(1).abs().max() < 1e-4
        assert torch.allclose(per_channel.std(1), torch.ones(16), atol=1e-3)
    # one set over every frame leaves the first frame off unit scale
    pooled = raw.transpose(0, 1).flatten(1)
    first = ((raw[:, :, :1] - pooled.mean(1).view(1, -1, 1, 1, 1)) / pooled.std(1).view(1, -1, 1, 1, 1))
    assert first.transpose(0, 1).flatten(1).mean(1).abs().max() > 0.05
    decoded = vae.decode(z)
    neutralise_stats(vae)
    assert torch.allclose(decoded, vae.decode(raw), atol=1e-5)  # the statistics cancel out of decoding


# --- pre-encoding and the context rule --------------------------------------------------------------------

def test_longer_shots_are_subsampled_over_their_whole_length_and_shorter_ones_refused():
    """A real shot longer than the preset's frames per shot keeps its start, end and even spacing."""
    from training.data import shot_frames

    n = GEO.frames_per_shot

    class Clip:  # frame t of shot k is a constant image of value t
        def __init__(self, lengths):
            self.lengths, self.num_shots = lengths, len(lengths)

        def shot(self, k):
            return np.arange(self.lengths[k], dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)

    exact, double = shot_frames(Clip([n, 2 * n - 1]), GEO)
    assert exact[:, 0, 0, 0].tolist() == list(range(n))
    assert double.shape == exact.shape and double[:, 0, 0, 0].tolist() == list(range(0, 2 * n - 1, 2))
    with pytest.raises(ValueError, match=f"needs {n}"):
        shot_frames(Clip([n - 1]), GEO)


def test_preencoded_store_matches_the_vae_and_the_prompt_builder(store):
    from shotstream_core.loading import make_text_encoder
    from shotstream_core.text import build_shot_prompt
    from training.data import LatentStoryDataset, read_clips, shot_frames

    ds = LatentStoryDataset(store / "latents")
    vae = load_vae(store / "vae.safetensors")
    enc = make_text_encoder(PRESET.text_encoder, None, DIT.text_dim, DIT.text_len)
    (rec, clip), = list(read_clips(store / "data", 3, GEO))[2:3]
    story = ds[2]
    assert story.name == rec.name and story.num_shots == clip.num_shots == 3
    shots = shot_frames(clip, GEO)
    video = torch.from_numpy(np.stack(shots)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    torch.testing.assert_close(torch.stack(story.shot_latents), vae.encode(video), atol=1e-5, rtol=1e-5)
    # detail maps: one value per latent cell, from the shot's pixels
    from training.detail import latent_detail_map
    stride_t, stride_s = vae.config.temporal_stride, vae.config.spatial_stride
    torch.testing.assert_close(torch.stack(story.detail), latent_detail_map(video, stride_t, stride_s, 3))
    assert story.detail[0].shape == story.shot_latents[0].shape[1:]
    # frame latents: each frame alone, and present exactly where the context rule can look
    needed = {(s, i) for k in range(1, 3) for s, i in plan_context([GEO.frames_per_shot] * k, FC).picks}
    for s in range(3):
        rows = story.frame_encoded[s].nonzero().flatten().tolist()
        assert set(rows) == {i for t, i in needed if t == s}
        if rows:
            alone = vae.encode_frames(torch.from_numpy(shots[s][rows]).permute(0, 3, 1, 2).float() / 127.5 - 1)
            torch.testing.assert_close(story.frame_latents[s][rows], alone, atol=1e-5, rtol=1e-5)
    prompts = [build_shot_prompt(clip.global_caption, t, i, enc.count_tokens, enc.max_tokens)
               for i, t in enumerate(clip.shot_captions)]
    assert story.meta["prompts"] == prompts and "shot2:" in prompts[2]
    for p, f in zip(prompts, story.prompt_features):
        torch.testing.assert_close(f, enc.encode([p])[0])


def test_history_follows_the_context_rule(store):
    from training.data import LatentStoryDataset, history_inputs

    ds = LatentStoryDataset(store / "latents")
    story = ds[2]
    ctx0, flags0 = ds.history(story, 0, FC)
    assert flags0 == [0] * FC + [1] and not ctx0.any()  # shot 0: zero context, flag 0, shot flag 1
    ctx2, flags2 = ds.history(story, 2, FC)
    assert flags2 == [0, 0, 0, 1, 1, 1, 2]
    picks = select_frame_indices(0, GEO.frames_per_shot - 1, 3)
    expected = torch.stack([story.frame_latents[s][i] for s in (0, 1) for i in picks], dim=1)
    assert torch.equal(ctx2, expected)
    with pytest.raises(ValueError, match="latent_shape"):
        history_inputs([], [], FC)


# --- stage 1 ------------------------------------------------------------------------------------------

def test_teacher_batch_flags_prompts_and_dropout(store):
    from training.data import LatentStoryDataset
    from training.stage1_teacher import make_batch

    ds = LatentStoryDataset(store / "latents")
    b = make_batch(ds, [(2, 0), (2, 2)], FC, DIT.text_len)
    f = GEO.latent_frames
    assert b.flags[0].tolist() == [0] * FC + [1] * f
    assert b.prompt_ids[0].tolist() == [0] * (FC + f)  # one prompt: everyone reads it
    assert b.prompt_ids[1].tolist() == [0, 0, 0, 1, 1, 1] + [2] * f  # each frame its own shot's prompt
    assert b.text.shape[:2] == (2, 3)
    dropped = make_batch(ds, [(2, 2)], FC, DIT.text_len, torch.Generator().manual_seed(0), 1.0, 1.0, "zeros")
    assert not dropped.context.any() and not dropped.text.any()
    neg = make_batch(ds, [(2, 2)], FC, DIT.text_len, torch.Generator().manual_seed(0), 0.0, 1.0)
    n = ds.negative.shape[0]
    assert all(torch.equal(neg.text[0, j, :n], ds.negative) for j in range(3))  # CFG's unconditional input
    assert not neg.text[0, :, n:].any()
    # a dropped context is a first shot's (shotstream.md section 5: the shot flag is the last context flag + 1),
    # as stages 3-4 and the engine see it, with the target's own caption alone
    first_shot = make_batch(ds, [(2, 2)], FC, DIT.text_len, torch.Generator().manual_seed(0), 1.0, 0.0)
    assert first_shot.flags[0].tolist() == [0] * FC + [1] * f
    assert first_shot.prompt_ids[0].tolist() == [0] * (FC + f) and first_shot.text.shape[1] == 1
    own = ds[2].prompt_features[2]
    assert torch.equal(first_shot.text[0, 0, : own.shape[0]], own)


def test_a_dropped_history_is_a_first_shot_for_every_stage():
    """One rule for stage 1's context dropout and stages 3-4's history dropout (and their shot 0)."""
    from training.data import first_shot_inputs

    prompts = [torch.full((4, 8), float(i)) for i in range(3)]  # shots 0..2
    context, flags, shot_flag, own = first_shot_inputs((16, 2, 2), 6, prompts, torch.bfloat16)
    assert context.shape == (16, 6, 2, 2) and context.dtype == torch.bfloat16 and not context.any()
    assert flags == [0] * 6 and shot_flag == 1  # the last context flag + 1
    assert len(own) == 1 and torch.equal(own[0], prompts[2])  # shot 2's own prompt, alone


def test_teacher_overfits_a_fixed_batch(store):
    from training.common import step_generator
    from training.data import LatentStoryDataset
    from training.stage1_teacher import make_batch, teacher_loss

    ds = LatentStoryDataset(store / "latents")
    batch = make_batch(ds, ds.targets[:4], FC, DIT.text_len)
    schedule = FlowSchedule(SAMPLER.num_train_timesteps, SAMPLER.shift)
    torch.manual_seed(0)
    model = WanDiT(DIT)
    loss_fn = lambda: teacher_loss(model, schedule, batch, step_generator(0, 0), "cpu", SAMPLER.rope_shot_phase)
    losses = overfit(model.parameters(), loss_fn, steps=30)
    assert losses[-1] < 0.5 * losses[0], losses[::6]


def test_diagnose_reads_flow_error_and_text_gain(store):
    """An oracle that knows x0 scores zero error; a model without a text path gains nothing from captions,
    and a random one does (so text_gain can fail both ways)."""
    from training.data import LatentStoryDataset
    from training.diagnose import diagnose, fixed_targets
    from training.stage1_teacher import make_batch

    ds = LatentStoryDataset(store / "latents")
    sigmas = (0.5, 0.9)
    torch.manual_seed(0)
    model = WanDiT(DIT).eval()
    random_scores = diagnose(model, ds, PRESET, num_targets=4, sigmas=sigmas)
    assert set(random_scores) == {"flow_mse@0.5", "char_mse@0.5", "flow_mse@0.9", "char_mse@0.9", "text_gain@0.9"}
    assert random_scores["flow_mse@0.5"] > 0.5 and random_scores["char_mse@0.5"] > 0.5  # character cells exist
    assert random_scores["text_gain@0.9"] != 0.0

    for block in model.blocks:  # cut the text path: captions can no longer change the output
        torch.nn.init.zeros_(block.cross_attn.o.weight)
        torch.nn.init.zeros_(block.cross_attn.o.bias)
    assert diagnose(model, ds, PRESET, num_targets=4, sigmas=sigmas)["text_gain@0.9"] == pytest.approx(0.0, abs=1e-6)

    schedule = FlowSchedule(SAMPLER.num_train_timesteps, SAMPLER.shift)

    class Oracle(torch.nn.Module):  # v = (x_t - x0) / sigma = noise - x0, with x0 looked up by the context
        def forward(self, seq, t, text, flags, prompt_ids, shot_phase):
            x0 = make_batch(ds, fixed_targets(ds, 4), FC, DIT.text_len).x0
            sigma = schedule.sigma(t).view(-1, 1, 1, 1, 1)
            fc = seq.shape[2] - x0.shape[2]
            return torch.cat([seq[:, :, :fc], (seq[:, :, fc:] - (1 - sigma) * x0) / sigma - x0], dim=2)

    oracle_scores = diagnose(Oracle(), ds, PRESET, num_targets=4, sigmas=sigmas)
    assert oracle_scores["flow_mse@0.5"] < 1e-6 and oracle_scores["char_mse@0.9"] < 1e-6
    # by block: the blocks' errors make up the whole (equal-sized blocks), and each can be told apart
    scores = diagnose(model, ds, PRESET, num_targets=4, sigmas=sigmas, by_block=True, by_frame=True)
    blocks = [scores[f"flow_mse@0.5:block{b}"] for b in range(GEO.latent_frames // SAMPLER.block_frames)]
    assert len(blocks) > 1 and sum(blocks) / len(blocks) == pytest.approx(scores["flow_mse@0.5"], rel=1e-4)
    assert len(set(blocks)) == len(blocks)
    # by frame: each block's frames make up the block
    frames = [scores[f"flow_mse@0.5:frame{f}"] for f in range(GEO.latent_frames)]
    first_block = frames[:SAMPLER.block_frames]
    assert sum(first_block) / len(first_block) == pytest.approx(blocks[0], rel=1e-3, abs=1e-4)
    x0 = make_batch(ds, fixed_targets(ds, 4), FC, DIT.text_len).x0
    assert scores["latent_std:frame0"] == pytest.approx(x0[:, :, 0].std().item(), abs=1e-4)


def test_context_gain_reads_how_much_of_the_error_the_history_removes(store, tmp_path):
    """A model right only when it sees the history gains 1, one that ignores it gains 0; hidden-place
    targets are the later shots of the stories whose truth hides the place."""
    import json
    import shutil

    from training.data import LatentStoryDataset
    from training.diagnose import context_gain, hidden_place_targets
    from training.stage1_teacher import make_batch

    ds = LatentStoryDataset(store / "latents")
    later = [(i, k) for i, k in ds.targets if k > 0]
    assert later
    schedule = FlowSchedule(SAMPLER.num_train_timesteps, SAMPLER.shift)
    x0 = make_batch(ds, later, FC, DIT.text_len).x0

    class Oracle(torch.nn.Module):  # the exact flow, scaled by `trust` where the history is there, else by `blind`
        def __init__(self, trust, blind):
            super().__init__()
            self.trust, self.blind = trust, blind

        def forward(self, seq, t, text, flags, prompt_ids, shot_phase):
            fc = seq.shape[2] - x0.shape[2]
            sigma = schedule.sigma(t).view(-1, 1, 1, 1, 1)
            flow = (seq[:, :, fc:] - (1 - sigma) * x0) / sigma - x0
            sees = (seq[:, :, :fc].abs().amax(dim=(1, 2, 3, 4)) > 0).view(-1, 1, 1, 1, 1)
            return torch.cat([seq[:, :, :fc], flow * torch.where(sees, self.trust, self.blind)], dim=2)

    sigmas = (0.5, 0.9)
    assert context_gain(Oracle(1.0, 0.0), ds, PRESET, later, sigmas) == {"context_gain@0.5": 1.0, "context_gain@0.9": 1.0}
    assert context_gain(Oracle(0.5, 0.5), ds, PRESET, later, sigmas) == {"context_gain@0.5": 0.0, "context_gain@0.9": 0.0}
    assert context_gain(Oracle(1.0, 0.0), ds, PRESET, [], sigmas) == {}

    assert hidden_place_targets(ds) == [] or all(k > 0 for _, k in hidden_place_targets(ds))
    copy = tmp_path / "latents"
    shutil.copytree(store / "latents", copy)
    data = tmp_path / "data"
    shutil.copytree(store / "data", data)
    index = json.loads((copy / "index.json").read_text())
    for story in index["stories"]:  # point the copy at the copied data
        story["json_path"] = str(data / Path(story["json_path"]).name)
    (copy / "index.json").write_text(json.dumps(index))
    pick = max(range(len(index["stories"])), key=lambda i: index["stories"][i]["num_shots"])
    for i, story in enumerate(index["stories"]):
        other = Path(story["json_path"]).with_suffix(".truth.json")
        t = json.loads(other.read_text())
        t["story"]["hidden"] = {"kind": "place", "value": t["story"]["place"]} if i == pick else None
        other.write_text(json.dumps(t))
    assert index["stories"][pick]["num_shots"] > 1
    assert hidden_place_targets(LatentStoryDataset(copy)) == [(pick, k) for k in range(1, index["stories"][pick]["num_shots"])]


def test_diagnose_command_line_compares_checkpoints_and_samples(store, tmp_path, capsys):
    from shotstream_core.loading import save_dit
    from training.diagnose import main

    torch.manual_seed(0)
    paths = [str(save_dit(WanDiT(DIT), tmp_path / f"t{i}.safetensors")) for i in range(2)]
    argv = [*paths, "--latent-dir", str(store / "latents"), "--preset", "micro", "--targets", "4"]
    results = main(argv + ["--sample-shots", "2", "--vae", str(store / "vae.safetensors"), "--steps", "2",
                           "--sample-sheet", str(tmp_path / "sheets")])
    assert list(results) == paths and results[paths[0]] != results[paths[1]]
    sheets = sorted((tmp_path / "sheets").glob("*.png"))  # one per teacher: 2 samples, each above its truth
    assert [p.stem.split("_")[-1] for p in sheets] == ["t0", "t1"]
    assert Image.open(sheets[0]).height > 4 * GEO.height
    assert all(0.0 <= r["sample_adherence"] <= 1.0 and 0.0 <= r["sample_spurious_openings"] <= 1.0
               and r["sample_opening_jump"] >= 0.0 for r in results.values())
    def refused(args, says):  # a usage error: exit status 2 and a message that names the fix
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and says in capsys.readouterr().err

    refused(argv + ["--sample-shots", "2"], "give --vae")  # nothing to decode the samples with
    refused(argv + ["--sample-sheet", str(tmp_path / "none")], "give --sample-shots")  # no samples drawn
    vae_path = str(store / "vae.safetensors")
    read = main(["--vaes", vae_path, "--shots", "2", "--preset", "micro"])
    assert list(read) == [vae_path] and len(read[vae_path]["latent_adjacent_corr"]) == GEO.latent_frames - 1
    refused([paths[0], "--vaes", vae_path, "--preset", "micro"], "one of them")  # DiT weights and VAEs at once
    probed = main(["--vaes", vae_path, "--shots", "2", "--preset", "micro", "--probe", "8", "--probe-steps", "2"])
    assert set(probed[vae_path]["probe"]) == {"truth", "pooled", "latent", "decoded", "counts"}
    assert all(0.0 <= probed[vae_path]["probe"][form]["shape"]["all"] <= 1.0 for form in ("truth", "latent"))
    refused([*paths, "--latent-dir", str(store / "latents"), "--preset", "micro", "--probe", "8"],
            "give --vaes")  # a probe reads VAEs, not DiT weights


class _FakeVAE:
    """Latents are the video itself (so their stationarity is the video's); optionally a start-up
    transient on the first latent frames, or a first decoded frame shifted in colour."""
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, transient: int = 0, first_frame_tint: float = 0.0):
        self.transient, self.tint = transient, first_frame_tint

    def encode(self, video):
        z = video.clone()
        if self.transient:
            z[:, :, :self.transient] = torch.randn(z[:, :, :self.transient].shape, generator=torch.Generator().manual_seed(0))
        return z

    def decode(self, z):
        out = z.clone()
        out[:, :, 0] = (out[:, :, 0] + self.tint).clamp(-1, 1)
        return out


def test_diagnose_vae_reads_the_single_frame_path_and_the_encoder_transient():
    """A perfect VAE reconstructs at high PSNR with the truth's own opening jump and the truth's latent
    correlations; a tinted first frame shows as a low first-frame PSNR and a large opening jump; a start-up
    transient in the latents as low correlations over the first latent frames (each measure can fail)."""
    from training.diagnose import diagnose_vae, held_out_shots

    shots = held_out_shots(PRESET, 3)
    assert shots.shape == (3, GEO.frames_per_shot, GEO.height, GEO.width, 3) and shots.dtype == torch.uint8
    perfect = diagnose_vae(_FakeVAE(), shots)
    assert perfect["psnr_first_db"] > 60 and perfect["psnr_rest_db"] > 60
    assert perfect["opening_jump"] == pytest.approx(perfect["truth_opening_jump"], abs=0.01)
    assert len(perfect["latent_adjacent_corr"]) == GEO.frames_per_shot - 1 and min(perfect["latent_adjacent_corr"]) > 0.8

    tinted = diagnose_vae(_FakeVAE(first_frame_tint=0.3), shots)
    assert tinted["psnr_first_db"] < 25 and tinted["psnr_rest_db"] > 60
    assert tinted["opening_jump"] > 3 * max(perfect["opening_jump"], 1.0)

    transient = diagnose_vae(_FakeVAE(transient=3), shots)["latent_adjacent_corr"]
    assert max(transient[:3]) < 0.3 and min(transient[3:]) > 0.8


def test_opening_jump_ratio_reads_a_first_frame_unlike_the_rest():
    """The sample check's measure: a slowly panning shot has no opening jump and no cut at frame 1; the
    same shot with frame 0 recoloured has a large jump that the analyser reads as a cut at frame 1."""
    from training.diagnose import held_out_shots, opening_jump_ratio
    from training.storyworld.analyse import detect_cuts

    shot = held_out_shots(PRESET, 1)[0].numpy()  # [F, H, W, 3] uint8
    assert opening_jump_ratio(shot) < 3 and 1 not in detect_cuts(shot)
    tinted = shot.copy()
    tinted[0] = (tinted[0].astype(int) + 60).clip(0, 255).astype("uint8")
    assert opening_jump_ratio(tinted) > 5 and 1 in detect_cuts(tinted)


def test_teacher_loss_is_zero_weight_at_pure_noise():
    schedule = FlowSchedule()
    w = schedule.training_weight(torch.tensor([1000.0, 500.0]))
    assert w[0] == pytest.approx(0.0, abs=1e-6) and w[1] > 1


def test_uniform_weighting_trains_pure_noise(store):
    """At t=1000 the bell weighting gives no loss (and no gradient); "uniform" trains it like any t."""
    from training.data import LatentStoryDataset
    from training.stage1_teacher import make_batch, teacher_loss

    ds = LatentStoryDataset(store / "latents")
    batch = make_batch(ds, ds.targets[:2], FC, DIT.text_len)
    torch.manual_seed(0)
    model = WanDiT(DIT)

    class PureNoise(FlowSchedule):  # every training draw at t = 1000
        def sample_training_t(self, shape, low=0, high=None, generator=None):
            return torch.full(shape, float(self.num_train_timesteps))

    schedule = PureNoise(SAMPLER.num_train_timesteps, SAMPLER.shift)
    loss = {w: teacher_loss(model, schedule, batch, torch.Generator().manual_seed(0), "cpu",
                            SAMPLER.rope_shot_phase, w) for w in ("bell", "uniform")}
    assert float(loss["bell"]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss["uniform"]) > 0.1


def _batch_with_detail_at(cell, c=16, f=3, h=4, w=4, detail=True):
    """A one-sample TeacherBatch whose detail map is high at one latent cell (f, y, x) and flat elsewhere."""
    from training.stage1_teacher import TeacherBatch

    d = torch.full((1, f, h, w), 0.05)
    d[(0, *cell)] = 2.0
    return TeacherBatch(torch.zeros(1, c, FC, h, w), torch.randn(1, c, f, h, w, generator=torch.Generator().manual_seed(1)),
                        torch.zeros(1, FC + f, dtype=torch.long), torch.zeros(1, FC + f, dtype=torch.long),
                        torch.zeros(1, 1, 4, DIT.text_dim), torch.zeros(1, 1, 4, DIT.text_dim), d if detail else None)


def test_detail_weight_makes_errors_on_small_things_cost_more():
    """Two predictions with the same plain MSE: one wrong only on the detail cell, one wrong a little
    everywhere. Unweighted they cost the same; with detail_weight the first costs far more."""
    from training.stage1_teacher import teacher_loss

    schedule = FlowSchedule(SAMPLER.num_train_timesteps, SAMPLER.shift)
    batch = _batch_with_detail_at((1, 2, 3))
    seed = 5

    def target():  # the flow target teacher_loss will draw with the same generator
        g = torch.Generator().manual_seed(seed)
        schedule.sample_training_t((1,), generator=g)
        return schedule.flow_target(batch.x0, torch.randn(batch.x0.shape, generator=g))

    on_cell = torch.zeros_like(batch.x0)
    on_cell[:, :, 1, 2, 3] = 4.0
    spread = torch.full_like(batch.x0, 4.0 / (batch.x0[0, 0].numel() ** 0.5))  # same squared error in total

    def loss(error, detail_weight):
        pred = lambda *a, **k: torch.cat([torch.zeros_like(batch.context), target() + error], dim=2)
        return float(teacher_loss(pred, schedule, batch, torch.Generator().manual_seed(seed), "cpu",
                                  SAMPLER.rope_shot_phase, "uniform", detail_weight))

    assert loss(on_cell, 0.0) == pytest.approx(loss(spread, 0.0), rel=1e-4)
    assert loss(on_cell, 4.0) > 3 * loss(spread, 4.0)
    assert loss(torch.zeros_like(on_cell), 4.0) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="re-run training.preencode"):
        teacher_loss(lambda *a, **k: None, schedule, _batch_with_detail_at((0, 0, 0), detail=False),
                     torch.Generator().manual_seed(0), "cpu", SAMPLER.rope_shot_phase, "uniform", 2.0)


def test_first_frame_weight_makes_errors_on_the_first_latent_frame_cost_more():
    """The same error on the shot's first latent frame or on its second: equal unweighted, the first
    costing first_frame_weight times more (per unit of weight) with the weight on."""
    from training.stage1_teacher import teacher_loss

    schedule = FlowSchedule(SAMPLER.num_train_timesteps, SAMPLER.shift)
    batch = _batch_with_detail_at((1, 2, 3), detail=False)
    seed = 3

    def target():
        g = torch.Generator().manual_seed(seed)
        schedule.sample_training_t((1,), generator=g)
        return schedule.flow_target(batch.x0, torch.randn(batch.x0.shape, generator=g))

    def loss(frame, first_frame_weight):
        error = torch.zeros_like(batch.x0)
        error[:, :, frame] = 1.0
        pred = lambda *a, **k: torch.cat([torch.zeros_like(batch.context), target() + error], dim=2)
        return float(teacher_loss(pred, schedule, batch, torch.Generator().manual_seed(seed), "cpu",
                                  SAMPLER.rope_shot_phase, "uniform", 0.0, first_frame_weight))

    assert loss(0, 1.0) == pytest.approx(loss(1, 1.0), rel=1e-5)
    assert loss(0, 4.0) == pytest.approx(4 * loss(1, 4.0), rel=1e-5)
    assert loss(0, 4.0) > loss(0, 1.0)  # a weighted mean: the first frame's share of the loss grows


# --- ODE pairs and stage 2 --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ode_run(store):
    from shotstream_core.loading import save_dit
    from training.ode_pairs import ODEConfig, generate

    torch.manual_seed(0)
    save_dit(WanDiT(DIT), store / "teacher.safetensors")
    cfg = ODEConfig(out_dir=str(store / "ode"), latent_dir=str(store / "latents"), preset="micro",
                    teacher_path=str(store / "teacher.safetensors"), batch_size=3, shard_size=4, steps=50,
                    guidance=2.0)
    summary = generate(cfg, Dist())
    return store, summary


def test_ode_pairs_hold_the_teacher_trajectory(ode_run):
    from training.common import load_dit, step_generator
    from training.data import LatentStoryDataset
    from training.ode_pairs import ODEPairs, sample_targets

    store, summary = ode_run
    pairs = ODEPairs(store / "ode")
    assert summary["pairs"] == len(pairs) == 6
    f, h, w = GEO.latent_frames, GEO.latent_height, GEO.latent_width
    assert pairs.latents.shape == (6, 5, 16, f, h, w)
    expected_t = FlowSchedule().warp(SAMPLER.denoising_steps).tolist() + [0.0]
    assert pairs.timesteps.tolist() == pytest.approx(expected_t)
    assert pairs.timesteps[:4].tolist() == pytest.approx([1000.0, 957.93, 888.89, 737.59], abs=0.01)
    # the first level is the starting noise; the last is the 50-step CFG sample
    ds = LatentStoryDataset(store / "latents")
    targets = [tuple(t) for t in pairs.target[:3].tolist()]
    noise = torch.randn(3, 16, f, h, w, generator=step_generator(0 * 100003, 0, 0, stream=7))
    assert torch.equal(pairs.latents[:3, 0], noise)
    teacher = load_dit(store / "teacher.safetensors", WanDiT, "teacher", "cpu", frozen=True)
    x0, _, batch = sample_targets(teacher, ds, targets, PRESET, 2.0, 50, 0, "cpu")
    torch.testing.assert_close(pairs.latents[:3, 4], x0)
    assert torch.equal(pairs.flags[:3], batch.flags) and torch.equal(pairs.context[:3], batch.context)


def test_ode_history_guidance_changes_later_shots_only(ode_run):
    """With history guidance the teacher's later-shot samples move; a first shot, whose history-free inputs
    are its own, samples exactly as without it."""
    from training.common import load_dit
    from training.data import LatentStoryDataset
    from training.ode_pairs import sample_targets

    store, _ = ode_run
    ds = LatentStoryDataset(store / "latents")
    first = [t for t in ds.targets if t[1] == 0][:1]
    later = [t for t in ds.targets if t[1] > 0][:1]
    assert first and later
    teacher = load_dit(store / "teacher.safetensors", WanDiT, "teacher", "cpu", frozen=True)
    for targets, moves in ((first, False), (later, True)):
        plain, _, _ = sample_targets(teacher, ds, targets, PRESET, 2.0, 8, 0, "cpu")
        guided, _, _ = sample_targets(teacher, ds, targets, PRESET, 2.0, 8, 0, "cpu", history_guidance=3.0)
        assert (not torch.allclose(plain, guided, atol=1e-4)) == moves, targets


def test_block_levels_are_constant_inside_blocks():
    from training.stage2_ode import block_levels

    lv = block_levels(8, torch.arange(7) // 3, 5, torch.Generator().manual_seed(0))
    assert lv.shape == (8, 7) and lv.max() < 5
    assert (lv[:, 0:3] == lv[:, :1]).all() and (lv[:, 3:6] == lv[:, 3:4]).all()


def test_ode_batch_levels_follow_a_first_block_of_one_frame(ode_run):
    """With the first latent frame as a block of its own, frame 0 draws its noise level apart from frames 1-3."""
    from training.data import LatentStoryDataset
    from training.ode_pairs import ODEPairs
    from training.stage2_ode import ode_batch

    store, _ = ode_run
    pairs, ds = ODEPairs(store / "ode"), LatentStoryDataset(store / "latents")
    sampler = dataclasses.replace(SAMPLER, first_block_frames=1)
    t = torch.cat([ode_batch(pairs, ds, [0, 1, 2, 3, 4, 5], sampler, DIT.text_len,
                             torch.Generator().manual_seed(s))[1] for s in range(8)])  # [48, 6]
    for f0, f1 in sampler.block_spans(GEO.latent_frames):  # [(0, 1), (1, 4), (4, 6)]
        assert (t[:, f0:f1] == t[:, f0:f0 + 1]).all()
    assert (t[:, 0] != t[:, 1]).any()  # uniform blocks of 3 would tie frame 0 to frames 1-2


def test_stage2_overfits_a_fixed_batch(ode_run):
    from training.common import load_dit
    from training.data import LatentStoryDataset
    from training.ode_pairs import ODEPairs
    from training.stage2_ode import ode_batch, ode_loss

    store, _ = ode_run
    pairs, ds = ODEPairs(store / "ode"), LatentStoryDataset(store / "latents")
    batch = ode_batch(pairs, ds, [0, 1, 2, 3], SAMPLER, DIT.text_len, torch.Generator().manual_seed(1))
    t = batch[1]
    assert (t > 0).any()
    mask = block_causal_mask(FC, SAMPLER.block_ids(GEO.latent_frames),
                             DIT.tokens_per_frame(GEO.latent_height, GEO.latent_width))
    schedule = FlowSchedule(SAMPLER.num_train_timesteps, SAMPLER.shift)
    student = load_dit(store / "teacher.safetensors", CausalWanDiT, "teacher", "cpu")
    assert isinstance(student, CausalWanDiT)
    losses = overfit(student.parameters(), lambda: ode_loss(student, schedule, batch, mask, "cpu",
                                                            SAMPLER.rope_shot_phase), steps=30)
    assert losses[-1] < 0.5 * losses[0], losses[::6]


def test_stage2_loss_ignores_clean_frames(ode_run):
    """Frames at t = 0 carry no loss: corrupting their target changes nothing."""
    from training.common import load_dit
    from training.data import LatentStoryDataset
    from training.ode_pairs import ODEPairs
    from training.stage2_ode import ode_batch, ode_loss

    store, _ = ode_run
    pairs, ds = ODEPairs(store / "ode"), LatentStoryDataset(store / "latents")
    batch = list(ode_batch(pairs, ds, [0, 1], SAMPLER, DIT.text_len, torch.Generator().manual_seed(3)))
    batch[1][:, :3] = 0.0  # make the first block clean in both samples
    student = load_dit(store / "teacher.safetensors", CausalWanDiT, "teacher", "cpu")
    schedule = FlowSchedule()
    mask = block_causal_mask(FC, SAMPLER.block_ids(GEO.latent_frames),
                             DIT.tokens_per_frame(GEO.latent_height, GEO.latent_width))
    base = ode_loss(student, schedule, tuple(batch), mask, "cpu", SAMPLER.rope_shot_phase)
    batch[2] = batch[2].clone()
    batch[2][:, :, :3] += 5.0
    assert torch.equal(ode_loss(student, schedule, tuple(batch), mask, "cpu", SAMPLER.rope_shot_phase), base)
    batch[2][:, :, 3:] += 5.0
    assert ode_loss(student, schedule, tuple(batch), mask, "cpu", SAMPLER.rope_shot_phase) > base


# --- a DiT shape other than the preset's (the teacher's `dit:` changes) -------------------------------

def test_a_finer_patch_teacher_carries_its_shape_through_every_stage(store, tmp_path):
    """The teacher alone chooses the architecture (here 1x1 patches: 4x the preset's tokens a frame); ODE
    pairs, stage 2 and stage 3 take it from its weights, and the engine runs the student in the preset's
    geometry."""
    import warnings

    from shotstream_core.engine import ShotRequest
    from shotstream_core.loading import ModelLoadError, load_dit_state, load_engine, save_dit
    from training import ode_pairs, stage1_teacher, stage2_ode, stage3_dmd

    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    latents = f"latent_dir={store / 'latents'}"

    def run(module, stage, out, *extra):
        argv = ["--config", str(configs / f"micro-{stage}.yaml"), "--set", f"out_dir={tmp_path / out}",
                "--set", latents]
        for item in extra:
            argv += ["--set", item]
        return module.main(argv)

    alone = get_preset("micro").sampler.context_frames + 1
    run(stage1_teacher, "teacher", "teacher", "max_steps=2", "sample_stories=0",
        f"dit={{patch_size: [1, 1, 1], pooled_text: true, coded_alone_frames: {alone}}}")
    teacher = tmp_path / "teacher" / "teacher.safetensors"
    _, cfg = load_dit_state(teacher)
    assert cfg.patch_size == (1, 1, 1) and cfg.tokens_per_frame(4, 4) == 4 * DIT.tokens_per_frame(4, 4)
    # nothing else changed
    assert cfg == dataclasses.replace(DIT, patch_size=(1, 1, 1), pooled_text=True, coded_alone_frames=alone)
    run(ode_pairs, "ode", "ode", f"teacher_path={teacher}", "num_pairs=4", "steps=4")
    run(stage2_ode, "stage2", "stage2", f"teacher_path={teacher}", f"ode_dir={tmp_path / 'ode'}", "max_steps=2")
    student2 = tmp_path / "stage2" / "student.safetensors"
    run(stage3_dmd, "stage3", "stage3", f"teacher_path={teacher}", f"student_path={student2}", "max_steps=2")
    student3 = tmp_path / "stage3" / "student.safetensors"
    assert load_dit_state(student2)[1] == load_dit_state(student3)[1] == cfg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load_engine(dit_path=student3, vae_path=store / "vae.safetensors", preset="micro", device="cpu")
    assert engine.preset.geometry == GEO.replace(dit_patch=(1, 1)) and engine.dit.config == cfg
    state, frames = engine.generate_shot(engine.new_story(), ShotRequest("a red circle in a meadow",
                                                                         "wide shot, the circle moves left"))
    assert state.num_shots == 1 and tuple(frames.shape) == (GEO.frames_per_shot, GEO.height, GEO.width, 3)
    # every model of the chain records the VAE of its latents, and the engine says when another one decodes;
    # the same weights in another file (a .pth in half precision, as ComfyUI repackages Wan's) are that VAE
    from safetensors.torch import load_file

    from shotstream_core.loading import VAE_KEY, _safetensors_metadata
    from shotstream_core.vae import load_vae, vae_signature

    signature = vae_signature(load_vae(store / "vae.safetensors"))
    assert all(_safetensors_metadata(f).get(VAE_KEY) == signature for f in (teacher, student2, student3))
    torch.save({k: v.half() if v.is_floating_point() and "latent_" not in k else v
                for k, v in load_file(str(store / "vae.safetensors")).items()}, tmp_path / "same_vae.pth")
    for same in (store / "vae.safetensors", tmp_path / "same_vae.pth"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_engine(dit_path=student3, vae_path=same, preset="micro", device="cpu")
        assert not [w for w in caught if "latents of another VAE" in str(w.message)], same
    other = {k: v * 1.1 if k.endswith("weight") else v for k, v in load_file(str(store / "vae.safetensors")).items()}
    torch.save(other, tmp_path / "other_vae.pth")
    with pytest.warns(UserWarning, match="trained on the latents of another VAE than the VAE other_vae.pth"):
        load_engine(dit_path=student3, vae_path=tmp_path / "other_vae.pth", preset="micro", device="cpu")
    with pytest.warns(UserWarning, match="student.safetensors was trained on the latents of another VAE than a VAE "
                                         "with random weights"):
        load_engine(dit_path=student3, preset="micro", device="cpu")

    # A student of another shape than its teacher, and shape changes that the latents or text cannot
    # feed, fail before any training, naming the problem.
    save_dit(CausalWanDiT(DIT), tmp_path / "patch2.safetensors")
    with pytest.raises(ModelLoadError, match="patch-1x2x2.*patch-1x1x1"):
        run(stage3_dmd, "stage3", "bad3", f"teacher_path={teacher}", f"student_path={tmp_path / 'patch2.safetensors'}")
    # A trained teacher without the pooled-text branch or the coded-alone marker warm-starts into them (both
    # start as a no-op); any other shape change from init_from is refused.
    plain = save_dit(WanDiT(DIT), tmp_path / "plain.safetensors")
    run(stage1_teacher, "teacher", "warm", "max_steps=1", "sample_stories=0", f"init_from={plain}",
        "dit={pooled_text: true}")
    assert load_dit_state(tmp_path / "warm" / "teacher.safetensors")[1] == dataclasses.replace(DIT, pooled_text=True)
    run(stage1_teacher, "teacher", "warm2", "max_steps=1", "sample_stories=0", f"init_from={plain}",
        f"dit={{coded_alone_frames: {alone}}}")
    assert load_dit_state(tmp_path / "warm2" / "teacher.safetensors")[1] == dataclasses.replace(
        DIT, coded_alone_frames=alone)
    with pytest.raises(ValueError, match=f"coded_alone_frames 3 .*make {alone}"):
        run(stage1_teacher, "teacher", "bad4", "max_steps=1", "sample_stories=0", "dit={coded_alone_frames: 3}")
    with pytest.raises(ValueError, match="init_from .* start from scratch"):
        run(stage1_teacher, "teacher", "bad1", "max_steps=1", "sample_stories=0", f"init_from={plain}",
            "dit={pooled_text: true, patch_size: [1, 1, 1]}")
    with pytest.raises(ValueError, match="text_dim 8 .*the micro preset has 32"):
        run(stage1_teacher, "teacher", "bad1", "max_steps=1", "sample_stories=0", "dit={text_dim: 8}")
    with pytest.raises(ValueError, match="unknown config key.*patch"):
        run(stage1_teacher, "teacher", "bad1", "max_steps=1", "sample_stories=0", "dit={patch: [1, 1, 1]}")


def test_a_stage_pointed_at_missing_teacher_weights_names_the_path_and_the_fix(tmp_path):
    from training.common import load_dit

    missing = tmp_path / "teacher.safetensors"
    with pytest.raises(FileNotFoundError, match=r"teacher \(stage 1\) weights not found at .*teacher.safetensors.*run"):
        load_dit(missing, CausalWanDiT, "teacher (stage 1)", "cpu")


def test_a_vae_of_another_stride_carries_its_latent_grid_through_every_stage(tmp_path):
    """A 4x VAE (16x16-pixel micro frames -> 8x8 latents, twice the preset's grid): the latent store records
    its stride, the DiT stages train on that grid (here with 4x4 patches), and the engine runs it."""
    import warnings

    from shotstream_core.engine import ShotRequest
    from shotstream_core.loading import load_dit_state, load_engine
    from training import ode_pairs, stage1_teacher, stage2_ode, stage3_dmd
    from training.data import LatentStoryDataset, write_training_set
    from training.preencode import PreencodeConfig, preencode
    from training.vae_stage import save_vae

    write_training_set(tmp_path / "data", 3, GEO, 1, 3)
    torch.manual_seed(0)
    vae_cfg = dataclasses.replace(get_vae_config("micro"), dim_mult=(1, 2, 2), temporal_downsample=(True, True))
    vae_path = save_vae(WanVAE(vae_cfg), tmp_path / "vae4.safetensors")
    preencode(PreencodeConfig(out_dir=str(tmp_path / "latents"), data_dir=str(tmp_path / "data"), preset="micro",
                              vae_path=str(vae_path), num_stories=3, shard_size=2), Dist())
    ds = LatentStoryDataset(tmp_path / "latents")
    geo4 = ds.geometry(get_preset("micro"))
    assert ds.info["spatial_stride"] == 4 and geo4.latent_height == 2 * GEO.latent_height
    assert ds.info["latent_shape"][2:] == [geo4.latent_height, geo4.latent_width]

    configs = Path(__file__).resolve().parents[1] / "training" / "configs"

    def run(module, stage, *extra):
        argv = ["--config", str(configs / f"micro-{stage}.yaml"), "--set", f"out_dir={tmp_path / stage}",
                "--set", f"latent_dir={tmp_path / 'latents'}"]
        for item in extra:
            argv += ["--set", item]
        return module.main(argv)

    run(stage1_teacher, "teacher", "max_steps=2", "sample_stories=0", "dit={patch_size: [1, 4, 4]}")
    teacher = tmp_path / "teacher" / "teacher.safetensors"
    run(ode_pairs, "ode", f"teacher_path={teacher}", "num_pairs=4", "steps=4", "guidance_check=[]")
    run(stage2_ode, "stage2", f"teacher_path={teacher}", f"ode_dir={tmp_path / 'ode'}", "max_steps=2")
    run(stage3_dmd, "stage3", f"teacher_path={teacher}", f"student_path={tmp_path / 'stage2' / 'student.safetensors'}",
        "max_steps=2")
    student = tmp_path / "stage3" / "student.safetensors"
    assert load_dit_state(student)[1].patch_size == (1, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load_engine(dit_path=student, vae_path=vae_path, preset="micro", device="cpu")
    assert engine.geometry.spatial_stride == 4
    state, frames = engine.generate_shot(engine.new_story(), ShotRequest("a red circle in a meadow",
                                                                         "wide shot, the circle moves left"))
    assert tuple(frames.shape) == (GEO.frames_per_shot, GEO.height, GEO.width, 3)


def test_a_first_block_of_one_frame_carries_from_stage_2_to_stage_3(ode_run, tmp_path, monkeypatch):
    """Stage 2's first_block_frames trains on that block layout (its mask and levels), records it in the
    student file, and stage 3 rolls the student out on the blocks the file records."""
    from shotstream_core.loading import sampler_for_dit
    from training import rollout, stage2_ode, stage3_dmd

    store, _ = ode_run
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    masks, spans = [], []
    real_mask, real_spans = stage2_ode.block_causal_mask, rollout.SelfForcingRollout.__call__
    monkeypatch.setattr(stage2_ode, "block_causal_mask", lambda fc, ids, *a: masks.append(ids.tolist()) or real_mask(fc, ids, *a))

    def spy(self, *args, **kwargs):
        spans.append(self.sampler.block_spans(GEO.latent_frames))
        return real_spans(self, *args, **kwargs)

    monkeypatch.setattr(rollout.SelfForcingRollout, "__call__", spy)
    common = ["--set", f"latent_dir={store / 'latents'}", "--set", f"teacher_path={store / 'teacher.safetensors'}",
              "--set", "max_steps=2"]
    stage2_ode.main(["--config", str(configs / "micro-stage2.yaml"), "--set", f"out_dir={tmp_path / 's2'}",
                     "--set", f"ode_dir={store / 'ode'}", "--set", "first_block_frames=1", *common])
    student2 = tmp_path / "s2" / "student.safetensors"
    assert masks == [[0, 1, 1, 1, 2, 2]]  # micro: 6 latent frames
    assert sampler_for_dit(student2, SAMPLER).first_block_frames == 1
    checkpointed = list((tmp_path / "s2" / "checkpoints").glob("step_*/student.safetensors"))
    assert checkpointed and all(sampler_for_dit(p, SAMPLER).first_block_frames == 1 for p in checkpointed)
    stage3_dmd.main(["--config", str(configs / "micro-stage3.yaml"), "--set", f"out_dir={tmp_path / 's3'}",
                     "--set", f"student_path={student2}", *common])
    assert spans and all(s == [(0, 1), (1, 4), (4, 6)] for s in spans)
    assert sampler_for_dit(tmp_path / "s3" / "student.safetensors", SAMPLER).first_block_frames == 1
    generators = list((tmp_path / "s3" / "checkpoints").glob("step_*/generator.safetensors"))
    assert generators and all(sampler_for_dit(p, SAMPLER).first_block_frames == 1 for p in generators)
    with pytest.raises(ValueError, match="first_block_frames: -1 must be >= 0"):
        stage2_ode.main(["--config", str(configs / "micro-stage2.yaml"), "--set", f"out_dir={tmp_path / 'bad'}",
                         "--set", f"ode_dir={store / 'ode'}", "--set", "first_block_frames=-1", *common])
