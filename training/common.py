"""Shared training infrastructure: configs, torchrun/DDP setup, checkpoints, logs, and the step loop.

Every stage is `python -m training.<stage> --config YAML [--set key=value ...]` and runs unchanged under
`torchrun --nproc_per_node N` (gloo on CPU, NCCL on CUDA). Resume is exact: a stage that is stopped after
n steps and restarted reaches the same weights at step N as an uninterrupted run, because every random
draw of a step comes from a generator seeded by (seed, step, rank) and the optimiser state is saved.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from safetensors.torch import load_file

from shotstream_core.config import DiTConfig, Preset
from shotstream_core.files import save_tensors
from shotstream_core.loading import ModelLoadError, dit_misfit, load_dit_state, save_dit


# --- configs ---------------------------------------------------------------------------------------

@dataclass
class StageConfig:
    """Fields every stage has. Stages subclass this and add their own."""

    out_dir: str = "runs/tiny/stage"
    preset: str = "tiny"
    seed: int = 0
    max_steps: int = 1000
    # Time budget of one sitting, in minutes (0 = none): when it runs out the stage checkpoints and stops
    # unfinished (StageInterrupted, not done); running it again resumes exactly, so a budget never changes
    # the model a step-bound recipe trains, only how many sittings it takes.
    max_minutes: float = 0.0
    # Length of the lr's cosine decay; 0 = max_steps. Longer than max_steps, a step-bound run replays
    # exactly the schedule of a longer run that stopped at max_steps (how the tiny recipe was tuned).
    lr_decay_steps: int = 0
    batch_size: int = 8  # per process
    lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = False  # bf16 autocast where the device has native bf16 (CUDA; AMX/AVX512-BF16 CPUs)
    grad_checkpointing: bool = False
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    stop_after: int = 0  # simulate a cut run: checkpoint and raise StageInterrupted after this step
    allow_recipe_change: bool = False  # resume a run that started under another RECIPE (an experiment only)

    # The version of the stage's training code (a class attribute, not a config field): a stage raises it
    # whenever a change to its code would train another model from the same config. A run records the
    # version it started under (OUT/recipe.json), so it is never resumed half under one recipe and half under
    # another (check_recipe), and the pipeline rebuilds a finished run of an older one (stale_stages).
    RECIPE = 1

    @property
    def lr_horizon(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps > 0 else self.max_steps

    def lengthens_exactly(self) -> bool:
        """Whether a finished run given a larger max_steps goes on as an uninterrupted run of that length
        would (refuse_finished_run_changes): not where the learning rate decays over max_steps."""
        return self.lr_decay_steps > 0


def _coerce(value, typ, where: str = "config value"):
    """YAML value -> the dataclass field's type, or a ValueError that names `where` (e.g. "config lr"),
    the value and what the field takes. YAML reads 1e-3 (no dot) as a string: float fields take it, int
    fields take whole numbers only ("2", 2 and 2.0; not 1.5), str fields take numbers as text and null
    as "" (the pipeline's "export="). Tuples come from lists; an optional field reads null as None and
    anything else as its type; other unions, lists and dicts are kept as given."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        # an optional field (e.g. float | None): null is None, anything else is read as the other type
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        low = str(value).lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):  # the reference parsed "False" as True; we do not
            return False
        raise ValueError(f"{where}: {value!r} is not a boolean (use true/false)")
    if typ is float or typ is int:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            for parse in (int, float):
                try:
                    number = parse(value.strip())
                    break
                except ValueError:
                    pass
        if number is None:
            raise ValueError(f"{where}: {value!r} is not {'a number' if typ is float else 'a whole number'}")
        if not math.isfinite(number):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        if typ is float:
            return float(number)
        if isinstance(number, int):
            return number
        if not float(number).is_integer():
            raise ValueError(f"{where}: {value!r} is not a whole number")
        return int(number)
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"{where}: {value!r} is not text (quote it)")
    return value


# Shared fields of every stage config that only make sense in a range: (minimum, whether the minimum
# itself is allowed, what 0 means where 0 is allowed). Stages check their own fields themselves.
_STAGE_RANGES = {
    "seed": (0, True, ""),
    "max_steps": (0, True, ""),
    "max_minutes": (0, True, "0 = no time budget"),
    "lr_decay_steps": (0, True, "0 = max_steps"),
    "batch_size": (1, True, ""),
    "lr": (0, False, ""),
    "warmup_steps": (0, True, "0 = no warmup"),
    "weight_decay": (0, True, ""),
    "grad_clip": (0, True, "0 = no clipping"),
    "ckpt_every": (1, True, ""),
    "keep_checkpoints": (0, True, "0 = keep all"),
    "log_every": (1, True, ""),
    "num_threads": (0, True, "0 = torch's default"),
    "stop_after": (0, True, "0 = never"),
}


