"""training.compare_evals: means and spreads over noise seeds, and a verdict that follows the spread."""

import json

import pytest

from training import compare_evals as ce


def write_eval(folder, seed, adherence, memory, cut_f1=0.94, drift=-0.02, split="dev", stories=(32, 4)):
    folder.mkdir(parents=True)
    row = {"available": True, "adherence": adherence, "memory": memory, "cut_f1": cut_f1, "drift": drift}
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
