"""training.compare_evals: means and spreads over noise seeds, and a verdict that follows the spread."""

import json

import pytest

from training import compare_evals as ce


def write_eval(folder, seed, adherence, memory, cut_f1=0.94, drift=-0.02, split="dev", stories=(32, 4), model="m0"):
    folder.mkdir(parents=True)
    row = {"available": True, "adherence": adherence, "memory": memory, "cut_f1": cut_f1, "drift": drift,
           "model_id": model}
    metrics = {"split": {"name": split, "stories5": stories[0], "stories10": stories[1], "noise_seed": seed},
               "variants": {"student": row, "teacher": {"available": False}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def groups(tmp_path, base, other, **kw):
    a = [write_eval(tmp_path / f"a{s}", s, *v, **kw) for s, v in base.items()]
    b = [write_eval(tmp_path / f"b{s}", s, *v, **kw) for s, v in other.items()]
    return [ce.load_run(p) for p in a], [ce.load_run(p) for p in b]


def test_a_steady_gain_is_beyond_noise_and_a_gain_smaller_than_the_spread_is_not(tmp_path):
    # adherence: +0.05 on every seed, though the seeds spread by 0.04 (paired, so the spread cancels);
    # memory: +0.05 on average, but seed by seed -0.2 .. +0.3
    base = {1: (0.20, 0.40), 2: (0.24, 0.60), 3: (0.16, 0.50)}
    other = {1: (0.25, 0.70), 2: (0.29, 0.40), 3: (0.21, 0.55)}
    result = ce.compare(*groups(tmp_path, base, other))
    adh, mem = result["adherence"], result["memory"]
    assert adh["paired"] and adh["diff"] == pytest.approx(0.05) and adh["beyond_noise"]
    assert adh["base"][0] == pytest.approx(0.20) and adh["base"][1] == pytest.approx(0.04)
    assert mem["diff"] == pytest.approx(0.05) and not mem["beyond_noise"]
    assert result["cut_f1"]["diff"] == 0 and not result["cut_f1"]["beyond_noise"]


def test_unpaired_seeds_use_both_spreads(tmp_path):
    base = {1: (0.20, 0.5), 2: (0.22, 0.5)}
    other = {3: (0.30, 0.5), 4: (0.34, 0.5)}
    result = ce.compare(*groups(tmp_path, base, other))
    adh = result["adherence"]
    assert not adh["paired"]
    sd_a, sd_b = ce.mean_and_sd([0.20, 0.22])[1], ce.mean_and_sd([0.30, 0.34])[1]
    assert adh["se"] == pytest.approx((sd_a ** 2 / 2 + sd_b ** 2 / 2) ** 0.5)
    assert adh["beyond_noise"]  # +0.11 against a standard error of 0.016


def test_one_run_a_side_has_no_verdict(tmp_path, capsys):
    a = write_eval(tmp_path / "a", 0, 0.2, 0.5)
    b = write_eval(tmp_path / "b", 0, 0.9, 0.9)
    result = ce.main([str(a), "--vs", str(b)])
    assert result["adherence"]["se"] is None and result["adherence"]["beyond_noise"] is None
    assert "run at least 2 noise seeds a side" in capsys.readouterr().out


def test_runs_of_other_stories_are_refused(tmp_path):
    a = write_eval(tmp_path / "a", 1, 0.2, 0.5)
    b = write_eval(tmp_path / "b", 1, 0.2, 0.5, split="eval")
    with pytest.raises(ValueError, match="different stories"):
        ce.compare([ce.load_run(a)], [ce.load_run(b)])


def test_a_repeated_seed_is_refused(tmp_path):
    base, other = groups(tmp_path, {1: (0.2, 0.5)}, {1: (0.2, 0.5)})
    again = ce.load_run(write_eval(tmp_path / "again", 1, 0.2, 0.5))
    with pytest.raises(ValueError, match="both ran noise seed 1"):
        ce.compare(base + [again], other)


def test_bad_input_is_named_on_the_command_line(tmp_path, capsys):
    a = write_eval(tmp_path / "a", 1, 0.2, 0.5)
    with pytest.raises(SystemExit) as e:
        ce.main([str(a), "--vs", str(tmp_path / "missing")])
    assert e.value.code == 2 and "no metrics.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ce.main([str(a), "--vs", str(a), "--variant", "teacher"])
    assert "no scored `teacher` row" in capsys.readouterr().err


def training_runs(tmp_path, side, memories_by_model):
    """Per model, its evaluations at noise seeds 0.. with these memories (adherence fixed)."""
    return [ce.load_run(write_eval(tmp_path / f"{side}_{model}_{seed}", seed, 0.2, memory, model=model))
            for model, memories in memories_by_model.items() for seed, memory in enumerate(memories)]


def test_several_trained_models_a_side_compare_over_training_runs(tmp_path):
    # every noise seed says the new model keeps memory better than the first shipped run (+0.10 each seed,
    # paired: far beyond noise), but a second training run of the old recipe lands as high: over training
    # runs the gain is inside their spread
    shipped = training_runs(tmp_path, "a", {"ship": [0.40, 0.42, 0.44]})
    new = training_runs(tmp_path, "b", {"new": [0.50, 0.52, 0.54]})
    assert ce.compare(shipped, new)["memory"]["beyond_noise"]
    rerun = training_runs(tmp_path, "a", {"rerun": [0.52, 0.56, 0.54]})
    result = ce.compare(shipped + rerun, new)["memory"]
    assert result["training_runs"] == (2, 1) and not result["paired"]
    assert result["base"][0] == pytest.approx(0.48) and result["base"][1] == pytest.approx(0.12 / 2 ** 0.5)
    # the one-model side borrows the other's spread
    assert result["se"] == pytest.approx(result["base"][1] * (1 / 2 + 1 / 1) ** 0.5)
    assert not result["beyond_noise"]
    # and a gain far past the training runs' spread is beyond it
    better = training_runs(tmp_path, "c", {"x": [0.90, 0.92, 0.94], "y": [0.91, 0.93, 0.95]})
    assert ce.compare(shipped + rerun, better)["memory"]["beyond_noise"]


def test_models_of_one_side_must_share_noise_seeds(tmp_path):
    a = training_runs(tmp_path, "a", {"m1": [0.4, 0.5], "m2": [0.4]})
    b = training_runs(tmp_path, "b", {"m3": [0.4, 0.5]})
    with pytest.raises(ValueError, match="same --noise-seed values"):
        ce.compare(a, b)


def test_one_seed_of_two_models_is_not_a_repeat(tmp_path):
    a = training_runs(tmp_path, "a", {"m1": [0.4], "m2": [0.5]})
    b = training_runs(tmp_path, "b", {"m3": [0.4], "m4": [0.6]})
    assert ce.compare(a, b)["memory"]["diff"] == pytest.approx(0.05)
