"""The whole training pipeline: Story World data -> VAE -> VAE decoder -> latents -> teacher -> ODE pairs ->
stage 2 -> stage 3 -> stage 4 -> export and training report (-> evaluation).

    python -m training.pipeline --preset tiny            (make train-tiny)
    python -m training.pipeline --preset micro --no-eval (the test suite's smoke run)

Each stage is its own command (`python -m training.<stage> --config training/configs/<preset>-<stage>.yaml`)
run as a subprocess; a stage whose out_dir holds done.json is skipped, a cut one resumes from its last
checkpoint (the stage itself does that); --status says where each stage stands. --nproc N runs the
stages under torchrun with N processes. A finished stage is stale when a stage it was built from ran again
after it (DEPENDS; OUT/built_from.json records what it was built from): the pipeline then stops before
running anything and names the stages to delete, or deletes and rebuilds them with --rebuild-stale.
At the end the shipped files are copied to the export folder (shotstream_core/weights/<preset>/ for tiny)
with training_report.md: wall time, steps and final losses of each stage, checkpoint sizes, loss plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shotstream_core.files import copy_file

from .common import (EXIT_PAUSED, PLACE_CONFIG, SITTING_CONFIG, Checkpointer, config_diff, describe_diff,
                     done_record, folder_bytes, is_done, lengthens_only, load_stage_config, mark_done,
                     paused_message, read_log, recipe_mismatch, stage_sizes)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Stage:
    name: str  # also the config file's suffix: <preset>-<name>.yaml
    module: str  # python -m training.<module>
    config_cls: str  # "module:Class", to read out_dir without importing every stage up front
    distributed: bool = True  # runs under torchrun when --nproc > 1


STAGES = (
    Stage("vae", "training.vae_stage", "training.vae_stage:VAEStageConfig"),
    # the VAE's decoder-only detail phases: latents unchanged, split off so each stage fits in two hours
    Stage("decoder", "training.vae_stage", "training.vae_stage:VAEStageConfig"),
    Stage("preencode", "training.preencode", "training.preencode:PreencodeConfig"),
    Stage("teacher", "training.stage1_teacher", "training.stage1_teacher:TeacherConfig"),
    Stage("ode", "training.ode_pairs", "training.ode_pairs:ODEConfig"),
    Stage("stage2", "training.stage2_ode", "training.stage2_ode:Stage2Config"),
    Stage("stage3", "training.stage3_dmd", "training.stage3_dmd:DMDStageConfig"),
    Stage("stage4", "training.stage4_dmd", "training.stage4_dmd:Stage4Config"),
)

# What each stage is built from: the stages whose out_dir its config reads (data_dir, init_from, vae_path,
# latent_dir, teacher_path, ode_dir, student_path; a test checks this against the configs). "data" is the
# pipeline's Story World set (runs/<preset>/data).
DEPENDS = {
    "vae": ("data",),
    "decoder": ("data", "vae"),
    "preencode": ("data", "decoder"),
    "teacher": ("preencode", "decoder"),
    "ode": ("preencode", "teacher", "decoder"),
    "stage2": ("ode", "preencode", "teacher"),
    "stage3": ("stage2", "preencode", "teacher"),
    "stage4": ("stage3", "preencode", "teacher", "decoder"),
}

# OUT/built_from.json: {upstream stage: fingerprint of its done.json}, written by the pipeline when it
# launches a stage (and for a finished stage from before these records, once it is found not stale).
BUILT_FROM = "built_from.json"
# A finished stage without that record (a run from before it, or one run by hand) is stale when an upstream
# stage's done.json is newer than its own by more than this (a copied run folder gets copy-order times).
# The data set is left out of this fallback: it is regenerated to the same stories.
MTIME_SLACK_S = 5.0
# File times are the one judgement that a copy can fool, so whatever rests on them says so, with the way out.
TIMES_HINT = ("runs from before the built-from records are judged by their done.json times: if the run folders "
              "were copied without their times, copy them again with `cp -a` instead of rebuilding")

# What the engine loads, and what the report / ablation needs: (file in the export folder, stage, file in
# the stage's out_dir).
SHIPPED = (
    ("vae.safetensors", ("decoder", "vae"), "vae.safetensors"),
    ("teacher.safetensors", ("teacher",), "teacher.safetensors"),
    ("student_stage3.safetensors", ("stage3",), "student.safetensors"),
    # before stage 4 is done, the stage-3 (or stage-2) student is the interim shipped model
    ("dit.safetensors", ("stage4", "stage3", "stage2"), "student.safetensors"),
)

# Processes per stage when --nproc is not given (tiny: the CPU-bound stages take two shared cores).
DEFAULT_NPROC = {"tiny": {"preencode": 2, "teacher": 2, "ode": 2, "stage2": 2}}

# The evaluation the pipeline runs on the exported model (into EXPORT/eval): for tiny, the settings of the
# committed eval/report.md (teacher CFG 3, as the ODE pairs chose on training stories; 2 threads).
EVAL_ARGS = {"tiny": ["--stories", "32", "--stories10", "4", "--teacher-stories", "4", "--teacher-stories10", "1",
                      "--guidance", "3", "--threads", "2"]}


def evaluation_args(preset: str, export_dir) -> list[str]:
    """`-m training.evaluate ...` for the exported model: its own weights, its report in EXPORT/eval (other
    presets than tiny: a --quick smoke run)."""
    return ["-m", "training.evaluate", "--model", preset, "--weights-dir", str(export_dir),
            "--out", str(Path(export_dir) / "eval"), *EVAL_ARGS.get(preset, ["--quick"])]


# Data set sizes per preset: (stories, min shots, max shots)
DATA = {"tiny": (600, 2, 4), "micro": (6, 2, 3)}
# The data set's done.json key holding a hash of its files (data.folder_digest): a set rendered by changed
# generator code to the same counts is another set (the writer is deterministic, so writing it again to the
# same stories keeps the stages on it)
DATA_CONTENT = "content"


def _config_class(spec: str):
    import importlib

    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def data_out_dir(preset: str) -> Path:
    return ROOT / "runs" / preset / "data"


def stage_config_path(preset: str, stage: Stage) -> Path:
    return CONFIGS / f"{preset}-{stage.name}.yaml"


def stage_out_dir(preset: str, stage: Stage) -> Path | None:
    path = stage_config_path(preset, stage)
    if not path.is_file():
        return None
    return Path(load_stage_config(_config_class(stage.config_cls), path).out_dir)


def _out_dirs(preset: str) -> dict[str, Path]:
    """Run folder of "data" and of every stage the preset has."""
    outs = {"data": data_out_dir(preset)}
    for stage in STAGES:
        out = stage_out_dir(preset, stage)
        if out is not None:
            outs[stage.name] = Path(out)
    return outs


def _fingerprint(out: Path, without=()) -> str | None:
    """Which finished run a folder holds: a hash of its done.json record (None while not done), less what
    differs between sittings of one run (common.SITTING_KEYS: times, sizes) and the keys in `without`. A
    finished stage run again to the same result keeps its record, so the stages built on it stay fresh; a
    retrained one ends on other losses or counts."""
    record = done_record(out)
    if record is None:
        return None
    record = {k: v for k, v in record.items() if k not in without}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


# The fingerprints' formula: records of another one cannot be compared, and count as no record.
BUILT_FROM_FORMAT = 2


def _read_built_from(out: Path) -> dict:
    try:
        record = json.loads((out / BUILT_FROM).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.pop("format", None) != BUILT_FROM_FORMAT:
        return {}
    return record


def record_built_from(preset: str, name: str) -> None:
    """OUT/built_from.json of stage `name`: the fingerprints of the finished stages it is built from."""
    outs = _out_dirs(preset)
    out = outs[name]
    record = _read_built_from(out)
    record.update({up: fp for up in DEPENDS[name] if up in outs and (fp := _fingerprint(outs[up])) is not None})
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILT_FROM).write_text(json.dumps({"format": BUILT_FROM_FORMAT, **record}, indent=2))


@dataclass(frozen=True)
class Stale:
    reason: str  # for --status: "teacher was retrained after it"
    roots: tuple[str, ...]  # the stages whose new run made it stale
    by_times: bool = False  # judged by done.json times (a run from before the built-from records)
    own: bool = False  # stale in itself (an older recipe of its code, or another config than its file's)


def stale_stages(preset: str) -> dict[str, Stale]:
    """The stages whose run folder was built from another run of an upstream stage than the one there now
    (directly, or through a stale upstream stage), or that ran under an older recipe of their own code.
    Reads the run folders only."""
    outs = _out_dirs(preset)
    prints = {name: _fingerprint(out) for name, out in outs.items()}
    stale: dict[str, Stale] = {}
    for stage in STAGES:
        out = outs.get(stage.name)
        if out is None or not out.is_dir():
            continue
        mismatch = recipe_mismatch(_config_class(stage.config_cls), out)
        if mismatch is not None:
            stale[stage.name] = Stale(f"it ran under recipe {mismatch[0]} of its stage's code, which is at recipe "
                                      f"{mismatch[1]} now", (stage.name,), own=True)
            continue
        changes, goes_on = config_changes(preset, stage, out) if is_done(out) else ([], False)
        if changes and not goes_on:
            stale[stage.name] = Stale(f"it ran with another config than {stage_config_path(preset, stage).name} "
                                      f"({describe_diff(changes)})", (stage.name,), own=True)
            continue
        record = _read_built_from(out)
        changed, via, roots, by_times = [], [], [], []
        for up in DEPENDS[stage.name]:
            if up not in outs:
                continue
            if up in stale:
                via.append(up)
                roots += [r for r in stale[up].roots if r not in roots]
                continue
            was = record.get(up)
            if up == "data" and prints[up] is None:
                hit = False  # a missing data set is written again, to the same stories, before it is read
            elif was is not None:
                # a stage recorded before the data set's record held DATA_CONTENT matches it without that hash
                # (a data set is only ever written again to the same stories, so its counts still tell it)
                hit = was != prints[up] and not (up == "data" and was == _fingerprint(outs[up], (DATA_CONTENT,)))
            else:  # no record: a finished run from before them (or run by hand) goes by the done.json times
                hit = (up != "data" and is_done(out) and prints[up] is not None
                       and (outs[up] / "done.json").stat().st_mtime
                       > (out / "done.json").stat().st_mtime + MTIME_SLACK_S)
                if hit:
                    by_times.append(up)
            if hit:
                changed.append(up)
                if up not in roots:
                    roots.append(up)
        def why(up: str) -> str:
            if prints[up] is None:
                return f"{up} was deleted or restarted since it was built"
            if up == "data":
                return "the data set was written again, with other stories, after it"
            return f"{up} was retrained after it" + (", by the done.json times" if up in by_times else "")

        if changed:
            reason = "; ".join(why(up) for up in changed)
        elif via:
            reason = f"built from {', '.join(via)}, which {'is' if len(via) == 1 else 'are'} stale"
        else:
            continue
        stale[stage.name] = Stale(reason, tuple(roots), bool(by_times))
    return stale


def stale_message(preset: str, stale: dict[str, Stale]) -> str:
    """One line: which stages are stale, from what, and how to rebuild them."""
    outs = _out_dirs(preset)
    roots = []
    for s in stale.values():
        roots += [r for r in s.roots if r not in roots]
    names = list(stale)
    paths = " ".join(_shown(outs[n]) for n in names)
    timed = [n for n, s in stale.items() if s.by_times]
    built = [n for n, s in stale.items() if not s.own]
    why = [f"{n}: {s.reason}" for n, s in stale.items() if s.own] + \
          ([f"{', '.join(built)} {'was' if len(built) == 1 else 'were'} built from an older {' and '.join(roots)}"]
           if built else [])
    return (f"{'; '.join(why)}: delete {paths} to rebuild {'it' if len(names) == 1 else 'them'} "
            f"(or run with --rebuild-stale)" + (f". {', '.join(timed)}: {TIMES_HINT}" if timed else ""))


def config_changes(preset: str, stage: Stage, out: Path) -> tuple[list, bool]:
    """(changes, goes_on) for the run in `out`: (key, ran with, config file's) for each field in which its
    config.yaml differs from the stage's config file as the pipeline runs it, less a sitting's settings and
    where it ran; goes_on where they are only a larger max_steps that the stage continues exactly
    (common.lengthens_only), so the pipeline runs it instead of skipping it."""
    path = stage_config_path(preset, stage)
    if not path.is_file():
        return [], False
    cfg = load_stage_config(_config_class(stage.config_cls), path, pipeline_overrides(stage))
    changes = config_diff(cfg, out / "config.yaml", SITTING_CONFIG + PLACE_CONFIG)
    return changes, lengthens_only(cfg, changes)


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _upstream_closure(names) -> set[str]:
    todo, seen = list(names), set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += DEPENDS.get(n, ())
    return seen


class StaleChain(RuntimeError):
    """export(): the finished files come from runs built on different runs of an upstream stage."""


def pipeline_overrides(stage: Stage) -> list[str]:
    """The --set overrides the pipeline runs a stage's config file with."""
    # The pipeline copies the finished files to its own export folder (--export-dir); a stage's `export:`
    # is for running that stage by hand, and would otherwise overwrite the shipped weights mid-run.
    fields = {f.name for f in dataclasses.fields(_config_class(stage.config_cls))}
    return ["export="] if "export" in fields else []


def stage_command(preset: str, stage: Stage, nproc: int) -> list[str]:
    cfg = str(stage_config_path(preset, stage))
    if nproc > 1 and stage.distributed:
        # torchrun's launcher, reporting a stopped rank in one line and with its exit status (training.torchrun)
        launch = [sys.executable, "-m", "training.torchrun", "--standalone", "--nproc_per_node", str(nproc),
                  "-m", stage.module]
    else:
        launch = [sys.executable, "-m", stage.module]
    sets = [arg for override in pipeline_overrides(stage) for arg in ("--set", override)]
    return launch + ["--config", cfg, *sets]


def make_data(preset: str, out_dir: Path) -> dict:
    from shotstream_core.config import get_preset

    from .data import folder_digest, write_training_set

    t0 = time.perf_counter()
    n, lo, hi = DATA[preset]
    write_training_set(out_dir, n, get_preset(preset).geometry, lo, hi, progress=True)
    info = {"stories": n, "min_shots": lo, "max_shots": hi, DATA_CONTENT: folder_digest(out_dir),
            "wall_s": time.perf_counter() - t0}
    mark_done(out_dir, **info)
    return info


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n else "none"


def export(preset: str, export_dir: Path) -> list[str]:
    """Copy the shipped files of the finished stages; returns the names copied.

    Nothing is copied until a student stage is done: a new VAE or teacher alone would not match the
    shipped student (it was trained on the old latents), and the package must always load as one model.
    Nor is a mixed chain (a stage retrained after the ones built on it): StaleChain names the stale stages."""
    stages = {s.name: s for s in STAGES}
    found = {}
    for name, candidates, src in SHIPPED:
        for stage in candidates:
            out = stage_out_dir(preset, stages[stage])
            if out is not None and (out / src).is_file() and is_done(out):
                found[name] = (out / src, stage)
                break
    if "dit.safetensors" not in found:
        return []
    stale = stale_stages(preset)
    mixed = {n: st for n, st in stale.items() if n in _upstream_closure(stage for _, stage in found.values())}
    if mixed:
        raise StaleChain(f"not exported, {export_dir} is unchanged: the finished runs do not form one chain. "
                         + stale_message(preset, mixed))
    export_dir.mkdir(parents=True, exist_ok=True)
    for name, (path, _) in found.items():
        copy_file(path, export_dir / name)
    return [f"{name} (from {stage})" for name, (_, stage) in found.items()]


def _step_progress(out: Path, max_steps: int) -> str:
    step = Checkpointer(out).latest_step()
    try:  # a paused sitting's own target (its config, --set overrides included)
        max_steps = json.loads((out / "paused.json").read_text()).get("max_steps", max_steps)
    except (OSError, ValueError):
        pass
    return "not started" if step is None else f"at step {step} of {max_steps or '?'}"


def stage_status(preset: str, stage: Stage) -> str:
    path = stage_config_path(preset, stage)
    if not path.is_file():
        return "no config for this preset"
    cfg = load_stage_config(_config_class(stage.config_cls), path)
    return run_status(dataclasses.replace(cfg, out_dir=str(stage_out_dir(preset, stage))))  # the folder the run uses


def run_status(cfg) -> str:
    """One line on where the run of a stage config stands: done, how far a cut run got (from its
    checkpoints or output files), or not started. Reads the run folder only; runs nothing. Where the run
    saved its own config (OUT/config.yaml, with the --set overrides it ran with), that is the one read."""
    cfg = _run_config(cfg)
    out = Path(cfg.out_dir)
    if is_done(out):
        d = json.loads((out / "done.json").read_text())
        amount = next((f"{d[k]} {k}" for k in ("steps", "pairs", "stories") if k in d), "")
        return f"done: {amount} in {float(d.get('wall_s', 0.0)) / 60:.1f} min ({d.get('stop_reason', '-')})"
    if not out.is_dir():
        return "not started"
    paused = " (paused; run it again to go on)" if paused_message(out) else ""
    return _where_it_stands(cfg, out) + paused


def _run_config(cfg):
    """The config a run saved when it started (OUT/config.yaml), in its folder; else cfg."""
    saved = Path(cfg.out_dir) / "config.yaml"
    if not saved.is_file():
        return cfg
    try:
        ran = load_stage_config(type(cfg), saved)
    except (OSError, ValueError, TypeError):  # a config of an older version of the stage
        return cfg
    return dataclasses.replace(ran, out_dir=cfg.out_dir)


def _where_it_stands(cfg, out: Path) -> str:
    if getattr(cfg, "phases", ()):  # a curriculum: the first phase not done is where it stands
        from .vae_stage import collapsed_attempts, phase_configs

        phases = phase_configs(cfg)
        for k, sub in enumerate(phases):
            if not is_done(sub.out_dir):
                aside = len(collapsed_attempts(sub.out_dir))
                retry = f" (retry {aside} after a collapse)" if aside else ""
                return (f"phase {Path(sub.out_dir).name} ({k + 1} of {len(phases)}){retry} "
                        f"{_step_progress(Path(sub.out_dir), sub.max_steps)}")
        return "every phase done, not yet published (re-run the stage)"
    for pattern in ("pairs_*.safetensors", "shard_*.safetensors"):  # ode / preencode write whole files
        files = list(out.glob(pattern))
        if files:
            return f"{len(files)} {pattern.split('_')[0]} files written"
    return _step_progress(out, getattr(cfg, "max_steps", 0))


def run_overrides(preset: str, stage: Stage, out: Path) -> dict:
    """Fields of a run's saved config.yaml that differ from the stage's config file as the pipeline runs it
    (time budgets cut to fit a session, a warm start): how the run that produced the shipped files departed
    from the recipe."""
    saved = out / "config.yaml"
    recipe_path = stage_config_path(preset, stage)
    if not saved.is_file() or not recipe_path.is_file():
        return {}
    cls = _config_class(stage.config_cls)
    recipe = dataclasses.asdict(load_stage_config(cls, recipe_path, pipeline_overrides(stage)))
    ran = dataclasses.asdict(load_stage_config(cls, saved))
    return {k: v for k, v in ran.items() if recipe.get(k) != v}


def write_training_report(preset: str, export_dir: Path, data_dir: Path | None = None) -> Path:
    """training_report.md (+ loss_<stage>.png) in export_dir from the stages' done.json and logs."""
    lines = [f"# Training report: {preset} preset", "",
             "Generated by `python -m training.pipeline`; every number below is read from the runs' own",
             "done.json / log.jsonl files. Times are wall-clock on this machine (summed over resumes).", "",
             "| stage | wall time | steps | stop | final loss (mean of the last 5% of steps) | checkpoints | output |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    if data_dir is not None and is_done(data_dir):
        d = json.loads((data_dir / "done.json").read_text())
        total += d.get("wall_s", 0.0)
        lines.append(f"| data | {d.get('wall_s', 0) / 60:.1f} min | {d.get('stories')} stories | - | - | - | "
                     f"{_mb(folder_bytes(data_dir))} |")
    plots = []

    def row(name: str, out: Path, d: dict) -> str:
        rows = read_log(out / "log.jsonl")
        tail = rows[-max(1, len(rows) // 20):]  # the last 5% of steps: one step's loss is noisy
        keys = sorted({k for r in tail for k in r if "loss" in k})
        loss = ", ".join(f"{k} {sum(r[k] for r in tail if k in r) / sum(k in r for r in tail):.4g}"
                         for k in keys) or "-"
        steps = d.get("steps", d.get("pairs", d.get("stories", "-")))
        sizes = d if "checkpoint_bytes" in d else stage_sizes(out)  # recorded when it finished; older runs: now
        if (out / "loss.png").is_file():
            plot = name.replace(" / ", "-")
            shutil.copy2(out / "loss.png", export_dir / f"loss_{plot}.png")
            plots.append(plot)
        return (f"| {name} | {float(d.get('wall_s', 0.0)) / 60:.1f} min | {steps} | {d.get('stop_reason', '-')} | "
                f"{loss} | {_mb(sizes['checkpoint_bytes'])} | {_mb(sizes['output_bytes'])} |")

    for stage in STAGES:
        out = stage_out_dir(preset, stage)
        if out is None:  # the preset has no such stage
            continue
        if not (out / "done.json").is_file():
            lines.append(f"| {stage.name} | not run | | | | | |")
            continue
        d = json.loads((out / "done.json").read_text())
        total += float(d.get("wall_s", 0.0))
        lines.append(row(stage.name, out, d))
        for phase in d.get("phases", []):  # a curriculum (the VAE): one row per phase
            sub = out / phase["name"]
            lines.append(row(f"{stage.name} / {phase['name']}", sub, phase))
    lines += ["", f"Total: {total / 60:.1f} min.", ""]
    shipped = sorted(export_dir.glob("*.safetensors"))
    if shipped:
        lines += ["## Shipped files", "", "| file | size |", "|---|---|"]
        lines += [f"| {p.name} | {_mb(p.stat().st_size)} |" for p in shipped]
        lines.append("")
    details = []
    for stage in STAGES:
        out = stage_out_dir(preset, stage)
        if out is not None and (out / "done.json").is_file():
            d = json.loads((out / "done.json").read_text())
            keep = {k: v for k, v in d.items()  # the sizes are the table's; latent statistics are per channel
                    if k not in ("final", "phases", "checkpoint_bytes", "output_bytes")
                    and not k.endswith(("latent_mean", "latent_std"))}
            overrides = run_overrides(preset, stage, out)
            if overrides:
                keep["run with"] = " ".join(f"{k}={v}" for k, v in overrides.items())
            if d.get("phases"):
                keep["phase_psnr_db"] = ", ".join(f"{p['name']} {p['psnr_db']:.1f}" for p in d["phases"] if "psnr_db" in p)
                retried = [f"{p['name']} {p['collapsed_attempts']}" for p in d["phases"] if p.get("collapsed_attempts")]
                if retried:
                    keep["collapsed attempts set aside"] = ", ".join(retried)
            details.append(f"- **{stage.name}** (`{stage_config_path(preset, stage).relative_to(ROOT)}`): "
                           + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 4)}" for k, v in keep.items()))
    if details:
        lines += ["## Stage details", ""] + details + [""]
    if plots:
        lines += ["## Loss curves", ""] + [f"![{p}](loss_{p}.png)" for p in plots] + [""]
    path = export_dir / "training_report.md"
    path.write_text("\n".join(lines))
    return path


def run_child(cmd: list[str]) -> int:
    """Run a stage's command and return its exit status. On Ctrl-C (which the child, in the same process
    group, gets too) wait for the child to finish its own handling, then raise KeyboardInterrupt; a second
    Ctrl-C while waiting stops the child at once."""
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(DATA))
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per distributed stage (torchrun); default: DEFAULT_NPROC of the preset, else 1")
    p.add_argument("--only", nargs="+", default=None, help="run only these stages (names as in the configs)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="where shipped files and the report go (default shotstream_core/weights/tiny for tiny, "
                        "runs/<preset>/export otherwise)")
    p.add_argument("--no-eval", action="store_true", help="skip python -m training.evaluate at the end")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--status", action="store_true",
                   help="print where each stage stands (done, how far a cut run got, stale), run nothing")
    p.add_argument("--rebuild-stale", action="store_true",
                   help="DELETE the run folders of stale stages (built from an older run of a stage they depend "
                        "on) and train them again; without it the pipeline stops and names them")
    args = p.parse_args(argv)

    preset = args.preset
    export_dir = args.export_dir or (ROOT / "shotstream_core" / "weights" / preset if preset == "tiny"
                                     else ROOT / "runs" / preset / "export")
    data_dir = data_out_dir(preset)
    wanted = set(args.only) if args.only else None
    known = ["data"] + [s.name for s in STAGES]
    unknown = sorted(wanted - set(known)) if wanted is not None else []
    if unknown:
        p.error(f"--only: unknown stage(s) {unknown}; choose from {known}")
    if args.status:
        stale = stale_stages(preset)
        print(f"data: {'done' if is_done(data_dir) else 'not made'} ({data_dir})")
        for stage in STAGES:
            if wanted is None or stage.name in wanted:
                where = stage_status(preset, stage)
                out = stage_out_dir(preset, stage)
                if stage.name in stale:
                    where = f"stale ({stale[stage.name].reason}); {where}"
                elif out is not None and is_done(out) and (changes := config_changes(preset, stage, out)[0]):
                    where += f"; its config file asks for {changes[0][2]} steps: the next run goes on"
                print(f"{stage.name}: {where}")
        return 0

    running = ["the pipeline"]  # what a Ctrl-C interrupts
    try:
        return _run(args, preset, export_dir, data_dir, wanted, running)
    except KeyboardInterrupt:
        print(f"\n[pipeline] interrupted during {running[0]}: run the same command to resume", flush=True)
        return 130


def _stop_or_rebuild(preset: str, stale: dict, args) -> bool:
    """Stale stages: with --rebuild-stale delete their run folders (True: go on), else say which and how to
    rebuild them (False: stop)."""
    if not args.rebuild_stale:
        print(f"[pipeline] stopped: {stale_message(preset, stale)}", flush=True)
        return False
    outs = _out_dirs(preset)
    for name, st in stale.items():
        print(f"[pipeline] --rebuild-stale: deleting {_shown(outs[name])} ({name}: {st.reason})", flush=True)
        if not args.dry_run:
            shutil.rmtree(outs[name], ignore_errors=True)
    return True


def _run(args, preset: str, export_dir: Path, data_dir: Path, wanted, running: list) -> int:
    stale = {n: st for n, st in stale_stages(preset).items() if wanted is None or n in wanted}
    if stale and not _stop_or_rebuild(preset, stale, args):
        return 1
    if (wanted is None or "data" in wanted) and not is_done(data_dir):
        print(f"[pipeline] data -> {data_dir}", flush=True)
        if not args.dry_run:
            running[0] = "data"
            make_data(preset, data_dir)
    for stage in STAGES:
        if wanted is not None and stage.name not in wanted:
            continue
        cfg = stage_config_path(preset, stage)
        if not cfg.is_file():
            print(f"[pipeline] {stage.name}: no {cfg.name}, skipped", flush=True)
            continue
        out = stage_out_dir(preset, stage)
        stale = {n: st for n, st in stale_stages(preset).items() if n == stage.name}
        if stale:  # a stage this run trained again made it stale (no record of its own to tell it earlier)
            if not _stop_or_rebuild(preset, stale, args):
                return 1
        elif is_done(out) and config_changes(preset, stage, out)[0]:  # only max_steps grew (else it is stale)
            print(f"[pipeline] {stage.name}: done at fewer steps than its config file's max_steps: going on",
                  flush=True)
        elif is_done(out):
            if not _read_built_from(out) and not args.dry_run:
                record_built_from(preset, stage.name)  # a run from before these records, found not stale
            print(f"[pipeline] {stage.name}: done ({out}), skipped", flush=True)
            continue
        nproc = args.nproc if args.nproc is not None else DEFAULT_NPROC.get(preset, {}).get(stage.name, 1)
        cmd = stage_command(preset, stage, nproc)
        print(f"[pipeline] {stage.name}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        record_built_from(preset, stage.name)
        running[0] = stage.name
        rc = run_child(cmd)
        running[0] = "the pipeline"
        paused = paused_message(out) if rc != 0 else None
        if paused:
            print(f"[pipeline] {stage.name} paused: {paused}. Run the pipeline again to go on: finished stages "
                  f"are skipped, this one resumes where it stopped", flush=True)
            return EXIT_PAUSED
        if rc != 0:
            print(f"[pipeline] {stage.name} failed (exit {rc}); fix it and re-run: finished stages are skipped, "
                  f"this one resumes from its last checkpoint", flush=True)
            return rc
        if stage.name == "stage2":  # the product works with trained weights even if DMD is late
            try:
                export(preset, export_dir)
            except StaleChain:
                pass  # said at the end
    if args.dry_run:
        return 0
    try:
        copied = export(preset, export_dir)
    except StaleChain as e:
        print(f"[pipeline] {e}", flush=True)
        return 1
    if not copied:
        print(f"[pipeline] no student stage is done yet: nothing exported, {export_dir} is unchanged", flush=True)
        return 0
    report = write_training_report(preset, export_dir, data_dir)
    print(f"[pipeline] exported {copied} and {report}", flush=True)
    if not args.no_eval:
        cmd = [sys.executable, *evaluation_args(preset, export_dir)]
        print(f"[pipeline] evaluate: {' '.join(cmd)}", flush=True)
        running[0] = "the evaluation"
        return run_child(cmd)
    return 0


def cli(argv=None) -> int:
    """main(), quiet when stdout is closed early (`--status | head`)."""
    try:
        rc = main(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(cli())
