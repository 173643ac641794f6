"""Checkpoint formats, config inference, LoRA merge and wrong-file errors (issue 2, acceptance 6)."""
import dataclasses
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from shotstream_core.config import get_preset
from shotstream_core.loading import (ModelLoadError, build_dit, infer_dit_config, load_dit_state, merge_lora,
                                     save_dit)
from shotstream_core.model import CausalWanDiT, WanDiT

CFG = get_preset("micro").dit


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in CausalWanDiT(CFG).state_dict().items()}


def run(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    text = torch.randn(1, 1, 5, CFG.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.full((1, 3), 600.0), text, torch.ones(1, 3, dtype=torch.long))


def write_all_formats(sd, tmp_path):
    ref = tmp_path / "shotstream_merged.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, ref)
    wan = tmp_path / "wan"
    wan.mkdir()
    save_file(sd, str(wan / "diffusion_pytorch_model.safetensors"))
    (wan / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": CFG.dim, "num_heads": CFG.num_heads,
                                                "num_layers": CFG.num_layers, "text_len": CFG.text_len}))
    comfy = tmp_path / "wan2.1_t2v_micro.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(comfy))
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    return [ref, wan, comfy, bare]


def test_all_formats_load_to_identical_outputs(weights, tmp_path):
    outs = []
    for path in write_all_formats(weights, tmp_path):
        sd, cfg = load_dit_state(path)
        assert cfg == CFG, path
        outs.append(run(build_dit(sd, cfg, attention="sdpa")))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("absolute_position", [False, True])
def test_own_save_keeps_config_in_metadata(weights, tmp_path, absolute_position):
    want = dataclasses.replace(CFG, absolute_position=absolute_position)  # a flag no tensor shape shows
    model = build_dit(weights, want, attention="sdpa")
    sd, cfg = load_dit_state(save_dit(model, tmp_path / "dit.safetensors"))
    assert cfg == want
    torch.testing.assert_close(run(build_dit(sd, cfg, attention="sdpa")), run(model), rtol=0, atol=0)


