"""demo.py: its score path on real digits, and the whole reduced demo (--quick) end to end."""
import importlib
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo  # noqa: E402


@pytest.mark.parametrize("image_size", [8, 16])
def test_real_digits_written_and_read_back_keep_their_labels(tmp_path, image_size):
    """The score's own path: digits written as the demo's ImageFolder, read as RGB uint8 like generated
    images, go through to_digit_features into the classifier, which must recognise them (near its
    held-out accuracy), while shuffled labels must score near chance."""
    assert demo.write_image_folder(str(tmp_path), image_size) == 1797
    classifier, ceiling = demo.fit_classifier()
    assert ceiling > 0.97
    images, labels = [], []
    for label in range(10):
        names = sorted(os.listdir(tmp_path / str(label)))
        assert names
        for name in names[:30]:
            img = Image.open(tmp_path / str(label) / name)
            assert img.size == (image_size, image_size)
            images.append(np.asarray(img.convert("RGB")))
            labels.append(label)
    images, labels = np.stack(images), np.array(labels)
    features = demo.to_digit_features(images)
    assert features.shape == (300, 64) and 0 <= features.min() and features.max() <= 16
    accuracy = (classifier.predict(features) == labels).mean()
    assert accuracy > (0.97 if image_size == 8 else 0.9)
    assert (classifier.predict(features) == np.random.default_rng(0).permutation(labels)).mean() < 0.3
    if image_size == 8:  # written at the native size the features equal the data up to rounding
        real = load_digits()
        first = [int(n[:-4]) for label in range(10) for n in sorted(os.listdir(tmp_path / str(label)))[:30]]
        np.testing.assert_allclose(features, real.data[first], atol=16 / 255)


def run_in_process(stage, command, log_dir):
    """demo.run, with each stage's script called through its own parse_args and main in this process
    instead of a new Python (about 5 s of imports each); the scripts' processes have tests of their own."""
    assert command[0] == sys.executable and command[1].endswith(".py")
    module = importlib.import_module(command[1][:-3])
    _, args = module.parse_args(command[2:])
    module.main(args)
    return 0.0


