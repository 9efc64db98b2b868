"""
The latent store: its format, written (for extract_features.py) and read (LatentDataset, for train.py).

    from latents import LatentDataset
    ds = LatentDataset("features/imagenet256", seed=0)   # DiT's distribution: flip + posterior sample
    loader = DataLoader(ds, batch_size=256, shuffle=True, num_workers=4)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for x, y in loader: ...                           # x [B, C, H, W] float32, y [B] int64
    LatentDataset(path, seed=0, repa=True)            # items (x, y, z): z [T, D] encoder patch tokens (REPA)
    LatentDataset("features/ucf101-16x3", seed=0)     # a video store: x [B, C, F, H, W] clips of F frames

DiT encodes every training image online: a random horizontal flip, then one sample of the VAE
posterior, freshly drawn each step. fast-DiT froze one flip and one sample per image. This store keeps
the posterior's mean and standard deviation of both the image and its mirror image, so reading it
draws from exactly DiT's distribution at memory-map speed.

A video store (meta["frames"] = F, from extract_features.py --num-frames) holds clips in the same
layout with a frames axis after the channels: a row is a clip of F frames, each frame encoded as an
image, its view 1 the whole clip mirrored. meta["clips"] names each row's video (under data_path) and
its first frame; meta["frame_stride"] is the step between the frames of a clip. An image store has
"frames" None (or no such key, written before video stores existed).

Store layout (one folder):
    meta.json              everything about the store (see LatentDataset.meta); "complete" is true
                           only once every shard is written
    labels.npy             int64 [rows]: the class of every input file, in global (sorted) order
    shard-00000.npy ...    [n, V, K, C, H, W] (video: [n, V, K, C, F, H, W]) in meta["dtype"] for global rows
                           [k * shard_size, (k + 1) * shard_size): V = 2 views (image, mirror image)
                           or 1, K = 2 (posterior mean, std) or 1 (mean only: pixels, fast-DiT
                           features). Values are the autoencoder's own (unscaled) latents.
    repa-00000.npy ...     with meta["repa"] only: [n, 2, T, D] float16, a frozen encoder's patch tokens
                           (T = grid rows x cols, D channels) of the image and its mirror image, for
                           REPA's alignment loss; written and committed with the shard of the same rows
    shard-00000.json       progress of that shard: rows done, skipped files, statistics
    .lock                  held (flock) by the extract_features.py run that writes the store
Rows of skipped (unreadable) files stay in the shard arrays, zero-filled, and are left out by the
reader. Shards are fixed ranges of the global order, handed to processes round-robin, so the store
does not depend on how many processes wrote it.

File names come from this layout alone (shard k is always shard-0000k.npy): the shard list in
meta.json must equal the layout of its rows and shard_size, so a store cannot point a reader or a
writer at a file outside itself. Writing never follows a link: shards and the lock file are opened
with O_NOFOLLOW (a symbolic link there, or a shard with other hard links, is refused; encoder
feature arrays are shards in this respect), and
meta.json, labels.npy and progress files are renamed into place, which replaces a link instead of
writing through it.

Writing, as extract_features.py does it: read_existing (refuses a store made with other settings),
lock_store, new_meta and start_store (rank 0), open_shards for this process's shards, per batch
ShardWriter.write / skip / commit, then finish_store (rank 0) marks the store complete.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import warnings

import numpy as np
import torch

from files import DiskFullError, UserError, atomic_write, free_bytes

FORMAT_VERSION = 1
META_FILE = "meta.json"
LABELS_FILE = "labels.npy"
# Held with flock by the run writing a store (released by the OS when that process ends, even killed).
LOCK_FILE = ".lock"
# Store settings that must match for a rerun to continue an existing store.
SETTINGS_KEYS = ("format", "source", "vae", "scaling_factor", "image_size", "latent_shape", "dtype",
                 "views", "posterior", "flip", "shard_size", "rows", "files_sha1", "repa", "frames",
                 "frame_stride", "clips_per_video")
# Settings added after format 1, with what a store written before them means: such a store reads the same.
LATER_SETTINGS = {"repa": None, "frames": None, "frame_stride": None, "clips_per_video": None}
# REPA's encoder features are stored in half precision whatever --dtype the latents use.
REPA_DTYPE = "float16"

# How the horizontal flip is realised when reading (meta["flip"]).
FLIP_ENCODED = "encoded"  # the mirror image was encoded too: view 1 of every row
FLIP_EXACT = "exact"      # pixel space: mirroring the stored array is the mirror image
FLIP_NONE = "none"        # no mirror available (fast-DiT features, where one flip is frozen in)


class StoreError(UserError, ValueError):
    """A store (or the input of one) cannot be used: unfinished, damaged, or made with other settings."""


def shard_name(k):
    """File stem of shard k ("shard-00003"): its array is <stem>.npy, its progress <stem>.json."""
    return f"shard-{k:05d}"


def repa_name(k):
    """File name of shard k's encoder features ("repa-00003.npy")."""
    return f"repa-{k:05d}.npy"


