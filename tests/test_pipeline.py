"""training.pipeline as a user drives it: stale stages after a retrain, --status, Ctrl-C, `--status | head`,
and make's view of a paused run. The stages here are stand-ins (a few lines of Python per stage that write
its outputs and done.json), so each test takes seconds."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training.common import mark_done
from training.pipeline import make_data as REAL_MAKE_DATA

REPO = Path(__file__).resolve().parents[1]

# One stage run: its output files and done.json, each new (a stage run again gets a new done.json).
FAKE_STAGE = r"""
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for name in ("vae", "teacher", "student"):
    (out / f"{name}.safetensors").write_bytes(str(time.time_ns()).encode())
(out / "done.json").write_text(json.dumps({"steps": 1, "run": time.time_ns()}))
"""


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    """The micro pipeline under tmp_path with stand-in stages; returns runs/micro."""
    from training import pipeline

    runs = tmp_path / "runs" / "micro"
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    monkeypatch.setattr(pipeline, "stage_out_dir", lambda preset, stage: runs / stage.name)
    monkeypatch.setattr(pipeline, "stage_command",
                        lambda preset, stage, nproc: [sys.executable, "-c", FAKE_STAGE, str(runs / stage.name)])
    monkeypatch.setattr(pipeline, "make_data", lambda preset, out_dir: mark_done(out_dir, stories=1))
    monkeypatch.setattr(pipeline, "write_training_report",
                        lambda preset, export_dir, data_dir=None: export_dir / "training_report.md")
    return runs


def _run_stage(out: Path) -> None:
    subprocess.run([sys.executable, "-c", FAKE_STAGE, str(out)], check=True)


def _status(capsys) -> dict:
    from training.pipeline import main

    capsys.readouterr()
    assert main(["--preset", "micro", "--status"]) == 0
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())


def test_depends_names_every_stage_a_config_reads():
    """DEPENDS (what each stage is built from) is what the configs read: every path field that points
    into another stage's run folder, or the data set."""
    from training.common import load_stage_config
    from training.pipeline import DEPENDS, STAGES, _config_class, data_out_dir, stage_config_path, stage_out_dir

    for preset in ("tiny", "micro"):
        outs = {s.name: stage_out_dir(preset, s) for s in STAGES}
        outs["data"] = data_out_dir(preset).relative_to(REPO)
        for stage in STAGES:
            cfg = load_stage_config(_config_class(stage.config_cls), stage_config_path(preset, stage))
            reads = set()
            for field in dataclasses.fields(cfg):
                value = getattr(cfg, field.name)
                if field.name in ("out_dir", "export") or not isinstance(value, str) or not value:
                    continue
                reads |= {name for name, out in outs.items()
                          if name != stage.name and (Path(value) == out or out in Path(value).parents)}
            assert reads == set(DEPENDS[stage.name]), (preset, stage.name, reads)


