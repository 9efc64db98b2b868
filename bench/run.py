"""
Run every CPU benchmark and print one markdown table: the machine, the date, each figure and the
command that measures it alone.

    python bench/run.py                          # all benchmarks, about 5-8 minutes on a 2-core CPU
    python bench/run.py --quick                  # smaller sizes, a smoke run
    python bench/run.py --only sample latents --output bench.md

Each benchmark is imported and its main() called in this process, one after the other; a failing
benchmark is reported in the table and makes the exit status 1, the others still run. The README's
benchmark table is this script's output. For a lent GPU, see bench/gpu.sh.
"""
import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.dirname(BENCH_DIR))


def run_train_step(quick):
    import bench_train_step
    return bench_train_step.main(steps=3 if quick else 8, warmup=1 if quick else 2)


def run_latents(quick):
    import bench_latents
    return bench_latents.main(bench_latents.parse_args(["--quick"] if quick else []))


def run_train(quick):
    import bench_train
    return bench_train.main(bench_train.parse_args(["--quick"] if quick else []))


def run_sample(quick):
    import bench_sample
    return bench_sample.main(bench_sample.parse_args(["--quick"] if quick else []))


# name: (what it measures, how to run it); the order of the table.
BENCHMARKS = {
    "train_step": ("training step: images/s and fraction of the matmul peak", run_train_step),
    "latents": ("latent store vs file-per-image reading; batched extraction", run_latents),
    "train": ("train.py end to end", run_train),
    "sample": ("samplers: images/s", run_sample),
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


def machine_lines():
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return [
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
    header = machine_lines()
    rows, failed = [], []
    start = time.time()
    for name in args.only or list(BENCHMARKS):
        what, run = BENCHMARKS[name]
        print(f"== {name}: {what}", flush=True)
        t0 = time.time()
        try:
            result = run(args.quick)
        except Exception as e:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            rows.append((name, "FAILED", f"{type(e).__name__}: {e}", "-"))
            continue
        rows += [(name, figure, value, command) for figure, value, command in result]
        print(f"== {name}: {time.time() - t0:.0f} s", flush=True)
    header.append(f"Total time: {time.time() - start:.0f} s" + (" (--quick)" if args.quick else ""))
    text = "\n".join(header) + "\n\n" + markdown_table(rows) + "\n"
    print("\n" + text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke-run sizes")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None, help="run only these")
    parser.add_argument("--output", default=None, help="also write the table to this markdown file")
    sys.exit(main(parser.parse_args()))
