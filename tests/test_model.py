"""DiT, RoPE, schedule and context rules (issue 2, acceptance 1-5)."""
import dataclasses
import math

import pytest
import torch

from shotstream_core.cache import KVCache
from shotstream_core.config import get_preset
from shotstream_core.context import context_budget, plan_context, select_frame_indices
from shotstream_core.model import (CausalWanDiT, WanDiT, block_causal_mask, grid_position_embedding,
                                   prompt_ids_from_flags)
from shotstream_core.rope import RotaryTable, rope_angles, rope_pair_split
from shotstream_core.schedule import FlowSchedule

CFG = get_preset("micro").dit
CFG_ABS = dataclasses.replace(CFG, absolute_position=True)
CFG_ALONE = dataclasses.replace(CFG, coded_alone_frames=get_preset("micro").sampler.context_frames + 1)


def make_models(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    student = CausalWanDiT(cfg).eval()
    if cfg.coded_alone_frames:  # live, not its zero start
        torch.nn.init.normal_(student.coded_alone)
    teacher = WanDiT(cfg).eval()
    teacher.load_state_dict(student.state_dict())
    return teacher, student


def rand_text(prompts=1, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, prompts, tokens, CFG.text_dim, generator=g)


def streaming_vs_masked(student, ctx, noise, text, flags, block_frames, timesteps, schedule):
    """Run the streaming loop and, for every pass, the equivalent masked full forward; return max rel err."""
    ctx_frames, frames = ctx.shape[2], noise.shape[2]
    h, w = noise.shape[3:]
    tpf = CFG.tokens_per_frame(h, w)
    prompt_ids = prompt_ids_from_flags(flags, text.shape[1])
    cache = KVCache.for_model(student, 1, ctx_frames + frames, tpf)
    text_kv = student.encode_text(text)
    student.forward_cached(ctx, torch.zeros(1, ctx_frames), text_kv, flags[:, :ctx_frames], cache, 0,
                           prompt_ids[:, :ctx_frames])
    clean = []
    worst = 0.0
    for f0 in range(0, frames, block_frames):
        f1 = min(f0 + block_frames, frames)
        sl = slice(ctx_frames + f0, ctx_frames + f1)
        x = noise[:, :, f0:f1]
        for k, t in enumerate(timesteps):
            tf = torch.full((1, f1 - f0), float(t))
            flow = student.forward_cached(x, tf, text_kv, flags[:, sl], cache, sl.start, prompt_ids[:, sl])
            # Reference: full sequence [ctx | earlier clean blocks | this block], block-causal mask.
            seq = torch.cat([ctx, *clean, x], 2)
            t_all = torch.cat([torch.zeros(1, ctx_frames + f0), tf], 1)
            mask = block_causal_mask(ctx_frames, torch.arange(f1) // block_frames, tpf)
            full = student(seq, t_all, text, flags[:, : sl.stop], prompt_ids[:, : sl.stop], mask=mask)[:, :, sl]
            worst = max(worst, ((flow - full).norm() / full.norm()).item())
            x0 = schedule.x0_from_flow(x, flow, tf)
            if k + 1 < len(timesteps):
                x = schedule.add_noise(x0, torch.randn_like(x0), torch.full_like(tf, float(timesteps[k + 1])))
        student.forward_cached(x0, torch.zeros(1, f1 - f0), text_kv, flags[:, sl], cache, sl.start, prompt_ids[:, sl])
        clean.append(x0)
    return worst


@pytest.mark.parametrize("cfg", [CFG, CFG_ABS, CFG_ALONE], ids=["wan", "absolute_position", "coded_alone"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_streaming_equals_block_causal_masked_forward_over_two_shots(grad, cfg):
    with torch.set_grad_enabled(grad):
        check_two_shots(cfg)


def check_two_shots(cfg):
    _, student = make_models(cfg=cfg)
    sch = FlowSchedule()
    steps = sch.warp((1000, 750, 500, 250))
    geo = get_preset("micro").geometry
    h, w, frames = geo.latent_height, geo.latent_width, geo.latent_frames
    torch.manual_seed(3)
    fc = get_preset("micro").sampler.context_frames  # where coded_alone_frames expects the shot to start
    # shot 1: zero context, flag 1; shot 2: context from shot 1 (flag 0), generating with flag 1
    ctx1 = torch.zeros(1, 16, fc, h, w)
    flags1 = torch.tensor([[0] * fc + [1] * frames])
    err1 = streaming_vs_masked(student, ctx1, torch.randn(1, 16, frames, h, w), rand_text(1), flags1, 3, steps, sch)
    ctx2 = torch.randn(1, 16, fc, h, w)
    flags2 = torch.tensor([[0] * fc + [1] * frames])
    err2 = streaming_vs_masked(student, ctx2, torch.randn(1, 16, frames, h, w), rand_text(2), flags2, 3, steps, sch)
    assert err1 <= 1e-5 and err2 <= 1e-5, (err1, err2)


def test_streaming_detects_a_wrong_mask():
    """The equivalence test above can fail: a bidirectional reference disagrees with the cached stream."""
    _, student = make_models()
    geo = get_preset("micro").geometry
    h, w = geo.latent_height, geo.latent_width
    tpf = CFG.tokens_per_frame(h, w)
    x = torch.randn(1, 16, 6 + 6, h, w)
    t = torch.zeros(1, 12)
    flags = torch.zeros(1, 12, dtype=torch.long)
    causal = student(x, t, rand_text(), flags, mask=block_causal_mask(6, torch.arange(6) // 3, tpf))
    full = student(x, t, rand_text(), flags)
    assert (causal[:, :, 6:9] - full[:, :, 6:9]).abs().max() > 1e-3


def test_teacher_and_student_share_weights_and_agree_without_mask():
    teacher, student = make_models()
    x = torch.randn(2, 16, 9, 4, 4)
    t = torch.tensor([300.0, 900.0])
    flags = torch.tensor([[0] * 6 + [1] * 3] * 2)
    text = rand_text().expand(2, -1, -1, -1)
    out_t = teacher(x, t, text, flags)
    out_s = student(x, t[:, None].expand(2, 9), text, flags)
    torch.testing.assert_close(out_t, out_s, rtol=1e-5, atol=1e-6)
    assert set(teacher.state_dict()) == set(student.state_dict())


def test_grid_position_embedding_tells_every_cell_apart_and_splits_rows_from_columns():
    gh, gw, dim = 3, 5, 64
    emb = grid_position_embedding(gh, gw, dim).view(gh, gw, dim)
    flat = emb.reshape(gh * gw, dim)
    assert torch.cdist(flat, flat).add(torch.eye(gh * gw)).min() > 0.1  # no two cells alike
    torch.testing.assert_close(emb[:, :, : dim // 2], emb[:, :1, : dim // 2].expand(gh, gw, dim // 2))  # rows
    torch.testing.assert_close(emb[:, :, dim // 2:], emb[:1, :, dim // 2:].expand(gh, gw, dim // 2))  # columns


def test_absolute_position_changes_the_output_and_only_with_the_flag():
    torch.manual_seed(0)
    plain = WanDiT(CFG).eval()
    located = WanDiT(CFG_ABS).eval()
    located.load_state_dict(plain.state_dict())  # the flag adds no weights
    x = torch.randn(1, 16, 3, 4, 4)
    args = (torch.tensor([500.0]), rand_text(), torch.zeros(1, 3, dtype=torch.long))
    assert (plain(x, *args) - located(x, *args)).abs().max() > 1e-3


def test_coded_alone_marks_the_context_frames_and_the_shots_first_and_starts_as_a_no_op():
    """coded_alone_frames N: the frames at temporal positions 0..N-1 (context + the shot's first) get the
    learned vector in their timestep embedding, in the full and the cached forward alike (the streaming test
    above); zero, as a new model starts, it changes nothing, so a trained model warm-starts into it."""
    torch.manual_seed(0)
    plain = WanDiT(CFG).eval()
    marked = WanDiT(CFG_ALONE).eval()
    assert marked.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["coded_alone"]
    frames = CFG_ALONE.coded_alone_frames + 3
    x = torch.randn(1, 16, frames, 4, 4)
    args = (torch.tensor([500.0]), rand_text(), torch.zeros(1, frames, dtype=torch.long))
    torch.testing.assert_close(marked(x, *args), plain(x, *args))
    torch.nn.init.normal_(marked.coded_alone)
    assert (marked(x, *args) - plain(x, *args)).abs().max() > 1e-3
    t, positions = torch.tensor([500.0]), torch.arange(frames) + 2  # a window that starts at position 2
    e_plain, _ = plain.time_embed(t, positions)
    e_marked, _ = marked.time_embed(t, positions)
    moved = (e_marked - e_plain).abs().amax(dim=(0, 2)) > 0  # [F]
    assert moved.tolist() == (positions < CFG_ALONE.coded_alone_frames).tolist()
    torch.testing.assert_close((e_marked - e_plain)[0, 0], marked.coded_alone.detach())


def pooled_model(seed=0):
    """A pooled_text micro DiT whose pooled branch is live (its zero-initialised output layer randomised)."""
    torch.manual_seed(seed)
    model = WanDiT(dataclasses.replace(CFG, pooled_text=True)).eval()
    torch.nn.init.normal_(model.text_pool[-1].weight, std=0.5)
    return model


def test_pooled_text_starts_as_a_no_op_so_a_trained_model_warm_starts_exactly():
    torch.manual_seed(0)
    plain = WanDiT(CFG).eval()
    pooled = WanDiT(dataclasses.replace(CFG, pooled_text=True)).eval()
    missing, unexpected = pooled.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("text_pool.") for k in missing) and not unexpected
    x = torch.randn(1, 16, 3, 4, 4)
    args = (torch.tensor([500.0]), rand_text(), torch.zeros(1, 3, dtype=torch.long))
    torch.testing.assert_close(pooled(x, *args), plain(x, *args), rtol=0, atol=0)


def test_pooled_text_follows_the_prompt_and_ignores_padding():
    model = pooled_model()
    x = torch.randn(1, 16, 3, 4, 4)
    t, flags = torch.tensor([500.0]), torch.zeros(1, 3, dtype=torch.long)
    text = rand_text(tokens=5)
    padded = torch.nn.functional.pad(text, (0, 0, 0, 4))  # 4 zero tokens more: the same prompt
    torch.testing.assert_close(model(x, t, padded, flags), model(x, t, text, flags), rtol=1e-5, atol=1e-6)
    # Only the pooled vector differs: the same tokens in another order leave cross-attention as it was.
    shuffled = text[:, :, torch.tensor([4, 3, 2, 1, 0])]
    torch.testing.assert_close(model(x, t, shuffled, flags), model(x, t, text, flags), rtol=1e-5, atol=1e-6)
    scaled = text.clone()
    scaled[..., 0, :] *= 3  # one token changed: the mean moves
    assert (model(x, t, scaled, flags) - model(x, t, text, flags)).abs().max() > 1e-3
    # Each frame is modulated by its own shot's prompt: frames of prompt 0 see no change to prompt 1's
    # pooled vector except through attention, which a frame-causal mask with frame 0 first rules out.
    two = rand_text(prompts=2, tokens=5)
    other = two.clone()
    other[:, 1] *= 2
    ids = torch.tensor([[0, 1, 1]])
    mask = block_causal_mask(0, torch.arange(3), CFG.tokens_per_frame(4, 4))
    a, b = model(x, t, two, flags, ids, mask=mask), model(x, t, other, flags, ids, mask=mask)
    torch.testing.assert_close(a[:, :, :1], b[:, :, :1])
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-3
    # One prompt (CFG's negative) serves every frame, whatever their prompt ids.
    one = two[:, :1]
    torch.testing.assert_close(model(x, t, one, flags, ids), model(x, t, one, flags), rtol=0, atol=0)


def test_per_frame_timesteps_change_only_their_frames_modulation():
    _, student = make_models()
    x = torch.randn(1, 16, 3, 4, 4)
    flags = torch.zeros(1, 3, dtype=torch.long)
    t1 = torch.tensor([[500.0, 500.0, 500.0]])
    t2 = torch.tensor([[500.0, 500.0, 100.0]])
    mask = block_causal_mask(0, torch.arange(3), CFG.tokens_per_frame(4, 4))  # frame-causal: frame 2 cannot leak back
    a = student(x, t1, rand_text(), flags, mask=mask)
    b = student(x, t2, rand_text(), flags, mask=mask)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-4


# --- RoPE ------------------------------------------------------------------------------------------

def wan_plain_angles(head_dim, frames, gh, gw, theta=10000.0):
    """Plain Wan 3-D RoPE written independently: split real dims d-4(d//6), 2(d//6), 2(d//6)."""
    d = head_dim
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    per_axis = [1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n) for n in dims]
    out = []
    for f in range(frames):
        for y in range(gh):
            for x in range(gw):
                out.append(torch.cat([f * per_axis[0], y * per_axis[1], x * per_axis[2]]))
    return torch.stack(out)


@pytest.mark.parametrize("head_dim", [128, 64, 32])
def test_rope_zero_flags_equal_plain_wan(head_dim):
    got = rope_angles(head_dim, torch.arange(5), torch.zeros(5), 3, 4)
    torch.testing.assert_close(got, wan_plain_angles(head_dim, 5, 3, 4), rtol=0, atol=1e-12)


def test_rope_pair_split_of_wan_head():
    assert rope_pair_split(128) == (22, 21, 21)


def test_rope_flag_adds_exactly_s_over_6_to_temporal_angles_only():
    hd = 128
    pt, ph, pw = rope_pair_split(hd)
    flags = torch.tensor([0, 1, 2, 5, 5])
    base = rope_angles(hd, torch.arange(5), torch.zeros(5), 2, 3).view(5, 6, -1)
    got = rope_angles(hd, torch.arange(5), flags, 2, 3).view(5, 6, -1)
    diff = got - base
    expected = (flags.double() / 6)[:, None, None].expand(5, 6, pt)
    torch.testing.assert_close(diff[..., :pt], expected, rtol=0, atol=1e-12)
    assert diff[..., pt:].abs().max() == 0


def test_rotary_table_rotates_adjacent_pairs():
    angles = torch.tensor([[math.pi / 2]], dtype=torch.float64)  # one token, one pair
    table = RotaryTable(angles, "cpu")
    x = torch.tensor([[[[1.0, 0.0]]]])  # [B, L, H, D=2]
    torch.testing.assert_close(table.apply(x), torch.tensor([[[[0.0, 1.0]]]]), atol=1e-7, rtol=0)


# --- schedule --------------------------------------------------------------------------------------

def test_warped_few_step_list_matches_reference():
    steps = FlowSchedule(1000, 8.0).warp((1000, 740, 500, 260))
    torch.testing.assert_close(steps, torch.tensor([1000.0, 957.93, 888.89, 737.59]), atol=0.01, rtol=0)


def test_add_noise_and_x0_from_flow_invert():
    sch = FlowSchedule()
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    t = torch.tensor([[900.0, 500.0, 20.0], [1000.0, 0.0, 300.0]])
    xt = sch.add_noise(x0, noise, t)
    torch.testing.assert_close(sch.x0_from_flow(xt, noise - x0, t), x0, atol=1e-5, rtol=1e-5)


def test_training_weight_is_zero_at_1000_and_mean_one():
    sch = FlowSchedule()
    assert sch.training_weight(torch.tensor([1000.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert sch.training_weight(sch.timesteps).mean().item() == pytest.approx(1.0, abs=1e-5)


# --- context rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [
    (1, [6]), (2, [3, 3]), (3, [2, 2, 2]), (4, [1, 1, 2, 2]), (5, [1, 1, 1, 1, 2]),
    (6, [1] * 6), (7, [0] + [1] * 6), (8, [0, 0] + [1] * 6),
])
def test_context_budget_matches_reference(n, expected):
    assert context_budget(n, 6) == expected


def test_frame_selection_rounds_linspace_with_endpoints():
    assert select_frame_indices(0, 80, 1) == [0]
    assert select_frame_indices(0, 80, 2) == [0, 80]
    assert select_frame_indices(0, 80, 3) == [0, 40, 80]
    assert select_frame_indices(0, 80, 6) == [0, 16, 32, 48, 64, 80]
    assert select_frame_indices(0, 32, 4) == [0, 11, 21, 32]  # 10.67 -> 11, 21.33 -> 21


def test_context_plan_flags():
    first = plan_context([], 6)
    assert first.zero_context and first.flags == (0,) * 6 and first.shot_flag == 1
    third = plan_context([33, 33], 6)
    assert third.picks == ((0, 0), (0, 16), (0, 32), (1, 0), (1, 16), (1, 32))
    assert third.flags == (0, 0, 0, 1, 1, 1) and third.shot_flag == 2
    ninth = plan_context([33] * 8, 6)
    assert ninth.flags == (2, 3, 4, 5, 6, 7) and ninth.shot_flag == 8


# --- per-shot cross-attention ----------------------------------------------------------------------

def test_per_shot_cross_attention_isolates_captions():
    _, student = make_models()
    x = torch.randn(1, 16, 6, 4, 4)
    flags = torch.tensor([[0, 0, 0, 1, 1, 1]])
    text = rand_text(2)
    ids = prompt_ids_from_flags(flags, 2)
    base = student(x, torch.full((1, 6), 400.0), text, flags, ids, mask=block_causal_mask(3, torch.zeros(3, dtype=torch.long), 4))
    other = text.clone()
    other[0, 1] = torch.randn_like(other[0, 1])  # change shot 1's caption
    out = student(x, torch.full((1, 6), 400.0), other, flags, ids, mask=block_causal_mask(3, torch.zeros(3, dtype=torch.long), 4))
    torch.testing.assert_close(out[:, :, :3], base[:, :, :3])  # shot-0 frames do not see it
    assert (out[:, :, 3:] - base[:, :, 3:]).abs().max() > 1e-4  # its own frames do


def test_teacher_grid_saves_exactly_the_student_times():
    from shotstream_core.teacher import sample_teacher, teacher_sigmas

    for shift in (8.0, get_preset("tiny").sampler.shift):  # Wan's shift and the tiny preset's
        grid = teacher_sigmas(50, shift)[:-1] * 1000
        student_t = FlowSchedule(shift=shift).warp(get_preset("tiny").sampler.denoising_steps)
        for t in student_t:
            assert (grid - t).abs().min() < 1e-3, (shift, t)  # on the grid: ODE pairs are exact teacher states
    teacher, _ = make_models()
    ctx, noise = torch.zeros(1, 16, 6, 4, 4), torch.randn(1, 16, 3, 4, 4)
    flags = torch.tensor([[0] * 6 + [1] * 3])
    x0, saved = sample_teacher(teacher, ctx, noise, rand_text(), flags, uncond_text=torch.zeros(1, 1, 5, CFG.text_dim),
                               steps=50, guidance=3.0, save_at=[float(t) for t in student_t])
    assert set(saved) == {float(t) for t in student_t}
    torch.testing.assert_close(saved[float(student_t[0])], noise)  # step 0 is pure noise
    assert torch.isfinite(x0).all() and x0.shape == noise.shape


class PromptKeyedVelocity(torch.nn.Module):
    """A stub teacher whose flow on the shot frames is (t / 1000) * a fixed tensor chosen by the prompt
    features it is handed (encode_text passes them through); any other text is an error. The context
    frames' output is a large constant, so a sampler that keeps them would show. Records every call."""

    def __init__(self, velocity_by_text):
        super().__init__()
        self.velocity_by_text, self.calls = velocity_by_text, []

    def encode_text(self, text):
        return text

    def forward(self, seq, t, text, flags, prompt_ids=None, text_kv=None, shot_phase=None):
        names = [name for name, (known, _) in self.velocity_by_text.items() if torch.equal(known, text_kv)]
        assert len(names) == 1, "teacher called with prompt features it was not given"
        self.calls.append((names[0], float(t[0]), flags, prompt_ids))
        v = self.velocity_by_text[names[0]][1]
        ctx = torch.full_like(seq[:, :, : seq.shape[2] - v.shape[2]], 1e3)
        return torch.cat([ctx, v * (t.view(-1, 1, 1, 1, 1) / 1000)], 2)


def test_teacher_euler_steps_apply_cfg_toward_the_prompt():
    """50 Euler steps on Wan's shifted grid (shotstream.md sections 4 and 7: shift 8, CFG 6):
    x <- x + (sigma_next - sigma) * (v_u + g (v_c - v_u)), v_c from the shot's text, v_u from the negative.
    The grid is read off FlowSchedule's 1000-step table (every 20th entry), not the sampler's own helper."""
    from shotstream_core.teacher import sample_teacher

    g = torch.Generator().manual_seed(5)
    ctx, noise = torch.randn(1, 16, 6, 4, 4, generator=g), torch.randn(1, 16, 3, 4, 4, generator=g)
    v_cond, v_uncond = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 3, 4, 4, generator=g)
    text, negative = rand_text(seed=6), rand_text(seed=7)
    teacher = PromptKeyedVelocity({"cond": (text, v_cond), "uncond": (negative, v_uncond)})
    flags = torch.tensor([[0] * 6 + [1] * 3])
    ids = torch.zeros_like(flags)
    guidance, steps = 6.0, 50

    table = FlowSchedule(shift=8.0)
    sigmas = [float(table.sigmas[i * 1000 // steps]) for i in range(steps)] + [0.0]
    v_cfg = v_uncond + guidance * (v_cond - v_uncond)
    expected, states = noise.clone(), [noise.clone()]
    for i in range(steps):
        expected = expected + (sigmas[i + 1] - sigmas[i]) * sigmas[i] * v_cfg  # t_i / 1000 = sigma_i
        states.append(expected.clone())

    save_at = [1000 * sigmas[1], 1000 * sigmas[2]]
    x0, saved = sample_teacher(teacher, ctx, noise, text, flags, ids, uncond_text=negative, steps=steps,
                               guidance=guidance, shift=8.0, save_at=save_at)
    # the state before step i is the one saved at t_i: after one and after two Euler steps
    torch.testing.assert_close(saved[save_at[0]], states[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(saved[save_at[1]], states[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, states[-1], rtol=1e-5, atol=1e-5)
    # every step asks both branches at that step's t, with the caller's flags and prompt ids
    for branch in ("cond", "uncond"):
        called_t = [t for name, t, _, _ in teacher.calls if name == branch]
        assert called_t == pytest.approx([1000 * s for s in sigmas[:-1]], rel=1e-6), branch
    assert all(f is flags and p is ids for _, _, f, p in teacher.calls)


def test_teacher_history_guidance_pushes_the_flow_away_from_the_shot_without_history():
    """x <- x + dsigma * (v_u + g (v_c - v_u) + (h - 1) (v_c - v_alone)), v_alone from the history-free inputs
    (zero context, a first shot's flags, the shot's own prompt), each at that step's t; h = 1 is plain CFG."""
    from shotstream_core.teacher import sample_teacher, without_history

    g = torch.Generator().manual_seed(8)
    ctx, noise = torch.randn(1, 16, 6, 4, 4, generator=g), torch.randn(1, 16, 3, 4, 4, generator=g)
    v_cond, v_uncond, v_alone = (torch.randn(1, 16, 3, 4, 4, generator=g) for _ in range(3))
    text, negative = rand_text(prompts=2, seed=6), rand_text(prompts=2, seed=7)  # shot 0's prompt, then this shot's
    own = text[:, 1:]
    flags, flags_alone = torch.tensor([[1] * 6 + [2] * 3]), torch.tensor([[0] * 6 + [1] * 3])
    ids = torch.tensor([[0] * 6 + [1] * 3])
    alone = without_history(ctx, text, flags, ids)
    assert not alone[0].any() and torch.equal(alone[1], own) and torch.equal(alone[2], flags_alone)
    assert not alone[3].any()
    guidance, steps, h = 3.0, 20, 4.0
    sigmas = [float(s) for s in FlowSchedule(shift=8.0).sigmas[:: 1000 // steps]] + [0.0]

    def sample(history_guidance):
        teacher = PromptKeyedVelocity({"cond": (text, v_cond), "uncond": (negative, v_uncond), "alone": (own, v_alone)})
        x0, _ = sample_teacher(teacher, ctx, noise, text, flags, ids, uncond_text=negative,
                               steps=steps, guidance=guidance, shift=8.0, history_guidance=history_guidance)
        return x0, teacher.calls

    for history_guidance in (1.0, h):
        v = v_uncond + guidance * (v_cond - v_uncond) + (history_guidance - 1.0) * (v_cond - v_alone)
        expected = noise.clone()
        for i in range(steps):
            expected = expected + (sigmas[i + 1] - sigmas[i]) * sigmas[i] * v
        x0, calls = sample(history_guidance)
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
        alone_calls = [(f, p) for name, _, f, p in calls if name == "alone"]
        assert len(alone_calls) == (steps if history_guidance != 1.0 else 0)
        assert all(torch.equal(f, flags_alone) for f, _ in alone_calls)


@pytest.mark.parametrize("first, frames, spans", [
    (None, 9, [(0, 3), (3, 6), (6, 9)]),          # the reference: blocks of 3
    (None, 7, [(0, 3), (3, 6), (6, 7)]),          # a short last block
    (1, 9, [(0, 1), (1, 4), (4, 7), (7, 9)]),     # the first latent frame alone
    (1, 1, [(0, 1)]),
    (4, 2, [(0, 2)]),                             # a first block longer than the shot
])
def test_block_spans_cover_the_shot_in_order(first, frames, spans):
    from shotstream_core.config import SamplerConfig

    sampler = SamplerConfig(block_frames=3, first_block_frames=first)
    assert sampler.block_spans(frames) == spans
    ids = sampler.block_ids(frames)
    assert [int(ids[f0:f1].unique().item()) for f0, f1 in spans] == list(range(len(spans)))


def test_block_sizes_under_one_frame_are_refused():
    from shotstream_core.config import SamplerConfig

    with pytest.raises(ValueError, match="first_block_frames must be at least 1"):
        SamplerConfig(first_block_frames=0)
    with pytest.raises(ValueError, match="block_frames must be at least 1"):
        SamplerConfig(block_frames=0)


def test_mask_with_a_first_block_of_one_frame():
    """Frame 0 alone sees the context and itself; frames 1-3 see each other, frame 0 and the context."""
    from shotstream_core.config import SamplerConfig

    ids = SamplerConfig(block_frames=3, first_block_frames=1).block_ids(4)  # [0, 1, 1, 1]
    got = block_causal_mask(2, ids, tokens_per_frame=1).int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],  # context
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # frame 0
        [1, 1, 1, 1, 1, 1],  # frames 1-3
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(got, expected)
