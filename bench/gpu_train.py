"""
DiT-XL/2 training throughput on one GPU: 256px (32x32x4 latents), bf16 autocast with float32 master
weights, the largest batch that fits, through train.py's own setup (make_training) and step (forward,
loss, backward, gradient norm, AdamW, EMA). Prints images/s, peak memory and MFU against the device's dense bf16 peak.

    python bench/gpu_train.py                    # plain, compiled, and checkpointed at twice the batch (< 3 min)
    python bench/gpu_train.py --quick            # plain only, fewer steps
    python bench/gpu_train.py --peak-tflops 989  # a device missing from PEAK_BF16_TFLOPS

The largest batch is searched downwards from --batch-sizes (a batch that runs out of memory is skipped).
Inputs are random tensors on the device, so the figure is the model's and the optimizer's, not the
data loader's. FLOPs are models.forward_flops_per_image x 3 (the recomputation of checkpointing is not
counted as useful work); fast-DiT's A100 figure (0.84 steps/s at batch 128) is about 12% MFU.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models, forward_flops_per_image  # noqa: E402

COMMAND = "python bench/gpu_train.py"
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; matched by substring
# of torch.cuda.get_device_name(), first match wins.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4, "B200": 2250.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "A10G": 70.0, "A10": 125.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0}


def device_peak(name):
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def measure(model_name, batch, steps, warmup, grad_checkpointing=False, compile_blocks=False):
    """
    Time `steps` training steps after `warmup` ones.
    :return: (seconds per step, peak memory in GiB, training FLOPs per image).
    :raises torch.cuda.OutOfMemoryError: the batch does not fit.
    """
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="bf16")
    torch.manual_seed(0)
    model_config = dict(model=model_name, input_size=32, in_channels=4, num_classes=1000)
    with torch.device("cuda"):  # initialised on the GPU: seconds instead of a minute of CPU work
        training = train.make_training(accelerator, model_config, lr=1e-4, grad_checkpointing=grad_checkpointing,
                                       compile=compile_blocks)
    flops = 3 * forward_flops_per_image(training.raw)
    diffusion = create_diffusion(timestep_respacing="")
    x = torch.randn(batch, 4, 32, 32, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            train.train_step(accelerator, training, diffusion, x, y, float("inf"), 0.9999)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30, flops
    finally:
        del training
        torch.cuda.empty_cache()


def largest_batch(model_name, candidates, **kw):
    """The first of candidates (largest first) that runs two steps without running out of memory."""
    for batch in sorted(candidates, reverse=True):
        try:
            measure(model_name, batch, steps=1, warmup=1, **kw)
            return batch
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: out of memory", flush=True)
    raise SystemExit(f"gpu_train.py: error: no batch in {candidates} fits")


def main(args):
    """:return: rows of (name, value, command) for bench/run.py."""
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train.py: error: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or device_peak(name)
    batch = largest_batch(args.model, args.batch_sizes)
    runs = [("bf16", batch, {})]
    if not args.quick:
        runs += [("bf16 compile", batch, {"compile_blocks": True}),
                 ("bf16 grad checkpointing", 2 * batch, {"grad_checkpointing": True})]
    rows = []
    for label, b, kw in runs:
        try:
            seconds, memory, flops = measure(args.model, b, args.steps, args.warmup, **kw)
        except torch.cuda.OutOfMemoryError:
            rows.append((f"{args.model} x{b} {label}", "out of memory", COMMAND))
            continue
        tflops = b * flops / seconds / 1e12
        prefix = f"{args.model} 256px x{b} {label} on {name}"
        command = COMMAND + (" --quick" if args.quick else "")
        rows += [(f"{prefix}: images/s", f"{b / seconds:.1f}", command),
                 (f"{prefix}: steps/s", f"{1 / seconds:.3f}", command),
                 (f"{prefix}: peak memory GiB", f"{memory:.1f}", command),
                 (f"{prefix}: TFLOP/s", f"{tflops:.1f}", command),
                 (f"{prefix}: MFU vs {peak} TFLOP/s bf16" if peak else f"{prefix}: MFU (peak unknown)",
                  f"{tflops / peak:.1%}" if peak else "n/a", command)]
        for row in rows[-5:]:
            print(f"{row[0]}: {row[1]}", flush=True)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", choices=list(DiT_models), default="DiT-XL/2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 384, 256, 192, 128, 64, 32],
                        help="candidates for the largest batch that fits")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, --quick 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--quick", action="store_true", help="the plain setting only, fewer steps")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 10)
    if args.steps <= 0 or args.warmup < 0 or min(args.batch_sizes) <= 0:
        parser.error("--steps and --batch-sizes must be positive, --warmup >= 0")
    return args


if __name__ == "__main__":
    main(parse_args())
