"""The evaluation report: markdown ablation table plus a few small PNG plots, from metrics.json's dict.

    from training.report import write_report
    write_report(metrics, out_dir, samples)     # -> out_dir/report.md, metrics.png, adherence_by_shot.png, ...

`metrics` is what training.evaluate writes to metrics.json; `samples` (optional) maps a variant key to
(story name, frames [N, H, W, 3] uint8, per-shot ranges) for the sample-frames figure.
Regenerate a report from a saved metrics.json with `python -m training.report DIR`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

COLUMNS = (  # key, header, format
    ("adherence", "adherence", "{:.3f}"),
    ("memory", "memory", "{:.3f}"),
    ("cut_f1", "cut F1", "{:.3f}"),
    ("drift", "drift", "{:+.3f}"),
    ("flicker", "flicker", "{:.3f}"),
    ("sec_per_frame", "s / frame", "{:.3f}"),
    ("time_to_first_frame", "first frame (s)", "{:.2f}"),
)
QUALITY = ("adherence", "memory", "cut_f1", "flicker")
PLOTS = ("metrics.png", "adherence_by_shot.png", "timing.png", "samples.png")


def _cell(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)


def _stderr(row: dict) -> str:
    """' ± s.e.' after a memory cell, when the row has both."""
    if row.get("memory") is None or row.get("memory_stderr") is None:
        return ""
    return f" ± {row['memory_stderr']:.2f}"


def ablation_table(metrics: dict) -> str:
    head = "| row | " + " | ".join(h for _, h, _ in COLUMNS) + " | stories (5-shot + 10-shot) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for key, row in metrics["variants"].items():
        label = f"{row['label']} (`{key}`)"
        if not row.get("available"):
            lines.append(f"| {label} | {row.get('reason', 'not available')} |" + " — |" * (len(COLUMNS)))
            continue
        cells = [_cell(row.get(k), fmt) + (_stderr(row) if k == "memory" else "") for k, _, fmt in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['stories5']} + {row['stories10']} |")
    return "\n".join(lines)


def targets_table(metrics: dict) -> str:
    check = metrics.get("target_check")
    if not check:
        return "The student row was not evaluated, so the targets were not checked."
    lines = ["| metric | student | target | result |", "|---|---|---|---|"]
    for k, c in check.items():
        if c["value"] is None:
            result = "not measured"
        else:
            result = "met" if c["met"] else f"**missed by {c['short_by']:.3f}**"
        lines.append(f"| {k} | {_cell(c['value'], '{:.3f}')} | >= {c['target']:g} | {result} |")
    lines.append("")
    lines.append("Drift compares the student with itself: it is only informative where adherence is high "
                 "(a model that shows nothing has no drift).")
    return "\n".join(lines)


def items_table(metrics: dict) -> str:
    """Adherence per caption item on the 5-shot stories: which attribute a row gets wrong."""
    rows = {k: r for k, r in metrics["variants"].items() if r.get("available")}
    items = sorted({i for r in rows.values() for i in ((r.get("eval5") or r.get("eval10") or {})
                                                        .get("adherence_by_item") or {})})
    if not items:
        return ""
    lines = ["| row | " + " | ".join(items) + " |", "|" + "---|" * (len(items) + 1)]
    for k, r in rows.items():
        by = (r.get("eval5") or r.get("eval10") or {}).get("adherence_by_item") or {}
        lines.append(f"| `{k}` | " + " | ".join(_cell(by.get(i), "{:.3f}") for i in items) + " |")
    return "\n".join(lines)


def memory_table(metrics: dict) -> str:
    """Memory on the 5-shot stories split by what the story hides (the place, or a character's colour)."""
    rows = {k: (r.get("eval5") or {}) for k, r in metrics["variants"].items() if r.get("available")}
    kinds = sorted({k for e in rows.values() for k in (e.get("memory_by_kind") or {})})
    if not kinds:
        return ""
    lines = ["| row | " + " | ".join(f"hidden {k}" for k in kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for key, e in rows.items():
        by, n = e.get("memory_by_kind") or {}, (e.get("counts") or {}).get("memory_shots_by_kind") or {}
        lines.append(f"| `{key}` | " + " | ".join(
            f"{_cell(by.get(k), '{:.3f}')} ({n.get(k, 0)} shots)" for k in kinds) + " |")
    return "\n".join(lines)


def cut_table(metrics: dict) -> str:
    """Where cut F1 loses, on the 5-shot stories: cuts missed, spurious cuts, and how many of those are
    the video's opening frame jumping against the next (see analyse.OPENING_FRAMES)."""
    rows = {k: ((r.get("eval5") or {}).get("counts") or {}) for k, r in metrics["variants"].items()
            if r.get("available")}
    rows = {k: c for k, c in rows.items() if "cuts_missed" in c}
    if not rows:
        return ""
    lines = ["| row | true cuts | missed | spurious | spurious at the opening frames |", "|---|---|---|---|---|"]
    for key, c in rows.items():
        lines.append(f"| `{key}` | {c['cuts_true']} | {c['cuts_missed']} | {c['cuts_spurious']} | "
                     f"{c['cuts_spurious_opening']} |")
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int | None = None) -> Path:
    """Lay out, write and free a figure (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def plot_metrics(metrics: dict, path: Path) -> Path:
    plt = pyplot()
    rows = {k: r for k, r in metrics["variants"].items() if r.get("available")}
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=90)
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(QUALITY))
    for i, (k, r) in enumerate(rows.items()):
        vals = [r.get(m) if r.get(m) is not None else 0.0 for m in QUALITY]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=k)
    for m, t in metrics.get("targets", {}).items():
        if m in QUALITY:
            j = QUALITY.index(m)
            ax.hlines(t, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(x, [m.replace("_", " ") for m in QUALITY])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (higher is better)")
    ax.set_title("Story World metrics per row (dashed: targets)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_adherence_by_shot(metrics: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=90)
    for k, r in metrics["variants"].items():
        ys = r.get("adherence_by_shot") if r.get("available") else None
        if ys:
            ax.plot(np.arange(1, len(ys) + 1), [np.nan if y is None else y for y in ys], marker="o", ms=3, label=k)
    ax.axvspan(5.5, 10.5, color="0.9", zorder=0)
    ax.set_xlabel("shot (6-10: 10-shot stories only)")
    ax.set_ylabel("adherence")
    ax.set_ylim(0, 1.05)
    ax.set_title("Adherence by shot index (drift = shots 6-10 minus 1-5)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_timing(metrics: dict, path: Path) -> Path:
    plt = pyplot()
    rows = {k: r for k, r in metrics["variants"].items() if r.get("available") and r.get("sec_per_frame")}
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), dpi=90)
    for ax, key, title in zip(axes, ("sec_per_frame", "time_to_first_frame"),
                              ("seconds per generated frame", "time to first frame (s)")):
        vals = [r[key] for r in rows.values()]
        ax.barh(list(rows), vals, color="tab:blue")
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
        ax.set_xlim(0, 1.25 * max(vals, default=1))
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    return save_figure(fig, path)


def plot_samples(samples: dict, path: Path, max_shots: int = 5) -> Path | None:
    """Rows = variants, columns = the middle frame of each shot of the first evaluation story."""
    samples = {k: s for k, s in samples.items() if s is not None}
    if not samples:
        return None
    plt = pyplot()
    cols = min(max_shots, max(len(s[2]) for s in samples.values()))
    # About one screen pixel per video pixel: the figure stays a few tens of kB for smooth frames.
    fig, axes = plt.subplots(len(samples), cols, figsize=(1.0 * cols + 0.8, 1.0 * len(samples) + 0.3), dpi=72,
                             squeeze=False)
    for i, (key, (name, frames, ranges)) in enumerate(samples.items()):
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([]); ax.set_yticks([])
            if j < len(ranges):
                a, b = ranges[j]
                ax.imshow(frames[(a + b) // 2], interpolation="nearest")
            if i == 0:
                ax.set_title(f"shot {j + 1}", fontsize=8)
            if j == 0:
                ax.set_ylabel(key, fontsize=7)
    fig.suptitle(f"story {next(iter(samples.values()))[0]}: middle frame of each shot", fontsize=9)
    return save_figure(fig, path)


# --- the markdown ---------------------------------------------------------------------------------------

def write_report(metrics: dict, out_dir, samples: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [plot_metrics(metrics, out_dir / PLOTS[0]), plot_adherence_by_shot(metrics, out_dir / PLOTS[1]),
             plot_timing(metrics, out_dir / PLOTS[2])]
    if samples:
        plots.append(plot_samples(samples, out_dir / PLOTS[3]))
    elif (out_dir / PLOTS[3]).exists():  # re-rendered from metrics.json: keep the earlier sample figure
        plots.append(out_dir / PLOTS[3])
    split, machine, rows = metrics["split"], metrics["machine"], metrics["variants"]
    teacher = rows.get("teacher", {})

    notes = []
    random_rows = [k for k, r in rows.items() if "RANDOM" in str(r.get("weights", ""))]
    if random_rows:
        notes.append(f"**Rows {', '.join(random_rows)} ran on RANDOM weights** (no trained student in "
                     f"`{metrics['weights_dir']}`): these numbers measure an untrained model, i.e. chance level.")
    if metrics.get("quick"):
        notes.append("**Quick smoke run**: a handful of stories, the numbers are not meaningful.")
    notes += [f"`{k}`: {r['note']}." for k, r in rows.items() if r.get("note")]
    if teacher.get("available"):
        notes.append(
            f"The teacher row uses {teacher['stories5']} five-shot + {teacher['stories10']} ten-shot stories "
            f"(the first ones of the same split), not all of them: {teacher['teacher_steps']} Euler steps with "
            f"CFG {teacher['guidance']:g} are {2 * teacher['teacher_steps']} full passes per shot, against the "
            "student's few cached steps.")

    if split.get("name", "eval") == "dev":
        source = (f"development stories of the Story World's training seed, from story {split['dev_start']} on "
                  "(no training set reaches them; not the evaluation split)")
    else:
        source = f"Story World's evaluation seed {split['seed']} (training never uses it)"
    noise = f" (noise seed {split['noise_seed']}, not the split's own)" if split.get("noise_seed") else ""
    md = [
        f"# ShotStream on the Story World: evaluation of `{metrics['model']}`",
        "",
        f"Regenerate: `{metrics['command']}` (this run: {metrics.get('run_wall_s', 0) / 60:.1f} min, "
        f"videos in `videos/`, not committed)",
        "",
        f"Stories: {split['stories5']} five-shot and {split['stories10']} ten-shot stories from the "
        f"{source}, "
        f"{split['geometry']['width']}x{split['geometry']['height']} pixels, "
        f"{split['geometry']['frames_per_shot']} frames a shot. Every story's shots use fixed noise seeds, the "
        f"same for every row{noise}. Each video is written as mp4 and scored, as read back, by the Story World analyser "
        "(`training/storyworld/analyse.py` defines the metrics).",
        "",
        *[f"- {n}" for n in notes],
        "" if notes else "",
        "## Ablation table",
        "",
        ablation_table(metrics),
        "",
        "adherence, memory, cut F1 and flicker: 5-shot stories (higher is better); drift: adherence over shots "
        "6-10 minus shots 1-5 on the 10-shot stories (0 is perfect, negative = the story decays). "
        "s / frame: wall-clock generation seconds per output frame (text encoding, context encoding, "
        "denoising, decoding; not mp4 writing or scoring); first frame: from a shot's request to its first "
        "decoded block, mean over shots. Both measured in this run on "
        f"{machine['device']} ({machine['torch_threads']} torch threads, {machine['platform']}); other jobs "
        "on the machine slow them.",
        "",
        "## Targets (issue 6, acceptance 3) for the student",
        "",
        targets_table(metrics),
        "",
        "## Adherence per caption item (5-shot stories)",
        "",
        items_table(metrics),
        "",
        "## Memory by hidden attribute (5-shot stories)",
        "",
        memory_table(metrics),
        "",
        "Memory rewards showing again what shot 1 showed, not remembering it: a model that falls back on one "
        "place or colour whenever the caption leaves it out scores well wherever that fallback happens to match. "
        "The row with the global cache emptied every shot (`no_history`) shows what such a fallback scores; "
        "memory beyond that row is memory from the cache. The ± in the ablation table is memory's standard "
        "error with each story's shots counted together.",
        "",
        "## Cut errors (5-shot stories)",
        "",
        cut_table(metrics),
        "",
        "A spurious cut at the opening frames is the video's first frame jumping against the next: the model "
        "draws its first latent frame unlike the rest (its teacher's denoising error there is 2-3x the later "
        "frames'). Coding the VAE's first latent frames like the others does not remove it, nor does more "
        "loss weight on that frame, nor training the student to draw that frame as a block of its own "
        "(docs/EXPERIMENTS.md). Later shots have the same jump, but it falls on their "
        "true cut.",
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots if p is not None],
        "",
        f"Weights: `{metrics['weights_dir']}`, VAE: {metrics['vae']}. "
        + "; ".join(f"`{k}`: {r['weights']}" for k, r in rows.items() if r.get("available") and r.get("weights")),
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m training.report DIR   (DIR holds a metrics.json from training.evaluate)")
    out = Path(argv[0])
    if not (out / "metrics.json").is_file():
        raise SystemExit(f"no metrics.json in {out}: run python -m training.evaluate --out {out} first")
    print(write_report(json.loads((out / "metrics.json").read_text()), out))


if __name__ == "__main__":
    main()