def test_quick_demo_runs_every_stage(tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "demo"
    monkeypatch.setattr(demo, "run", run_in_process)
    demo.main(demo.parse_args(["--quick", "--out", str(out), "--curve", "--ckpt-every", "2"])[1])
    stdout = capsys.readouterr().out

    assert sum(len(os.listdir(out / "digits" / str(c))) for c in range(10)) == 1797
    with open(out / "features" / "meta.json") as f:
        meta = json.load(f)
    assert meta["complete"] and meta["count"] == 1797 and meta["vae"] == "none"
    assert meta["latent_shape"] == [3, 8, 8] and meta["num_classes"] == 10

    with open(out / "scores.json") as f:
        report = json.load(f)
    assert os.path.isfile(out / report["checkpoint"])
    # sample.py's grid: a row per digit, 8x8 images with torchvision's 2-pixel padding; the demo's copy is
    # the same grid enlarged, every pixel a 6x6 square.
    small = np.asarray(Image.open(out / "samples" / "digits_grid_8px.png").convert("RGB"))
    assert small.shape == (2 + 10 * (8 + 2), 2 + demo.GRID_COLUMNS * (8 + 2), 3)
    grid = np.asarray(Image.open(out / report["grid"]).convert("RGB"))
    assert grid.shape == (small.shape[0] * demo.GRID_SCALE, small.shape[1] * demo.GRID_SCALE, 3)
    np.testing.assert_array_equal(grid, small.repeat(demo.GRID_SCALE, axis=0).repeat(demo.GRID_SCALE, axis=1))
    assert report["classifier_held_out_accuracy"] > 0.97
    rows = report["scores"]
    assert [(r["sampler"], r["cfg_scale"] == 1.0) for r in rows] == [
        ("ddpm", True), ("ddpm", False), ("dpm-solver", True), ("dpm-solver", False)]
    classifier, _ = demo.fit_classifier()
    for row in rows:
        assert row["samples"] == 20
        with np.load(out / row["npz"]) as data:
            images, labels = data["arr_0"], data["labels"]
        assert images.shape == (20, 8, 8, 3) and images.dtype == np.uint8 and set(labels) <= set(range(10))
        # The score is the classifier's verdict on these very images against the labels drawn for them.
        assert row["accuracy"] == (classifier.predict(demo.to_digit_features(images)) == labels).mean()
        # Four training steps teach the model nothing (measured: even 400 steps at batch 32 and lr 4e-3
        # score 17% of 100), so the score must be near chance (10%); a score that compared the labels
        # with themselves, or read another run's images, would not be.
        assert row["accuracy"] <= 0.4
    # --curve: the guided fast-solver row again for each kept checkpoint (steps 2 and 4 of 4).
    assert [r["train_step"] for r in report["curve"]] == [2, 4]
    # The last checkpoint's point is the table's last row (same setting, same samples); the earlier one is sampled
    # from its own checkpoint.
    assert report["curve"][-1]["npz"] == rows[-1]["npz"] and report["curve"][0]["npz"] != rows[-1]["npz"]
    assert "0000002" in report["curve"][0]["npz"]
    assert "label accuracy" in stdout and "classifier on held-out real digits" in stdout

    # A second run into the same folder must refuse, not mix two training runs (and say so in one line).
    again = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already holds a training run" in again.stderr


def test_flags_are_checked_before_anything_runs(capsys):
    assert demo.parse_args(["--quick"])[1].steps == 4 and demo.parse_args([])[1].steps > 4
    for argv, message in ((["--image-size", "12"], "multiple of 8"), (["--steps", "0"], "must be >= 1")):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
        assert message in capsys.readouterr().err


def test_moving_digits_move_smoothly_and_keep_their_digit():
    videos, labels, positions = demo.moving_digits(canvas=12, frames=8, seed=0)
    assert videos.shape == (1797, 8, 12, 12) and videos.dtype == np.uint8 and len(labels) == 1797
    real = load_digits()
    pixels = np.round(real.images * (255.0 / 16.0)).astype(np.uint8)
    for n in (0, 500, 1796):  # every frame is the digit at its position on a black canvas
        for f, (row, col) in enumerate(positions[n]):
            assert np.array_equal(videos[n, f, row:row + 8, col:col + 8], pixels[n])
            assert videos[n, f].sum() == pixels[n].sum()
    steps = np.abs(np.diff(positions, axis=1))
    assert steps.max() == 1 and (steps.sum(axis=2) > 0).all()  # a pixel a frame, never standing still
    assert positions.min() == 0 and positions.max() == 4
    gray = videos * (16.0 / 255.0)
    classifier, ceiling = demo.fit_frame_classifier(videos, labels)
    assert ceiling > 0.9
    scores = demo.video_scores(gray[:200], labels[:200], classifier)
    assert scores["consistency"] > 0.9 and scores["accuracy"] > 0.9 and scores["smoothness"] < 1.0  # bounces
    # Frames of random clips: the label changes within a clip and the digit jumps.
    shuffled = gray[:200].reshape(-1, 12, 12)[np.random.default_rng(0).permutation(1600)].reshape(200, 8, 12, 12)
    mixed = demo.video_scores(shuffled, labels[:200], classifier)
    assert mixed["consistency"] < 0.5 and mixed["accuracy"] < 0.3 and mixed["smoothness"] > 1.5


def test_quick_video_demo_runs_every_stage(tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "demo"
    monkeypatch.setattr(demo, "run", run_in_process)
    report = demo.main(demo.parse_args(["--video", "--quick", "--out", str(out)])[1])
    stdout = capsys.readouterr().out
    with open(out / "features" / "meta.json") as f:
        meta = json.load(f)
    assert meta["frames"] == 8 and meta["latent_shape"] == [3, 8, 12, 12] and meta["count"] == 64
    with open(out / "scores.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    with Image.open(out / report["grid"]) as gif:  # sample.py's animated grid, a column per digit, enlarged
        assert gif.n_frames == 8 and gif.size == ((2 + 10 * 14) * demo.GRID_SCALE, (2 + 14) * demo.GRID_SCALE)
    with np.load(out / report["npz"]) as data:
        clips, labels = data["arr_0"], data["labels"]
    assert clips.shape == (4, 8, 12, 12, 3) and clips.dtype == np.uint8
    videos, labels_real, _ = demo.moving_digits(12, 8, seed=0)
    classifier, _ = demo.fit_frame_classifier(videos[:64], labels_real[:64])  # --quick: the first 64 clips
    video, baseline, real = report["scores"]
    assert video == dict(setting="video model (VDiT-Digits/4)", **demo.video_scores(demo.to_gray(clips), labels,
                                                                                    classifier))
    assert baseline["setting"] == "per-frame baseline (DiT-Digits/4)" and real["setting"] == "real clips"
    assert real["accuracy"] > 0.9 and real["smoothness"] < 1.0
    assert "identity consistency" in stdout and "per-frame baseline" in stdout
    (log,) = glob.glob(str(out / "results" / "train-video" / "*" / "log.txt"))  # the video model starts as the baseline
    with open(log) as f:
        assert f"weights from {out / report['checkpoints']['baseline']}; " in f.read()
