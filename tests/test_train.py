"""train.py on tiny stores: the loss falls, checkpoint files and contents, exact resume, a diverged run,
flags changed on resume, one run per folder, two processes under torchrun on the CPU, the refusals, and
the accelerate configs. Tests that only need a finished run share one (`trained`)."""
import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import extract_features  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from conftest import REPA_ENCODER, extract_args, randomize  # noqa: E402

MODEL = "DiT-Digits/2"  # depth 6, width 192: on the 4x8x8 test latents a step takes milliseconds


def run(store, results, *extra):
    """train.main in this process with the CLI's parsing; returns the experiment folder."""
    # accelerate keeps one process-wide state and refuses another mixed precision in the same process.
    AcceleratorState._reset_state(True)
    _, args = train.parse_args(["--features-path", store, "--results-dir", str(results), "--model", MODEL,
                                "--global-batch-size", "4", "--num-workers", "0", "--no-progress", *extra])
    return train.main(args)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def log_stats(exp):
    """{step: record} from the run's stats.jsonl."""
    return {record["step"]: record for record in runs.read_stats(exp)}


def log_text(exp):
    with open(os.path.join(exp, "log.txt")) as f:
        return f.read()


def tensors_equal(a, b):
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread in this process: on the test machine's 2 shared cores, two threads wait on each other
    (a 6-step run measured 4-7x slower with 2 than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory, image_folder):
    """image_folder stored as 3x6x6 pixels: 6 is not divisible by the patch of a /4 model."""
    path = str(tmp_path_factory.mktemp("stores") / "px6")
    extract_features.main(extract_args(data_path=image_folder[0], features_path=path, vae="none", image_size=6,
                                       dtype="float32"))
    return path


def test_epoch_batches_split_each_global_batch_over_processes():
    """Process r takes the r-th slice of every global batch; together they cover a permutation of the
    data, which depends only on (seed, epoch); a resumed epoch continues with the same batches."""
    full = [list(runs.EpochBatches(10, 4, 0, 1, seed=3).__iter__())]
    per_rank = []
    for rank in range(2):
        s = runs.EpochBatches(10, 4, rank, 2, seed=3)
        per_rank.append(list(s))
        assert len(s) == 2 and all(len(b) == 2 for b in per_rank[-1])
    for step, batch in enumerate(full[0]):
        assert per_rank[0][step] + per_rank[1][step] == batch
    used = [i for b in full[0] for i in b]
    assert len(set(used)) == 8 and set(used) <= set(range(10))
    later = runs.EpochBatches(10, 4, 0, 1, seed=3)
    later.set_epoch(1)
    assert list(later) != full[0]
    later.set_epoch(0, start=1)
    assert list(later) == full[0][1:]


@pytest.fixture(scope="module")
def trained(one_torch_thread, latent_store, tmp_path_factory):
    """One finished run (bf16, high learning rate, 30 steps, tensorboard) for the tests that only need a run."""
    return run(latent_store, tmp_path_factory.mktemp("trained"), "--max-steps", "30", "--lr", "2e-3", "--log-every",
               "10", "--ckpt-every", "5", "--ckpt-keep-last", "2", "--ckpt-keep-every", "10", "--ema-warmup",
               "--log-quartiles", "--report-to", "tensorboard")


