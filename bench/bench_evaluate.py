"""
evaluate.py's feature extraction against pytorch-fid's own, on the same images in one run; and the
memory precision/recall needs at ADM's sizes (50,000 samples x 10,000 references).

    python bench/bench_evaluate.py                   # 48 images of 256x256, CPU: about 5 minutes on 2 busy cores
    python bench/bench_evaluate.py --quick           # 16 images, 2 rounds, smaller precision/recall: a smoke run
    python bench/bench_evaluate.py --device cuda --num-images 2000 --batch-size 200 --pr-dim 2048

Both extract pool_3 features with the same (random) Inception weights: speed does not depend on
them, and nothing is downloaded. pytorch-fid reads the images as PNG files through its
get_activations (decode, ToTensor, its resize, the network); evaluate.py reads them from an .npz
through its summarize (the streaming reader, TensorFlow 1's resize, the network with the spatial
features and the softmax, the running statistics): each tool's whole path from its own input
format. The networks alone are also timed on images already in memory, pytorch-fid's fed both as
its loader feeds it (contiguous NCHW) and in channels-last layout, in which the CPU's convolutions
run faster. The timed runs take turns within each round, so that a busy machine slows all alike;
each figure is the median over rounds. Precision/recall is timed on random features of --pr-dim
dimensions (2048 is ADM's; the memory of the blocked distances does not depend on it, the time
does), and its memory is the rise of the process's peak resident size (of the GPU's peak
allocation on a GPU). On the CPU one torch thread is used, as in bench_sample.py. From Python,
main(args) returns rows (name, value, command) for bench/run.py.
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of both tools would bury the figures

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402


def random_weights(path):
    """Random weights in pytorch-fid's layout (the state_dict of its fid_inception_v3), written to path."""
    import pytorch_fid.inception as pfi
    import torchvision

    state = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                            init_weights=False).state_dict()
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state):
        torch.save(pfi.fid_inception_v3().state_dict(), path)
    return state


def pytorch_fid_network(state, device):
    """pytorch-fid's InceptionV3 for pool_3 with its default input handling (resize, 2x - 1)."""
    import pytorch_fid.inception as pfi

    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state):
        return pfi.InceptionV3([3]).to(device).eval()


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_extraction(args, device, folder):
    """{figure name: images/s}, medians over args.rounds alternating rounds."""
    from pytorch_fid.fid_score import get_activations

    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    files = []
    for i, image in enumerate(images):
        files.append(os.path.join(folder, f"{i:06d}.png"))
        Image.fromarray(image).save(files[-1])
    npz = os.path.join(folder, "samples.npz")
    np.savez(npz, arr_0=images)
    weights = os.path.join(folder, "weights.pth")
    state = random_weights(weights)

    ours, theirs = evaluate.load_inception(weights, device)[0], pytorch_fid_network(state, device)
    batch = evaluate.inspect_batch(npz)
    on_device = torch.from_numpy(images).to(device)

    @torch.no_grad()
    def our_network():
        for x in on_device.split(args.batch_size):
            ours(x)

    @torch.no_grad()
    def their_network(channels_last):
        for x in on_device.split(args.batch_size):
            x = x.permute(0, 3, 1, 2).float() / 255  # pytorch-fid takes [0, 1] floats, [N x 3 x H x W]
            theirs(x if channels_last else x.contiguous())

    runs = {
        "pytorch-fid get_activations (PNG files)": lambda: get_activations(files, theirs, args.batch_size, 2048,
                                                                           device, num_workers=0),
        "evaluate.py summarize (npz)": lambda: evaluate.summarize(batch, ours, args.batch_size, device),
        "pytorch-fid network only (NCHW input, as its loader gives)": lambda: their_network(False),
        "pytorch-fid network only (channels-last input)": lambda: their_network(True),
        "evaluate.py network only": our_network,
    }
    for run in runs.values():  # warm-up: allocator, kernels, the page cache
        run()
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    return {name: args.num_images / statistics.median(s) for name, s in seconds.items()}


def bench_precision_recall(args, device):
    """(seconds, MiB the process's peak grew by) of precision_recall at args.pr_sizes with ADM's float16
    distances (the default), and seconds with float32 distances (--float32-distances), timed after."""
    g = torch.Generator().manual_seed(0)
    n_sample, n_ref = args.pr_sizes
    sample = torch.randn(n_sample, args.pr_dim, generator=g).to(device)
    ref = (torch.randn(n_ref, args.pr_dim, generator=g) + 0.1).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = max_rss_mib()
    seconds = timed(lambda: evaluate.precision_recall(ref, sample))
    after = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else max_rss_mib()
    float32 = timed(lambda: evaluate.precision_recall(ref, sample, distances=evaluate.Distances.FLOAT32))
    return seconds, after - before, float32


def main(args):
    """Print and return rows of (name, value, command)."""
    command = "python bench/bench_evaluate.py" + (" --quick" if args.quick else "")
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False  # as evaluate.py runs
    rows = []
    try:
        # Precision/recall first: the rise of the process's peak resident size is only seen above
        # what came before (the extraction holds images and two networks).
        seconds, mib, float32 = bench_precision_recall(args, device)
        n_sample, n_ref = args.pr_sizes
        pr = f"precision/recall {n_sample} x {n_ref} features of {args.pr_dim} dims"
        rows += [(f"{pr}: seconds", round(seconds, 1), command), (f"{pr}: peak memory added, MiB", round(mib), command),
                 (f"{pr}, float32 distances: seconds", round(float32, 1), command)]
        with tempfile.TemporaryDirectory() as folder:
            speeds = bench_extraction(args, device, folder)
        setting = (f"{args.num_images} images {args.image_size}x{args.image_size}, batch {args.batch_size}, "
                   f"{device.type}")
        for name, value in speeds.items():
            rows.append((f"{name}: images/s ({setting})", round(value, 2), command))
        ours_whole, ours_network = speeds["evaluate.py summarize (npz)"], speeds["evaluate.py network only"]
        rows.append(("speed evaluate.py / pytorch-fid, each tool's whole extraction",
                     round(ours_whole / speeds["pytorch-fid get_activations (PNG files)"], 2), command))
        for layout in ("NCHW input, as its loader gives", "channels-last input"):
            rows.append((f"speed evaluate.py / pytorch-fid, networks only (pytorch-fid: {layout})",
                         round(ours_network / speeds[f"pytorch-fid network only ({layout})"], 2), command))
    finally:
        torch.set_num_threads(threads)
    for name, value, _ in rows:
        print(f"{name}: {value}")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--num-images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pr-sizes", type=int, nargs=2, default=[50_000, 10_000], metavar=("SAMPLES", "REFERENCES"))
    parser.add_argument("--pr-dim", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="16 images, 2 rounds, 5000 x 1000 features")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.rounds, args.pr_sizes = 16, 2, [5000, 1000]
    if min(args.num_images, args.image_size, args.batch_size, args.rounds, args.pr_dim, *args.pr_sizes) < 1:
        parser.error("sizes, counts and rounds must be >= 1")
    return args


if __name__ == "__main__":
    main(parse_args())
