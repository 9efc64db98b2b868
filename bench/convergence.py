"""
Rank training recipes on the digits by a continuous score: DiT's DDPM, SiT's flow with logit-normal
time, and the flow with REPA, trained at equal steps and batch with several seeds each.

    python bench/convergence.py --out /tmp/convergence --png bench/convergence.png   # the full run, see below
    python bench/convergence.py --out /tmp/convergence_quick --quick   # every stage, briefly (checks, no figures)
    python bench/convergence.py --out /tmp/convergence --seeds 5 --steps 900 --score-every 150 --num-samples 300

The digits demo (demo.py) saturates guided label accuracy, so it cannot tell recipes apart. Here:
- Splits of scikit-learn's 1,797 8x8 digits, stratified, fixed: H (1/4) is the Frechet reference and
  nothing else; the other 3/4 are the DiT's training images, themselves split in halves S (the
  scorer's) and E (the REPA encoder's).
- The scorer: an MLP on the 64 pixels (64-128-32-10, tanh on the 32), trained deterministically on S
  alone. The score of a checkpoint is the Frechet distance between the scorer's 32 penultimate
  features of N generated digits (no guidance, labels drawn uniformly) and those of H, with the
  share of generated digits the scorer labels as they were asked for. Its accuracy on H is the
  ceiling of that share, and the distance of N real digits of E to H is the floor of the score.
- The REPA encoder: timm's vit_tiny_patch16_224 built for 32x32 inputs (16-pixel patches: a 2x2 token
  grid, DiT-Digits/4's), trained supervised on E alone (a linear head on its mean patch token, so the
  patch tokens REPA reads are what is trained) and saved as a state_dict for extract_features.py
  --repa-encoder-weights. Supervised, because E is 674 images: too few for a self-supervised ViT to
  learn much on a CPU budget, and REPA's premise is a semantic encoder. The scorer and the encoder
  share no weights and no image (checked in code), so the encoder cannot carry the scorer's features
  or the reference's images into the DiT.
- Training: train.py as a subprocess per (recipe, seed) with the demo's settings (DiT-Digits/4, batch
  128, lr 6e-3, 100 warm-up steps, EMA 0.999 with warm-up, no flips, float32), --jobs at once with one
  thread each, a checkpoint every --score-every steps. A rerun skips finished trainings and scores.
  The recipes' own flags are in RECIPES (C: REPA on block 2 of 6, its projector 384 wide, said why there).
- Sampling, in this process's workers (one thread each): each recipe with its objective's default
  sampler at --sampling-steps (DDPM for A, the flow's SDE for B and C), the same noise and labels for
  every checkpoint.
Writes <out>/convergence.json (every score), <out>/convergence.md (the table: score against steps per
recipe, mean and spread over seeds, the steps each recipe needs to reach recipe A's final mean score)
and <out>/convergence.png (the curves), then copies the PNG to --png when given.

Cost, estimated from smoke runs on the 2-core machine while three other sessions loaded it (load
average 4-6), scaled to the machine alone (each of the 2 jobs on a core of its own): a 600-step
training about 3 minutes (3.5 steps/s on one thread), a score of 150 digits at 250 steps about 40 s,
the encoder about a minute. The default run is 9 trainings and 54 scores, about 65 job-minutes on 2
jobs: about 35 minutes in all. --quick is about a minute and a half alone (3.6 minutes loaded), most
of it process starts.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import glob
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo  # noqa: E402
import extract_features  # noqa: E402
import plot_stats  # noqa: E402
from checkpoints import build_model, checkpoint_files, load_checkpoint, resolve_spec  # noqa: E402
from evaluate import frechet_distance  # noqa: E402
from files import UserError, atomic_write, run_script  # noqa: E402
from sampling import ImageNoise, choose_sampler, latent_geometry, random_labels, sample_latents, to_uint8  # noqa: E402
from vae import decode  # noqa: E402

SPLIT_SEED = 0  # the splits, the scorer's and the encoder's training: fixed, so every run scores alike
SAMPLE_SEED = 0  # the noise and labels of the generated digits: the same for every checkpoint
NUM_CLASSES = demo.NUM_CLASSES
FEATURES = 32  # the scorer's penultimate width: the Frechet space
SCORER_EPOCHS = 500  # full-batch steps
ENCODER = "vit_tiny_patch16_224"
ENCODER_INPUT = 32  # 16-pixel patches: a 2x2 token grid, DiT-Digits/4's on the 8x8 digits
MODEL = "DiT-Digits/4"


class BenchError(UserError, RuntimeError):
    """A stage failed, or --out holds a run with other settings."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    key: str
    name: str
    flags: tuple  # train.py flags on top of the shared ones