def repa_settings(encoder, weights, input_size, grid, dim, mean, std):
    """
    meta["repa"] of a store holding a frozen encoder's patch tokens for REPA (sihyun-yu/REPA).

    :param encoder: the timm model name. :param weights: "sha256:<hex>" of the weights file, or where
           timm's hub download came from ("timm hub ..."). :param input_size: the encoder's input side
           in pixels. :param grid: [rows, cols] of its patch tokens. :param dim: channels per token.
    :param mean, std: the per-channel normalisation applied to [0, 1] images before the encoder.
    :return: a plain dict; bytes_per_image counts both views.
    """
    return {"encoder": encoder, "weights": weights, "input_size": input_size, "grid": list(grid), "dim": dim,
            "mean": list(mean), "std": list(std), "dtype": REPA_DTYPE,
            "bytes_per_image": 2 * grid[0] * grid[1] * dim * np.dtype(REPA_DTYPE).itemsize}


def shard_layout(rows, shard_size):
    """meta["shards"] of a store of `rows` rows: [{"file": "shard-00000.npy", "rows": n}, ...]."""
    return [{"file": shard_name(k) + ".npy", "rows": min(shard_size, rows - lo)}
            for k, lo in enumerate(range(0, rows, shard_size))]


def shown(name):
    """A path or name as printable text: bytes that are not UTF-8 (kept by Python as surrogates, which
    print() and other JSON readers refuse) become backslash escapes, e.g. caf\\xe9."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def write_json_atomic(path, obj):
    """Write JSON so that readers (and a rerun after a kill) see the old or the new file, never half.
    :raises files.DiskFullError: the disk is full (nothing is left behind)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_json(path):
    """:return: the JSON object (a dict) in path.
    :raises StoreError: the file is not a JSON object (a damaged store file); FileNotFoundError: missing."""
    with open(path) as f:
        try:
            obj = json.load(f)
        except ValueError as e:
            raise StoreError(f"{path} is damaged (not JSON: {e})") from e
    if not isinstance(obj, dict):
        raise StoreError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object)")
    return obj


def _count(v):
    return type(v) is int and v >= 0


def _positive_or_none(v):
    return v is None or type(v) is int and v > 0


def _repa_fits(v):
    """meta["repa"]: None, or what repa_settings returns (the reader builds the arrays' shapes from it)."""
    if v is None:
        return True
    try:
        return (all(type(n) is int and n > 0 for n in (v["input_size"], v["dim"], *v["grid"]))
                and all(type(c) in (int, float) for c in v["mean"] + v["std"])
                and isinstance(v["encoder"], str) and isinstance(v["weights"], str)
                and v == repa_settings(v["encoder"], v["weights"], v["input_size"], v["grid"], v["dim"],
                                       v["mean"], v["std"]))
    except (KeyError, TypeError, IndexError):
        return False


# What each field of meta.json may hold; a reader indexes arrays and builds dtypes from them.
FIELD_CHECKS = {
    "rows": _count, "shard_size": lambda v: _count(v) and v > 0,
    "dtype": lambda v: v in ("float16", "float32"),
    "latent_shape": lambda v: isinstance(v, list) and len(v) in (3, 4) and all(_count(n) and n > 0 for n in v),
    "views": lambda v: type(v) is int and v in (1, 2), "posterior": lambda v: isinstance(v, bool),
    "flip": lambda v: v in (FLIP_ENCODED, FLIP_EXACT, FLIP_NONE),
    "scaling_factor": lambda v: type(v) in (int, float) and 0 < v < float("inf"),
    "count": _count, "num_classes": _count,
    "skipped_indices": lambda v: isinstance(v, list) and all(_count(i) for i in v) and v == sorted(set(v)),
    "repa": _repa_fits, "frames": _positive_or_none, "frame_stride": _positive_or_none,
    "clips_per_video": _positive_or_none,
}