def test_trains_bf16_loss_falls_and_checkpoints(trained, latent_store):
    """Default bf16 on the tiny store with a high learning rate: the global mean loss (in the log) falls;
    checkpoints are written atomically, pruned to the latest 2 plus multiples of 10, and hold
    everything a sampler and a resumed run need."""
    exp = trained
    assert os.path.basename(exp) == "000-DiT-Digits-2"
    stats = log_stats(exp)
    assert sorted(stats) == [10, 20, 30] and [s["epoch"] for s in stats.values()] == [4, 9, 14]
    assert all(np.isfinite(list(s.values())).all() for s in stats.values())
    assert stats[30]["loss"] < 0.5 * stats[10]["loss"], stats
    assert stats[30]["lr"] == pytest.approx(2e-3) and stats[30]["images_per_s"] > 0
    assert stats[30]["tflops_per_device"] > 0 and {"loss_q0", "loss_q3", "grad_norm"} <= stats[30].keys()
    assert stats[30]["skipped_steps"] == 0 and stats[30]["images_per_s"] == pytest.approx(4 * stats[30]["steps_per_s"])

    files = sorted(os.listdir(os.path.join(exp, "checkpoints")))
    assert files == ["0000010.pt", "0000020.pt", "0000025.pt", "0000030.pt"]
    ckpt = load(os.path.join(exp, "checkpoints", "0000030.pt"))
    assert ckpt["step"] == 30 and ckpt["parent"] is None
    meta = train.LatentDataset(latent_store).meta
    assert ckpt["latents"] == meta
    assert ckpt["model_config"] == dict(model=MODEL, input_size=8, in_channels=4, num_classes=3, learn_sigma=True,
                                        class_dropout_prob=0.1)
    assert ckpt["train_config"]["lr"] == 2e-3 and ckpt["train_config"]["mixed_precision"] == "bf16"
    assert "mixed precision bf16 (from train.py's default)" in log_text(exp)
    assert len(ckpt["rng_states"]) == 1
    # model and ema load strictly into the model the config describes, as in DiT's checkpoints.
    cfg = {k: v for k, v in ckpt["model_config"].items() if k != "model"}
    for key in ("model", "ema"):
        net = models.DiT_models[MODEL](**cfg)
        net.load_state_dict(ckpt[key], strict=True)
        assert all(v.dtype == torch.float32 for v in ckpt[key].values())  # float32 master weights and EMA
    assert not torch.equal(ckpt["model"]["final_layer.linear.weight"], ckpt["ema"]["final_layer.linear.weight"])
    assert set(ckpt["opt"]) == {"state", "param_groups"} and ckpt["opt"]["state"]
    # The sampling scripts' loader reads it as one of ours, EMA weights and config included.
    loaded = checkpoints.load_checkpoint(os.path.join(exp, "checkpoints", "0000030.pt"))
    assert loaded.config["model"] == MODEL and loaded.config["input_size"] == 8
    assert torch.equal(loaded.state_dict["y_embedder.embedding_table.weight"],
                       ckpt["ema"]["y_embedder.embedding_table.weight"])


def test_resume_equals_uninterrupted_run_and_accumulation_gives_the_same_update(latent_store, tmp_path):
    """float32 on the CPU, 2 accumulated micro-batches: 3 steps, then --resume auto to 7 (from mid-epoch,
    over epoch boundaries) gives exactly the weights, EMA, optimizer state and RNG states of 7
    uninterrupted steps, and stats.jsonl holds each step once. The global batch of 4 in 1, 2 or 4
    micro-batches: the same draws per sample, so the same weights up to float32 summation order."""
    common = ["--mixed-precision", "no", "--ckpt-every", "100", "--log-every", "1", "--lr", "1e-3"]
    whole = run(latent_store, tmp_path / "a", *common, "--gradient-accumulation-steps", "2", "--max-steps", "7")
    first = run(latent_store, tmp_path / "b", *common, "--gradient-accumulation-steps", "2", "--max-steps", "3")
    after3 = {2: load(os.path.join(first, "checkpoints", "0000003.pt"))}
    resumed = run(latent_store, tmp_path / "b", *common, "--gradient-accumulation-steps", "2", "--max-steps", "7",
                  "--resume", "auto")
    assert resumed == first
    a = load(os.path.join(whole, "checkpoints", "0000007.pt"))
    b = load(os.path.join(resumed, "checkpoints", "0000007.pt"))
    for key in ("model", "ema", "opt", "scheduler", "rng_states"):
        assert tensors_equal(a[key], b[key]), key
    assert log_stats(whole)[7]["loss"] == log_stats(resumed)[7]["loss"]
    assert [r["step"] for r in runs.read_stats(resumed)] == list(range(1, 8))
    assert f"continuing {resumed} from its latest checkpoint" in log_text(resumed)

    for n in (1, 4):
        exp = run(latent_store, tmp_path / str(n), *common, "--gradient-accumulation-steps", str(n), "--max-steps", "3")
        after3[n] = load(os.path.join(exp, "checkpoints", "0000003.pt"))
        assert f"in {n} micro-batch(es)" in log_text(exp)
    for n in (2, 4):
        for key in ("model", "ema"):
            for name, value in after3[1][key].items():
                torch.testing.assert_close(after3[n][key][name], value, rtol=1e-5, atol=1e-6)
    assert (after3[1]["model"]["final_layer.linear.weight"] != 0).any()  # adaLN-Zero starts it at 0: the update is real
    with pytest.raises(train.TrainError, match="not divisible by the 1 processes x 3 micro-batches"):
        run(latent_store, tmp_path / "3", "--max-steps", "1", "--gradient-accumulation-steps", "3")


