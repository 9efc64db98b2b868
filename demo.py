"""
The whole pipeline on real data, on a CPU, in minutes: scikit-learn's handwritten digits.

    python demo.py                      # about 4 minutes on a 2-core CPU; writes demo/
    python demo.py --quick              # a few training steps: checks every stage runs (CI)
    python demo.py --video              # moving digits: a video model against per-frame images; demo_video/
    python demo.py --video --quick

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

--video: every digit becomes a clip of --frames 8 frames of a --canvas 12 x 12 black field across which
it moves a pixel a frame along each axis (a random start and direction), bouncing off the edges. The
clips are written as folders of frames (demo_video/videos/<digit>/<index>/<frame>.png) and stored with
extract_features.py --num-frames 8 --vae none. First the baseline: train.py trains DiT-Digits/4 on all
the clips' frames as images (demo_video/frames/). Then train.py --init-from that checkpoint trains
VDiT-Digits/4 (the same blocks, each followed by a temporal block; 9 tokens a frame, 72 a clip) on the
clips: it starts as the baseline applied to each frame, as Open-Sora and Latte start from an image model.
sample.py draws the video model's animated grid (demo_video/video_grid.gif, a column per digit, enlarged
6x); sample_ddp.py draws --num-score-samples clips with labels from the seed, and sample.py draws the
baseline's clips for the same labels frame by frame, each frame with its own noise
(demo_video/baseline_clips.gif shows ten). Both models train SiT's flow with logit-normal time at lr 1e-3
(at the image demo's 6e-3 VDiT-Digits/4's loss stalls at 1.34, and DiT-Digits/4's jumps from 0.24 to
1.37 between steps 250 and 300 on these frames at batch 128) and sample with Heun's ODE (20 grid times)
and guidance. The scores, for the video model, the baseline and real clips:
    frame label accuracy   the share of frames that a classifier fit on real frames (an RBF SVM on the
                           8x8 window around each frame's centre of mass) assigns their clip's label
    identity consistency   the share of frames carrying their clip's majority label
    motion                 the mean length of the second difference of the centre of mass, in pixels:
                           0 for uniform motion; real clips score above 0 from their bounces
printed as a table and saved as demo_video/scores.json. Timings and scores: README.md (Video).
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


# (full, --quick) defaults of the flags left unset: the image demo's, and --video's.
IMAGE_DEFAULTS = dict(lr=(6e-3, 6e-3), steps=(600, 4), batch_size=(128, 128), warmup_steps=(100, 100),
                      ddpm_steps=(250, 10), solver_steps=(20, 5), num_score_samples=(200, 20))
VIDEO_DEFAULTS = dict(lr=(1e-3, 1e-3), steps=(400, 4), batch_size=(16, 8), baseline_steps=(800, 4),
                      baseline_batch_size=(64, 16), warmup_steps=(50, 50), clips=(1797, 64), ddpm_steps=(250, 10),
                      solver_steps=(20, 5), num_score_samples=(40, 4), grid_rows=(2, 1))


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


def output_folders(out):
    """
    The demo's folders under --out, refusing one that already holds a training run (train.py would start a
    second run beside it and the demo would score the wrong one).
    :return: (out as an absolute path, its results/, samples/ and logs/; the last two made).
    """
    out = os.path.abspath(out)
    results, samples, logs = (os.path.join(out, name) for name in ("results", "samples", "logs"))
    if os.path.exists(results) and os.listdir(results):
        raise DemoError(f"{results} already holds a training run: use another --out or remove it")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(samples, exist_ok=True)
    return out, results, samples, logs


def main(args):
    if args.video:
        return video_main(args)
    start = time.time()
    out, results, samples, logs = output_folders(args.out)
    folder, features = os.path.join(out, "digits"), os.path.join(out, "features")
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
    )
    return finish(out, report, lines, timings, total, timings["train"])


def finish(out, report, lines, timings, total, training):
    """Add the stage timings to the report, write it as <out>/scores.json and print the table.
    :param training: the seconds spent training. :return: the report."""
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)}
    scores_path = os.path.join(out, "scores.json")
    with open(scores_path, "w") as f:
        json.dump(report, f, indent=1)
    print("\n" + "\n".join(lines))
    print(f"\ngrid: {os.path.join(out, report['grid'])}\nscores: {scores_path}\ntotal: {total / 60:.1f} min "
          f"(training {training / 60:.1f} min)")
    return report


#################################################################################
#                 demo.py --video: digits moving across a canvas                #
#################################################################################


def moving_digits(canvas, frames, seed):
    """
    Every digit as a clip: the 8x8 digit moving across a canvas x canvas black field, from a random
    start at one pixel per frame along each axis (directions drawn from -1, 0, 1, not both 0), bouncing
    off the edges.

    :return: (videos [N x frames x canvas x canvas] uint8, labels [N] int64, positions [N x frames x 2]
              of the digit's top-left corner (row, column)).
    """
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    rng = np.random.default_rng(seed)
    room = canvas - 8  # the top-left corner's range, 0..room
    videos = np.zeros((len(pixels), frames, canvas, canvas), np.uint8)
    positions = np.zeros((len(pixels), frames, 2), np.int64)
    for n, digit in enumerate(pixels):
        position = rng.integers(0, room + 1, size=2)
        velocity = np.zeros(2, np.int64)
        while not velocity.any():
            velocity = rng.integers(-1, 2, size=2)
        for f in range(frames):
            row, col = position
            videos[n, f, row:row + 8, col:col + 8] = digit
            positions[n, f] = position
            position = position + velocity
            outside = (position < 0) | (position > room)  # bounce: step back inside, turn around
            position[outside] = np.where(position[outside] < 0, -position[outside], 2 * room - position[outside])
            velocity[outside] *= -1
    return videos, digits.target.astype(np.int64), positions


def write_videos(root, videos, labels):
    """Write each clip as a folder of frames, <root>/<label>/<index>/<frame>.png (grayscale), the layout
    extract_features.py --num-frames reads. :return: number of clips."""
    for n, (video, label) in enumerate(zip(videos, labels)):
        folder = os.path.join(root, str(label), f"{n:04d}")
        os.makedirs(folder, exist_ok=True)
        for f, frame in enumerate(video):
            Image.fromarray(frame, mode="L").save(os.path.join(folder, f"{f:02d}.png"))
    return len(videos)


def write_frames(root, videos, labels):
    """Write every frame of every clip as an image, <root>/<label>/<index>_<frame>.png: the image
    baseline's training set (the same frames, without their order). :return: number of images."""
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(root, str(label)), exist_ok=True)
    for n, (video, label) in enumerate(zip(videos, labels)):
        for f, frame in enumerate(video):
            Image.fromarray(frame, mode="L").save(os.path.join(root, str(label), f"{n:04d}_{f:02d}.png"))
    return videos.shape[0] * videos.shape[1]


