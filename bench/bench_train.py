"""
train.py end to end on the CPU: images/s and achieved TFLOP/s of DiT-S/2 at a small batch, plain, with
gradient checkpointing and with torch.compile.

    python bench/bench_train.py                  # DiT-S/2, batch 4, 32x32 inputs; 4-6 minutes on a busy 2-core CPU
    python bench/bench_train.py --quick          # batch 2, bf16 with and without checkpointing only
    python bench/bench_train.py --model DiT-B/4 --batch-size 16 --steps 8

Each setting runs train.main on a store of random 32x32 images (extract_features.py --vae none: 3x32x32
inputs, the token count of DiT-S/2 on 256px latents) with the store's data loading, EMA, logging and
a final checkpoint included. The figure is the best log interval after the first (warm-up, compile):
other load on a shared machine only ever slows an interval down. The figures come from the run's
stats.jsonl. TFLOP/s counts the model's matmul
FLOPs, 3x the forward (models.forward_flops_per_image), whatever checkpointing recomputes.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import extract_features  # noqa: E402
import train  # noqa: E402
from runs import read_stats  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from models import DiT_models  # noqa: E402

COMMAND = "python bench/bench_train.py"


def make_store(root, images, size=32, classes=4):
    """A pixel store of `images` random size x size images in `classes` classes."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "images")
    for i in range(images):
        os.makedirs(os.path.join(folder, f"c{i % classes}"), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"c{i % classes}", f"{i}.png"))
    store = os.path.join(root, "store")
    _, store_args = extract_features.parse_args([
        "--data-path", folder, "--features-path", store, "--image-size", str(size), "--vae", "none",
        "--dtype", "float32", "--num-workers", "0"])
    extract_features.main(store_args)
    return store


def settings(quick):
    """(label, extra train.py flags) of every measured setting."""
    rows = [("bf16", []), ("bf16 grad checkpointing", ["--grad-checkpointing"])]
    if not quick:
        rows += [("bf16 compile", ["--compile"]), ("fp32", ["--mixed-precision", "no"])]
    return rows


def main(args):
    """:return: rows of (name, value, command) for bench/run.py."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(tmp, 4 * args.batch_size)
        for label, extra in settings(args.quick):
            AcceleratorState._reset_state(True)  # accelerate allows one mixed precision per process otherwise
            argv = ["--features-path", store, "--results-dir", os.path.join(tmp, "results"), "--model", args.model,
                    "--global-batch-size", str(args.batch_size), "--max-steps", str(args.steps * (args.intervals + 1)),
                    "--log-every", str(args.steps), "--ckpt-every", str(10**9), "--num-workers", "0",
                    "--no-progress", *extra]
            _, train_args = train.parse_args(argv)
            exp = train.main(train_args)
            best = max(read_stats(exp)[1:], key=lambda s: s["images_per_s"])
            name = f"train.py {args.model} x{args.batch_size} 32x32 {label}"
            command = f"{COMMAND} --model {args.model} --batch-size {args.batch_size} --steps {args.steps}" \
                + (" --quick" if args.quick else "")
            rows.append((f"{name}: images/s", f"{best['images_per_s']:.3g}", command))
            rows.append((f"{name}: TFLOP/s", f"{best['tflops_per_device']:.3f}", command))
    for name, value, _ in rows:
        print(f"{name}: {value}")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", choices=list(DiT_models), default="DiT-S/2")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (--quick: 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per log interval (default 2, --quick 1)")
    parser.add_argument("--intervals", type=int, default=1, help="measured intervals after the warm-up one")
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer steps, no compile, no fp32")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    args.steps = args.steps or (1 if args.quick else 2)
    if args.batch_size <= 0 or args.steps <= 0 or args.intervals <= 0:
        parser.error("--batch-size, --steps and --intervals must be positive")
    return args


if __name__ == "__main__":
    main(parse_args())
