"""Wan2.1 diffusion transformer: the bidirectional next-shot teacher and the causal streaming student.

Both classes share Wan2.1's parameter names, so one state dict loads into either. The teacher takes one
timestep per sample and attends over the whole sequence; the student takes one timestep per latent frame
and can run block by block against a K/V cache (`forward_cached`).

Shapes (B batch, C latent channels, F latent frames, h x w latent grid, T tokens per frame = h*w/4,
P prompts, S text tokens, D model dim):
    x        [B, C, F, h, w]      latents
    t        [B] or [B, F]        raw timesteps in [0, 1000]
    text     [B, P, S, text_dim]  per-shot prompt features (zero-padded to text_len)
    flags    [B, F]               shot flag of each frame (RoPE phase)
    prompt   [B, F]               which of the P prompts each frame cross-attends to
    output   [B, C, F, h, w]      flow v = noise - x0
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .cache import KVCache
from .config import DiTConfig
from .rope import RotaryTable, rope_angles


class EncodedText(NamedTuple):
    """A shot's prompts as the blocks read them: computed once per shot, reused by every step."""

    kv: list  # per layer: (k, v) [B, P, S, H, Dh]
    pooled: torch.Tensor | None  # [B, P, D] float32 (pooled_text models), else None


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding of raw t (any shape) -> [..., dim] as [cos | sin], computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def grid_position_embedding(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position of each token of a frame -> [grid_h*grid_w, dim], row-major; the first
    half of the channels encodes the row, the second half the column (DiT's layout)."""
    quarter = dim // 4
    freqs = torch.pow(10000.0, -torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None] * freqs  # [gh, dim/4]
    cols = torch.arange(grid_w, dtype=torch.float64)[:, None] * freqs  # [gw, dim/4]
    row_emb = torch.cat([rows.sin(), rows.cos()], -1)[:, None].expand(grid_h, grid_w, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], -1)[None, :].expand(grid_h, grid_w, 2 * quarter)
    emb = torch.cat([row_emb, col_emb], -1).reshape(grid_h * grid_w, 4 * quarter)
    return F.pad(emb, (0, dim - 4 * quarter)).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def modulate(h, shift, scale, tokens_per_frame: int):
    """h [B, F*T, D] * (1 + scale) + shift, with per-frame shift/scale [B, F, D], in float32."""
    b, _, d = h.shape
    hf = h.float().view(b, -1, tokens_per_frame, d)
    return (hf * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, -1, d)


def gated(y, gate, tokens_per_frame: int):
    b, _, d = y.shape
    return (y.float().view(b, -1, tokens_per_frame, d) * gate[:, :, None]).view(b, -1, d)


class AttentionProjections(nn.Module):
    """q, k, v, o projections with qk RMSNorm over the full dim, before the head split (Wan's names)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)


class SelfAttention(AttentionProjections):
    def forward(self, x, rope: RotaryTable, backend: str, mask=None, cache=None, layer: int = 0, start: int = 0):
        """x [B, L, D]. With a cache, this call's K/V are written at token `start` and the queries attend
        to every cached token before `start + L` (global context, earlier blocks, this block)."""
        b, n, _ = x.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q = rope.apply(self.norm_q(self.q(x)).view(heads))  # [B, L, H, Dh]
        k = rope.apply(self.norm_k(self.k(x)).view(heads))
        v = self.v(x).view(heads)
        if cache is not None:
            k, v = cache.write_and_read(layer, start, k, v)
        out = attention(q, k, v, backend=backend, mask=mask)
        return self.o(out.flatten(2))


class CrossAttention(AttentionProjections):
    """Text cross-attention; with several prompts each frame attends only to its own shot's prompt."""

    def text_kv(self, text):
        """text [B, P, S, D] -> k, v [B, P, S, H, Dh]; computed once per shot at inference."""
        shape = (*text.shape[:3], self.num_heads, self.head_dim)
        return self.norm_k(self.k(text)).view(shape), self.v(text).view(shape)

    def forward(self, x, kv, prompt_ids, tokens_per_frame: int, backend: str):
        b, n, d = x.shape
        k, v = kv
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        if k.shape[1] == 1:  # one prompt: every token sees it
            out = attention(q, k[:, 0], v[:, 0], backend=backend)
        else:  # per-frame prompt: fold frames into the batch, gather each frame's prompt
            frames = n // tokens_per_frame
            qf = q.view(b * frames, tokens_per_frame, self.num_heads, self.head_dim)
            rows = torch.arange(b, device=x.device)[:, None]
            kf = k[rows, prompt_ids].flatten(0, 1)  # [B*F, S, H, Dh]
            vf = v[rows, prompt_ids].flatten(0, 1)
            out = attention(qf, kf, vf, backend=backend).reshape(b, n, self.num_heads, self.head_dim)
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e0, ctx: dict, layer: int):
        """x [B, F*T, D]; e0 [B, F, 6, D] per-frame modulation from the timestep."""
        tpf = ctx["tokens_per_frame"]
        mod = self.modulation.float()[:, None] + e0  # [B, F, 6, D]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(2)
        h = modulate(self.norm1(x), shift_sa, scale_sa, tpf).to(x.dtype)
        y = self.self_attn(h, ctx["rope"], ctx["backend"], ctx["mask"], ctx["cache"], layer, ctx["start"])
        x = x + gated(y, gate_sa, tpf).to(x.dtype)
        x = x + self.cross_attn(self.norm3(x), ctx["text"].kv[layer], ctx["prompt_ids"], tpf, ctx["backend"])
        h = modulate(self.norm2(x), shift_ff, scale_ff, tpf).to(x.dtype)
        return x + gated(self.ffn(h), gate_ff, tpf).to(x.dtype)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, tokens_per_frame: int):
        """x [B, F*T, D], e [B, F, D] -> [B, F*T, C*ph*pw]."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale, tokens_per_frame).to(x.dtype))


class WanDiT(nn.Module):
    """Wan2.1 T2V transformer. Used as-is, it is the bidirectional teacher."""

    def __init__(self, cfg: DiTConfig, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.attention_backend = attention_backend
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        if cfg.pooled_text:
            self.text_pool = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        if cfg.coded_alone_frames:  # zero: a trained model warm-starts into it exactly
            self.coded_alone = nn.Parameter(torch.zeros(cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        if self.config.pooled_text:  # starts as a no-op, so it can be added to a trained model exactly
            nn.init.zeros_(self.text_pool[-1].weight)

    # --- pieces shared by the full and the cached forward ------------------------------------------

    def encode_text(self, text: torch.Tensor) -> EncodedText:
        """text [B, P, S<=text_len, text_dim] -> per-layer cross-attention (k, v) and, with pooled_text, each
        prompt's pooled embedding [B, P, D]. Zero-pads to text_len; all-zero token rows are padding."""
        cfg = self.config
        if text.shape[2] > cfg.text_len:
            raise ValueError(f"text has {text.shape[2]} tokens; this model takes at most {cfg.text_len}")
        text = F.pad(text, (0, 0, 0, cfg.text_len - text.shape[2])).to(self.patch_embedding.weight.dtype)
        emb = self.text_embedding(text)
        pooled = None
        if cfg.pooled_text:
            real = (text != 0).any(dim=-1, keepdim=True).to(text.dtype)  # [B, P, S, 1]
            mean = (text * real).sum(2) / real.sum(2).clamp(min=1)  # [B, P, text_dim]
            pooled = self.text_pool(mean).float()
        return EncodedText([blk.cross_attn.text_kv(emb) for blk in self.blocks], pooled)

    def time_embed(self, t: torch.Tensor, positions: torch.Tensor, pooled: torch.Tensor | None = None):
        """t [B] or [B, F], positions [F] (temporal) -> e [B, F, D] (head) and e0 [B, F, 6, D] (blocks), both
        float32. pooled [B, F, D]: each frame's prompt embedding, added to its timestep embedding
        (pooled_text models); frames coded alone get coded_alone added (coded_alone_frames models)."""
        if t.dim() == 1:
            t = t[:, None].expand(-1, len(positions))
        weight_dtype = self.time_embedding[0].weight.dtype  # bf16/fp16 engines hold bf16/fp16 weights
        e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim).to(weight_dtype)).float()
        if pooled is not None:
            e = e + pooled
        if self.config.coded_alone_frames:
            alone = (positions < self.config.coded_alone_frames).to(e.device, e.dtype)  # [F]
            e = e + alone[None, :, None] * self.coded_alone.float()
        e0 = self.time_projection(e.to(weight_dtype)).float().unflatten(-1, (6, self.config.dim))
        return e, e0

    def rope(self, positions, flags, grid_h, grid_w, device, shot_phase: float = 1.0 / 6.0) -> RotaryTable:
        """positions [F] temporal positions; flags [B, F] -> table for [B, F*h*w] tokens."""
        hd = self.config.head_dim
        angles = torch.stack([
            rope_angles(hd, positions, f, grid_h, grid_w, self.config.rope_theta, shot_phase) for f in flags
        ])  # [B, L, Dh/2]
        return RotaryTable(angles, device)

    def patchify(self, x):
        """[B, C, F, h, w] -> tokens [B, F*gh*gw, D], grid (F, gh, gw)."""
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, D, F, gh, gw]
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2), grid

    def unpatchify(self, tokens, grid):
        """[B, F*gh*gw, C*ph*pw] -> [B, C, F, gh*ph, gw*pw]."""
        c, (pt, ph, pw) = self.config.out_channels, self.config.patch_size
        f, gh, gw = grid
        x = tokens.view(tokens.shape[0], f, gh, gw, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], c, f * pt, gh * ph, gw * pw)

    def _run(self, x, t, text: EncodedText, flags, prompt_ids, positions, mask, cache, start, shot_phase):
        b = x.shape[0]
        tokens, grid = self.patchify(x)
        num_frames, gh, gw = grid
        if self.config.absolute_position:  # the same grid position in every frame
            pos = grid_position_embedding(gh, gw, self.config.dim).to(tokens.device, tokens.dtype)
            tokens = tokens + pos.repeat(num_frames, 1)
        if prompt_ids is None:
            prompt_ids = torch.zeros(b, num_frames, dtype=torch.long, device=x.device)
        prompt_ids = prompt_ids.to(x.device)
        flags = flags.to(torch.long).expand(b, num_frames) if flags.dim() == 1 else flags
        pooled = None
        if text.pooled is not None:  # each frame takes its own shot's prompt; one prompt serves every frame
            ids = prompt_ids if text.pooled.shape[1] > 1 else torch.zeros_like(prompt_ids)
            pooled = text.pooled[torch.arange(b, device=x.device)[:, None], ids]
        e, e0 = self.time_embed(t.to(x.device), positions, pooled)
        ctx = dict(
            tokens_per_frame=gh * gw,
            rope=self.rope(positions, flags, gh, gw, x.device, shot_phase),
            backend=self.attention_backend,
            mask=mask,
            cache=cache,
            start=start,
            text=text,
            prompt_ids=prompt_ids,
        )
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, ctx, i)
        return self.unpatchify(self.head(tokens, e, gh * gw), grid).float()

    def forward(self, x, t, text, flags, prompt_ids=None, mask=None, text_kv=None, shot_phase: float = 1.0 / 6.0):
        """Full-sequence forward. Positions are 0..F-1 over the given frames (context first).

        mask: optional bool [F*T, F*T] (True = may attend), e.g. `block_causal_mask`.
        """
        text_kv = self.encode_text(text) if text_kv is None else text_kv
        positions = torch.arange(x.shape[2])
        return self._run(x, t, text_kv, flags, prompt_ids, positions, mask, None, 0, shot_phase)


