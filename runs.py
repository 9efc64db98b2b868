"""
A training run's folder, from its creation to the records programs read back:

    results/NNN-<model>/
        run.lock         held (flock) by the run's main process for its lifetime: one run per folder
        log.txt          for people (also printed)
        stats.jsonl      for programs: one JSON object per log interval (runs.read_stats)
        checkpoints/     SSSSSSS.pt, written by checkpoints.save_checkpoint

    from runs import read_stats
    losses = [r["loss"] for r in read_stats("results/000-DiT-S-2")]

A new run always gets a new folder. `--resume` continues a run in its own folder when it starts from
that run's latest checkpoint; from an earlier checkpoint, or with another --results-dir, it branches
into a new folder that records its parent, so no later checkpoint of the original run is ever
overwritten (`place_run`). Here too: what a resumed run does with a changed flag (REFUSED_ON_RESUME,
HONOURED_ON_RESUME), which images each step sees (EpochBatches), what a step that is not finite does
(NonFinite), and the figures of a log interval (Interval). This module imports neither torch nor
accelerate, so reading stats is quick (checkpoints, which needs torch, is imported where one is read).
"""
import dataclasses
import fcntl
import json
import logging
import math
import os
import random
import re
import socket
import sys
import time

from files import DiskFullError, UserError, atomic_write, sweep_temp_files

LOCK_FILE = "run.lock"


class RunError(UserError, ValueError):
    """A run folder that cannot be created, continued or written, or that another run holds."""


def run_tag(model_name):
    """The folder name's model part: DiT-S/2 -> DiT-S-2."""
    return model_name.replace("/", "-")


def new_run_dir(results_dir, model_name):
    """Create `<results_dir>/NNN-<model>` with NNN one past the highest number there, exclusively: a run
    started at the same instant gets the next number, and no run ever lands in another's folder."""
    try:
        os.makedirs(results_dir, exist_ok=True)
        while True:
            taken = [int(m.group(1)) for name in os.listdir(results_dir) if (m := re.match(r"^(\d{3,})-", name))]
            path = os.path.join(results_dir, f"{max(taken, default=-1) + 1:03d}-{run_tag(model_name)}")
            try:
                os.mkdir(path)
                os.mkdir(os.path.join(path, "checkpoints"))
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise RunError(f"--results-dir {results_dir}: cannot create a run folder there ({e.strerror})") from e


def latest_run(results_dir, model_name):
    """--resume auto's run: the highest-numbered run folder of model_name that holds checkpoints, or None."""
    from checkpoints import checkpoint_files

    if not os.path.isdir(results_dir):
        return None
    names = [r for r in os.listdir(results_dir) if re.match(rf"^\d{{3,}}-{re.escape(run_tag(model_name))}$", r)]
    for run in sorted(names, key=lambda r: int(r.split("-", 1)[0]), reverse=True):
        if checkpoint_files(os.path.join(results_dir, run, "checkpoints")):
            return os.path.join(results_dir, run)
    return None


def read_resumable(path):
    """A checkpoint to continue training from: readable, and with finite weights.
    :raises CheckpointError: naming the file and what is wrong."""
    from checkpoints import CheckpointError, read_checkpoint, require_finite

    ckpt = read_checkpoint(path)
    kinds = dict(model=dict, ema=dict, opt=dict, scheduler=dict, train_config=dict, step=int, rng_states=list)
    wrong = [k for k, kind in kinds.items() if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), kind)]
    if wrong:
        raise CheckpointError(f"{path} is not a checkpoint of this train.py: no {wrong[0]} "
                              f"({kinds[wrong[0]].__name__})")
    if not ckpt["train_config"]:
        raise CheckpointError(f"{path} is not a checkpoint of this train.py: its train_config is empty")
    require_finite(ckpt["model"], f"{path} (model)")
    require_finite(ckpt["ema"], f"{path} (ema)")
    return ckpt


