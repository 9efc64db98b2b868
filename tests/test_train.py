"""train.py on tiny stores: the loss falls, checkpoint files and contents, exact resume, two processes
under torchrun on the CPU, the refusals, and the accelerate configs."""
import concurrent.futures
import glob
import os
import shutil
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
import train  # noqa: E402
from conftest import extract_args  # noqa: E402

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
    return {record["step"]: record for record in train.read_stats(exp)}


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
    full = [list(train.EpochBatches(10, 4, 0, 1, seed=3).__iter__())]
    per_rank = []
    for rank in range(2):
        s = train.EpochBatches(10, 4, rank, 2, seed=3)
        per_rank.append(list(s))
        assert len(s) == 2 and all(len(b) == 2 for b in per_rank[-1])
    for step, batch in enumerate(full[0]):
        assert per_rank[0][step] + per_rank[1][step] == batch
    used = [i for b in full[0] for i in b]
    assert len(set(used)) == 8 and set(used) <= set(range(10))
    later = train.EpochBatches(10, 4, 0, 1, seed=3)
    later.set_epoch(1)
    assert list(later) != full[0]
    later.set_epoch(0, start=1)
    assert list(later) == full[0][1:]


def test_trains_bf16_loss_falls_and_checkpoints(latent_store, tmp_path):
    """Default bf16 on the tiny store with a high learning rate: the global mean loss (in the log) falls;
    checkpoints are written atomically, pruned to the latest 2 plus multiples of 10, and hold
    everything a sampler and a resumed run need."""
    exp = run(latent_store, tmp_path, "--max-steps", "30", "--lr", "2e-3", "--log-every", "10", "--ckpt-every", "5",
              "--ckpt-keep-last", "2", "--ckpt-keep-every", "10", "--ema-warmup", "--log-quartiles")
    assert os.path.basename(exp) == "000-DiT-Digits-2"
    stats = log_stats(exp)
    assert sorted(stats) == [10, 20, 30] and [s["epoch"] for s in stats.values()] == [4, 9, 14]
    assert all(np.isfinite(list(s.values())).all() for s in stats.values())
    assert stats[30]["loss"] < 0.5 * stats[10]["loss"], stats
    assert stats[30]["lr"] == pytest.approx(2e-3) and stats[30]["images_per_s"] > 0
    assert stats[30]["tflops_per_device"] > 0 and {"loss_q0", "loss_q3", "grad_norm"} <= stats[30].keys()

    files = sorted(os.listdir(os.path.join(exp, "checkpoints")))
    assert files == ["0000010.pt", "0000020.pt", "0000025.pt", "0000030.pt"]
    ckpt = load(os.path.join(exp, "checkpoints", "0000030.pt"))
    assert ckpt["step"] == 30 and ckpt["parent"] is None
    meta = train.LatentDataset(latent_store).meta
    assert ckpt["latents"] == meta
    assert ckpt["model_config"] == dict(model=MODEL, input_size=8, in_channels=4, num_classes=3, learn_sigma=True,
                                        class_dropout_prob=0.1)
    assert ckpt["train_config"]["lr"] == 2e-3 and "mixed precision bf16 (from train.py's default)" in log_text(exp)
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


def test_resume_equals_uninterrupted_run(latent_store, tmp_path):
    """float32 on the CPU, 2 accumulated micro-batches: 3 steps, then --resume auto to 7 (from mid-epoch,
    over epoch boundaries) gives exactly the weights, EMA, optimizer state and RNG states of 7
    uninterrupted steps, and stats.jsonl holds each step once."""
    common = ["--mixed-precision", "no", "--ckpt-every", "100", "--log-every", "1", "--lr", "1e-3",
              "--gradient-accumulation-steps", "2"]
    whole = run(latent_store, tmp_path / "a", *common, "--max-steps", "7")
    first = run(latent_store, tmp_path / "b", *common, "--max-steps", "3")
    resumed = run(latent_store, tmp_path / "b", *common, "--max-steps", "7", "--resume", "auto")
    assert resumed == first
    a = load(os.path.join(whole, "checkpoints", "0000007.pt"))
    b = load(os.path.join(resumed, "checkpoints", "0000007.pt"))
    for key in ("model", "ema", "opt", "scheduler", "rng_states"):
        assert tensors_equal(a[key], b[key]), key
    assert log_stats(whole)[7]["loss"] == log_stats(resumed)[7]["loss"]
    assert [r["step"] for r in train.read_stats(resumed)] == list(range(1, 8))
    assert f"continuing {resumed} from its latest checkpoint" in log_text(resumed)


