"""Text encoders (umT5 layouts, tokenizer sources, MiniLM, hash encoder), prompt building, PromptCache."""
import io
import warnings

import pytest
import torch
from safetensors.torch import save_file

from shotstream_core.text import (
    SPIECE_KEY,
    MiniLMEncoder,
    PromptCache,
    RandomTextEncoder,
    SentencePieceTokenizer,
    TextEncoder,
    UMT5Config,
    UMT5Encoder,
    UMT5EncoderModel,
    _to_wan_names,
    build_shot_prompt,
    umt5_config_from_state_dict,
)

# umT5-XXL encoder: 256384x4096 embedding + 24 x (4 attn + 3 FFN matrices, 2 norms, 32x64 bias) + final norm.
UMT5_XXL_ENCODER_PARAMS = 5_680_910_336

CORPUS = [
    "A red circle moves left across a green meadow under a blue sky.",
    "Close-up of a yellow square on a sandy beach at noon.",
    "Wide shot: two characters, a purple triangle and an orange circle, in the snow.",
    "The night sky is dark; a white star shape moves up slowly.",
    "Medium shot of a blue square walking right in the desert.",
] * 20

PROMPTS = ["A red circle on the beach.", "Wide shot: a blue square moves right across the snowy night meadow."]


@pytest.fixture(scope="module")
def spiece_bytes() -> bytes:
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=64, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # umT5's special ids
        minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf_umt5(spiece_bytes):
    """A small random umT5 encoder from transformers, the semantics we must match."""
    from transformers import UMT5Config as HFConfig, UMT5EncoderModel as HFModel

    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = HFModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def hf_reference(model, tokenizer, prompts):
    ids = [tokenizer(p) for p in prompts]
    length = max(map(len, ids))
    batch = torch.tensor([t + [0] * (length - len(t)) for t in ids])
    mask = (torch.arange(length)[None] < torch.tensor([len(t) for t in ids])[:, None]).long()
    with torch.no_grad():
        hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state
    return [h[: len(t)] for h, t in zip(hidden, ids)]


def hf_state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# --- umT5 ---------------------------------------------------------------------------------------

def test_comfy_layout_with_embedded_tokenizer_matches_transformers(tmp_path, hf_umt5, spiece_bytes):
    sd = hf_state(hf_umt5)
    sd[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file(sd, str(path))

    enc = UMT5Encoder.from_files(path, dtype=torch.float32)
    assert isinstance(enc, TextEncoder)
    feats = enc.encode(PROMPTS)
    want = hf_reference(hf_umt5, enc.tokenizer, PROMPTS)
    for f, w, p in zip(feats, want, PROMPTS):
        assert f.dtype == torch.float32
        assert f.shape == (enc.count_tokens(p), 32)  # real tokens only, </s> included
        assert torch.allclose(f, w, atol=1e-5), (f - w).abs().max()


def test_wan_pth_with_tokenizer_folder(tmp_path, hf_umt5, spiece_bytes):
    folder = tmp_path / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(spiece_bytes)
    wan = _to_wan_names(hf_state(hf_umt5))
    assert "blocks.1.pos_embedding.embedding.weight" in wan and "blocks.0.ffn.gate.0.weight" in wan
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(wan, path)

    enc = UMT5Encoder.from_files(path, tokenizer=folder, dtype=torch.float32)
    want = hf_reference(hf_umt5, enc.tokenizer, PROMPTS)
    for f, w in zip(enc.encode(PROMPTS), want):
        assert torch.allclose(f, w, atol=1e-5)
    # A prompt's features do not depend on what else is in the batch (padding is masked).
    alone = enc.encode(PROMPTS[:1])[0]
    assert torch.allclose(alone, want[0], atol=1e-5)

    with pytest.raises(ValueError, match="does not embed a tokenizer"):
        UMT5Encoder.from_files(path)
    # the Wan folder itself: its .pth and google/umt5-xxl, whatever else it holds (the VAE is a .pth too)
    from shotstream_core.loading import ModelLoadError, umt5_files
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"not the encoder")
    assert umt5_files(tmp_path) == umt5_files(path) == (path, folder)
    with pytest.raises(ModelLoadError, match="no umT5-XXL weights"):
        umt5_files(folder)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        UMT5Encoder.from_files(path, tokenizer=tmp_path)


