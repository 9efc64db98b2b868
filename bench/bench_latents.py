"""
Latent store speed: reading for training, and extraction with batches.

    python bench/bench_latents.py            # about 1-2 minutes on a 2-core CPU
    python bench/bench_latents.py --quick    # smaller sizes, a smoke run

Reading: samples/s through a shuffled DataLoader as users write it (batch 256, default collate, no
workers) from a LatentDataset as train.py makes it (seeded, random flip of two encoded views, fresh
posterior sample, float16 store of ImageNet-256-shaped latents 4x32x32), against the same latents
laid out as fast-DiT does (one float32 .npy per image and one per label, np.load per item), both
from the page cache (the most favourable case for many small files).

The same two readers are also timed first with both layouts evicted from the page cache
(posix_fadvise DONTNEED), as in a first epoch over a dataset larger than RAM.

Extraction: images/s of extract_features.py on the same JPEG folder and the same small 8x-downsampling
AutoencoderKL (random weights; SD's four blocks at a quarter of the width, one layer each), batch --batch-size
against batch 1, both encoding each image and its mirror. From Python, main(args) returns the rows
(name, value, command) and bench/run.py can collect them.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import extract_features  # noqa: E402
import latents  # noqa: E402

SF = 0.18215


def write_store(path, mean, std, labels, shard_size):
    """A finished store holding the given posteriors ([N x 2 x C x H x W] mean and std of image and
    mirror image, unscaled), written through latents' writer as extract_features.py writes one."""
    n, num_classes = len(labels), int(labels.max()) + 1
    settings = {"format": latents.FORMAT_VERSION, "source": "images", "vae": "ema", "scaling_factor": SF,
                "image_size": 8 * mean.shape[-1], "latent_shape": list(mean.shape[2:]), "dtype": "float16",
                "views": 2, "posterior": True, "flip": latents.FLIP_ENCODED, "shard_size": shard_size,
                "rows": n, "files_sha1": "none: synthetic latents"}
    meta = latents.new_meta(settings, [str(c) for c in range(num_classes)], data_path="")
    os.makedirs(path)
    latents.start_store(path, meta, labels)
    for shard in latents.open_shards(path, meta, range(len(meta["shards"]))).values():
        rows = np.arange(shard.lo, shard.lo + shard.rows)
        shard.write(rows, np.stack([mean[rows], std[rows]], 2))  # (n, 2, 2, C, H, W)
        shard.commit(shard.lo + shard.rows)
    latents.finish_store(path, meta, files=[str(i) for i in range(n)], root=".")


def write_fast_dit(path, x, labels):
    """fast-DiT's layout: <path>/imagenet256_features/<i>.npy [1, C, H, W] float32 (scaled latents)
    and <path>/imagenet256_labels/<i>.npy [1]."""
    feats, labs = os.path.join(path, "imagenet256_features"), os.path.join(path, "imagenet256_labels")
    os.makedirs(feats)
    os.makedirs(labs)
    for i in range(len(x)):
        np.save(os.path.join(feats, f"{i}.npy"), x[i:i + 1])
        np.save(os.path.join(labs, f"{i}.npy"), labels[i:i + 1])


class FilePerImage(Dataset):
    """The per-file reader fast-DiT's training uses: list both folders, np.load two files per item."""

    def __init__(self, path):
        self.feats = os.path.join(path, "imagenet256_features")
        self.labs = os.path.join(path, "imagenet256_labels")
        self.names = sorted(os.listdir(self.feats))

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        x = np.load(os.path.join(self.feats, self.names[i]))
        y = np.load(os.path.join(self.labs, self.names[i]))
        return torch.from_numpy(x), torch.from_numpy(y)


def drop_page_cache(folder):
    """Evict the folder's (clean) files from the page cache, so the next read comes from the disk."""
    for dirpath, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_page_cache(folder):
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def samples_per_second(loader, seconds):
    """Iterate batches for about `seconds` (at least 2 batches after one warm-up batch)."""
    it = iter(loader)
    next(it)
    n, start, batches = 0, time.perf_counter(), 0
    for x, _ in it:
        n += len(x)
        batches += 1
        if batches >= 2 and time.perf_counter() - start > seconds:
            break
    return n / (time.perf_counter() - start)


