"""Training infrastructure: configs, checkpoints, step batches, logs, exact resume, 2-process torchrun."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from shotstream_core.config import get_preset
from shotstream_core.model import WanDiT

from training.data import write_training_set
from training.common import (Checkpointer, Dist, Logger, StageConfig, StepBatches, load_stage_config, lr_at,
                             mark_done, optimizer_step, read_log, step_generator, train_loop)

REPO = Path(__file__).resolve().parents[1]



# --- configs --------------------------------------------------------------------------------------

@dataclass
class _Cfg(StageConfig):
    sizes: tuple[int, ...] = (1, 2)
    flag: bool = True
    noise: float | None = None


def test_an_optional_number_reads_yaml_numbers_and_null():
    """YAML reads 1e-3 as a string: an optional float field (stage 3's refresh_sigma) takes it as a number,
    as plain float fields do, and null as None."""
    assert load_stage_config(_Cfg, None, ["noise=1e-3"]).noise == 1e-3
    assert load_stage_config(_Cfg, None, ["noise=null"]).noise is None
    with pytest.raises(ValueError, match="config noise: 'soft' is not a number"):
        load_stage_config(_Cfg, None, ["noise=soft"])


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-3\nsizes: [3, 4]\nmax_minutes: 2\n")
    cfg = load_stage_config(_Cfg, path, ["batch_size=5", "flag=False"])
    assert cfg.lr == 1e-3 and cfg.sizes == (3, 4) and cfg.batch_size == 5
    assert cfg.flag is False  # the reference parsed "False" as True
    assert isinstance(cfg.max_minutes, float)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*'lrr'"):
        load_stage_config(_Cfg, None, ["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_stage_config(_Cfg, None, ["lr"])
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_stage_config(_Cfg, tmp_path / "missing.yaml")


def test_every_shipped_config_loads():
    from training.pipeline import STAGES, _config_class, stage_config_path

    for preset in ("tiny", "micro"):
        for stage in STAGES:
            path = stage_config_path(preset, stage)
            if path.is_file():
                cfg = load_stage_config(_config_class(stage.config_cls), path)
                assert cfg.preset == preset, path


def test_every_tiny_stage_is_step_bound_with_a_bounded_safety_net():
    """The recipe is step counts, so a slow or busy machine trains the same model, only later. Each tiny
    stage and VAE phase has a sitting's time budget (max_minutes; when it runs out the stage pauses, to be
    resumed), set well above its measured time, and a stage's budgets (its own, or the sum over its
    phases) add up to at most 150 min. Each stage's measured time is in training_report.md."""
    from training.pipeline import STAGES, _config_class, stage_config_path
    from training.vae_stage import phase_configs

    for stage in STAGES:
        cfg = load_stage_config(_config_class(stage.config_cls), stage_config_path("tiny", stage))
        parts = phase_configs(cfg) if getattr(cfg, "phases", ()) else [cfg]
        assert all(p.max_minutes > 0 for p in parts), f"tiny {stage.name} has a stage or phase without max_minutes"
        cap = sum(p.max_minutes for p in parts)
        assert cap <= 150, f"tiny {stage.name}: its safety nets sum to {cap} min"
        if hasattr(cfg, "num_pairs"):
            assert cfg.num_pairs > 0, "tiny ode: num_pairs 0 generates until the time net"
        else:
            for p in parts:
                assert p.max_steps <= 20000, f"tiny {stage.name}: max_steps {p.max_steps} is a time-bound ceiling"


def test_lr_decay_steps_replays_a_longer_schedule_cut_short(micro_latents, tmp_path):
    """max_steps 3 on a 5-step cosine (lr_decay_steps 5) ends bit-identical to step 3 of a 5-step run: how
    the step-bound tiny recipe reproduces phases that were tuned as longer, time-capped runs."""
    from training import stage1_teacher
    from training.common import StageInterrupted

    args = ("batch_size=2", "warmup_steps=1", "lr=1.0e-2")
    with pytest.raises(StageInterrupted):
        stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "long", "max_steps=5", "stop_after=3", *args))
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "short", "max_steps=3", "lr_decay_steps=5", *args))
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "plain", "max_steps=3", *args))
    cut = Checkpointer(tmp_path / "long").weights("teacher")
    short = Checkpointer(tmp_path / "short").weights("teacher")
    plain = Checkpointer(tmp_path / "plain").weights("teacher")
    assert all(torch.equal(cut[k], short[k]) for k in cut)
    assert any(not torch.equal(cut[k], plain[k]) for k in cut)  # a 3-step cosine decays sooner


@pytest.mark.parametrize("preset", ["tiny", "micro"])
def test_decoder_stage_refines_the_vae_stage_without_changing_latents(preset):
    """The decoder stage starts from the VAE stage's weights and trains only the decoder in every phase
    (encoder and latent statistics frozen), and every stage after it reads its VAE: so splitting the VAE
    curriculum into two stages changes no latent."""
    from training.pipeline import STAGES, _config_class, stage_config_path, stage_out_dir
    from training.vae_stage import phase_configs

    stages = {s.name: s for s in STAGES}
    decoder = load_stage_config(_config_class(stages["decoder"].config_cls), stage_config_path(preset, stages["decoder"]))
    assert Path(decoder.init_from) == stage_out_dir(preset, stages["vae"]) / "vae.safetensors"
    assert decoder.phases and all(p.train_part == "decoder" for p in phase_configs(decoder))
    final_vae = stage_out_dir(preset, stages["decoder"]) / "vae.safetensors"
    names = [s.name for s in STAGES]
    for stage in STAGES[names.index("decoder") + 1:]:
        cfg = load_stage_config(_config_class(stage.config_cls), stage_config_path(preset, stage))
        if hasattr(cfg, "vae_path"):
            assert Path(cfg.vae_path) == final_vae, f"{preset} {stage.name} reads {cfg.vae_path}"


# --- batches, rng, lr -----------------------------------------------------------------------------

def test_step_batches_are_disjoint_across_ranks_and_deterministic():
    a = StepBatches(20, 3, Dist(0, 2), seed=1)
    b = StepBatches(20, 3, Dist(1, 2), seed=1)
    for step in range(7):  # crosses an epoch boundary (3 batches of 3 per rank per epoch)
        ia, ib = a.indices(step), b.indices(step)
        assert len(ia) == len(ib) == 3 and not set(ia) & set(ib)
    # a fresh object (as after a resume) gives the same batch for the same step
    assert StepBatches(20, 3, Dist(0, 2), seed=1).indices(5) == a.indices(5)
    assert a.indices(0) != a.indices(3)  # a new epoch reshuffles
    with pytest.raises(ValueError, match="cannot fill a batch"):
        StepBatches(3, 4, Dist(), seed=0)


def test_step_generator_depends_on_step_and_rank():
    draw = lambda *a: torch.rand(3, generator=step_generator(*a))
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))


def test_lr_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] < lrs[10] and lrs[-1] == pytest.approx(0.1, abs=0.01)


# --- checkpoints and logs -------------------------------------------------------------------------

def test_checkpointed_dit_loads_with_its_own_config(tmp_path):
    """A DiT of no preset's shape (a 1x1 patch, 4 heads): its checkpoint carries the config, so heads and
    text length, which tensor shapes cannot tell, load as trained."""
    from shotstream_core.config import DiTConfig
    from shotstream_core.loading import load_dit_state
    from shotstream_core.model import WanDiT

    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=1, freq_dim=32, text_dim=32, text_len=24,
                    patch_size=(1, 1, 1))
    path = Checkpointer(tmp_path).save(1, {"teacher": WanDiT(cfg), "head": nn.Linear(2, 2)}, {})
    sd, found = load_dit_state(path / "teacher.safetensors")
    assert found == cfg


def test_checkpointer_roundtrip_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.latest_step() is None
    for step in (1, 2, 3):
        ck.save(step, {"net": net}, {"net": opt}, {"elapsed_s": 1.5})
    assert ck.latest_step() == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    expected_draw = torch.rand(5)
    expected_np = np.random.rand(2)

    # state.pt is plain data: loads with weights_only=True
    torch.load(ck.path() / "state.pt", weights_only=True)
    net2 = nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.1)
    torch.manual_seed(123)
    step, extra = ck.load({"net": net2}, {"net": opt2})
    assert step == 3 and extra["elapsed_s"] == 1.5
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(5), expected_draw)  # the RNG continues where the checkpoint was taken
    assert np.array_equal(np.random.rand(2), expected_np)


def test_logger_writes_jsonl_and_plot(tmp_path):
    log = Logger(tmp_path, total_steps=5)
    for s in range(1, 6):
        log.log(s, loss=1.0 / s, lr=0.1)
    log.log(3, loss=9.0)  # a resumed run re-logs step 3: the later entry wins
    png = log.plot()
    log.close()
    rows = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] == 9.0
    assert png.is_file() and png.stat().st_size > 1000


def test_pipeline_dry_run_lists_every_stage(capsys):
    from training.pipeline import main

    assert main(["--preset", "tiny", "--dry-run", "--no-eval"]) == 0
    out = capsys.readouterr().out
    for name in ("vae", "decoder", "preencode", "teacher", "ode", "stage2", "stage3", "stage4"):
        assert f"[pipeline] {name}" in out