def _frames_fit(meta):
    """An image store's fields (no frames, no stride, [C, H, W]), or a video store's: [C, F, H, W] with F
    = frames, a stride, and a [video, first frame] per row in "clips"."""
    shape, clips = meta["latent_shape"], meta.get("clips")
    if meta["frames"] is None:
        return meta["frame_stride"] is None and len(shape) == 3
    return (meta["frame_stride"] is not None and len(shape) == 4 and shape[1] == meta["frames"]
            and isinstance(clips, list) and len(clips) == meta["rows"]
            and all(isinstance(c, list) and len(c) == 2 for c in clips))


# A store whose meta.json cannot be trusted is not continued or repaired: it is made again.
REMAKE = "delete the store and run the extract_features.py command that made it again"


def check_meta(path, meta):
    """
    Check a store's meta dict, filling in the settings it predates (LATER_SETTINGS) as they read.

    :raises StoreError: meta.json lacks a key the format needs or holds a value it cannot, or its shard
            list is not the layout of its rows and shard_size (a damaged or crafted file, e.g. one
            naming a file outside the store).
    """
    file = os.path.join(path, META_FILE)
    for k, v in LATER_SETTINGS.items():
        meta.setdefault(k, v)
    needed = SETTINGS_KEYS + ("shards",) + (("count", "num_classes", "skipped_indices") if meta.get("complete")
                                            else ())
    missing = [k for k in needed if k not in meta]
    if missing:
        raise StoreError(f"{file} is damaged: no {', '.join(missing)}; {REMAKE}")
    bad = [f"{k}={meta[k]!r}" for k in needed if k in FIELD_CHECKS and not FIELD_CHECKS[k](meta[k])]
    if meta.get("complete") and not bad and (meta["skipped_indices"][-1:] >= [meta["rows"]]
                                             or meta["count"] != meta["rows"] - len(meta["skipped_indices"])):
        bad = [f"count={meta['count']!r} of rows={meta['rows']!r} with {len(meta['skipped_indices'])} skipped"]
    if not bad and not _frames_fit(meta):
        bad = [(f"latent_shape={meta['latent_shape']!r} with frames={meta['frames']!r}, frame_stride="
                f"{meta['frame_stride']!r} and {len(meta.get('clips') or [])} clips for {meta['rows']} rows")]
    if bad:
        raise StoreError(f"{file} is damaged: {'; '.join(bad)}; {REMAKE}")
    if meta["shards"] != shard_layout(meta["rows"], meta["shard_size"]):
        raise StoreError(f"{file} is damaged: its shard list is not the layout of {meta['rows']} rows in shards "
                         f"of {meta['shard_size']} (shard-00000.npy, ...); {REMAKE}")


