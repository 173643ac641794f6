"""The whole training pipeline: Story World data -> VAE -> VAE decoder -> latents -> teacher -> ODE pairs ->
stage 2 -> stage 3 -> stage 4 -> export and training report (-> evaluation).

    python -m training.pipeline --preset tiny            (make train-tiny)
    python -m training.pipeline --preset micro --no-eval (the test suite's smoke run)

Each stage is its own command (`python -m training.<stage> --config training/configs/<preset>-<stage>.yaml`)
run as a subprocess; a stage whose out_dir holds done.json is skipped, a cut one resumes from its last
checkpoint (the stage itself does that); --status says where each stage stands. --nproc N runs the
stages under torchrun with N processes.
At the end the shipped files are copied to the export folder (shotstream_core/weights/<preset>/ for tiny)
with training_report.md: wall time, steps and final losses of each stage, checkpoint sizes, loss plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shotstream_core.files import copy_file

from .common import (EXIT_PAUSED, Checkpointer, folder_bytes, is_done, load_stage_config, mark_done, paused_message,
                     read_log, stage_sizes)

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


def _config_class(spec: str):
    import importlib

    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def stage_config_path(preset: str, stage: Stage) -> Path:
    return CONFIGS / f"{preset}-{stage.name}.yaml"


def stage_out_dir(preset: str, stage: Stage) -> Path | None:
    path = stage_config_path(preset, stage)
    if not path.is_file():
        return None
    return Path(load_stage_config(_config_class(stage.config_cls), path).out_dir)


def pipeline_overrides(stage: Stage) -> list[str]:
    """The --set overrides the pipeline runs a stage's config file with."""
    # The pipeline copies the finished files to its own export folder (--export-dir); a stage's `export:`
    # is for running that stage by hand, and would otherwise overwrite the shipped weights mid-run.
    fields = {f.name for f in dataclasses.fields(_config_class(stage.config_cls))}
    return ["export="] if "export" in fields else []


def stage_command(preset: str, stage: Stage, nproc: int) -> list[str]:
    cfg = str(stage_config_path(preset, stage))
    if nproc > 1 and stage.distributed:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                  "-m", stage.module]
    else:
        launch = [sys.executable, "-m", stage.module]
    sets = [arg for override in pipeline_overrides(stage) for arg in ("--set", override)]
    return launch + ["--config", cfg, *sets]


def make_data(preset: str, out_dir: Path) -> dict:
    from shotstream_core.config import get_preset

    from .data import write_training_set

    t0 = time.perf_counter()
    n, lo, hi = DATA[preset]
    write_training_set(out_dir, n, get_preset(preset).geometry, lo, hi, progress=True)
    info = {"stories": n, "min_shots": lo, "max_shots": hi, "wall_s": time.perf_counter() - t0}
    mark_done(out_dir, **info)
    return info


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n else "none"


def export(preset: str, export_dir: Path) -> list[str]:
    """Copy the shipped files of the finished stages; returns the names copied.

    Nothing is copied until a student stage is done: a new VAE or teacher alone would not match the
    shipped student (it was trained on the old latents), and the package must always load as one model."""
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
    export_dir.mkdir(parents=True, exist_ok=True)
    for name, (path, _) in found.items():
        copy_file(path, export_dir / name)
    return [f"{name} (from {stage})" for name, (_, stage) in found.items()]


def _step_progress(out: Path, max_steps: int) -> str:
    step = Checkpointer(out).latest_step()
    return "not started" if step is None else f"at step {step} of {max_steps or '?'}"


def stage_status(preset: str, stage: Stage) -> str:
    path = stage_config_path(preset, stage)
    if not path.is_file():
        return "no config for this preset"
    return run_status(load_stage_config(_config_class(stage.config_cls), path))


def run_status(cfg) -> str:
    """One line on where the run of a stage config stands: done, how far a cut run got (from its
    checkpoints or output files), or not started. Reads the run folder only; runs nothing."""
    out = Path(cfg.out_dir)
    if is_done(out):
        d = json.loads((out / "done.json").read_text())
        amount = next((f"{d[k]} {k}" for k in ("steps", "pairs", "stories") if k in d), "")
        return f"done: {amount} in {float(d.get('wall_s', 0.0)) / 60:.1f} min ({d.get('stop_reason', '-')})"
    if not out.is_dir():
        return "not started"
    paused = " (paused; run it again to go on)" if paused_message(out) else ""
    return _where_it_stands(cfg, out) + paused


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
            keep = {k: v for k, v in d.items()  # the sizes are the table's
                    if k not in ("final", "latent_mean", "latent_std", "phases", "checkpoint_bytes", "output_bytes")}
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
                   help="print where each stage stands (done, how far a cut run got), run nothing")
    args = p.parse_args(argv)

    preset = args.preset
    export_dir = args.export_dir or (ROOT / "shotstream_core" / "weights" / preset if preset == "tiny"
                                     else ROOT / "runs" / preset / "export")
    data_dir = ROOT / "runs" / preset / "data"
    wanted = set(args.only) if args.only else None
    known = ["data"] + [s.name for s in STAGES]
    unknown = sorted(wanted - set(known)) if wanted is not None else []
    if unknown:
        p.error(f"--only: unknown stage(s) {unknown}; choose from {known}")
    if args.status:
        print(f"data: {'done' if is_done(data_dir) else 'not made'} ({data_dir})")
        for stage in STAGES:
            if wanted is None or stage.name in wanted:
                print(f"{stage.name}: {stage_status(preset, stage)}")
        return 0

    if (wanted is None or "data" in wanted) and not is_done(data_dir):
        print(f"[pipeline] data -> {data_dir}", flush=True)
        if not args.dry_run:
            make_data(preset, data_dir)
    for stage in STAGES:
        if wanted is not None and stage.name not in wanted:
            continue
        cfg = stage_config_path(preset, stage)
        if not cfg.is_file():
            print(f"[pipeline] {stage.name}: no {cfg.name}, skipped", flush=True)
            continue
        out = stage_out_dir(preset, stage)
        if is_done(out):
            print(f"[pipeline] {stage.name}: done ({out}), skipped", flush=True)
            continue
        nproc = args.nproc if args.nproc is not None else DEFAULT_NPROC.get(preset, {}).get(stage.name, 1)
        cmd = stage_command(preset, stage, nproc)
        print(f"[pipeline] {stage.name}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(cmd, cwd=ROOT)
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
            export(preset, export_dir)
    if args.dry_run:
        return 0
    copied = export(preset, export_dir)
    if not copied:
        print(f"[pipeline] no student stage is done yet: nothing exported, {export_dir} is unchanged", flush=True)
        return 0
    report = write_training_report(preset, export_dir, data_dir)
    print(f"[pipeline] exported {copied} and {report}", flush=True)
    if not args.no_eval:
        cmd = [sys.executable, *evaluation_args(preset, export_dir)]
        print(f"[pipeline] evaluate: {' '.join(cmd)}", flush=True)
        return subprocess.call(cmd, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
