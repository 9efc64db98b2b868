"""Times one DiT training step on CPU and compares it with this machine's matmul throughput.

    python bench/bench_train_step.py                       # DiT-S/2, 8 latents of 4x32x32
    python bench/bench_train_step.py --model DiT-B/4 --batch-size 16 --steps 10

A step is what train.py does per batch: forward, `training_losses` (MSE + variational bound),
backward and AdamW. Its useful work is the model's matmul FLOPs (3x the forward's: the backward
costs two forwards), so images/s is reported next to the fraction of the machine's own matmul
throughput, measured in the same run and dtype, that the step reaches. Only the ratio is
comparable across machines.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models, forward_flops_per_image  # noqa: E402

COMMAND = "python bench/bench_train_step.py"


def matmul_seconds(a, b):
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def measure(model_name, batch_size, dtype, steps, warmup, n=2048):
    """
    Times training steps under `dtype` autocast (float32: none) and, between them, an n x n x n
    matmul in the same dtype. Each figure is the best of its trials: other load on the machine
    only ever slows a trial down, and interleaving exposes both to the same load.
    :return: (seconds per step, seconds per matmul, forward FLOPs per step, matmul FLOPs).
    """
    torch.manual_seed(0)
    model = DiT_models[model_name](input_size=32, num_classes=1000)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch_size, 4, 32, 32)
    y = torch.randint(0, 1000, (batch_size,))
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    step_times, matmul_times = [], []
    for i in range(warmup + steps):
        t = torch.randint(0, diffusion.num_timesteps, (batch_size,))
        matmul_time = matmul_seconds(a, b)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            step_times.append(time.perf_counter() - start)
            matmul_times.append(matmul_time)
    return min(step_times), min(matmul_times), batch_size * forward_flops_per_image(model), 2 * n**3


def main(args):
    """:return: rows of (name, value, command) for bench/run.py."""
    rows = []
    command = f"{COMMAND} --model {args.model} --batch-size {args.batch_size} --steps {args.steps}"
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16 autocast")):
        step_time, matmul_time, forward_flops, matmul_flops = measure(args.model, args.batch_size, dtype, args.steps,
                                                                      args.warmup)
        achieved, peak = 3 * forward_flops / step_time / 1e12, matmul_flops / matmul_time / 1e12
        name = f"train step {args.model} x{args.batch_size} {label}"
        rows.append((f"{name}: images/s", f"{args.batch_size / step_time:.1f}", command))
        rows.append((f"{name}: TFLOP/s (matmul {peak:.2f})", f"{achieved:.3f}", command))
        rows.append((f"{name}: fraction of matmul throughput", f"{achieved / peak:.0%}", command))
    for name, value, _ in rows:
        print(f"{name}: {value}")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(DiT_models), default="DiT-S/2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        parser.error("--batch-size and --steps must be positive, --warmup >= 0")
    return args


if __name__ == "__main__":
    main(parse_args())