RECIPES = (
    Recipe("A", "DiT (DDPM)", ("--objective", "ddpm")),
    Recipe("B", "flow + logit-normal", ("--objective", "flow", "--time-sampling", "logit-normal")),
    # REPA aligns block 8 of DiT-XL/2's 28; DiT-Digits/4 has 6 blocks: block 2 is about the same third. Its
    # projector is 2048 wide for XL's width 1152; at DiT-Digits' 192 that width has 1.7x the DiT's FLOPs (a step
    # took 2-3x recipe B's here), so it keeps about REPA's ratio of widths instead: 384, 10% of the DiT's FLOPs.
    Recipe("C", "flow + logit-normal + REPA", ("--objective", "flow", "--time-sampling", "logit-normal",
                                                "--repa-encoder", ENCODER, "--repa-depth", "2", "--repa-coeff", "0.5",
                                                "--repa-projector-dim", "384")),
)


#################################################################################
#                              Data and splits                                  #
#################################################################################


@dataclasses.dataclass
class Splits:
    """Indices into load_digits(): held (H, the reference), scorer (S), encoder (E); S + E = training."""

    held: np.ndarray
    scorer: np.ndarray
    encoder: np.ndarray

    @property
    def training(self):
        return np.sort(np.concatenate([self.scorer, self.encoder]))


def make_splits(labels):
    """Stratified, fixed splits: H = 1/4, the rest halved into S and E. :param labels: [N] digit labels."""
    index = np.arange(len(labels))
    training, held = train_test_split(index, test_size=0.25, random_state=SPLIT_SEED, stratify=labels)
    scorer, encoder = train_test_split(training, test_size=0.5, random_state=SPLIT_SEED, stratify=labels[training])
    splits = Splits(np.sort(held), np.sort(scorer), np.sort(encoder))
    parts = (splits.held, splits.scorer, splits.encoder)
    assert sum(map(len, parts)) == len(labels) and len(np.unique(np.concatenate(parts))) == len(labels)
    return splits


def as_uint8(images):
    """:param images: [N x 8 x 8] digits in 0..16. :return: [N x 8 x 8 x 3] uint8, as the PNGs the DiT trains on
    hold them (demo.write_image_folder's rounding) and as generated digits come back."""
    gray = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=3)


def write_training_folder(root, splits):
    """The training digits (S and E) as an ImageFolder: demo.write_image_folder's files less H's."""
    if os.path.isdir(root):
        return
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    demo.write_image_folder(partial, 8)
    digits = load_digits()
    for i in splits.held:
        os.remove(os.path.join(partial, str(digits.target[i]), f"{i:04d}.png"))
    assert len(glob.glob(os.path.join(partial, "*", "*.png"))) == len(splits.training)
    os.rename(partial, root)


#################################################################################
#                                 The scorer                                    #
#################################################################################


class Scorer(torch.nn.Module):
    """An MLP on the 64 pixels (0..16 scaled to 0..1); `features` is its penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, FEATURES),
                                        torch.nn.Tanh())  # bounded features: one wild sample cannot dominate the score
        self.head = torch.nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, pixels):
        """:param pixels: [N x 64] in 0..16. :return: [N x FEATURES]."""
        return self.body(pixels / 16.0)

    def forward(self, pixels):
        return self.head(self.features(pixels))


def deterministic(fn):
    """Run fn(generator) on one thread with a generator seeded SPLIT_SEED and the global seed fixed too (for
    initialisation): the same weights on every machine of this kind, whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SPLIT_SEED)
            return fn(torch.Generator().manual_seed(SPLIT_SEED))
    finally:
        torch.set_num_threads(threads)


