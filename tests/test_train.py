"""train.py on tiny stores: the loss falls, checkpoint files and contents, exact resume, two processes
under torchrun on the CPU, the refusals, and the accelerate configs."""
import glob
import importlib.util
import os
import re
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
import extract_features  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from conftest import extract_args  # noqa: E402

MODEL = "DiT-Digits/2"  # depth 6, width 128: on the 4x8x8 test latents a step takes milliseconds


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
    """{step: {name: value}} from the experiment's log.txt."""
    out = {}
    with open(os.path.join(exp, "log.txt")) as f:
        for line in f:
            m = re.search(r"step (\d+)/\d+ epoch \d+ (.*) eta", line)
            if m:
                fields = m.group(2).split()
                out[int(m.group(1))] = {k: float(v) for k, v in zip(fields[::2], fields[1::2])}
    return out


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
    assert sorted(stats) == [10, 20, 30]
    assert all(np.isfinite(list(s.values())).all() for s in stats.values())
    assert stats[30]["loss"] < 0.5 * stats[10]["loss"], stats
    assert stats[30]["lr"] == pytest.approx(2e-3) and stats[30]["images_per_s"] > 0
    assert stats[30]["tflops_per_device"] > 0 and {"loss_q0", "loss_q3", "grad_norm"} <= stats[30].keys()

    files = sorted(os.listdir(os.path.join(exp, "checkpoints")))
    assert files == ["0000010.pt", "0000020.pt", "0000025.pt", "0000030.pt"]
    ckpt = load(os.path.join(exp, "checkpoints", "0000030.pt"))
    assert ckpt["step"] == 30 and ckpt["epoch"] == 30 // 2 and ckpt["epoch_step"] == 0
    meta = train.LatentDataset(latent_store).meta
    assert ckpt["latents"] == meta
    assert ckpt["model_config"] == dict(model=MODEL, input_size=8, in_channels=4, num_classes=3, learn_sigma=True,
                                        class_dropout_prob=0.1)
    assert ckpt["train_config"]["lr"] == 2e-3 and ckpt["train_config"]["mixed_precision"] == "bf16"
    assert len(ckpt["rng_states"]) == 1 and ckpt["world_size"] == 1
    # model and ema load strictly into the model the config describes, as in DiT's checkpoints.
    cfg = {k: v for k, v in ckpt["model_config"].items() if k != "model"}
    for key in ("model", "ema"):
        net = models.DiT_models[MODEL](**cfg)
        net.load_state_dict(ckpt[key], strict=True)
        assert all(v.dtype == torch.float32 for v in ckpt[key].values())  # float32 master weights and EMA
    assert not torch.equal(ckpt["model"]["final_layer.linear.weight"], ckpt["ema"]["final_layer.linear.weight"])
    assert set(ckpt["opt"]) == {"state", "param_groups"} and ckpt["opt"]["state"]
    # helper C's loader reads it as one of ours, EMA weights and config included.
    import sampling
    loaded = sampling.load_checkpoint(os.path.join(exp, "checkpoints", "0000030.pt"))
    assert loaded.kind == "train" and loaded.config["model"] == MODEL
    assert torch.equal(loaded.state_dict["y_embedder.embedding_table.weight"],
                       ckpt["ema"]["y_embedder.embedding_table.weight"])


def test_resume_equals_uninterrupted_run(latent_store, tmp_path):
    """float32 on the CPU: 3 steps, then --resume auto to 7 (from mid-epoch, over epoch boundaries) gives
    exactly the weights, EMA, optimizer state and RNG states of 7 uninterrupted steps."""
    common = ["--mixed-precision", "no", "--ckpt-every", "100", "--log-every", "1", "--lr", "1e-3"]
    whole = run(latent_store, tmp_path / "a", *common, "--max-steps", "7")
    first = run(latent_store, tmp_path / "b", *common, "--max-steps", "3")
    resumed = run(latent_store, tmp_path / "b", *common, "--max-steps", "7", "--resume", "auto")
    assert resumed == first
    a = load(os.path.join(whole, "checkpoints", "0000007.pt"))
    b = load(os.path.join(resumed, "checkpoints", "0000007.pt"))
    for key in ("model", "ema", "opt", "scheduler", "rng_states"):
        assert tensors_equal(a[key], b[key]), key
    assert log_stats(whole)[7]["loss"] == log_stats(resumed)[7]["loss"]
    with open(os.path.join(resumed, "log.txt")) as f:
        assert "at step 3" in f.read()


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
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])


def test_refusals(latent_store, pixel_store, image_folder, tmp_path):
    """Each user error stops with a message that says what to change."""
    with pytest.raises(train.TrainError, match="patch must divide the latent size"):
        run(pixel_store, tmp_path, "--model", "DiT-S/4", "--max-steps", "1")
    with pytest.raises(train.TrainError, match="not a latent store"):
        run(str(tmp_path), tmp_path, "--max-steps", "1")
    with pytest.raises(train.TrainError, match="fewer than --global-batch-size"):
        run(latent_store, tmp_path, "--max-steps", "1", "--global-batch-size", "64")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(train.TrainError, match="pip install tensorboard"):
            run(latent_store, tmp_path, "--max-steps", "1", "--report-to", "tensorboard")
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
    cmd = ["accelerate", "launch", "--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"), "--num_processes",
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
        cmd = ["accelerate", "launch", "--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"),
               "--num_processes", "1", "--main_process_port", "0", os.path.join(ROOT, "train.py"),
               "--features-path", latent_store, "--results-dir", str(tmp_path), "--model", MODEL,
               "--global-batch-size", "4", "--max-steps", str(steps), "--ckpt-every", "2", "--log-every", "1",
               "--num-workers", "0", "--no-progress", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    assert "(FSDP)" in launch(2)
    assert "at step 2" in launch(4, "--resume", "auto")
    ckpt = load(glob.glob(os.path.join(str(tmp_path), "*", "checkpoints", "0000004.pt"))[0])
    net = models.DiT_models[MODEL](**{k: v for k, v in ckpt["model_config"].items() if k != "model"})
    net.load_state_dict(ckpt["ema"], strict=True)
    net.load_state_dict(ckpt["model"], strict=True)