def test_a_retrained_teacher_makes_the_stages_built_on_it_stale(fake_runs, capsys):
    """The walkthrough: after the teacher is retrained, ode and the students built on the old one are no
    longer silently reused: --status says stale, the export refuses the mixed chain, the pipeline stops
    before running anything with the stages to delete, and --rebuild-stale rebuilds them."""
    from training.pipeline import export, main

    export_dir = fake_runs / "export"
    assert main(["--preset", "micro", "--no-eval"]) == 0
    shipped = (export_dir / "dit.safetensors").read_bytes()
    assert not any(v.startswith("stale") for v in _status(capsys).values())

    shutil.rmtree(fake_runs / "teacher")
    capsys.readouterr()
    assert main(["--preset", "micro", "--only", "teacher", "--no-eval"]) == 1  # trains it, refuses the export
    out = capsys.readouterr().out
    assert "not exported" in out and "ode, stage2, stage3, stage4 were built from an older teacher" in out
    assert (fake_runs / "teacher" / "done.json").is_file()
    assert (export_dir / "dit.safetensors").read_bytes() == shipped
    with pytest.raises(Exception, match="were built from an older teacher"):
        export("micro", export_dir)

    status = _status(capsys)
    assert status["teacher"].startswith("done")
    for name in ("ode", "stage2", "stage3", "stage4"):
        assert status[name].startswith("stale (teacher was retrained after it)"), status[name]
    assert status["preencode"].startswith("done")

    before = {n: (fake_runs / n / "done.json").read_bytes() for n in ("ode", "stage2", "stage3", "stage4")}
    assert main(["--preset", "micro", "--no-eval"]) == 1
    out = capsys.readouterr().out
    assert ("[pipeline] stopped: ode, stage2, stage3, stage4 were built from an older teacher: delete "
            "runs/micro/ode runs/micro/stage2 runs/micro/stage3 runs/micro/stage4 to rebuild them "
            "(or run with --rebuild-stale)") in out
    assert "skipped" not in out and "[pipeline] vae" not in out  # it stopped before running or skipping anything
    assert {n: (fake_runs / n / "done.json").read_bytes() for n in before} == before

    assert main(["--preset", "micro", "--no-eval", "--rebuild-stale"]) == 0
    out = capsys.readouterr().out
    assert "--rebuild-stale: deleting runs/micro/ode" in out and "teacher: done" in out
    assert all((fake_runs / n / "done.json").read_bytes() != before[n] for n in before)
    assert (export_dir / "dit.safetensors").read_bytes() == (fake_runs / "stage4" / "student.safetensors").read_bytes()
    assert not any(v.startswith("stale") for v in _status(capsys).values())


def test_the_data_set_written_again_to_the_same_stories_stales_nothing(fake_runs, capsys):
    """The Story World set is reproducible: writing it again (another wall time) leaves the stages built
    on it valid; another set (other stories) makes them stale."""
    from training.pipeline import main

    assert main(["--preset", "micro", "--no-eval"]) == 0
    mark_done(fake_runs / "data", stories=1, wall_s=123.0)
    assert not any(v.startswith("stale") for v in _status(capsys).values())
    mark_done(fake_runs / "data", stories=2)
    status = _status(capsys)
    assert status["vae"].startswith("stale (the data set was written again, with other stories, after it)")
    assert all(status[n].startswith("stale") for n in ("decoder", "preencode", "teacher", "stage4"))


def test_a_deleted_upstream_stage_stops_the_pipeline_before_it_is_retrained(fake_runs, capsys):
    """Deleting the teacher's folder and running the pipeline would retrain it under the finished stages
    built on the old one: the pipeline says so first."""
    from training.pipeline import main

    assert main(["--preset", "micro", "--no-eval"]) == 0
    shutil.rmtree(fake_runs / "teacher")
    capsys.readouterr()
    assert main(["--preset", "micro", "--no-eval"]) == 1
    assert "ode, stage2, stage3, stage4 were built from an older teacher" in capsys.readouterr().out
    assert not (fake_runs / "teacher").exists()
    assert _status(capsys)["ode"].startswith("stale (teacher was deleted or restarted since it was built)")


