"""
Encode an image folder once into a latent store (see latents.py) that train.py reads.

    python extract_features.py --data-path /imagenet/train --features-path features/imagenet256 --image-size 256 --vae ema
    torchrun --nproc_per_node=8 extract_features.py --data-path /imagenet/train --features-path features/imagenet256 --image-size 256 --vae ema
    accelerate launch extract_features.py --data-path /imagenet/train --features-path features/imagenet256 --image-size 256 --vae ema
    python extract_features.py --data-path tiny/train --features-path features/tiny32px --image-size 32 --vae none
    python extract_features.py --fast-dit-path fast-dit/features --features-path features/imagenet256 --image-size 256 --vae ema

Every image goes through DiT's preprocessing (RGB, ADM center crop, [-1, 1]); it and its mirror
image are encoded, and the posterior's mean and standard deviation are stored, so training draws a
random flip and a fresh posterior sample each step as DiT's online encoding did. With `--vae none`
the images themselves are stored (pixel-space models; flips are exact there).

Rows follow the sorted ImageFolder order and are cut into fixed shards of --shard-size rows, handed
to the processes round-robin: the store is the same for any number of processes. A killed run,
rerun with the same command, continues from the last finished chunk; a finished store is left as it
is; a store made with other settings is refused. Unreadable images are skipped, logged and listed in
meta.json. `--fast-dit-path` converts fast-DiT's `*_features/*.npy` + `*_labels/*.npy` folders
(one frozen flip and posterior sample per image, already scaled by 0.18215) into a store instead.
"""
import argparse
import glob
import hashlib
import os
import time

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import reduce
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

import latents
from vae import VAEError, center_crop_arr, load_vae, scaling_factor

# fast-DiT multiplies its stored latents by this constant (not read from the VAE config).
FAST_DIT_SCALING_FACTOR = 0.18215
# Store settings that must match for a rerun to continue an existing store.
SETTINGS_KEYS = ("format", "source", "vae", "scaling_factor", "image_size", "latent_shape", "dtype",
                 "views", "posterior", "flip", "shard_size", "rows", "files_sha1")


class StoreError(ValueError):
    """The input or the output folder cannot be used (empty input, mismatched existing store)."""