# --- exact resume and torchrun on a real stage ----------------------------------------------------

@pytest.fixture(scope="module")
def micro_latents(tmp_path_factory):
    """A real (tiny) pre-encoded store: 3 Story World stories, a random micro VAE, the random text encoder."""
    from shotstream_core.config import get_preset
    from shotstream_core.vae import WanVAE
    from training.data import write_training_set
    from training.preencode import PreencodeConfig, preencode
    from training.vae_stage import save_vae

    root = tmp_path_factory.mktemp("infra")
    write_training_set(root / "data", 3, get_preset("micro").geometry, 1, 3)
    torch.manual_seed(0)
    save_vae(WanVAE("micro"), root / "vae.safetensors")
    cfg = PreencodeConfig(out_dir=str(root / "latents"), data_dir=str(root / "data"), preset="micro",
                          vae_path=str(root / "vae.safetensors"), num_stories=3, shard_size=2)
    preencode(cfg, Dist())
    return root / "latents"


def _teacher_argv(latents, out, *extra):
    argv = ["--config", str(REPO / "training/configs/micro-teacher.yaml"), "--set", f"latent_dir={latents}",
            "--set", f"out_dir={out}", "--set", "sample_stories=0", "--set", "ckpt_every=100"]
    for e in extra:
        argv += ["--set", e]
    return argv


def test_stages_refuse_latents_of_another_latent_width(micro_latents, tmp_path):
    """A store pre-encoded with a wider VAE (vae: {z_dim: 24}) is refused by name before training, with
    the fix, instead of failing inside the DiT's first layer."""
    import dataclasses

    from shotstream_core.vae import WanVAE, get_vae_config
    from training import stage1_teacher
    from training.preencode import PreencodeConfig, preencode
    from training.vae_stage import save_vae

    torch.manual_seed(0)
    save_vae(WanVAE(dataclasses.replace(get_vae_config("micro"), z_dim=24)), tmp_path / "wide.safetensors")
    preencode(PreencodeConfig(out_dir=str(tmp_path / "wide"), data_dir=str(micro_latents.parent / "data"),
                              preset="micro", vae_path=str(tmp_path / "wide.safetensors"), num_stories=3,
                              shard_size=2), Dist())
    with pytest.raises(ValueError, match=r"\[24, .*pre-encode again with a VAE of 16 latent channels"):
        stage1_teacher.main(_teacher_argv(tmp_path / "wide", tmp_path / "t", "max_steps=1"))
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "ok", "max_steps=1"))  # the matching store trains


def test_resume_is_bit_identical(micro_latents, tmp_path):
    """Stopping after 3 steps and resuming to 5 gives the weights (and Adam state) of 5 uninterrupted steps."""
    from training import stage1_teacher
    from training.common import StageInterrupted

    whole = stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "whole", "max_steps=5", "batch_size=2"))
    with pytest.raises(StageInterrupted):  # as if the run were killed after step 3
        stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "cut", "max_steps=5", "batch_size=2",
                                          "stop_after=3"))
    assert Checkpointer(tmp_path / "cut").latest_step() == 3
    assert not (tmp_path / "cut" / "done.json").exists()
    resumed = stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "cut", "max_steps=5", "batch_size=2"))
    assert whole["steps"] == resumed["steps"] == 5
    # training is deterministic, so a "resume" that restarted from step 0 would match too: the second
    # sitting must have started at the cut and run only steps 3 and 4
    assert (whole["resumed_from"], resumed["resumed_from"]) == (0, 3)
    a = Checkpointer(tmp_path / "whole").weights("teacher")
    b = Checkpointer(tmp_path / "cut").weights("teacher")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(Checkpointer(tmp_path / "whole").path() / "state.pt", weights_only=True)
    sb = torch.load(Checkpointer(tmp_path / "cut").path() / "state.pt", weights_only=True)
    for k, v in sa["optimizers"]["teacher"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizers"]["teacher"]["state"][k]["exp_avg_sq"])
    # and a different seed really trains differently (the comparison can fail)
    other = stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "other", "max_steps=5", "batch_size=2",
                                              "seed=1"))
    c = Checkpointer(tmp_path / "other").weights("teacher")
    assert other["steps"] == 5 and any(not torch.equal(a[k], c[k]) for k in a)


def test_teacher_ema_resumes_exactly_and_is_what_ships(micro_latents, tmp_path):
    """The EMA copy is checkpointed (a cut run resumes to the same average) and exported as teacher.safetensors."""
    from training import stage1_teacher
    from training.common import StageInterrupted

    args = ("max_steps=4", "batch_size=2", "ema_decay=0.9")
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "whole", *args))
    with pytest.raises(StageInterrupted):
        stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "cut", *args, "stop_after=2"))
    assert stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "cut", *args))["resumed_from"] == 2
    ema_whole = Checkpointer(tmp_path / "whole").weights("ema")
    ema_cut = Checkpointer(tmp_path / "cut").weights("ema")
    assert all(torch.equal(ema_whole[k], ema_cut[k]) for k in ema_whole)
    raw = Checkpointer(tmp_path / "whole").weights("teacher")
    from shotstream_core.loading import load_dit_state

    shipped, _ = load_dit_state(tmp_path / "whole" / "teacher.safetensors")
    assert all(torch.equal(shipped[k], ema_whole[k]) for k in ema_whole)
    assert any(not torch.equal(raw[k], ema_whole[k]) for k in raw)  # the average lags the raw weights


@pytest.mark.parametrize("first_frame_stats", [False, True])
def test_vae_decoder_phase_keeps_encoder_and_statistics(tmp_path, first_frame_stats):
    """train_part=decoder: the encoder and latent statistics of init_from (the first frame's too, where it
    has them) stay bit-identical (pre-encoded latents stay valid), the decoder trains. A whole VAE phase
    with first_frame_stats fits both sets and records them."""
    from shotstream_core.config import get_preset
    from shotstream_core.vae import WanVAE, get_vae_config, load_vae
    from training import vae_stage

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    torch.manual_seed(0)
    init = WanVAE(get_vae_config("micro").replace(first_frame_stats=first_frame_stats))
    for name in vae_stage.stat_names(init):
        getattr(init, name).uniform_(*((0.5, 2) if name.endswith("std") else (-1, 1)))
    vae_stage.save_vae(init, tmp_path / "init.safetensors")
    base = ["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "num_stories=2", "--set", "max_steps=2", "--set", "crop=0", "--set", "phases=[]",
            "--set", f"vae={{first_frame_stats: {str(first_frame_stats).lower()}}}"]
    vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'dec'}", "--set", f"init_from={tmp_path / 'init.safetensors'}",
                           "--set", "train_part=decoder"])
    before, after = init.state_dict(), load_vae(tmp_path / "dec" / "vae.safetensors").state_dict()
    assert set(before) == set(after)
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("encoder.", "conv1.", "latent_", "first_latent_")):
            assert same, k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    with pytest.raises(ValueError, match="init_from"):
        vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'bad'}", "--set", "train_part=decoder"])
    if first_frame_stats:  # a whole phase fits the first frame's statistics apart and records them
        vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'all'}"])
        fitted = load_vae(tmp_path / "all" / "vae.safetensors")
        done = json.loads((tmp_path / "all" / "done.json").read_text())
        assert torch.allclose(fitted.first_latent_mean, torch.tensor(done["first_latent_mean"]))
        assert not torch.allclose(fitted.first_latent_mean, fitted.latent_mean, atol=1e-3)


def test_widen_latent_keeps_the_reconstruction_and_the_stage_trains_the_new_channels(tmp_path):
    """vae: {z_dim: N} from a narrower init_from: the widened VAE reconstructs exactly as the narrow one
    (its first channels are the old latents), and training then uses the new channels."""
    import dataclasses

    from shotstream_core.config import get_preset
    from shotstream_core.vae import WanVAE, get_vae_config, load_vae
    from training import vae_stage

    torch.manual_seed(0)
    narrow = WanVAE("micro").eval()
    wide = WanVAE(dataclasses.replace(get_vae_config("micro"), z_dim=24)).eval()
    vae_stage.widen_latent(narrow, wide)
    clips = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        mu_n, _ = narrow.encode_moments(clips)
        mu_w, _ = wide.encode_moments(clips)
        assert torch.allclose(mu_w[:, :16], mu_n, atol=1e-5)
        assert mu_w[:, 16:].abs().mean() > 1e-3  # the new channels carry something for training to use
        assert torch.allclose(wide.decode(mu_w), narrow.decode(mu_n), atol=1e-5)
    with pytest.raises(ValueError, match="at least as many latent channels"):
        vae_stage.widen_latent(wide, narrow)

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    vae_stage.save_vae(narrow, tmp_path / "init.safetensors")
    base = ["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "num_stories=2", "--set", "max_steps=3", "--set", "crop=0", "--set", "phases=[]",
            "--set", f"init_from={tmp_path / 'init.safetensors'}", "--set", "vae={z_dim: 24}"]
    vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'wide'}", "--set", "sample_latent=false"])
    trained = load_vae(tmp_path / "wide" / "vae.safetensors")
    assert trained.config.z_dim == 24 and trained.latent_std.shape == (24,)
    assert trained.decoder.conv1.weight[:, 16:].abs().max() > 0  # the decoder has started to read them
    with pytest.raises(ValueError, match="encoder to train"):
        vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'bad'}", "--set", "train_part=decoder"])
    with pytest.raises(ValueError, match="z_dim"):  # a typo in the shape is refused by name
        vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'bad2'}", "--set", "vae={zdim: 24}"])


