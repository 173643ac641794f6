"""Stages 3-4: self-forcing rollout, DMD / critic losses, LoRA, and the stage entry points (micro preset)."""
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from shotstream_core.config import get_preset
from shotstream_core.context import plan_context
from shotstream_core.engine import ShotRequest, ShotStreamEngine
from shotstream_core.loading import merge_lora
from shotstream_core.model import CausalWanDiT, WanDiT
from shotstream_core.schedule import FlowSchedule
from shotstream_core.text import RandomTextEncoder
from shotstream_core.vae import WanVAE
from training.dmd import DMDHyper, DMDLoss, DMDTrainer, is_generator_step, uncond_like
from training.lora import adapter_state_dict, apply_lora, merged_state_dict
from training.rollout import SelfForcingRollout, ShotConditioning, make_conditioning

REPO = Path(__file__).resolve().parents[1]
PRESET = get_preset("micro")
CFG, GEO, SAMPLER = PRESET.dit, PRESET.geometry, PRESET.sampler
C, F, H, W = CFG.in_channels, GEO.latent_frames, GEO.latent_height, GEO.latent_width
FC = SAMPLER.context_frames



def micro_student(seed=0):
    torch.manual_seed(seed)
    return CausalWanDiT(CFG).eval()


def micro_engine(student, sampler=SAMPLER):
    torch.manual_seed(0)
    vae = WanVAE(PRESET.vae).eval().requires_grad_(False)
    text = RandomTextEncoder(CFG.text_dim, CFG.text_len)
    return ShotStreamEngine(student, vae, text, dataclasses.replace(PRESET, sampler=sampler), "micro-test")


def first_shot_cond(text_seed=0, batch=1):
    g = torch.Generator().manual_seed(text_seed)
    prompts = [[torch.randn(5, CFG.text_dim, generator=g)] for _ in range(batch)]
    plan = plan_context([], FC)
    return make_conditioning(torch.zeros(batch, C, FC, H, W), prompts, [plan.flags] * batch,
                             [plan.shot_flag] * batch, F)


# --- rollout ------------------------------------------------------------------------------------------

def engine_cond(engine, state, request):
    """The conditioning training builds for the next shot of `state`: the engine's context plan, and the
    prompts of every shot so far (stages 3-4 pass them all; the engine encodes only those in play)."""
    from shotstream_core.text import build_shot_prompt

    plan = plan_context([s.num_frames for s in state.shots], SAMPLER.context_frames)
    shots = [(s.global_caption, s.caption) for s in state.shots] + [(request.global_caption, request.caption)]
    count = engine.prompts.encoder.count_tokens
    prompts = [engine.prompts.get(build_shot_prompt(g, c, i, count, engine.text_max_tokens))
               for i, (g, c) in enumerate(shots)]
    ctx = engine._context_latents(state, plan, (H, W))
    return make_conditioning(ctx, [prompts], [list(plan.flags)], [plan.shot_flag], F)


