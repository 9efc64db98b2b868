"""
Sampling speed: images/s of each sampler at its step counts, classifier-free guidance on.

    python bench/bench_sample.py                 # DiT-S/4 on 16x16x4 latents, CPU: under a minute
    python bench/bench_sample.py --quick         # fewer step counts, a smoke run
    python bench/bench_sample.py --model DiT-XL/2 --input-size 32 --batch-size 64   # a GPU: DiT's setting

What is timed is sampling.sample_latents, the loop sample.py and sample_ddp.py run: every model
evaluation (a doubled batch under guidance) plus the sampler's own arithmetic and, for DDPM, the
per-image noise draws. Not timed: decoding with the autoencoder (the same for every sampler). The
weights are random (speed does not depend on them, and no download is needed); quality is a
separate question, answered by FID. On the CPU one torch thread is used: on a shared, loaded
machine multi-threaded ops on small tensors measure the neighbours more than this code. From
Python, main(args) returns the rows (name, value, command) for bench/run.py.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import DiT_models  # noqa: E402
from sampling import ImageNoise, Sampler, sample_latents  # noqa: E402

DEFAULT_RUNS = ["ddpm:250", "ddpm:50", "ddim:50", "ddim:25", "dpm-solver:25", "dpm-solver:20", "dpm-solver:10"]
QUICK_RUNS = ["ddpm:50", "ddim:20", "dpm-solver:20"]


def images_per_second(model, sampler, steps, args, device):
    """Time one batch of args.batch_size images (after a short warm-up) and return images/s."""
    shape = (model.in_channels, args.input_size, args.input_size)
    y = torch.arange(args.batch_size, device=device) % model.num_classes

    def once(n_steps):
        noise = ImageNoise(0, range(args.batch_size), shape, device)
        sample_latents(model, noise, y, sampler, n_steps, args.cfg_scale)
        if device.type == "cuda":
            torch.cuda.synchronize()

    once(2)  # warm-up: kernels, allocator, autotuning
    start = time.perf_counter()
    once(steps)
    return args.batch_size / (time.perf_counter() - start)


def main(args):
    """Run every sampler:steps pair; print and return rows of (name, value, command)."""
    command = "python bench/bench_sample.py" + (" --quick" if args.quick else "") + \
        ("" if args.model == "DiT-S/4" else f" --model {args.model} --input-size {args.input_size} "
                                             f"--batch-size {args.batch_size}")
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        model = DiT_models[args.model](input_size=args.input_size, num_classes=1000).to(device).eval()
        rows = []
        for run in args.runs:
            name, steps = run.split(":")
            ips = images_per_second(model, Sampler(name), int(steps), args, device)
            rows.append((f"{args.model} {device.type} images/s, {name} {steps} steps, cfg {args.cfg_scale}, "
                         f"batch {args.batch_size}", round(ips, 3 if ips < 10 else 1), command))
    finally:
        torch.set_num_threads(threads)
    width = max(len(name) for name, _, _ in rows)
    print(f"{args.model}, {args.input_size}x{args.input_size} latents, {device}"
          + (", 1 torch thread" if device.type == "cpu" else ""))
    for name, value, _ in rows:
        print(f"{name:<{width}}  {value}")
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {' '.join(QUICK_RUNS)}")
    parser.add_argument("--model", choices=list(DiT_models), default="DiT-S/4")
    parser.add_argument("--input-size", type=int, default=16, help="latent side (32 for 256x256 images)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="sampler:steps pairs")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.runs = QUICK_RUNS
    return args


if __name__ == "__main__":
    main(parse_args())