def test_precision_comes_from_the_flag_then_accelerate_then_bf16(monkeypatch):
    def precision(*argv):
        AcceleratorState._reset_state(True)
        return train.make_accelerator(train.parse_args(["--features-path", "store", *argv])[1])[1:]

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch --mixed_precision no sets
    assert precision() == ("no", "accelerate launch / accelerate config")
    assert precision("--mixed-precision", "bf16") == ("bf16", "--mixed-precision")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp9")
    with pytest.raises(train.TrainError, match="mixed precision fp9 .from accelerate launch / accelerate config.: "
                                               "Unknown mixed_precision mode"):
        precision()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert precision() == ("bf16", "train.py's default")


def test_a_diverged_run_keeps_its_good_checkpoints(pixel_store, tmp_path, monkeypatch):
    """The issue's reproduction, shortened: a learning rate that blows the weights up. A non-finite step stops
    the run naming the last good checkpoint, which pruning kept; non-finite weights are never saved; with
    --on-nonfinite skip the steps are skipped and counted, up to runs.MAX_SKIPS_IN_A_ROW in a row."""
    base = ["--mixed-precision", "no", "--ckpt-every", "1", "--ckpt-keep-last", "1", "--log-every", "5"]

    def overflowing_step(accelerator, training, *args, **kwargs):  # a finite step whose update overflows a weight
        figures = real_step(accelerator, training, *args, **kwargs)
        training.params[0].data[0] = math.inf
        return figures

    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", overflowing_step)
    with pytest.raises(runs.RunError, match="step 1's weights: pos_embed is not finite .*; the run stopped, its last "
                                            "good checkpoint is none"):
        run(pixel_store, tmp_path / "inf", *base, "--max-steps", "2")
    assert checkpoints.checkpoint_files(str(tmp_path / "inf" / "000-DiT-Digits-2" / "checkpoints")) == {}
    monkeypatch.undo()

    exp = str(tmp_path / "huge" / "000-DiT-Digits-2")
    good = os.path.join(exp, "checkpoints", "0000001.pt")
    with pytest.raises(runs.RunError, match=f"step 2: the loss or the gradient norm is not finite .*--on-nonfinite "
                                               f"skip would skip such steps.; the run stopped, its last good "
                                               f"checkpoint is {good}: resume from it with a lower --lr"):
        run(pixel_store, tmp_path / "huge", *base, "--lr", "1e30", "--max-steps", "4")
    assert sorted(checkpoints.checkpoint_files(os.path.join(exp, "checkpoints"))) == [1]
    ckpt = load(good)
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values())
    # A --vae none store (3 channels) builds a model with 3 input and 6 output channels.
    assert ckpt["model_config"]["in_channels"] == 3 and ckpt["model_config"]["input_size"] == 6
    assert ckpt["model"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 6

    monkeypatch.setattr(runs, "MAX_SKIPS_IN_A_ROW", 2)  # 10 by default
    with pytest.raises(runs.RunError, match=f"step 4: .*, 3 skipped steps in a row; the run stopped, its last good "
                                            f"checkpoint is {good}"):
        run(pixel_store, tmp_path / "huge", *base, "--lr", "1e30", "--max-steps", "100", "--ckpt-every", "100",
            "--log-every", "1", "--on-nonfinite", "skip", "--resume", "auto")
    text = log_text(exp)
    assert "--on-nonfinite changed on resume: stop in" in text and "--log-every" not in text  # only what changes a step
    assert "step 2: the loss or the gradient norm is not finite (loss nan" in text
    assert "skipped (1 in a row)" in text and "skipped (2 in a row)" in text
    records = log_stats(exp)
    assert [(s, r["skipped_steps"]) for s, r in records.items()] == [(2, 1), (3, 1)]
    assert math.isnan(records[3]["loss"]) and math.isnan(records[3]["grad_norm"])
    assert sorted(checkpoints.checkpoint_files(os.path.join(exp, "checkpoints"))) == [1]


def test_every_process_decides_on_the_global_figures(monkeypatch):
    """A non-finite loss on another process (simulated in the all-reduce) skips the step here too: the
    weights, the EMA and the optimizer state stay as they were, so no process waits for another."""
    AcceleratorState._reset_state(True)
    accelerator = train.Accelerator(cpu=True, mixed_precision="no")
    config = dict(model=MODEL, input_size=4, in_channels=3, num_classes=3, learn_sigma=True, class_dropout_prob=0.1)
    training = train.make_training(accelerator, config, lr=1e-3)
    objective = train.create_objective("ddpm")
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 2])
    assert train.train_step(accelerator, training, objective, x, y, float("inf"), 0.5)[0]  # a finite step is taken
    before = [p.detach().clone() for p in training.params + training.ema]
    other_process = torch.zeros(13, dtype=torch.float64)
    other_process[1] = math.nan  # its loss sum in the first timestep quartile
    monkeypatch.setattr(train, "reduce", lambda local, op: local + other_process)
    taken, grad_norm, loss_sums, samples, _ = train.train_step(accelerator, training, objective, x, y, float("inf"),
                                                               0.5)
    assert not taken and math.isfinite(grad_norm) and math.isnan(sum(loss_sums)) and sum(samples) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, training.params + training.ema))