def inputs_digest(files, labels, root):
    """
    The store's identity of its inputs (meta["files_sha1"]): each file's path under root, label, size
    and modification time (whole seconds). A rerun on another folder, or after a file was replaced or
    edited, is refused instead of mixing old and new contents into one store; the pixels themselves
    are not hashed (that would read the whole dataset once more).
    """
    h = hashlib.sha1()
    for f, y in zip(files, labels):
        try:
            st = os.stat(f)
            size, mtime = st.st_size, int(st.st_mtime)
        except OSError:  # vanished since the listing: it will be skipped as unreadable
            size, mtime = -1, -1
        h.update(os.fsencode(os.path.relpath(f, root)) + f"\t{y}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def shard_arrays(meta, k):
    """
    The arrays of shard k, {file name: (shape, dtype)}: the latents (rows, views, 2 (mean, std) or 1,
    C, H, W), or (..., C, F, H, W) in a video store, and, in a store with REPA features, the encoder's patch tokens (rows, 2 views, T, D).
    """
    rows = meta["shards"][k]["rows"]
    arrays = {shard_name(k) + ".npy": ((rows, meta["views"], 2 if meta["posterior"] else 1, *meta["latent_shape"]),
                                       meta["dtype"])}
    repa = meta.get("repa")
    if repa:
        arrays[repa_name(k)] = ((rows, 2, repa["grid"][0] * repa["grid"][1], repa["dim"]), repa["dtype"])
    return arrays


def shard_problems(path, meta, k):
    """{file name: what is wrong} for shard k's arrays (shard_arrays) that do not hold the whole array."""
    problems = {name: array_problem(os.path.join(path, name), shape, dtype)
                for name, (shape, dtype) in shard_arrays(meta, k).items()}
    return {name: p for name, p in problems.items() if p}


def array_problem(file, shape, dtype):
    """
    Check a shard's array file against the shape and dtype it must hold, from its header and size (no
    data read).

    :return: None when it holds the whole array, else what is wrong ("is truncated: ...").
    """
    shape, dtype = tuple(shape), np.dtype(dtype)
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found_shape, _, found_dtype = read_header(f)
            header_bytes = f.tell()
        size = os.path.getsize(file)
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as e:  # numpy raises ValueError for a bad magic string or header
        return f"is not a .npy array ({e})"
    if tuple(found_shape) != shape or found_dtype != dtype:
        return f"holds {found_dtype} {tuple(found_shape)} where the store needs {dtype} {shape}"
    want = header_bytes + int(np.prod(shape)) * dtype.itemsize
    if size < want:
        return f"is truncated: {size:,} of {want:,} bytes"
    return None


def labels_problem(path, meta):
    """:return: None when labels.npy holds int64 [rows] classes in [0, num_classes), else what is wrong."""
    try:
        labels = np.load(os.path.join(path, LABELS_FILE), mmap_mode="r")
    except (OSError, ValueError) as e:  # missing, truncated or not an array
        return f"is damaged ({e})"
    if (labels.shape != (meta["rows"],) or labels.dtype != np.int64
            or labels.size and not 0 <= labels.min() <= labels.max() < meta["num_classes"]):
        return (f"holds {labels.dtype} {labels.shape}, the store needs int64 ({meta['rows']},) "
                f"in [0, {meta['num_classes']})")
    return None


def store_problems(path, meta):
    """{file name: what is wrong} for the store's data files (shards, encoder features, labels.npy) that
    are damaged."""
    problems = {}
    for k in range(len(meta["shards"])):
        problems.update(shard_problems(path, meta, k))
    labels = labels_problem(path, meta)
    return dict(problems, **{LABELS_FILE: labels}) if labels else problems


# Writing ------------------------------------------------------------------------------------------

def read_existing(path, settings):
    """
    The store already at `path`, for a run that writes it with `settings` (a dict of SETTINGS_KEYS).

    :return: None when there is none yet (no folder, or an empty one), else its meta dict.
    :raises StoreError: path holds something else, a store made with other settings, or a damaged meta.
    """
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        if os.path.isdir(path) and set(os.listdir(path)) - {LOCK_FILE}:
            raise StoreError(f"--features-path {path} exists, is not empty and is not a latent store: "
                             f"refusing to write into it")
        return None
    meta = read_json(meta_path)
    check_meta(path, meta)
    diff = [f"{k}: store has {meta.get(k)!r}, this run {settings[k]!r}"
            for k in SETTINGS_KEYS if meta.get(k) != settings[k]]
    if diff:
        raise StoreError(f"--features-path {path} holds a store made with other settings or inputs "
                         f"(the inputs' names, sizes or modification times differ when files_sha1 does); "
                         f"choose another folder or delete it.\n  " + "\n  ".join(diff))
    return meta


def _open_no_link(file, flags, what):
    """os.open(file, flags) that refuses a symbolic link, anything but a regular file, and a file with
    other hard links (writing would change a file outside the store). :return: the descriptor."""
    try:
        fd = os.open(file, flags | os.O_NOFOLLOW, 0o666)
    except IsADirectoryError as e:
        raise StoreError(f"{file} is a folder: refusing to write {what} there; remove it and rerun") from e
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise StoreError(f"{file} is a symbolic link: refusing to write {what} through it (a store's files "
                         f"are its own); remove it and rerun") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        why = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise StoreError(f"{file} {why}: refusing to write {what} into it (a store's files are its own); "
                         f"remove it and rerun")
    return fd


def lock_store(path):
    """
    Take the store's lock file (creating the folder), which the OS releases when this process ends,
    however it ends, so there is no stale lock.

    :return: the open lock file; closing it releases the lock.
    :raises StoreError: another run holds the lock, or the lock file is a link.
    """
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, LOCK_FILE)
    holder = os.fdopen(_open_no_link(file, os.O_RDWR | os.O_CREAT, "the lock"), "r+b")
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder.close()
        raise StoreError(f"--features-path {path} is being written by another extract_features.py (it holds "
                         f"{file}); wait for it to end: this command then finds the store complete, or "
                         f"continues it if that run was stopped") from None
    return holder


def new_meta(settings, class_names, data_path):
    """The meta.json of a store being written: settings, the inputs' classes and folder, the layout."""
    return dict(settings, complete=False, data_path=data_path, num_classes=len(class_names),
                class_names=class_names, shards=shard_layout(settings["rows"], settings["shard_size"]))


def start_store(path, meta, labels):
    """Write labels.npy and the unfinished meta.json (one process: rank 0)."""
    with atomic_write(os.path.join(path, LABELS_FILE)) as f:
        np.save(f, np.asarray(labels, dtype=np.int64))
    write_json_atomic(os.path.join(path, META_FILE), meta)