def check_stage_ranges(cfg, what: str = "config") -> None:
    """Refuse, by key and value, a shared StageConfig field out of its range (batch_size -1, ckpt_every 0)."""
    if not isinstance(cfg, StageConfig):
        return
    for key, (low, inclusive, zero) in _STAGE_RANGES.items():
        value = getattr(cfg, key)
        if value > low or (inclusive and value == low):
            continue
        want = f">= {low}" if inclusive else f"> {low}"
        raise ValueError(f"{what} {key}: {value!r} must be {want}{f' ({zero})' if zero else ''}")


def load_stage_config(cls, path=None, overrides=()):
    """Dataclass `cls` from a YAML file plus "key=value" overrides (values parsed as YAML)."""
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold key: value lines, not a {type(loaded).__name__}")
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: {raw!r} is not a YAML value (quote it)") from None
    return replace_config(cls(), values)


def replace_config(cfg, values: dict, fixed=(), what: str = ""):
    """cfg with `values` (YAML-parsed) coerced to its field types; unknown keys, and keys in `fixed`,
    are refused by name. `what` names the place in errors (default: the config class)."""
    cls = type(cfg)
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {what or cls.__name__}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    where = what or "config"
    out = dataclasses.replace(cfg, **{k: _coerce(v, hints[k], f"{where} {k}") for k, v in values.items()})
    check_stage_ranges(out, where)
    return out