def newest_good_checkpoint(run_dir, notes):
    """
    The newest checkpoint of run_dir that read_resumable accepts; a damaged one (killed mid-copy,
    emptied, non-finite) is skipped with a note. :return: (path, data).
    :raises RunError: when none is good.
    """
    from checkpoints import CheckpointError, checkpoint_files

    files = checkpoint_files(os.path.join(run_dir, "checkpoints"))
    for step in sorted(files, reverse=True):
        try:
            return files[step], read_resumable(files[step])
        except CheckpointError as e:
            notes.append(f"skipping a damaged checkpoint: {e}")
    raise RunError(f"--resume auto: no good checkpoint in {run_dir}")


def place_run(ckpt_path, results_dir, model_name, notes):
    """
    Where a run that starts from a checkpoint file writes, by the rule in this module's docstring.

    :param ckpt_path: the --resume path; results_dir: --results-dir (None: the checkpoint's own).
    :return: (run folder, parent checkpoint or None): the checkpoint's own folder, or a new one.
    """
    from checkpoints import checkpoint_files

    ckpt_dir = os.path.dirname(os.path.abspath(ckpt_path))
    own_run = os.path.dirname(ckpt_dir)
    files = checkpoint_files(ckpt_dir)
    latest = (os.path.basename(ckpt_dir) == "checkpoints" and bool(files)
              and os.path.samefile(files[max(files)], ckpt_path))
    here = results_dir is None or (os.path.isdir(results_dir)
                                   and os.path.samefile(results_dir, os.path.dirname(own_run)))
    if latest and here:
        return own_run, None
    why = "it is not its run's latest checkpoint" if not latest else "--results-dir names another folder"
    notes.append(f"branching from {os.path.abspath(ckpt_path)} into a new run, as {why}; "
                 f"the parent's checkpoints are left as they are")
    return new_run_dir(results_dir or os.path.dirname(own_run), model_name), os.path.abspath(ckpt_path)


@dataclasses.dataclass
class Run:
    """A run folder held for a run's lifetime, and the checkpoint the run starts from."""

    dir: str
    log: "RunLog"  # the folder's logs; on the main process it also holds the folder's lock
    ckpt_path: str = None
    ckpt: dict = None
    parent: str = None  # the checkpoint a branched run starts from
    notes: list = dataclasses.field(default_factory=list)  # what was decided, for the log


def open_run(resume, results_dir, model_name, vet, is_main=True, share=lambda obj: obj):
    """
    Decide where a run writes and what it starts from, take the folder's lock and open its logs, on the
    main process; every process gets its answer, or its error, so none is left waiting for the others.

    :param resume: --resume (None, "auto" or a checkpoint path); results_dir: --results-dir or None.
    :param vet: vet(ckpt, path) -> notes to log; raises a UserError for a checkpoint this run cannot continue.
    :param share: share(obj) returns the main process's obj on every process (a broadcast).
    :return: a Run (its log is a context manager: closing it releases the folder).
    :raises UserError: no such checkpoint, none good, another run holds the folder, a refused flag.
    """
    run, lock, error = None, None, None
    if is_main:
        try:
            run, lock = decide(resume, results_dir, model_name, vet)
            run.log = RunLog(run.dir, lock, resumed_step=run.ckpt["step"] if run.ckpt else None)
        except UserError as e:
            if lock is not None:
                lock.close()
            error = e
    message, decided = share((error and str(error), run and (run.dir, run.ckpt_path, run.parent)))
    if error is not None:
        raise error
    if message is not None:
        raise RunError(message)
    if is_main:
        return run
    from checkpoints import read_checkpoint

    run_dir, ckpt_path, parent = decided
    return Run(run_dir, RunLog(run_dir), ckpt_path, ckpt_path and read_checkpoint(ckpt_path), parent)