class ImageItems(Dataset):
    """Preprocessed images by global index: (index, [3 x S x S] tensor in [-1, 1], error message).
    An unreadable image gives a zero tensor and a non-empty message instead of an exception, so one
    bad file does not stop a long extraction."""

    def __init__(self, files, image_size):
        self.files = files
        self.image_size = image_size
        # DiT's training transform without its RandomHorizontalFlip (both orientations are stored).
        self.to_tensor = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
        ])
        self.shape = (3, image_size, image_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as img:
                x = self.to_tensor(center_crop_arr(img.convert("RGB"), self.image_size))
            return i, x, ""
        except Exception as e:  # any decoder failure (truncated, not an image, bad header) skips it
            return i, torch.zeros(self.shape), f"{type(e).__name__}: {e}"


class FastDiTItems(Dataset):
    """fast-DiT feature files by global index: (index, [C x h x w] float32 tensor, error message)."""

    def __init__(self, files, latent_shape):
        self.files = files
        self.shape = tuple(latent_shape)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            x = np.load(self.files[i]).astype(np.float32).reshape(self.shape)
            return i, torch.from_numpy(x), ""
        except Exception as e:  # unreadable or wrongly shaped file: skip it like a corrupt image
            return i, torch.zeros(self.shape), f"{type(e).__name__}: {e}"


def scan_images(data_path):
    """Sorted ImageFolder listing: (files, labels, class names); a clear error when there is nothing."""
    if not os.path.isdir(data_path):
        raise StoreError(f"--data-path {data_path} is not a folder")
    try:
        classes, class_to_idx = find_classes(data_path)
    except FileNotFoundError as e:
        raise StoreError(f"--data-path {data_path}: {e} (expected one sub-folder per class)") from e
    samples = make_dataset(data_path, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise StoreError(f"--data-path {data_path}: no images ({', '.join(IMG_EXTENSIONS)}) "
                         f"in its {len(classes)} class folders")
    return [p for p, _ in samples], [c for _, c in samples], classes


def scan_fast_dit(path):
    """fast-DiT's `<path>/<name>_features/*.npy` with labels in `<path>/<name>_labels/*.npy`, paired
    by file name and ordered by the number in it (fast-DiT names files by step)."""
    feature_dirs = sorted(glob.glob(os.path.join(path, "*_features")))
    if len(feature_dirs) != 1:
        raise StoreError(f"--fast-dit-path {path}: expected exactly one *_features folder, "
                         f"found {len(feature_dirs)}")
    label_dir = feature_dirs[0][: -len("_features")] + "_labels"
    names = [n for n in os.listdir(feature_dirs[0]) if n.endswith(".npy")]
    if not names:
        raise StoreError(f"{feature_dirs[0]} holds no .npy files")
    stems = [n[:-4] for n in names]
    names = [n for _, n in sorted(zip([int(s) if s.isdigit() else s for s in stems], names),
                                  key=lambda t: (isinstance(t[0], str), t[0]))]
    missing = [n for n in names if not os.path.isfile(os.path.join(label_dir, n))]
    if missing:
        raise StoreError(f"{len(missing)} features have no label file in {label_dir} "
                         f"(first: {missing[0]})")
    labels = [int(np.load(os.path.join(label_dir, n)).reshape(-1)[0]) for n in names]
    return [os.path.join(feature_dirs[0], n) for n in names], labels


def files_digest(files, labels, root):
    """Fingerprint of the input listing, so a rerun on a different folder is refused."""
    h = hashlib.sha1()
    for f, y in zip(files, labels):
        h.update(f"{os.path.relpath(f, root)}\t{y}\n".encode())
    return h.hexdigest()


def check_existing(path, settings):
    """
    :return: None for a new store, else the existing meta dict (its settings equal `settings`).
    :raises StoreError: when path holds something else or a store made with other settings.
    """
    meta_path = os.path.join(path, latents.META_FILE)
    if not os.path.isfile(meta_path):
        if os.path.isdir(path) and os.listdir(path):
            raise StoreError(f"--features-path {path} exists, is not empty and is not a latent store: "
                             f"refusing to write into it")
        return None
    meta = latents.read_json(meta_path)
    diff = [f"{k}: store has {meta.get(k)!r}, this run {settings[k]!r}"
            for k in SETTINGS_KEYS if meta.get(k) != settings[k]]
    if diff:
        raise StoreError(f"--features-path {path} holds a store made with other settings or inputs; "
                         f"choose another folder or delete it.\n  " + "\n  ".join(diff))
    return meta


class Encoder:
    """Turns a batch of source items into store rows [B x V x K x C x h x w] (float32)."""

    def __init__(self, vae, source):
        self.vae = vae
        self.source = source

    @torch.no_grad()
    def __call__(self, x):
        if self.source == "fast-dit":
            return (x / FAST_DIT_SCALING_FACTOR)[:, None, None]  # (B, 1, 1, C, h, w)
        if self.vae is None:
            return x[:, None, None]                              # (B, 1, 1, 3, S, S)
        param = next(self.vae.parameters())
        posterior = self.vae.encode(torch.cat([x, x.flip(-1)]).to(param.device, param.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()  # (2B, C, h, w)
        b = x.shape[0]
        out = torch.stack([torch.stack([mean[:b], std[:b]], 1),
                           torch.stack([mean[b:], std[b:]], 1)], 1)  # (B, 2 views, 2, C, h, w)
        return out


def plan_batches(store, settings, shards, batch_size):
    """For this process's shards: open (or create) each shard array and its progress, and list the
    batches still to do; batches never cross a shard, so progress is per shard."""
    row_shape = (settings["views"], 2 if settings["posterior"] else 1, *settings["latent_shape"])
    todo, state = [], {}
    for k in shards:
        lo = k * settings["shard_size"]
        n = min(settings["shard_size"], settings["rows"] - lo)
        npy = os.path.join(store, latents.shard_name(k) + ".npy")
        js = os.path.join(store, latents.shard_name(k) + ".json")
        progress = latents.read_json(js) if os.path.isfile(js) and os.path.isfile(npy) else None
        if progress is None:
            arr = np.lib.format.open_memmap(npy, mode="w+", dtype=settings["dtype"], shape=(n, *row_shape))
            progress = {"rows": n, "done": 0, "skipped": []}
            latents.write_json_atomic(js, progress)
        elif "stats" in progress:
            continue  # finished earlier
        else:
            arr = np.lib.format.open_memmap(npy, mode="r+")
        state[k] = (arr, progress, js, lo)
        todo += [list(range(lo + s, lo + min(s + batch_size, n)))
                 for s in range(progress["done"], n, batch_size)]
    return todo, state


def finish_shard(arr, progress, js):
    valid = np.ones(progress["rows"], dtype=bool)
    valid[[s["row"] for s in progress["skipped"]]] = False
    progress["stats"] = latents.shard_statistics(arr, valid)
    latents.write_json_atomic(js, progress)


def main(args):
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    log = print if state.is_main_process else (lambda *a, **k: None)

    if args.fast_dit_path:
        files, labels = scan_fast_dit(args.fast_dit_path)
        class_names = [str(c) for c in range(max(labels) + 1)]
        latent_shape = list(np.load(files[0], mmap_mode="r").shape[-3:])
        source, root, vae, sf = "fast-dit", args.fast_dit_path, None, FAST_DIT_SCALING_FACTOR
        items = FastDiTItems(files, latent_shape)
    else:
        files, labels, class_names = scan_images(args.data_path)
        source, root = "images", args.data_path
        vae = load_vae(args.vae, device=state.device)
        sf = scaling_factor(vae)
        if vae is None:
            latent_shape = [3, args.image_size, args.image_size]
        else:
            down = 2 ** (len(vae.config.block_out_channels) - 1)
            if args.image_size % down:
                raise StoreError(f"--image-size {args.image_size} is not a multiple of the "
                                 f"autoencoder's downsampling factor {down}")
            latent_shape = [vae.config.latent_channels] + [args.image_size // down] * 2
        items = ImageItems(files, args.image_size)
    flip = {"images": latents.FLIP_EXACT if vae is None else latents.FLIP_ENCODED,
            "fast-dit": latents.FLIP_NONE}[source]
    settings = {
        "format": latents.FORMAT_VERSION, "source": source, "vae": args.vae, "scaling_factor": sf,
        "image_size": args.image_size, "latent_shape": latent_shape, "dtype": args.dtype,
        "views": 2 if flip == latents.FLIP_ENCODED else 1, "posterior": vae is not None,
        "flip": flip, "shard_size": args.shard_size, "rows": len(files),
        "files_sha1": files_digest(files, labels, root),
    }
    existing = check_existing(args.features_path, settings)
    if existing is not None and existing.get("complete"):
        log(f"{args.features_path} is already complete ({existing['count']} images): nothing to do")
        return existing
    num_shards = -(-len(files) // args.shard_size)
    meta = dict(settings, complete=False, data_path=os.path.abspath(root),
                num_classes=len(class_names), class_names=class_names,
                shards=[{"file": latents.shard_name(k) + ".npy",
                         "rows": min(args.shard_size, len(files) - k * args.shard_size)}
                        for k in range(num_shards)])
    state.wait_for_everyone()  # every process has checked the folder before anyone writes to it
    if state.is_main_process:
        os.makedirs(args.features_path, exist_ok=True)
        np.save(os.path.join(args.features_path, latents.LABELS_FILE), np.asarray(labels, dtype=np.int64))
        if existing is None:
            latents.write_json_atomic(os.path.join(args.features_path, latents.META_FILE), meta)
    state.wait_for_everyone()

    todo, shards = plan_batches(args.features_path, settings, range(rank, num_shards, world), args.batch_size)
    log(f"{len(files)} inputs in {len(class_names)} classes -> {args.features_path}: "
        f"{num_shards} shards over {world} processes; rank 0 has {sum(map(len, todo))} left to encode")
    encode = Encoder(vae, source)
    loader = DataLoader(items, batch_sampler=todo, num_workers=args.num_workers,
                        pin_memory=torch.cuda.is_available())
    start, encoded = time.time(), 0
    with tqdm(total=sum(map(len, todo)), unit="img", disable=not state.is_main_process,
              desc=f"rank 0 of {world}") as bar:
        for index, x, errors in loader:
            k = int(index[0]) // args.shard_size
            arr, progress, js, lo = shards[k]
            ok = torch.tensor([not e for e in errors])
            for i, e in zip(index.tolist(), errors):
                if e:
                    progress["skipped"].append({"row": i - lo, "index": i, "path": files[i], "error": e})
                    if state.is_main_process:
                        tqdm.write(f"skipping unreadable {files[i]}: {e}")
            if ok.any():
                rows = encode(x[ok]).cpu().numpy()
                arr[index[ok].numpy() - lo] = rows
                arr.flush()  # the data is on disk before the progress marker says so
            progress["done"] = int(index[-1]) + 1 - lo
            latents.write_json_atomic(js, progress)
            if progress["done"] == progress["rows"]:
                finish_shard(arr, progress, js)
            encoded += int(ok.sum())
            bar.update(len(index))
    for arr, progress, js, _ in shards.values():
        if "stats" not in progress:  # a shard whose last batch was done before a kill, not yet summed
            finish_shard(arr, progress, js)
    total = reduce(torch.tensor(float(encoded), device=state.device), "sum").item()
    state.wait_for_everyone()

    if state.is_main_process:
        parts = [latents.read_json(os.path.join(args.features_path, latents.shard_name(k) + ".json"))
                 for k in range(num_shards)]
        skipped = sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["index"])
        mean, std = latents.channel_moments([p["stats"] for p in parts], sf)
        meta.update(complete=True, count=len(files) - len(skipped), channel_mean=mean, channel_std=std,
                    skipped=[os.path.relpath(s["path"], root) for s in skipped],
                    skipped_indices=[s["index"] for s in skipped],
                    bytes_per_image=int(np.prod(latent_shape)) * settings["views"]
                    * (2 if settings["posterior"] else 1) * np.dtype(args.dtype).itemsize)
        latents.write_json_atomic(os.path.join(args.features_path, latents.META_FILE), meta)
        secs = time.time() - start
        log(f"done: {meta['count']} images stored, {len(skipped)} skipped; this run encoded "
            f"{int(total)} in {secs:.1f}s ({total / max(secs, 1e-9):.1f} images/s over {world} processes)")
        for s in skipped:
            log(f"  skipped {s['path']}: {s['error']}")
    state.wait_for_everyone()
    return latents.read_json(os.path.join(args.features_path, latents.META_FILE))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", type=str, help="ImageFolder root: one sub-folder per class")
    src.add_argument("--fast-dit-path", type=str, help="fast-DiT features folder to convert")
    parser.add_argument("--features-path", type=str, required=True, help="store folder to write")
    parser.add_argument("--image-size", type=int, default=256, help="square crop side in pixels")
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema, mse, a hub id, a save_pretrained folder, or none (pixel space); "
                             "with --fast-dit-path: the VAE the features came from (recorded only)")
    parser.add_argument("--dtype", type=str, choices=["float16", "float32"], default="float16")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (per process)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=16384, help="rows per shard file")
    args = parser.parse_args()
    if args.image_size <= 0 or args.batch_size <= 0 or args.shard_size <= 0 or args.num_workers < 0:
        parser.error("--image-size, --batch-size and --shard-size must be positive, --num-workers >= 0")
    try:
        main(args)
    except (StoreError, VAEError) as e:
        parser.error(str(e))