def test_vae_curriculum_runs_its_phases_in_order_and_resumes(tmp_path):
    """micro-vae.yaml's two phases: the second starts from the first; a cut phase resumes; the stage's
    vae.safetensors is the last phase's; a phase with an unknown key is refused by name."""
    from shotstream_core.config import get_preset
    from shotstream_core.vae import load_vae
    from training import vae_stage
    from training.common import StageInterrupted

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    argv = ["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "num_stories=2"]
    with pytest.raises(StageInterrupted):  # the first phase is cut after one step
        vae_stage.main(argv + ["--set", f"out_dir={tmp_path / 'vae'}", "--set", "stop_after=1"])
    assert not (tmp_path / "vae" / "crops" / "done.json").exists()
    summary = vae_stage.main(argv + ["--set", f"out_dir={tmp_path / 'vae'}"])
    phases = [p["name"] for p in summary["phases"]]
    assert phases == ["crops", "decoder"] and summary["steps"] == 4 + 2
    # the cut phase went on from its checkpoint (not from scratch); the next one started fresh
    assert [p["resumed_from"] for p in summary["phases"]] == [1, 0]
    crops = load_vae(tmp_path / "vae" / "crops" / "vae.safetensors").state_dict()
    final = load_vae(tmp_path / "vae" / "vae.safetensors").state_dict()
    decoder = load_vae(tmp_path / "vae" / "decoder" / "vae.safetensors").state_dict()
    assert all(torch.equal(final[k], decoder[k]) for k in final)
    assert all(torch.equal(crops[k], final[k]) for k in final if k.startswith(("encoder.", "latent_")))
    assert any(not torch.equal(crops[k], final[k]) for k in final if k.startswith("decoder."))
    with pytest.raises(ValueError, match="crop_size"):
        vae_stage.main(argv + ["--set", f"out_dir={tmp_path / 'bad'}", "--set", "phases=[{name: a, crop_size: 8}]"])


def test_a_sittings_time_budget_pauses_the_stage_and_never_changes_the_model(micro_latents, tmp_path, monkeypatch):
    """max_minutes ends a sitting, not the stage: the stage checkpoints, says how to go on and stops unfinished
    (exit status EXIT_PAUSED, no done.json), and the same command resumes it to the weights of an
    uninterrupted run. (Marked done, a slow machine would have shipped a shorter-trained model.)"""
    import time
    from types import SimpleNamespace

    from training import common, stage1_teacher
    from training.common import EXIT_PAUSED, StageInterrupted, paused_message

    args = ("max_steps=4", "batch_size=2", "max_minutes=90")
    steps_taken = []
    teacher_loss = stage1_teacher.teacher_loss

    def counted_loss(*a, **kw):
        steps_taken.append(1)
        return teacher_loss(*a, **kw)

    with monkeypatch.context() as m:
        # a clock that reads an hour later per step taken: each sitting's 90 minutes run out after two
        # steps, so the budget cuts mid-run (a cut at step 0 could not tell a resume from a restart)
        m.setattr(stage1_teacher, "teacher_loss", counted_loss)
        m.setattr(common, "time", SimpleNamespace(perf_counter=lambda: 3600.0 * len(steps_taken), time=time.time))
        with pytest.raises(StageInterrupted) as stop:
            stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "cut", *args))
        assert stop.value.code == EXIT_PAUSED
        assert not (tmp_path / "cut" / "done.json").exists()
        message = paused_message(tmp_path / "cut")
        assert "stopped at step 2 of 4" in message and "max_minutes" in message
        assert "run the same command again" in message
        res = stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "cut", *args))
    assert res["steps"] == 4 and res["stop_reason"] == "max_steps"
    assert res["resumed_from"] == 2 and len(steps_taken) == 4  # the second sitting ran steps 2 and 3 only
    assert paused_message(tmp_path / "cut") is None and (tmp_path / "cut" / "done.json").is_file()
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "whole", *args))  # the real clock: never out
    cut = load_file(str(tmp_path / "cut" / "teacher.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "teacher.safetensors"))
    assert all(torch.equal(cut[k], whole[k]) for k in whole)


def test_pipeline_tells_a_paused_stage_from_a_failed_one(tmp_path, monkeypatch, capsys):
    """A stage that stopped on its sitting's budget makes the pipeline exit EXIT_PAUSED with the stage's
    own message (whatever status torchrun passes on); a stage that failed is reported as failed."""
    from training import pipeline
    from training.common import EXIT_PAUSED, pause_stage

    runs = {s.name: tmp_path / "runs" / s.name for s in pipeline.STAGES}
    monkeypatch.setattr(pipeline, "stage_out_dir", lambda preset, stage: runs[stage.name])

    def paused_run(cmd):
        pause_stage(runs["teacher"], "teacher stopped at step 7 of 9: budget ran out")
        return 1  # torchrun's status when a worker exits non-zero

    monkeypatch.setattr(pipeline, "run_child", paused_run)
    assert pipeline.main(["--preset", "micro", "--only", "teacher", "--no-eval"]) == EXIT_PAUSED
    assert "teacher paused: teacher stopped at step 7 of 9" in capsys.readouterr().out

    def failed_run(cmd):  # the next sitting starts (its pause is cleared), then fails
        (runs["teacher"] / "paused.json").unlink()
        return 1

    monkeypatch.setattr(pipeline, "run_child", failed_run)
    assert pipeline.main(["--preset", "micro", "--only", "teacher", "--no-eval"]) == 1
    assert "teacher failed (exit 1)" in capsys.readouterr().out


def test_preencoding_pauses_between_shards_and_goes_on(micro_latents, tmp_path, monkeypatch):
    """Pre-encoding out of budget keeps the shards it wrote, writes no index (the store is unfinished), and
    the next sitting skips them and encodes the rest into the same store as one uninterrupted run."""
    from types import SimpleNamespace

    from training import preencode
    from training.common import StageInterrupted

    encoded = []
    encode_shard = preencode.encode_shard

    def counted_encode(shard, *a, **kw):
        encoded.append(shard)
        return encode_shard(shard, *a, **kw)

    monkeypatch.setattr(preencode, "encode_shard", counted_encode)
    # a clock that reads an hour later per shard encoded: each sitting's minute runs out after one shard
    monkeypatch.setattr(preencode, "time", SimpleNamespace(perf_counter=lambda: 3600.0 * len(encoded)))
    root = micro_latents.parent
    cfg = preencode.PreencodeConfig(out_dir=str(tmp_path / "latents"), data_dir=str(root / "data"), preset="micro",
                                    vae_path=str(root / "vae.safetensors"), num_stories=3, shard_size=2, max_minutes=1)
    with pytest.raises(StageInterrupted, match="pre-encoding stopped before shard 2 of 2"):
        preencode.preencode(cfg, Dist())
    first = tmp_path / "latents" / "shard_0000.safetensors"
    assert len(encoded) == 1 and first.is_file() and not (tmp_path / "latents" / "shard_0001.safetensors").exists()
    assert not (tmp_path / "latents" / "index.json").exists()
    kept = (first.stat().st_mtime_ns, first.read_bytes())
    summary = preencode.preencode(cfg, Dist())  # the same command
    assert summary["stories"] == 3 and summary["stop_reason"] == "done"
    # the kept shard was skipped, not encoded again: one more encode (shard 1), shard 0 untouched
    assert len(encoded) == 2 and (first.stat().st_mtime_ns, first.read_bytes()) == kept
    again = json.loads((tmp_path / "latents" / "index.json").read_text())["stories"]
    assert again == json.loads((micro_latents / "index.json").read_text())["stories"]
    for n in range(2):  # and the shards are the uninterrupted run's
        name = f"shard_{n:04d}.safetensors"
        a, b = load_file(str(tmp_path / "latents" / name)), load_file(str(micro_latents / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_preencoding_makes_a_shard_each_sitting_even_when_setup_spent_the_budget(micro_latents, tmp_path,
                                                                               monkeypatch):
    """Loading the models (or a large data set) can take longer than a sitting's budget: the sitting still
    encodes one shard, so each run of the command gets further instead of pausing before shard 1 for ever."""
    from types import SimpleNamespace

    from training import preencode
    from training.common import StageInterrupted

    ticks = iter(range(0, 10**6, 3600))  # every reading of the clock an hour after the one before
    monkeypatch.setattr(preencode, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    root = micro_latents.parent
    cfg = preencode.PreencodeConfig(out_dir=str(tmp_path / "latents"), data_dir=str(root / "data"), preset="micro",
                                    vae_path=str(root / "vae.safetensors"), num_stories=3, shard_size=1, max_minutes=1)
    for n in range(1, 3):
        with pytest.raises(StageInterrupted, match=f"stopped before shard {n + 1} of 3"):
            preencode.preencode(cfg, Dist())
        assert len(list((tmp_path / "latents").glob("shard_*.safetensors"))) == n
    assert preencode.preencode(cfg, Dist())["stories"] == 3


def test_ode_pairs_refuse_a_grid_too_coarse_and_a_guidance_check_without_truth_files(micro_latents, tmp_path):
    """Settings that used to end in a KeyError or a missing-file traceback are refused first, by name."""
    import shutil

    from training.ode_pairs import ODEConfig, generate

    base = dict(out_dir=str(tmp_path / "ode"), latent_dir=str(micro_latents), preset="micro",
                teacher_path=str(tmp_path / "no_teacher.safetensors"), num_pairs=2)
    with pytest.raises(ValueError, match=r"steps 3: the teacher's grid is too coarse .* use at least 4 steps"):
        generate(ODEConfig(**base, steps=3), Dist())
    store = tmp_path / "own_data_latents"  # the same latents, said to come from a data set of one's own
    shutil.copytree(micro_latents, store)
    index = json.loads((store / "index.json").read_text())
    for story in index["stories"]:
        story["json_path"] = str(tmp_path / "captions" / Path(story["json_path"]).name)
    (store / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"guidance_check .* truth files .* guidance_check: \[\]"):
        generate(ODEConfig(**{**base, "latent_dir": str(store)}, guidance_check=(1.0, 3.0)), Dist())


def test_preencoding_refuses_a_store_built_from_other_inputs(micro_latents, tmp_path):
    """A store re-run with another num_stories, or after a caption was edited, would skip the shards it
    holds and keep the old stories: it is refused by name, and the store stays as it was. The same inputs
    go on (the resume above)."""
    import shutil

    from training.preencode import PreencodeConfig, preencode

    data = tmp_path / "data"
    shutil.copytree(micro_latents.parent / "data", data)
    cfg = PreencodeConfig(out_dir=str(tmp_path / "latents"), data_dir=str(data), preset="micro",
                          vae_path=str(micro_latents.parent / "vae.safetensors"), num_stories=3, shard_size=2)
    preencode(cfg, Dist())
    index = (tmp_path / "latents" / "index.json").read_text()
    assert preencode(cfg, Dist())["stories"] == 3  # the same inputs: fine
    video = data / "0002.mp4"
    os.utime(video, ns=(1, 1))  # the same bytes at another time (written again, copied): still the same inputs
    assert preencode(cfg, Dist())["stories"] == 3
    original = video.read_bytes()
    video.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # other bytes: another video
    with pytest.raises(ValueError, match=r"video of 0002 changed"):
        preencode(cfg, Dist())
    video.write_bytes(original)
    with pytest.raises(ValueError, match=r"pre-encoded from other inputs \(num_stories 3 -> 2\).*Delete .*latents"):
        preencode(dataclasses.replace(cfg, num_stories=2), Dist())
    captions = json.loads((data / "0001.json").read_text())
    captions["shot1"] = "close-up, a purple square, standing still."
    (data / "0001.json").write_text(json.dumps(captions))
    with pytest.raises(ValueError, match=r"captions of 0001 changed"):
        preencode(cfg, Dist())
    assert (tmp_path / "latents" / "index.json").read_text() == index


def test_a_store_rebuilt_from_other_data_is_another_run_for_the_stages_on_it(micro_latents, tmp_path):
    """Pre-encoding's done.json counts stories and shots; from other data with the same counts it must still
    read as another run (the pipeline's staleness compares these records), and from the same data as the
    same one."""
    import shutil

    from training.common import done_record
    from training.preencode import PreencodeConfig, preencode

    data = tmp_path / "data"
    shutil.copytree(micro_latents.parent / "data", data)
    cfg = PreencodeConfig(out_dir=str(tmp_path / "latents"), data_dir=str(data), preset="micro",
                          vae_path=str(micro_latents.parent / "vae.safetensors"), num_stories=2, shard_size=2)
    preencode(cfg, Dist())
    first = done_record(tmp_path / "latents")
    shutil.rmtree(tmp_path / "latents")
    preencode(cfg, Dist())
    assert done_record(tmp_path / "latents") == first  # encoded again from the same data
    captions = json.loads((data / "0001.json").read_text())
    captions["shot1"] = "close-up, a purple square, standing still."
    (data / "0001.json").write_text(json.dumps(captions))
    shutil.rmtree(tmp_path / "latents")
    preencode(cfg, Dist())
    other = done_record(tmp_path / "latents")
    assert other["stories"] == first["stories"] and other != first


def test_stages_leave_the_bundled_weights_alone_and_say_where_they_export(micro_latents, tmp_path, capsys):
    """No shipped config exports (running a tiny config by hand once overwrote the git-tracked weights,
    stage 2's interim student over dit.safetensors); a stage given export= says where it wrote."""
    import yaml

    from training import stage1_teacher

    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        assert not (yaml.safe_load(path.read_text()) or {}).get("export"), path.name
    copy = tmp_path / "copy" / "teacher.safetensors"
    copy.parent.mkdir()
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "t", "max_steps=1", "batch_size=2", f"export={copy}"))
    assert copy.is_file() and f"exported {copy}" in capsys.readouterr().out


def test_ode_pairs_pause_without_writing_a_partial_shard(micro_latents, tmp_path, monkeypatch):
    """A budget that runs out inside a shard writes none of it (a partial shard would be skipped on
    resume, leaving fewer pairs than the recipe); the shards finished stay, and the next sitting skips
    them and samples only the rest, into the pairs of one uninterrupted run."""
    from types import SimpleNamespace

    from shotstream_core.loading import save_dit
    from training import ode_pairs
    from training.common import StageInterrupted
    from training.data import LatentStoryDataset
    from training.ode_pairs import ODEConfig, generate

    sampled = []  # the targets of each teacher batch sampled
    sample_targets = ode_pairs.sample_targets

    def counted_sample(teacher, ds, targets, *a, **kw):
        sampled.append(list(targets))
        return sample_targets(teacher, ds, targets, *a, **kw)

    monkeypatch.setattr(ode_pairs, "sample_targets", counted_sample)
    # a clock that reads an hour later per batch sampled: 150 minutes run out after shard 0 (two batches)
    # and one batch of shard 1, so the cut falls inside shard 1 with part of it sampled
    monkeypatch.setattr(ode_pairs, "time", SimpleNamespace(perf_counter=lambda: 3600.0 * len(sampled)))
    save_dit(WanDiT(get_preset("micro").dit), tmp_path / "teacher.safetensors")
    cfg = ODEConfig(out_dir=str(tmp_path / "ode"), latent_dir=str(micro_latents), preset="micro",
                    teacher_path=str(tmp_path / "teacher.safetensors"), batch_size=1, shard_size=2, steps=50,
                    guidance=2.0, num_pairs=4, max_minutes=150)
    with pytest.raises(StageInterrupted, match="ode pairs stopped in shard 2 of 2"):
        generate(cfg, Dist())
    first, second = (tmp_path / "ode" / f"pairs_{n:04d}.safetensors" for n in range(2))
    assert len(sampled) == 3 and first.is_file() and not second.exists()  # shard 1's sampled batch was dropped
    assert sorted(p.name for p in (tmp_path / "ode").iterdir() if "pairs" in p.name) == [first.name]
    assert not (tmp_path / "ode" / "done.json").exists()
    kept = (first.stat().st_mtime_ns, first.read_bytes())
    summary = generate(cfg, Dist())  # the same command
    assert summary["pairs"] == 4 and summary["stop_reason"] == "done"
    # shard 0 was skipped, not sampled again: the second sitting sampled shard 1's two targets only
    t = [[target] for target in LatentStoryDataset(str(micro_latents)).targets[:4]]  # batches of one
    assert sampled == [t[0], t[1], t[2], t[2], t[3]]
    assert (first.stat().st_mtime_ns, first.read_bytes()) == kept
    whole = generate(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole"), max_minutes=0.0), Dist())
    assert whole["pairs"] == 4 and sampled[5:] == t
    for n in range(2):  # and the pairs are the uninterrupted run's
        name = f"pairs_{n:04d}.safetensors"
        a, b = load_file(str(tmp_path / "ode" / name)), load_file(str(tmp_path / "whole" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


_DDP_CLOCK = """
import os, sys, time
from types import SimpleNamespace
sys.path.insert(0, {repo!r})
from training import common, stage1_teacher
steps = []
teacher_loss = stage1_teacher.teacher_loss
def counted_loss(*a, **kw):
    steps.append(1)
    return teacher_loss(*a, **kw)
stage1_teacher.teacher_loss = counted_loss
if os.environ["RANK"] == "0":  # rank 0 alone reads an hour later per step taken; rank 1 keeps the real clock
    common.time = SimpleNamespace(perf_counter=lambda: 3600.0 * len(steps), time=time.time)
summary = stage1_teacher.main(sys.argv[1:])
print(f"[rank {{os.environ['RANK']}} finished] steps {{summary['steps']}}", flush=True)
"""


def _run_torchrun(cmd, timeout: float = 120):
    """Run a torchrun command; a hang fails the test and ends the workers too. (subprocess.run's timeout
    kills torchrun alone, and its workers, each in a session of its own, would stay stuck in a collective:
    SIGTERM makes torchrun stop them. Output goes to files, which no orphaned worker can hold open.)"""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            proc.terminate()  # torchrun's agent stops its workers on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if hung:
        pytest.fail(f"torchrun hung for {timeout:g} s (a rank waiting in a collective?)\n{res.stderr[-3000:]}")
    return res


def test_teacher_under_two_process_torchrun(micro_latents, tmp_path):
    """2-process gloo DDP: both ranks step together; rank 0 writes the checkpoint and teacher. A sitting's
    budget that runs out on one rank only pauses both ranks at the same step (no rank left waiting in a
    collective), and the same command then resumes the stage from that step on both ranks."""
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_clock.py"
    script.write_text(_DDP_CLOCK.format(repo=str(REPO)))
    # rank 0's 30 minutes run out after its first step (rank 1's never do): the cut falls at step 1, so the
    # second sitting's resumed_from tells a resume from a restart
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *_teacher_argv(micro_latents, out, "max_steps=2", "batch_size=1", "num_threads=1", "max_minutes=30")]
    res = _run_torchrun(cmd)
    assert res.returncode != 0 and "[paused] teacher stopped at step 1 of 2" in res.stdout, res.stderr[-3000:]
    assert "finished]" not in res.stdout and not (out / "done.json").exists()
    assert Checkpointer(out).latest_step() == 1
    res = _run_torchrun(cmd)  # the same command
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0 finished] steps 2" in res.stdout and "[rank 1 finished] steps 2" in res.stdout, res.stdout
    done = json.loads((out / "done.json").read_text())
    assert (done["steps"], done["resumed_from"]) == (2, 1) and (out / "teacher.safetensors").is_file()


def test_pipeline_evaluates_the_export_as_the_committed_report_was_made():
    """The evaluation after make train-tiny scores the exported weights into EXPORT/eval, with the settings
    of the committed report's regenerate command."""
    import re
    import shlex

    from training.evaluate import parse_args
    from training.pipeline import evaluation_args

    shipped = REPO / "shotstream_core" / "weights" / "tiny"
    committed = re.search(r"Regenerate: `python (-m training\.evaluate [^`]+)`", (shipped / "eval" / "report.md").read_text())
    want = parse_args(shlex.split(committed.group(1))[2:])
    got = parse_args(evaluation_args("tiny", shipped)[2:])
    assert (REPO / want.out).resolve() == got.out.resolve() == (shipped / "eval").resolve()
    assert dataclasses.replace(got, out=want.out) == want and got.weights_dir == shipped
    elsewhere = parse_args(evaluation_args("tiny", Path("/tmp/x"))[2:])
    assert elsewhere.weights_dir == Path("/tmp/x") and elsewhere.out == Path("/tmp/x/eval")


@pytest.mark.slow
def test_micro_pipeline_end_to_end(tmp_path):
    """make train-micro from nothing: every stage runs, the report and the shipped files appear."""
    import shutil

    runs = REPO / "runs" / "micro"
    shutil.rmtree(runs, ignore_errors=True)
    export = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "training.pipeline", "--preset", "micro", "--no-eval",
                          "--export-dir", str(export)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for name in ("vae.safetensors", "teacher.safetensors", "dit.safetensors", "training_report.md"):
        assert (export / name).is_file(), name
    report = (export / "training_report.md").read_text()
    assert "not run" not in report and "| decoder / detail |" in report
    # the shipped VAE is the decoder stage's, whose encoder is the VAE stage's
    from shotstream_core.vae import load_vae

    shipped = load_vae(export / "vae.safetensors").state_dict()
    first = load_vae(runs / "vae" / "vae.safetensors").state_dict()
    assert all(torch.equal(shipped[k], first[k]) for k in shipped if k.startswith(("encoder.", "conv1.", "latent_")))
    assert any(not torch.equal(shipped[k], first[k]) for k in shipped if k.startswith("decoder."))


def test_teacher_warm_start_loads_the_given_weights(micro_latents, tmp_path):
    """init_from starts the teacher from a saved DiT (0 steps: it ships exactly those weights); a DiT of the
    wrong size is refused by name."""
    from shotstream_core.config import get_preset
    from shotstream_core.loading import load_dit_state, save_dit
    from shotstream_core.model import WanDiT
    from training import stage1_teacher

    torch.manual_seed(123)
    start = WanDiT(get_preset("micro").dit)
    save_dit(start, tmp_path / "start.safetensors")
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "warm", "max_steps=0",
                                      f"init_from={tmp_path / 'start.safetensors'}"))
    shipped, _ = load_dit_state(tmp_path / "warm" / "teacher.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in start.state_dict().items())
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "cold", "max_steps=0"))
    cold, _ = load_dit_state(tmp_path / "cold" / "teacher.safetensors")
    assert any(not torch.equal(cold[k], v) for k, v in start.state_dict().items())

    save_dit(WanDiT(get_preset("micro").dit.__class__(dim=32, ffn_dim=64, num_heads=2, num_layers=1,
                                                      freq_dim=32, text_dim=32, text_len=16)),
             tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="init_from .* 32-dim 1-layer"):
        stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "bad", "max_steps=0",
                                          f"init_from={tmp_path / 'small.safetensors'}"))