class CausalWanDiT(WanDiT):
    """The few-step student: per-frame timesteps, block-causal training mask, cached streaming."""

    def forward_cached(self, x, t, text_kv, flags, cache: KVCache, start_frame: int, prompt_ids=None,
                       shot_phase: float = 1.0 / 6.0):
        """Run the frames x [B, C, f, h, w] at absolute temporal positions start_frame.. against the cache.

        Their K/V are written into the cache at those frames' slots (overwriting what an earlier denoising
        step of the same block wrote); queries see every cached frame before start_frame + f.
        """
        tpf = self.config.tokens_per_frame(x.shape[3], x.shape[4])
        positions = torch.arange(start_frame, start_frame + x.shape[2])
        return self._run(x, t, text_kv, flags, prompt_ids, positions, None, cache, start_frame * tpf, shot_phase)


def block_causal_mask(context_frames: int, block_ids: torch.Tensor, tokens_per_frame: int, device=None):
    """Bool [L, L] over [context | shot] tokens: context sees only context; block b sees context + blocks <= b.
    block_ids: LongTensor [F], the block of each shot frame (SamplerConfig.block_ids)."""
    block_of = torch.cat([torch.full((context_frames,), -1), block_ids])  # [Fc+F]
    allowed = block_of[None, :] <= block_of[:, None]  # key block <= query block; context is block -1
    allowed = allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
    return allowed.to(device) if device is not None else allowed


def prompt_ids_from_flags(flags: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Frame -> prompt index: with one prompt everyone sees it; with several, flag k picks prompt k."""
    if num_prompts == 1:
        return torch.zeros_like(flags, dtype=torch.long)
    if int(flags.max()) >= num_prompts:
        raise ValueError(f"shot flag {int(flags.max())} has no prompt (only {num_prompts} prompts given)")
    return flags.to(torch.long)