def test_coded_alone_frames_travel_with_the_weight_and_a_file_with_half_of_them_is_refused(weights, tmp_path):
    """A coded_alone_frames model's file keeps the count (metadata) beside the weight (coded_alone), loads
    back to the same outputs, and fits a preset only where the count is its context frames + 1; a file with
    the weight and no count (or the count and no weight) is refused with the fix."""
    from shotstream_core.loading import dit_misfit

    micro = get_preset("micro")
    want = dataclasses.replace(CFG, coded_alone_frames=micro.sampler.context_frames + 1)
    model = build_dit({**weights, "coded_alone": torch.randn(CFG.dim) * 0.5}, want, attention="sdpa")
    path = save_dit(model, tmp_path / "dit.safetensors")
    sd, cfg = load_dit_state(path)
    assert cfg == want and dit_misfit(cfg, micro) is None
    torch.testing.assert_close(run(build_dit(sd, cfg, attention="sdpa")), run(model), rtol=0, atol=0)
    assert (run(model) - run(build_dit(weights, CFG, attention="sdpa"))).abs().max() > 1e-4
    assert "coded_alone_frames 3" in dit_misfit(dataclasses.replace(want, coded_alone_frames=3), micro)
    save_file({**weights, "coded_alone": torch.zeros(CFG.dim)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ModelLoadError, match="only the weight.*save_dit"):
        load_dit_state(tmp_path / "bare.safetensors")
    config = json.dumps(dataclasses.asdict(want))
    save_file(weights, str(tmp_path / "half.safetensors"), metadata={"shotstream_config": config})
    with pytest.raises(ModelLoadError, match="only the setting.*save_dit"):
        load_dit_state(tmp_path / "half.safetensors")


def test_the_bundled_models_keep_the_ids_their_evaluation_recorded():
    """A model's id (loading.fingerprint) is what a saved story names to be loaded again: a config field added
    later, off, must not change the id of a model saved before it. The committed evaluation recorded each
    bundled DiT's id when it ran."""
    from pathlib import Path

    from shotstream_core.loading import fingerprint

    weights = Path(__file__).resolve().parents[1] / "shotstream_core" / "weights" / "tiny"
    recorded = json.loads((weights / "eval" / "metrics.json").read_text())["variants"]
    for row, name in (("student", "dit"), ("stage3", "student_stage3"), ("teacher", "teacher")):
        sd, cfg = load_dit_state(weights / f"{name}.safetensors")
        assert fingerprint(sd, cfg) == recorded[row]["model_id"], name
    sd, cfg = load_dit_state(weights / "dit.safetensors")
    assert fingerprint(sd, dataclasses.replace(cfg, coded_alone_frames=7)) != recorded["student"]["model_id"]


def test_pooled_text_is_read_from_the_weights_even_without_metadata(weights, tmp_path):
    want = dataclasses.replace(CFG, pooled_text=True)
    g = torch.Generator().manual_seed(3)
    extra = {k: torch.randn(v.shape, generator=g) * 0.1
             for k, v in WanDiT(want).state_dict().items() if k.startswith("text_pool.")}
    save_file({**weights, **extra}, str(tmp_path / "bare.safetensors"))  # no metadata: keys alone
    sd, cfg = load_dit_state(tmp_path / "bare.safetensors")
    assert cfg == want
    model = build_dit(sd, cfg, attention="sdpa")
    assert (run(model) - run(build_dit(weights, CFG, attention="sdpa"))).abs().max() > 1e-4  # the branch is used
    sd, cfg = load_dit_state(save_dit(model, tmp_path / "dit.safetensors"))
    assert cfg == want
    torch.testing.assert_close(run(build_dit(sd, cfg, attention="sdpa")), run(model), rtol=1e-5, atol=1e-6)


def test_config_json_beside_a_weights_file_gives_the_heads(tmp_path):
    """A DiT whose heads the shapes cannot tell (dim 96 is no multiple of 128): read from config.json."""
    odd = dataclasses.replace(CFG, dim=96, ffn_dim=192, num_heads=3)
    folder = tmp_path / "custom"
    folder.mkdir()
    save_file(WanDiT(odd).state_dict(), str(folder / "dit.safetensors"))  # bare: no metadata
    with pytest.raises(ModelLoadError, match="config.json"):
        load_dit_state(folder / "dit.safetensors")
    (folder / "config.json").write_text('{"num_heads": 3}')
    assert load_dit_state(folder / "dit.safetensors")[1].num_heads == 3


def test_lora_merge_peft_and_kohya_agree_and_change_output(weights, tmp_path):
    g = torch.Generator().manual_seed(1)
    rank = 4
    peft, kohya, native = {}, {}, {}
    for layer in range(CFG.num_layers):
        for mod in ("self_attn.q", "ffn.0"):
            out_dim = weights[f"blocks.{layer}.{mod}.weight"].shape[0]
            a = torch.randn(rank, CFG.dim, generator=g) * 0.1
            b = torch.randn(out_dim, rank, generator=g) * 0.1
            peft[f"base_model.model.blocks.{layer}.{mod}.lora_A.weight"] = a
            peft[f"base_model.model.blocks.{layer}.{mod}.lora_B.weight"] = b
            kohya[f"diffusion_model.blocks.{layer}.{mod}.lora_down.weight"] = a
            kohya[f"diffusion_model.blocks.{layer}.{mod}.lora_up.weight"] = b
            kohya[f"diffusion_model.blocks.{layer}.{mod}.alpha"] = torch.tensor(float(rank))
            flat = f"lora_unet_blocks_{layer}_{mod.replace('.', '_')}"
            native.update({f"{flat}.lora_down.weight": a, f"{flat}.lora_up.weight": b,
                           f"{flat}.alpha": torch.tensor(float(rank))})
    merged = merge_lora(weights, peft, strength=0.7)
    w = "blocks.0.self_attn.q.weight"
    a = peft["base_model.model.blocks.0.self_attn.q.lora_A.weight"]
    b = peft["base_model.model.blocks.0.self_attn.q.lora_B.weight"]
    torch.testing.assert_close(merged[w], weights[w] + 0.7 * b @ a)
    torch.testing.assert_close(merge_lora(weights, kohya, 0.7)[w], merged[w])
    # kohya's native names: the module path flattened with underscores
    torch.testing.assert_close(merge_lora(weights, native, 0.7)[w], merged[w])
    # merged file through every format still agrees
    outs = [run(build_dit(*load_dit_state(p), attention="sdpa")) for p in write_all_formats(merged, tmp_path)]
    assert (outs[0] - run(build_dit(weights, CFG, attention="sdpa"))).abs().max() > 1e-4
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_real_configs_inferred_from_meta_tensors(preset):
    cfg = get_preset(preset).dit
    with torch.device("meta"):
        sd = WanDiT(cfg).state_dict()
    assert infer_dit_config(sd) == cfg
    params = sum(v.numel() for v in sd.values())
    expected = {"wan2.1-t2v-1.3b": 1.42e9, "wan2.1-t2v-14b": 14.29e9}[preset]
    assert abs(params - expected) / expected < 0.01, params


def test_vae_given_as_dit_is_named(tmp_path):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(2, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match="not a Wan2.1 DiT.*VAE"):
        load_dit_state(path)


def test_text_encoder_given_as_dit_is_named(tmp_path):
    path = tmp_path / "umt5.safetensors"
    save_file({"shared.weight": torch.zeros(4, 2), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="T5"):
        load_dit_state(path)


def test_truncated_file(weights, tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file(weights, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_dit_state(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/shotstream_pwned",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"generator": Evil()}, path)
    if os.path.exists("/tmp/shotstream_pwned"):
        os.remove("/tmp/shotstream_pwned")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_dit_state(path)
    assert not os.path.exists("/tmp/shotstream_pwned")


def test_missing_file_and_incomplete_dit(weights, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_dit_state(tmp_path / "nope.safetensors")
    partial = {k: v for k, v in weights.items() if k != "blocks.1.ffn.2.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match="incomplete"):
        load_dit_state(tmp_path / "partial.safetensors")


def test_weights_are_replaced_atomically_under_a_reader(tmp_path):
    """A process that has a weights file mapped (a host, a running stage) keeps reading the old file when
    training writes a new one: save_tensors / copy_file rename a new file over it, never rewrite it."""
    from safetensors import safe_open

    from shotstream_core.files import copy_file, save_tensors

    path = tmp_path / "dit.safetensors"
    save_tensors({"w": torch.zeros(1000)}, path)
    inode = path.stat().st_ino
    with safe_open(str(path), "pt") as reader:
        save_tensors({"w": torch.ones(1000)}, path)
        assert path.stat().st_ino != inode  # a new file took the name
        assert torch.equal(reader.get_tensor("w"), torch.zeros(1000))  # the open one is untouched
    save_tensors({"w": torch.full((3,), 2.0)}, tmp_path / "other.safetensors")
    copy_file(tmp_path / "other.safetensors", path)
    with safe_open(str(path), "pt") as reader:
        assert torch.equal(reader.get_tensor("w"), torch.full((3,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.safetensors", "other.safetensors"]  # no temp left


def test_written_weights_and_states_are_readable_like_any_new_file(tmp_path):
    """safetensors creates its files 0600; a saved state or checkpoint in a shared output folder must get
    the mode any other new file gets (0666 less the umask), as its .json and the videos beside it do."""
    import os
    import stat

    from shotstream_core.files import save_tensors

    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    old = os.umask(0o022)
    try:
        for umask in (0o022, 0o077, 0o002):
            os.umask(umask)
            save_tensors({"w": torch.zeros(3)}, tmp_path / f"w{umask}.safetensors")
            (tmp_path / f"plain{umask}.json").write_text("{}")
            assert mode(f"w{umask}.safetensors") == mode(f"plain{umask}.json") == 0o666 & ~umask
    finally:
        os.umask(old)


def test_loading_a_teacher_as_the_streaming_model_warns(tmp_path):
    """Teacher and student share one state dict; the file's role says which one it is, and the engine, which
    streams in a few steps, warns when given the 50-step teacher."""
    from shotstream_core.config import get_preset
    from shotstream_core.loading import load_engine, save_dit
    from shotstream_core.model import CausalWanDiT, WanDiT

    cfg = get_preset("micro").dit
    save_dit(WanDiT(cfg), tmp_path / "teacher.safetensors")
    save_dit(CausalWanDiT(cfg), tmp_path / "student.safetensors")
    with pytest.warns(UserWarning, match="teacher.safetensors is a bidirectional teacher"):
        load_engine(dit_path=tmp_path / "teacher.safetensors", preset="micro", device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_engine(dit_path=tmp_path / "student.safetensors", preset="micro", device="cpu")
    assert not [w for w in caught if "teacher" in str(w.message)]


def test_torch_files_of_the_old_format_load_and_junk_is_named(tmp_path):
    """torch.save's pre-1.6 format (no zip) cannot be memory-mapped but is a checkpoint all the same; bytes
    that are no checkpoint at all are a ModelLoadError naming the file."""
    from shotstream_core.files import ModelLoadError, read_tensors

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_tensors(legacy)["w"], torch.arange(3.0))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk\n")
    with pytest.raises(ModelLoadError, match="junk.pt could not be read as a torch checkpoint"):
        read_tensors(junk)


def test_a_student_file_records_its_blocks_and_the_engine_samples_on_them(tmp_path):
    """A student trained with a first block of one latent frame says so in its file; the engine, stages
    3-4 and the evaluation read it back. Files without the record (the reference's, Wan's, a teacher's)
    keep the preset's blocks."""
    from shotstream_core.engine import ShotRequest
    from shotstream_core.loading import load_engine, sampler_for_dit

    preset = get_preset("micro")
    own = dataclasses.replace(preset.sampler, first_block_frames=1)
    student = save_dit(CausalWanDiT(preset.dit), tmp_path / "student.safetensors", own)
    plain = save_dit(CausalWanDiT(preset.dit), tmp_path / "plain.safetensors", preset.sampler)
    teacher = save_dit(WanDiT(preset.dit), tmp_path / "teacher.safetensors", own)
    assert sampler_for_dit(student, preset.sampler) == own
    assert sampler_for_dit(plain, preset.sampler) == preset.sampler
    assert sampler_for_dit(teacher, preset.sampler) == preset.sampler
    engine = load_engine(dit_path=student, preset="micro", device="cpu")
    assert engine.sampler.first_block_frames == 1
    state = engine.new_story()
    blocks = list(engine.stream_shot(state, ShotRequest("a meadow.", "a red circle", seed=1)))
    assert [b.latents.shape[2] for b in blocks] == [1, 3, 2]  # micro: 6 latent frames
    assert load_engine(dit_path=plain, preset="micro", device="cpu").sampler.first_block_frames is None

    sd = {k: v.contiguous() for k, v in CausalWanDiT(preset.dit).state_dict().items()}
    save_file(sd, tmp_path / "broken.safetensors", metadata={"shotstream_blocks": "{not json"})
    with pytest.raises(ModelLoadError, match="broken.safetensors records an unreadable block layout"):
        sampler_for_dit(tmp_path / "broken.safetensors", preset.sampler)


def test_devices_that_are_not_there_are_named(monkeypatch):
    from shotstream_core.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="runs on cpu, cuda, cuda:N or mps"):
        resolve_device("meta")


def test_fp8_scaled_dit_is_dequantised(weights, tmp_path):
    """ComfyUI's *_fp8_scaled files store fp8(W / s) and s: the loader must multiply it back."""
    quant = {}
    for key, value in weights.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / 448.0  # e4m3's largest
            quant[f"model.diffusion_model.{key}"] = (value / scale).to(torch.float8_e4m3fn)
            quant[f"model.diffusion_model.{key[:-len('weight')]}scale_weight"] = scale.reshape(1)
        else:
            quant[f"model.diffusion_model.{key}"] = value
    quant["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "wan2.1_t2v_micro_fp8_scaled.safetensors"
    save_file(quant, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scale tensor is left over as "unexpected"
        sd, cfg = load_dit_state(path)
    w = "blocks.0.self_attn.q.weight"
    assert sd[w].dtype == torch.float32
    torch.testing.assert_close(sd[w], weights[w], rtol=0.07, atol=1e-3)  # within e4m3's 3-bit mantissa
    out, ref = run(build_dit(sd, cfg, attention="sdpa")), run(build_dit(weights, CFG, attention="sdpa"))
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_the_references_lora_checkpoint_and_a_peft_folder_merge_at_their_alpha(weights, tmp_path):
    from shotstream_core.files import read_tensors
    from shotstream_core.loading import peft_lora_alpha

    g = torch.Generator().manual_seed(2)
    rank, w = 4, "blocks.0.self_attn.q.weight"
    a = torch.randn(rank, CFG.dim, generator=g) * 0.1
    b = torch.randn(CFG.dim, rank, generator=g) * 0.1
    peft = {"base_model.model.blocks.0.self_attn.q.lora_A.weight": a,
            "base_model.model.blocks.0.self_attn.q.lora_B.weight": b}
    # the reference saves {"generator_lora": ..., "critic_lora": ...}, alpha = rank, no config beside it
    ref = tmp_path / "lora.pt"
    torch.save({"generator_lora": peft, "critic_lora": {k: v * 0 for k, v in peft.items()}, "step": 3}, ref)
    assert peft_lora_alpha(ref) is None
    merged = merge_lora(weights, read_tensors(ref), 1.0, alpha=peft_lora_alpha(ref))
    torch.testing.assert_close(merged[w], weights[w] + b @ a)
    # a PEFT folder: adapter_model.safetensors with its alpha in adapter_config.json
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(peft, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16, "peft_type": "LORA"}))
    for given in (folder, folder / "adapter_model.safetensors"):
        assert peft_lora_alpha(given) == 16.0
        merged = merge_lora(weights, read_tensors(given), 1.0, alpha=peft_lora_alpha(given))
        torch.testing.assert_close(merged[w], weights[w] + (16 / rank) * b @ a)
    # another LoRA in the same (flat, ComfyUI-style) folder is not that adapter: its own alpha = rank
    save_file(peft, str(folder / "other_style.safetensors"))
    assert peft_lora_alpha(folder / "other_style.safetensors") is None
    # a dict with no weights where they are looked for names what it found
    odd = tmp_path / "odd.pt"
    torch.save({"lora_weights": peft, "step": 3}, odd)
    with pytest.raises(ModelLoadError, match="its keys: 'lora_weights', 'step'"):
        read_tensors(odd)
