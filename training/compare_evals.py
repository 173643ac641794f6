"""Compare two models (or recipes) over evaluations repeated with several noise seeds.

One evaluation is one draw of the closed loop: a 1e-6 change in the VAE has moved the student's memory by
0.02 and its drift by 0.025 (docs/EXPERIMENTS.md), so a single run per model cannot tell two models apart
by less than that. Evaluate each model on the same stories with several `--noise-seed`s, then:

    python -m training.compare_evals runs/base_n1 runs/base_n2 runs/base_n3 --vs runs/new_n1 runs/new_n2 runs/new_n3

prints each metric's mean and spread over the seeds for both groups, the difference, its standard error
(paired by seed where both groups ran the same seeds) and whether the difference is beyond two of them.

Noise seeds measure sampling only: two training runs of one recipe (another `seed`) differ by more
(docs/EXPERIMENTS.md, "Training runs"). Give a side the evaluations of several trained models (told apart
by their weights' model_id) and the comparison is over training runs: each model's mean over its noise
seeds, the side's mean and spread over its models, and a standard error from that spread (the other side's
where a side has one model only, as two runs of the same recipe spread alike).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

METRICS = ("adherence", "memory", "cut_f1", "drift")
# A difference counts as beyond noise past this many standard errors (about 95% two-sided).
BEYOND_NOISE_SE = 2.0


@dataclass(frozen=True)
class EvalRun:
    path: Path
    noise_seed: int
    split: tuple  # (split name, 5-shot stories, 10-shot stories): runs compared must share it
    row: dict  # the variant's metrics
    model: str  # the weights' model_id: runs of one model repeat its sampling, other models its training


def load_run(path, variant: str = "student") -> EvalRun:
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = json.loads(file.read_text())
    except OSError:
        raise FileNotFoundError(f"no metrics.json at {file}: run `python -m training.evaluate --out {path}` "
                                f"first (with --noise-seed N for each repeat)") from None
    except ValueError as e:
        raise ValueError(f"{file} is not a readable metrics.json ({e}): run that evaluation again") from None
    row = metrics.get("variants", {}).get(variant)
    if not row or not row.get("available"):
        have = [k for k, r in metrics.get("variants", {}).items() if r.get("available")]
        raise ValueError(f"{file} has no scored `{variant}` row (it has {have}): choose one with --variant, "
                         f"or evaluate with --variants {variant}")
    split = metrics.get("split", {})
    model = row.get("model_id") or str(metrics.get("weights_dir"))
    return EvalRun(path, int(split.get("noise_seed") or 0),
                   (split.get("name", "eval"), split.get("stories5"), split.get("stories10")), row, model)


def mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None from one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _check_group(runs: list[EvalRun], name: str) -> dict[str, list[EvalRun]]:
    """The side's runs by model, each model's seeds once."""
    seen: dict[tuple, Path] = {}
    by_model: dict[str, list[EvalRun]] = {}
    for r in runs:
        key = (r.model, r.noise_seed)
        if key in seen:
            raise ValueError(f"{name}: {seen[key]} and {r.path} both ran noise seed {r.noise_seed} of one model, and "
                             f"an evaluation repeats exactly, so the second adds nothing: evaluate each repeat with "
                             f"its own --noise-seed")
        seen[key] = r.path
        by_model.setdefault(r.model, []).append(r)
    seed_sets = {tuple(sorted(r.noise_seed for r in rs)) for rs in by_model.values()}
    if len(seed_sets) > 1:
        raise ValueError(f"{name}: its {len(by_model)} models ran different noise seeds ({sorted(seed_sets)}): "
                         f"evaluate every model with the same --noise-seed values, so that each model's mean is "
                         f"over the same draws")
    return by_model


def compare(base: list[EvalRun], other: list[EvalRun]) -> dict:
    """metric -> {base: (mean, sd), other: (mean, sd), diff, se, paired, beyond_noise} (se and beyond_noise
    None where the groups are too small to estimate a spread)."""
    if not base or not other:
        raise ValueError("give at least one evaluation on each side")
    models_a = _check_group(base, "the first group")
    models_b = _check_group(other, "--vs")
    splits = {r.split for r in base + other}
    if len(splits) > 1:
        listed = "; ".join(f"{r.path}: {r.split[0]}, {r.split[1]} + {r.split[2]} stories" for r in base + other)
        raise ValueError(f"these evaluations ran on different stories ({listed}): compare runs of one split and "
                         f"size (--split, --stories, --stories10), differing only in the model and --noise-seed")
    if len(models_a) > 1 or len(models_b) > 1:
        return compare_training_runs(models_a, models_b)
    seeds_a = sorted(r.noise_seed for r in base)
    paired = seeds_a == sorted(r.noise_seed for r in other) and len(base) >= 2
    out = {}
    for metric in METRICS:
        a = {r.noise_seed: r.row.get(metric) for r in base}
        b = {r.noise_seed: r.row.get(metric) for r in other}
        if any(v is None for v in (*a.values(), *b.values())):
            continue  # not measured in these runs (no 10-shot stories: no drift)
        mean_a, sd_a = mean_and_sd(list(a.values()))
        mean_b, sd_b = mean_and_sd(list(b.values()))
        if paired:  # the same noise on both sides: the per-seed differences cancel what the seed does to both
            mean_d, sd_d = mean_and_sd([b[s] - a[s] for s in seeds_a])
            se = sd_d / math.sqrt(len(seeds_a))
        elif sd_a is not None and sd_b is not None:
            se = unpaired_se(sd_a, len(a), sd_b, len(b))
        else:
            se = None
        diff = mean_b - mean_a
        out[metric] = {"base": (mean_a, sd_a), "other": (mean_b, sd_b), "diff": diff, "se": se, "paired": paired,
                       "beyond_noise": None if se is None else abs(diff) > BEYOND_NOISE_SE * se}
    return out


def unpaired_se(sd_a: float, n_a: int, sd_b: float, n_b: int) -> float:
    """Standard error of the difference of two means of independent samples (Welch's)."""
    return math.sqrt(sd_a ** 2 / n_a + sd_b ** 2 / n_b)


def model_means(models: dict, metric: str) -> list[float] | None:
    """Each model's mean of `metric` over its noise seeds (None where a run did not measure it)."""
    values = [[r.row.get(metric) for r in runs] for runs in models.values()]
    if any(v is None for vs in values for v in vs):
        return None
    return [sum(vs) / len(vs) for vs in values]


def compare_training_runs(models_a: dict, models_b: dict) -> dict:
    """As compare, where a side holds several trained models: each model's mean over its noise seeds is one
    value, and the spread between them is the training runs' (which their noise seeds' spread is part of)."""
    out = {}
    for metric in METRICS:
        a, b = model_means(models_a, metric), model_means(models_b, metric)
        if a is None or b is None:
            continue
        (mean_a, sd_a), (mean_b, sd_b) = mean_and_sd(a), mean_and_sd(b)
        # a side with one model borrows the other's spread: another run of a recipe spreads alike
        se = unpaired_se(sd_a if sd_a is not None else sd_b, len(a), sd_b if sd_b is not None else sd_a, len(b))
        diff = mean_b - mean_a
        out[metric] = {"base": (mean_a, sd_a), "other": (mean_b, sd_b), "diff": diff, "se": se, "paired": False,
                       "training_runs": (len(a), len(b)), "beyond_noise": abs(diff) > BEYOND_NOISE_SE * se}
    return out


def _pm(mean: float, sd: float | None) -> str:
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"


def _describe(runs: list[EvalRun]) -> str:
    models = {r.model for r in runs}
    seeds = sorted({r.noise_seed for r in runs})
    return (f"{len(runs)} run(s)" + (f" of {len(models)} trained models" if len(models) > 1 else "")
            + f", noise seeds {seeds}")


def format_table(result: dict, base: list[EvalRun], other: list[EvalRun]) -> str:
    over_runs = any("training_runs" in c for c in result.values())
    over = "over training runs" if over_runs else "over seeds"
    lines = [f"first group: {_describe(base)}; --vs: {_describe(other)}",
             "", f"| metric | first (mean ± sd {over}) | --vs | difference | standard error | verdict |",
             "|---|---|---|---|---|---|"]
    for metric, c in result.items():
        if c["se"] is None:
            verdict, se = "spread unknown: run at least 2 noise seeds a side", "-"
        else:
            verdict = ("beyond noise" if c["beyond_noise"] else "within noise") + (" (paired)" if c["paired"] else "")
            if "training_runs" in c:
                verdict += " (over training runs)"
            se = f"{c['se']:.3f}"
        lines.append(f"| {metric} | {_pm(*c['base'])} | {_pm(*c['other'])} | {c['diff']:+.3f} | {se} | {verdict} |")
    lines += ["", f"beyond noise: the difference exceeds {BEYOND_NOISE_SE:g} standard errors."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.compare_evals", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("base", nargs="+", type=Path, help="evaluation folders (or metrics.json files) of the first model")
    p.add_argument("--vs", nargs="+", type=Path, required=True, help="evaluation folders of the model compared")
    p.add_argument("--variant", default="student", help="which row of each evaluation (default: student)")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison there")
    a = p.parse_args(argv)
    try:
        base = [load_run(x, a.variant) for x in a.base]
        other = [load_run(x, a.variant) for x in a.vs]
        result = compare(base, other)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(result, base, other))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
