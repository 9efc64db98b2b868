"""runs.py without training: new run folders, where a resumed run writes (continue or branch), --resume auto's
choice, the run lock, flags changed on resume, and stats.jsonl written and read back."""
import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import runs
from checkpoints import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "DiT-Digits/2"


def checkpoint(run_dir, number, **changes):
    """A small checkpoint in train.py's layout at run_dir/checkpoints/<number>.pt (read_resumable accepts it)."""
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    data = dict(model={"w": torch.ones(2)}, ema={"w": torch.ones(2)}, opt={}, scheduler={},
                train_config=dict(lr=1e-4, global_batch_size=4, global_seed=0), step=number, rng_states=[], parent=None)
    data.update(changes)
    path = os.path.join(run_dir, "checkpoints", f"{number:07d}.pt")
    torch.save(data, path)
    return path


def test_new_run_dirs_are_numbered_past_every_existing_one(tmp_path):
    """The issue's reproduction: after run 000 is deleted, a new run must not land in 001's folder; runs
    started at the same instant each get their own folder."""
    first, second = runs.new_run_dir(str(tmp_path), MODEL), runs.new_run_dir(str(tmp_path), MODEL)
    assert os.path.basename(second) == "001-DiT-Digits-2" and os.path.isdir(os.path.join(second, "checkpoints"))
    os.rmdir(os.path.join(first, "checkpoints"))
    os.rmdir(first)
    assert os.path.basename(runs.new_run_dir(str(tmp_path), MODEL)) == "002-DiT-Digits-2"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: runs.new_run_dir(str(tmp_path / "race"), MODEL), range(8)))
    assert len(set(made)) == 8 and sorted(os.listdir(tmp_path / "race")) == sorted(map(os.path.basename, made))
    (tmp_path / "file").write_text("")
    with pytest.raises(runs.RunError, match="--results-dir .*file/results: cannot create a run folder there"):
        runs.new_run_dir(str(tmp_path / "file" / "results"), MODEL)


def test_resume_from_a_file_continues_only_the_latest_of_its_own_run(tmp_path):
    """The latest checkpoint of a run in --results-dir (or with none given) continues that run; an earlier
    one, or another --results-dir, branches into a new folder recording the parent."""
    run = str(tmp_path / "000-DiT-Digits-2")
    early, latest = checkpoint(run, 2), checkpoint(run, 4)
    notes = []
    assert runs.place_run(latest, None, MODEL, notes) == (run, None)
    assert runs.place_run(latest, str(tmp_path), MODEL, notes) == (run, None) and notes == []
    branch, parent = runs.place_run(early, None, MODEL, notes)
    assert os.path.basename(branch) == "001-DiT-Digits-2" and parent == early
    assert "branching from" in notes[-1] and "not its run's latest checkpoint" in notes[-1]
    other, parent = runs.place_run(latest, str(tmp_path / "elsewhere"), MODEL, notes)
    assert os.path.dirname(other) == str(tmp_path / "elsewhere") and parent == latest
    assert "--results-dir names another folder" in notes[-1]
    loose = str(tmp_path / "loose.pt")  # a checkpoint outside any run folder
    torch.save({}, loose)
    assert runs.place_run(loose, None, MODEL, notes)[1] == loose
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000002.pt", "0000004.pt"]


