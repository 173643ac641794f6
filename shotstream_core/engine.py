"""ShotStreamEngine: generate the next shot of a story as a stream of decoded blocks.

One shot, per the reference (see docs/ARCHITECTURE.md):
  context plan -> encode context frames -> prompts -> fill global cache (t=0) ->
  per block: few-step denoising against [global | local] cache, cache refresh at t=0, streaming decode.
The input StoryState is never modified; the new state exists only once the last block is done.
"""
from __future__ import annotations

import dataclasses
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .cache import KVCache
from .config import Preset, ShotGeometry
from .context import ContextLatentCache, encode_frame_alone, plan_context
from .model import CausalWanDiT
from .schedule import FlowSchedule
from .state import ShotRecord, StoryState
from .text import PromptCache, build_shot_prompt
from .vae import StreamingDecoder
from .video import fit_frames

StepCallback = Callable[[int, int], None]


class ShotInterrupted(RuntimeError):
    """Raised (by an on_step callback) to stop a shot; the story keeps its previous state."""


@dataclass(frozen=True)
class ShotRequest:
    global_caption: str
    caption: str
    negative: str = ""
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.caption, str) or not self.caption.strip():
            raise ValueError("the shot caption is empty: describe what happens in this shot")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63); got {self.seed}")


@dataclass
class BlockOutput:
    shot_index: int
    block_index: int
    num_blocks: int
    latents: torch.Tensor  # [1, C, f, h, w]
    frames: torch.Tensor  # float [n, H, W, 3] in [0, 1]


class ShotStream:
    """Iterate to get BlockOutputs; afterwards `.state` is the story with this shot, `.frames` the shot."""

    def __init__(self, blocks: Iterator[BlockOutput]):
        self._blocks = blocks
        self.state: StoryState | None = None
        self.frames: torch.Tensor | None = None

    def __iter__(self):
        yield from self._blocks

    def close(self) -> None:
        """Abandon the shot (its state stays None) and free the engine for the next one."""
        close = getattr(self._blocks, "close", None)  # the engine's blocks are a generator; others need not be
        if close is not None:
            close()

    def run(self, on_block: Callable[[BlockOutput], None] | None = None) -> "ShotStream":
        for block in self:
            if on_block is not None:
                on_block(block)
        return self