def load_dit(path, cls: type[nn.Module], what: str, device, frozen: bool = False) -> nn.Module:
    """A DiT of class `cls` (WanDiT or CausalWanDiT) in the shape its weights file has, on `device`;
    `frozen`: in eval mode without gradients (a teacher that only samples). A clear error names `what`
    if the file is absent."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} weights not found at {path}: run the stage that writes them first, "
                                f"or set the path in the config")
    sd, dit_cfg = load_dit_state(path)
    model = cls(dit_cfg)
    model.load_state_dict(sd)
    model = model.to(device)
    return model.eval().requires_grad_(False) if frozen else model


def describe_dit(dit: DiTConfig) -> str:
    """"64-dim 4-layer 2-head patch-1x2x2", and the options that are on (which shapes alone do not tell)."""
    options = [name for name in ("absolute_position", "pooled_text") if getattr(dit, name)]
    if dit.coded_alone_frames:
        options.append(f"coded_alone_frames {dit.coded_alone_frames}")
    shape = f"{dit.dim}-dim {dit.num_layers}-layer {dit.num_heads}-head patch-{'x'.join(map(str, dit.patch_size))}"
    return shape + (f" ({', '.join(options)})" if options else "")


def preset_with_dit(preset: Preset, changes: dict) -> Preset:
    """`preset` with its DiT's shape changed by `changes` (the teacher config's `dit:` field, e.g.
    {patch_size: [1, 1, 1]})."""
    if not changes:
        return preset
    dit = replace_config(preset.dit, changes, what=f"dit (changes to the {preset.name} preset's DiT)")
    return preset_for_weights(preset, dit, "the config's dit:")


def preset_for_weights(preset: Preset, dit: DiTConfig, source) -> Preset:
    """`preset` with the DiT shape `dit` of `source` (a teacher's weights, or the teacher config's `dit:`):
    the later stages take the architecture from the teacher, never from a config of their own."""
    misfit = dit_misfit(dit, preset)
    if misfit:
        raise ModelLoadError(f"{source} does not fit the {preset.name} preset: {misfit}. Width, depth, heads "
                             f"and patch may change; channels, text_dim and text_len follow from its VAE and "
                             f"text encoder")
    return dataclasses.replace(preset, dit=dit)


def save_config(cfg, path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# --- distributed -----------------------------------------------------------------------------------

class Dist:
    """The process group of this run (world 1 without torchrun)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device=torch.device("cpu")):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @classmethod
    def init(cls, device: str = "auto") -> "Dist":
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available; use device=cpu or auto")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank, world, local, dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the process group; the model itself when world is 1 (training/README: why not FSDP)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, on this process's device (NCCL reduces CUDA tensors only)."""
        if not self.distributed:
            return t
        t = t.detach().to(self.device, copy=True)
        torch_dist.all_reduce(t)
        return t / self.world_size

    def from_main(self, value: int) -> int:
        """Rank 0's value on every rank: a draw all ranks must share (e.g. the self-forcing exit step)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        torch_dist.broadcast(t, src=0)
        return int(t.item())

    def gather_to_main(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere); obj on its own when not distributed."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(obj, out, dst=0)
        return out

    def close(self, synchronize: bool = True) -> None:
        """End the process group. synchronize, for a stage every rank finished (run_stage's normal return):
        first free what still holds the group (a DDP wrapper and its reducer, kept alive by reference cycles
        until a garbage collection that could otherwise come at interpreter exit, after the group is gone),
        then wait for every rank, so no rank tears down its gloo connections while another still uses them
        (rank 1 dying with "terminate called without an active exception" after done.json was written).
        Not on an error or a pause, where the ranks may have stopped apart: a barrier there could wait for
        a rank that never comes."""
        if not (self.distributed and torch_dist.is_initialized()):
            return
        if synchronize:
            gc.collect()
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, rank, stream): what makes resume exact."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0]))
    return g


class StepBatches:
    """Which dataset items each process gets at a step: DistributedSampler epochs, indexed by step."""

    def __init__(self, length: int, batch_size: int, dist: Dist, seed: int):
        from torch.utils.data import DistributedSampler

        if length < dist.world_size * batch_size:
            raise ValueError(f"{length} items cannot fill a batch of {batch_size} on {dist.world_size} "
                             f"process(es); lower batch_size or add data")
        self.sampler = DistributedSampler(range(length), num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.per_epoch = len(self.sampler) // batch_size
        self._epoch, self._order = None, None

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(iter(self.sampler))
        return self._order[k * self.batch_size:(k + 1) * self.batch_size]


# --- checkpoints -----------------------------------------------------------------------------------

def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2] if py_state[2] is None else float(py_state[2])},
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class Checkpointer:
    """out_dir/checkpoints/step_XXXXXXXX/{<module>.safetensors, state.pt}; written to a temp folder and
    renamed, so a run killed mid-save leaves the previous checkpoint intact."""

    def __init__(self, out_dir, keep: int = 2, sampler=None):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep
        self.sampler = sampler  # a student's blocks, recorded in its checkpointed file as in its final one

    def _dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / "state.pt").is_file())

    def latest_step(self) -> int | None:
        dirs = self._dirs()
        return int(dirs[-1].name[5:]) if dirs else None

    def path(self, step: int | None = None) -> Path:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.root}")
        return self.root / f"step_{step:08d}"

    def save(self, step: int, modules: dict, optimizers: dict, extra: dict | None = None) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            module = unwrap(module)
            if isinstance(getattr(module, "config", None), DiTConfig):
                save_dit(module, tmp / f"{name}.safetensors", self.sampler)  # with its config and blocks
                continue
            sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_tensors(sd, tmp / f"{name}.safetensors")
        state = {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "rng": _rng_state(), "extra": dict(extra or {})}
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self._dirs()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, modules: dict, optimizers: dict | None = None, step: int | None = None) -> tuple[int, dict]:
        folder = self.path(step)
        for name, module in modules.items():
            sd = load_file(str(folder / f"{name}.safetensors"))
            unwrap(module).load_state_dict(sd)
        state = torch.load(folder / "state.pt", weights_only=True)
        for name, opt in (optimizers or {}).items():
            opt.load_state_dict(state["optimizers"][name])
        _set_rng_state(state["rng"])
        return int(state["step"]), state["extra"]

    def weights(self, name: str, step: int | None = None) -> dict:
        return load_file(str(self.path(step) / f"{name}.safetensors"))


# --- logging ---------------------------------------------------------------------------------------

class Logger:
    """log.jsonl (one line per logged step), a tqdm bar with the loss and step time, loss.png."""

    def __init__(self, out_dir, total_steps: int, enabled: bool = True, start: int = 0, desc: str = ""):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out_dir / "log.jsonl", "a")
            self.bar = tqdm(total=total_steps, initial=start, desc=desc or self.out_dir.name,
                            dynamic_ncols=True, mininterval=5.0)
        self._last = time.perf_counter()

    def log(self, step: int, **scalars) -> None:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in scalars.items()}
        scalars.setdefault("step_time", now - self._last)
        self._last = now
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.file.flush()
        shown = {k: f"{v:.4g}" for k, v in scalars.items() if "loss" in k or k == "step_time"}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.n = step
        self.bar.refresh()

    def plot(self) -> Path | None:
        if not self.enabled:
            return None
        return plot_log(self.out_dir / "log.jsonl", self.out_dir / "loss.png")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()


def read_log(path) -> list[dict]:
    """Entries of a log.jsonl; after a resume the later entry of a step wins."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            by_step[d["step"]] = d
    return [by_step[k] for k in sorted(by_step)]


def plot_log(log_path, png_path, keys=None) -> Path | None:
    """Every scalar with "loss" in its name against the step (raw, faint, and a moving average)."""
    from .report import pyplot, save_figure

    plt = pyplot()

    rows = read_log(log_path)
    if not rows:
        return None
    keys = keys or sorted({k for r in rows for k in r if "loss" in k})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        xs, ys = np.array(pts).T
        ax.plot(xs, ys, alpha=0.3, lw=0.8)
        w = max(1, len(ys) // 30)
        if w > 1:
            ax.plot(xs[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), lw=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        if ys.min() > 0 and ys.max() / ys.min() > 20:
            ax.set_yscale("log")
    fig.suptitle(Path(log_path).parent.name)
    return save_figure(fig, png_path, dpi=90)


# --- the step loop ---------------------------------------------------------------------------------

def lr_at(step: int, base: float, warmup: int, total: int, final_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to final_ratio * base at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def clip_and_step(optimizer: torch.optim.Optimizer, params, grad_clip: float) -> float:
    """Clip the gradients (when grad_clip > 0) and step, unless they are not finite: then the update is
    skipped, so one overflowing step (bf16, a bad batch) cannot turn every weight into NaN. Returns the
    gradient norm before clipping (NaN or inf for a skipped step; train_loop stops a run of them)."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
    if math.isfinite(norm):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return norm


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, grad_clip: float) -> float:
    """zero_grad, backward, then clip_and_step; returns the gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return clip_and_step(optimizer, params, grad_clip)


# Consecutive steps with non-finite gradients after which a stage stops instead of skipping on.
MAX_NONFINITE_STEPS = 10


def nonfinite_norms(scalars: dict) -> list[str]:
    """The gradient norms a step reported as NaN or inf (clip_and_step skipped those updates)."""
    return [k for k, v in scalars.items() if k.endswith("grad_norm") and not math.isfinite(float(v))]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls and convolutions in hardware: a CUDA GPU with bf16, or a CPU
    with AMX-BF16 or AVX512-BF16. Elsewhere oneDNN emulates bf16, which is no speed setting: on an
    AVX2-only EPYC the tiny VAE's training step took 39 s under bf16 autocast against 1.9 s in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return _cpu_has_native_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the CPU's own flags
        return bool({"amx_bf16", "avx512_bf16"} & set(cpuinfo.read_text().split()))
    try:  # elsewhere, oneDNN's own answer
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_warned_emulated_bf16: set[str] = set()


def autocast(cfg: StageConfig, device: torch.device):
    """bf16 autocast on the stage's device when cfg.bf16 and the device has native bf16; else a no-op.

    bf16 is a speed setting here, not a numerics one (VAE phase f in fp32 matched the bf16 run's
    per-step loss to 4 decimals), so where bf16 would be emulated the stage trains in fp32 and says so
    once. On CPU bf16 pays only for the VAE's convolutions (the tiny DiT's small matmuls lose to the
    casts), so the tiny configs turn it on per stage."""
    enabled = bool(cfg.bf16) and native_bf16(device)
    if cfg.bf16 and not enabled and device.type not in _warned_emulated_bf16:
        _warned_emulated_bf16.add(device.type)
        what = "GPU has no bf16" if device.type == "cuda" else "CPU has neither AMX-BF16 nor AVX512-BF16"
        print(f"[bf16] this {what}: bf16 would be emulated, several times slower than fp32, so this stage "
              f"trains in fp32 (bf16: true asks for bf16 only where it is native)", flush=True)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (saves activation memory on GPU)."""
    from torch.utils.checkpoint import checkpoint

    for block in unwrap(model).blocks:
        plain = block.forward

        def forward(*args, _plain=plain, **kw):
            return checkpoint(_plain, *args, use_reentrant=False, **kw)

        block.forward = forward


def setup_threads(cfg: StageConfig) -> None:
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)


def is_done(out_dir) -> bool:
    return (Path(out_dir) / "done.json").is_file()


def folder_bytes(path) -> int:
    """Size of a file, or of every file under a folder (0 when missing)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def stage_sizes(out_dir) -> dict:
    """A stage folder's checkpoint and output (*.safetensors) sizes in bytes, as done.json records them."""
    out = Path(out_dir)
    return {"checkpoint_bytes": folder_bytes(out / "checkpoints"),
            "output_bytes": sum(folder_bytes(p) for p in out.glob("*.safetensors"))}


# done.json fields that differ between sittings or re-runs of one finished run (its time, where the last
# sitting began, file sizes a re-save may change by metadata bytes): not part of which run it records.
SITTING_KEYS = ("wall_s", "resumed_from", "output_bytes", "checkpoint_bytes")
# Config fields of one sitting: a run resumed with others is the same run.
SITTING_CONFIG = ("max_minutes", "stop_after", "num_threads", "allow_recipe_change")
# ... and of where a run goes: with those, not part of what a run computes.
PLACE_CONFIG = ("out_dir", "export", "device")
# done.json fields added later to tell runs apart (a stage's config, pre-encoding's inputs): an older
# done.json without one is compared without it, so running a finished old stage again keeps it.
IDENTITY_KEYS = ("config", "inputs")


def config_digest(out_dir) -> str | None:
    """A hash of the config a run computed with (OUT/config.yaml less SITTING_CONFIG and PLACE_CONFIG): runs with other
    seeds, steps or weights but the same counts (ODE pairs, say) record differently."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(out_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict):
        return None
    kept = {k: v for k, v in cfg.items() if k not in SITTING_CONFIG + PLACE_CONFIG}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def done_record(out_dir) -> dict | None:
    """A finished run's done.json without SITTING_KEYS: what identifies the run (None while not done)."""
    try:
        info = json.loads((Path(out_dir) / "done.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in info.items() if k not in SITTING_KEYS} if isinstance(info, dict) else {"done": info}


def mark_done(out_dir, **info) -> None:
    """Write done.json, the mark that a stage finished; it records the checkpoints' and outputs' sizes as
    the stage left them, so the training report stays right after checkpoints are pruned or a finished
    run is moved without them. A finished stage run again to the same record keeps its done.json (and its
    time): the stages built on it stay what they were built from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_pause(out)
    digest = config_digest(out)
    info = {**stage_sizes(out), **({"config": digest} if digest else {}), **info}
    new = {k: v for k, v in json.loads(json.dumps(info)).items() if k not in SITTING_KEYS}
    old = done_record(out)
    if old is not None:
        new = {k: v for k, v in new.items() if k in old or k not in IDENTITY_KEYS}
        if old == new:
            return
    (out / "done.json").write_text(json.dumps(info, indent=2))


# Exit status of a stage that stopped unfinished on purpose (time budget, stop_after): re-run to resume.
EXIT_PAUSED = 75  # EX_TEMPFAIL


class StageInterrupted(SystemExit):
    """A stage stopped unfinished, its state saved (cfg.stop_after, or the sitting's max_minutes ran out).
    Uncaught it ends the process with EXIT_PAUSED and no traceback; the message says how to go on."""

    def __init__(self, message: str):
        super().__init__(EXIT_PAUSED)
        self.message = message

    def __str__(self) -> str:
        return self.message


def pause_stage(out_dir, message: str, is_main: bool = True, **info) -> StageInterrupted:
    """Record why a stage stopped unfinished (OUT/paused.json, which the pipeline reads; the stage
    removes it when it finishes), print it, and return the exception to raise."""
    if is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "paused.json").write_text(json.dumps({"message": message, **info}, indent=2))
        print(f"[paused] {message}", flush=True)
    return StageInterrupted(message)


def clear_pause(out_dir, is_main: bool = True) -> None:
    """A new sitting starts: an earlier pause no longer says why this one ends."""
    if is_main:
        (Path(out_dir) / "paused.json").unlink(missing_ok=True)


def paused_message(out_dir) -> str | None:
    """The message of the latest pause under out_dir (a VAE phase pauses in its own subfolder), if any."""
    found = sorted(Path(out_dir).rglob("paused.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())["message"] if found else None


def train_loop(cfg: StageConfig, dist: Dist, modules: dict, optimizers: dict,
               step_fn: Callable[[int], dict], *, desc: str = "", extra_state: dict | None = None,
               sampler=None) -> dict:
    """Resume, run step_fn(step) -> scalars until max_steps, checkpoint, log, plot. When the sitting's
    time budget (cfg.max_minutes) or cfg.stop_after ends it first: checkpoint, and raise StageInterrupted.

    step_fn does the whole optimisation step (lr, forward, backward, optimiser). Returns a summary with
    the steps done, the step this sitting started from (resumed_from: 0 for a fresh run; it also goes in
    paused.json and, through the stages, done.json, so a resume that restarted from scratch shows), the
    final scalars and the wall time of this stage over all its resumes. `sampler`: the blocks a student
    trains on, recorded in its checkpointed weights. A sitting that resumes says from
    which checkpoint; a stage already done (done.json, and a checkpoint at max_steps) says so, trains
    nothing and returns the summary done.json recorded.
    """
    out = Path(cfg.out_dir)
    ckpt = Checkpointer(out, keep=cfg.keep_checkpoints, sampler=sampler)
    start, elapsed = 0, 0.0
    if ckpt.latest_step() is not None:
        start, extra = ckpt.load(modules, optimizers)
        elapsed = float(extra.get("elapsed_s", 0.0))
        if extra_state is not None:  # this rank's own entry; a run resumed on more ranks starts theirs afresh
            # ("user": a checkpoint from before per-rank state, which only one-process runs resumed exactly)
            by_rank = extra.get("user_by_rank") or [extra.get("user", {})]
            extra_state.update(by_rank[dist.rank] if dist.rank < len(by_rank) else {})
    if start >= cfg.max_steps and is_done(out):
        # finished before: say so (not a bare progress bar), and hand back what done.json recorded, so the
        # stage writing done.json again keeps this run's record (resumed_from, wall time, final scalars)
        if dist.is_main:
            print(f"already done at step {start} ({out / 'done.json'}): delete the folder to train it again",
                  flush=True)
        try:
            done = json.loads((out / "done.json").read_text())
        except (OSError, ValueError):
            done = {}
        summary = {"steps": start, "resumed_from": start, "stop_reason": "max_steps", "wall_s": elapsed,
                   "final": {}}
        summary.update({k: done[k] for k in summary if k in done})
        return summary
    if start > 0 and dist.is_main:
        print(f"resumed from {ckpt.path(start)} (step {start} of {cfg.max_steps})", flush=True)
    clear_pause(out, dist.is_main)
    logger = Logger(out, cfg.max_steps, enabled=dist.is_main, start=start, desc=desc)
    t0 = time.perf_counter()
    step, last, nonfinite = start, {}, 0

    def save(at: int):
        # each rank's own state (stage 4's clip in progress differs per rank), kept by rank 0
        by_rank = dist.gather_to_main(dict(extra_state or {}))
        if dist.is_main:
            ckpt.save(at, modules, optimizers,
                      {"elapsed_s": elapsed + time.perf_counter() - t0, "user_by_rank": by_rank})
        dist.barrier()

    while step < cfg.max_steps:
        out_of_time = cfg.max_minutes > 0 and time.perf_counter() - t0 > cfg.max_minutes * 60
        if cfg.max_minutes > 0 and dist.distributed:  # every rank stops at the same step, or none does
            out_of_time = bool(dist.all_mean(torch.tensor(float(out_of_time))) > 0)
        if out_of_time or (cfg.stop_after and step >= cfg.stop_after):
            save(step)
            logger.close()
            why = (f"this sitting's time budget (max_minutes={cfg.max_minutes:g}) ran out" if out_of_time
                   else "stop_after")
            again = ("run the same command again to resume exactly" if out_of_time else
                     "run it again without stop_after (or with a later one) to resume exactly")
            raise pause_stage(out, f"{desc or out.name} stopped at step {step} of {cfg.max_steps}: {why}. "
                                   f"Its state is saved in {out}; {again} "
                                   f"(the model does not change, only the sittings it takes)",
                              dist.is_main, step=step, max_steps=cfg.max_steps, resumed_from=start)
        last = step_fn(step)
        bad = nonfinite_norms(last)
        nonfinite = nonfinite + 1 if bad else 0
        if nonfinite >= MAX_NONFINITE_STEPS:
            logger.close()
            raise RuntimeError(
                f"{desc or out.name}: {nonfinite} steps in a row (to step {step + 1}) had non-finite gradients "
                f"({', '.join(bad)}); each update was skipped, so the weights are those before step "
                f"{step + 2 - nonfinite} and the checkpoints in {out} are intact. Usual causes: bf16 overflow "
                f"(set bf16: false for this stage or phase) or too high a learning rate (lower lr); then run "
                f"the same command again to resume from the last checkpoint")
        step += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            logger.log(step, **last)
        if step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            save(step)
    if step > start or ckpt.latest_step() is None:
        save(step)
    total = elapsed + time.perf_counter() - t0
    logger.plot()
    logger.close()
    return {"steps": step, "resumed_from": start, "stop_reason": "max_steps", "wall_s": total, "final": last}


def config_diff(cfg, saved_path, ignore=SITTING_CONFIG) -> list[tuple[str, object, object]]:
    """(key, saved, now) for each field in which cfg differs from the config a run saved at saved_path (its
    config.yaml), leaving out the fields in `ignore` (by default the settings of one sitting)."""
    import yaml

    try:
        saved = yaml.safe_load(Path(saved_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(saved, dict):
        return []
    names = {f.name for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    diff = []
    for key in sorted(set(saved) & names - set(ignore)):
        try:
            old = _coerce(saved[key], hints[key])
        except ValueError:
            old = saved[key]
        if old != getattr(cfg, key):
            diff.append((key, old, getattr(cfg, key)))
    return diff


def describe_diff(diff) -> str:
    """"key: saved -> now; ..." for the entries of a config_diff."""
    return "; ".join(f"{key}: {old!r} -> {now!r}" for key, old, now in diff)


def lengthens_only(cfg, diff) -> bool:
    """Whether a config_diff against a finished run is only a larger max_steps, with which the stage goes on
    as an uninterrupted run of that length would (cfg.lengthens_exactly)."""
    return (cfg.lengthens_exactly() and len(diff) == 1 and diff[0][0] == "max_steps"
            and isinstance(diff[0][1], int) and diff[0][2] > diff[0][1])


def refuse_finished_run_changes(cfg) -> None:
    """A finished run (done.json) keeps the config its weights were made with: run again with another one it
    would train nothing ("already done") yet record the new config as its own, so the report would name
    settings it never ran and the stages built on it would read as stale. Refused, naming the keys; only
    max_steps raised, where the stage goes on as a run of that length would (cfg.lengthens_exactly), goes on."""
    out = Path(cfg.out_dir)
    if not is_done(out):
        return
    diff = config_diff(cfg, out / "config.yaml", SITTING_CONFIG + PLACE_CONFIG)
    if not diff or lengthens_only(cfg, diff):
        return
    raise ValueError(f"{out} holds a finished run made with another config ({describe_diff(diff)}), and this "
                     f"config would not be used: delete that folder to train it again with this config, set "
                     f"another out_dir, or delete {out / 'done.json'} to go on from where it stopped with this config")


def warn_config_changes(cfg) -> None:
    """One line naming the keys in which cfg differs from the config.yaml of the run in cfg.out_dir."""
    saved = Path(cfg.out_dir) / "config.yaml"
    if saved.is_file():
        diff = config_diff(cfg, saved)
        if diff:
            print(f"warning: this config differs from the one {cfg.out_dir} was run with ({saved}): "
                  f"{describe_diff(diff)}", flush=True)


# --- recipe versions -----------------------------------------------------------------------------

# OUT/recipe.json: {"recipe": N}, the stage code's RECIPE when the run started.
RECIPE_FILE = "recipe.json"
# What a run folder holds before its stage has computed anything: its config, the pipeline's built-from record.
_BOOKKEEPING = ("config.yaml", "built_from.json", RECIPE_FILE)


def recorded_recipe(out_dir) -> int | None:
    """The RECIPE a run started under (None: a run from before these records, or no run)."""
    try:
        value = json.loads((Path(out_dir) / RECIPE_FILE).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def has_progress(out_dir) -> bool:
    """Whether a run folder holds anything a stage computed (checkpoints, outputs, phases, done.json)."""
    out = Path(out_dir)
    return out.is_dir() and any(p.name not in _BOOKKEEPING for p in out.iterdir())


def recipe_mismatch(config_cls, out_dir) -> tuple[int, int] | None:
    """(the run's recipe, the code's) where a run in out_dir started under another RECIPE than the code's."""
    was = recorded_recipe(out_dir)
    return None if was is None or was == config_cls.RECIPE else (was, config_cls.RECIPE)


def check_recipe(cfg) -> str | None:
    """Refuse to go on with a run that started under another RECIPE of the stage's code: it would end half
    one recipe and half the other. A finished run asked for nothing new (the stage trains nothing) passes.
    Returns a warning for a run in progress from before the records, whose recipe is unknown."""
    out = Path(cfg.out_dir)
    if not has_progress(out):
        return None
    was = recorded_recipe(out)
    if was is None:
        return None if is_done(out) else (
            f"warning: {out} has no {RECIPE_FILE} (a run from before the recipe records): if the stage's code "
            f"changed since it started, resuming mixes two recipes; delete the folder to train it again")
    if was == type(cfg).RECIPE:
        return None
    mismatch = (was, type(cfg).RECIPE)
    if is_done(out) and not config_diff(cfg, out / "config.yaml", SITTING_CONFIG + PLACE_CONFIG):
        return None
    if cfg.allow_recipe_change:
        return (f"warning: {out} started under recipe {mismatch[0]} of this stage's code, which is at recipe "
                f"{mismatch[1]} now; going on anyway (allow_recipe_change): the result is neither recipe")
    raise ValueError(f"{out} holds a run that started under recipe {mismatch[0]} of this stage's code, which is at "
                     f"recipe {mismatch[1]} now (training/README.md, \"Recipe versions\"), so resuming it would train "
                     f"half under each: delete that folder (or set another out_dir) to train it again, or set "
                     f"allow_recipe_change=true to go on anyway, as an experiment")


def record_recipe(cfg) -> None:
    """OUT/recipe.json for a run starting now (a folder with progress and no record keeps none: its recipe
    is unknown)."""
    out = Path(cfg.out_dir)
    if has_progress(out) or recorded_recipe(out) is not None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(json.dumps({"recipe": type(cfg).RECIPE}) + "\n")


# Exit status of a stage run from the command line that stopped on a user error (a config value, a
# missing or malformed file, an unreadable video, weights that do not fit): one line on stderr, no traceback.
EXIT_USER_ERROR = 2
# How long a rank other than 0 waits for rank 0 to report the same error before it reports its own.
USER_ERROR_GRACE_S = 5.0
_ERROR_KEY = "shotstream/user_error/rank{}"


def user_error_types() -> tuple:
    types = [ValueError, FileNotFoundError, ModelLoadError]  # JSONDecodeError is a ValueError
    try:
        import av.error

        types.append(av.error.FFmpegError)  # InvalidDataError and the rest of PyAV's decoding errors
    except (ImportError, AttributeError):
        pass
    return tuple(types)


def _default_store():
    """The torchrun rendezvous store of this process group (None before the group, or where unavailable)."""
    try:
        if torch_dist.is_available() and torch_dist.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store

            return _get_default_store()
    except Exception:  # a private API: without it the ranks just do not coordinate their messages
        pass
    return None


def _store_has(store, key: str, wait_s: float = 0.0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([key]):
                return True
        except Exception:  # the store went away with its host: nothing more to learn
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _report_cli_error(exc: Exception) -> int | None:
    """For a stage run from the command line that raised exc: print what the user needs and return the exit
    status, or return None (not a user error: the traceback shows). Under torchrun one rank prints: rank 0
    when it has the error too (the same config or file fails on every rank), else the lowest rank that has it
    (before the process group, when the ranks cannot compare: the first rank of each node but rank 0's); a
    rank that fails only because another one stopped on a user error (its collective lost a peer) exits
    with the same status quietly."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # SHOTSTREAM_TRACEBACK=1: every error keeps its traceback (a bug can raise a ValueError too)
    user = isinstance(exc, user_error_types()) and os.environ.get("SHOTSTREAM_TRACEBACK", "") in ("", "0")
    store = _default_store() if world > 1 else None
    if user and store is not None:  # tell the other ranks that this one stopped on a user error
        try:
            store.set(_ERROR_KEY.format(rank), "1")
        except Exception:
            pass
    if user and (rank == 0 or world == 1):
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if user:
        if store is None:
            # Before the process group: the ranks of one node read the same argv and files, so the node's
            # first rank says it (one line a node; a file missing on one node alone is said on that node).
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                print(f"error: {exc} (on rank {rank})", file=sys.stderr, flush=True)
            else:
                time.sleep(USER_ERROR_GRACE_S)  # so that torchrun does not stop that rank before it can
            return EXIT_USER_ERROR
        # rank 0 says it if it has it too; else the lowest rank that has it (one line, not one a rank)
        if not _store_has(store, _ERROR_KEY.format(0), USER_ERROR_GRACE_S) and not any(
                _store_has(store, _ERROR_KEY.format(r)) for r in range(1, rank)):
            print(f"error: {exc} (on rank {rank})", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if store is not None and any(_store_has(store, _ERROR_KEY.format(r)) for r in range(world) if r != rank):
        return EXIT_USER_ERROR
    return None


def run_stage(train_fn: Callable, config_cls, argv=None):
    """Entry point of every stage: --config YAML, --set key=value (repeatable) -> train_fn(cfg, dist).

    From the command line (argv None), a user error ends the stage with one line `error: ...` on stderr
    and exit status EXIT_USER_ERROR, from one rank under torchrun (_report_cli_error); a bug (RuntimeError
    and the rest) keeps its traceback. Called from Python with an argv list, every error is raised as is."""
    parser = argparse.ArgumentParser(description=(train_fn.__doc__ or "").strip().splitlines()[0] if train_fn.__doc__ else None)
    parser.add_argument("--config", help="YAML file of the stage's config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (repeatable)")
    args = parser.parse_args(argv)
    dist = None
    try:
        cfg = load_stage_config(config_cls, args.config, args.overrides)
        refuse_finished_run_changes(cfg)
        recipe_warning = check_recipe(cfg)
        setup_threads(cfg)
        dist = Dist.init(cfg.device)
        if dist.is_main:
            warn_config_changes(cfg)
            if recipe_warning:
                print(recipe_warning, flush=True)
            record_recipe(cfg)
        result = train_fn(cfg, dist)
    except BaseException as e:  # an error, a pause (StageInterrupted) or Ctrl-C: the ranks may have stopped apart
        code = _report_cli_error(e) if argv is None and isinstance(e, Exception) else None
        if dist is not None:
            dist.close(synchronize=False)
        if code is None:
            raise
        raise SystemExit(code) from None
    dist.close()  # every rank finished: they leave the group together
    return result