def test_teacher_can_train_self_attention_only(micro_latents, tmp_path):
    """trainable=self_attn (the reference's fine-tune): after a few steps only self-attention moved."""
    from shotstream_core.config import get_preset
    from shotstream_core.loading import load_dit_state, save_dit
    from shotstream_core.model import WanDiT
    from training import stage1_teacher

    torch.manual_seed(5)
    save_dit(WanDiT(get_preset("micro").dit), tmp_path / "start.safetensors")
    start, _ = load_dit_state(tmp_path / "start.safetensors")
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "sa", "max_steps=3", "trainable=self_attn",
                                      f"init_from={tmp_path / 'start.safetensors'}", "lr=1.0e-2"))
    tuned, _ = load_dit_state(tmp_path / "sa" / "teacher.safetensors")
    moved = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert moved and all(".self_attn." in k for k in moved), sorted(moved)[:5]
    # A marker the warm start adds (zero at first) trains with self-attention, or it would ship as zero.
    alone = get_preset("micro").sampler.context_frames + 1
    stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "sa2", "max_steps=3", "trainable=self_attn",
                                      f"init_from={tmp_path / 'start.safetensors'}", "lr=1.0e-2",
                                      f"dit={{coded_alone_frames: {alone}}}"))
    tuned, _ = load_dit_state(tmp_path / "sa2" / "teacher.safetensors")
    moved = {k for k in tuned if k not in start or not torch.equal(start[k], tuned[k])}
    assert "coded_alone" in moved and tuned["coded_alone"].abs().max() > 0
    assert all(".self_attn." in k for k in moved - {"coded_alone"}), sorted(moved)[:5]
    with pytest.raises(ValueError, match="trainable must be"):
        stage1_teacher.main(_teacher_argv(micro_latents, tmp_path / "bad", "max_steps=0", "trainable=attn"))