def decide(resume, results_dir, model_name, vet):
    """open_run's choice, on the main process; a checkpoint is vetted before any folder is made.
    :return: (Run without its log, the RunLock taken)."""
    notes, results_dir_or_default = [], results_dir or "results"
    if resume == "auto" and (found := latest_run(results_dir_or_default, model_name)):
        lock = RunLock(found)  # before reading: a run still writing this folder stops us here
        try:
            path, ckpt = newest_good_checkpoint(found, notes)
            notes += vet(ckpt, path)
        except UserError:
            lock.close()
            raise
        return Run(found, None, path, ckpt, notes=notes + continuing(found, path)), lock
    if resume and resume != "auto":
        if not os.path.isfile(resume):
            raise RunError(f"--resume {resume}: no such checkpoint file")
        ckpt = read_resumable(resume)
        notes += vet(ckpt, resume)
        run_dir, parent = place_run(resume, results_dir, model_name, notes)
        lock = RunLock(run_dir)
        return Run(run_dir, None, resume, ckpt, parent, notes + ([] if parent else continuing(run_dir, resume))), lock
    run_dir = new_run_dir(results_dir_or_default, model_name)
    return Run(run_dir, None, notes=notes), RunLock(run_dir)


def continuing(run_dir, ckpt_path):
    """Continue run_dir (its lock held): remove a killed save's temporary files. :return: the notes to log."""
    swept = sweep_temp_files(os.path.join(run_dir, "checkpoints"))
    return [f"continuing {run_dir} from its latest checkpoint {ckpt_path}"
            + (f"; removed the temporary files of a killed save: {', '.join(swept)}" if swept else "")]