def train_scorer(pixels, labels, epochs):
    """Full-batch AdamW on S's [N x 64] pixels and labels. :return: the Scorer in eval mode."""
    def fit(generator):
        scorer = Scorer()
        opt = torch.optim.AdamW(scorer.parameters(), lr=3e-3, weight_decay=1e-3)
        x, y = torch.as_tensor(pixels, dtype=torch.float32), torch.as_tensor(labels)
        for _ in range(epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(scorer(x), y).backward()
            opt.step()
        return scorer.eval().requires_grad_(False)
    return deterministic(fit)


def statistics(features):
    """:return: the mean and covariance of [N x D] features, float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


@dataclasses.dataclass
class Reference:
    """What a score needs: the scorer and H's feature statistics."""

    scorer: Scorer
    mu: np.ndarray
    sigma: np.ndarray

    def score(self, images, labels):
        """
        :param images: [N x 8 x 8 x 3] uint8 digits. :param labels: [N] the labels they were asked for.
        :return: dict(fd=the Frechet distance to H, accuracy=the share the scorer labels as asked).
        """
        pixels = torch.as_tensor(demo.to_digit_features(images), dtype=torch.float32)
        with torch.no_grad():
            features, predicted = self.scorer.features(pixels), self.scorer(pixels).argmax(1)
        fd = frechet_distance(*statistics(features.numpy()), self.mu, self.sigma)
        return dict(fd=fd, accuracy=float((predicted.numpy() == np.asarray(labels)).mean()))


#################################################################################
#                             The REPA encoder                                  #
#################################################################################


def encoder_inputs(images, model):
    """
    :param images: [N x 8 x 8 x 3] uint8 digits.
    :return: [N x 3 x 32 x 32] what extract_features.RepaEncoder feeds the encoder (it runs under no_grad, so
             its steps are repeated here): [0, 1], bicubic to ENCODER_INPUT, the encoder's mean and std.
    """
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(ENCODER_INPUT, ENCODER_INPUT), mode="bicubic", align_corners=False)
    mean, std = (torch.tensor(model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (x - mean) / std


def train_encoder(images, labels, path, epochs):
    """
    Train the REPA encoder supervised on E (a linear head on the mean of its final, normalised patch tokens,
    the tokens extract_features.py stores) and save its weights, head excluded, to path.
    :return: the head's accuracy on E (a check that it learned).
    """
    import timm

    def fit(generator):
        encoder = timm.create_model(ENCODER, pretrained=False, num_classes=0, img_size=ENCODER_INPUT)
        head = torch.nn.Linear(encoder.num_features, NUM_CLASSES)
        params = list(encoder.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        x, y = encoder_inputs(images, encoder), torch.as_tensor(labels)

        def logits(batch):
            return head(encoder.forward_features(batch)[:, encoder.num_prefix_tokens:].mean(1))  # (B, 10)

        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(logits(x[batch]), y[batch]).backward()
                opt.step()
        encoder.eval()
        with torch.no_grad():
            accuracy = float((logits(x).argmax(1) == y).float().mean())
        with atomic_write(path) as f:
            torch.save(encoder.state_dict(), f)
        return accuracy
    return deterministic(fit)


#################################################################################
#                           Training the recipes                                #
#################################################################################


def train_command(args, t):
    """train.py's command line for a Training: the demo's settings, a checkpoint every --score-every."""
    return [sys.executable, "train.py", "--features-path", t.store, "--results-dir", t.results, "--model", MODEL,
            "--max-steps", str(args.steps), "--global-batch-size", "128", "--lr", "6e-3",
            "--warmup-steps", str(min(100, args.steps)), "--ema-decay", "0.999", "--ema-warmup", "--no-flip",
            "--mixed-precision", "no", "--num-workers", "0", "--no-progress",
            "--log-every", str(max(1, args.score_every // 2)), "--ckpt-every", str(args.score_every),
            "--ckpt-keep-last", str(args.steps // args.score_every + 1), "--ckpt-keep-every", "0",
            "--global-seed", str(t.seed), "--resume", "auto", *t.recipe.flags]


def run_checkpoints(results):
    """{step: path} of the newest run folder under results (train.py --resume auto continues that one)."""
    runs = sorted(glob.glob(os.path.join(results, "*", "checkpoints")))
    return checkpoint_files(runs[-1]) if runs else {}


@dataclasses.dataclass
class Training:
    recipe: Recipe
    seed: int
    store: str  # train.py's --features-path
    results: str  # train.py's --results-dir
    log: str  # train.py's output

    @property
    def name(self):
        return f"{self.recipe.key}-seed{self.seed}"


#################################################################################
#                                 Scoring                                       #
#################################################################################

_reference = None  # a scoring worker's Reference, loaded once per process


def _init_worker(reference_path):
    global _reference
    torch.set_num_threads(1)
    data = torch.load(reference_path, weights_only=True)
    scorer = Scorer()
    scorer.load_state_dict(data["scorer"])
    _reference = Reference(scorer.eval().requires_grad_(False), data["mu"].numpy(), data["sigma"].numpy())


def score_checkpoint(path, num_samples, sampling_steps):
    """
    Sample num_samples digits from a train.py checkpoint (its EMA weights) without guidance, with its
    objective's default sampler, the same noise and labels for every checkpoint, and score them.
    :return: dict(fd, accuracy, sampler, seconds).
    """
    start = time.time()
    ckpt = load_checkpoint(path)
    spec = resolve_spec(ckpt)
    channels, size = latent_geometry(spec, None)
    model = build_model(spec, ckpt, channels, size, "cpu")
    _, sampler, steps = choose_sampler(ckpt, None, sampling_steps)  # ddpm for DDPM models, sde for flow ones
    indices = range(num_samples)
    labels = random_labels(SAMPLE_SEED, indices, spec.num_classes)
    noise = ImageNoise(SAMPLE_SEED, indices, (channels, size, size), "cpu")
    samples = sample_latents(model, noise, labels, sampler, steps, cfg_scale=1.0)
    images = to_uint8(decode(None, samples, 1.0))
    return dict(_reference.score(images, labels.numpy()), sampler=sampler.value,
                seconds=round(time.time() - start, 1))


#################################################################################
#                               The schedule                                    #
#################################################################################


@contextlib.contextmanager
def stopping(processes):
    """On an error or Ctrl-C, end the trainings still running (their checkpoints stay: a rerun resumes them)."""
    try:
        yield
    finally:
        for proc in processes:
            proc.terminate()
            proc.wait()


def run_all(args, trainings, reference_path):
    """
    Train every (recipe, seed) and score each of its checkpoints, at most --jobs at once: trainings first
    (each a train.py process on one thread), then the scores of finished runs (workers of one thread each).
    Scores are kept as <out>/scores/<run>-<step>.json, so a rerun redoes nothing finished.
    :return: {run name: {step: score}}.
    """
    scores_dir = os.path.join(args.out, "scores")
    os.makedirs(scores_dir, exist_ok=True)
    scores = {t.name: {} for t in trainings}
    to_score = []  # (run name, step, checkpoint, score file)

    def finished(t):  # queue the run's checkpoints that have no score yet
        for step, path in sorted(run_checkpoints(t.results).items()):
            done = os.path.join(scores_dir, f"{t.name}-{step:07d}.json")
            if step % args.score_every == 0 and os.path.exists(done):
                with open(done) as f:
                    scores[t.name][step] = json.load(f)
            elif step % args.score_every == 0:
                to_score.append((t.name, step, path, done))

    to_train = []
    for t in trainings:
        (to_train.append if args.steps not in run_checkpoints(t.results) else finished)(t)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running, pending = {}, {}  # Popen -> Training; Future -> (run name, step, score file)
    context = multiprocessing.get_context("spawn")  # no fork of a process that has used torch's thread pool
    with concurrent.futures.ProcessPoolExecutor(args.jobs, context, initializer=_init_worker,
                                                initargs=(reference_path,)) as pool, stopping(running):
        while to_train or to_score or running or pending:
            while to_train and len(running) + len(pending) < args.jobs:
                t = to_train.pop(0)
                command = train_command(args, t)
                print(f"[train] {t.name}: {' '.join(command)}", flush=True)
                with open(t.log, "a") as log:
                    running[subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)] = t
            while to_score and len(running) + len(pending) < args.jobs:
                name, step, path, done = to_score.pop(0)
                pending[pool.submit(score_checkpoint, path, args.num_samples, args.sampling_steps)] = name, step, done
            time.sleep(0.5)
            for proc, t in list(running.items()):
                if proc.poll() is not None:
                    del running[proc]
                    if proc.returncode != 0 or args.steps not in run_checkpoints(t.results):
                        raise BenchError(f"training {t.name} failed (exit status {proc.returncode}); see {t.log}")
                    print(f"[train] {t.name} done", flush=True)
                    finished(t)
            for future in [f for f in pending if f.done()]:
                name, step, done = pending.pop(future)
                result = future.result()
                with atomic_write(done, "w") as f:
                    json.dump(result, f)
                scores[name][step] = result
                print(f"[score] {name} step {step}: Frechet distance {result['fd']:.3f}, "
                      f"accuracy {result['accuracy']:.1%} ({result['seconds']:.0f} s)", flush=True)
    return scores


#################################################################################
#                                The report                                     #
#################################################################################


def summarize(scores, steps):
    """
    :param scores: {run name: {step: score}}. :param steps: the training length (recipe A's final step).
    :return: {recipe key: {step: mean, sd and range of the Frechet distance and accuracy over seeds}}, and
             {recipe key: the first scored step whose mean distance is at most recipe A's final mean, or None}.
    """
    table = {}
    for recipe in RECIPES:
        runs = [by_step for name, by_step in scores.items() if name.startswith(f"{recipe.key}-")]
        rows = {}
        for step in sorted(set.intersection(*(set(r) for r in runs))):
            fd = np.array([r[step]["fd"] for r in runs])
            accuracy = np.array([r[step]["accuracy"] for r in runs])
            rows[step] = dict(fd_mean=float(fd.mean()), fd_sd=float(fd.std(ddof=1)) if len(fd) > 1 else 0.0,
                              fd_min=float(fd.min()), fd_max=float(fd.max()), accuracy_mean=float(accuracy.mean()),
                              accuracy_sd=float(accuracy.std(ddof=1)) if len(fd) > 1 else 0.0, seeds=len(fd))
        table[recipe.key] = rows
    target = table["A"][steps]["fd_mean"]
    reach = {key: next((s for s, row in rows.items() if row["fd_mean"] <= target), None) for key, rows in table.items()}
    return table, reach


def markdown(report):
    """The table of report["table"] and what frames it, as markdown."""
    table, steps = report["table"], report["settings"]["steps"]
    target = table["A"][steps]["fd_mean"]
    names = {r.key: r.name for r in RECIPES}
    lines = [f"# Convergence on the digits ({report['settings']['seeds']} seeds per recipe)", "",
             "Frechet distance of the scorer's features of generated digits to the held-out ones (lower is better): "
             "mean +- sd over seeds [min, max]; unguided label accuracy: mean. "
             f"{report['settings']['num_samples']} samples per checkpoint, "
             f"{report['settings']['sampling_steps']} sampling steps.", "",
             "| step | " + " | ".join(f"{k}: {names[k]} | {k} accuracy" for k in table) + " |",
             "|---:|" + "---:|---:|" * len(table)]
    for step in sorted({s for rows in table.values() for s in rows}):
        cells = []
        for rows in table.values():
            row = rows.get(step)
            cells += ([f"{row['fd_mean']:.3f} +- {row['fd_sd']:.3f} [{row['fd_min']:.3f}, {row['fd_max']:.3f}]",
                       f"{row['accuracy_mean']:.1%}"] if row else ["", ""])
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", f"Steps to reach recipe A's final ({steps}-step) mean distance, {target:.3f}:", ""]
    for key, step in report["reach"].items():
        lines.append(f"- {key} ({names[key]}): " + (f"{step} steps ({step / steps:.0%} of A's)" if step is not None
                                                      else f"not within {steps} steps"))
    floor, ceiling = report["floor"], report["scorer"]["held_out_accuracy"]
    lines += ["", f"Floor: {floor['samples']} real digits of E score {floor['fd']:.3f} (a perfect generator, "
                  f"about). Ceiling: the scorer labels {ceiling:.1%} of the held-out digits right.",
              "", report["independence"]]
    return "\n".join(lines) + "\n"


def log_ticks(lo, hi):
    """:return: (log10 value, label) of the values 1, 2 and 5 times a power of ten between 10**lo and 10**hi."""
    found = []
    for power in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            if lo <= math.log10(m) + power <= hi:
                found.append((math.log10(m) + power, f"{m * 10.0 ** power:g}"))
    return found


def draw_curves(table, floor, title):
    """:return: an RGB image: per recipe its mean distance against steps, a bar over its seeds' range at each
    scored step, and the floor as a grey line; the distance on a log scale (it falls by orders of magnitude)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = plot_stats.WIDTH, plot_stats.HEIGHT
    image = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    names = {r.key: f"{r.key}: {r.name}" for r in RECIPES}
    legend = max(d.textlength(n, font=font) for n in names.values()) + 40
    left, top, right, bottom = 80, 40, width - 20 - legend, height - 50
    x0, x1 = plot_stats.span([0] + [s for rows in table.values() for s in rows], 0.02)
    y0, y1 = plot_stats.span([math.log10(floor)] + [math.log10(r[k]) for rows in table.values() for r in rows.values()
                                                    for k in ("fd_min", "fd_max")], 0.05)

    def px(x, fd):  # image rows grow downwards: the largest value is at the top
        y = math.log10(fd)
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for x, label in plot_stats.ticks(x0, x1):
        d.line([px(x, 10 ** y0), px(x, 10 ** y1)], fill=plot_stats.GRID)
        d.text((px(x, 10 ** y0)[0], bottom + 6), label, fill=plot_stats.INK, font=font, anchor="mt")
    for y, label in log_ticks(y0, y1):
        d.line([px(x0, 10 ** y), px(x1, 10 ** y)], fill=plot_stats.GRID)
        d.text((left - 6, px(x0, 10 ** y)[1]), label, fill=plot_stats.INK, font=font, anchor="rm")
    grey = (150, 150, 150)
    d.line([px(x0, floor), px(x1, floor)], fill=grey, width=1)
    d.text((px(x1, floor)[0] - 4, px(x1, floor)[1] - 3), "real digits (E)", fill=grey, font=font, anchor="rb")
    d.rectangle([left, top, right, bottom], outline=plot_stats.INK)
    for i, (key, rows) in enumerate(table.items()):
        colour = plot_stats.COLOURS[i]
        steps = sorted(rows)
        for s in steps:  # the seeds' range, a little apart per recipe so the bars do not hide each other
            x = px(s, 1)[0] + 4 * (i - 1)
            d.line([(x, px(s, rows[s]["fd_min"])[1]), (x, px(s, rows[s]["fd_max"])[1])], fill=colour, width=2)
        d.line([px(s, rows[s]["fd_mean"]) for s in steps], fill=colour, width=2, joint="curve")
        y = top + 10 + 20 * i
        d.line([(right + 20, y), (right + 40, y)], fill=colour, width=2)
        d.text((right + 48, y), names[key], fill=plot_stats.INK, font=font, anchor="lm")
    d.text(((left + right) / 2, 12), title, fill=plot_stats.INK, font=font, anchor="mt")
    d.text(((left + right) / 2, height - 8), "training step", fill=plot_stats.INK, font=font, anchor="mb")
    return image


#################################################################################
#                                   Stages                                      #
#################################################################################


def check_settings(args):
    """Keep --out to one setting: what changes a training or a score must match what made the files there."""
    path = os.path.join(args.out, "settings.json")
    settings = dict(steps=args.steps, score_every=args.score_every, num_samples=args.num_samples,
                    sampling_steps=args.sampling_steps, encoder_epochs=args.encoder_epochs,
                    recipes={r.key: list(r.flags) for r in RECIPES})
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise BenchError(f"{args.out} holds a run with other settings ({', '.join(changed)}): use another --out")
    else:
        with atomic_write(path, "w") as f:
            json.dump(settings, f)


def make_reference(path, pixels, labels, splits, num_samples):
    """
    Train the scorer on S, summarise H in its features and save both to path (the scoring workers read it).
    :return: (the scorer's accuracy on H, the floor: the distance of the first num_samples digits of E to H).
    """
    scorer = train_scorer(pixels[splits.scorer], labels[splits.scorer], epochs=SCORER_EPOCHS)
    with torch.no_grad():
        held = scorer.features(torch.as_tensor(pixels[splits.held], dtype=torch.float32)).numpy()
        accuracy = float((scorer(torch.as_tensor(pixels[splits.held], dtype=torch.float32)).argmax(1).numpy()
                          == labels[splits.held]).mean())
        real = scorer.features(torch.as_tensor(pixels[splits.encoder[:num_samples]], dtype=torch.float32)).numpy()
    mu, sigma = statistics(held)
    with atomic_write(path) as f:
        torch.save(dict(scorer=scorer.state_dict(), mu=torch.from_numpy(mu), sigma=torch.from_numpy(sigma)), f)
    return accuracy, dict(fd=frechet_distance(*statistics(real), mu, sigma), samples=len(real))


def make_store(folder, store, encoder_weights):
    """The pixel store of the training digits with the REPA encoder's patch tokens (extract_features.py in this
    process; it finds nothing to do when the store is complete)."""
    _, store_args = extract_features.parse_args([
        "--data-path", folder, "--features-path", store, "--image-size", "8", "--vae", "none", "--dtype", "float32",
        "--num-workers", "0", "--batch-size", "512",  # a few large batches: each batch is flushed to disk
        "--repa-encoder", ENCODER, "--repa-encoder-weights", encoder_weights, "--repa-input-size", str(ENCODER_INPUT)])
    extract_features.main(store_args)


def main(args):
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    check_settings(args)
    seconds = {}
    digits = load_digits()
    splits = make_splits(digits.target)
    assert not set(splits.scorer) & set(splits.encoder) and not set(splits.held) & set(splits.training)
    independence = (f"The scorer (an MLP, trained on S: {len(splits.scorer)} digits) and the REPA encoder ({ENCODER}, "
                    f"trained on E: {len(splits.encoder)} digits) are separate networks, each from its own random "
                    f"initialisation, trained on disjoint splits; the {len(splits.held)} held-out digits of H are "
                    f"the reference alone (checked in bench/convergence.py).")
    print(independence)
    pixels, images = digits.data, as_uint8(digits.images)
    folder = os.path.join(args.out, "digits")
    write_training_folder(folder, splits)

    reference_path = os.path.join(args.out, "reference.pt")
    ceiling, floor = make_reference(reference_path, pixels, digits.target, splits, args.num_samples)
    print(f"[scorer] trained on S; accuracy on H {ceiling:.1%}; {floor['samples']} real digits of E score "
          f"{floor['fd']:.3f}")

    encoder_weights, encoder_record = (os.path.join(args.out, name) for name in ("encoder.pt", "encoder.json"))
    if not os.path.exists(encoder_record):
        stage = time.time()
        accuracy = train_encoder(images[splits.encoder], digits.target[splits.encoder], encoder_weights,
                                 args.encoder_epochs)
        with atomic_write(encoder_record, "w") as f:
            json.dump(dict(head_accuracy_on_E=accuracy, seconds=round(time.time() - stage, 1)), f)
    with open(encoder_record) as f:
        encoder_trained = json.load(f)
    print(f"[encoder] trained on E in {encoder_trained['seconds']:.0f} s; its head's accuracy on E "
          f"{encoder_trained['head_accuracy_on_E']:.1%}")
    store = os.path.join(args.out, "store")
    make_store(folder, store, encoder_weights)

    trainings = [Training(recipe, seed, store, os.path.join(args.out, "runs", f"{recipe.key}-seed{seed}"),
                          os.path.join(args.out, "logs", f"{recipe.key}-seed{seed}.log"))
                 for recipe in RECIPES for seed in range(args.seeds)]
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    stage = time.time()
    scores = run_all(args, trainings, reference_path)
    seconds["train_and_score"] = round(time.time() - stage, 1)

    table, reach = summarize(scores, args.steps)
    seconds["total"] = round(time.time() - start, 1)
    report = dict(
        settings=dict(steps=args.steps, score_every=args.score_every, seeds=args.seeds, num_samples=args.num_samples,
                      sampling_steps=args.sampling_steps, model=MODEL, batch_size=128, lr=6e-3),
        recipes={r.key: dict(name=r.name, train_flags=list(r.flags)) for r in RECIPES},
        splits=dict(held=len(splits.held), scorer=len(splits.scorer), encoder=len(splits.encoder), seed=SPLIT_SEED),
        scorer=dict(network=f"MLP 64-128-{FEATURES}-10, features: the tanh of the {FEATURES}", trained_on="S",
                    held_out_accuracy=ceiling),
        encoder=dict(name=ENCODER, input_size=ENCODER_INPUT, trained_on="E", objective="supervised (E's labels)",
                     epochs=args.encoder_epochs, **encoder_trained),
        independence=independence, floor=floor, table=table, reach=reach,
        scores={name: {str(k): v for k, v in sorted(by_step.items())} for name, by_step in scores.items()},
        seconds=seconds, load_average=os.getloadavg())
    with atomic_write(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(json.loads(json.dumps(report), object_hook=_int_keys))
    with atomic_write(os.path.join(args.out, "convergence.md"), "w") as f:
        f.write(text)
    png = os.path.join(args.out, "convergence.png")
    title = f"Frechet distance to held-out digits, log scale ({args.seeds} seeds: mean, range)"
    draw_curves(table, floor["fd"], title).save(png)
    if args.png:
        shutil.copyfile(png, args.png)
    print("\n" + text + f"\nwrote {args.out}/convergence.json, .md, .png in {seconds['total'] / 60:.1f} min")
    return report


def _int_keys(d):
    """JSON turns the steps into strings; read them back as ints."""
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--out", required=True, help="folder for the data, store, encoder, runs, scores and report")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed, few samples: checks the stages")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per recipe (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600; --quick 20)")
    parser.add_argument("--score-every", type=int, default=None, help="score a checkpoint every this many steps "
                                                                      "(default 100; --quick 10)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings and scorings at once, one thread each")
    parser.add_argument("--num-samples", type=int, default=None, help="digits per checkpoint (default 150; --quick 64)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="model evaluations per digit (default 250, DiT's and SiT's; --quick 10)")
    parser.add_argument("--encoder-epochs", type=int, default=None, help="the REPA encoder's (default 15; --quick 1)")
    parser.add_argument("--png", default=None, help="also copy the curve here (e.g. bench/convergence.png)")
    args = parser.parse_args(argv)
    defaults = dict(seeds=(3, 1), steps=(600, 20), score_every=(100, 10), num_samples=(150, 64),
                    sampling_steps=(250, 10), encoder_epochs=(15, 1))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if min(args.seeds, args.steps, args.score_every, args.jobs, args.num_samples, args.sampling_steps,
           args.encoder_epochs) < 1:
        parser.error("--seeds, --steps, --score-every, --jobs, --num-samples, --sampling-steps and --encoder-epochs "
                     "must be >= 1")
    if args.steps % args.score_every:
        parser.error(f"--steps {args.steps} must be a multiple of --score-every {args.score_every}")
    if args.num_samples < 2 * FEATURES:
        parser.error(f"--num-samples must be at least {2 * FEATURES}: a covariance of {FEATURES} features needs more "
                     f"samples than that")
    args.out = os.path.abspath(args.out)
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