def test_runs_from_before_the_records_go_by_the_done_times(fake_runs, capsys):
    """A finished run without built_from.json (from before it) is not stale while its upstream stages
    finished before it (a second's disorder, as a copied folder has, included) and gets the record; an
    upstream stage that finished well after it makes it stale."""
    from training.pipeline import BUILT_FROM, main

    assert main(["--preset", "micro", "--no-eval"]) == 0
    for path in fake_runs.glob(f"*/{BUILT_FROM}"):
        path.unlink()
    t = time.time()
    order = ["vae", "decoder", "preencode", "teacher", "ode", "stage2", "stage3", "stage4"]
    for k, name in enumerate(order):  # in order, 100 s apart; the teacher a second after the ode
        os.utime(fake_runs / name / "done.json", (t - 1000 + 100 * k,) * 2)
    os.utime(fake_runs / "teacher" / "done.json", (t - 1000 + 100 * 4 + 1,) * 2)
    os.utime(fake_runs / "data" / "done.json", (t,) * 2)  # data: never by time
    assert not any(v.startswith("stale") for v in _status(capsys).values())
    assert main(["--preset", "micro", "--no-eval"]) == 0
    assert all((fake_runs / n / BUILT_FROM).is_file() for n in order)  # adopted

    for path in fake_runs.glob(f"*/{BUILT_FROM}"):
        path.unlink()
    _run_stage(fake_runs / "teacher")  # retrained by hand, now
    status = _status(capsys)
    assert status["ode"].startswith("stale (teacher was retrained after it, by the done.json times)")
    assert status["stage4"].startswith("stale (teacher was retrained after it, by the done.json times)")
    capsys.readouterr()
    assert main(["--preset", "micro", "--no-eval"]) == 1
    out = capsys.readouterr().out
    assert "ode, stage2, stage3, stage4 were built from an older teacher" in out
    # a copy without file times reads the same way, so the stop line names those stages and the way out
    assert ("ode, stage2, stage3, stage4: runs from before the built-from records are judged by their done.json "
            "times") in out
    assert "copy them again with `cp -a`" in out


def test_status_reads_the_target_step_the_run_itself_was_given(tmp_path):
    """A run started with --set max_steps=2000 is at step 1200 of 2000, not of the config file's 4: --status
    reads the run's own config.yaml, or its paused.json."""
    from training.common import pause_stage, save_config
    from training.pipeline import run_status
    from training.stage1_teacher import TeacherConfig

    out = tmp_path / "teacher"
    (out / "checkpoints" / "step_00001200").mkdir(parents=True)
    (out / "checkpoints" / "step_00001200" / "state.pt").write_bytes(b"")
    recipe = TeacherConfig(out_dir=str(out), max_steps=4)
    save_config(dataclasses.replace(recipe, max_steps=2000), out / "config.yaml")
    assert run_status(recipe) == "at step 1200 of 2000"
    (out / "config.yaml").unlink()
    pause_stage(out, "teacher stopped at step 1200 of 2000", step=1200, max_steps=2000)
    assert run_status(recipe) == "at step 1200 of 2000 (paused; run it again to go on)"


CTRL_C_DRIVER = r"""
import sys
from pathlib import Path
from training import pipeline

tmp = Path(sys.argv[1])
stage = '''
import signal, sys, time
from pathlib import Path
def stop(*_):
    time.sleep(1.0)  # the stage's own handling (a checkpoint, say) takes a while
    Path(sys.argv[1]).write_text("handled")
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
Path(sys.argv[2]).write_text("started")
time.sleep(120)
'''
pipeline.ROOT = tmp
pipeline.stage_out_dir = lambda preset, s: tmp / s.name
pipeline.stage_command = lambda preset, s, nproc: [sys.executable, "-c", stage, str(tmp / "handled"), str(tmp / "started")]
sys.exit(getattr(pipeline, "cli", pipeline.main)(["--preset", "micro", "--only", "teacher", "--no-eval"]))
"""


