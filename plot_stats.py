"""
Draw a figure from train.py's stats.jsonl against the training step, one line per run, to a PNG.

    python plot_stats.py results/000-DiT-S-2 --out loss.png
    python plot_stats.py results/000-DiT-S-2 results/001-DiT-S-2 --out loss.png --smooth 10
    python plot_stats.py results/000-DiT-S-2 --key loss_q0 --out loss_q0.png

--key is any key of the records: loss (default), grad_norm, lr, steps_per_s, images_per_s,
tflops_per_device, and loss_q0..loss_q3 with train.py --log-quartiles. --smooth N draws the mean of
the last N log intervals. Only finite numbers are drawn: a diverged loss, an empty quartile, a null
or a string is left out. Drawn with Pillow, a dependency already, so no matplotlib is needed.
"""
import argparse
import math
import os

from PIL import Image, ImageDraw, ImageFont

from files import UserError, run_script
from runs import RunError, read_stats  # the format's one reader (it skips a killed run's partial last line)

WIDTH, HEIGHT = 900, 500
COLOURS = [(0, 90, 200), (230, 110, 0), (0, 150, 70), (200, 30, 40),
           (120, 60, 170), (120, 80, 40), (220, 60, 160), (0, 160, 170)]  # one per run, repeating after 8
INK, GRID = (0, 0, 0), (225, 225, 225)


class PlotError(UserError, ValueError):
    """A run that cannot be drawn: no records, a damaged file, no such key, or no number to draw."""


def read_series(run_dir, key, smooth):
    """
    :return: the steps and the values of `key` in a run's stats.jsonl, each the mean of the last `smooth`.
    Only finite numbers are drawn: nulls, strings (even of numbers), lists and non-finite values are left out.
    """
    path = os.path.join(run_dir, "stats.jsonl")
    try:
        records = read_stats(run_dir)
    except (RunError, OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path} is damaged: {e}") from e
    if not records:
        raise PlotError(f"{path} has no records yet")
    if not any(key in r for r in records):
        keys = sorted({k for r in records for k in r} - {"step"})
        raise PlotError(f"{run_dir}: no key {key!r} in stats.jsonl; it has {', '.join(keys)}")
    points = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
    if not points:
        raise PlotError(f"{run_dir}: no finite number for {key!r} in stats.jsonl")
    steps, values = zip(*points)
    windows = (values[max(0, i + 1 - smooth):i + 1] for i in range(len(values)))
    return steps, [sum(w) / len(w) for w in windows]


def is_number(value):
    """A finite int or float (a bool, string, null or list is not a figure)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ticks(lo, hi, count=5):
    """:return: (value, label) for about `count` round values in [lo, hi], 1, 2 or 5 times a power of 10 apart."""
    power = 10 ** math.floor(math.log10((hi - lo) / count))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= (hi - lo) / count)
    decimals = max(0, -math.floor(math.log10(step)))
    label = (lambda v: f"{v:.{decimals}f}") if decimals <= 6 and step < 1e6 else (lambda v: f"{v:.4g}")
    return [(i * step, label(i * step)) for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def span(values, pad):
    """
    :return: the range of `values`, widened by `pad` of its length. A constant, or values too close together
    for the ticks' arithmetic (0 and 5e-324), get a range around them.
    :raises PlotError: a range wider than a float holds (-1e308 to 1e308).
    """
    lo, hi = min(values), max(values)
    magnitude = max(abs(lo), abs(hi))
    if hi - lo > max(magnitude * 1e-9, 1e-300):
        width = (hi - lo) * pad
    else:
        width = magnitude * 0.1 if magnitude * 0.1 > 1e-300 else 1.0
    if not math.isfinite((hi + width) - (lo - width)):
        raise PlotError(f"the values run from {lo:g} to {hi:g}, a range wider than a float holds")
    return lo - width, hi + width


def draw(series, title):
    """:return: an RGB image of each (name, steps, values) of `series` as a line, with axes and a legend."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    # The legend sits right of the plot, so it never hides a line.
    legend_width = max(d.textlength(name, font=font) for name, _, _ in series) + 40
    left, top, right, bottom = 80, 40, WIDTH - 20 - legend_width, HEIGHT - 50
    x0, x1 = span([s for _, steps, _ in series for s in steps], 0.0)
    y0, y1 = span([v for _, _, values in series for v in values], 0.05)

    def px(x, y):  # image rows grow downwards: the largest value is at the top
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for x, label in ticks(x0, x1):
        d.line([px(x, y0), px(x, y1)], fill=GRID)
        d.text((px(x, y0)[0], bottom + 6), label, fill=INK, font=font, anchor="mt")
    for y, label in ticks(y0, y1):
        d.line([px(x0, y), px(x1, y)], fill=GRID)
        d.text((left - 6, px(x0, y)[1]), label, fill=INK, font=font, anchor="rm")
    d.rectangle([left, top, right, bottom], outline=INK)
    for i, (name, steps, values) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = [px(x, y) for x, y in zip(steps, values)]
        if len(points) == 1:
            (x, y), = points
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            d.line(points, fill=colour, width=2, joint="curve")
        y = top + 10 + 20 * i
        d.line([(right + 20, y), (right + 40, y)], fill=colour, width=2)
        d.text((right + 48, y), name, fill=INK, font=font, anchor="lm")
    d.text(((left + right) / 2, 12), title, fill=INK, font=font, anchor="mt")
    d.text(((left + right) / 2, HEIGHT - 8), "step", fill=INK, font=font, anchor="mb")
    return image


def main(args):
    series = [(os.path.normpath(run), *read_series(run, args.key, args.smooth)) for run in args.runs]
    title = f"{args.key} against step" + (f" (mean of the last {args.smooth} log intervals)" if args.smooth > 1 else "")
    try:
        draw(series, title).save(args.out, format="PNG")
    except OSError as e:
        raise PlotError(f"cannot write {args.out}: {e}") from e
    print(f"wrote {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("runs", nargs="+", help="run folders written by train.py")
    parser.add_argument("--out", type=str, default=None, help="PNG to write (default <key>.png)")
    parser.add_argument("--key", type=str, default="loss", help="the stats.jsonl key to draw against step")
    parser.add_argument("--smooth", type=int, default=1, help="draw the mean of the last N log intervals")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not os.path.isdir(run):
            parser.error(f"{run} is not a folder")
        if not os.path.isfile(os.path.join(run, "stats.jsonl")):
            parser.error(f"{run} has no stats.jsonl: not a train.py run folder, or one from before stats.jsonl")
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    args.out = args.out or f"{args.key}.png"
    if os.path.isdir(args.out):  # --out DIR: the default name in that folder
        args.out = os.path.join(args.out, f"{args.key}.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: its folder does not exist")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