def test_flags_changed_on_resume_are_honoured_or_refused(trained, latent_store, tmp_path):
    """A new --lr on resume is what the optimizer uses, what the log says and what the checkpoint records;
    a flag that fixes which images each step sees is refused."""
    latest = os.path.join(trained, "checkpoints", "0000030.pt")
    with pytest.raises(runs.RunError, match=f"--global-seed 1: {latest} was trained with 0; resume with the same"):
        run(latent_store, tmp_path, "--max-steps", "31", "--resume", latest, "--global-seed", "1")
    exp = run(latent_store, tmp_path, "--max-steps", "31", "--log-every", "1", "--resume", latest, "--lr", "1e-3")
    assert f"--lr changed on resume: 0.002 in {latest}, 0.001 from now on" in log_text(exp)
    assert "--results-dir names another folder" in log_text(exp)  # branched: the shared run is left as it was
    ckpt = load(os.path.join(exp, "checkpoints", "0000031.pt"))
    assert ckpt["parent"] == latest and ckpt["train_config"]["lr"] == 1e-3
    assert [g["lr"] for g in ckpt["opt"]["param_groups"]] == [1e-3] and log_stats(exp)[31]["lr"] == 1e-3


def test_one_run_per_folder(trained, latent_store):
    """A second run on a folder another run holds (two --resume auto started together) stops before any work."""
    lock = runs.RunLock(trained)
    try:
        for resume in ("auto", os.path.join(trained, "checkpoints", "0000030.pt")):
            with pytest.raises(runs.RunError, match=f"{trained} is in use by another run \\(pid {os.getpid()} on host"):
                run(latent_store, os.path.dirname(trained), "--max-steps", "40", "--resume", resume)
    finally:
        lock.close()
    assert sorted(checkpoints.checkpoint_files(os.path.join(trained, "checkpoints"))) == [10, 20, 25, 30]


def test_dit_image_flags_point_to_extract_features(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", "/data/imagenet/train", "--image-size", "512", "--vae", "mse",
                          "--num-classes", "1000", "--model", "DiT-XL/2"])
    err = capsys.readouterr().err
    assert "--data-path --image-size --num-classes --vae: train.py trains from a latent store" in err
    assert ("python extract_features.py --data-path /data/imagenet/train --features-path features/imagenet512 "
            "--image-size 512 --vae mse") in err
    extract_features.parse_args(["--data-path", "/data/imagenet/train", "--features-path", "features/imagenet512",
                                 "--image-size", "512", "--vae", "mse"])  # the command it gives parses