class EpochBatches:
    """
    Which images each step of a run sees, so that a resumed run continues exactly (a DataLoader's
    batch_sampler): global batch s of epoch e is items perm[s*G:(s+1)*G] of a permutation drawn from
    (seed, e), and process r takes its r-th slice of B = G / world items. The tail that does not fill
    a global batch is dropped, as DiT's drop_last. A resumed run starts at batch `start` of the epoch.
    """

    def __init__(self, size, global_batch, rank, world, seed):
        self.size, self.global_batch, self.rank, self.world, self.seed = size, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.size // self.global_batch - self.start

    def __iter__(self):
        perm = random.Random(self.seed * 1_000_003 + self.epoch).sample(range(self.size), self.size)
        for s in range(self.start, self.size // self.global_batch):
            lo = s * self.global_batch + self.rank * self.local_batch
            yield perm[lo:lo + self.local_batch]


# What --resume does with a flag whose value differs from the checkpoint's run (its train_config):
# refused, as they fix which images each step sees: continued with another value, it is not that run;
REFUSED_ON_RESUME = {"global_batch_size": "it fixes which images each step sees",
                     "global_seed": "it fixes which images each step sees",
                     "objective": "the weights were trained to predict what it asks for",
                     "repa_encoder": "the REPA projector was trained for its features",
                     "repa_depth": "the REPA projector was trained on that block's tokens",
                     "repa_projector_dim": "it is the REPA projector's shape"}
# honoured from the resumed step on, with a log line: how each step updates the weights and the EMA,
# how a step is split into micro-batches, its precision and flips. train.py applies them: the optimizer
# and schedule take --lr and --warmup-steps (train.restore), the rest is read from the flags each step.
HONOURED_ON_RESUME = ("lr", "warmup_steps", "max_grad_norm", "ema_decay", "ema_warmup", "on_nonfinite",
                      "gradient_accumulation_steps", "mixed_precision", "flip", "time_sampling", "repa_coeff")
# Refused flags newer than some checkpoints, with the value such a checkpoint's run had (REPA's other flags
# mean nothing without its encoder).
ADDED_FLAGS = dict(objective="ddpm", repa_encoder=None)
# The rest say how long, where and how often to log or save; the model and the store are checked
# against the checkpoint by checkpoints.check_compatible (class_dropout_prob is in its model_config).


def check_resumed_flags(train_config, path, flags):
    """
    :param train_config: the flags of the checkpoint's run; flags: this run's (vars(args)).
    :return: a note for each honoured flag that changed.
    :raises RunError: a refused flag changed (naming it, with both values).
    """
    train_config = {**ADDED_FLAGS, **train_config}
    for key, why in REFUSED_ON_RESUME.items():
        if key in train_config and train_config[key] != flags[key]:
            raise RunError(f"--{key.replace('_', '-')} {flags[key]}: {path} was trained with "
                           f"{train_config[key]}; resume with the same ({why})")
    return [f"--{key.replace('_', '-')} changed on resume: {train_config[key]} in {path}, {flags[key]} from now on"
            for key in HONOURED_ON_RESUME if key in train_config and train_config[key] != flags[key]]


class Interval:
    """One log interval's figures for stats.jsonl, summed from its steps' global figures (train.train_step)."""

    def __init__(self, aligned=False):
        """:param aligned: the run has REPA's alignment loss, which the record reports as repa_loss."""
        self.loss_sums, self.samples, self.align_sums = [0.0] * 4, [0.0] * 4, [0.0] * 4  # per timestep quartile
        self.grad_norm_sum, self.steps, self.skipped, self.start = 0.0, 0, 0, time.time()
        self.aligned = aligned

    def add(self, grad_norm, loss_sums, samples, align_sums=(0.0,) * 4):
        self.grad_norm_sum += grad_norm
        self.loss_sums = [a + b for a, b in zip(self.loss_sums, loss_sums)]
        self.samples = [a + b for a, b in zip(self.samples, samples)]
        self.align_sums = [a + b for a, b in zip(self.align_sums, align_sums)]
        self.steps += 1

    def record(self, images_per_step, quartiles=False):
        """:return: the mean loss and gradient norm of the steps taken (NaN if none was), the speed over all
        steps, the count of skipped steps, and with `quartiles` the mean loss per timestep quartile."""
        seconds, steps = time.time() - self.start, self.steps + self.skipped
        record = dict(loss=mean(sum(self.loss_sums), sum(self.samples)), grad_norm=mean(self.grad_norm_sum, self.steps),
                      steps_per_s=steps / seconds, images_per_s=steps * images_per_step / seconds,
                      skipped_steps=self.skipped)
        if self.aligned:  # the denoising loss stays `loss`, comparable with runs without REPA
            record["repa_loss"] = mean(sum(self.align_sums), sum(self.samples))
        if quartiles:
            record.update({f"loss_q{i}": mean(self.loss_sums[i], self.samples[i]) for i in range(4)})
        return record


def mean(total, count):
    return total / count if count else math.nan


# --on-nonfinite skip stops after this many skipped steps in a row. A skipped step leaves the weights as
# they were and the next one draws a new batch, timesteps and noise: a passing spike clears within a
# step or two, while weights that give no finite step for this many fresh batches will not recover.
MAX_SKIPS_IN_A_ROW = 10


@dataclasses.dataclass
class NonFinite:
    """
    What a run does about a step whose loss or gradient norm is not finite (train.py never lets one reach
    the weights): policy "stop" stops the run at the first, "skip" skips up to MAX_SKIPS_IN_A_ROW in a
    row. Stopping names the last good checkpoint, the one to resume from.
    """

    policy: str  # --on-nonfinite
    last_good: str = None  # the latest finite checkpoint of this run, or the one it started from
    in_a_row: int = 0

    def skip(self, step, grad_norm, loss_sums, samples):
        """Account for a step not taken (its global figures as train.train_step gives them).
        :return: the note to log. :raises RunError: the run stops instead."""
        self.in_a_row += 1
        why = (f"step {step}: the loss or the gradient norm is not finite "
               f"(loss {mean(sum(loss_sums), sum(samples)):.4g}, gradient norm {grad_norm:.4g})")
        if self.policy == "stop":
            raise self.stop(why + " (--on-nonfinite skip would skip such steps)")
        if self.in_a_row > MAX_SKIPS_IN_A_ROW:
            raise self.stop(f"{why}, {self.in_a_row} skipped steps in a row")
        return f"{why}: skipped ({self.in_a_row} in a row)"

    def stop(self, why):
        """The error that stops a diverged run, pointing at the checkpoint to go back to."""
        then = f"{self.last_good}: resume from it" if self.last_good else "none (no checkpoint yet): start again"
        return RunError(f"{why}; the run stopped, its last good checkpoint is {then} with a lower --lr or with "
                        f"--max-grad-norm")


class RunLock:
    """
    The run folder's lock file, held with flock while the run lives: a second run on the same folder
    (two `--resume auto` started together, a requeued job overlapping the old one) stops at once. The
    OS releases a flock when its holder ends, however it ends (killed too), so no lock is ever stale.
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_FILE)
        try:  # never through a link: taking the lock truncates the file
            self.file = open(self.path, "a+", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW, 0o666))
        except OSError as e:
            raise RunError(f"cannot take {self.path} ({e.strerror}): a run folder's lock is its own regular file; "
                           f"remove what is there and rerun") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "a process that has not written its name yet"
            self.file.close()
            raise RunError(f"{run_dir} is in use by another run ({holder} holds {self.path}); wait for it "
                           f"to end, or start this one elsewhere") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        self.file.flush()

    def close(self):
        self.file.close()


class RunLog:
    """
    log.txt and stdout for people, stats.jsonl for programs. The main process writes them and holds the
    run's lock; the others stay silent. A context manager: closing releases the files and the lock.
    """

    def __init__(self, run_dir, lock=None, resumed_step=None):
        self.lock, self.stats_file = lock, None
        self.logger = logging.getLogger("train")
        self.logger.handlers.clear()
        self.logger.propagate = False
        if lock is None:
            self.logger.addHandler(logging.NullHandler())
            return
        stats_path = os.path.join(run_dir, "stats.jsonl")
        try:
            if resumed_step is not None and os.path.exists(stats_path):
                # Intervals logged after the checkpoint by a run that was killed are trained again: drop them.
                kept = [json.dumps(r) + "\n" for r in read_stats(run_dir) if r["step"] <= resumed_step]
                with atomic_write(stats_path, "w") as f:
                    f.writelines(kept)
            self.stats_file = open(stats_path, "a")
            handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(run_dir, "log.txt"))]
        except (OSError, RunError) as e:
            self.close()
            if isinstance(e, (RunError, DiskFullError)):
                raise
            raise RunError(f"cannot write the run's logs in {run_dir}: {e}") from e
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in handlers:
            handler.setFormatter(fmt)
            self.logger.addHandler(handler)
        self.logger.setLevel(logging.INFO)

    def info(self, message):
        self.logger.info(message)

    def interval(self, record, max_steps, eta_seconds):
        """One log interval: a line for people, the record for programs (stats.jsonl)."""
        s = int(eta_seconds)
        figures = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
        self.info(f"step {record['step']:07d}/{max_steps} {figures} eta {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}")
        if self.stats_file is not None:
            self.stats_file.write(json.dumps(record) + "\n")
            self.stats_file.flush()

    def close(self):
        for handler in self.logger.handlers:
            handler.close()
        self.logger.handlers.clear()
        if self.stats_file is not None:
            self.stats_file.close()
        if self.lock is not None:
            self.lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_stats_lines(path):
    """The complete lines of a stats.jsonl (a run killed mid-write may leave a partial last line)."""
    with open(path) as f:
        return [line for line in f if line.endswith("\n")]


def read_stats(run_dir):
    """
    :return: the records of a run's stats.jsonl, in order: dicts with an integer `step`.
    :raises RunError: a line that is not such a record (naming the line).
    """
    path = os.path.join(run_dir, "stats.jsonl")
    records = []
    for number, line in enumerate(read_stats_lines(path), 1):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise RunError(f"{path} line {number} is not JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            raise RunError(f"{path} line {number} is not a stats record (an object with an integer step)")
        records.append(record)
    return records

