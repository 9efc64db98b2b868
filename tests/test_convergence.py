"""bench/convergence.py's parts that decide what the score means: the splits, the folder the DiT trains
on, the scorer's determinism and the table's arithmetic (the benchmark itself is run by hand)."""
import glob
import os
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import convergence  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_splits_are_disjoint_stratified_and_cover_the_digits(digits):
    splits = convergence.make_splits(digits.target)
    held, scorer, encoder = (set(s) for s in (splits.held, splits.scorer, splits.encoder))
    assert not held & scorer and not held & encoder and not scorer & encoder
    assert held | scorer | encoder == set(range(len(digits.target)))
    assert (len(held), len(scorer), len(encoder)) == (450, 673, 674)
    for part in (splits.held, splits.scorer, splits.encoder):  # every split has each digit in its share
        share = np.bincount(digits.target[part], minlength=10) / len(part)
        assert np.abs(share - np.bincount(digits.target) / len(digits.target)).max() < 0.01
    again = convergence.make_splits(digits.target)
    assert all(np.array_equal(a, b) for a, b in zip((splits.held, splits.scorer), (again.held, again.scorer)))


def test_the_training_folder_holds_no_held_out_digit(tmp_path, digits):
    splits = convergence.make_splits(digits.target)
    root = tmp_path / "digits"
    convergence.write_training_folder(str(root), splits)
    written = {int(os.path.splitext(os.path.basename(p))[0]) for p in glob.glob(str(root / "*" / "*.png"))}
    assert written == set(splits.training)
    assert not os.path.exists(str(root) + ".partial")


def test_the_scorer_is_deterministic_and_leaves_the_global_rng_alone(digits):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    x, y = digits.data[:200], digits.target[:200]
    a, b = (convergence.train_scorer(x, y, epochs=5) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(torch.get_rng_state(), before)


def test_the_score_of_real_digits_is_near_the_floor_and_noise_far_from_it(digits):
    splits = convergence.make_splits(digits.target)
    pixels = digits.data
    scorer = convergence.train_scorer(pixels[splits.scorer], digits.target[splits.scorer], epochs=200)
    with torch.no_grad():
        held = scorer.features(torch.as_tensor(pixels[splits.held], dtype=torch.float32)).numpy()
    reference = convergence.Reference(scorer, *convergence.statistics(held))
    images = convergence.as_uint8(digits.images)
    real = reference.score(images[splits.encoder], digits.target[splits.encoder])
    noise = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    random = reference.score(noise, digits.target[:300])
    assert real["fd"] < 0.5 and real["accuracy"] > 0.9
    assert random["fd"] > 20 * real["fd"] and random["accuracy"] < 0.3


def test_the_table_gives_mean_spread_and_the_steps_to_reach_a():
    def run(values):
        return {step: dict(fd=v, accuracy=0.5) for step, v in zip((100, 200, 300), values)}

    scores = {"A-seed0": run([9, 5, 3]), "A-seed1": run([11, 7, 5]),  # A ends at a mean of 4
              "B-seed0": run([8, 4, 2]), "B-seed1": run([6, 4.5, 3]),  # B's mean is 4.25 at 200: not yet
              "C-seed0": run([4, 2, 1]), "C-seed1": run([3.5, 2, 1])}  # C's mean is 3.75 at 100
    table, reach = convergence.summarize(scores, 300)
    assert table["A"][300]["fd_mean"] == 4 and table["A"][300]["fd_sd"] == pytest.approx(np.sqrt(2))
    assert (table["B"][100]["fd_min"], table["B"][100]["fd_max"]) == (6, 8)
    assert reach == {"A": 300, "B": 300, "C": 100}


def test_bad_flags_end_in_parser_errors(capsys):
    for argv in (["--steps", "250", "--score-every", "100"], ["--num-samples", "10"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            convergence.parse_args(["--out", "x", *argv])
        assert "error:" in capsys.readouterr().err


def test_a_rerun_into_out_with_other_settings_is_refused(tmp_path):
    _, args = convergence.parse_args(["--out", str(tmp_path), "--quick"])
    convergence.check_settings(args)
    convergence.check_settings(args)  # a rerun with the same settings continues
    _, other = convergence.parse_args(["--out", str(tmp_path), "--quick", "--steps", "30"])
    with pytest.raises(convergence.BenchError, match=r"other settings \(steps\)"):
        convergence.check_settings(other)