def open_shard_array(file, shape, dtype, new):
    """
    Shard `file` as a writable memory map, every block of it allocated now. A sparse file (what
    np.lib.format.open_memmap makes) gets its blocks only when the memory map is written: on a full
    disk that write is a SIGBUS that kills the process without a word. Allocated up front, a full
    disk is an error here, before any encoding.

    :param new: create (or empty) the file and write its header; else open the existing array.
    :raises DiskFullError: not enough space (a new file is removed; the message says how much is needed).
            StoreError: the file is a link or not a plain file of its own.
    """
    dtype = np.dtype(dtype)
    fd = _open_no_link(file, os.O_RDWR | (os.O_CREAT if new else 0), "a shard")
    try:
        with os.fdopen(fd, "r+b") as f:
            if new:
                f.truncate(0)
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": shape})
            else:
                version = np.lib.format.read_magic(f)
                (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)(f)
            offset = f.tell()
            size = offset + int(np.prod(shape)) * dtype.itemsize
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise DiskFullError(errno.ENOSPC, f"no space left on the device for {file} ({size / 2**20:,.1f} "
                                                  f"MiB; {free_bytes(file) / 2**20:,.1f} MiB free there): free "
                                                  f"some space and rerun the same command, which continues from "
                                                  f"there") from e
            f.flush()
            return np.memmap(f, dtype=dtype, mode="r+", offset=offset, shape=shape)
    except OSError:
        if new:
            with contextlib.suppress(FileNotFoundError):
                os.remove(file)
        raise


class ShardWriter:
    """
    Shard k of a store being written: its rows as a writable memory map (with its encoder features
    as a second one in a store with REPA features) and its progress file (rows done, skipped inputs,
    and once every row is done the statistics that mark it finished). Rows are written at global
    indices lo .. lo + rows - 1.
    """

    def __init__(self, path, meta, k, progress):
        self.lo, self.rows = k * meta["shard_size"], meta["shards"][k]["rows"]
        self.json = os.path.join(path, shard_name(k) + ".json")
        arrays = shard_arrays(meta, k)

        def open_array(name):
            return open_shard_array(os.path.join(path, name), *arrays[name], new=progress is None)
        self.array = open_array(shard_name(k) + ".npy")
        self.repa = open_array(repa_name(k)) if repa_name(k) in arrays else None  # encoder features
        self.progress = progress or {"rows": self.rows, "done": 0, "skipped": []}
        if progress is None:
            write_json_atomic(self.json, self.progress)

    @property
    def done(self):
        """Rows of this shard written and committed (from the start of the shard)."""
        return self.progress["done"]

    @property
    def finished(self):
        return "stats" in self.progress

    def write(self, index, rows, features=None):
        """
        :param index: int [B] global rows of this shard. :param rows: [B x V x K x C x H x W] (or
               [B x V x K x C x F x H x W] clips).
        :param features: [B x 2 x T x D] encoder patch tokens of both views, exactly when the store has them.
        """
        assert (features is None) == (self.repa is None)
        self.array[index - self.lo] = rows
        if features is not None:
            self.repa[index - self.lo] = features

    def skip(self, index, path, error):
        """Record global row `index` as skipped: input `path` (printable) could not be used (`error`)."""
        self.progress["skipped"].append({"row": index - self.lo, "index": index, "path": path, "error": error})

    def commit(self, end):
        """Rows up to global index `end` (exclusive) are written: flush them to disk, then say so in the
        progress file (a rerun after a kill continues from there); the last commit finishes the shard."""
        for array in (self.array, self.repa):  # the data is on disk before the progress marker says so
            if array is not None:
                array.flush()
        self.progress["done"] = end - self.lo
        write_json_atomic(self.json, self.progress)
        if self.done == self.rows:
            self.finish()

    def finish(self):
        """Add the shard's statistics to its progress file: the shard is finished."""
        valid = np.ones(self.rows, dtype=bool)
        valid[[s["row"] for s in self.progress["skipped"]]] = False
        self.progress["stats"] = shard_statistics(self.array, valid)
        write_json_atomic(self.json, self.progress)


def read_progress(path, meta, k):
    """:return: shard k's progress dict, or None when its file is missing or damaged (not JSON, or
    fields that do not fit the shard): the shard then starts again."""
    file = os.path.join(path, shard_name(k) + ".json")
    try:
        progress = read_json(file)
    except (OSError, StoreError):
        return None
    rows, done, skipped = progress.get("rows"), progress.get("done"), progress.get("skipped")
    fits = (rows == meta["shards"][k]["rows"] and _count(done) and done <= rows and isinstance(skipped, list)
            and all(isinstance(s, dict) and _count(s.get("row")) and s["row"] < done and "path" in s
                    and "error" in s and s.get("index") == k * meta["shard_size"] + s["row"] for s in skipped))
    return progress if fits else None