def test_resume_auto_takes_the_newest_good_checkpoint_of_the_newest_run(tmp_path):
    old, new = str(tmp_path / "000-DiT-Digits-2"), str(tmp_path / "001-DiT-Digits-2")
    checkpoint(old, 8)
    good = checkpoint(new, 2)
    open(checkpoint(new, 6), "wb").close()  # emptied, as by a full disk or a killed copy
    checkpoint(new, 4, ema={"w": torch.tensor([1.0, math.nan])})  # written before non-finite weights were refused
    os.makedirs(tmp_path / "002-DiT-Digits-2" / "checkpoints")  # a run killed before its first checkpoint
    os.makedirs(tmp_path / "003-DiT-S-2" / "checkpoints")  # another model's
    leftover = os.path.join(new, "checkpoints", "0000008.pt.tmp999999999")  # a killed save's temporary file
    open(leftover, "wb").close()
    run = runs.open_run("auto", str(tmp_path), MODEL, vet=lambda ckpt, path: ["vetted"])
    with run.log:
        assert (run.dir, run.ckpt_path, run.ckpt["step"], run.parent) == (new, good, 2, None)
        assert "the file is empty" in run.notes[0] and "ema): w is not finite" in run.notes[1]
        assert run.notes[2] == "vetted" and not os.path.exists(leftover)
        assert run.notes[3].startswith(f"continuing {new}") and "0000008.pt.tmp999999999" in run.notes[3]
    for name in ("0000002.pt", "0000004.pt"):
        os.remove(os.path.join(new, "checkpoints", name))
    with pytest.raises(runs.RunError, match="no good checkpoint in .*001-DiT-Digits-2"):
        runs.open_run("auto", str(tmp_path), MODEL, vet=lambda ckpt, path: [])
    fresh = runs.open_run("auto", str(tmp_path / "empty"), MODEL, vet=None)  # nothing to resume: a new run
    fresh.log.close()
    assert fresh.ckpt is None and os.path.basename(fresh.dir) == "000-DiT-Digits-2"


def test_a_checkpoint_that_cannot_continue_a_run_is_refused(tmp_path):
    run = str(tmp_path / "000-DiT-Digits-2")
    for changes, message in [(dict(model={"w": torch.tensor([math.inf])}), r"\(model\): w is not finite"),
                             (dict(train_config={}), "its train_config is empty"),
                             (dict(rng_states=None), "no rng_states"),
                             (dict(step="7"), "no step")]:
        path = checkpoint(run, 1, **changes)
        with pytest.raises(CheckpointError, match=message):
            runs.open_run(path, None, MODEL, vet=None)
    with pytest.raises(runs.RunError, match="no such checkpoint file"):
        runs.open_run(str(tmp_path / "missing.pt"), None, MODEL, vet=None)
    assert not os.path.exists(tmp_path / "001-DiT-Digits-2")  # refused before any folder is made


