"""demo.py: its score path on real digits, and the whole reduced demo (--quick) end to end."""
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


def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out), "--curve", "--ckpt-every", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert sum(len(os.listdir(out / "digits" / str(c))) for c in range(10)) == 1797
    with open(out / "features" / "meta.json") as f:
        meta = json.load(f)
    assert meta["complete"] and meta["count"] == 1797 and meta["vae"] == "none"
    assert meta["latent_shape"] == [3, 8, 8] and meta["num_classes"] == 10

    with open(out / "scores.json") as f:
        report = json.load(f)
    assert os.path.isfile(out / report["checkpoint"])
    grid = Image.open(out / report["grid"])
    # torchvision's grid: 4 images per row (one digit), 10 rows, 8x8 images with 2-pixel padding.
    assert grid.size == (2 + 4 * (8 + 2), 2 + 10 * (8 + 2))
    assert report["classifier_held_out_accuracy"] > 0.97
    rows = report["scores"]
    assert [(r["sampler"], r["cfg_scale"] == 1.0) for r in rows] == [
        ("ddpm", True), ("ddpm", False), ("dpm-solver", True), ("dpm-solver", False)]
    for row in rows:
        assert row["samples"] == 20 and 0.0 <= row["accuracy"] <= 1.0
        with np.load(out / row["npz"]) as data:
            assert data["arr_0"].shape == (20, 8, 8, 3) and data["arr_0"].dtype == np.uint8
            assert data["labels"].shape == (20,) and set(data["labels"]) <= set(range(10))
    # --curve: the guided fast-solver row again for each kept checkpoint (steps 2 and 4 of 4).
    assert [r["train_step"] for r in report["curve"]] == [2, 4]
    assert report["curve"][-1]["accuracy"] == rows[-1]["accuracy"]  # the last checkpoint is the table's
    assert "label accuracy" in proc.stdout and "classifier on held-out real digits" in proc.stdout

    # A second run into the same folder must refuse, not mix two training runs.
    again = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already holds a training run" in again.stderr
