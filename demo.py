"""
The whole pipeline on real data, on a CPU, in minutes: scikit-learn's handwritten digits.

    python demo.py                      # about 4 minutes on a 2-core CPU; writes demo/
    python demo.py --quick              # a few training steps: checks every stage runs (CI)

scikit-learn ships 1,797 grayscale 8x8 images of the digits 0-9 (no download). The demo runs the
repository's scripts exactly as a user would, each as its own process:

    1. write the digits as an ImageFolder          demo/digits/<0..9>/<index>.png
    2. python extract_features.py --vae none       demo/features/      (a pixel-space store)
    3. python train.py --model DiT-Digits/4 ...    demo/results/.../checkpoints/<step>.pt
    4. python sample.py --class-labels 0 ... 9 --nrow 8   demo/digits_grid.png (a row per digit,
       enlarged 6x: sample.py's own 8x8-pixel grid is demo/samples/digits_grid_8px.png)
    5. python sample_ddp.py (once per setting)     demo/samples/*.npz
    6. the score: the share of generated digits that a classifier fit on the real digits assigns to
       the label they were generated for, with and without guidance, for DDPM and DPM-Solver++;
       printed as a table and saved as demo/scores.json next to the grid.

Settings: DiT-Digits/4 (6 blocks of width 192, 4.2M parameters, patch 4: 4 tokens) on the native 8x8
pixels, batch 128, 600 steps of AdamW at lr 6e-3 after 100 warm-up steps, EMA 0.999 with warm-up
(short runs need it), label dropout 0.1, no flips (a mirrored digit is another glyph), float32.
Measured on a 2-core CPU: with patch 2 (DiT-Digits/2, 16 tokens) a step costs 2.7x more and the
labels take hold later (at lr 6e-3: 700 steps, 8.2 minutes in all, 99.5-100% of guided digits
right); the learning rate decides how soon they take hold (lr 2e-3 needed 1,200 steps at patch 2).
bf16 autocast made a step 7x slower on this CPU (AVX2, no bf16 arithmetic), and a step of batch
256 costs only 2-8% less per image than two of 128. --curve scores every kept checkpoint, e.g.

    python demo.py --out /tmp/demo_curve --steps 900 --ckpt-every 150 --curve --num-score-samples 100

gives the share of correctly labelled digits against training steps.

The classifier is an RBF support vector machine on the 8x8 images, fit on three quarters of the real
digits; its accuracy on the remaining quarter is in the table as the ceiling to compare with.
Generated images are averaged over their three (equal) channels and, when --image-size is not 8,
area-downsampled back to 8x8 before they are classified.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from files import UserError, run_script

ROOT = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
GRID_COLUMNS = 8  # samples per digit: the grid has a row per digit
GRID_SCALE = 6  # each pixel a 6x6 square: the 82x102-pixel grid of 8x8 digits is shown 492x612


class DemoError(UserError, RuntimeError):
    """A stage's script failed or left no output."""


def write_image_folder(root, image_size):
    """
    Write every digit as <root>/<label>/<index>.png, grayscale, upsampled with bicubic filtering when
    image_size > 8 (extract_features.py converts to RGB and crops, which is exact at this size).

    :return: number of images written.
    """
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(root, str(label)), exist_ok=True)
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        img = Image.fromarray(image, mode="L")
        if image_size != 8:
            img = img.resize((image_size, image_size), Image.BICUBIC)
        img.save(os.path.join(root, str(label), f"{i:04d}.png"))
    return len(pixels)