def test_tensorboard_event_file_holds_the_logged_figures(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []
    for events in glob.glob(os.path.join(trained, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events).Reload()  # the scalars' file; the hparams (flags) have their own
        if "loss" in acc.Tags()["scalars"]:
            logged += [(e.step, e.value) for e in acc.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in runs.read_stats(trained)]
    assert [s for s, _ in logged] == [s for s, _ in expected] == [10, 20, 30]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_two_processes_under_torchrun_share_the_work(latent_store, tmp_path):
    """torchrun on a machine without CUDA: 2 cooperating gloo processes, each with half of every global
    batch and its own RNG, ending with identical weights (train.py compares them and logs it). On a CPU,
    an accelerate config asking for FSDP (ACCELERATE_USE_FSDP, as configs/fsdp.yaml sets it) trains
    unsharded and says so."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--features-path", latent_store, "--results-dir", str(tmp_path),
           "--model", MODEL, "--global-batch-size", "4", "--max-steps", "4", "--log-every", "2",
           "--num-workers", "0", "--no-progress"]
    fsdp = {} if torch.cuda.is_available() else {"ACCELERATE_USE_FSDP": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **fsdp})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "2 process(es) (MULTI_CPU)" in out and "2 images per process per step" in out
    assert "weights identical on all 2 processes" in out
    assert out.count("saved checkpoint") == 1  # logs and files from rank 0 only
    if fsdp:
        assert "asks for FSDP, which accelerate runs on GPUs only: training without sharding (MULTI_CPU)" in out
    ckpt = load(glob.glob(os.path.join(str(tmp_path), "*", "checkpoints", "0000004.pt"))[0])
    assert len(ckpt["rng_states"]) == 2
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])


def test_refusals(trained, latent_store, pixel_store, tmp_path):
    """Each user error stops with a message that says what to change."""
    with pytest.raises(train.TrainError, match="patch must divide the latent size"):
        run(pixel_store, tmp_path, "--model", "DiT-S/4", "--max-steps", "1")
    with pytest.raises(train.TrainError, match="not a latent store"):
        run(str(tmp_path), tmp_path, "--max-steps", "1")
    with pytest.raises(train.TrainError, match="fewer than --global-batch-size"):
        run(latent_store, tmp_path, "--max-steps", "1", "--global-batch-size", "64")
    with pytest.raises(train.TrainError, match="pip install wandb"):
        run(latent_store, tmp_path, "--max-steps", "1", "--report-to", "wandb")
    with pytest.raises(runs.RunError, match="no such checkpoint"):
        run(latent_store, tmp_path, "--max-steps", "1", "--resume", str(tmp_path / "missing.pt"))

    ckpt = os.path.join(trained, "checkpoints", "0000030.pt")
    with pytest.raises(checkpoints.CheckpointError, match="another model .*: checkpoint 'DiT-Digits/2', now 'DiT-S/8'"):
        run(latent_store, tmp_path, "--model", "DiT-S/8", "--max-steps", "2", "--resume", ckpt)
    with pytest.raises(runs.RunError, match="--global-batch-size 2: .* was trained with 4; resume with the same"):
        run(latent_store, tmp_path, "--max-steps", "2", "--global-batch-size", "2", "--resume", ckpt)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(runs.RunError, match="--results-dir .*a_file/results: cannot create a run folder there"):
        run(latent_store, tmp_path / "a_file" / "results", "--max-steps", "1")  # root writes anywhere else
    # Crafted checkpoints: non-finite weights, an empty train_config, a bad RNG state.
    data = load(ckpt)
    for name, change, error, message in [
            ("nan.pt", dict(ema={**data["ema"], "pos_embed": data["ema"]["pos_embed"] * math.nan}),
             checkpoints.CheckpointError, r"nan.pt \(ema\): pos_embed is not finite"),
            ("empty.pt", dict(train_config={}), checkpoints.CheckpointError, "its train_config is empty"),
            ("rng.pt", dict(rng_states=[{"torch": torch.zeros(3, dtype=torch.uint8)}]), train.TrainError,
             "the checkpoint's RNG state of process 0 cannot be restored")]:
        torch.save({**data, **change}, tmp_path / name)
        with pytest.raises(error, match=message):
            run(latent_store, tmp_path / "crafted", "--max-steps", "31", "--resume", str(tmp_path / name))
    truncated = tmp_path / "truncated.pt"  # a copy cut short, as by a full disk
    with open(ckpt, "rb") as f:
        truncated.write_bytes(f.read(1000))
    with pytest.raises(checkpoints.CheckpointError, match="cannot read .*truncated.pt as a checkpoint"):
        run(latent_store, tmp_path, "--max-steps", "2", "--resume", str(truncated))
    # Same model shapes, other images: another store.
    other = tmp_path / "other_images"
    for cls in ("x", "y", "z"):
        os.makedirs(other / cls)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(other / cls / f"{i}.png")
    other_store = str(tmp_path / "other_store")
    extract_features.main(extract_args(data_path=str(other), features_path=other_store,
                                       vae=train.LatentDataset(latent_store).meta["vae"]))
    with pytest.raises(checkpoints.CheckpointError, match="another latent store .*class_names"):
        run(other_store, tmp_path, "--max-steps", "2", "--resume", ckpt)

    # The command line turns them into a usage message, not a traceback (and accepts --feature-path).
    proc = subprocess.run([sys.executable, "train.py", "--feature-path", pixel_store, "--model", "DiT-B/4",
                           "--results-dir", str(tmp_path), "--max-steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "patch must divide" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SystemExit):
        train.parse_args(["--features-path", latent_store, "--model", "DiT-Q/3"])
    with pytest.raises(SystemExit):
        train.parse_args(["--features-path", latent_store, "--epochs", "2", "--max-steps", "3"])


def test_accelerate_configs_parse():
    """Both configs load with accelerate's own config reader, and the FSDP one wraps a class that models.py
    defines. accelerate enables FSDP only on accelerators (on a CPU it falls back to gloo DDP), so the FSDP
    run itself is the GPU test below."""
    from accelerate.commands.config.config_args import ClusterConfig

    ddp = ClusterConfig.from_yaml_file(os.path.join(ROOT, "configs", "multinode_ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_machines == 2 and ddp.num_processes == 16
    fsdp = ClusterConfig.from_yaml_file(os.path.join(ROOT, "configs", "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert isinstance(getattr(models, fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]), type)
    with open(os.path.join(ROOT, "configs", "fsdp.yaml")) as f:
        assert yaml.safe_load(f)["mixed_precision"] == "bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_on_gpu_checkpoints_and_resumes(latent_store, tmp_path):
    """configs/fsdp.yaml with one process: trains, writes a full checkpoint that loads into a plain
    model, and resumes from it."""
    def launch(steps, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"),
               "--num_processes", "1", "--main_process_port", "0", os.path.join(ROOT, "train.py"),
               "--features-path", latent_store, "--results-dir", str(tmp_path), "--model", MODEL,
               "--global-batch-size", "4", "--max-steps", str(steps), "--ckpt-every", "2", "--log-every", "1",
               "--num-workers", "0", "--no-progress", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    assert "(FSDP)" in launch(2)
    assert "latest checkpoint" in launch(4, "--resume", "auto")
    ckpt = load(glob.glob(os.path.join(str(tmp_path), "*", "checkpoints", "0000004.pt"))[0])
    net = models.DiT_models[MODEL](**{k: v for k, v in ckpt["model_config"].items() if k != "model"})
    net.load_state_dict(ckpt["ema"], strict=True)
    net.load_state_dict(ckpt["model"], strict=True)


FLOW_REPA = ["--model", "DiT-Digits/4", "--objective", "flow", "--time-sampling", "logit-normal", "--repa-encoder",
             REPA_ENCODER, "--repa-depth", "2", "--repa-projector-dim", "32", "--mixed-precision", "no",
             "--ckpt-every", "100", "--log-every", "1", "--lr", "1e-3"]


def test_flow_with_repa_trains_checkpoints_and_resumes_exactly(repa_store, tmp_path):
    """SiT's flow with logit-normal t and REPA on the store's encoder tokens (a 2x2 grid, DiT-Digits/4's): the
    checkpoint records the objective and keeps the projector apart from the strict DiT weights, the log
    has the alignment loss, and 2 steps then --resume auto to 4 equal 4 uninterrupted steps exactly."""
    whole = run(repa_store, tmp_path / "a", *FLOW_REPA, "--max-steps", "4")
    run(repa_store, tmp_path / "b", *FLOW_REPA, "--max-steps", "2")
    resumed = run(repa_store, tmp_path / "b", *FLOW_REPA, "--max-steps", "4", "--resume", "auto")
    a = load(os.path.join(whole, "checkpoints", "0000004.pt"))
    b = load(os.path.join(resumed, "checkpoints", "0000004.pt"))
    for key in ("model", "ema", "projector", "opt", "rng_states"):
        assert tensors_equal(a[key], b[key]), key
    stats = log_stats(whole)
    assert [stats[s]["loss"] for s in (3, 4)] == [log_stats(resumed)[s]["loss"] for s in (3, 4)]
    assert all(-1 <= r["repa_loss"] <= 1 for r in stats.values()) and stats[4]["repa_loss"] != stats[1]["repa_loss"]

    assert a["objective"] == dict(objective="flow", path="linear", prediction="velocity",
                                  time="t=0 noise, t=1 data; the model is fed t in [0, 1]",
                                  time_sampling="logit-normal",
                                  logit_normal_loc=0.0, logit_normal_scale=1.0)
    cfg = {k: v for k, v in a["model_config"].items() if k != "model"}
    models.DiT_models["DiT-Digits/4"](**cfg).load_state_dict(a["ema"], strict=True)
    models.Projector(192, 192, 32).load_state_dict(a["projector"], strict=True)
    after2 = load(os.path.join(resumed, "checkpoints", "0000002.pt"))["projector"]
    assert all(not torch.equal(after2[k], v) for k, v in a["projector"].items())  # trained with the model
    unaligned = run(repa_store, tmp_path / "c", *FLOW_REPA, "--max-steps", "4", "--repa-coeff", "0")
    c = load(os.path.join(unaligned, "checkpoints", "0000004.pt"))
    # The alignment loss reaches the DiT's weights below the aligned block.
    assert not torch.equal(c["model"]["blocks.0.attn.qkv.weight"], a["model"]["blocks.0.attn.qkv.weight"])
    assert "REPA: block 2 aligned with deit_tiny_distilled_patch16_224's 192-wide tokens" in log_text(whole)
    loaded = checkpoints.load_checkpoint(os.path.join(whole, "checkpoints", "0000004.pt"))
    assert loaded.objective["objective"] == "flow"


def test_pool_tokens_averages_squares_of_the_encoder_grid():
    z = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4x4 grid of 3-vectors, row-major
    pooled = train.pool_tokens(z, 2)
    assert pooled.shape == (2, 4, 3)
    torch.testing.assert_close(pooled[:, 0], (z[:, 0] + z[:, 1] + z[:, 4] + z[:, 5]) / 4)
    torch.testing.assert_close(pooled[:, 3], (z[:, 10] + z[:, 11] + z[:, 14] + z[:, 15]) / 4)
    assert train.pool_tokens(z, 1) is z


def test_flow_and_repa_refusals(repa_store, latent_store, tmp_path):
    """REPA on a store without features, another encoder's name, a block beyond the depth, a token grid that
    cannot be matched, REPA flags without REPA, logit-normal DDPM, and resuming with another objective."""
    def parse_error(*argv):
        with pytest.raises(SystemExit):
            train.parse_args(["--features-path", latent_store, *argv])
    parse_error("--time-sampling", "logit-normal")
    parse_error("--repa-depth", "4")
    parse_error("--repa-encoder", "x", "--repa-depth", "0")

    with pytest.raises(train.TrainError, match="tiny16 holds no encoder features for REPA: .* with "
                                               "extract_features.py --repa-encoder NAME"):
        run(latent_store, tmp_path, *FLOW_REPA, "--max-steps", "1")
    with pytest.raises(train.TrainError, match=f"--repa-encoder vit_small: the store .* holds the features of "
                                               f"{REPA_ENCODER}"):
        run(repa_store, tmp_path, *FLOW_REPA, "--repa-encoder", "vit_small", "--max-steps", "1")
    with pytest.raises(train.TrainError, match="--repa-depth 7 is beyond DiT-Digits/4's 6 blocks"):
        run(repa_store, tmp_path, *FLOW_REPA, "--repa-depth", "7", "--max-steps", "1")
    with pytest.raises(train.TrainError, match=f"{REPA_ENCODER}'s 2x2 token grid cannot be matched to "
                                               f"DiT-Digits/2's 4x4 tokens"):
        run(repa_store, tmp_path, *FLOW_REPA, "--model", "DiT-Digits/2", "--max-steps", "1")

    exp = run(repa_store, tmp_path / "flow", "--model", "DiT-Digits/4", "--objective", "flow", "--max-steps", "1",
              "--mixed-precision", "no")
    with pytest.raises(runs.RunError, match="--objective ddpm: .* was trained with flow; resume with the same"):
        run(repa_store, tmp_path / "flow", "--model", "DiT-Digits/4", "--max-steps", "2", "--mixed-precision", "no",
            "--resume", os.path.join(exp, "checkpoints", "0000001.pt"))


VIDEO_MODEL = "VDiT-Digits/4"  # on the tiny video store's 4x3x4x4 latents: one token per frame


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_a_video_store_trains_a_video_model_and_resumes_exactly(video_store, tmp_path, objective):
    """The same loop on clips: the checkpoint records num_frames and the objective, loads for sampling as the
    VDiT it is, and 2 steps then --resume auto to 4 give exactly 4 uninterrupted steps' weights, EMA and
    optimizer state."""
    common = ["--model", VIDEO_MODEL, "--objective", objective, "--mixed-precision", "no", "--ckpt-every", "100",
              "--log-every", "1", "--lr", "1e-3", "--no-flip"]
    whole = run(video_store, tmp_path / "a", *common, "--max-steps", "4")
    ckpt = load(os.path.join(whole, "checkpoints", "0000004.pt"))
    assert ckpt["model_config"]["num_frames"] == 3 and ckpt["objective"]["objective"] == objective
    assert (ckpt["model"]["temporal_blocks.0.adaLN_modulation.1.weight"] != 0).any()  # the temporal blocks learn
    assert "training GFLOPs per clip, input 4x3x4x4" in log_text(whole)
    first = run(video_store, tmp_path / "b", *common, "--max-steps", "2")
    resumed = run(video_store, tmp_path / "b", *common, "--max-steps", "4", "--resume", "auto")
    assert resumed == first
    b = load(os.path.join(resumed, "checkpoints", "0000004.pt"))
    for key in ("model", "ema", "opt", "rng_states"):
        assert tensors_equal(ckpt[key], b[key]), key
    loaded = checkpoints.load_checkpoint(os.path.join(whole, "checkpoints", "0000004.pt"))
    spec = checkpoints.resolve_spec(loaded)
    model = checkpoints.build_model(spec, loaded, 4, 4, "cpu")
    assert isinstance(model, models.VDiT) and model.num_frames == 3


def test_init_from_an_image_checkpoint_fills_the_video_models_spatial_part(video_store, tmp_path):
    """--init-from an image DiT's weights: a video run starts with them in its spatial blocks (the log says how
    many keys kept their initialisation), and with lr 0 its checkpoint still holds them exactly. A label table of
    another class count (3 here, the store has 2) is left out: the run makes its own."""
    image = randomize(models.DiT_models["DiT-Digits/4"](input_size=4, in_channels=4, num_classes=3)).state_dict()
    torch.save(image, tmp_path / "image.pt")
    exp = run(video_store, tmp_path / "runs", "--model", VIDEO_MODEL, "--mixed-precision", "no", "--max-steps", "1",
              "--lr", "0", "--init-from", str(tmp_path / "image.pt"))
    ckpt = load(os.path.join(exp, "checkpoints", "0000001.pt"))
    table = image.pop("y_embedder.embedding_table.weight")
    assert all(torch.equal(ckpt["model"][k], v) for k, v in image.items())
    assert ckpt["model"]["y_embedder.embedding_table.weight"].shape == (3, 192) != table.shape
    assert (ckpt["model"]["temporal_blocks.0.adaLN_modulation.1.weight"] == 0).all()
    assert f"weights from {tmp_path / 'image.pt'}; {len(ckpt['model']) - len(image)} keys keep their " \
           f"initialisation (temporal_pos_embed, " in log_text(exp)


def test_video_refusals(video_store, latent_store, tmp_path):
    """An image size on a video store and the reverse, naming the right family; REPA on a video store; --init-from
    weights of another shape."""
    with pytest.raises(train.TrainError, match=r"^--model DiT-Digits/4 does not fit .*video8, a store of videos: "
                                               r"choose one of VDiT_models \(VDiT-XL/2, "):
        run(video_store, tmp_path, "--model", "DiT-Digits/4", "--max-steps", "1")
    with pytest.raises(train.TrainError, match=r"^--model VDiT-Digits/4 does not fit .*, a store of images: "
                                               r"choose one of DiT_models \(DiT-XL/2, "):
        run(latent_store, tmp_path, "--model", VIDEO_MODEL, "--max-steps", "1")
    with pytest.raises(train.TrainError, match="^--repa-encoder: .*video8 is a video store, and REPA is for image "
                                               "stores only"):
        run(video_store, tmp_path, *FLOW_REPA, "--model", VIDEO_MODEL, "--max-steps", "1")
    larger = tmp_path.parent / "larger.pt"
    torch.save(models.DiT_models["DiT-Digits/4"](input_size=8, in_channels=4, num_classes=2).state_dict(), larger)
    with pytest.raises(train.TrainError, match=r"^--init-from .*larger.pt: its weights do not fit VDiT-Digits/4 on this "
                                               r"store: pos_embed: the image checkpoint has shape \[1, 4, 192\], the "
                                               r"video model \[1, 1, 192\]"):
        run(video_store, tmp_path, "--model", VIDEO_MODEL, "--max-steps", "1", "--init-from", str(larger))
    assert not os.listdir(tmp_path)  # refused before a run folder is made
