"""
Run every CPU benchmark and print one markdown table: the machine, the date, each figure and the
command that measures it alone.

    python bench/run.py                          # all benchmarks, about 2 minutes on a 2-core CPU
    python bench/run.py --quick                  # smaller sizes, a smoke run
    python bench/run.py --only sample latents --output bench.md
    python bench/run.py --gpu --output gpu.md    # the lent-GPU set (what bench/gpu.sh runs)

Each benchmark is imported and its main() called in this process, one after the other; a failing
benchmark is reported in the table and makes the exit status 1, the others still run. With --output
the table is rewritten after every benchmark, so a run cut short keeps what it measured. The tables in
bench/README.md are this script's output. For a lent GPU, see bench/gpu.sh.
"""
import argparse
import datetime
import os
import platform
import sys
import time
import traceback

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.dirname(BENCH_DIR))
from files import atomic_write  # noqa: E402


def run_train_step(quick):
    import bench_train_step
    return bench_train_step.main(bench_train_step.parse_args(["--steps", "3", "--warmup", "1"] if quick else []))


def run_latents(quick):
    import bench_latents
    return bench_latents.main(bench_latents.parse_args(["--quick"] if quick else []))


def run_train(quick):
    import bench_train
    return bench_train.main(bench_train.parse_args(["--quick"] if quick else []))


def run_sample(quick):
    import bench_sample
    return bench_sample.main(bench_sample.parse_args(["--quick"] if quick else []))


def run_evaluate(quick):
    import bench_evaluate
    return bench_evaluate.main(bench_evaluate.parse_args(["--quick"] if quick else []))


def run_gpu_sample(quick):
    import bench_sample
    # DiT's FID setting: DiT-XL/2 on 32x32x4 latents (256x256 images), a batch of 64 under guidance.
    argv = ["--model", "DiT-XL/2", "--input-size", "32", "--batch-size", "64", "--device", "cuda"]
    return bench_sample.main(bench_sample.parse_args(argv + (["--quick"] if quick else [])))


def run_gpu_train(quick):
    import gpu_train
    return gpu_train.main(gpu_train.parse_args(["--quick"] if quick else []))


# name: (what it measures, how to run it); the order of the table.
BENCHMARKS = {
    "train_step": ("training step: images/s and fraction of the matmul peak", run_train_step),
    "latents": ("latent store vs file-per-image reading; batched extraction", run_latents),
    "train": ("train.py end to end", run_train),
    "sample": ("samplers: images/s", run_sample),
    "evaluate": ("evaluate.py's Inception features against pytorch-fid; precision/recall memory", run_evaluate),
}
GPU_BENCHMARKS = {
    "gpu_sample": ("DiT-XL/2 256px samplers on the GPU: images/s", run_gpu_sample),
    "gpu_train": ("DiT-XL/2 256px bf16 training: images/s, memory, MFU; checkpointing, compile", run_gpu_train),
}


def cpu_model():
    """The CPU's marketing name (from /proc/cpuinfo on Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(gpu):
    lines = []
    if gpu:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} "
                     f"device(s); CUDA {torch.version.cuda}")
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return lines + [
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores{load}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
    ]


def markdown_table(rows):
    """rows: (benchmark, figure, value, command) -> a markdown table (pipes in cells escaped)."""
    def cell(text):
        return str(text).replace("|", "\\|")

    lines = ["| benchmark | figure | value | command |", "|---|---|---:|---|"]
    lines += [f"| {cell(b)} | {cell(n)} | {cell(v)} | `{cell(c)}` |" for b, n, v, c in rows]
    return "\n".join(lines)


def main(args):
    benchmarks = GPU_BENCHMARKS if args.gpu else BENCHMARKS
    unknown = sorted(set(args.only or []) - set(benchmarks))
    if unknown:
        raise SystemExit(f"run.py: error: {', '.join(unknown)} not in the {'GPU' if args.gpu else 'CPU'} set "
                         f"({', '.join(benchmarks)})")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("run.py: error: --gpu needs a CUDA device")
    header = machine_lines(args.gpu)
    rows, failed = [], []
    start = time.time()

    def table(done):
        lines = header + [f"Total time: {time.time() - start:.0f} s" + (" (--quick)" if args.quick else "")
                          + ("" if done else " (still running)")]
        return "\n".join(lines) + "\n\n" + markdown_table(rows) + "\n"

    for name in args.only or list(benchmarks):
        what, run = benchmarks[name]
        print(f"== {name}: {what}", flush=True)
        t0 = time.time()
        try:
            result = run(args.quick)
        except Exception as e:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            rows.append((name, "FAILED", f"{type(e).__name__}: {e}", "-"))
        else:
            rows += [(name, figure, value, command) for figure, value, command in result]
            print(f"== {name}: {time.time() - t0:.0f} s", flush=True)
        if args.output:
            write(args.output, table(done=False))
    text = table(done=True)
    print("\n" + text)
    if args.output:
        write(args.output, text)
        print(f"wrote {args.output}")
    return 1 if failed else 0


def write(path, text):
    with atomic_write(path, "w") as f:
        f.write(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke-run sizes")
    parser.add_argument("--gpu", action="store_true", help="the lent-GPU set instead of the CPU set")
    parser.add_argument("--only", nargs="+", default=None,
                        help=f"run only these: {', '.join(BENCHMARKS)}; with --gpu {', '.join(GPU_BENCHMARKS)}")
    parser.add_argument("--output", default=None, help="also write the table to this markdown file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
