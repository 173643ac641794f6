"""How well a teacher denoises, read without sampling: flow error per noise level, on the character cells,
and how much of that error the captions remove.

    python -m training.diagnose runs/tiny/teacher/teacher.safetensors [more.safetensors ...] \
        --latent-dir runs/tiny/latents

Sampling a story and scoring it with the analyser takes minutes and says little about a teacher early in
training (everything but the place is missed). These numbers take seconds and move from the first hundred
steps on. Every draw is fixed (targets spread over the latent set, one noise draw, fixed noise levels), so
two checkpoints compare number for number. Per noise level sigma:
- flow_mse: stage 1's loss (uniform weighting) over every latent cell of the target shots;
- char_mse: the same over the character cells only (cells whose pixel detail, training.detail, is above
  twice its frame's mean): a character is ~5% of a frame, so flow_mse is almost all sky and ground;
- text_gain (sigma >= 0.8 only): 1 - char_mse / char_mse with every caption replaced by the negative
  prompt. It is the share of the character error the captions remove where the captions are all a model
  has to go on: about 0 means the characters' words are ignored.
--context-gain adds context_gain@sigma: 1 - flow_mse / flow_mse with the history dropped as stage 1's context
dropout drops it (zero latents, a first shot's flags and prompt), over later shots (shot 2 on) only, and
the same over the later shots of stories whose captions leave the place out (context_gain_hidden_place;
Story World stores, read from each story's .truth.json), where only the history shows the background.
--by-block and --by-frame split flow_mse over the shot's blocks or its latent frames (the first latent
frame is the VAE's single-frame code, and where a teacher's error there is above the rest's, its samples
open on a frame unlike the next).
With --sample-shots N it also samples the last N training-split shots with CFG and scores them with the
analyser (adherence), as the ODE stage's guidance check does: slower (minutes), but what counts. It also
reads the samples' openings: sample_opening_jump (mean of opening_jump_ratio over the decoded samples) and
sample_spurious_openings, the share of samples where the analyser sees a cut at frame 1. --sample-sheet DIR
saves each teacher's samples as a contact sheet, every sample above the same shot through the VAE.

    python -m training.diagnose --vaes A/vae.safetensors [B/vae.safetensors ...]

reads VAEs instead, on the first shots of training-split stories that no training set reaches (held out,
not the evaluation split): PSNR of the first frame (the single-frame path) and of the rest; the opening
jump, the change from frame 0 to frame 1 over the median change between later frames (the truth's own
ratio beside it: a jump the analyser can read as a cut); and the correlation of adjacent latent frames
(vae_stage.latent_stationarity), where a start-up transient of the causal encoder shows. With --probe
STORIES it also asks where the VAE loses a character (training.probe): small classifiers read its shape
and colour from the truth, the truth pooled to the latent grid, the latent and the decoded frame.

    python -m training.diagnose --resolution-bound 1 2 4 8 [--stories 16 --stories10 4]

asks how fine a latent grid the analyser needs: it scores ground truth of the evaluation split with every
frame pooled to 1/k of its size and scaled back (area pooling, bilinear upsampling), through the same
mp4 round trip as training.evaluate's rows. Pooling by the VAE's stride keeps exactly each latent cell's
mean colour, so the row at that k is what a latent holding nothing but mean colours would score, to set
beside truth through a real VAE (training.evaluate's truth_vae row on the same stories).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from shotstream_core.config import Preset, get_preset
from shotstream_core.model import WanDiT
from shotstream_core.schedule import FlowSchedule
from shotstream_core.vae import load_vae

from .common import load_dit
from .data import LatentStoryDataset
from .ode_pairs import decode_shots, opens_cleanly, sample_targets, shot_adherence, to_uint8
from .probe import build_probe_set, run_probe
from .stage1_teacher import make_batch
from .vae_stage import latent_stationarity

SIGMAS = (0.3, 0.6, 0.8, 0.95)
TEXT_GAIN_FROM = 0.8  # below it the noisy shot itself shows the characters' colours
CHAR_DETAIL_RATIO = 2.0  # a character cell's detail is above this many times its frame's mean


def fixed_targets(ds: LatentStoryDataset, num_targets: int) -> list[tuple[int, int]]:
    """num_targets (story, shot) targets spread evenly over the latent set: the same on every call."""
    return ds.targets[::max(1, len(ds.targets) // num_targets)][:num_targets]


@torch.no_grad()
def diagnose(model, ds: LatentStoryDataset, preset: Preset, num_targets: int = 48, sigmas=SIGMAS,
             seed: int = 123, by_block: bool = False, by_frame: bool = False) -> dict[str, float]:
    """model(seq, t, text, flags, prompt_ids, shot_phase=...) -> flow; returns {metric@sigma: value}.

    by_block: also flow_mse@sigma:block<b> over each block of the shot's latent frames (the first block
    holds the single-frame latent and the encoder's start-up chunks); by_frame: flow_mse@sigma:frame<f> over
    each latent frame, and latent_std:frame<f>, the spread of the targets' clean latents there (a frame that
    spreads wider stays less hidden at one noise level)."""
    targets = fixed_targets(ds, num_targets)
    batch = make_batch(ds, targets, preset.sampler.context_frames, preset.dit.text_len)
    if batch.detail is None:
        raise ValueError("the latent set has no detail maps: re-run training.preencode (it stores them)")
    schedule = FlowSchedule(preset.sampler.num_train_timesteps, preset.sampler.shift)
    noise = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(seed))
    target = schedule.flow_target(batch.x0, noise)
    detail = batch.detail
    char = (detail > CHAR_DETAIL_RATIO * detail.mean(dim=(-2, -1), keepdim=True)).float()  # [B, F, h, w]
    negative = batch.negative.expand(-1, batch.text.shape[1], -1, -1)
    fc = batch.context.shape[2]

    def errors(t, x_t, text):
        seq = torch.cat([batch.context, x_t], dim=2)
        flow = model(seq, t, text, batch.flags, batch.prompt_ids, shot_phase=preset.sampler.rope_shot_phase)
        err = ((flow[:, :, fc:].float() - target) ** 2).mean(dim=1)  # [B, F, h, w]
        return err.mean().item(), ((err * char).sum() / char.sum().clamp_min(1)).item(), err.mean(dim=(0, 2, 3))

    out = {}
    if by_frame:
        out.update({f"latent_std:frame{f}": batch.x0[:, :, f].std().item() for f in range(batch.x0.shape[2])})
    spans = preset.sampler.block_spans(batch.x0.shape[2])
    for sigma in sigmas:
        t = torch.full((len(targets),), sigma * preset.sampler.num_train_timesteps)
        x_t = schedule.add_noise(batch.x0, noise, t)
        out[f"flow_mse@{sigma}"], out[f"char_mse@{sigma}"], per_frame = errors(t, x_t, batch.text)
        if by_block:
            for b, (f0, f1) in enumerate(spans):
                out[f"flow_mse@{sigma}:block{b}"] = per_frame[f0:f1].mean().item()
        if by_frame:
            for f, e in enumerate(per_frame.tolist()):
                out[f"flow_mse@{sigma}:frame{f}"] = e
        if sigma >= TEXT_GAIN_FROM:
            _, uncond_char, _ = errors(t, x_t, negative)
            out[f"text_gain@{sigma}"] = 1.0 - out[f"char_mse@{sigma}"] / max(uncond_char, 1e-12)
    return {k: round(v, 4) for k, v in out.items()}


def hidden_place_targets(ds: LatentStoryDataset) -> list[tuple[int, int]]:
    """Later-shot targets of Story World stories whose captions leave the place out (their .truth.json)."""
    out = []
    for i, story in enumerate(ds.stories):
        truth = Path(story["json_path"]).with_suffix(".truth.json")
        hidden = json.loads(truth.read_text())["story"].get("hidden") if truth.is_file() else None
        if hidden and hidden["kind"] == "place":
            out += [(i, k) for k in range(1, story["num_shots"])]
    return out


@torch.no_grad()
def context_gain(model, ds: LatentStoryDataset, preset: Preset, targets: list[tuple[int, int]], sigmas=SIGMAS,
                 seed: int = 123) -> dict[str, float]:
    """{context_gain@sigma}: the share of the flow error on `targets` (later shots) that their history
    removes, against the same targets with the history dropped as training drops it."""
    if not targets:
        return {}
    kw = dict(context_frames=preset.sampler.context_frames, text_len=preset.dit.text_len)
    with_history = make_batch(ds, targets, **kw)
    without = make_batch(ds, targets, **kw, context_dropout=1.0, g=torch.Generator().manual_seed(0))
    schedule = FlowSchedule(preset.sampler.num_train_timesteps, preset.sampler.shift)
    noise = torch.randn(with_history.x0.shape, generator=torch.Generator().manual_seed(seed))
    target = schedule.flow_target(with_history.x0, noise)
    fc = with_history.context.shape[2]

    def flow_mse(batch, t, x_t):
        seq = torch.cat([batch.context, x_t], dim=2)
        flow = model(seq, t, batch.text, batch.flags, batch.prompt_ids, shot_phase=preset.sampler.rope_shot_phase)
        return ((flow[:, :, fc:].float() - target) ** 2).mean().item()

    out = {}
    for sigma in sigmas:
        t = torch.full((len(targets),), sigma * preset.sampler.num_train_timesteps)
        x_t = schedule.add_noise(with_history.x0, noise, t)
        out[f"context_gain@{sigma}"] = round(1.0 - flow_mse(with_history, t, x_t) / max(flow_mse(without, t, x_t), 1e-12), 4)
    return out


def held_out_shots(preset: Preset, num_shots: int) -> torch.Tensor:
    """First shots of num_shots held-out training-split stories, rendered at the preset's geometry:
    uint8 [S, F, H, W, 3]."""
    import numpy as np

    from .storyworld.render import render_shot
    from .storyworld.world import DEV_START, make_split

    stories = make_split("train", num_shots, start=DEV_START)
    return torch.from_numpy(np.stack([render_shot(s, 0, preset.geometry) for s in stories]))


def opening_jump_ratio(frames) -> float:
    """uint8 [F, H, W, 3]: the change from frame 0 to frame 1 over the median change between later frames
    (the analyser's frame_changes). A ratio well above 1 is a jump the analyser can read as a cut."""
    import numpy as np

    from .storyworld.analyse import frame_changes

    d = frame_changes(frames)
    return float(d[1] / max(float(np.median(d[2:])), 1e-3))


@torch.no_grad()
def sample_check(teacher, ds: LatentStoryDataset, preset: Preset, num_shots: int, vae, guidance: float,
                 steps: int, seed: int = 0, sheet_path=None) -> dict:
    """Sample the last num_shots training-split targets with CFG; analyser adherence and the openings.
    sheet_path: also save a contact sheet, each sample above the same shot's truth through the VAE."""
    import numpy as np

    targets = ds.targets[-num_shots:]
    x0, _, batch = sample_targets(teacher, ds, targets, preset, guidance, steps, seed, "cpu")
    shots = decode_shots(x0, vae)  # decoded once: adherence and the openings read the same frames
    if sheet_path is not None:
        save_sample_sheet(sheet_path, ds, targets, shots, decode_shots(batch.x0, vae))
    return {"sample_adherence": round(float(np.mean(shot_adherence(ds, targets, shots))), 4),
            "sample_opening_jump": round(float(np.mean([opening_jump_ratio(f) for f in shots])), 2),
            "sample_spurious_openings": round(float(np.mean([not c for c in opens_cleanly(shots)])), 4)}


def save_sample_sheet(path, ds: LatentStoryDataset, targets, samples: list, truths: list) -> None:
    """One contact sheet: per target, its sample above its truth through the VAE, each with its caption."""
    import numpy as np

    from .storyworld.sheet import contact_sheet

    frames, ranges, captions, start = [], [], [], 0
    for (story, shot), sample, truth in zip(targets, samples, truths):
        caption = ds.stories[story]["shot_captions"][shot]
        for label, clip in (("sample", sample), ("truth through the VAE", truth)):
            frames.append(clip)
            ranges.append((start, start + len(clip)))
            captions.append(f"story {story} shot {shot + 1}, {label}: {caption}")
            start += len(clip)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(np.concatenate(frames), ranges, captions, per_shot=3).save(path)


@torch.no_grad()
def diagnose_vae(vae, shots: torch.Tensor) -> dict:
    """Reconstruction of whole shots [S, F, H, W, 3] uint8 through vae (encode, decode): see the docstring."""
    import numpy as np

    video = shots.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [S, 3, F, H, W]
    recon = torch.cat([vae.decode(vae.encode(video[i:i + 4])) for i in range(0, len(video), 4)])
    mse = ((recon - video) ** 2).mean(dim=(0, 1, 3, 4))  # [F], on [-1, 1]: peak-to-peak 2
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))

    def opening_jump(frames: torch.Tensor) -> float:  # [S, 3, F, H, W] in [-1, 1]
        return float(np.mean([opening_jump_ratio(to_uint8(v)) for v in frames]))

    corr = latent_stationarity(vae, shots)
    return {"psnr_first_db": round(float(psnr[0]), 2), "psnr_rest_db": round(float(psnr[1:].mean()), 2),
            "opening_jump": round(opening_jump(recon), 2), "truth_opening_jump": round(opening_jump(video), 2),
            "latent_adjacent_corr": [round(c, 2) for c in corr]}