def to_gray(videos):
    """:param videos: [N x F x H x W x 3] uint8. :return: [N x F x H x W] float64 in the digits' scale 0..16."""
    return videos.astype(np.float64).mean(axis=-1) * (16.0 / 255.0)


def centres(gray):
    """
    :param gray: [... x H x W] non-negative frames.
    :return: [... x 2] each frame's centre of mass (row, column) in pixels; the canvas centre for a blank frame.
    """
    h, w = gray.shape[-2:]
    mass = gray.sum(axis=(-2, -1))  # (...)
    rows = (gray.sum(axis=-1) * np.arange(h)).sum(axis=-1)
    cols = (gray.sum(axis=-2) * np.arange(w)).sum(axis=-1)
    blank = mass <= 1e-6
    safe = np.where(blank, 1.0, mass)
    return np.stack([np.where(blank, (h - 1) / 2, rows / safe), np.where(blank, (w - 1) / 2, cols / safe)], axis=-1)


def centred_crops(gray):
    """
    :param gray: [M x H x W] frames in the digits' scale.
    :return: [M x 64]: the 8x8 window of each frame centred on its centre of mass (zeros beyond the
             canvas), what the frame classifier reads: where the digit is does not change what it is.
    """
    padded = np.pad(gray, ((0, 0), (8, 8), (8, 8)))
    corner = np.round(centres(gray) - 3.5).astype(np.int64) + 8  # (M, 2), in padded coordinates
    return np.stack([p[r:r + 8, c:c + 8] for p, (r, c) in zip(padded, corner)]).reshape(len(gray), 64)