def test_fp8_scaled_is_dequantised(tmp_path, hf_umt5, spiece_bytes):
    sd = hf_state(hf_umt5)
    quant = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and "embed" not in k and "shared" not in k and "bias" not in k:
            scale = v.abs().max() / 448.0
            quant[k] = (v / scale).to(torch.float8_e4m3fn)
            quant[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            quant[k] = v
    quant["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    quant[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(quant, str(path))

    enc = UMT5Encoder.from_files(path, dtype=torch.float32)
    q = quant["encoder.block.0.layer.0.SelfAttention.q.weight"].float() * quant["encoder.block.0.layer.0.SelfAttention.q.scale_weight"]
    assert torch.equal(enc.model.blocks[0].attn.q.weight, q)
    f = enc.encode(PROMPTS[:1])[0]
    w = hf_reference(hf_umt5, enc.tokenizer, PROMPTS[:1])[0]
    assert torch.nn.functional.cosine_similarity(f.flatten(), w.flatten(), dim=0) > 0.98


def test_full_size_umt5_xxl_on_meta():
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config())
    assert sum(p.numel() for p in model.parameters()) == UMT5_XXL_ENCODER_PARAMS
    sd = model.state_dict()
    assert sd["token_embedding.weight"].shape == (256384, 4096)
    assert sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert sd["blocks.0.ffn.gate.0.weight"].shape == (10240, 4096)
    assert sd["blocks.0.ffn.fc2.weight"].shape == (4096, 10240)
    assert umt5_config_from_state_dict(sd) == UMT5Config()


def test_wrong_file_is_named(tmp_path):
    from shotstream_core.vae import WanVAE

    path = tmp_path / "vae_given_as_text_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in WanVAE("micro").state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="not a umT5 text encoder: found .*expected models_t5_umt5"):
        UMT5Encoder.from_files(path)


def test_umt5_truncates_keeping_eos(tmp_path, hf_umt5, spiece_bytes):
    sd = hf_state(hf_umt5)
    sd[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    path = tmp_path / "umt5.safetensors"
    save_file(sd, str(path))
    enc = UMT5Encoder.from_files(path, dtype=torch.float32, max_tokens=6)
    assert enc.count_tokens(PROMPTS[1]) > 6
    with pytest.warns(UserWarning, match="keeping the first 6"):
        f = enc.encode([PROMPTS[1]])[0]
    assert f.shape == (6, 32)


def test_tokenizer_cleans_like_wan(spiece_bytes):
    tok = SentencePieceTokenizer(spiece_bytes)
    assert tok("a  red\n circle &amp; sky ") == tok("a red circle & sky")
    assert tok("a red circle")[-1] == tok.eos_id == 1
    # ftfy, which Wan always runs: curly quotes straight, UTF-8 read as Latin-1 repaired
    assert SentencePieceTokenizer.clean("the man\u2019s \u201chat\u201d") == 'the man\'s "hat"'
    assert SentencePieceTokenizer.clean("caf\u00c3\u00a9") == "caf\u00e9"


# --- prompts ------------------------------------------------------------------------------------

def words(text: str) -> int:
    return len(text.replace(":", ": ").split())


def test_shot_prompt_joins_as_reference():
    assert build_shot_prompt("A meadow. Two shapes.", "A red circle.", 2, words, 100) == \
        "A meadow. Two shapes.shot2:A red circle."


def test_truncation_cuts_global_caption_first():
    global_caption = "one two three four five six seven eight"
    shot = "the red circle moves left"
    with pytest.warns(UserWarning, match="cut 4 of 8 words from the end of the global caption"):
        prompt = build_shot_prompt(global_caption, shot, 0, words, 9)
    assert prompt == "one two three fourshot0:" + shot  # the shot text survives whole
    assert words(prompt) <= 9


def test_truncation_cuts_shot_only_when_it_alone_is_too_long():
    shot = "a b c d e f g h"
    with pytest.warns(UserWarning, match="cut 3 of 8 words from the shot caption"):
        prompt = build_shot_prompt("global words here", shot, 1, words, 6)
    assert prompt == "shot1:a b c d e"


def test_truncation_with_a_real_tokenizer(spiece_bytes):
    tok = SentencePieceTokenizer(spiece_bytes)
    count = lambda s: len(tok(s))
    g, s = CORPUS[0] + " " + CORPUS[2], CORPUS[1]
    limit = count(s) + 12
    with pytest.warns(UserWarning, match="global caption"):
        prompt = build_shot_prompt(g, s, 3, count, limit)
    assert count(prompt) <= limit and prompt.endswith("shot3:" + s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_shot_prompt(g, s, 3, count, 10_000) == g + "shot3:" + s


# --- MiniLM, hash encoder, cache -----------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # proves no hub access is needed
    return MiniLMEncoder(max_tokens=48)


def test_minilm_offline_deterministic_token_features(minilm):
    assert isinstance(minilm, TextEncoder) and minilm.dim == 384
    a = minilm.encode(PROMPTS)
    b = minilm.encode(list(reversed(PROMPTS)))[::-1]
    for fa, fb, p in zip(a, b, PROMPTS):
        assert fa.shape == (minilm.count_tokens(p), 384) and fa.dtype == torch.float32
        assert torch.allclose(fa, fb, atol=1e-5)  # batch order and padding do not matter
    assert not torch.allclose(a[0][1], a[1][1])  # different words, different features


def test_minilm_truncates(minilm):
    long = " ".join(["circle"] * 100)
    with pytest.warns(UserWarning, match="keeping the first 48"):
        assert minilm.encode([long])[0].shape == (48, 384)


def test_random_encoder_is_deterministic():
    a, b = RandomTextEncoder(16, 8, seed=0), RandomTextEncoder(16, 8, seed=0)
    fa, fb = a.encode(["A red circle."])[0], b.encode(["a red circle ."])[0]
    assert fa.shape == (5, 16) and torch.equal(fa, fb)
    assert not torch.equal(fa, RandomTextEncoder(16, 8, seed=1).encode(["A red circle."])[0])
    assert torch.equal(a.encode(["red"])[0][0], fa[1])  # a word's vector does not depend on context
    with pytest.warns(UserWarning):
        assert a.encode(["w " * 20])[0].shape == (8, 16)


def test_prompt_cache_encodes_each_prompt_once():
    enc = RandomTextEncoder(8, 16)
    cache = PromptCache(enc, device="cpu")
    x = cache.get("a red circle")
    cache.get_many(["a red circle", "a blue square", "a blue square"])
    assert cache.encoded == 2 and len(cache) == 2
    assert cache.get("a red circle") is x
    assert torch.equal(x, enc.encode(["a red circle"])[0])


def test_prompt_cache_keeps_only_the_most_recently_used():
    enc = RandomTextEncoder(8, 16)
    cache = PromptCache(enc, device="cpu", capacity=3)
    for p in ["a", "b", "c"]:
        cache.get(p)
    cache.get("a")  # now the most recent: "b" is the oldest
    cache.get("d")
    assert len(cache) == 3 and cache.encoded == 4
    cache.get_many(["a", "c", "d"])
    assert cache.encoded == 4  # all still held
    cache.get("b")
    assert cache.encoded == 5  # it was dropped, so encoded again
    # a call asking for more prompts than the capacity still gets every one, each right
    many = [f"p{i}" for i in range(5)]
    feats = cache.get_many(many)
    assert len(cache) == 3 and all(torch.equal(f, enc.encode([p])[0]) for f, p in zip(feats, many))