def test_gradient_accumulation_gives_the_same_update(latent_store, tmp_path):
    """Global batch 4 in 1, 2 or 4 micro-batches: the same draws per sample, so the same weights up to
    float32 summation order, and every micro-batch counted in images/s."""
    runs = {}
    for n in (1, 2, 4):
        exp = run(latent_store, tmp_path / str(n), "--mixed-precision", "no", "--max-steps", "3", "--lr", "1e-3",
                  "--log-every", "3", "--gradient-accumulation-steps", str(n))
        runs[n] = load(os.path.join(exp, "checkpoints", "0000003.pt"))
        assert f"in {n} micro-batch(es)" in log_text(exp)
        record = log_stats(exp)[3]
        assert record["images_per_s"] == pytest.approx(4 * record["steps_per_s"], rel=1e-6)
    for n in (2, 4):
        for key in ("model", "ema"):
            for name, value in runs[1][key].items():
                torch.testing.assert_close(runs[n][key][name], value, rtol=1e-5, atol=1e-6)
    moved = (runs[1]["model"]["final_layer.linear.weight"] != 0).any()
    assert moved  # adaLN-Zero starts it at 0: the update is real
    with pytest.raises(train.TrainError, match="not divisible by the 1 processes x 3 micro-batches"):
        run(latent_store, tmp_path / "3", "--max-steps", "1", "--gradient-accumulation-steps", "3")