def test_first_frame_weight_weighs_the_first_frame():
    from training.vae_stage import frame_weighted_mean

    err = torch.zeros(2, 3, 5, 4, 4)
    err[:, :, 0] = 1.0  # all the error in the first frame
    assert float(frame_weighted_mean(err, 1.0)) == pytest.approx(err.mean().item())
    assert float(frame_weighted_mean(err, 4.0)) == pytest.approx(4 / 8)
    err = torch.zeros(2, 3, 5, 4, 4)
    err[:, :, 3] = 1.0  # a later frame: weighting the first one down-weighs it
    assert float(frame_weighted_mean(err, 4.0)) == pytest.approx(1 / 8)


class _HistoryFreeEncoder(nn.Module):
    """Stands in for the VAE encoder: each chunk's latent is its frames' mean colour, pooled 8x8, with no
    causal past at all. A correct shift alignment then sees no difference between the two encodings."""

    def __init__(self, z2: int):
        super().__init__()
        self.z2 = z2

    def forward(self, chunk, cache):
        pooled = nn.functional.avg_pool3d(chunk.mean(dim=2, keepdim=True), (1, 8, 8))  # [B, 3, 1, h, w]
        return pooled.repeat(1, -(-self.z2 // 3), 1, 1, 1)[:, :self.z2]


def test_latent_shift_loss_compares_the_same_frames_one_chunk_apart():
    """mu[j+1] of a clip and mu_shifted[j] of the clip from frame 4 on must be the same four frames: with an
    encoder that has no past the loss is 0, and the same latents one chunk off are not."""
    from shotstream_core.vae import WanVAE
    from training.vae_stage import VAEAutoencoder, latent_shift_loss, still_frame_loss

    torch.manual_seed(0)
    vae = WanVAE("micro")
    z2 = vae.conv1.out_channels
    vae.encoder = _HistoryFreeEncoder(z2)
    with torch.no_grad():  # conv1: identity, so mu is the pooled colour
        vae.conv1.weight.zero_()
        vae.conv1.bias.zero_()
        vae.conv1.weight[:, :, 0, 0, 0] = torch.eye(z2)
    clip = torch.rand(2, 3, 17, 16, 16) * 2 - 1  # every frame different
    with torch.no_grad():
        _, mu, _, extra = VAEAutoencoder(vae, sample_latent=False)(clip, None, shifted=True, still=True)
    mu_shifted = extra["shifted"]
    assert mu.shape[2] == 5 and mu_shifted.shape[2] == 4 and extra["still"].shape[2] == 2
    # a history-free encoder codes a frame alone as it codes a still chunk of it
    assert float(still_frame_loss(extra["still"])) < 1e-10
    assert float(still_frame_loss(mu[:, :, :2])) > 0.5  # frame 0 against frames 1-4 of the moving clip
    assert float(latent_shift_loss(mu, mu_shifted)) < 1e-10
    off_by_one = latent_shift_loss(mu[:, :, :-1], mu_shifted[:, :, 1:])  # mu[j] against mu_shifted[j]
    assert float(off_by_one) > 0.5
    # scale-free: shrinking both latents cannot lower it
    a, b = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 2, 2, 2)
    assert float(latent_shift_loss(0.01 * a, 0.01 * b)) == pytest.approx(float(latent_shift_loss(a, b)), rel=1e-4)
    with pytest.raises(ValueError, match="at least 9 frames"):
        latent_shift_loss(a[:, :, :2], b[:, :, :1])
    with pytest.raises(ValueError, match="5-frame still clip"):
        still_frame_loss(a)


def _fit_micro_encoder(clip_frames: int, loss_of, steps: int = 30, **wanted) -> list[float]:
    """Train a fresh micro VAEAutoencoder on one fixed batch of Story World clips with loss_of(mu, extra)
    (extra: the encodings forward was asked for, **wanted); the loss at each step."""
    from shotstream_core.config import get_preset
    from shotstream_core.vae import WanVAE
    from training import vae_stage
    from training.storyworld.render import render_story
    from training.storyworld.world import make_split

    frames, _ = render_story(make_split("train", 1, num_shots=1)[0], get_preset("micro").geometry)
    clips = vae_stage.sample_clips(torch.from_numpy(frames[None]), [0, 0], clip_frames, 16,
                                   torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = vae_stage.VAEAutoencoder(WanVAE("micro"), sample_latent=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        _, mu, _, extra = model(clips, None, **wanted)
        loss = loss_of(mu, extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_latent_shift_weight_makes_latents_stationary_on_a_fixed_batch(tmp_path):
    """Trained on the shift loss, a micro encoder's latent of the same frames stops depending on where they
    fall in the clip (the loss over a fixed batch falls clearly), and the stage refuses the loss where the
    encoder is frozen or the clips too short, naming the fix."""
    from shotstream_core.config import get_preset
    from training import vae_stage

    losses = _fit_micro_encoder(13, lambda mu, extra: vae_stage.latent_shift_loss(mu, extra["shifted"]), shifted=True)
    assert losses[-1] < 0.3 * losses[0], losses[::6]

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    base = ["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "num_stories=2", "--set", "max_steps=2", "--set", "phases=[]", "--set", "latent_shift_weight=1.0"]
    summary = vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'ok'}", "--set", "clip_frames=9"])
    assert len(summary["latent_adjacent_corr"]) == get_preset("micro").geometry.latent_frames - 1
    logged = [json.loads(line) for line in (tmp_path / "ok" / "log.jsonl").read_text().splitlines()]
    assert all("shift" in rec for rec in logged if "loss" in rec)
    with pytest.raises(ValueError, match="clip_frames 5"):
        vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'short'}", "--set", "clip_frames=5"])


def test_still_frame_weight_ties_the_single_frame_code_to_a_still_chunk(tmp_path):
    """A fresh micro encoder codes a frame alone unlike a still chunk of it; trained on the still-frame loss
    the two codes meet (the loss over a fixed batch falls clearly). The stage logs it, and refuses it where
    the encoder is frozen, naming the fix."""
    from shotstream_core.config import get_preset
    from training import vae_stage

    losses = _fit_micro_encoder(5, lambda mu, extra: vae_stage.still_frame_loss(extra["still"]), still=True)
    assert losses[0] > 0.1 and losses[-1] < 0.3 * losses[0], losses[::6]

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    base = ["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "num_stories=2", "--set", "max_steps=2", "--set", "phases=[]", "--set", "still_frame_weight=1.0"]
    vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'ok'}"])
    logged = [json.loads(line) for line in (tmp_path / "ok" / "log.jsonl").read_text().splitlines()]
    assert all("still" in rec for rec in logged if "loss" in rec)
    with pytest.raises(ValueError, match="train_part all"):
        vae_stage.main(base + ["--set", f"out_dir={tmp_path / 'frozen'}", "--set", "train_part=decoder",
                               "--set", f"init_from={tmp_path / 'ok' / 'vae.safetensors'}"])


def _frame_with_small_square(h: int = 32, w: int = 32) -> torch.Tensor:
    """[1, 3, 1, h, w]: a flat blue frame with a small red 6x6 square (about 4% of the pixels)."""
    clip = torch.zeros(1, 3, 1, h, w)
    clip[:, 2] = 0.6
    clip[:, :, :, 10:16, 20:26] = torch.tensor([0.9, -0.8, -0.8]).view(1, 3, 1, 1, 1)
    return clip


def test_detail_weights_single_out_a_small_object():
    from training.detail import detail_pixel_weights

    clip = _frame_with_small_square()
    assert detail_pixel_weights(clip, 0.0, 3) is None
    w = detail_pixel_weights(clip, 4.0, 3)
    assert w.shape == (1, 1, 1, 32, 32)
    assert float(w.mean()) == pytest.approx(5.0, rel=1e-4)  # 1 + detail_weight on average
    on_square, far_away = w[0, 0, 0, 10:16, 20:26].mean(), w[0, 0, 0, 24:, :8].mean()
    assert far_away == pytest.approx(1.0, abs=1e-3)  # flat background keeps the base weight
    assert on_square > 10 * far_away
    flat = torch.full((1, 3, 1, 16, 16), 0.3)
    assert torch.allclose(detail_pixel_weights(flat, 4.0, 3), torch.ones(1, 1, 1, 16, 16), atol=1e-2)


def test_detail_weighting_makes_losing_a_small_object_cost_more():
    """Blurring away a 4% object costs about 4% error unweighted; with detail weights it dominates the loss,
    far above a uniform background tint of the same mean error."""
    from training.detail import detail_pixel_weights
    from training.vae_stage import frame_weighted_mean

    clip = _frame_with_small_square()
    lost_object = clip.clone()
    lost_object[:, :, :, 10:16, 20:26] = clip[:, :, :, 0:6, 0:6]  # the square painted over with background
    tint = clip + (lost_object - clip).abs().mean()  # same mean L1 error, spread over the whole frame
    w = detail_pixel_weights(clip, 4.0, 3)

    def l1(recon, weights):
        return float(frame_weighted_mean((recon - clip).abs(), 1.0, weights))

    assert l1(lost_object, None) == pytest.approx(l1(tint, None), rel=1e-4)
    assert l1(lost_object, w) > 3 * l1(tint, w)


def test_latent_detail_map_puts_a_small_object_in_its_latent_cell():
    """A 6x6 square shown only in pixel frames 5-8 (the causal VAE's third latent frame) lands in that
    latent frame's cell that holds it; the flat frames have no detail."""
    from training.detail import latent_detail_map

    video = torch.zeros(1, 3, 9, 32, 32)
    video[:, 2] = 0.6
    video[:, :, 5:9] = _frame_with_small_square().expand(-1, -1, 4, -1, -1)
    d = latent_detail_map(video, 4, 8, 3)
    assert d.shape == (1, 3, 4, 4)
    assert float(d[0, :2].abs().max()) == pytest.approx(0.0, abs=1e-5)
    assert tuple(int(i) for i in (d[0, 2] == d[0, 2].max()).nonzero()[0]) == (1, 2)  # rows 10-15, cols 20-25
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        latent_detail_map(video[:, :, :8], 4, 8, 3)


def test_bf16_autocast_follows_the_config_where_the_cpu_has_native_bf16(monkeypatch, capsys):
    """bf16: true autocasts on a CPU with native bf16; on one without (AVX2 only), where emulated bf16 runs
    the VAE ~20x slower, the stage trains in fp32 and says so once."""
    import training.common as common

    x = torch.randn(4, 4)
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "_cpu_has_native_bf16", lambda: True)
    with common.autocast(StageConfig(bf16=True), cpu):
        assert (x @ x).dtype == torch.bfloat16
    with common.autocast(StageConfig(bf16=False), cpu):
        assert (x @ x).dtype == torch.float32
    assert "[bf16]" not in capsys.readouterr().out

    monkeypatch.setattr(common, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(common, "_warned_emulated_bf16", set())
    for _ in range(2):
        with common.autocast(StageConfig(bf16=True), cpu):
            assert (x @ x).dtype == torch.float32
    out = capsys.readouterr().out
    assert out.count("[bf16]") == 1 and "AMX-BF16" in out and "fp32" in out


def test_report_names_how_a_run_departed_from_its_config(tmp_path):
    """The training report lists the fields a run overrode (from its saved config.yaml) against its config
    file as the pipeline runs it: none for a pipeline run of the recipe (not the export the pipeline
    always turns off), an export asked for by hand, and a cut budget or a warm start."""
    from training.common import save_config
    from training.pipeline import STAGES, pipeline_overrides, run_overrides, stage_config_path
    from training.stage1_teacher import TeacherConfig

    stage = next(s for s in STAGES if s.name == "teacher")
    recipe = stage_config_path("tiny", stage)
    as_pipeline = pipeline_overrides(stage)
    save_config(load_stage_config(TeacherConfig, recipe, as_pipeline), tmp_path / "config.yaml")
    assert run_overrides("tiny", stage, tmp_path) == {}
    by_hand = load_stage_config(TeacherConfig, recipe, ["export=elsewhere/teacher.safetensors"])
    save_config(by_hand, tmp_path / "config.yaml")
    assert run_overrides("tiny", stage, tmp_path) == {"export": "elsewhere/teacher.safetensors"}
    save_config(load_stage_config(TeacherConfig, recipe, [*as_pipeline, "max_steps=7", "init_from=prev.safetensors"]),
                tmp_path / "config.yaml")
    assert run_overrides("tiny", stage, tmp_path) == {"max_steps": 7, "init_from": "prev.safetensors"}
    assert run_overrides("tiny", stage, tmp_path / "never_ran") == {}


def test_export_waits_for_a_student_and_never_half_replaces_the_shipped_model(tmp_path, monkeypatch):
    """A run cut after its VAE (or a --only data run) leaves the export folder as it was, report included;
    once a student stage is done, the VAE, teacher and student are exported together."""
    from training import pipeline

    runs = {s.name: tmp_path / "runs" / s.name for s in pipeline.STAGES}
    monkeypatch.setattr(pipeline, "stage_out_dir", lambda preset, stage: runs[stage.name])
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "training_report.md").write_text("the shipped run")
    for stage, name in (("decoder", "vae.safetensors"), ("teacher", "teacher.safetensors")):
        runs[stage].mkdir(parents=True)
        (runs[stage] / name).write_bytes(stage.encode())
        mark_done(runs[stage], steps=1)
    assert pipeline.export("micro", shipped) == []
    monkeypatch.setattr(pipeline, "make_data", lambda preset, data_dir: None)
    assert pipeline.main(["--preset", "micro", "--only", "data", "--no-eval", "--export-dir", str(shipped)]) == 0
    assert sorted(p.name for p in shipped.iterdir()) == ["training_report.md"]
    assert (shipped / "training_report.md").read_text() == "the shipped run"

    runs["stage2"].mkdir(parents=True)
    (runs["stage2"] / "student.safetensors").write_bytes(b"stage2")
    mark_done(runs["stage2"], steps=1)
    assert sorted(pipeline.export("micro", shipped)) == [
        "dit.safetensors (from stage2)", "teacher.safetensors (from teacher)", "vae.safetensors (from decoder)"]
    assert (shipped / "vae.safetensors").read_bytes() == b"decoder"
    assert (shipped / "dit.safetensors").read_bytes() == b"stage2"
    with pytest.raises(SystemExit):  # a misspelt stage is refused, not silently skipped
        pipeline.main(["--preset", "micro", "--only", "teachr", "--export-dir", str(shipped)])


def test_training_report_keeps_the_sizes_a_stage_finished_with(tmp_path, monkeypatch):
    """done.json records the checkpoints' and outputs' sizes when a stage finishes, and the report reads
    them: pruning the checkpoints, or moving a finished run without them, leaves its row right."""
    import shutil

    from training import pipeline
    from training.common import mark_done

    monkeypatch.setattr(pipeline, "stage_out_dir", lambda preset, stage: tmp_path / "runs" / stage.name)
    out = tmp_path / "runs" / "teacher"
    (out / "checkpoints" / "step_10").mkdir(parents=True)
    (out / "checkpoints" / "step_10" / "state.safetensors").write_bytes(b"x" * 3 * 2**20)
    (out / "teacher.safetensors").write_bytes(b"y" * 2**20)
    (out / "log.jsonl").write_text(json.dumps({"step": 10, "loss": 0.5}) + "\n")
    mark_done(out, steps=10, wall_s=60.0, stop_reason="max_steps")
    done = json.loads((out / "done.json").read_text())
    assert done["checkpoint_bytes"] == 3 * 2**20 and done["output_bytes"] == 2**20

    shutil.rmtree(out / "checkpoints")
    ode = tmp_path / "runs" / "ode"  # a stage that keeps no checkpoints
    (ode / "pairs.safetensors").parent.mkdir(parents=True)
    (ode / "pairs.safetensors").write_bytes(b"z" * 2**20)
    mark_done(ode, pairs=4, wall_s=6.0, stop_reason="done")
    (tmp_path / "export").mkdir()
    report = pipeline.write_training_report("micro", tmp_path / "export").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| teacher |"))
    assert row.endswith("| 3.00 MiB | 1.00 MiB |"), row
    row = next(line for line in report.splitlines() if line.startswith("| ode |"))
    assert row.endswith("| none | 1.00 MiB |"), row
    assert "| stage2 | not run |" in report


def test_pipeline_stages_leave_the_shipped_weights_to_the_export_step():
    """Under the pipeline every stage's effective config exports nothing, even where a config file was
    given an `export:` path, so a run with --export-dir elsewhere (or one cut half-way) never overwrites
    the committed weights: only the export step writes them."""
    from training import pipeline
    from training.common import load_stage_config

    for stage in pipeline.STAGES:
        cmd = pipeline.stage_command("tiny", stage, nproc=2)
        cls = pipeline._config_class(stage.config_cls)
        config_path = cmd[cmd.index("--config") + 1]
        overrides = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
        if hasattr(cls(), "export"):
            assert overrides == ["export="], stage.name  # a path set in the file is turned off
        assert not getattr(load_stage_config(cls, config_path, overrides), "export", ""), stage.name


def test_status_says_how_far_a_cut_run_got(tmp_path):
    """--status reads the run folders: not started, the phase and checkpoint step a cut curriculum stopped
    at, the output files a cut ODE run wrote, and done with its steps."""
    from training.common import pause_stage
    from training.ode_pairs import ODEConfig
    from training.pipeline import main, run_status
    from training.stage1_teacher import TeacherConfig
    from training.vae_stage import VAEStageConfig

    def checkpoint(out, step):
        (out / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (out / "checkpoints" / f"step_{step:08d}" / "state.pt").write_bytes(b"")

    vae = VAEStageConfig(out_dir=str(tmp_path / "vae"), phases=({"name": "a", "max_steps": 3},
                                                                 {"name": "b", "max_steps": 4}))
    assert run_status(vae) == "not started"
    mark_done(tmp_path / "vae" / "a", steps=3)
    checkpoint(tmp_path / "vae" / "b", 2)
    assert run_status(vae) == "phase b (2 of 2) at step 2 of 4"
    (tmp_path / "vae" / "b.collapsed_seed0").mkdir()
    assert run_status(vae) == "phase b (2 of 2) (retry 1 after a collapse) at step 2 of 4"
    mark_done(tmp_path / "vae", steps=7, wall_s=120.0, stop_reason="phases done")
    assert run_status(vae) == "done: 7 steps in 2.0 min (phases done)"

    teacher = TeacherConfig(out_dir=str(tmp_path / "teacher"), max_steps=9)
    checkpoint(tmp_path / "teacher", 5)
    assert run_status(teacher) == "at step 5 of 9"
    pause_stage(tmp_path / "teacher", "teacher stopped at step 5 of 9: this sitting's time budget ran out")
    assert run_status(teacher) == "at step 5 of 9 (paused; run it again to go on)"
    ode = ODEConfig(out_dir=str(tmp_path / "ode"))
    for n in range(2):
        (tmp_path / "ode").mkdir(exist_ok=True)
        (tmp_path / "ode" / f"pairs_{n:04d}.safetensors").write_bytes(b"")
    assert run_status(ode) == "2 pairs files written"
    assert main(["--preset", "micro", "--status", "--only", "teacher"]) == 0


def test_input_dependence_tells_a_collapsed_autoencoder_from_a_working_one():
    """1 for reconstructions that follow their inputs, 0 for one image whatever the input."""
    from training.vae_stage import COLLAPSED_BELOW, input_dependence

    clips = torch.rand(4, 3, 5, 16, 16) * 2 - 1
    assert input_dependence(clips, clips.clone()) == pytest.approx(1.0)
    assert input_dependence(clips, torch.full_like(clips, 0.3)) < COLLAPSED_BELOW
    # Still on the mean-image plateau: reconstructions a few percent of the way from the mean to the clip.
    mean = clips.mean(dim=0, keepdim=True)
    assert input_dependence(clips, mean + 0.07 * (clips - mean)) < COLLAPSED_BELOW
    assert input_dependence(clips, mean + 0.7 * (clips - mean)) > COLLAPSED_BELOW  # blurred but working
    with pytest.raises(ValueError, match="at least 2 clips"):
        input_dependence(clips[:1], clips[:1])


def test_vae_phase_on_crops_the_dit_could_not_take_finishes_with_its_collapse_check(tmp_path):
    """The tiny recipe's phase c trains on 24x24 crops: the end-of-phase check must reconstruct them the
    way training does (the engine's encode rejects sizes that are not a multiple of 16)."""
    from shotstream_core.config import get_preset
    from training import vae_stage

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    vae_stage.main(["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
                    "--set", f"out_dir={tmp_path / 'vae'}", "--set", "num_stories=2", "--set",
                    "phases=[{name: c, clip_frames: 5, crop: 24, max_steps: 1}]"])
    done = json.loads((tmp_path / "vae" / "c" / "done.json").read_text())
    assert 0.0 < done["input_dependence"] and (tmp_path / "vae" / "vae.safetensors").is_file()


def test_a_collapsed_vae_phase_is_set_aside_and_trained_again_with_the_next_seed(tmp_path, monkeypatch):
    """A phase whose result has collapsed moves to <name>.collapsed_seed<N> and trains again with seed N+1;
    the next phase starts from the retry. A run that finds a set-aside attempt resumes with the next seed.
    When every retry collapses, the stage stops with an error that names the fix, keeping the attempts."""
    from shotstream_core.config import get_preset
    from training import vae_stage

    write_training_set(tmp_path / "data", 2, get_preset("micro").geometry, 1, 2)
    argv = ["--config", str(REPO / "training/configs/micro-vae.yaml"), "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "num_stories=2", "--set", "phases=[{name: a, clip_frames: 5, crop: 16, max_steps: 2}]",
            "--set", "collapse_check_steps=2"]
    measured = iter([0.0, 0.9])  # the first attempt collapses, the retry does not
    monkeypatch.setattr(vae_stage, "input_dependence", lambda vae, clips: next(measured))
    vae_stage.main(argv + ["--set", f"out_dir={tmp_path / 'vae'}"])
    aside = tmp_path / "vae" / "a.collapsed_seed0"
    assert json.loads((aside / "done.json").read_text())["input_dependence"] == 0.0
    retry = tmp_path / "vae" / "a"
    assert json.loads((retry / "done.json").read_text())["input_dependence"] == 0.9
    assert load_stage_config(vae_stage.VAEStageConfig, retry / "config.yaml").seed == 1
    stage = json.loads((tmp_path / "vae" / "done.json").read_text())
    first = stage["phases"][0]
    assert first["input_dependence"] == 0.9 and first["collapsed_attempts"] == 1
    aside_wall = json.loads((aside / "done.json").read_text())["wall_s"]
    assert first["collapsed_wall_s"] == aside_wall > 0
    assert stage["wall_s"] == pytest.approx(first["wall_s"] + aside_wall)  # the stage's time counts both

    (tmp_path / "cut" / "a.collapsed_seed0").mkdir(parents=True)  # a run cut during its first retry
    monkeypatch.setattr(vae_stage, "input_dependence", lambda vae, clips: 0.9)
    vae_stage.main(argv + ["--set", f"out_dir={tmp_path / 'cut'}"])
    assert load_stage_config(vae_stage.VAEStageConfig, tmp_path / "cut" / "a" / "config.yaml").seed == 1

    monkeypatch.setattr(vae_stage, "input_dependence", lambda vae, clips: 0.0)
    with pytest.raises(RuntimeError, match="collapsed with seeds 0..1.*collapse_retries"):
        vae_stage.main(argv + ["--set", f"out_dir={tmp_path / 'bad'}", "--set", "collapse_retries=1"])
    assert (tmp_path / "bad" / "a.collapsed_seed0").is_dir() and (tmp_path / "bad" / "a" / "done.json").is_file()
    assert not (tmp_path / "bad" / "done.json").exists()
    vae_stage.main(argv + ["--set", f"out_dir={tmp_path / 'short'}", "--set", "collapse_check_steps=3"])
    assert not list((tmp_path / "short").glob("*.collapsed_seed*"))  # 2 steps: too short to judge


def test_a_non_finite_step_is_skipped_and_a_run_of_them_stops_the_stage(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # An overflowing step: its gradients are NaN, and the update is skipped instead of poisoning the weights.
    norm = optimizer_step(model(torch.full((2, 4), float("nan"))).sum(), opt, list(model.parameters()), 1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A finite step still trains, with or without clipping.
    x = torch.randn(8, 4)
    for clip in (1.0, 0.0):
        norm = optimizer_step(model(x).pow(2).mean(), opt, list(model.parameters()), clip)
        assert math.isfinite(norm) and norm > 0
    assert not torch.equal(before["weight"], model.weight)

    cfg = StageConfig(out_dir=str(tmp_path / "stage"), max_steps=40, ckpt_every=5, warmup_steps=0)
    poisoned_from = 12  # every step from here on overflows

    def step_fn(step: int) -> dict:
        bad = step >= poisoned_from or step == 3  # one stray bad step early on is skipped and forgotten
        inp = torch.full((2, 4), float("nan")) if bad else x
        gn = optimizer_step(model(inp).pow(2).mean(), opt, list(model.parameters()), 1.0)
        return {"loss": 0.0, "grad_norm": gn}

    with pytest.raises(RuntimeError, match="non-finite gradients.*bf16: false"):
        train_loop(cfg, Dist(), {"model": model}, {"opt": opt}, step_fn, desc="overflow")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The checkpoints it left hold finite weights and resume from where the run was last healthy.
    ckpt = Checkpointer(tmp_path / "stage", keep=2)
    assert ckpt.latest_step() == 20
    restored = nn.Linear(4, 1)
    ckpt.load({"model": restored}, {"opt": torch.optim.AdamW(restored.parameters(), lr=1e-2)})
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_opens_cleanly_reads_a_jump_at_frame_1():
    """The ODE pairs' opening filter drops a shot whose first frame jumps against the rest (what the
    evaluation counts as a spurious opening) and keeps one that opens like it goes on."""
    from training.ode_pairs import opens_cleanly

    rng = np.random.default_rng(0)
    smooth = np.full((17, 32, 32, 3), 90, np.uint8)
    for t in range(17):  # a square moving right over a flat ground
        smooth[t, 10:18, t:t + 8] = (200, 40, 40)
    smooth = np.clip(smooth.astype(int) + rng.integers(-2, 3, smooth.shape), 0, 255).astype(np.uint8)
    jumped = smooth.copy()
    jumped[0] = (20, 160, 220)  # frame 0 another picture
    assert opens_cleanly([smooth, jumped]) == [True, False]


def test_ode_pairs_opening_filter_keeps_only_clean_openings(micro_latents, tmp_path, monkeypatch):
    """With opening_filter, the pairs stored are exactly the unfiltered run's pairs whose sample the
    filter passes (latents, context, flags, prompt ids and target kept together), the dropped ones are
    counted as sampled, and a set emptied by the filter is refused by name when stage 2 reads it."""
    from safetensors.torch import load_file, save_file

    from shotstream_core.loading import save_dit
    from training import ode_pairs
    from training.ode_pairs import ODEConfig, ODEPairs, generate

    torch.manual_seed(0)
    save_dit(WanDiT(get_preset("micro").dit), tmp_path / "teacher.safetensors")
    cfg = ODEConfig(out_dir=str(tmp_path / "all"), latent_dir=str(micro_latents), preset="micro",
                    teacher_path=str(tmp_path / "teacher.safetensors"),
                    vae_path=str(micro_latents.parent / "vae.safetensors"), batch_size=3, shard_size=3, steps=4,
                    guidance=2.0, num_pairs=6)
    full = generate(cfg, Dist())
    every = ODEPairs(tmp_path / "all")
    # a random micro teacher's samples all open cleanly: judge them by a property of their pixels that
    # splits them (the parity of frame 0's sum), so that the filter drops some and the bookkeeping is tested
    judged = []

    def even_sum(shots):
        verdict = [int(s[0].astype(np.int64).sum()) % 2 == 0 for s in shots]
        judged.extend(verdict)
        return verdict

    monkeypatch.setattr(ode_pairs, "opens_cleanly", even_sum)
    summary = generate(dataclasses.replace(cfg, out_dir=str(tmp_path / "kept"), opening_filter=True), Dist())
    assert full["pairs"] == 6 and "sampled" not in full
    assert summary["sampled"] == 6 and summary["pairs"] == sum(judged) and 0 < sum(judged) < 6, judged
    kept = ODEPairs(tmp_path / "kept")
    mask = torch.tensor(judged)
    for key in ("latents", "context", "flags", "prompt_ids", "target"):
        assert torch.equal(getattr(kept, key), getattr(every, key)[mask]), key
    # an emptied set: stage 2 would read nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    shard = load_file(str(next((tmp_path / "all").glob("pairs_*.safetensors"))))
    save_file({k: (v[:0] if v.dim() and k != "timesteps" else v) for k, v in shard.items()},
              str(empty / "pairs_0000.safetensors"))
    with pytest.raises(ValueError, match="opening_filter dropped every sample"):
        ODEPairs(empty)