def bench_reading(tmp, args):
    rng = np.random.default_rng(0)
    shape = (args.num_latents, 2, 4, 32, 32)
    mean = rng.standard_normal(shape, dtype=np.float32) * 5
    std = np.exp(rng.uniform(-5, -2, shape)).astype(np.float32)
    labels = rng.integers(0, 1000, args.num_latents)
    store = os.path.join(tmp, "store")
    write_store(store, mean, std, labels, shard_size=max(1, args.num_latents // 4))
    frozen = SF * (mean[:, 0] + std[:, 0] * rng.standard_normal(mean[:, 0].shape, dtype=np.float32))
    write_fast_dit(os.path.join(tmp, "fast"), frozen, labels)
    del mean, std, frozen

    def loader(ds):
        return DataLoader(ds, batch_size=256, shuffle=True, num_workers=0)

    # Cold first: evict both layouts from the page cache, as in a first epoch over a dataset larger
    # than RAM; then read every file once so the warm runs find everything cached.
    os.sync()  # only clean pages can be evicted
    drop_page_cache(store)
    drop_page_cache(os.path.join(tmp, "fast"))
    files = FilePerImage(os.path.join(tmp, "fast"))
    # seed=0 as train.py (its --global-seed): every sample a function of (seed, epoch, index).
    rates = {"ours_cold": samples_per_second(loader(latents.LatentDataset(store, seed=0)), args.seconds),
             "files_cold": samples_per_second(loader(files), args.seconds)}
    warm_page_cache(tmp)
    rates["ours"] = samples_per_second(loader(latents.LatentDataset(store, seed=0)), args.seconds)
    rates["ours_mean"] = samples_per_second(loader(latents.LatentDataset(store, sample_posterior=False, seed=0)),
                                            args.seconds)
    rates["files"] = samples_per_second(loader(files), args.seconds)
    return rates


def bench_extraction(tmp, args):
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(0)
    root = os.path.join(tmp, "images")
    for i in range(args.num_images):
        os.makedirs(os.path.join(root, f"class{i % 4}"), exist_ok=True)
        h, w = rng.integers(args.image_size, 2 * args.image_size, 2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"class{i % 4}", f"{i}.jpg"), quality=90)
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4,
                        norm_num_groups=16)
    vae_path = os.path.join(tmp, "vae")
    vae.save_pretrained(vae_path)
    rates = {}
    for bs in (args.batch_size, 1):
        out = os.path.join(tmp, f"store_bs{bs}")
        start = time.perf_counter()
        _, extract_args = extract_features.parse_args([
            "--data-path", root, "--features-path", out, "--image-size", str(args.image_size),
            "--vae", vae_path, "--batch-size", str(bs), "--num-workers", "0"])
        extract_features.main(extract_args)
        rates[bs] = args.num_images / (time.perf_counter() - start)
    return rates[args.batch_size], rates[1]


def main(args):
    """Run both benchmarks; print and return rows of (name, value, command)."""
    command = "python bench/bench_latents.py" + (" --quick" if args.quick else "")
    tmp = tempfile.mkdtemp(prefix="bench_latents_")
    # One thread, as in DataLoader workers: on a shared, loaded machine every multi-threaded op on
    # these small tensors waits for a busy core, which would measure the neighbours, not this code.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        read = bench_reading(tmp, args)
        batched, single = bench_extraction(tmp, args)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp)
    rows = [
        ("read store samples/s (train defaults: flip + posterior sample)", round(read["ours"]), command),
        ("read store samples/s (posterior means, flip only)", round(read["ours_mean"]), command),
        ("read fast-DiT file-per-image samples/s", round(read["files"]), command),
        ("read speedup store / file-per-image", round(read["ours"] / read["files"], 1), command),
        ("read store samples/s, cold page cache (train defaults)", round(read["ours_cold"]), command),
        ("read fast-DiT file-per-image samples/s, cold page cache", round(read["files_cold"]), command),
        ("read speedup, cold page cache", round(read["ours_cold"] / read["files_cold"], 1), command),
        (f"extract images/s (batch {args.batch_size}, image + mirror)", round(batched, 1), command),
        ("extract images/s (batch 1, image + mirror)", round(single, 1), command),
        (f"extract speedup batch {args.batch_size} / batch 1", round(batched / single, 1), command),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"1 torch thread; latents read: {args.num_latents}, "
          f"images encoded: {args.num_images} at {args.image_size}px")
    for name, value, _ in rows:
        print(f"{name:<{width}}  {value}")
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (overrides the sizes below)")
    parser.add_argument("--num-latents", type=int, default=10000, help="images in the read benchmark")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per reader")
    parser.add_argument("--num-images", type=int, default=96, help="images in the extraction benchmark")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="batched extraction's batch size")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.num_latents, args.seconds, args.num_images = 3000, 1.5, 32
    return args


if __name__ == "__main__":
    main(parse_args())
