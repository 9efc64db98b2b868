"""Sequence parallelism (sequence.py): 2 gloo processes sharing each sample's tokens train a video model as one
process does (losses, gradient norms, weights); the refusals come before any run folder or sample folder is made.
(sample_ddp.py in 2 groups of 2 processes drawing one process's images: tests/test_sample.py.) DeepSpeed is a
test requirement (.ci/run), so these never skip."""
import glob
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import extract_features  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
import sample_ddp  # noqa: E402
import sequence  # noqa: E402
import train  # noqa: E402
from conftest import VIDEO_FLAGS, extract_args  # noqa: E402
from test_sample import flow_checkpoint, run as launch  # noqa: E402

VIDEO_MODEL = "VDiT-Digits/4"  # 4 heads; on 8x8 frames 4 tokens a frame


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory, video_folder):
    """video_folder's 6 clips of 3 frames as 3x8x8 pixels (no autoencoder): VDiT-Digits/4 sees 2x2 tokens a frame,
    which split over 2 processes, while the temporal attention runs over the 3 frames of each position."""
    path = str(tmp_path_factory.mktemp("stores") / "clips8")
    extract_features.main(extract_args(data_path=video_folder[0], features_path=path, vae="none", dtype="float32",
                                       **VIDEO_FLAGS))
    return path


def train_flags(store, results, *extra):
    return ["--features-path", store, "--results-dir", str(results), "--model", VIDEO_MODEL, "--global-batch-size",
            "4", "--mixed-precision", "no", "--num-workers", "0", "--no-progress", *extra]


def train_in_process(*flags):
    """train.main in this process (one process), through the CLI's parser; returns the run folder."""
    return train.main(train.parse_args(list(flags))[1])


def test_two_processes_sharing_each_clip_train_as_one_process(clip_store, tmp_path, one_thread):
    """torchrun, 2 processes, --sequence-parallel 2 (one data-parallel replica): the same global batch, timesteps,
    noise and label dropout as one process, so the same losses and gradient norms to float32 summation order;
    after 3 AdamW steps at lr 1e-3 (up to 3e-3 per weight) the weights agree to 5e-5 (measured 1.3e-5; 2e-6
    between 1 and 2 micro-batches in one process). The checkpoint loads strictly as the VDiT it is; resumed by
    one process, the RNG states are reseeded (a sequence group's processes share theirs) and the log says so."""
    common = train_flags(clip_store, tmp_path / "two", "--max-steps", "3", "--log-every", "1", "--lr", "1e-3")
    out = launch(["train.py", *common, "--sequence-parallel", "2"], nproc=2, timeout=200).stdout
    assert "data parallel 1 x sequence parallel 2: 6 of each clip's 12 tokens per process (2 of each frame's 4, in " \
           "all 3 frames)" in out
    assert "4 clips per process per step" in out and "weights identical on all 2 processes" in out
    (two,) = glob.glob(str(tmp_path / "two" / "*"))
    one = train_in_process(*train_flags(clip_store, tmp_path / "one", "--max-steps", "3", "--log-every", "1", "--lr",
                                        "1e-3"))
    assert "data parallel 1 x sequence parallel 1: 12 of each clip's 12 tokens per process" in \
        open(os.path.join(one, "log.txt")).read()
    a, b = runs.read_stats(one), runs.read_stats(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    ckpt_a = torch.load(os.path.join(one, "checkpoints", "0000003.pt"), weights_only=True)
    path_b = os.path.join(two, "checkpoints", "0000003.pt")
    ckpt_b = torch.load(path_b, weights_only=True)
    for key in ("model", "ema"):
        for name, value in ckpt_a[key].items():
            torch.testing.assert_close(ckpt_b[key][name], value, rtol=0, atol=5e-5)
    assert (ckpt_b["model"]["temporal_blocks.0.adaLN_modulation.1.weight"] != 0).any()  # the update is real
    assert ckpt_b["train_config"]["sequence_parallel"] == 2 and len(ckpt_b["rng_states"]) == 2
    config = {k: v for k, v in ckpt_b["model_config"].items() if k != "model"}
    models.VDiT_models[VIDEO_MODEL](**config).load_state_dict(ckpt_b["model"], strict=True)

    resumed = train_in_process(*train_flags(clip_store, tmp_path / "resumed", "--max-steps", "4", "--resume", path_b))
    assert "the checkpoint was written by 2 processes with --sequence-parallel 2, this run has 1 with 1: RNG states " \
           "are reseeded" in open(os.path.join(resumed, "log.txt")).read()


def test_refusals_come_before_any_work(clip_store, tmp_path, monkeypatch, capsys):
    """Heads or tokens per frame that do not split, a world that is not whole groups, --compile, REPA and a missing
    DeepSpeed: one line each, before a run folder or a sample folder is made."""
    def refused(store, *extra):
        return train_in_process(*train_flags(store, tmp_path / "runs", "--max-steps", "1", *extra))

    with pytest.raises(sequence.SequenceParallelError, match=r"^--sequence-parallel 3: VDiT-Digits/4's 4 attention "
                                                             r"heads do not split over 3 processes$"):
        refused(clip_store, "--sequence-parallel", "3")
    with pytest.raises(sequence.SequenceParallelError, match=r"^--sequence-parallel 2: VDiT-S/8's 1 tokens per "
                                                             r"frame on this input do not split over 2 processes$"):
        refused(clip_store, "--model", "VDiT-S/8", "--sequence-parallel", "2")  # 6 heads, one 8x8 patch a frame
    with pytest.raises(sequence.SequenceParallelError, match=r"^--sequence-parallel 2: the 1 processes do not form "
                                                             r"groups of 2; launch a multiple of 2$"):
        refused(clip_store, "--sequence-parallel", "2")
    with pytest.raises(train.TrainError, match=r"^--sequence-parallel 2 with --compile: "):
        refused(clip_store, "--sequence-parallel", "2", "--compile")
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")

    _, args = train.parse_args(train_flags(clip_store, tmp_path, "--sequence-parallel", "2", "--repa-encoder", "x"))
    config = dict(model=VIDEO_MODEL, input_size=8, in_channels=3, num_classes=2, num_frames=3)
    with pytest.raises(train.TrainError, match=r"^--sequence-parallel 2 with --repa-encoder: REPA aligns one block's "):
        train.parallel_layout(args, 2, config, train.Alignment(depth=1, coeff=0.5, feature_dim=8, projector_dim=8,
                                                                pool=1))
    with pytest.raises(SystemExit):
        train.parse_args(train_flags(clip_store, tmp_path, "--sequence-parallel", "0"))
    assert "--sequence-parallel must be positive" in capsys.readouterr().err

    flags = ["--ckpt", flow_checkpoint(tmp_path / "flow.pt"), "--num-fid-samples", "2", "--sample-dir",
             str(tmp_path / "samples"), "--sequence-parallel", "2"]
    with pytest.raises(sequence.SequenceParallelError, match="the 1 processes do not form groups of 2"):
        sample_ddp.main(sample_ddp.parse_args(flags)[1])
    assert not os.path.exists(tmp_path / "samples")

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    with torch.device("meta"):
        model = train.build_model(config)
    with pytest.raises(sequence.SequenceParallelError, match=r"^--sequence-parallel 2 runs DeepSpeed's Ulysses "
                                                             r"attention: pip install deepspeed \("):
        sequence.check(2, 2, model, VIDEO_MODEL)