def test_ctrl_c_waits_for_the_stage_and_says_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) during a stage: the pipeline waits for the stage to
    finish its own handling, prints one line instead of a traceback, and exits 130."""
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_DRIVER, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "started").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert "[pipeline] interrupted during teacher: run the same command to resume" in out
    assert "Traceback" not in err, err
    assert (tmp_path / "handled").is_file()  # the stage was let finish, not killed


def test_status_piped_into_head_ends_quietly():
    """`--status | head`: stdout closed before the status is written ends without a BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, "-m", "training.pipeline", "--preset", "micro", "--status"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_reports_a_paused_pipeline_as_a_pause():
    """make train-micro on a pipeline that paused (exit 75) says how to go on, and still fails the make (so
    `make train-micro && next` stops at an unfinished model); PAUSE_STATUS=0 makes a pause no error; a
    failure stays a failure."""
    def make(status: int, *extra: str):
        python = f'{sys.executable} -c "raise SystemExit({status})"'
        return subprocess.run(["make", "--no-print-directory", "train-micro", f"PYTHON={python}", *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    res = make(75)
    assert res.returncode == 2 and "paused: run make train-micro again to go on" in res.stdout, res  # make's own
    assert "Error 75" in res.stderr, res.stderr  # the pipeline's pause status, passed on
    res = make(75, "PAUSE_STATUS=0")
    assert res.returncode == 0 and "paused: run make train-micro again" in res.stdout and "Error" not in res.stderr
    res = make(3)
    assert res.returncode == 2 and "paused" not in res.stdout and "Error 3" in res.stderr


def test_a_deleted_data_set_or_a_finished_stage_run_again_stales_nothing(fake_runs, capsys):
    """Two things that change no model must not send the user to delete finished stages: the data set,
    deleted, is written again to the same stories before anything reads it; a finished stage run again to
    the same result (an 'already done' re-run, or one that only took another time) keeps its done.json."""
    from training.pipeline import main

    assert main(["--preset", "micro", "--no-eval"]) == 0
    shutil.rmtree(fake_runs / "data")
    assert not any(v.startswith("stale") for v in _status(capsys).values())
    assert main(["--preset", "micro", "--no-eval"]) == 0  # writes the data again and goes on

    teacher = fake_runs / "teacher"
    record = json.loads((teacher / "done.json").read_text())
    before = (teacher / "done.json").stat().st_mtime_ns
    time.sleep(0.01)
    mark_done(teacher, **{**record, "wall_s": 99.0, "resumed_from": record["steps"]})  # same run, other sitting
    assert (teacher / "done.json").stat().st_mtime_ns == before
    assert not any(v.startswith("stale") for v in _status(capsys).values())
    mark_done(teacher, **{**record, "steps": record["steps"] + 1})  # another run: what it built goes stale
    assert _status(capsys)["ode"].startswith("stale (teacher was retrained after it)")


def test_a_stage_run_under_an_older_recipe_of_its_code_is_rebuilt_with_what_was_built_on_it(fake_runs, capsys):
    """A finished stage whose recipe.json names an older RECIPE than its code's is not what `make train-tiny`
    gives now: it and the stages built on it are stale, the pipeline says why, and --rebuild-stale retrains
    them. The same recipe, or no record (a run from before them), stales nothing."""
    from training.pipeline import main
    from training.stage3_dmd import DMDStageConfig

    assert main(["--preset", "micro", "--no-eval"]) == 0
    record = fake_runs / "stage3" / "recipe.json"
    record.write_text(json.dumps({"recipe": DMDStageConfig.RECIPE}))
    assert not any(v.startswith("stale") for v in _status(capsys).values())
    record.write_text(json.dumps({"recipe": DMDStageConfig.RECIPE - 1}))
    status = _status(capsys)
    assert status["stage3"].startswith(f"stale (it ran under recipe {DMDStageConfig.RECIPE - 1} of its stage's code")
    assert status["stage4"].startswith("stale (built from stage3, which is stale)")
    assert not status["stage2"].startswith("stale")
    before = (fake_runs / "stage3" / "done.json").read_bytes()
    assert main(["--preset", "micro", "--no-eval"]) == 1
    assert (f"[pipeline] stopped: stage3: it ran under recipe {DMDStageConfig.RECIPE - 1} of its stage's code, which "
            f"is at recipe {DMDStageConfig.RECIPE} now; stage4 was built from an older stage3: delete runs/micro/stage3 "
            "runs/micro/stage4 to rebuild them") in capsys.readouterr().out
    assert main(["--preset", "micro", "--no-eval", "--rebuild-stale"]) == 0
    assert (fake_runs / "stage3" / "done.json").read_bytes() != before
    assert not any(v.startswith("stale") for v in _status(capsys).values())


def _ran_with(out: Path, **changes) -> None:
    """OUT/config.yaml: micro stage 3's config file as the pipeline runs it, with `changes`."""
    from training.common import load_stage_config, save_config
    from training.pipeline import STAGES, _config_class, pipeline_overrides, stage_config_path

    stage = next(s for s in STAGES if s.name == "stage3")
    cfg = load_stage_config(_config_class(stage.config_cls), stage_config_path("micro", stage), pipeline_overrides(stage))
    save_config(dataclasses.replace(cfg, **changes), out / "config.yaml")


def test_a_stage_run_with_another_config_than_its_file_is_stale_and_a_shorter_one_goes_on(fake_runs, capsys):
    """A finished stage whose config file changed since it ran (a recipe change pulled into a checkout with
    finished runs) is not what the pipeline would train now: stale, with the keys named. Where only max_steps
    grew and the stage goes on exactly (constant learning rates), the pipeline runs it instead of skipping it.
    A sitting's settings (a time budget, threads) change nothing."""
    from training.common import load_stage_config
    from training.pipeline import STAGES, main, stage_config_path
    from training.stage3_dmd import DMDStageConfig

    assert main(["--preset", "micro", "--no-eval"]) == 0
    out = fake_runs / "stage3"
    _ran_with(out, max_minutes=1.0, num_threads=1)
    assert not any(v.startswith("stale") for v in _status(capsys).values())

    _ran_with(out, lr=1e-3)
    status = _status(capsys)
    assert status["stage3"].startswith("stale (it ran with another config than micro-stage3.yaml (lr: 0.001 -> ")
    assert status["stage4"].startswith("stale (built from stage3, which is stale)")
    assert main(["--preset", "micro", "--no-eval"]) == 1
    assert "[pipeline] stopped: stage3: it ran with another config than micro-stage3.yaml (lr: 0.001" in \
        capsys.readouterr().out

    stage3 = next(s for s in STAGES if s.name == "stage3")
    steps = load_stage_config(DMDStageConfig, stage_config_path("micro", stage3)).max_steps
    _ran_with(out, max_steps=steps - 1)
    assert _status(capsys)["stage3"].endswith(f"its config file asks for {steps} steps: the next run goes on")
    before = (out / "done.json").read_bytes()
    assert main(["--preset", "micro", "--no-eval", "--rebuild-stale"]) == 0
    assert "[pipeline] stage3: done at fewer steps than its config file's max_steps: going on" in capsys.readouterr().out
    assert (out / "done.json").read_bytes() != before  # the stage ran again (here a stand-in; the real one goes on)


def test_a_data_set_rendered_otherwise_to_the_same_counts_makes_the_stages_on_it_stale(fake_runs, capsys,
                                                                                       monkeypatch):
    """The data set's record holds a hash of its files, not only its counts: written again to the same
    stories it matches (the writer is deterministic), while one rendered by changed generator code to the
    same counts is another set. A stage recorded against a data set from before that hash still matches it."""
    from training import data, pipeline

    monkeypatch.setattr(pipeline, "make_data", REAL_MAKE_DATA)
    assert pipeline.main(["--preset", "micro", "--no-eval"]) == 0
    record = json.loads((fake_runs / "data" / "done.json").read_text())
    assert record["content"] == data.folder_digest(fake_runs / "data")
    shutil.rmtree(fake_runs / "data")
    assert pipeline.main(["--preset", "micro", "--no-eval"]) == 0  # written again: the same set
    assert json.loads((fake_runs / "data" / "done.json").read_text())["content"] == record["content"]
    assert not any(v.startswith("stale") for v in _status(capsys).values())

    write = data.write_training_set

    def changed_generator(out_dir, *args, **kwargs):  # one video rendered brighter, the counts the same
        from training.storyworld.storage import read_mp4, write_mp4

        index = write(out_dir, *args, **kwargs)
        video = sorted(Path(out_dir).glob("*.mp4"))[0]
        frames, fps = read_mp4(video)
        write_mp4(video, np.clip(frames.astype(np.int16) + 40, 0, 255).astype(np.uint8), fps)
        return index

    monkeypatch.setattr(data, "write_training_set", changed_generator)
    shutil.rmtree(fake_runs / "data")
    capsys.readouterr()
    assert pipeline.main(["--preset", "micro", "--only", "data", "--no-eval"]) == 1  # the export refuses
    assert "vae, decoder, preencode, teacher, ode, stage2, stage3, stage4 were built from an older data" in (
        capsys.readouterr().out)
    changed = json.loads((fake_runs / "data" / "done.json").read_text())
    assert {k: changed[k] for k in ("stories", "min_shots", "max_shots")} == {
        k: record[k] for k in ("stories", "min_shots", "max_shots")}
    status = _status(capsys)
    assert status["vae"].startswith("stale (the data set was written again, with other stories, after it)")
    assert status["preencode"].startswith("stale")

    # a video's bytes beyond its frames (the muxer's version string, say) do not count
    video = sorted((fake_runs / "data").glob("*.mp4"))[0]
    blob = video.read_bytes()
    at = blob.find(b"Lavf")
    assert at > 0
    video.write_bytes(blob[:at] + b"Xavf" + blob[at + 4:])
    assert data.folder_digest(fake_runs / "data") == changed["content"]

    # a stage built from a data set recorded before the hash (its counts only) still matches it
    (fake_runs / "data" / "done.json").write_text(json.dumps({k: v for k, v in changed.items() if k != "content"}))
    for name in ("vae", "decoder", "preencode"):
        pipeline.record_built_from("micro", name)
    (fake_runs / "data" / "done.json").write_text(json.dumps(changed))
    assert not any(v.startswith("stale") for v in _status(capsys).values())


def test_an_upstream_redone_with_another_config_stales_a_stage_recorded_before_configs_were(fake_runs, capsys):
    """A stage recorded against an upstream run whose done.json had no config hash yet: that upstream
    redone with another config (another seed, the same counts) is another run, and the stage is stale."""
    from training import pipeline

    assert pipeline.main(["--preset", "micro", "--no-eval"]) == 0
    (fake_runs / "ode" / "done.json").write_text(json.dumps({"pairs": 8}))
    pipeline.record_built_from("micro", "stage2")
    assert not _status(capsys)["stage2"].startswith("stale")
    (fake_runs / "ode" / "done.json").write_text(json.dumps({"pairs": 8, "config": "0123456789abcdef"}))
    assert _status(capsys)["stage2"].startswith("stale (ode was retrained after it)")


def test_a_runs_record_tells_configs_apart_and_keeps_older_records(tmp_path):
    """Counts alone (ODE pairs: {"pairs": N}) cannot tell a run with another seed from the last one: the
    record carries a hash of the config it ran with (less one sitting's settings). A done.json from before
    that field is compared without it, so a finished old stage run again keeps it."""
    import yaml

    from training.common import done_record

    def run(folder, **config):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "steps": 50, "max_minutes": 0, **config}))
        mark_done(folder, pairs=8, wall_s=1.0)
        return done_record(folder)

    base = run(tmp_path / "a")
    assert run(tmp_path / "b", max_minutes=30) == base  # another sitting's budget: the same run
    assert run(tmp_path / "c", seed=7) != base  # another seed: another run, though the counts agree
    old = tmp_path / "old"
    old.mkdir()
    (old / "done.json").write_text(json.dumps({"pairs": 8, "wall_s": 5.0}))  # written before the field
    before = (old / "done.json").read_text()
    run(old)
    assert (old / "done.json").read_text() == before


def test_built_from_records_of_another_formula_count_as_none(fake_runs, capsys):
    """A built_from.json written by an earlier formula of the fingerprints cannot be compared: it is read
    as no record (the done.json times decide), not as a chain of changed stages."""
    from training.pipeline import main

    assert main(["--preset", "micro", "--no-eval"]) == 0
    for out in fake_runs.iterdir():
        record = out / "built_from.json"
        if record.is_file():
            record.write_text(json.dumps({k: "0" * 16 for k in json.loads(record.read_text()) if k != "format"}))
    assert not any(v.startswith("stale") for v in _status(capsys).values())