def open_shards(path, meta, shards):
    """
    The shards among `shards` (indices) that still need work, as {k: ShardWriter}. A shard whose
    array or progress file is missing or damaged starts again from its first row.
    """
    writers = {}
    for k in shards:
        progress = None if shard_problems(path, meta, k) else read_progress(path, meta, k)
        if progress is None or "stats" not in progress:
            writers[k] = ShardWriter(path, meta, k, progress)
    return writers


def finish_store(path, meta, files, root):
    """
    Combine the finished shards' skip lists and statistics into meta.json, marking the store complete
    (one process: rank 0, after every process has finished its shards).

    :param files: every input file, in row order; root: the folder they are listed under.
    :return: (the complete meta, the skipped entries: dicts with index, path and error). bytes_per_image
             is the bytes of one row: of a clip in a video store.
    :raises StoreError: a shard is missing, damaged or unfinished (the store is not called complete).
    """
    problems = store_problems(path, meta)
    if problems:
        name, problem = next(iter(problems.items()))
        raise StoreError(f"{os.path.join(path, name)} {problem} after this run wrote it (removed or changed "
                         f"meanwhile?): the store is not complete; rerun the same command")
    parts = []
    for k in range(len(meta["shards"])):
        js = os.path.join(path, shard_name(k) + ".json")
        part = read_json(js) if os.path.isfile(js) else {}
        if "stats" not in part:
            raise StoreError(f"{js} is missing or unfinished after this run: the store is not complete; "
                             f"rerun the same command")
        parts.append(part)
    skipped = sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["index"])
    mean, std = channel_moments([p["stats"] for p in parts], meta["scaling_factor"])
    meta = dict(meta, complete=True, count=len(files) - len(skipped), channel_mean=mean, channel_std=std,
                skipped=[shown(os.path.relpath(files[s["index"]], root)) for s in skipped],
                skipped_indices=[s["index"] for s in skipped],
                bytes_per_image=int(np.prod(meta["latent_shape"])) * meta["views"]
                * (2 if meta["posterior"] else 1) * np.dtype(meta["dtype"]).itemsize)
    write_json_atomic(os.path.join(path, META_FILE), meta)
    return meta, skipped


# Statistics and reading -----------------------------------------------------------------------------

def shard_statistics(arr, valid, chunk=1024):
    """
    Sums for the per-channel statistics of one shard's valid rows, over all stored views.

    :param arr: [n x V x K x C x H x W] shard array, or [n x V x K x C x F x H x W] for clips (a memory
                map is read `chunk` rows at a time, so a large shard needs no large float64 copy).
    :param valid: [n] bool, rows that hold an image.
    :return: dict of plain lists: n (values counted per channel), sum and sumsq of the means per
             channel, sum of the variances (std**2) per channel, all in float64.
    """
    c = arr.shape[3]
    not_channel = tuple(a for a in range(arr.ndim - 1) if a != 2)  # (0, 1, 3, 4): rows, views, [frames,] H, W
    sums = {key: np.zeros(c) for key in ("sum", "sumsq", "sumvar")}
    n = 0
    for lo in range(0, len(arr), chunk):
        sel = np.asarray(arr[lo:lo + chunk])[valid[lo:lo + chunk]].astype(np.float64)  # (m, V, K, C, [F,] H, W)
        mean = sel[:, :, 0]                                                             # (m, V, C, [F,] H, W)
        sums["sum"] += mean.sum(axis=not_channel)
        sums["sumsq"] += (mean ** 2).sum(axis=not_channel)
        if sel.shape[2] == 2:
            sums["sumvar"] += (sel[:, :, 1] ** 2).sum(axis=not_channel)
        n += mean.size // c
    return {"n": int(n), **{key: v.tolist() for key, v in sums.items()}}


def channel_moments(stats, scaling_factor):
    """
    Per-channel mean and standard deviation of the training inputs x = scaling_factor * (mean + std *
    noise), combined from shard_statistics in a fixed (shard) order: Var x = Var(mean) + E[std^2].

    :return: (channel_mean, channel_std) as lists of floats.
    """
    n = sum(s["n"] for s in stats)
    if n == 0:
        raise ValueError("no valid images: cannot compute channel statistics")
    total = lambda key: np.sum([s[key] for s in stats], axis=0)  # noqa: E731
    m = total("sum") / n
    var = total("sumsq") / n - m ** 2 + total("sumvar") / n
    return (scaling_factor * m).tolist(), (scaling_factor * np.sqrt(np.maximum(var, 0.0))).tolist()


