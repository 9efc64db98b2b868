"""Activation memory and step time of one long sample, sequence parallel 1 against 2, on the CPU.

    python bench/sequence_parallel.py                                  # both cases below, 1 then 2 processes
    python bench/sequence_parallel.py --case video --degrees 1 2 4     # 4 processes: 4 heads, 64 tokens a frame

Cases (tiny width: the Digits sizes, depth 6, width 192, 4 heads):
    video  VDiT-Digits/4 on one clip of 64 frames of 32x32x4 latents: 64 tokens a frame, 4,096 in all
    image  DiT-Digits/2 on one image of 128x128x4 latents: 4,096 tokens

Each degree N runs in its own processes (N > 1 under torchrun, gloo, one thread each; N = 1 with as many threads
as the N > 1 run has processes, so both use the same cores). A training step is train.py's: DDPM's loss
(training_losses) on the whole output, backward. Two figures per process:
    saved   the bytes autograd keeps for the backward pass (torch.autograd.graph.saved_tensors_hooks over one
            forward, each storage counted once, the parameters left out): the activation memory, exact and
            independent of the allocator;
    peak    how far the process's peak RSS (getrusage) rose during the steps above its RSS before them: the
            memory really taken, gradients and temporaries included (large blocks mapped apart: see run_degree).
Step time is the best of --steps steps after one warm-up step. The ratio printed is N's figure over N = 1's.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusion import create_objective  # noqa: E402
from models import DiT_models, VDiT_models  # noqa: E402

COMMAND = "python bench/sequence_parallel.py"
# case: (model name, its keyword arguments, the input's shape)
CASES = {
    "video": ("VDiT-Digits/4", dict(input_size=32, num_frames=64), (1, 4, 64, 32, 32)),
    "image": ("DiT-Digits/2", dict(input_size=128), (1, 4, 128, 128)),
}


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def saved_bytes(step, parameters):
    """:return: the bytes of the distinct storages autograd saves for backward during step(), parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    total = sum(seen.values())
    loss.backward()
    return total


def measure(case, degree, steps):
    """One process's figures for `case` at sequence parallel `degree` (this process's share of the group)."""
    name, kwargs, shape = CASES[case]
    sizes = VDiT_models if name in VDiT_models else DiT_models
    torch.manual_seed(0)
    model = sizes[name](in_channels=4, num_classes=10, **kwargs)
    if degree > 1:
        import sequence

        model.set_sequence_parallel(sequence.SequenceParallel(degree))
    objective = create_objective("ddpm", "uniform")
    g = torch.Generator().manual_seed(0)  # the same sample, time and noise on every process of the group
    x, t, noise = torch.randn(shape, generator=g), torch.randint(0, 1000, (1,), generator=g), torch.randn(shape, generator=g)
    y = torch.tensor([3])

    def step():
        return objective.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()

    before = rss_mib()
    saved = saved_bytes(step, list(model.parameters()))
    times = []
    for _ in range(steps + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return dict(saved_mib=saved / 2**20, peak_mib=peak, step_s=min(times[1:]))


def child(args):
    """Run by run_degree in each process: measure, gather the group's figures, rank 0 writes them."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if args.sequence_parallel > 1:
        dist.init_process_group("gloo")
    figures = measure(args.case, args.sequence_parallel, args.steps)
    everyone = [figures]
    if args.sequence_parallel > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, figures)
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps(everyone))


def run_degree(case, degree, processes, steps):
    """:return: the figures of each process of one run at sequence parallel `degree`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        flags = [str(Path(__file__).resolve()), "--case", case, "--sequence-parallel", str(degree), "--steps",
                 str(steps), "--threads", str(processes // degree), "--out", out]
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={degree}"]
                                     if degree > 1 else [])
        # glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) in the heap, so the peak RSS
        # would also count memory freed long before; at 64 KiB every large tensor is a mapping of its own,
        # returned when freed, and the peak RSS follows the live memory.
        env = dict(os.environ, OMP_NUM_THREADS=str(processes // degree), MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run(launch + flags, check=True, cwd=ROOT, env=env)
        return json.loads(Path(out).read_text())


def main(args):
    processes = max(args.degrees)
    print(f"{COMMAND} --case {' '.join(args.case)} --degrees {' '.join(map(str, args.degrees))} --steps {args.steps}"
          f"   (load average before: {os.getloadavg()[0]:.2f})")
    print(f"{'case':6} {'N':>2} {'saved MiB/proc':>15} {'ratio':>6} {'peak RSS MiB/proc':>18} {'ratio':>6} "
          f"{'step s':>7} {'ratio':>6}")
    for case in args.case:
        base = None
        for degree in args.degrees:
            figures = run_degree(case, degree, processes, args.steps)
            worst = {k: max(f[k] for f in figures) for k in figures[0]}  # the most loaded process
            base = base or worst
            print(f"{case:6} {degree:>2} {worst['saved_mib']:>15.1f} {worst['saved_mib'] / base['saved_mib']:>6.2f} "
                  f"{worst['peak_mib']:>18.1f} {worst['peak_mib'] / base['peak_mib']:>6.2f} {worst['step_s']:>7.2f} "
                  f"{worst['step_s'] / base['step_s']:>6.2f}")
    print(f"(load average after: {os.getloadavg()[0]:.2f})")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2], help="sequence-parallel degrees to compare")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run, after one warm-up step")
    # Set by run_degree for the processes it starts: one measurement, written to --out.
    parser.add_argument("--sequence-parallel", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.degrees[0] != 1 or any(d < 1 for d in args.degrees) or args.steps < 1:
        parser.error("--degrees must start with 1 (the reference) and be >= 1; --steps >= 1")
    if args.sequence_parallel is not None:
        args.case = args.case[0]
    return parser, args


if __name__ == "__main__":
    _, args = parse_args()
    child(args) if args.sequence_parallel is not None else main(args)