def fit_frame_classifier(videos, labels):
    """
    :param videos: [N x F x H x W] uint8 real clips; labels: [N].
    :return: (an RBF SVC on the centred crops of the frames of 3/4 of the clips, its accuracy on every
              frame of the other quarter).
    """
    train, test = train_test_split(np.arange(len(videos)), test_size=0.25, random_state=0, stratify=labels)
    gray = videos.astype(np.float64) * (16.0 / 255.0)
    frames = videos.shape[1]

    def crops(clips):
        return centred_crops(gray[clips].reshape(-1, *gray.shape[2:])), labels[clips].repeat(frames)

    classifier = SVC(gamma=0.001, C=10.0).fit(*crops(train[::2]))  # every other clip: enough, and 4x faster
    return classifier, float(classifier.score(*crops(test)))


def video_scores(gray, labels, classifier):
    """
    :param gray: [N x F x H x W] clips in the digits' scale; labels: [N] the labels they were made for.
    :return: dict(accuracy: the share of frames the classifier assigns their clip's label; consistency: the
             share of frames carrying their clip's majority label; smoothness: the mean length of the second
             difference of the centre of mass, in pixels per frame^2: 0 for uniform motion).
    """
    n, frames = gray.shape[:2]
    predicted = classifier.predict(centred_crops(gray.reshape(n * frames, *gray.shape[2:]))).reshape(n, frames)
    majority = np.array([np.bincount(p, minlength=NUM_CLASSES).max() for p in predicted])
    path = centres(gray)  # (N, F, 2)
    second = path[:, 2:] - 2 * path[:, 1:-1] + path[:, :-2]  # (N, F - 2, 2)
    return dict(accuracy=float((predicted == labels[:, None]).mean()), consistency=float(majority.sum() / (n * frames)),
                smoothness=float(np.linalg.norm(second, axis=-1).mean()))


def grid_cells(path, rows, columns, size):
    """
    Cut sample.py's grid (torchvision's make_grid: 2-pixel padding around every cell) into its cells.
    :return: [rows x columns x size x size x 3] uint8.
    """
    grid = np.asarray(Image.open(path).convert("RGB"))
    step = size + 2
    if grid.shape[:2] != (2 + rows * step, 2 + columns * step):
        raise DemoError(f"{path} is {grid.shape[1]}x{grid.shape[0]}, not a grid of {rows}x{columns} {size}-pixel cells")
    return np.stack([np.stack([grid[2 + r * step:2 + r * step + size, 2 + c * step:2 + c * step + size]
                               for c in range(columns)]) for r in range(rows)])


def save_gif(frames, path, scale):
    """Write [F x H x W x 3] uint8 frames as a looping GIF, each pixel a scale x scale square."""
    images = [Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
              for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)