def test_precision_comes_from_the_flag_then_accelerate_then_bf16(latent_store, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch --mixed_precision no sets
    assert "mixed precision no (from accelerate launch / accelerate config)" in log_text(
        run(latent_store, tmp_path, "--max-steps", "1"))
    assert "mixed precision bf16 (from --mixed-precision)" in log_text(
        run(latent_store, tmp_path, "--max-steps", "1", "--mixed-precision", "bf16"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp9")
    with pytest.raises(train.TrainError, match="mixed precision fp9 .from accelerate launch / accelerate config.: "
                                               "Unknown mixed_precision mode"):
        run(latent_store, tmp_path, "--max-steps", "1")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert "mixed precision bf16 (from train.py's default)" in log_text(run(latent_store, tmp_path, "--max-steps", "1"))


def test_new_runs_never_land_in_another_runs_folder(latent_store, tmp_path):
    """The reproduction from the issue: after deleting run 000, a new run must not write into 001."""
    first = run(latent_store, tmp_path, "--max-steps", "2", "--mixed-precision", "no")
    second = run(latent_store, tmp_path, "--max-steps", "6", "--ckpt-every", "2", "--mixed-precision", "no")
    before = {f: os.stat(f).st_mtime_ns for f in glob.glob(os.path.join(second, "*", "*")) + [
        os.path.join(second, "log.txt")]}
    shutil.rmtree(first)
    third = run(latent_store, tmp_path, "--max-steps", "2", "--mixed-precision", "no")
    assert os.path.basename(third) == "002-DiT-Digits-2"
    assert {f: os.stat(f).st_mtime_ns for f in before} == before
    # Runs starting at the same instant each get their own folder.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: train.new_run_dir(str(tmp_path / "race"), MODEL), range(8)))
    assert len(set(made)) == 8 and sorted(os.listdir(tmp_path / "race")) == sorted(map(os.path.basename, made))


def test_resume_branches_instead_of_overwriting_a_later_history(latent_store, tmp_path):
    """--resume from an earlier checkpoint, or into another --results-dir, starts a new run folder that
    records its parent; the original run's checkpoints stay as they were."""
    base = ["--mixed-precision", "no", "--ckpt-every", "2", "--ckpt-keep-every", "0"]
    exp = run(latent_store, tmp_path, *base, "--max-steps", "6")
    ckpts = checkpoints.checkpoint_files(os.path.join(exp, "checkpoints"))
    before = {p: os.stat(p).st_mtime_ns for p in ckpts.values()}
    branch = run(latent_store, tmp_path, *base, "--max-steps", "6", "--resume", ckpts[2])
    assert branch != exp and os.path.basename(branch) == "001-DiT-Digits-2"
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert f"branching from {ckpts[2]} (step 2) into a new run, as it is not its run's latest" in log_text(branch)
    child = load(os.path.join(branch, "checkpoints", "0000006.pt"))
    assert child["parent"] == ckpts[2] and child["step"] == 6
    other = run(latent_store, tmp_path / "elsewhere", *base, "--max-steps", "8", "--resume", ckpts[6])
    assert os.path.dirname(other) == str(tmp_path / "elsewhere") and "--results-dir names another folder" in log_text(other)
    assert sorted(checkpoints.checkpoint_files(os.path.join(other, "checkpoints"))) == [8]


def test_resume_auto_skips_a_damaged_newest_checkpoint(latent_store, tmp_path):
    base = ["--mixed-precision", "no", "--ckpt-every", "2"]
    exp = run(latent_store, tmp_path, *base, "--max-steps", "4")
    newest = os.path.join(exp, "checkpoints", "0000004.pt")
    open(newest, "wb").close()  # emptied, as by a full disk or a killed copy
    leftover = os.path.join(exp, "checkpoints", "0000006.pt.tmp999999999")  # a killed save's temporary file
    with open(leftover, "wb") as f:
        f.write(b"half")
    assert run(latent_store, tmp_path, *base, "--max-steps", "6", "--resume", "auto") == exp
    text = log_text(exp)
    assert f"skipping a damaged checkpoint: cannot read {newest} as a checkpoint: the file is empty" in text
    assert "continuing" in text and "(step 2)" in text and not os.path.exists(leftover)
    assert load(newest)["step"] == 4  # trained again and written whole


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


def test_tensorboard_event_file_holds_the_logged_figures(latent_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = run(latent_store, tmp_path, "--max-steps", "4", "--log-every", "2", "--report-to", "tensorboard")
    logged = []
    for events in glob.glob(os.path.join(exp, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events).Reload()  # the scalars' file; the hparams (flags) have their own
        if "loss" in acc.Tags()["scalars"]:
            logged += [(e.step, e.value) for e in acc.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in train.read_stats(exp)]
    assert [s for s, _ in logged] == [s for s, _ in expected] == [2, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_two_processes_under_torchrun_share_the_work(latent_store, tmp_path):
    """torchrun on a machine without CUDA: 2 cooperating gloo processes, each with half of every global
    batch and its own RNG, ending with identical weights (train.py compares them and logs it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--features-path", latent_store, "--results-dir", str(tmp_path),
           "--model", MODEL, "--global-batch-size", "4", "--max-steps", "4", "--log-every", "2",
           "--num-workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "2 process(es) (MULTI_CPU)" in out and "2 images per process per step" in out
    assert "weights identical on all 2 processes" in out
    assert out.count("saved checkpoint") == 1  # logs and files from rank 0 only
    ckpt = load(glob.glob(os.path.join(str(tmp_path), "*", "checkpoints", "0000004.pt"))[0])
    assert len(ckpt["rng_states"]) == 2
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])


def test_refusals(latent_store, pixel_store, image_folder, tmp_path):
    """Each user error stops with a message that says what to change."""
    with pytest.raises(train.TrainError, match="patch must divide the latent size"):
        run(pixel_store, tmp_path, "--model", "DiT-S/4", "--max-steps", "1")
    with pytest.raises(train.TrainError, match="not a latent store"):
        run(str(tmp_path), tmp_path, "--max-steps", "1")
    with pytest.raises(train.TrainError, match="fewer than --global-batch-size"):
        run(latent_store, tmp_path, "--max-steps", "1", "--global-batch-size", "64")
    with pytest.raises(train.TrainError, match="pip install wandb"):
        run(latent_store, tmp_path, "--max-steps", "1", "--report-to", "wandb")
    with pytest.raises(train.TrainError, match="no such checkpoint"):
        run(latent_store, tmp_path, "--max-steps", "1", "--resume", str(tmp_path / "missing.pt"))

    exp = run(latent_store, tmp_path / "r", "--max-steps", "1", "--mixed-precision", "no")
    ckpt = os.path.join(exp, "checkpoints", "0000001.pt")
    with pytest.raises(train.TrainError, match="another model .*model: checkpoint 'DiT-Digits/2', now 'DiT-S/8'"):
        run(latent_store, tmp_path, "--model", "DiT-S/8", "--max-steps", "2", "--resume", ckpt)
    with pytest.raises(train.TrainError, match="--global-batch-size 4; resume with the same"):
        run(latent_store, tmp_path, "--max-steps", "2", "--global-batch-size", "8", "--resume", ckpt)
    truncated = tmp_path / "truncated.pt"  # a copy cut short, as by a full disk
    with open(ckpt, "rb") as f:
        truncated.write_bytes(f.read(1000))
    with pytest.raises(train.TrainError, match="cannot read .*truncated.pt as a checkpoint"):
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
    with pytest.raises(train.TrainError, match="another latent store .*class_names"):
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


def test_pixel_store_trains(pixel_store, tmp_path):
    """A --vae none store (3 channels) builds a model with 3 input and 6 output channels and trains."""
    exp = run(pixel_store, tmp_path, "--max-steps", "2", "--log-every", "1")
    ckpt = load(os.path.join(exp, "checkpoints", "0000002.pt"))
    assert ckpt["model_config"]["in_channels"] == 3 and ckpt["model_config"]["input_size"] == 6
    assert ckpt["model"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 6


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback; on a GPU the FSDP test below runs")
def test_fsdp_config_on_cpu_says_it_trains_unsharded(latent_store, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"), "--num_processes",
           "2", "--main_process_port", "0", os.path.join(ROOT, "train.py"), "--features-path", latent_store,
           "--results-dir", str(tmp_path), "--model", MODEL, "--global-batch-size", "4", "--max-steps", "2",
           "--num-workers", "0", "--no-progress", "--mixed-precision", "no"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "asks for FSDP, which accelerate runs on GPUs only: training without sharding (MULTI_CPU)" in proc.stdout
    assert "weights identical on all 2 processes" in proc.stdout


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