def pooled_frames(frames, factor: int):
    """uint8 [F, H, W, 3] -> the same size, area-pooled to 1/factor a side and bilinearly upsampled."""
    import torch.nn.functional as F

    if factor == 1:
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resolution_bound(factors, preset: Preset, stories: int = 16, stories10: int = 4, crf: int | None = None,
                     workdir=None) -> dict[int, dict]:
    """{factor: the analyser's scores of pooled ground truth} on evaluation stories (see the docstring)."""
    import tempfile

    from .evaluate import EvalConfig, evaluation_split
    from .storyworld.analyse import aggregate, score_story
    from .storyworld.render import render_story
    from .storyworld.storage import read_mp4, write_mp4

    geo = preset.geometry
    for k in factors:
        if k < 1 or geo.height % k or geo.width % k:
            raise ValueError(f"pooling factor {k} does not divide the {geo.width}x{geo.height} frames: "
                             "use a divisor of both sides")
    crf = EvalConfig().crf if crf is None else crf
    items = evaluation_split(stories, stories10, geo.width / geo.height)
    rendered = [(item.story, *render_story(item.story, geo)) for item in items]
    out = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "story.mp4"
        for k in factors:
            short, long = [], []
            for story, frames, ranges in rendered:
                write_mp4(path, pooled_frames(frames, k), geo.fps, crf=crf)
                score = score_story(story, read_mp4(path)[0], ranges)
                (long if story.num_shots >= 10 else short).append(score)
            agg5, agg10 = (aggregate(short) if short else None), (aggregate(long) if long else None)
            head = agg5 or agg10
            out[k] = {"latent_grid": [geo.height // k, geo.width // k],
                      "adherence": round(head["adherence"], 4), "memory": round(head["memory"], 4),
                      "cut_f1": round(head["cut_f1"], 4),
                      "drift": round(agg10["drift"], 4) if agg10 else None}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="*", help="teacher (or student) .safetensors files to compare")
    p.add_argument("--vaes", nargs="+", default=[], help="VAE .safetensors files to read instead (see above)")
    p.add_argument("--shots", type=int, default=24, help="held-out shots for --vaes")
    p.add_argument("--probe", type=int, default=0, metavar="STORIES",
                   help="with --vaes: also probe which of the character's shape and colour each VAE's latent and "
                        "decoder keep, on the single-character shots of this many held-out stories "
                        "(training.probe; minutes)")
    p.add_argument("--probe-steps", type=int, default=800, help="training steps of each probe classifier")
    p.add_argument("--probe-seeds", type=int, default=2, help="probes per form and target (their mean is reported)")
    p.add_argument("--resolution-bound", nargs="+", type=int, default=[], metavar="K",
                   help="score ground truth pooled by each factor K instead (see above)")
    p.add_argument("--stories", type=int, default=16, help="5-shot evaluation stories for --resolution-bound")
    p.add_argument("--stories10", type=int, default=4, help="10-shot evaluation stories for --resolution-bound")
    p.add_argument("--by-block", action="store_true", help="also the flow error of each block of the shot")
    p.add_argument("--by-frame", action="store_true",
                   help="also the flow error and the latent spread of each latent frame of the shot")
    p.add_argument("--latent-dir", default="runs/tiny/latents", help="pre-encoded latents (training.preencode)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--targets", type=int, default=48, help="target shots in the fixed batch")
    p.add_argument("--context-gain", action="store_true",
                   help="also how much of the flow error on later shots the history removes (see above)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sample-shots", type=int, default=0,
                   help="also sample this many training-split shots (the last targets of the store, as the ODE "
                        "stage's guidance check) and score them with the analyser: adherence and the openings "
                        "(needs --vae)")
    p.add_argument("--vae", default="", help="the VAE the latents were encoded with (for --sample-shots)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale for --sample-shots")
    p.add_argument("--steps", type=int, default=50, help="Euler steps for --sample-shots")
    p.add_argument("--sample-sheet", default="",
                   help="folder for a contact sheet of each teacher's samples (<its folder>_<its stem>.png); "
                        "needs --sample-shots")
    a = p.parse_args(argv)
    if sum(map(bool, (a.weights, a.vaes, a.resolution_bound))) != 1:
        p.error("give DiT weights to compare, --vaes VAE files or --resolution-bound factors: one of them")
    if a.sample_shots and not a.vae:
        p.error("--sample-shots decodes its samples: give --vae (the VAE the latents were encoded with)")
    if a.probe and not a.vaes:
        p.error("--probe reads VAEs: give --vaes VAE files as well")
    if a.sample_sheet and not a.sample_shots:
        p.error("--sample-sheet shows samples: give --sample-shots N as well")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    preset, results = get_preset(a.preset), {}
    if a.resolution_bound:
        try:
            results = resolution_bound(a.resolution_bound, preset, a.stories, a.stories10)
        except ValueError as e:
            p.error(str(e))
        for k, row in results.items():
            print(f"pooled {k}x", json.dumps(row), flush=True)
        return results
    if a.vaes:
        shots = held_out_shots(preset, a.shots)
        for path in a.vaes:
            vae = load_vae(path)
            results[path] = diagnose_vae(vae, shots)
            if a.probe:
                results[path]["probe"] = run_probe(build_probe_set(vae, preset, a.probe), steps=a.probe_steps,
                                                     seeds=range(a.probe_seeds))
            print(path, json.dumps(results[path]), flush=True)
        return results
    ds = LatentStoryDataset(a.latent_dir)
    vae = load_vae(a.vae) if a.sample_shots else None
    for path in a.weights:
        teacher = load_dit(path, WanDiT, "teacher", "cpu", frozen=True)
        results[path] = diagnose(teacher, ds, preset, a.targets, by_block=a.by_block, by_frame=a.by_frame)
        if a.context_gain:
            later = [(i, k) for i, k in ds.targets if k > 0]
            results[path].update(context_gain(teacher, ds, preset, later[::max(1, len(later) // a.targets)][:a.targets]))
            hidden = hidden_place_targets(ds)
            results[path].update({k.replace("context_gain", "context_gain_hidden_place"): v for k, v in
                                  context_gain(teacher, ds, preset, hidden[::max(1, len(hidden) // a.targets)][:a.targets]).items()})
        if vae is not None:
            sheet = Path(a.sample_sheet) / f"{Path(path).parent.name}_{Path(path).stem}.png" if a.sample_sheet else None
            results[path].update(sample_check(teacher, ds, preset, a.sample_shots, vae, a.guidance, a.steps,
                                              sheet_path=sheet))
        print(path, json.dumps(results[path]), flush=True)
    return results


if __name__ == "__main__":
    main()