def video_main(args):
    start = time.time()
    out, results, samples, logs = output_folders(args.out)
    python = sys.executable
    timings = {}

    videos, labels, _ = moving_digits(args.canvas, args.frames, seed=0)
    videos, labels = videos[:args.clips], labels[:args.clips]
    clips, frames_dir = os.path.join(out, "videos"), os.path.join(out, "frames")
    write_videos(clips, videos, labels)
    write_frames(frames_dir, videos, labels)
    print(f"[data] wrote {len(videos)} clips of {args.frames} {args.canvas}x{args.canvas} frames to {clips}, "
          f"and their frames as images to {frames_dir}")

    store, image_store = os.path.join(out, "features"), os.path.join(out, "features_frames")
    extract = [python, "extract_features.py", "--image-size", str(args.canvas), "--vae", "none",
               "--dtype", "float32", "--num-workers", "0"]
    timings["extract"] = run("extract", extract + [
        "--data-path", clips, "--features-path", store, "--num-frames", str(args.frames), "--frame-stride", "1"], logs)
    timings["extract-frames"] = run("extract-frames", extract + [
        "--data-path", frames_dir, "--features-path", image_store], logs)

    def train(stage, model, features, steps, batch_size, *extra):
        folder = os.path.join(results, stage)
        timings[stage] = run(stage, [
            python, "train.py", "--features-path", features, "--results-dir", folder, "--model", model,
            "--max-steps", str(steps), "--global-batch-size", str(batch_size), "--lr", str(args.lr),
            "--warmup-steps", str(min(args.warmup_steps, steps)), "--ema-decay", str(args.ema_decay),
            "--ema-warmup", "--no-flip", "--mixed-precision", "no", "--num-workers", "0", "--no-progress",
            "--log-every", str(max(1, steps // 10)), "--ckpt-every", str(steps), "--global-seed", "0",
            "--objective", "flow", "--time-sampling", "logit-normal",  # a third of DDPM's steps (bench/README.md)
            *extra], logs)
        return all_checkpoints(folder)[-1]

    # The baseline first: the video model starts from its weights (its spatial blocks), as Open-Sora and Latte
    # start from an image model, so it begins as the baseline applied to each frame.
    image_ckpt = train("train-frames", args.model, image_store, args.baseline_steps, args.baseline_batch_size)
    video_ckpt = train("train-video", args.video_model, store, args.steps, args.batch_size, "--init-from", image_ckpt)
    sampler = ["--sampler", "heun", "--num-sampling-steps", str(args.solver_steps),
               "--cfg-scale", str(args.cfg_scale)]

    # sample.py's animated grid of the video model: a column per digit.
    small_grid, grid = os.path.join(samples, "video_grid_small.gif"), os.path.join(out, "video_grid.gif")
    grid_labels = [str(label) for _ in range(args.grid_rows) for label in range(NUM_CLASSES)]
    timings["sample"] = run("sample", [
        python, "sample.py", "--ckpt", video_ckpt, "--class-labels", *grid_labels, "--nrow", str(NUM_CLASSES),
        "--output", small_grid, *sampler], logs)
    with Image.open(small_grid) as gif:
        if gif.n_frames != args.frames:
            raise DemoError(f"sample.py's {small_grid} has {gif.n_frames} frames, not {args.frames}")
        grid_frames = []
        for f in range(gif.n_frames):
            gif.seek(f)
            grid_frames.append(np.asarray(gif.convert("RGB")))
    save_gif(np.stack(grid_frames), grid, GRID_SCALE)

    # The video model's clips for the score, from sample_ddp.py (labels drawn per clip from the seed).
    n = args.num_score_samples
    timings["score-video"] = run("score-video", [
        python, "sample_ddp.py", "--ckpt", video_ckpt, "--sample-dir", samples, "--num-fid-samples", str(n),
        "--per-proc-batch-size", str(n), *sampler], logs)
    npz = glob.glob(os.path.join(samples, f"{args.video_model.replace('/', '-')}-*.npz"))
    if len(npz) != 1:
        raise DemoError(f"expected one .npz of the video model in {samples}, found {len(npz)}")
    with np.load(npz[0]) as data:
        generated, drawn = data["arr_0"], data["labels"]  # (N, F, H, W, 3), (N,)

    # The baseline: the image model draws each frame of the same labels' clips on its own (independent noise),
    # one grid row per clip, cut apart again.
    baseline_grid = os.path.join(samples, "baseline_grid.png")
    timings["score-baseline"] = run("score-baseline", [
        python, "sample.py", "--ckpt", image_ckpt, "--class-labels", *[str(y) for y in drawn.repeat(args.frames)],
        "--nrow", str(args.frames), "--output", baseline_grid, *sampler], logs)
    baseline = grid_cells(baseline_grid, n, args.frames, args.canvas)  # (N, F, H, W, 3)
    save_gif(baseline[:NUM_CLASSES].transpose(1, 0, 2, 3, 4).reshape(args.frames, args.canvas, -1, 3),
             os.path.join(out, "baseline_clips.gif"), GRID_SCALE)

    classifier, ceiling = fit_frame_classifier(videos, labels)
    real = np.random.default_rng(1).choice(len(videos), size=min(len(videos), max(n, 200)), replace=False)
    table = [dict(setting=f"video model ({args.video_model})", **video_scores(to_gray(generated), drawn, classifier)),
             dict(setting=f"per-frame baseline ({args.model})", **video_scores(to_gray(baseline), drawn, classifier)),
             dict(setting="real clips", **video_scores(videos[real] * (16.0 / 255.0), labels[real], classifier))]

    total = time.time() - start
    width = max(len(row["setting"]) for row in table)
    lines = [f"{'':<{width}}  frame label accuracy  identity consistency  motion (2nd difference, px)",
             f"{'-' * width}  --------------------  --------------------  ---------------------------"]
    lines += [f"{row['setting']:<{width}}  {row['accuracy']:>20.1%}  {row['consistency']:>20.1%}  "
              f"{row['smoothness']:>27.2f}" for row in table]
    lines.append(f"{'frame classifier on held-out real clips':<{width}}  {ceiling:>20.1%}")
    report = dict(
        video_model=args.video_model, baseline_model=args.model, canvas=args.canvas, frames=args.frames,
        clips=len(videos), train_steps=args.steps, batch_size=args.batch_size, baseline_train_steps=args.baseline_steps,
        baseline_batch_size=args.baseline_batch_size, lr=args.lr, ema_decay=args.ema_decay,
        sampler=f"heun {args.solver_steps} steps, guidance {args.cfg_scale:g}", samples=n,
        checkpoints=dict(video=os.path.relpath(video_ckpt, out), baseline=os.path.relpath(image_ckpt, out)),
        grid=os.path.relpath(grid, out), npz=os.path.relpath(npz[0], out),
        classifier="SVC(rbf, gamma=0.001, C=10) on the 8x8 window around each frame's centre of mass",
        classifier_held_out_accuracy=ceiling, scores=table,
    )
    return finish(out, report, lines, timings, total, timings["train-video"] + timings["train-frames"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--out", default=None, help="output folder (data, stores, runs, grids, scores); default demo, "
                                                    "demo_video with --video")
    parser.add_argument("--quick", action="store_true",
                        help="a few training steps and few, short samples: checks the stages, not the quality")
    parser.add_argument("--video", action="store_true",
                        help="the video demo: digits moving across a canvas, a video model against the image model "
                             "applied frame by frame")
    parser.add_argument("--model", default="DiT-Digits/4",
                        help="a name from models.DiT_models (with --video: the per-frame baseline)")
    parser.add_argument("--video-model", default="VDiT-Digits/4", help="--video: a name from models.VDiT_models")
    parser.add_argument("--image-size", type=int, default=8, help="pixels; the 8x8 digits are upsampled to it")
    parser.add_argument("--canvas", type=int, default=12, help="--video: the frames' side in pixels (>= 8)")
    parser.add_argument("--frames", type=int, default=8, help="--video: frames per clip (>= 3)")
    parser.add_argument("--clips", type=int, default=None, help="--video: clips, one per digit (default all 1797; "
                                                                "--quick 64)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 600; --quick 4; --video: the video model's, default "
                             f"{VIDEO_DEFAULTS['steps'][0]})")
    parser.add_argument("--ckpt-every", type=int, default=None,
                        help="also keep checkpoints every this many steps (default: only the last)")
    parser.add_argument("--curve", action="store_true",
                        help="also score every kept checkpoint (see --ckpt-every) with the guided fast solver")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default 128; --video: clips, default {VIDEO_DEFAULTS['batch_size'][0]}")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help=f"--video: the image model's training steps (default {VIDEO_DEFAULTS['baseline_steps'][0]})")
    parser.add_argument("--baseline-batch-size", type=int, default=None,
                        help=f"--video: the image model's batch (default {VIDEO_DEFAULTS['baseline_batch_size'][0]})")
    parser.add_argument("--lr", type=float, default=None,
                        help="default 6e-3; --video 1e-3 (at 6e-3 VDiT-Digits/4's flow loss stalls at 1.34)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warmup (default 100; "
                                                                       "--video 50)")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--ddpm-steps", type=int, default=None, help="default 250; --quick 10")
    parser.add_argument("--solver-steps", type=int, default=None, help="default 20; --quick 5")
    parser.add_argument("--num-score-samples", type=int, default=None,
                        help="per setting; default 200, --quick 20; --video: clips, default "
                             f"{VIDEO_DEFAULTS['num_score_samples'][0]}, --quick 4")
    parser.add_argument("--grid-rows", type=int, default=None, help="--video: rows of the animated grid (default 2)")
    args = parser.parse_args(argv)
    defaults = VIDEO_DEFAULTS if args.video else IMAGE_DEFAULTS
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.out = args.out or ("demo_video" if args.video else "demo")
    if args.video:
        if args.canvas < 8 or args.frames < 3 or not 1 <= args.clips <= 1797:
            parser.error("--canvas must be >= 8 (the digits are 8x8), --frames >= 3 (a second difference), "
                         "--clips in 1..1797")
        if args.curve:
            parser.error("--curve is for the image demo")
        if min(args.baseline_steps, args.baseline_batch_size, args.grid_rows) < 1:
            parser.error("--baseline-steps, --baseline-batch-size and --grid-rows must be >= 1")
    if args.image_size < 8 or args.image_size % 8:
        parser.error("--image-size must be a multiple of 8 (the digits are 8x8)")
    if min(args.steps, args.batch_size, args.ddpm_steps, args.solver_steps, args.num_score_samples) < 1:
        parser.error("--steps, --batch-size, --*-steps and --num-score-samples must be >= 1")
    return parser, args

if __name__ == "__main__":
    run_script(parse_args, main)