def test_one_run_per_folder(tmp_path):
    """A second run on a held folder stops at once naming the holder; the lock goes with its holder, whether
    it closes its log or is killed."""
    path = checkpoint(str(tmp_path / "000-DiT-Digits-2"), 2)
    first = runs.open_run("auto", str(tmp_path), MODEL, vet=lambda ckpt, path: [])
    held = f"pid {os.getpid()} on host "
    for resume in ("auto", path):
        with pytest.raises(runs.RunError, match=f"000-DiT-Digits-2 is in use by another run \\({held}"):
            runs.open_run(resume, str(tmp_path), MODEL, vet=lambda ckpt, path: [])
    first.log.close()
    runs.open_run(path, None, MODEL, vet=lambda ckpt, path: []).log.close()

    holder = subprocess.Popen([sys.executable, "-c", "import runs, sys; lock = runs.RunLock(sys.argv[1]); "
                               "print('held', flush=True); sys.stdin.read()", first.dir],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runs.RunError, match=f"in use by another run \\(pid {holder.pid} on host "):
            runs.RunLock(first.dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    runs.RunLock(first.dir).close()

    outside = tmp_path / "outside.txt"  # a link planted where the lock goes is not written through
    outside.write_text("keep")
    os.remove(os.path.join(first.dir, runs.LOCK_FILE))
    os.symlink(outside, os.path.join(first.dir, runs.LOCK_FILE))
    with pytest.raises(runs.RunError, match="cannot take .*run.lock .*its own regular file"):
        runs.RunLock(first.dir)
    assert outside.read_text() == "keep"


def test_a_refused_checkpoint_makes_no_folder_and_releases_its_own(tmp_path):
    path = checkpoint(str(tmp_path / "000-DiT-Digits-2"), 2)

    def refuse(ckpt, path):
        raise runs.RunError("refused")

    for resume in (path, "auto"):
        with pytest.raises(runs.RunError, match="refused"):
            runs.open_run(resume, str(tmp_path), MODEL, vet=refuse)
    with pytest.raises(runs.RunError, match="refused"):
        runs.open_run(path, str(tmp_path / "elsewhere"), MODEL, vet=refuse)
    assert not os.path.exists(tmp_path / "elsewhere")  # refused before a branch's folder is made
    runs.RunLock(os.path.dirname(os.path.dirname(path))).close()


def test_flags_changed_on_resume_are_honoured_with_a_note_or_refused():
    saved = dict(lr=1e-4, global_batch_size=256, global_seed=0, max_grad_norm=0.0, max_steps=100, objective="ddpm",
                 time_sampling="uniform", repa_encoder=None)
    now = dict(saved, lr=1e-3, max_steps=200)
    assert runs.check_resumed_flags(saved, "c.pt", now) == [
        "--lr changed on resume: 0.0001 in c.pt, 0.001 from now on"]
    assert runs.check_resumed_flags({}, "c.pt", now) == []  # a flag its run did not have: nothing to compare
    # A checkpoint older than --objective was trained with DDPM: resuming it as a flow model is refused.
    with pytest.raises(runs.RunError, match=r"--objective flow: c.pt was trained with ddpm; resume with the same "
                                            r"\(the weights were trained to predict what it asks for\)"):
        runs.check_resumed_flags({}, "c.pt", dict(now, objective="flow"))
    with pytest.raises(runs.RunError, match="--repa-encoder enc: c.pt was trained with None"):
        runs.check_resumed_flags(saved, "c.pt", dict(now, repa_encoder="enc"))
    assert runs.check_resumed_flags(saved, "c.pt", dict(now, lr=1e-4, time_sampling="logit-normal")) == [
        "--time-sampling changed on resume: uniform in c.pt, logit-normal from now on"]
    with pytest.raises(runs.RunError, match=r"--global-batch-size 8: c.pt was trained with 256; resume with the same"):
        runs.check_resumed_flags(saved, "c.pt", dict(now, global_batch_size=8))
    with pytest.raises(runs.RunError, match="--global-seed 1: c.pt was trained with 0"):
        runs.check_resumed_flags(saved, "c.pt", dict(now, global_seed=1))


def test_stats_written_then_read_back(tmp_path):
    """Records come back in order; a resumed run drops what was logged after its checkpoint, and a killed
    run's partial last line is left out. A line that is not a record is named."""
    run = str(tmp_path)
    with runs.RunLog(run, runs.RunLock(run)) as log:
        for step in (10, 20, 30):
            log.interval(dict(step=step, loss=1.0 / step, lr=1e-4), 30, 75)
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"step": 40, "lo')
    assert [r["step"] for r in runs.read_stats(run)] == [10, 20, 30]
    assert "step 0000020/30 loss 0.05 lr 0.0001 eta 0:01:15" in (tmp_path / "log.txt").read_text()
    with runs.RunLog(run, runs.RunLock(run), resumed_step=20) as log:
        log.interval(dict(step=30, loss=math.nan), 30, 0)
    records = runs.read_stats(run)
    assert [r["step"] for r in records] == [10, 20, 30] and math.isnan(records[-1]["loss"])
    assert runs.RunLog(run).stats_file is None  # not the main process: writes nothing
    for line, message in [("[1, 2]", "line 4 is not a stats record"), ('{"loss": 1}', "line 4 is not a stats"),
                          ('{"step": "5"}', "line 4 is not a stats"), ("{not json", "line 4 is not JSON")]:
        with open(tmp_path / "stats.jsonl", "w") as f:
            f.write("\n".join([json.dumps(dict(step=s)) for s in (1, 2, 3)] + [line]) + "\n")
        with pytest.raises(runs.RunError, match=message):
            runs.read_stats(run)


def test_unwritable_logs_are_one_line_errors(tmp_path):
    os.mkdir(tmp_path / "stats.jsonl")  # root ignores permissions: a folder in the file's place cannot be opened
    with pytest.raises(runs.RunError, match="cannot write the run's logs in .*Is a directory"):
        runs.RunLog(str(tmp_path), runs.RunLock(str(tmp_path)))
    runs.RunLock(str(tmp_path)).close()  # the failed RunLog released the lock


def test_reading_stats_loads_neither_torch_nor_accelerate():
    proc = subprocess.run([sys.executable, "-c", "import sys, plot_stats; print(sorted({'torch', 'accelerate'} "
                           "& set(sys.modules)))"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "[]\n", proc.stderr
