"""plot_stats.py: the PNG shows each run's data where it belongs (a falling loss falls, a shorter run
ends earlier, the drops are in proportion), --smooth averages, and bad inputs are one-line errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import plot_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(folder, losses, every=100, **extra):
    """A run folder whose stats.jsonl logs `losses` every `every` steps, with `extra` keys in each record."""
    os.makedirs(folder)
    with open(os.path.join(folder, "stats.jsonl"), "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"step": (i + 1) * every, "loss": loss, "lr": 1e-4, **extra}) + "\n")
    return str(folder)


def plot(*argv):
    _, args = plot_stats.parse_args([str(a) for a in argv])
    plot_stats.main(args)
    return np.asarray(Image.open(args.out).convert("RGB"))


def line(pixels, colour):
    """{column: mean row} of the pixels of `colour` in the columns joined to its leftmost one: the plotted
    line, without its legend swatch (which lies apart, right of the plot)."""
    rows, cols = np.nonzero((pixels == colour).all(axis=-1))
    assert cols.size, f"no pixel of colour {colour}"
    found, col, present = {}, cols.min(), set(cols.tolist())
    while col in present:
        found[col] = rows[cols == col].mean()
        col += 1
    return found


def test_each_run_is_drawn_where_its_data_says(tmp_path):
    a = write_run(tmp_path / "000-DiT-S-2", np.linspace(1.0, 0.5, 20).tolist())  # steps 100..2000
    b = write_run(tmp_path / "001-DiT-S-2", np.linspace(0.4, 0.2, 10).tolist())  # steps 100..1000
    pixels = plot(a, b, "--out", tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").format == "PNG"
    assert pixels.shape == (plot_stats.HEIGHT, plot_stats.WIDTH, 3)
    line_a, line_b = line(pixels, plot_stats.COLOURS[0]), line(pixels, plot_stats.COLOURS[1])
    start, end_a, end_b = min(line_a), max(line_a), max(line_b)
    assert min(line_b) == start  # both runs start at step 100
    assert (end_b - start) / (end_a - start) == pytest.approx(900 / 1900, abs=0.02)
    # Image rows grow downwards: a falling loss ends lower (a larger row) than it starts.
    assert line_a[end_a] > line_a[start] + 100
    assert line_b[end_b] > line_b[start] + 30
    assert all(line_b[col] > line_a[col] for col in line_b)  # b's losses are all below a's
    assert (line_a[end_a] - line_a[start]) / (line_b[end_b] - line_b[start]) == pytest.approx(0.5 / 0.2, rel=0.05)
    for colour, end in [(plot_stats.COLOURS[0], end_a), (plot_stats.COLOURS[1], end_a)]:  # legend swatches
        assert (pixels[:, end + 10:] == colour).all(axis=-1).sum() > 20


def test_a_run_with_one_record_is_a_dot(tmp_path):
    found = line(plot(write_run(tmp_path / "run", [0.5]), "--out", tmp_path / "loss.png"), plot_stats.COLOURS[0])
    assert 5 <= len(found) <= 8


def test_smooth_draws_the_mean_of_the_last_n_intervals(tmp_path):
    run = write_run(tmp_path / "run", [1.0, 0.0] * 20)
    raw = line(plot(run, "--out", tmp_path / "raw.png"), plot_stats.COLOURS[0])
    smooth = line(plot(run, "--out", tmp_path / "smooth.png", "--smooth", "2"), plot_stats.COLOURS[0])
    right_half = lambda found: [row for col, row in found.items() if col > (min(found) + max(found)) / 2]
    # Each column of the zigzag spans much of the height (its mean row sits near the middle, so look at
    # the spread across columns); averaged over two intervals every point after the first is 0.5: flat.
    assert np.ptp(right_half(raw)) > 50
    assert np.ptp(right_half(smooth)) <= 2


def test_values_that_are_not_finite_numbers_are_left_out(tmp_path):
    run = write_run(tmp_path / "run", [0.5] * 4)
    with open(os.path.join(run, "stats.jsonl"), "a") as f:
        for step, loss in enumerate([math.nan, "0.1", None, [0.2], True, {"a": 1}, 0.3], 5):
            f.write(json.dumps({"step": step * 100, "loss": loss}) + "\n")
    steps, values = plot_stats.read_series(run, "loss", 1)
    assert steps == (100, 200, 300, 400, 1100) and values == [0.5] * 4 + [0.3]
    found = line(plot(run, "--out", tmp_path / "loss.png"), plot_stats.COLOURS[0])
    assert found[max(found)] > found[min(found)] + 100  # the line reaches the last, finite point
    with open(os.path.join(run, "stats.jsonl"), "w") as f:
        f.write(json.dumps({"step": 100, "loss": "0.5"}) + "\n")
    with pytest.raises(plot_stats.PlotError, match="no finite number for 'loss'"):
        plot(run, "--out", tmp_path / "x.png")


@pytest.mark.parametrize("losses", [[1e308, 1e308], [-1e308, -1e307], [0.0, 0.0], [0.0, 5e-324], [5e-324, 5e-324],
                                    [1e-310, 2e-310], [1e15, 1e15 + 1], [3e7, 1e7]])
def test_extreme_values_are_drawn(tmp_path, losses):
    """Values near the float limits draw a line inside the plot with readable tick labels."""
    run = write_run(tmp_path / "run", losses)
    found = line(plot(run, "--out", tmp_path), plot_stats.COLOURS[0])  # --out DIR: DIR/loss.png
    assert os.path.isfile(tmp_path / "loss.png") and len(found) > 200
    assert all(40 <= row <= plot_stats.HEIGHT - 50 for row in found.values())
    labels = [label for _, label in plot_stats.ticks(*plot_stats.span(losses, 0.05))]
    assert 2 <= len(labels) <= 12 and max(map(len, labels)) <= 10, labels


def test_a_range_wider_than_a_float_is_refused(tmp_path):
    with pytest.raises(plot_stats.PlotError, match="the values run from -1e.308 to 1e.308, a range wider than"):
        plot(write_run(tmp_path / "run", [-1e308, 1e308]), "--out", tmp_path / "x.png")


def test_folder_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "old-run").mkdir()
    run = write_run(tmp_path / "run", [0.5, 0.4])
    for argv, message in [([tmp_path / "missing"], "missing is not a folder"),
                          ([run, tmp_path / "old-run"], "old-run has no stats.jsonl"),
                          ([run, "--smooth", "0"], "--smooth must be at least 1"),
                          ([run, "--out", tmp_path / "no" / "loss.png"], "its folder does not exist")]:
        with pytest.raises(SystemExit):
            plot_stats.parse_args([str(a) for a in argv])
        assert message in capsys.readouterr().err


def test_record_errors_name_the_problem(tmp_path):
    run = write_run(tmp_path / "run", [0.5, 0.4], loss_q0=math.nan)
    with pytest.raises(plot_stats.PlotError, match="no key 'los' in stats.jsonl; it has loss, loss_q0, lr$"):
        plot(run, "--key", "los", "--out", tmp_path / "x.png")
    with pytest.raises(plot_stats.PlotError, match="no finite number for 'loss_q0'"):
        plot(run, "--key", "loss_q0", "--out", tmp_path / "x.png")
    with pytest.raises(plot_stats.PlotError, match="has no records yet"):
        plot(write_run(tmp_path / "empty", []), "--out", tmp_path / "x.png")
    for damage, message in [("{not json", "line 3 is not JSON"), ('{"loss": 0.3}', "line 3 is not a stats record"),
                            ('"a string"', "line 3 is not a stats record")]:
        with open(os.path.join(run, "stats.jsonl"), "w") as f:
            f.write('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n' + damage + "\n")
        with pytest.raises(plot_stats.PlotError, match=f"stats.jsonl is damaged: .*{message}"):
            plot(run, "--out", tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


def test_the_script_reports_a_bad_key_in_one_line(tmp_path):
    run = write_run(tmp_path / "run", [0.5, 0.4])
    proc = subprocess.run([sys.executable, "plot_stats.py", run, "--key", "los", "--out", str(tmp_path / "x.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"plot_stats.py: error: {run}: no key 'los' in stats.jsonl; it has loss, lr"