class ShotStreamEngine:
    def __init__(self, dit: CausalWanDiT, vae, text_encoder, preset: Preset, model_id: str,
                 text_device: torch.device | str = "cpu"):
        self.dit = dit.eval()
        self.vae = vae.eval()
        # The latent grid follows the VAE (a small VAE may compress space by other than Wan's 8x), and the
        # sizes that grid may take follow the DiT's patch (a finer one tiles more sizes than Wan's 2x2).
        geometry = preset.geometry.replace(spatial_stride=vae.config.spatial_stride,
                                           dit_patch=dit.config.spatial_patch)
        self.preset = dataclasses.replace(preset, geometry=geometry)
        self.model_id = model_id
        self.sampler = preset.sampler
        self.schedule = FlowSchedule(self.sampler.num_train_timesteps, self.sampler.shift)
        self.timesteps = self.schedule.warp(self.sampler.denoising_steps)  # e.g. 1000, 957.9, 888.9, 737.6
        self.prompts = PromptCache(text_encoder, device=self.device)
        # Room for the context of many stories at once (a ComfyUI session forks and rolls back often).
        self.context_latents = ContextLatentCache(lambda frame: encode_frame_alone(self.vae, frame),
                                                  capacity=16 * self.sampler.context_frames)
        self._context_vae: tuple | None = None  # the VAE (dtype, device) the cached latents came from
        self.text_max_tokens = min(getattr(text_encoder, "max_tokens", dit.config.text_len), dit.config.text_len)
        # Ablation switches (evaluation only): history off = every shot sees the zero context of shot 1.
        self.use_history = True
        self.shot_phase = self.sampler.rope_shot_phase
        self._cache: KVCache | None = None
        self._lock = threading.Lock()  # one shot at a time shares the cache buffers
        self._lock_owner: threading.Thread | None = None  # the thread whose stream holds it

    @property
    def device(self) -> torch.device:
        return self.dit.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.patch_embedding.weight.dtype

    @property
    def geometry(self) -> ShotGeometry:
        return self.preset.geometry

    # --- stories -----------------------------------------------------------------------------------

    def new_story(self, geometry: ShotGeometry | None = None) -> StoryState:
        """A story at `geometry`'s size and length (default: the model's), on this model's latent grid and
        at a size its DiT's patch tiles."""
        g = self.geometry
        geometry = (geometry or g).replace(spatial_stride=g.spatial_stride, dit_patch=g.dit_patch)
        return StoryState(self.model_id, geometry)

    def check_state(self, state: StoryState) -> None:
        if not isinstance(state, StoryState):
            raise TypeError(f"expected a StoryState, got {type(state).__name__}")
        if state.model_id != self.model_id:
            raise ValueError(
                f"this story was generated by model {state.model_id}, not the loaded model {self.model_id}: "
                "load the model it was made with, or start a new story"
            )
        if state.geometry.spatial_stride != self.geometry.spatial_stride:
            raise ValueError(
                f"this story's latent grid is {state.geometry.spatial_stride}x smaller than its frames, but the "
                f"loaded VAE compresses {self.geometry.spatial_stride}x: load the VAE it was made with, or start "
                "a new story"
            )

    def generate_shot(self, state, request, on_step: StepCallback | None = None, on_block=None):
        stream = self.stream_shot(state, request, on_step).run(on_block)
        return stream.state, stream.frames

    def generate_story(self, global_caption: str, captions: list[str], seeds: list[int] | None = None,
                       geometry: ShotGeometry | None = None, negative: str = "") -> StoryState:
        seeds = list(range(len(captions))) if seeds is None else seeds
        state = self.new_story(geometry)
        for caption, seed in zip(captions, seeds, strict=True):
            state, _ = self.generate_shot(state, ShotRequest(global_caption, caption, negative, seed))
        return state

    def add_footage(self, state: StoryState, frames, global_caption: str, caption: str) -> StoryState:
        """The story with the user's `frames` as its next shot (an image-to-video start, or footage to go on
        from). frames: [N, H, W, 3] or one [H, W, 3] image, float in [0, 1] or uint8; fitted to the story's
        size and frames per shot (video.fit_frames). Later shots see the footage exactly as they would a
        generated shot with these frames: through the global context cache, reading `caption`, so the
        caption should say what the footage shows. Nothing is sampled; `state` is untouched."""
        self.check_state(state)
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("the shot caption is empty: describe what the images show")
        geo = state.geometry
        pixels = fit_frames(frames, geo.height, geo.width, geo.frames_per_shot)
        flag = plan_context([s.num_frames for s in state.shots], self.sampler.context_frames).shot_flag
        return state.with_shot(ShotRecord(global_caption, caption, "", 0, flag, pixels, source="footage"))

    def stream_shot(self, state: StoryState, request: ShotRequest, on_step: StepCallback | None = None) -> ShotStream:
        self.check_state(state)
        stream = ShotStream(iter(()))
        stream._blocks = self._shot_blocks(state, request, on_step, stream)
        return stream

    # --- one shot ----------------------------------------------------------------------------------

    def _context_latents(self, state: StoryState, plan, latent_hw) -> torch.Tensor:
        """[1, C, Fc, h, w]: each chosen history frame encoded alone; zeros for the first shot."""
        c = self.dit.config.in_channels
        if plan.zero_context:
            return torch.zeros(1, c, len(plan.flags), *latent_hw, device=self.device, dtype=self.dtype)
        vae_weight = next(self.vae.parameters())
        if self._context_vae != (vae_weight.dtype, vae_weight.device):  # latents of another precision: not reused
            self.context_latents.clear()
            self._context_vae = (vae_weight.dtype, vae_weight.device)
        latents = self.context_latents.get_many([state.shots[s].frames[i] for s, i in plan.picks])  # N x [C, h, w]
        return torch.stack([z.to(self.device, self.dtype) for z in latents], dim=1)[None]  # [1, C, N, h, w]

    def shot_text(self, state: StoryState, request: ShotRequest, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text [1, P, S, text_dim], prompt_ids [1, Fc+F]) for the next shot of `state`, whose frames carry
        `flags` [1, Fc+F]. A first shot has one prompt that every frame reads. Later, flag k is shot k and
        reads shot k's prompt, and only the shots with frames in play (the context's and this one) are
        encoded: once a shot's frames leave the context its prompt is never read, so a long story projects
        at most Fc + 1 prompts a shot, not one per shot so far."""
        count = self.prompts.encoder.count_tokens
        if not state.shots:
            feats = [self.prompts.get(build_shot_prompt(request.global_caption, request.caption, 0, count,
                                                        self.text_max_tokens))]
            ids = torch.zeros_like(flags, dtype=torch.long)
        else:
            used = sorted(set(flags.flatten().tolist()))
            texts = []
            with warnings.catch_warnings():  # earlier shots warned when they were generated
                warnings.simplefilter("ignore")
                for k in used[:-1]:
                    shot = state.shots[k]
                    texts.append(build_shot_prompt(shot.global_caption, shot.caption, k, count, self.text_max_tokens))
            if used[-1] != state.num_shots:
                raise ValueError(f"the shot's flag is {used[-1]}, but it is shot {state.num_shots} of the story")
            texts.append(build_shot_prompt(request.global_caption, request.caption, state.num_shots, count,
                                           self.text_max_tokens))
            feats = [self.prompts.get(t) for t in texts]
            slot = torch.full((used[-1] + 1,), -1, dtype=torch.long)
            slot[used] = torch.arange(len(used))
            ids = slot[flags.cpu().long()].to(flags.device)
        longest = max(f.shape[0] for f in feats)
        text = torch.zeros(1, len(feats), longest, feats[0].shape[-1], device=self.device)
        for i, f in enumerate(feats):
            text[0, i, : f.shape[0]] = f.to(self.device)
        return text, ids

    def _kv_cache(self, tokens: int) -> KVCache:
        buffer = None if self._cache is None else self._cache.keys[0]
        if (buffer is None or self._cache.max_tokens < tokens or buffer.device != self.device
                or buffer.dtype != self.dtype):
            self._cache = None  # free the old buffer before allocating the new one
            cfg = self.dit.config
            self._cache = KVCache(cfg.num_layers, 1, tokens, cfg.num_heads, cfg.head_dim, self.dtype, self.device)
        return self._cache

    @torch.no_grad()
    def _shot_blocks(self, state: StoryState, request: ShotRequest, on_step: StepCallback | None, stream: ShotStream):
        geo = state.geometry
        cfg, sampler = self.dit.config, self.sampler
        h, w = geo.latent_height, geo.latent_width
        frames_total = geo.latent_frames
        tpf = cfg.tokens_per_frame(h, w)
        history = [s.num_frames for s in state.shots] if self.use_history else []
        plan = plan_context(history, sampler.context_frames)
        shot_flag = plan.shot_flag if self.use_history else 1
        ctx_frames = len(plan.flags)

        flags = torch.tensor([list(plan.flags) + [shot_flag] * frames_total], device=self.device)  # [1, Fc+F]

        gen = torch.Generator().manual_seed(int(request.seed))
        noise = torch.randn(1, cfg.in_channels, frames_total, h, w, generator=gen)
        spans = sampler.block_spans(frames_total)
        # the context pass, each block's denoising passes, and a cache refresh after every block but the last
        steps_total = 1 + len(spans) * len(self.timesteps) + len(spans) - 1
        steps_done = 0

        def step_done():
            nonlocal steps_done
            steps_done += 1
            if on_step is not None:
                on_step(steps_done, steps_total)

        # The lock is held across the yields below, so a second stream iterated on the same thread while
        # this one is open would wait for itself forever: refuse it instead. Other threads wait their turn.
        if not self._lock.acquire(blocking=self._lock_owner is not threading.current_thread()):
            raise RuntimeError("another shot is still streaming on this engine in this thread: finish iterating "
                               "its stream, or close() it, before starting the next")
        self._lock_owner = threading.current_thread()
        try:
            dit = self.dit
            text, prompt_ids = self.shot_text(state if self.use_history else state.truncate(0), request, flags)
            cache = self._kv_cache((ctx_frames + frames_total) * tpf)
            text_kv = dit.encode_text(text)
            ctx = self._context_latents(state, plan, (h, w))
            zero = torch.zeros(1, ctx_frames, device=self.device)
            dit.forward_cached(ctx, zero, text_kv, flags[:, :ctx_frames], cache, 0, prompt_ids[:, :ctx_frames],
                               shot_phase=self.shot_phase)
            step_done()

            decoder = StreamingDecoder(self.vae)
            decoder.reset()
            vae_dtype = next(self.vae.parameters()).dtype
            shot_frames = []
            for b, (f0, f1) in enumerate(spans):
                sl = slice(ctx_frames + f0, ctx_frames + f1)
                x = noise[:, :, f0:f1].to(self.device, self.dtype)
                for k, t in enumerate(self.timesteps):
                    t_frames = torch.full((1, f1 - f0), float(t), device=self.device)
                    flow = dit.forward_cached(x, t_frames, text_kv, flags[:, sl], cache, sl.start, prompt_ids[:, sl],
                                              shot_phase=self.shot_phase)
                    x0 = self.schedule.x0_from_flow(x, flow, t_frames)
                    if k + 1 < len(self.timesteps):
                        fresh = torch.randn(x.shape, generator=gen).to(self.device, self.dtype)
                        t_next = torch.full_like(t_frames, float(self.timesteps[k + 1]))
                        x = self.schedule.add_noise(x0, fresh, t_next)
                    step_done()
                pixels = decoder.feed(x0.to(vae_dtype))  # [1, 3, n, H, W] in [-1, 1]
                frames = ((pixels[0].float().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu()  # [n, H, W, 3]
                shot_frames.append(frames)
                yield BlockOutput(state.num_shots, b, len(spans), x0, frames)
                # Cache refresh: the clean block at t=0 is what later blocks attend to. It runs after the
                # block is out (one DiT pass less between a block's last step and its frames) and not at
                # all after the last block, which no block attends to.
                if b + 1 < len(spans):
                    dit.forward_cached(x0, torch.zeros_like(t_frames), text_kv, flags[:, sl], cache, sl.start,
                                       prompt_ids[:, sl], shot_phase=self.shot_phase)
                    step_done()
            decoder.finish()
        finally:
            self._lock_owner = None
            self._lock.release()

        frames = torch.cat(shot_frames)
        record = ShotRecord(request.global_caption, request.caption, request.negative, int(request.seed), shot_flag,
                            (frames * 255).round().to(torch.uint8))
        stream.frames = frames
        stream.state = state.with_shot(record)