def fit_classifier():
    """:return: (an SVC fit on 3/4 of the real 8x8 digits, its accuracy on the held-out 1/4)."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    classifier = SVC(gamma=0.001, C=10.0).fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


def to_digit_features(images):
    """
    :param images: [N x H x W x 3] uint8 generated images.
    :return: [N x 64] in the real digits' scale (0..16 on an 8x8 grid), what the classifier reads.
    """
    gray = images.astype(np.float64).mean(axis=3)  # (N, H, W)
    n, h, w = gray.shape
    if (h, w) != (8, 8):
        if h % 8 or w % 8:
            raise DemoError(f"generated images are {h}x{w}: --image-size must be a multiple of 8")
        gray = gray.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))  # area downsampling to 8x8
    return (gray * (16.0 / 255.0)).reshape(n, 64)


def enlarge(src, dst, scale):
    """Write the image src enlarged scale times, each pixel a square (no smoothing, so the 8x8 digits
    are shown as they are)."""
    with Image.open(src) as img:
        img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(dst)


def run(stage, command, log_dir):
    """Run one script as its own process (output to the terminal and to <log_dir>/<stage>.log)."""
    print(f"\n[{stage}] {' '.join(command)}", flush=True)
    start = time.time()
    log_path = os.path.join(log_dir, f"{stage}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
    if proc.returncode != 0:
        raise DemoError(f"stage {stage} failed with exit status {proc.returncode}; see {log_path}")
    seconds = time.time() - start
    print(f"[{stage}] done in {seconds:.0f} s", flush=True)
    return seconds


def all_checkpoints(results_dir):
    found = sorted(glob.glob(os.path.join(results_dir, "*", "checkpoints", "*.pt")))
    if not found:
        raise DemoError(f"train.py left no checkpoint under {results_dir}")
    return found


def score(ckpt, sampler, steps, cfg, classifier, args, samples, logs, stage):
    """
    Sample --num-score-samples digits from ckpt with sample_ddp.py and classify them.

    :return: (a row of the score table, the seconds sample_ddp.py took).
    """
    seconds = run(stage, [
        sys.executable, "sample_ddp.py", "--ckpt", ckpt, "--sample-dir", samples, "--num-fid-samples",
        str(args.num_score_samples), "--per-proc-batch-size", str(args.num_score_samples),
        "--sampler", sampler, "--num-sampling-steps", str(steps), "--cfg-scale", str(cfg),
    ], logs)
    step = os.path.splitext(os.path.basename(ckpt))[0]  # sample_ddp.py names its output after the checkpoint
    npz = sorted(glob.glob(os.path.join(samples, f"*-{step}-*-cfg-{cfg}-{sampler}-{steps}-seed-0.npz")))
    if len(npz) != 1:
        raise DemoError(f"expected one .npz for {stage} in {samples}, found {len(npz)}")
    with np.load(npz[0]) as data:
        images, labels_drawn = data["arr_0"], data["labels"]
    predicted = classifier.predict(to_digit_features(images))
    per_class = {int(c): float((predicted[labels_drawn == c] == c).mean())
                 for c in range(NUM_CLASSES) if (labels_drawn == c).any()}
    row = dict(sampler=sampler, steps=steps, cfg_scale=cfg, samples=len(images),
               accuracy=float((predicted == labels_drawn).mean()), per_class=per_class,
               seconds=round(seconds, 1), npz=os.path.relpath(npz[0], os.path.dirname(samples)))
    return row, seconds


def score_settings(args):
    """(name, sampler, steps, cfg scale) of every row of the score table."""
    rows = []
    for sampler, steps in (("ddpm", args.ddpm_steps), ("dpm-solver", args.solver_steps)):
        for cfg in (1.0, args.cfg_scale):
            rows.append((f"{sampler} {steps} steps, " + ("no guidance" if cfg == 1.0 else f"guidance {cfg:g}"),
                         sampler, steps, cfg))
    return rows


def main(args):
    start = time.time()
    out = os.path.abspath(args.out)
    folder, features, results = (os.path.join(out, name) for name in ("digits", "features", "results"))
    samples, logs = os.path.join(out, "samples"), os.path.join(out, "logs")
    if os.path.exists(results) and os.listdir(results):
        raise DemoError(f"{results} already holds a training run: use another --out or remove it")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(samples, exist_ok=True)
    python = sys.executable
    timings = {}

    count = write_image_folder(folder, args.image_size)
    print(f"[data] wrote {count} digits ({args.image_size}x{args.image_size}) to {folder}")

    timings["extract"] = run("extract", [
        python, "extract_features.py", "--data-path", folder, "--features-path", features,
        "--image-size", str(args.image_size), "--vae", "none", "--dtype", "float32", "--num-workers", "0",
    ], logs)

    timings["train"] = run("train", [
        python, "train.py", "--features-path", features, "--results-dir", results, "--model", args.model,
        "--max-steps", str(args.steps), "--global-batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--warmup-steps", str(min(args.warmup_steps, args.steps)), "--ema-decay", str(args.ema_decay),
        "--ema-warmup", "--no-flip", "--mixed-precision", "no", "--num-workers", "0", "--no-progress",
        "--log-every", str(max(1, args.steps // 10)), "--ckpt-every", str(args.ckpt_every or args.steps),
        "--ckpt-keep-last", str(args.steps // (args.ckpt_every or args.steps) + 1), "--global-seed", "0",
    ], logs)
    ckpt = all_checkpoints(results)[-1]

    # sample.py's grid, a row per digit, at the digits' own 8x8 pixels; the demo shows it enlarged. DDPM
    # draws it: after this short training its stochastic steps leave cleaner backgrounds than the solver.
    small_grid, grid = os.path.join(samples, "digits_grid_8px.png"), os.path.join(out, "digits_grid.png")
    labels = [str(label) for label in range(NUM_CLASSES) for _ in range(GRID_COLUMNS)]
    timings["sample"] = run("sample", [
        python, "sample.py", "--ckpt", ckpt, "--class-labels", *labels, "--nrow", str(GRID_COLUMNS),
        "--sampler", "ddpm", "--num-sampling-steps", str(args.ddpm_steps),
        "--cfg-scale", str(args.cfg_scale), "--output", small_grid,
    ], logs)
    if not os.path.isfile(small_grid):
        raise DemoError(f"sample.py left no grid at {small_grid}")
    enlarge(small_grid, grid, GRID_SCALE)

    classifier, ceiling = fit_classifier()
    table = []
    for name, sampler, steps, cfg in score_settings(args):
        stage = f"score-{sampler}-cfg{cfg:g}"
        row, timings[stage] = score(ckpt, sampler, steps, cfg, classifier, args, samples, logs, stage)
        table.append(dict(setting=name, **row))

    curve = []
    if args.curve:  # the guided fast-solver row for every kept checkpoint: accuracy against training steps
        for path in all_checkpoints(results):
            step = int(os.path.splitext(os.path.basename(path))[0])  # train.py names checkpoints by step
            if path == ckpt:  # the table's last row is this very setting on this checkpoint
                row = {k: v for k, v in table[-1].items() if k != "setting"}
            else:
                row, _ = score(path, "dpm-solver", args.solver_steps, args.cfg_scale, classifier, args, samples,
                               logs, f"curve-{step}")
            curve.append(dict(train_step=step, **row))

    total = time.time() - start
    width = max(len(row["setting"]) for row in table)
    lines = [f"{'setting':<{width}}  label accuracy", f"{'-' * width}  --------------"]
    lines += [f"{row['setting']:<{width}}  {row['accuracy']:.1%}" for row in table]
    lines.append(f"{'classifier on held-out real digits':<{width}}  {ceiling:.1%}")
    if curve:
        setting = f"dpm-solver {args.solver_steps} steps, guidance {args.cfg_scale:g}"
        lines += ["", f"training step  label accuracy ({setting})"]
        lines += [f"{row['train_step']:>13}  {row['accuracy']:.1%}" for row in curve]
    report = dict(
        model=args.model, image_size=args.image_size, train_steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, ema_decay=args.ema_decay, checkpoint=os.path.relpath(ckpt, out), grid=os.path.relpath(grid, out),
        classifier="SVC(rbf, gamma=0.001, C=10) on 8x8 digits, fit on 3/4 of them",
        classifier_held_out_accuracy=ceiling, scores=table, curve=curve,
        seconds={k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)},
    )
    scores_path = os.path.join(out, "scores.json")
    with open(scores_path, "w") as f:
        json.dump(report, f, indent=1)
    print("\n" + "\n".join(lines))
    print(f"\ngrid: {grid}\nscores: {scores_path}\ntotal: {total / 60:.1f} min "
          f"(training {timings['train'] / 60:.1f} min)")
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--out", default="demo", help="output folder (data, store, run, grid, scores)")
    parser.add_argument("--quick", action="store_true",
                        help="a few training steps and few, short samples: checks the stages, not the quality")
    parser.add_argument("--model", default="DiT-Digits/4", help="a name from models.DiT_models")
    parser.add_argument("--image-size", type=int, default=8, help="pixels; the 8x8 digits are upsampled to it")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600; --quick 4)")
    parser.add_argument("--ckpt-every", type=int, default=None,
                        help="also keep checkpoints every this many steps (default: only the last)")
    parser.add_argument("--curve", action="store_true",
                        help="also score every kept checkpoint (see --ckpt-every) with the guided fast solver")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warmup")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--ddpm-steps", type=int, default=None, help="default 250; --quick 10")
    parser.add_argument("--solver-steps", type=int, default=None, help="default 20; --quick 5")
    parser.add_argument("--num-score-samples", type=int, default=None, help="per setting; default 200, --quick 20")
    args = parser.parse_args(argv)
    defaults = dict(steps=(600, 4), ddpm_steps=(250, 10), solver_steps=(20, 5), num_score_samples=(200, 20))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.image_size < 8 or args.image_size % 8:
        parser.error("--image-size must be a multiple of 8 (the digits are 8x8)")
    if min(args.steps, args.batch_size, args.ddpm_steps, args.solver_steps, args.num_score_samples) < 1:
        parser.error("--steps, --batch-size, --*-steps and --num-score-samples must be >= 1")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