def _mix64(seed, epoch, index):
    """
    Unrelated 64-bit keys for (seed, epoch, index) triples: the splitmix64 finaliser, vectorised.

    :param index: int64 [B] dataset indices.
    :return: uint64 [B]; bit 63 is the flip, the low 32 bits seed the noise generator (torch's CPU
             generator keeps only those).
    """
    h = np.full(index.shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for key in (np.full_like(h, seed & (2**64 - 1)), np.full_like(h, epoch), index.astype(np.uint64)):
        h = (h ^ key) * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap modulo 2**64
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


class LatentDataset(torch.utils.data.Dataset):
    """
    Training samples from a store written by extract_features.py.

    Item i is (x, y): x a float32 [C x H x W] tensor already multiplied by meta["scaling_factor"]
    (pixels in [-1, 1] for a `--vae none` store), y the int64 label (a 0-d tensor). In a video store
    (meta["frames"] = F) x is a clip, [C x F x H x W]: the flip mirrors every frame (the encoded
    mirrored clip), the posterior noise is drawn for the whole clip. With repa=True it
    is (x, y, z): z float32 [T x D], the encoder's patch tokens of the same view as x (meta["repa"]
    gives their grid and D).

    :param path: the store folder.
    :param flip: draw a random horizontal flip per access (DiT's RandomHorizontalFlip). False: the
                 original orientation. Stores without a mirror (fast-DiT conversions) warn and use
                 the stored orientation.
    :param sample_posterior: draw mean + std * noise per access (DiT's latent_dist.sample()).
                 False: the posterior mean.
    :param seed: None: flips and noise from torch's default generator (per DataLoader worker). An
                 int: the flip and the noise of item i in epoch e (see set_epoch) are functions of
                 (seed, e, i), so samples do not depend on workers, batching or process count, and a
                 resumed run sees exactly the samples an uninterrupted one would.
    :param repa: also return the encoder features (REPA). Reading them draws nothing: x is the same
                 with and without them.

    Batches: the DataLoader's `__getitems__(indices)` reads a whole batch in one vectorised read
    (read_batch) and returns its samples as a list, as the default collate expects. The memory maps
    are opened lazily in each process, so DataLoader workers work (fork or spawn).

    :raises FileNotFoundError: path is not a store. StoreError (a ValueError): the store is
            unfinished, of another format, or damaged (the message names the file), or repa=True on a
            store without encoder features.
    """

    def __init__(self, path, flip=True, sample_posterior=True, seed=None, repa=False):
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            if any(d.endswith("_features") for d in _listdir(path)):
                raise FileNotFoundError(
                    f"{path} looks like fast-DiT feature folders; convert them into a store first: "
                    f"python extract_features.py --fast-dit-path {path} --features-path STORE "
                    f"--image-size 256 --vae ema")
            raise FileNotFoundError(f"{path} is not a latent store (no {META_FILE}); "
                                    f"make one with extract_features.py")
        self.path = path
        self.meta = read_json(meta_path)
        if not self.meta.get("complete"):
            raise StoreError(f"{path} is an unfinished extraction: rerun the same extract_features.py "
                             f"command to complete it")
        if self.meta.get("format") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format {self.meta.get('format')}, this code reads "
                             f"{FORMAT_VERSION}")
        check_meta(path, self.meta)
        # A damaged shard is found now, not by a read error (or a SIGBUS) hours into training.
        problems = store_problems(path, self.meta)
        if problems:
            name, problem = next(iter(problems.items()))
            raise StoreError(f"{os.path.join(path, name)} {problem}: the store is damaged; rerun the "
                             f"extract_features.py command that made it, which writes that file again")
        if repa and not self.meta["repa"]:
            raise StoreError(f"{path} holds no encoder features for REPA: extract the images again into a new "
                             f"store with extract_features.py --repa-encoder NAME (e.g. "
                             f"vit_base_patch14_dinov2.lvd142m)")
        if flip and self.meta["flip"] == FLIP_NONE:
            warnings.warn(f"{path} holds no mirror images (converted fast-DiT features): flip=True "
                          f"has no effect, the stored orientation is used", stacklevel=2)
        self.flip = bool(flip) and self.meta["flip"] != FLIP_NONE
        self.sample_posterior = bool(sample_posterior) and self.meta["posterior"]
        self.seed = seed
        self.repa = bool(repa)
        self.epoch = 0
        self.scaling_factor = float(self.meta["scaling_factor"])
        self.shard_size = int(self.meta["shard_size"])
        skipped = np.asarray(self.meta["skipped_indices"], dtype=np.int64)
        # Dataset index -> global row, leaving out skipped files.
        self.rows = np.setdiff1d(np.arange(self.meta["rows"], dtype=np.int64), skipped)
        labels = np.load(os.path.join(path, LABELS_FILE))
        self.labels = labels[self.rows]
        assert len(self.rows) == self.meta["count"]
        self._shards = self._features = None  # memory maps, opened on first read in each process

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        """Select the epoch whose flips and noise a seeded dataset draws (no effect when seed is None)."""
        self.epoch = int(epoch)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_shards"] = state["_features"] = None  # memory maps are reopened in the worker, not pickled
        return state

    def _open(self):
        shards = range(len(self.meta["shards"]))
        self._shards = [np.load(os.path.join(self.path, shard_name(k) + ".npy"), mmap_mode="r") for k in shards]
        if self.repa:
            self._features = [np.load(os.path.join(self.path, repa_name(k)), mmap_mode="r") for k in shards]

    def __getitem__(self, i):
        return tuple(t[0] for t in self.read_batch([i]))

    def __getitems__(self, indices):
        """The DataLoader's batched fetch: the samples of `indices` as a list of (x, y) or (x, y, z),
        read in one vectorised read_batch. The default collate stacks them again: about 6% of the
        reader's CPU time against passing read_batch's tensors through (measured), too little to ask
        every DataLoader for a collate_fn."""
        return list(zip(*(t.unbind(0) for t in self.read_batch(indices))))  # views into the batch: no copy

    def read_batch(self, indices):
        """
        The samples of `indices`, stacked: the items are those of __getitem__, read in one pass.

        :param indices: dataset indices (repeats allowed).
        :return: (x [B x C x H x W] float32, or [B x C x F x H x W] clips, y [B] int64), and with repa
                 z [B x T x D] float32.
        """
        if self._shards is None:
            self._open()
        idx = np.asarray(indices, dtype=np.int64)
        b = len(idx)
        if self.seed is None:
            flips = torch.randint(0, 2, (b,)).numpy().astype(bool) if self.flip else np.zeros(b, bool)
        else:
            keys = _mix64(self.seed, self.epoch, idx)
            flips = (keys >> np.uint64(63)).astype(bool) if self.flip else np.zeros(b, bool)
        encoded_view = flips.astype(np.int64) if self.meta["flip"] == FLIP_ENCODED else np.zeros(b, np.int64)
        k = 2 if self.sample_posterior else 1  # read the std only when it is used
        rows = self.rows[idx]
        order = np.argsort(rows, kind="stable")  # ascending rows: sequential-ish reads per shard
        out = np.empty((b, k) + tuple(self.meta["latent_shape"]), dtype=self.meta["dtype"])
        if self.repa:  # both views' features are stored for any store: those of x's view, mirrored or not
            grid, dim = self.meta["repa"]["grid"], self.meta["repa"]["dim"]
            z, feature_view = np.empty((b, grid[0] * grid[1], dim), dtype=REPA_DTYPE), flips.astype(np.int64)
        shard_of = rows // self.shard_size
        for s in np.unique(shard_of):
            pos = order[shard_of[order] == s]
            out[pos] = self._shards[s][rows[pos] - s * self.shard_size, encoded_view[pos], :k]
            if self.repa:
                z[pos] = self._features[s][rows[pos] - s * self.shard_size, feature_view[pos]]
        data = torch.from_numpy(out).float()  # (B, k, C, [F,] H, W), a fresh tensor
        x = data[:, 0]                         # (B, C, [F,] H, W) posterior means
        if self.sample_posterior:
            if self.seed is None:
                noise = torch.randn(x.shape)
            else:
                noise, g = torch.empty(x.shape), torch.Generator()
                for row, key in zip(noise, keys & np.uint64(0xFFFFFFFF)):
                    row.normal_(generator=g.manual_seed(int(key)))
            x = torch.addcmul(x, data[:, 1], noise)  # mean + std * noise, as latent_dist.sample()
        else:
            x = x.contiguous()
        if self.meta["flip"] == FLIP_EXACT and flips.any():
            f = torch.from_numpy(flips)
            x[f] = x[f].flip(-1)
        if self.scaling_factor != 1.0:
            x.mul_(self.scaling_factor)
        y = torch.from_numpy(self.labels[idx])
        return (x, y, torch.from_numpy(z).float()) if self.repa else (x, y)


def _listdir(path):
    return os.listdir(path) if os.path.isdir(path) else []