@pytest.mark.parametrize("shots_before, first_block_frames", [(0, None), (2, None), (8, None), (2, 1)])
def test_rollout_equals_engine_sampling(shots_before, first_block_frames):
    """Grad off, exit = last step, no refresh noise: the rollout is the engine's sampler, noise for noise,
    on the reference's blocks and with the first latent frame as a block of its own.
    After 8 shots the first two have left the context: the engine no longer encodes their prompts, and
    still samples what training's conditioning (all prompts) gives."""
    sampler = dataclasses.replace(SAMPLER, first_block_frames=first_block_frames)
    engine = micro_engine(micro_student(), sampler)
    state = engine.new_story()
    for i in range(shots_before):
        state, _ = engine.generate_shot(state, ShotRequest("a story", f"shot number {i}", seed=10 + i))
    request = ShotRequest("a story", "the next shot", seed=7)
    blocks = [b.latents for b in engine.stream_shot(state, request)]
    expected = torch.cat(blocks, 2)

    rollout = SelfForcingRollout(sampler, refresh_sigma=0.0)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(1, C, F, H, W, generator=gen)  # drawn first, as the engine does
    with torch.no_grad():
        got = rollout(engine.dit, engine_cond(engine, state, request), noise, rollout.num_steps - 1, gen, grad=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plan = plan_context([s.num_frames for s in state.shots], SAMPLER.context_frames)
    flags = torch.tensor([list(plan.flags) + [plan.shot_flag] * F])
    text, _ = engine.shot_text(state, request, flags)
    assert text.shape[1] == (1 if shots_before == 0 else len(set(plan.flags)) + 1) <= SAMPLER.context_frames + 1


def test_exit_step_is_the_only_path_for_gradients():
    student = micro_student()
    rollout = SelfForcingRollout(SAMPLER)
    calls = []  # grad mode of each forward_cached call, in order
    original = student.forward_cached

    def spy(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    student.forward_cached = spy
    cond = first_shot_cond()
    context = cond.context.clone().requires_grad_(True)
    cond = ShotConditioning(context, cond.text, cond.flags, cond.prompt_ids)
    for exit_step in range(rollout.num_steps):
        calls.clear()
        noise = torch.randn(1, C, F, H, W, requires_grad=True)
        out = rollout(student, cond, noise, exit_step, torch.Generator().manual_seed(0))
        blocks = -(-F // SAMPLER.block_frames)
        # context pass, then per block: exit_step + 1 denoising passes and one refresh (none after the last)
        assert len(calls) == 1 + blocks * (exit_step + 2) - 1
        per_block = [False] * exit_step + [True] + [False]
        assert calls == [False] + (per_block * blocks)[:-1]
        g_noise, g_ctx = torch.autograd.grad(out.sum(), [noise, context], allow_unused=True, retain_graph=True)
        assert g_ctx is None  # the global cache is filled without grad
        if exit_step == 0:  # the noise is the exit pass's own input
            assert g_noise is not None and g_noise.abs().sum() > 0
        else:  # earlier steps ran without grad: the noise cannot be reached
            assert g_noise is None
        names, weights = zip(*student.named_parameters())
        grads = dict(zip(names, torch.autograd.grad(out.sum(), list(weights), allow_unused=True)))
        assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
        # the text path is made outside the graph, as the reference's no-grad cross-attention cache
        text_path = [n for n in names if n.startswith("text_embedding") or ".cross_attn.k" in n
                     or ".cross_attn.v" in n or ".cross_attn.norm_k" in n]
        assert text_path and all(grads[n] is None for n in text_path)


def test_rollout_rejects_bad_exit_step():
    rollout = SelfForcingRollout(SAMPLER)
    with pytest.raises(ValueError, match="exit_step"):
        rollout(micro_student(), first_shot_cond(), torch.randn(1, C, F, H, W), rollout.num_steps)


def test_make_conditioning_gives_single_prompt_samples_their_own_caption():
    prompts = [[torch.randn(3, CFG.text_dim)], list(torch.randn(3, 4, CFG.text_dim))]
    cond = make_conditioning(torch.zeros(2, C, FC, H, W), prompts, [[0] * FC, [0, 0, 0, 1, 1, 1]], [1, 2], F)
    assert cond.text.shape == (2, 3, 4, CFG.text_dim)
    assert cond.prompt_ids[0].tolist() == [0] * (FC + F)  # shot flag 1, but only its own prompt exists
    assert cond.prompt_ids[1].tolist() == [0, 0, 0, 1, 1, 1] + [2] * F


# --- DMD ----------------------------------------------------------------------------------------------

class ConstantX0(nn.Module):
    """A stub score whose x0 estimate is a fixed latent `target` [1, C, F, h, w] at every t."""

    def __init__(self, target, schedule):
        super().__init__()
        self.target, self.schedule = target, schedule

    def encode_text(self, text):
        return None

    def forward(self, seq, t, text, flags, prompt_ids=None, text_kv=None, shot_phase=None):
        shot = seq[:, :, -self.target.shape[2]:]
        sigma = self.schedule.sigma(t).view(-1, 1, 1, 1, 1)
        flow = (shot - self.target) / sigma  # x0 = x_t - sigma * flow = target
        return torch.cat([torch.zeros_like(seq[:, :, : -self.target.shape[2]]), flow], 2)


def test_dmd_gradient_is_zero_when_fake_equals_real():
    torch.manual_seed(0)
    teacher = WanDiT(CFG).eval()
    loss_fn = DMDLoss(FlowSchedule(), guidance=0.0)
    cond = first_shot_cond()
    x = torch.randn(1, C, F, H, W, requires_grad=True)
    loss, _ = loss_fn.generator_loss(x, cond, None, teacher, copy.deepcopy(teacher), torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(loss, x)
    assert g.abs().max() == 0
    # ...and a fake score that differs gives a non-zero gradient (the test can fail)
    other = WanDiT(CFG).eval()
    loss, _ = loss_fn.generator_loss(x, cond, None, teacher, other, torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(loss, x)
    assert g.abs().max() > 0


def test_dmd_moves_samples_toward_the_real_score():
    """Descent on L_G moves x toward the real score's x0 (fake = a critic that fits the current samples)."""
    sched = FlowSchedule()
    target = torch.randn(1, C, F, H, W)
    real = ConstantX0(target, sched)
    loss_fn = DMDLoss(sched, guidance=0.0)
    cond = first_shot_cond()
    x = torch.randn(1, C, F, H, W, requires_grad=True)
    opt = torch.optim.SGD([x], lr=float(x.numel()) * 0.05)
    start = (x - target).norm().item()
    for i in range(30):
        fake = ConstantX0(x.detach().clone(), sched)  # an ideal critic: its x0 is the generator's sample
        loss, stats = loss_fn.generator_loss(x, cond, None, real, fake, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        direction = x.grad
        assert torch.sum(direction * (x.detach() - target)) > 0  # -grad points toward the real x0
        opt.step()
    assert (x - target).norm().item() < 0.5 * start


class PromptKeyedX0(nn.Module):
    """A stub score whose x0 estimate is fixed by the prompt features it is handed: `x0_by_text` pairs each
    text tensor (encode_text passes it through) with a latent [1, C, F, h, w]. Any other text is an error,
    so a CFG branch fed the wrong prompt cannot go unnoticed."""

    def __init__(self, schedule, x0_by_text):
        super().__init__()
        self.schedule, self.x0_by_text = schedule, x0_by_text

    def encode_text(self, text):
        return text

    def forward(self, seq, t, text, flags, prompt_ids=None, text_kv=None, shot_phase=None):
        matches = [x0 for known, x0 in self.x0_by_text if torch.equal(known, text_kv)]
        assert len(matches) == 1, "score called with prompt features it was not given"
        target = matches[0]
        shot = seq[:, :, -target.shape[2]:]
        sigma = self.schedule.sigma(t).view(-1, 1, 1, 1, 1)
        flow = (shot - target) / sigma  # x0 = x_t - sigma * flow = target, at whatever t the loss draws
        return torch.cat([torch.zeros_like(seq[:, :, : -target.shape[2]]), flow], 2)


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_dmd_direction_and_gradient_follow_the_spec_cfg(guidance):
    """shotstream.md section 7: real = cond + g (cond - uncond), uncond = the negative prompt; fake without
    guidance; grad = (fake - real) / mean|x - real|; dL_G/dx = grad / numel. Hand-computed from stubs whose
    x0 per prompt is known, so a flipped guidance sign or swapped branches changes the numbers."""
    sched = FlowSchedule()
    g = torch.Generator().manual_seed(3)
    x0_cond, x0_uncond, x0_fake, x = (torch.randn(1, C, F, H, W, generator=g) for _ in range(4))
    cond = first_shot_cond()
    uncond_text = uncond_like(cond.text, torch.randn(3, CFG.text_dim, generator=g))
    real = PromptKeyedX0(sched, [(cond.text, x0_cond), (uncond_text, x0_uncond)])
    fake = PromptKeyedX0(sched, [(cond.text, x0_fake)])  # the fake score never sees the negative prompt

    x0_real = x0_cond + guidance * (x0_cond - x0_uncond)
    expected = (x0_fake - x0_real) / (x - x0_real).abs().mean()
    loss_fn = DMDLoss(sched, guidance=guidance)
    direction, _ = loss_fn.dmd_direction(x, cond, uncond_text, real, fake, torch.Generator().manual_seed(1))
    torch.testing.assert_close(direction, expected, rtol=1e-4, atol=1e-5)

    x = x.clone().requires_grad_(True)
    loss, _ = loss_fn.generator_loss(x, cond, uncond_text, real, fake, torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, expected / x.numel(), rtol=1e-4, atol=1e-8)


def second_shot_cond(seed=5):
    """A later shot: history latents from shot 0, the prompts of shots 0 and 1 (the shot reads its own)."""
    g = torch.Generator().manual_seed(seed)
    plan = plan_context([GEO.frames_per_shot], FC)
    prompts = [[torch.randn(4, CFG.text_dim, generator=g), torch.randn(6, CFG.text_dim, generator=g)]]
    return make_conditioning(torch.randn(1, C, FC, H, W, generator=g), prompts, [list(plan.flags)],
                             [plan.shot_flag], F)


def test_a_shot_without_history_is_a_first_shot_with_its_own_prompt():
    cond = second_shot_cond()
    alone = cond.without_history()
    first = first_shot_cond()
    assert torch.equal(alone.context, torch.zeros_like(cond.context))
    assert torch.equal(alone.flags, first.flags) and torch.equal(alone.prompt_ids, first.prompt_ids)
    own = cond.prompt_ids[0, FC]
    assert alone.text.shape[1] == 1 and torch.equal(alone.text[0, 0], cond.text[0, own])
    assert own == 1  # the second shot's own caption, not the first shot's


@pytest.mark.parametrize("history_guidance", [1.0, 3.0])
def test_history_guidance_pushes_the_real_score_towards_its_history(history_guidance):
    """real = cond + g (cond - uncond) + (h - 1) (cond - cond without history); h = 1 is the recipe's DMD,
    and a first shot, whose history-free branch is itself, is left as it was."""
    sched = FlowSchedule()
    g = torch.Generator().manual_seed(4)
    x0_cond, x0_uncond, x0_alone, x0_fake, x = (torch.randn(1, C, F, H, W, generator=g) for _ in range(5))
    cond = second_shot_cond()
    uncond_text = uncond_like(cond.text, torch.randn(3, CFG.text_dim, generator=g))
    real = PromptKeyedX0(sched, [(cond.text, x0_cond), (uncond_text, x0_uncond),
                                 (cond.without_history().text, x0_alone)])
    fake = PromptKeyedX0(sched, [(cond.text, x0_fake)])
    x0_real = x0_cond + 3.0 * (x0_cond - x0_uncond) + (history_guidance - 1.0) * (x0_cond - x0_alone)
    expected = (x0_fake - x0_real) / (x - x0_real).abs().mean()
    loss_fn = DMDLoss(sched, guidance=3.0, history_guidance=history_guidance)
    direction, _ = loss_fn.dmd_direction(x, cond, uncond_text, real, fake, torch.Generator().manual_seed(1))
    torch.testing.assert_close(direction, expected, rtol=1e-4, atol=1e-5)

    first = first_shot_cond()
    uncond_first = uncond_like(first.text, torch.randn(3, CFG.text_dim, generator=g))
    real = PromptKeyedX0(sched, [(first.text, x0_cond), (uncond_first, x0_uncond)])
    fake = PromptKeyedX0(sched, [(first.text, x0_fake)])
    x0_real = x0_cond + 3.0 * (x0_cond - x0_uncond)
    direction, _ = loss_fn.dmd_direction(x, first, uncond_first, real, fake, torch.Generator().manual_seed(1))
    torch.testing.assert_close(direction, (x0_fake - x0_real) / (x - x0_real).abs().mean(), rtol=1e-4, atol=1e-5)


def test_cfg_and_uncond_layout():
    text = torch.randn(2, 3, 4, CFG.text_dim)
    neg = torch.randn(6, CFG.text_dim)
    u = uncond_like(text, neg)
    assert u.shape == (2, 3, 6, CFG.text_dim) and torch.equal(u[1, 2], neg)
    with pytest.raises(ValueError, match="negative"):
        uncond_like(text, torch.randn(6, CFG.text_dim + 1))


def test_dmd_timesteps_are_drawn_over_the_whole_table_then_clamped():
    """The reference's draw (shotstream.md section 7 reads it as an index in [20, 980]; the code clamps the
    value): at shift 8 a seventh of the draws sit at 980 exactly and a few fall below t = 140, which an
    index in [20, 980] never gives (its lowest timestep is 140.4)."""
    schedule = FlowSchedule(1000, 8.0)
    t = DMDLoss(schedule, t_min=20, t_max=980).sample_t(20000, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 20 and float(t.max()) == 980
    assert 0.12 < float((t == 980).float().mean()) < 0.16
    assert 0.01 < float((t < 140).float().mean()) < 0.03
    assert float(schedule.timesteps[980]) > 140  # the floor of an index drawn in [20, 980]


def test_cache_refresh_noise_is_the_tables_sigma_at_t0_for_the_presets_shift():
    """The reference refreshes with add_noise at t = 0, the nearest table sigma: 0.0079 at Wan's shift 8, 0.001
    at shift 1 (a fixed 0.008 was 8x that for the tiny preset)."""
    wan = SelfForcingRollout(dataclasses.replace(SAMPLER, shift=8.0))
    tiny = SelfForcingRollout(dataclasses.replace(SAMPLER, shift=1.0))
    assert wan.refresh_sigma == pytest.approx(0.00794, abs=1e-5)
    assert tiny.refresh_sigma == pytest.approx(0.001, abs=1e-6)
    assert SelfForcingRollout(SAMPLER, refresh_sigma=0.0).refresh_sigma == 0.0
    with pytest.raises(ValueError, match="refresh_sigma"):
        SelfForcingRollout(SAMPLER, refresh_sigma=1.5)


def test_generator_and_critic_cycle():
    steps = [is_generator_step(s, 5) for s in range(12)]
    assert steps == [True] + [False] * 5 + [True] + [False] * 5


@pytest.mark.parametrize("shots_per_clip", [2, 3, 4, 5, 6])
def test_stage4_generator_updates_fall_on_every_shot_index(shots_per_clip):
    """Stage 4 takes one step a shot; a fixed 1:5 cycle gave a 4-shot clip's generator shots 0 and 2 only
    (and 2-, 3- or 6-shot clips shot 0 only). The slipping cycle spreads them evenly and keeps 1:5 exactly."""
    from training.stage4_dmd import Stage4Config

    clip_steps = Stage4Config(shots_per_clip=shots_per_clip).hyper().clip_steps
    assert clip_steps == shots_per_clip
    steps = 60 * shots_per_clip
    generator = [s for s in range(steps) if is_generator_step(s, 5, clip_steps)]
    assert len(generator) == steps // 6
    per_shot = [sum(1 for s in generator if s % shots_per_clip == k) for k in range(shots_per_clip)]
    assert max(per_shot) - min(per_shot) <= 1, per_shot
    # every six consecutive steps of a window hold one generator step at most once slipped: never two in a row
    assert all(b - a >= 5 for a, b in zip(generator, generator[1:]))


def small_trainer(hyper=None, seed=0):
    torch.manual_seed(seed)
    teacher = WanDiT(CFG).eval()
    student = CausalWanDiT(CFG)
    student.load_state_dict(teacher.state_dict())
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    return DMDTrainer(student, teacher, fake, SelfForcingRollout(SAMPLER), hyper or DMDHyper())


def test_critic_loss_goes_down_on_a_fixed_batch():
    trainer = small_trainer(DMDHyper(lr_critic=3e-3, critic_per_generator=10**6))
    cond = first_shot_cond(batch=2)
    noise = torch.randn(2, C, F, H, W)
    losses = []
    for step in range(1, 41):  # step 0 would be a generator step
        stats, _ = trainer.step(step, cond, uncond_like(cond.text, torch.randn(3, CFG.text_dim)), noise,
                                torch.Generator().manual_seed(0))
        losses.append(stats["critic_loss"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_generator_moves_toward_the_teacher():
    """The whole generator path (rollout with exit-step grad -> DMD loss -> AdamW on the student) moves the
    student's samples toward the real score's x0. Scores are stubs so the outcome is unambiguous: the real
    score's x0 is a fixed video T; the fake is an ideal critic (its x0 is the generator's own sample)."""
    sched = FlowSchedule()
    student = micro_student()
    rollout = SelfForcingRollout(SAMPLER)
    loss_fn = DMDLoss(sched, guidance=0.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, betas=(0.0, 0.999), weight_decay=0.01)
    cond = first_shot_cond(batch=2)
    noise = torch.randn(2, C, F, H, W)
    target = torch.randn(1, C, F, H, W).expand(2, -1, -1, -1, -1)
    real = ConstantX0(target, sched)

    def distance():
        with torch.no_grad():
            out = rollout(student, cond, noise, rollout.num_steps - 1, torch.Generator().manual_seed(0), grad=False)
        return (out - target).pow(2).mean().item()

    start = distance()
    for step in range(20):
        gen = torch.Generator().manual_seed(step)
        x = rollout(student, cond, noise, rollout.sample_exit_step(gen), gen)
        loss, _ = loss_fn.generator_loss(x, cond, None, real, ConstantX0(x.detach(), sched), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = distance()
    assert end < 0.8 * start


# --- LoRA ---------------------------------------------------------------------------------------------

def test_lora_wraps_every_block_linear_and_merges():
    model = micro_student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, rank=4, alpha=8)
    per_block = 4 + 4 + 2  # self_attn q,k,v,o + cross_attn q,k,v,o + ffn.0, ffn.2
    assert len(names) == CFG.num_layers * per_block
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    x = torch.randn(1, C, 2, H, W)
    t, text, flags = torch.full((1,), 500.0), torch.randn(1, 1, 3, CFG.text_dim), torch.ones(2, dtype=torch.long)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("lora_B"):
                m.weight.normal_(std=0.1)
        wrapped_out = model(x, t, text, flags)
    merged = merged_state_dict(model)
    assert set(merged) == set(before)
    plain = CausalWanDiT(CFG).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, text, flags), wrapped_out, rtol=1e-4, atol=1e-4)
    # the saved adapter merges the same way through the engine's loader
    via_loader = merge_lora(before, adapter_state_dict(model))
    for k in merged:
        torch.testing.assert_close(via_loader[k], merged[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=2)


# --- the stage entry points ---------------------------------------------------------------------------

def write_micro_latents(folder, stories=4, shots=3, seed=0):
    """A latent set in training.preencode's layout (data.py docstring), with random latents and prompts."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    n = GEO.frames_per_shot
    tensors, entries = {}, []
    for s in range(stories):
        name = f"story{s:03d}"
        for k in range(shots):
            tensors[f"{name}/shot{k}"] = torch.randn(C, F, H, W, generator=g)
            tensors[f"{name}/frame_idx{k}"] = torch.arange(n)
            tensors[f"{name}/frames{k}"] = torch.randn(n, C, H, W, generator=g)
            tensors[f"{name}/prompt{k}"] = torch.randn(4 + k, CFG.text_dim, generator=g)
        entries.append({"name": name, "num_shots": shots, "frames_per_shot": [n] * shots,
                        "ranges": [[k * n, (k + 1) * n] for k in range(shots)], "shard": "shard_0000.safetensors"})
    save_file(tensors, str(folder / "shard_0000.safetensors"))
    save_file({"negative": torch.randn(2, CFG.text_dim, generator=g)}, str(folder / "negative.safetensors"))
    (folder / "index.json").write_text(json.dumps({"preset": "micro", "stories": entries}))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """teacher / stage-2 student / VAE / latents of the micro preset, as the earlier stages leave them."""
    from shotstream_core.loading import save_dit
    from training.vae_stage import save_vae

    root = tmp_path_factory.mktemp("micro_run")
    torch.manual_seed(0)
    teacher = WanDiT(CFG)
    student = CausalWanDiT(CFG)
    student.load_state_dict(teacher.state_dict())
    save_dit(teacher, root / "teacher.safetensors")
    save_dit(student, root / "stage2.safetensors")
    save_vae(WanVAE(PRESET.vae), root / "vae.safetensors")
    write_micro_latents(root / "latents")
    return root


def stage_args(run, stage, out, *extra):
    common = [f"teacher_path={run / 'teacher.safetensors'}", f"latent_dir={run / 'latents'}", f"out_dir={out}"]
    if stage == 3:
        common.append(f"student_path={run / 'stage2.safetensors'}")
    else:
        common += [f"student_path={run / 'stage2.safetensors'}", f"vae_path={run / 'vae.safetensors'}"]
    argv = ["--config", str(REPO / "training" / "configs" / f"micro-stage{stage}.yaml")]
    for item in common + list(extra):
        argv += ["--set", item]
    return argv


def read_weights(folder, name):
    from training.common import Checkpointer

    return Checkpointer(folder).weights(name)


@pytest.mark.parametrize("stage", [3, 4])
def test_stage_resume_is_exact(micro_run, tmp_path, stage):
    """Stopping after 4 steps (mid-clip in stage 4: 3 shots a clip) and resuming equals 6 uninterrupted
    steps, bit for bit."""
    from training import stage3_dmd, stage4_dmd

    main = stage3_dmd.main if stage == 3 else stage4_dmd.main
    whole = main(stage_args(micro_run, stage, tmp_path / "whole", "ckpt_every=100"))
    main(stage_args(micro_run, stage, tmp_path / "cut", "max_steps=4", "ckpt_every=100"))
    resumed = main(stage_args(micro_run, stage, tmp_path / "cut", "ckpt_every=100"))
    assert whole["steps"] == resumed["steps"] == 6
    # deterministic training would match a restart from step 0 too: it went on from step 4
    assert resumed["resumed_from"] == 4
    for name in ("generator", "critic"):
        a, b = read_weights(tmp_path / "whole", name), read_weights(tmp_path / "cut", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the exported student loads in the engine's loader and differs from where it started
    from shotstream_core.loading import load_dit_state
    sd, cfg = load_dit_state(tmp_path / "whole" / "student.safetensors")
    start, _ = load_dit_state(micro_run / "stage2.safetensors")
    assert cfg == CFG and any(not torch.equal(sd[k], start[k]) for k in sd)
    assert (tmp_path / "whole" / "loss.png").is_file()


def stage4_history_sources(micro_run, out, monkeypatch, share):
    """Run stage 4 with truth_history=share; per shot >= 1 sample: "truth" where its context is one the
    latent store's ground-truth history gave, "own" where it is one own_history gave."""
    from training import stage4_dmd
    from training.data import LatentStoryDataset

    truth, own, sources = [], [], []
    real_truth, real_own = LatentStoryDataset.history, stage4_dmd.InterShotSetup.own_history
    real_step = stage4_dmd.InterShotSetup.train_step

    def recording_truth(self, *args, **kw):
        got = real_truth(self, *args, **kw)
        truth.append(got[0])
        return got

    def recording_own(self, *args, **kw):
        got = real_own(self, *args, **kw)
        own.append(got[0])
        return got

    def recording_step(self, step, context, prompts, *rest):
        for ctx, shot_prompts in zip(context, prompts):
            if len(shot_prompts) > 1:  # shot >= 1 with its history (history_dropout is 0 here)
                sources.append("truth" if any(ctx is t for t in truth) else "own" if any(ctx is o for o in own)
                               else "neither")
        return real_step(self, step, context, prompts, *rest)

    monkeypatch.setattr(LatentStoryDataset, "history", recording_truth)
    monkeypatch.setattr(stage4_dmd.InterShotSetup, "own_history", recording_own)
    monkeypatch.setattr(stage4_dmd.InterShotSetup, "train_step", recording_step)
    stage4_dmd.main(stage_args(micro_run, 4, out, "history_dropout=0.0", f"truth_history={share}",
                               "ckpt_every=100"))
    return sources


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_stage4_truth_history_conditions_that_share_on_ground_truth(micro_run, tmp_path, monkeypatch, share):
    sources = stage4_history_sources(micro_run, tmp_path / "run", monkeypatch, share)
    assert len(sources) == 8  # 2 clips x shots 1-2 x batch 2
    assert "neither" not in sources
    if share == 0.0:
        assert set(sources) == {"own"}
    elif share == 1.0:
        assert set(sources) == {"truth"}
    else:
        assert set(sources) == {"truth", "own"}  # this seed's draws give both


def test_stage4_truth_history_is_a_share(micro_run, tmp_path):
    from training import stage4_dmd

    with pytest.raises(ValueError, match="truth_history is a share"):
        stage4_dmd.main(stage_args(micro_run, 4, tmp_path / "bad", "truth_history=2"))


def test_stage4_lora_trains_adapters_and_exports_merged_weights(micro_run, tmp_path):
    from safetensors.torch import load_file

    from shotstream_core.loading import load_dit_state
    from training import stage4_dmd

    out = tmp_path / "lora"
    stage4_dmd.main(stage_args(micro_run, 4, out, "max_steps=2", "lora_rank=2", "lora_alpha=4", "lr=1.0e-2"))
    adapter = load_file(str(out / "lora.safetensors"))
    assert adapter and all(k.startswith("base_model.model.blocks.") for k in adapter)
    base, _ = load_dit_state(micro_run / "stage2.safetensors")
    merged, _ = load_dit_state(out / "student.safetensors")
    # the adapter moved only block Linears; merging it again onto the start reproduces the export
    assert all(torch.equal(merged[k], base[k]) for k in merged if not k.startswith("blocks."))
    assert any(not torch.equal(merged[k], base[k]) for k in merged)
    via_loader = merge_lora(base, adapter)
    for k in merged:
        torch.testing.assert_close(via_loader[k], merged[k], rtol=1e-5, atol=1e-6)
    # the same config trains the same adapter, whatever torch's global generator holds
    torch.manual_seed(1234)
    stage4_dmd.main(stage_args(micro_run, 4, tmp_path / "again", "max_steps=2", "lora_rank=2", "lora_alpha=4",
                               "lr=1.0e-2"))
    again = load_file(str(tmp_path / "again" / "lora.safetensors"))
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)


def test_stage4_lora_records_the_blocks_of_the_student_it_makes(micro_run, tmp_path):
    """An adapter trained on a first-block-1 student says so; merged onto a base file without the record,
    the engine samples on the adapter's blocks."""
    import warnings

    from shotstream_core.loading import build_dit, load_dit_state, load_engine, sampler_for_dit, save_dit
    from training import stage4_dmd

    sd, cfg = load_dit_state(micro_run / "stage2.safetensors")
    blocks = dataclasses.replace(SAMPLER, first_block_frames=1)
    student = save_dit(build_dit(sd, cfg), tmp_path / "student_fb1.safetensors", blocks)
    out = tmp_path / "lora"
    stage4_dmd.main(stage_args(micro_run, 4, out, "max_steps=1", "lora_rank=2", "lora_alpha=4",
                               f"student_path={student}"))
    assert sampler_for_dit(out / "lora.safetensors", SAMPLER) == blocks
    assert sampler_for_dit(out / "student.safetensors", SAMPLER) == blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = load_engine(dit_path=micro_run / "stage2.safetensors", lora_path=out / "lora.safetensors",
                             vae_path=micro_run / "vae.safetensors", preset="micro", device="cpu")
    assert engine.sampler.block_spans(F) == [(0, 1), (1, 4), (4, 6)]


def torchrun(stage, argv):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", f"training.stage{stage}_dmd", *argv]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_stage3_under_two_process_torchrun_shares_the_exit_step(micro_run, tmp_path):
    """2-process gloo run: both ranks finish, rank 0 writes the checkpoint and the student, and every
    step's exit step (logged as its mean over ranks) is rank 0's own draw: the one a one-process run,
    whose only rank draws the same stream, logs. Ranks on their own draws would log their average."""
    from training import stage3_dmd
    from training.common import read_log

    args = ("max_steps=6", "batch_size=1", "log_every=1")
    torchrun(3, stage_args(micro_run, 3, tmp_path / "ddp", *args))
    assert (tmp_path / "ddp" / "student.safetensors").is_file() and (tmp_path / "ddp" / "done.json").is_file()
    stage3_dmd.main(stage_args(micro_run, 3, tmp_path / "one", *args))
    shared, alone = ([row["exit_step"] for row in read_log(tmp_path / run / "log.jsonl")] for run in ("ddp", "one"))
    assert len(shared) == 6 and shared == alone, (shared, alone)


def test_stage4_resume_under_two_process_torchrun_is_exact(micro_run, tmp_path):
    """Each rank's clip in progress survives the stop: cut mid-clip and resumed equals uninterrupted."""
    import json

    args = ("batch_size=1", "ckpt_every=100")
    torchrun(4, stage_args(micro_run, 4, tmp_path / "whole", *args))
    torchrun(4, stage_args(micro_run, 4, tmp_path / "cut", *args, "max_steps=4"))
    torchrun(4, stage_args(micro_run, 4, tmp_path / "cut", *args))
    done = json.loads((tmp_path / "cut" / "done.json").read_text())  # rank 0's record of the last sitting
    assert (done["resumed_from"], done["steps"]) == (4, 6)  # went on from the cut, not from step 0
    for name in ("generator", "critic"):
        a, b = read_weights(tmp_path / "whole", name), read_weights(tmp_path / "cut", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
