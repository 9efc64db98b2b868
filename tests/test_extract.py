"""extract_features.py: what it stores (REPA encoder features too), under one and two processes, after a
kill, on a full disk, from odd image files and folders of links, on bad input and output paths, with a
second run on the same store, and with links or crafted names in a store (nothing is written or read
outside it)."""
import contextlib
import errno
import filecmp
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

import extract_features
import latents
from conftest import REPA_ENCODER, VIDEO_FLAGS, extract_args
from files import DiskFullError
from vae import center_crop_arr, load_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preprocess(path, size):
    """DiT's transform, written out independently of extract_features.ImageItems."""
    img = center_crop_arr(Image.open(path).convert("RGB"), size)
    return transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(img))


def valid_files(root, skipped):
    classes = sorted(os.listdir(root))
    files = [(os.path.join(c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if not f.endswith(".txt")]
    return classes, [(f, y) for f, y in files if f not in skipped], files


def store_rows(path):
    meta = json.load(open(os.path.join(path, "meta.json")))
    arrays = [np.load(os.path.join(path, s["file"])) for s in meta["shards"]]
    return meta, np.concatenate(arrays)


def test_store_holds_posterior_of_image_and_mirror(latent_store, tiny_vae_path, image_folder):
    root, skipped = image_folder
    classes, files, all_files = valid_files(root, skipped)
    meta, rows = store_rows(latent_store)
    assert meta["complete"] and meta["class_names"] == classes and meta["num_classes"] == 3
    assert meta["count"] == len(files) == 10 and meta["rows"] == len(all_files) == 12
    assert meta["scaling_factor"] == 0.18215 and meta["dtype"] == "float16"
    assert rows.shape == (12, 2, 2, 4, 8, 8) and rows.dtype == np.float16
    assert meta["bytes_per_image"] == 2 * 2 * 4 * 8 * 8 * 2

    vae = load_vae(tiny_vae_path)
    x = torch.stack([preprocess(os.path.join(root, f), 16) for f, _ in files])
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        post_m = vae.encode(x.flip(-1)).latent_dist
    assert meta["latent_shape"] == list(post.mean.shape[1:]) == [4, 8, 8]
    want = torch.stack([torch.stack([post.mean, post.std], 1),
                        torch.stack([post_m.mean, post_m.std], 1)], 1).numpy()
    index = [all_files.index((f, y)) for f, y in files]
    got = rows[index].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)  # float16 storage
    assert not np.allclose(got[:, 0, 0], got[:, 1, 0], atol=1e-3)  # the mirror is really encoded

    labels = np.load(os.path.join(latent_store, "labels.npy"))
    assert labels[index].tolist() == [y for _, y in files]

    # Per-channel statistics of sf * (mean + std * noise) over both views.
    m, s = got[:, :, 0], got[:, :, 1]
    ch_mean = m.mean(axis=(0, 1, 3, 4))
    ch_var = m.var(axis=(0, 1, 3, 4)) + (s ** 2).mean(axis=(0, 1, 3, 4))
    np.testing.assert_allclose(meta["channel_mean"], 0.18215 * ch_mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(meta["channel_std"], 0.18215 * np.sqrt(ch_var), rtol=1e-4)


def test_corrupt_files_are_skipped_and_named(latent_store, image_folder):
    meta, rows = store_rows(latent_store)
    assert meta["skipped"] == image_folder[1]
    _, _, all_files = valid_files(*image_folder)
    assert meta["skipped_indices"] == [[f for f, _ in all_files].index(s) for s in image_folder[1]]
    assert not rows[meta["skipped_indices"]].any()  # their rows stay empty
    ds = latents.LatentDataset(latent_store)
    assert len(ds) == 10 and not set(ds.rows) & set(meta["skipped_indices"])


def test_finished_store_is_left_alone(latent_store, tiny_vae_path, image_folder, capsys):
    before = {f: os.stat(os.path.join(latent_store, f)).st_mtime_ns for f in os.listdir(latent_store)}
    extract_features.main(extract_args(data_path=image_folder[0], features_path=latent_store,
                                       vae=tiny_vae_path))
    assert "nothing to do" in capsys.readouterr().out
    after = {f: os.stat(os.path.join(latent_store, f)).st_mtime_ns for f in os.listdir(latent_store)}
    assert after == before


@pytest.mark.parametrize("change", [dict(image_size=8), dict(vae="none"), dict(dtype="float32"),
                                    dict(shard_size=5)])
def test_store_with_other_settings_is_refused(latent_store, tiny_vae_path, image_folder, change):
    args = extract_args(**dict(dict(data_path=image_folder[0], features_path=latent_store, vae=tiny_vae_path),
                               **change))
    before = open(os.path.join(latent_store, "meta.json")).read()
    with pytest.raises(extract_features.StoreError, match=next(iter(change))):
        extract_features.main(args)
    assert open(os.path.join(latent_store, "meta.json")).read() == before


def test_bad_inputs_are_clear_errors(tmp_path, image_folder):
    with pytest.raises(extract_features.StoreError, match="not a folder"):
        extract_features.main(extract_args(data_path=str(tmp_path / "missing"),
                                           features_path=str(tmp_path / "s"), vae="none"))
    os.makedirs(tmp_path / "empty" / "class0")
    with pytest.raises(extract_features.StoreError, match="no images"):
        extract_features.main(extract_args(data_path=str(tmp_path / "empty"),
                                           features_path=str(tmp_path / "s"), vae="none"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("precious")
    with pytest.raises(extract_features.StoreError, match="not a latent store"):
        extract_features.main(extract_args(data_path=image_folder[0],
                                           features_path=str(tmp_path / "other"), vae="none"))
    assert os.listdir(tmp_path / "other") == ["mine.txt"]  # not even a lock file written into it
    with pytest.raises(extract_features.StoreError, match="no sub-folders"):
        extract_features.main(extract_args(data_path=str(tmp_path / "other"),
                                           features_path=str(tmp_path / "s"), vae="none"))
    with pytest.raises(SystemExit):
        extract_args(data_path=image_folder[0], features_path=str(tmp_path / "s"), max_image_pixels=0)


def test_bad_output_paths_fail_before_any_work(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the VAE cannot load: a VAEError would mean work began
    (tmp_path / "afile").write_text("precious")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for store, why in [(tmp_path / "afile", "is a file, not a folder"),
                       (tmp_path / "afile" / "store", "is a file, not a folder"),
                       (tmp_path / "dangling", "is a link to nothing"),
                       (tmp_path / "dangling" / "store", "is a link to nothing"),
                       (os.path.join(image_folder[0], "features"), "inside the input folder"),
                       (image_folder[0], "inside the input folder")]:
        with pytest.raises(extract_features.StoreError, match=why):
            extract_features.main(extract_args(data_path=image_folder[0], features_path=str(store),
                                               vae="nobody/no-such-vae"))
    assert (tmp_path / "afile").read_text() == "precious"
    assert sorted(os.listdir(image_folder[0])) == ["ant", "bee", "cat"]


@contextlib.contextmanager
def time_limit(seconds):
    """Raise TimeoutError in this (main) thread after `seconds`: bounds a call that may never end."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def small_images(root, classes=("c0", "c1"), per_class=2):
    for c in classes:
        os.makedirs(root / c)
        for i in range(per_class):
            Image.new("RGB", (4, 4), (40 * i, 10, 200)).save(root / c / f"{i}.png")


@pytest.mark.parametrize("loops, named", [(["c0/loop -> ."], "c0/loop"), (["c0/up -> .."], "c0/up"),
                                          (["c0/loop -> .", "c0/loop2 -> ."], "c0/loop"),
                                          (["c0/x -> ../c1", "c1/y -> ../c0"], "c0/x/y")])
def test_a_loop_of_links_is_refused_naming_the_link(tmp_path, loops, named):
    """`ln -s . imgs/c0/loop` made 129 rows from 4 images; two such links made a listing that never ended.
    The listing is bounded here by a time limit, so the old behaviour fails instead of hanging."""
    root = tmp_path / "imgs"
    small_images(root)
    for loop in loops:
        link, target = loop.split(" -> ")
        os.symlink(target, root / link)
    with time_limit(20), pytest.raises(extract_features.StoreError, match=f"{root / named} leads back to .* a loop"):
        extract_features.main(extract_args(data_path=str(root), features_path=str(tmp_path / "s"), vae="none"))
    assert not os.path.exists(tmp_path / "s")


def test_links_that_are_not_loops_are_listed_as_torchvision_lists_them(tmp_path, image_folder):
    """A folder linked into another class, a linked file, a class folder that is a link and nested
    folders: the same files, labels and order as torchvision's ImageFolder (the store's identity)."""
    root = tmp_path / "imgs"
    shutil.copytree(image_folder[0], root)
    small_images(tmp_path / "elsewhere", classes=("dog",))
    os.symlink(tmp_path / "elsewhere" / "dog", root / "dog")
    os.makedirs(root / "ant" / "sub" / "deeper")
    shutil.copy(root / "ant" / "a1.png", root / "ant" / "sub" / "deeper" / "z.PNG")
    os.symlink(root / "bee", root / "ant" / "linked")
    os.symlink(root / "cat" / "c0.png", root / "bee" / "0-link.png")
    classes, class_to_idx = find_classes(root)
    want = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    files, labels, names = extract_features.scan_images(str(root))
    assert names == classes and list(zip(files, labels)) == want
    assert extract_features.IMG_EXTENSIONS == IMG_EXTENSIONS
    assert len(files) == 22 and os.path.join(str(root), "ant", "linked", "0-link.png") in files


def png(path, width, height, depth, color, rows):
    """A PNG written byte by byte (independent of Pillow's writer): depth 8 or 16, color 0 (gray) or
    2 (RGB), rows an iterable of each row's big-endian sample bytes, compressed as they come."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    deflate, data = zlib.compressobj(), b""
    for row in rows:
        data += deflate.compress(b"\0" + row)  # filter type 0 (none) before every row
    data += deflate.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_odd_images_are_scaled_stored_or_skipped_and_listed(tmp_path):
    """Non-UTF-8 class and file names are stored; 16-bit PNGs and float TIFFs are scaled to 8 bits, not
    clipped; a float TIFF outside [0, 1] and a decompression bomb in Pillow's warning band (100M
    pixels: decoded at full size by Pillow) are skipped and listed."""
    rng = np.random.default_rng(0)
    root = os.fsencode(tmp_path / "odd")
    for cls in (b"ant", b"caf\xe9", b"deep"):
        os.makedirs(os.path.join(root, cls))
    path = lambda cls, name: os.fsdecode(os.path.join(root, cls, name))  # noqa: E731
    plain = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(plain).save(path(b"ant", b"plain.png"))
    Image.fromarray(plain[::-1]).save(path(b"caf\xe9", b"\xff.png"))
    gray16 = rng.integers(0, 65536, (8, 8)).astype(np.uint16)
    png(path(b"deep", b"gray16.png"), 8, 8, 16, 0, [r.astype(">u2").tobytes() for r in gray16])
    rgb16 = rng.integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    png(path(b"deep", b"rgb16.png"), 8, 8, 16, 2, [r.astype(">u2").tobytes() for r in rgb16])
    unit = rng.uniform(0, 1, (8, 8)).astype(np.float32)
    Image.fromarray(unit).save(path(b"deep", b"unit.tiff"))
    Image.fromarray(unit * 255).save(path(b"deep", b"wide.tiff"))
    png(path(b"deep", b"zbomb.png"), 10_000, 10_000, 8, 0, (bytes(10_000) for _ in range(10_000)))
    assert os.path.getsize(path(b"deep", b"zbomb.png")) < 200_000

    store = str(tmp_path / "store")
    meta = extract_features.main(extract_args(data_path=os.fsdecode(root), features_path=store, vae="none",
                                              image_size=8, dtype="float32"))
    assert meta["class_names"] == ["ant", "caf\\xe9", "deep"]
    assert meta["skipped"] == ["deep/wide.tiff", "deep/zbomb.png"]
    progress = json.load(open(os.path.join(store, "shard-00001.json")))
    errors = {os.path.basename(s["path"]): s["error"] for s in progress["skipped"]}
    assert errors["wide.tiff"].startswith("F pixels in [") and errors["wide.tiff"].endswith("], outside [0, 1]")
    assert errors["zbomb.png"] == "10000x10000 = 100,000,000 pixels, over --max-image-pixels 50,000,000"

    ds = latents.LatentDataset(store, flip=False)
    x, y = ds.read_batch(range(len(ds)))
    got = ((x + 1) * 127.5).round().to(torch.int64).permute(0, 2, 3, 1).numpy()  # (N, 8, 8, 3)
    assert y.tolist() == [0, 1, 2, 2, 2]
    np.testing.assert_array_equal(got[0], plain)
    np.testing.assert_array_equal(got[1], plain[::-1])
    np.testing.assert_array_equal(got[2], np.round(gray16 / 257)[..., None].repeat(3, -1))
    assert np.abs(got[3] - rgb16 / 257).max() <= 1  # Pillow keeps the high byte of each sample
    np.testing.assert_array_equal(got[4], np.round(unit.astype(np.float64) * 255)[..., None].repeat(3, -1))


# Run inside a mount namespace with a 96 KiB tmpfs at argv[1]: the script's own ending (run_script) on a
# full disk, what is left, then the same arguments again once the space has grown.
FULL_DISK = """
import os, subprocess, sys
import extract_features
from files import run_script
disk, data = sys.argv[1:]
argv = ["--data-path", data, "--features-path", disk + "/store", "--image-size", "32", "--vae", "none",
        "--dtype", "float32", "--shard-size", "4", "--batch-size", "3", "--num-workers", "0"]
try:
    run_script(lambda: extract_features.parse_args(argv), extract_features.main)
except SystemExit as e:
    print("@rc", e.code)
print("@", *sorted(os.listdir(disk + "/store")))
subprocess.run(["mount", "-o", "remount,size=1m", disk], check=True)
meta = extract_features.main(extract_features.parse_args(argv)[1])
print("@count", meta["count"], *sorted(os.listdir(disk + "/store")))
"""


def test_full_disk_is_a_clear_error_and_a_rerun_continues(tmp_path, image_folder):
    """On a real full file system (a 96 KiB tmpfs in a user and mount namespace): a one-line error, no
    temporary files; after the space grows, the same command finishes the store."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=96k", "none", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs unshare and tmpfs mounts in a user namespace")
    # Pixel store at 32x32 in float32: 48 KiB per 4-row shard, 3 shards; only the first fits.
    mount_and_run = 'mount -t tmpfs -o size=96k none "$1" && exec "$0" -c "$2" "$1" "$3"'
    r = subprocess.run(["unshare", "-rm", "sh", "-c", mount_and_run, sys.executable, str(disk), FULL_DISK,
                        image_folder[0]], cwd=REPO, capture_output=True, text=True, timeout=300)
    first, listing, rerun = [line for line in r.stdout.splitlines() if line.startswith("@")]
    assert first == "@rc 1", r.stdout + r.stderr  # before: rc=135, killed by SIGBUS on a sparse shard
    error = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "no space left on the device for" in error[0] and "shard-00001.npy" in error[0]
    assert "Traceback" not in r.stderr
    assert listing.split()[1:] == [".lock", "labels.npy", "meta.json", "shard-00000.json",
                               "shard-00000.npy"]  # no temporary file, no half-made shard
    assert rerun.split()[:2] == ["@count", "10"] and "shard-00002.npy" in rerun.split()


def test_reserving_a_shard_fails_cleanly(tmp_path, image_folder, monkeypatch):
    """The full-disk path without a namespace: the shard that cannot be reserved is removed, no
    temporary file is left, and the rerun finishes the store."""
    store = str(tmp_path / "store")
    reserve = os.posix_fallocate

    def full(fd, offset, length):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("shard-00002.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        reserve(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", full)
    args = extract_args(data_path=image_folder[0], features_path=store, vae="none", image_size=8)
    with pytest.raises(DiskFullError, match="shard-00002.npy .*free some space and rerun"):
        extract_features.main(args)
    assert sorted(os.listdir(store)) == [".lock", "labels.npy", "meta.json", "shard-00000.json", "shard-00000.npy",
                                         "shard-00001.json", "shard-00001.npy"]
    monkeypatch.setattr(os, "posix_fallocate", reserve)
    assert extract_features.main(args)["count"] == 10


def test_second_run_on_a_store_being_written_stops_at_once(tmp_path, image_folder, monkeypatch):
    """Two processes, as the lock is held per process; the second is also the script's one check of
    its command-line ending: a one-line error, no traceback."""
    store = str(tmp_path / "store")
    second = []
    encode = extract_features.Encoder.__call__

    def encode_and_start_another(self, x):
        if not second:  # while the first run holds the store, the same command again
            second.append(subprocess.run(
                [sys.executable, "extract_features.py", "--data-path", image_folder[0], "--features-path", store,
                 "--image-size", "8", "--vae", "none", "--shard-size", "4", "--batch-size", "3",
                 "--num-workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=120))
        return encode(self, x)
    monkeypatch.setattr(extract_features.Encoder, "__call__", encode_and_start_another)
    meta = extract_features.main(extract_args(data_path=image_folder[0], features_path=store, vae="none",
                                              image_size=8))
    r = second[0]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "has" not in r.stdout  # it encoded nothing
    assert "is being written by another extract_features.py" in r.stderr
    assert meta["complete"] and meta["count"] == 10


def test_changed_image_content_is_not_mixed_into_a_store(tmp_path, image_folder):
    """The inputs' identity covers each file's size and modification time, not only its name."""
    root = str(tmp_path / "images")
    shutil.copytree(image_folder[0], root)
    args = extract_args(data_path=root, features_path=str(tmp_path / "store"), vae="none", image_size=8)
    extract_features.main(args)
    target = os.path.join(root, "ant", "a1.png")
    Image.fromarray(np.zeros((52, 20), np.uint8)).save(target)  # same name, other pixels
    os.utime(target, (os.stat(target).st_atime, os.stat(target).st_mtime + 10))
    with pytest.raises(extract_features.StoreError, match="files_sha1"):
        extract_features.main(args)


def test_damaged_shard_or_labels_of_a_complete_store_are_written_again(tmp_path, latent_store, tiny_vae_path,
                                                                       image_folder, capsys, one_thread):
    store = str(tmp_path / "store")
    shutil.copytree(latent_store, store)
    shard = os.path.join(store, "shard-00001.npy")
    os.truncate(shard, os.path.getsize(shard) // 2)
    os.truncate(os.path.join(store, "labels.npy"), 100)
    with pytest.raises(latents.StoreError, match="shard-00001.npy is truncated"):
        latents.LatentDataset(store)
    extract_features.main(extract_args(data_path=image_folder[0], features_path=store, vae=tiny_vae_path))
    out = capsys.readouterr().out
    assert "shard-00001.npy is truncated" in out and "labels.npy is damaged" in out and "has 4 left" in out
    assert_same_store(latent_store, store)
    os.truncate(os.path.join(store, "labels.npy"), 100)  # alone: the rerun used to find "nothing to do"
    extract_features.main(extract_args(data_path=image_folder[0], features_path=store, vae=tiny_vae_path))
    assert "labels.npy is damaged" in capsys.readouterr().out
    assert_same_store(latent_store, store)


def test_pixel_mode_round_trips(tmp_path, image_folder):
    root, skipped = image_folder
    path = str(tmp_path / "px")
    meta = extract_features.main(extract_args(data_path=root, features_path=path, vae="none",
                                              image_size=12))
    assert meta["latent_shape"] == [3, 12, 12] and meta["scaling_factor"] == 1.0
    assert meta["posterior"] is False and meta["flip"] == latents.FLIP_EXACT
    _, files, _ = valid_files(root, skipped)
    ds = latents.LatentDataset(path, flip=False)
    x, y = ds.read_batch(list(range(len(ds))))
    got = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    want = np.stack([np.asarray(center_crop_arr(Image.open(os.path.join(root, f)).convert("RGB"), 12))
                     for f, _ in files])
    np.testing.assert_array_equal(got, want)
    assert y.tolist() == [c for _, c in files]
    flipped = latents.LatentDataset(path, flip=True, seed=3).read_batch(list(range(len(ds))) * 4)[0]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, torch.cat([x] * 4))]
    same = [torch.equal(a, b) for a, b in zip(flipped, torch.cat([x] * 4))]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)


def encoder_by_hand(weights, input_size):
    """REPA_ENCODER's patch tokens of [-1, 1] images as REPA computes them, written out apart from
    extract_features: the position embedding resampled to the input's grid by timm's function, the
    image to [0, 1], bicubic resize, ImageNet's mean and std, final-norm tokens after the 2 prefix tokens."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.layers import resample_abs_pos_embed

    state = torch.load(weights)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [input_size // 16] * 2, num_prefix_tokens=2)
    model = timm.create_model(REPA_ENCODER, num_classes=0, img_size=input_size).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head")})  # strict
    mean, std = (torch.tensor(c).view(1, 3, 1, 1) for c in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))

    def encode(x):
        with torch.no_grad():
            x = F.interpolate((x + 1) / 2, size=(input_size, input_size), mode="bicubic")
            return model.forward_features((x - mean) / std)[:, 2:]
    return encode


def assert_repa_features(store, weights, image_folder, image_size, input_size):
    """The store's features: the encoder by hand on each valid image and on its mirror; skipped rows zero."""
    root, skipped = image_folder
    _, files, all_files = valid_files(root, skipped)
    meta = json.load(open(os.path.join(store, "meta.json")))
    features = np.concatenate([np.load(os.path.join(store, latents.repa_name(k))) for k in range(len(meta["shards"]))])
    tokens = (input_size // 16) ** 2
    assert features.shape == (12, 2, tokens, 192) and features.dtype == np.float16
    encode = encoder_by_hand(weights, input_size)
    x = torch.stack([preprocess(os.path.join(root, f), image_size) for f, _ in files])
    want = torch.stack([encode(x), encode(x.flip(-1))], 1).numpy()  # (10, 2 views, T, 192)
    got = features[[all_files.index(f) for f in files]].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)  # float16 storage
    assert not np.allclose(got[:, 0], got[:, 1], atol=1e-2)  # the mirror is really encoded
    assert not features[meta["skipped_indices"]].any()
    return meta


def test_repa_features_of_a_vae_store_are_the_encoders_patch_tokens_of_both_views(repa_store, latent_store,
                                                                                  repa_weights, image_folder,
                                                                                  one_thread):
    meta = assert_repa_features(repa_store, repa_weights, image_folder, image_size=16, input_size=32)
    sha256 = hashlib.sha256(open(repa_weights, "rb").read()).hexdigest()
    assert meta["repa"] == {"encoder": REPA_ENCODER, "weights": f"sha256:{sha256}", "input_size": 32, "grid": [2, 2],
                            "dim": 192, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                            "dtype": "float16", "bytes_per_image": 2 * 4 * 192 * 2}
    for name in ["labels.npy"] + [f"shard-0000{k}.npy" for k in range(3)]:  # the latents are those of a store without
        assert filecmp.cmp(os.path.join(latent_store, name), os.path.join(repa_store, name), shallow=False), name


def test_repa_features_follow_the_view_of_x_and_leave_x_as_it_was(repa_store):
    """An encoded mirror (VAE store): z is the features of x's view, and x is what a dataset without them
    reads, posterior noise included, so a seeded run without REPA stays bit-identical."""
    features = np.concatenate([np.load(os.path.join(repa_store, latents.repa_name(k))) for k in range(3)])
    means = latents.LatentDataset(repa_store, seed=3, sample_posterior=False)
    index = list(range(len(means))) * 4
    x, y, z = latents.LatentDataset(repa_store, seed=3, sample_posterior=False, repa=True).read_batch(index)
    x0, y0 = means.read_batch(index)
    assert torch.equal(x, x0) and torch.equal(y, y0) and z.dtype == torch.float32 and z.shape == (40, 4, 192)
    original, _ = latents.LatentDataset(repa_store, flip=False, sample_posterior=False).read_batch(index)
    views = [0 if torch.equal(a, b) else 1 for a, b in zip(x, original)]
    assert 0 < sum(views) < 40
    assert torch.equal(z, torch.from_numpy(features[means.rows[index], views]).float())
    noisy = latents.LatentDataset(repa_store, seed=3, repa=True)
    assert torch.equal(noisy.read_batch(index)[0], latents.LatentDataset(repa_store, seed=3).read_batch(index)[0])
    (_, _, loaded), = DataLoader(noisy, batch_size=40)  # the default collate: one batch of 10 (x, y, z)
    item = noisy[7]
    assert len(item) == 3 and torch.equal(item[2], loaded[7]) and torch.equal(loaded, noisy.read_batch(range(10))[2])


def test_repa_features_of_a_pixel_store_at_repas_input_size(tmp_path, image_folder, repa_weights, one_thread):
    """--vae none stores the features of both views too, at REPA's default input size (32 px images:
    32 * 224 / 256 = 28, to the patch's multiple 32), and z follows x's exact mirror."""
    store = str(tmp_path / "px")
    meta = extract_features.main(extract_args(data_path=image_folder[0], features_path=store, vae="none",
                                              image_size=32, repa_encoder=REPA_ENCODER,
                                              repa_encoder_weights=repa_weights))
    assert meta["repa"]["input_size"] == 32 and meta["repa"]["grid"] == [2, 2] and meta["flip"] == latents.FLIP_EXACT
    assert_repa_features(store, repa_weights, image_folder, image_size=32, input_size=32)
    features = np.concatenate([np.load(os.path.join(store, latents.repa_name(k))) for k in range(3)])
    ds = latents.LatentDataset(store, seed=5, repa=True)
    plain, _ = latents.LatentDataset(store, flip=False).read_batch(range(10))
    x, _, z = ds.read_batch(list(range(10)) * 4)
    views = [0 if torch.equal(a, b) else 1 for a, b in zip(x, torch.cat([plain] * 4))]
    assert all(v == 0 or torch.equal(a, b.flip(-1)) for v, a, b in zip(views, x, torch.cat([plain] * 4)))
    assert 0 < sum(views) < 40
    assert torch.equal(z, torch.from_numpy(features[np.tile(ds.rows, 4), views]).float())


def test_damaged_repa_features_are_refused_then_written_again(tmp_path, repa_store, repa_weights, tiny_vae_path,
                                                              image_folder, capsys, one_thread):
    store = str(tmp_path / "store")
    shutil.copytree(repa_store, store)
    truncated = os.path.join(store, "repa-00001.npy")
    os.truncate(truncated, os.path.getsize(truncated) - 1)
    np.save(os.path.join(store, "repa-00002.npy"), np.zeros((4, 2, 4, 96), np.float16))
    with pytest.raises(latents.StoreError, match="repa-00001.npy is truncated"):
        latents.LatentDataset(store)
    extract_features.main(extract_args(data_path=image_folder[0], features_path=store, vae=tiny_vae_path,
                                       repa_encoder=REPA_ENCODER, repa_encoder_weights=repa_weights,
                                       repa_input_size=32))
    out = capsys.readouterr().out
    assert "repa-00001.npy is truncated" in out and "has 8 left" in out
    assert "repa-00002.npy holds float16 (4, 2, 4, 96) where the store needs float16 (4, 2, 4, 192)" in out
    assert_same_store(repa_store, store)
    with pytest.raises(latents.StoreError, match="repa: store has {'encoder'"):  # another encoder (none) is refused
        extract_features.main(extract_args(data_path=image_folder[0], features_path=store, vae=tiny_vae_path))


@pytest.mark.parametrize("case, why", [
    ("vit_no_such_model", "--repa-encoder vit_no_such_model is not a timm model name"),
    ("resnet18", "--repa-encoder resnet18 is not a ViT-like timm encoder with a patch grid"),
    ("resnet18 at 32 px", "--repa-encoder resnet18 is not a ViT-like timm encoder with a patch grid"),
    ("input size", f"--repa-input-size 24 is not a multiple of {REPA_ENCODER}'s patch 16x16"),
    ("a key missing", f"--repa-encoder-weights .*missing.pt does not fit {REPA_ENCODER} \\(Error\\(s\\) in "
                      r"loading state_dict .* Missing key\(s\) in state_dict: \"blocks.3.mlp.fc1.weight\""),
    ("not weights", "--repa-encoder-weights .*notes.txt is not a state_dict file"),
    ("hub offline", f"--repa-encoder {REPA_ENCODER}: cannot get its weights from timm's hub .*; on a machine "
                    f"without the hub, give them as a file: --repa-encoder-weights PATH$"),
])
def test_repa_encoder_errors_are_one_line(tmp_path, image_folder, repa_weights, monkeypatch, one_thread, case,
                                         why):
    """Each refused before the store's folder exists."""
    import huggingface_hub

    flags = dict(repa_encoder=REPA_ENCODER, repa_encoder_weights=repa_weights)
    if case in ("vit_no_such_model", "resnet18"):
        flags["repa_encoder"] = case
    elif case == "resnet18 at 32 px":  # built with its weights at that size, no meta model to look at first
        flags.update(repa_encoder="resnet18", repa_input_size=32)
    elif case == "input size":
        flags["repa_input_size"] = 24
    elif case == "a key missing":  # timm alone would load this non-strictly, leaving that layer random
        flags["repa_encoder_weights"] = str(tmp_path / "missing.pt")
        state = torch.load(repa_weights)
        del state["blocks.3.mlp.fc1.weight"]
        torch.save(state, flags["repa_encoder_weights"])
    elif case == "not weights":
        flags["repa_encoder_weights"] = os.path.join(image_folder[0], "cat", "notes.txt")
    else:  # no network and an empty cache, as huggingface_hub reads them when it downloads
        del flags["repa_encoder_weights"]
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    with pytest.raises(latents.StoreError, match=why) as error:
        extract_features.main(extract_args(data_path=image_folder[0], features_path=str(store), vae="none",
                                           image_size=8, **flags))
    assert "\n" not in str(error.value) and not store.exists()


@pytest.mark.parametrize("argv, why", [
    (["--fast-dit-path", "f", "--repa-encoder", REPA_ENCODER], "--repa-encoder needs the images (--data-path)"),
    (["--data-path", "d", "--repa-input-size", "32"],
     "--repa-encoder-weights and --repa-input-size need --repa-encoder"),
    (["--data-path", "d", "--repa-encoder", REPA_ENCODER, "--repa-input-size", "0"], "must be positive"),
])
def test_repa_flags_that_do_not_go_together_are_refused_by_the_parser(argv, why, capsys):
    with pytest.raises(SystemExit):
        extract_features.parse_args(argv + ["--features-path", "s"])
    assert why in capsys.readouterr().err


def run_extract(store, root, vae, nproc=None, prefix=(), flags=(), timeout=240):
    """extract_features.py as a subprocess, one thread per process so that 1 and N processes do
    bit-identical float math (torchrun sets OMP_NUM_THREADS=1 itself); `flags` added to the tests' sizes."""
    launch = [sys.executable] + ([] if nproc is None else
                                 ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"])
    cmd = launch + list(prefix) + ["extract_features.py", "--data-path", root, "--features-path", store,
                                   "--image-size", "16", "--vae", vae, "--batch-size", "3",
                                   "--shard-size", "4", "--num-workers", "0", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_store(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


# Dies like `kill -9` right after the second batch of shard 0 (row 3) is flushed to disk but before
# its progress marker is written: the worst moment, since the rerun must redo that batch.
KILL_BEFORE_SECOND_MARKER = """
import os, signal, sys
import latents
write = latents.write_json_atomic
def dying(path, obj):
    if path.endswith("shard-00000.json") and obj.get("done") == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, obj)
latents.write_json_atomic = dying
sys.argv = sys.argv[1:]
exec(compile(open("extract_features.py").read(), "extract_features.py", "exec"))
"""


class Stop(Exception):
    """Ends an in-process extraction at a chosen point, leaving an unfinished store."""


# Under torchrun: extract_features.py's main for the arguments before "--then", then for those after it, in
# the same processes (two stores for one start of the processes).
TWO_STORES = """
import os, sys
sys.path.insert(0, os.getcwd())
import extract_features
argv = sys.argv[2:]
for part in (argv[:argv.index("--then")], argv[argv.index("--then") + 1:]):
    extract_features.main(extract_features.parse_args(part)[1])
"""


def test_killed_run_resumed_by_two_processes_writes_the_same_store(tmp_path, repa_store, tiny_vae_path,
                                                                  image_folder, repa_weights, video_store,
                                                                  video_folder, monkeypatch, one_thread):
    """Killed at the worst moment, then the same command under torchrun with 2 processes: byte for
    byte the store one uninterrupted process writes (repa_store: latents and REPA features, whose
    latents are latent_store's). A resume and the number of processes both leave the store as it is
    (one test: each needs processes of its own). The same processes then continue a video store
    stopped in its second shard (shard 0 finished, shard 1 half done): byte for byte video_store."""
    path = str(tmp_path / "store")
    video = str(tmp_path / "video")
    stop_at_the_third_batch(extract_args(data_path=video_folder[0], features_path=video, vae=tiny_vae_path,
                                         **VIDEO_FLAGS), monkeypatch)
    assert json.load(open(os.path.join(video, "shard-00001.json")))["done"] == 2
    repa = ["--repa-encoder", REPA_ENCODER, "--repa-encoder-weights", repa_weights, "--repa-input-size", "32"]
    r = run_extract(path, image_folder[0], tiny_vae_path, prefix=["-c", KILL_BEFORE_SECOND_MARKER], flags=repa)
    assert r.returncode == -9, r.stderr
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["complete"] is False
    progress = json.load(open(os.path.join(path, "shard-00000.json")))
    assert progress["done"] == 3 and "stats" not in progress
    with pytest.raises(ValueError, match="unfinished"):
        latents.LatentDataset(path)
    script = tmp_path / "two_stores.py"
    script.write_text(TWO_STORES)
    video_flags = ["--data-path", video_folder[0], "--features-path", video, "--vae", tiny_vae_path,
                   "--num-workers", "0"] + [a for k, v in VIDEO_FLAGS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    r = run_extract(path, image_folder[0], tiny_vae_path, nproc=2, prefix=[str(script)],
                    flags=repa + ["--then"] + video_flags)
    assert r.returncode == 0, r.stderr
    # Rank 0 redoes row 3 of shard 0 and encodes shard 2, rank 1 shard 1; logs on rank 0 only. In the video
    # store rank 0 has shard 2's 2 clips to encode, rank 1 the last clip of shard 1.
    assert "over 2 processes; rank 0 has 5 left" in r.stdout and r.stdout.count("done:") == 2
    assert "3 shards over 2 processes; rank 0 has 2 left" in r.stdout
    assert_same_store(repa_store, path)
    assert_same_store(video_store, video)


def stop_at_the_third_batch(args, monkeypatch):
    """Run extract_features.main(args) in this process and stop it (raise Stop) as its third batch is encoded."""
    calls, encode = [], extract_features.Encoder.__call__

    def third_call_stops(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise Stop
        return encode(self, x)
    with monkeypatch.context() as m:
        m.setattr(extract_features.Encoder, "__call__", third_call_stops)
        with pytest.raises(Stop):
            extract_features.main(args)


def stopped_store(tmp_path, image_folder, monkeypatch):
    """A pixel store stopped at its second shard's first batch (shard 0 finished, shards 1 and 2 not
    begun): (its folder, the arguments that continue it)."""
    store = tmp_path / "store"
    args = extract_args(data_path=image_folder[0], features_path=str(store), vae="none", image_size=8)
    stop_at_the_third_batch(args, monkeypatch)
    return store, args


@pytest.mark.parametrize("name, outside, why", [
    ("shard-00001.npy", "a copy of the shard", "is a symbolic link: refusing to write a shard"),
    ("shard-00001.npy", "another file", "is a symbolic link: refusing to write a shard"),
    ("shard-00001.npy", "a hard link", "has other hard links: refusing to write a shard"),
    ("shard-00001.npy", "a folder", "is a folder: refusing to write a shard there"),
    (".lock", "another file", "is a symbolic link: refusing to write the lock"),
])
def test_a_link_or_folder_in_an_unfinished_store_is_refused_not_written_through(tmp_path, image_folder,
                                                                                monkeypatch, name, outside, why):
    store, args = stopped_store(tmp_path, image_folder, monkeypatch)
    target = tmp_path / "outside"
    if outside == "a folder":  # no link, but a traceback before
        os.remove(store / name)
        os.mkdir(store / name)
        target.write_bytes(b"")
    elif outside == "a hard link":
        os.link(store / name, target)
    else:
        shutil.copy(store / name, target) if outside == "a copy of the shard" else target.write_bytes(b"precious")
        os.remove(store / name)
        os.symlink(target, store / name)
    before = target.read_bytes()
    with pytest.raises(latents.StoreError, match=f"{store / name} {why}"):
        extract_features.main(args)
    assert target.read_bytes() == before


def test_meta_and_labels_links_are_replaced_not_written_through(tmp_path, image_folder, monkeypatch):
    store, args = stopped_store(tmp_path, image_folder, monkeypatch)
    for name in ("meta.json", "labels.npy"):
        shutil.move(store / name, tmp_path / name)
        os.symlink(tmp_path / name, store / name)
    before = {name: (tmp_path / name).read_bytes() for name in ("meta.json", "labels.npy")}
    assert extract_features.main(args)["complete"]
    for name in before:
        assert (tmp_path / name).read_bytes() == before[name] and not os.path.islink(store / name)


@pytest.mark.parametrize("progress", ['{"rows": 4, "do', '{"rows": 4, "done": "3", "skipped": []}'])
def test_a_damaged_progress_file_starts_its_shard_again(tmp_path, image_folder, monkeypatch, capsys, progress):
    store, args = stopped_store(tmp_path, image_folder, monkeypatch)
    (store / "shard-00000.json").write_text(progress)
    capsys.readouterr()
    assert extract_features.main(args)["count"] == 10
    assert "has 12 left" in capsys.readouterr().out


def test_shard_names_come_from_the_layout_never_from_meta(tmp_path, latent_store, tiny_vae_path, image_folder):
    """A meta.json naming a shard outside the store is refused by the reader (train.py) and the writer,
    which used to read the outside file and call the store complete though its own shard was gone."""
    store = tmp_path / "store"
    shutil.copytree(latent_store, store)
    (tmp_path / "outside").mkdir()
    shutil.move(store / "shard-00001.npy", tmp_path / "outside" / "secret.npy")
    meta = json.loads((store / "meta.json").read_text())
    meta["shards"][1]["file"] = "../outside/secret.npy"
    (store / "meta.json").write_text(json.dumps(meta))
    why = "meta.json is damaged: its shard list is not the layout of 12 rows in shards of 4"
    with pytest.raises(latents.StoreError, match=why):
        latents.LatentDataset(str(store))
    with pytest.raises(latents.StoreError, match=why):
        extract_features.main(extract_args(data_path=image_folder[0], features_path=str(store), vae=tiny_vae_path))


def test_a_store_missing_a_shard_is_never_called_complete(tmp_path, image_folder, monkeypatch):
    """A shard removed while the run writes the others: the run fails instead of finishing the store."""
    store = tmp_path / "store"
    encode = extract_features.Encoder.__call__

    def remove_shard_0_then_encode(self, x):
        if (store / "shard-00000.json").exists() and "stats" in json.loads((store / "shard-00000.json").read_text()):
            with contextlib.suppress(FileNotFoundError):
                os.remove(store / "shard-00000.npy")
        return encode(self, x)
    monkeypatch.setattr(extract_features.Encoder, "__call__", remove_shard_0_then_encode)
    args = extract_args(data_path=image_folder[0], features_path=str(store), vae="none", image_size=8)
    with pytest.raises(latents.StoreError, match="shard-00000.npy is missing after this run wrote it"):
        extract_features.main(args)
    assert json.loads((store / "meta.json").read_text())["complete"] is False
    monkeypatch.setattr(extract_features.Encoder, "__call__", encode)
    assert extract_features.main(args)["count"] == 10  # the rerun encodes it again


def test_vae_helpers(tmp_path, monkeypatch, tiny_vae_path):
    import vae as vae_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: must fail at once with a clear message
    with pytest.raises(vae_module.VAEError, match="nobody/no-such-vae"):
        vae_module.load_vae("nobody/no-such-vae")
    with pytest.raises(vae_module.VAEError, match="no config.json"):
        vae_module.load_vae(str(tmp_path))
    assert vae_module.load_vae("none") is None and vae_module.scaling_factor(None) == 1.0
    z = torch.linspace(-2, 2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    assert torch.equal(vae_module.decode(None, z, 1.0), z.clamp(-1, 1))
    vae = load_vae(tiny_vae_path)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae_module.downsampling_factor(None) == 1
    with torch.no_grad():  # the factor is what the encoder really does to a 16x16 image
        assert vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape[-2:] == \
            (16 // vae_module.downsampling_factor(vae),) * 2
    latent = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(latent).sample.clamp(-1, 1)
    got = vae_module.decode(vae, latent * 0.18215, vae_module.scaling_factor(vae))
    assert got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_center_crop_matches_adm():
    """Box-halving while the short side is >= 2x, bicubic to the size, center crop: checked against
    the same steps done by hand on an image that needs all three."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (70, 150, 3), dtype=np.uint8))
    out = center_crop_arr(img, 16)
    half = img.resize((75, 35), Image.BOX).resize((37, 17), Image.BOX)  # 70 >= 32, then 35 >= 32
    scaled = half.resize((round(37 * 16 / 17), 16), Image.BICUBIC)
    want = np.asarray(scaled)[:, (scaled.size[0] - 16) // 2:][:, :16]
    assert out.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(out), want)


# Videos ------------------------------------------------------------------------------------------------

def decoded(root, name):
    """A video's frames [F x H x W x 3] uint8 as PyAV decodes the file (or its frame images), apart from
    extract_features."""
    import av

    path = os.path.join(root, name)
    if os.path.isdir(path):
        return np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("RGB")) for f in sorted(os.listdir(path))])
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def stored_clips(root, clips, size):
    """The clips meta["clips"] names, [n x F x size x size x 3] uint8: every 2nd frame of 3 from the start,
    each center-cropped as DiT crops images."""
    return np.stack([np.stack([np.asarray(center_crop_arr(Image.fromarray(frame), size))
                               for frame in decoded(root, name)[start:start + 5:2]]) for name, start in clips])


def test_video_store_holds_every_frames_posterior_of_the_clip_and_the_mirrored_clip(video_store, video_folder,
                                                                                   tiny_vae_path):
    root, skipped = video_folder
    meta, rows = store_rows(video_store)
    assert meta["frames"] == 3 and meta["frame_stride"] == 2 and meta["clips_per_video"] is None
    assert meta["latent_shape"] == [4, 3, 4, 4] and rows.shape == (8, 2, 2, 4, 3, 4, 4)
    # Non-overlapping clips spread over each video; one row for each video that gives none, skipped.
    assert meta["clips"] == [["jump/a.mp4", 0], ["jump/a.mp4", 7], ["jump/b.avi", 1], ["jump/broken.mp4", None],
                             ["jump/short.mkv", None], ["run/c.mp4", 2], ["run/d", 0], ["run/d", 5]]
    assert meta["skipped"] == skipped and meta["skipped_indices"] == [3, 4] and meta["count"] == 6
    assert np.load(os.path.join(video_store, "labels.npy")).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert meta["bytes_per_image"] == 4 * 3 * 4 * 4 * 2 * 2 * 2  # a clip
    errors = [s["error"] for k in range(3) for s in json.load(open(os.path.join(video_store, f"shard-0000{k}.json")))["skipped"]]
    assert errors[0].startswith("InvalidDataError") and errors[1] == ("4 frames, too short for a clip of 3 frames every "
                                                                      "2: it needs 5 = (frames - 1) x stride + 1")
    valid = [c for c in meta["clips"] if c[1] is not None]
    frames = stored_clips(root, valid, 8)                                      # (6, 3, 8, 8, 3)
    x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(0, 1, 4, 2, 3).reshape(-1, 3, 8, 8)
    vae = load_vae(tiny_vae_path)
    with torch.no_grad():
        post, post_m = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
    per_clip = lambda t: t.reshape(6, 3, 4, 4, 4).transpose(1, 2)  # noqa: E731  (6, C, F, h, w)
    want = torch.stack([torch.stack([per_clip(post.mean), per_clip(post.std)], 1),
                        torch.stack([per_clip(post_m.mean), per_clip(post_m.std)], 1)], 1).numpy()
    got = rows[[0, 1, 2, 5, 6, 7]].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)  # float16 storage
    assert not rows[[3, 4]].any()


def test_pixel_video_store_is_the_decoded_center_cropped_clips(tmp_path, video_folder, monkeypatch):
    """--vae none: the stored clips are PyAV's frames center-cropped, exactly; the flip mirrors whole clips;
    a video file is opened once to count its frames and once to decode all its clips."""
    import av

    root, _ = video_folder
    opened, open_video = [], av.open
    monkeypatch.setattr(av, "open", lambda path, *a, **k: opened.append(os.path.basename(path)) or open_video(path, *a, **k))
    store = str(tmp_path / "px")
    meta = extract_features.main(extract_args(data_path=root, features_path=store, vae="none", dtype="float32",
                                              **dict(VIDEO_FLAGS, image_size=12)))
    assert sorted(opened) == ["a.mp4", "a.mp4", "b.avi", "b.avi", "broken.mp4", "c.mp4", "c.mp4", "short.mkv"]
    assert meta["latent_shape"] == [3, 3, 12, 12] and meta["flip"] == latents.FLIP_EXACT and meta["views"] == 1
    ds = latents.LatentDataset(store, flip=False)
    x, y = ds.read_batch(range(len(ds)))
    assert x.shape == (6, 3, 3, 12, 12) and y.tolist() == [0, 0, 0, 1, 1, 1]
    got = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()  # (6, F, 12, 12, 3)
    np.testing.assert_array_equal(got, stored_clips(root, [c for c in meta["clips"] if c[1] is not None], 12))
    flipped = latents.LatentDataset(store, seed=1).read_batch(list(range(6)) * 4)[0]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, torch.cat([x] * 4))]
    assert all(m or torch.equal(a, b) for m, a, b in zip(mirrored, flipped, torch.cat([x] * 4))) and any(mirrored)


def test_clips_per_video_and_the_middle_clip():
    assert extract_features.clip_starts(186, 16, 3, None) == [0, 46, 93, 140]  # a UCF-101 video of 7.4 s
    assert extract_features.clip_starts(186, 16, 3, 2) == [0, 140]
    assert extract_features.clip_starts(186, 16, 3, 1) == [70]
    assert extract_features.clip_starts(45, 16, 3, None) == []
    assert extract_features.clip_starts(46, 16, 3, 5) == [0]


@pytest.mark.parametrize("change, why", [(dict(num_frames=2), "frames: store has 3, this run 2"),
                                         (dict(frame_stride=1), "frame_stride: store has 2, this run 1"),
                                         (dict(clips_per_video=1), "clips_per_video: store has None, this run 1")])
def test_video_store_with_other_frames_is_refused_and_a_finished_one_left_alone(video_store, video_folder,
                                                                                 tiny_vae_path, change, why, capsys):
    flags = dict(data_path=video_folder[0], features_path=video_store, vae=tiny_vae_path, **VIDEO_FLAGS)
    before = open(os.path.join(video_store, "meta.json")).read()
    with pytest.raises(extract_features.StoreError, match=why):
        extract_features.main(extract_args(**dict(flags, **change)))
    extract_features.main(extract_args(**flags))
    assert "is already complete (6 clips): nothing to do" in capsys.readouterr().out
    assert open(os.path.join(video_store, "meta.json")).read() == before


def test_video_input_errors(tmp_path, capsys):
    os.makedirs(tmp_path / "videos" / "jump")
    (tmp_path / "videos" / "jump" / "notes.txt").write_text("no video")
    with pytest.raises(extract_features.StoreError, match="no videos .*or folders of frames in its 1 class folders"):
        extract_features.main(extract_args(data_path=str(tmp_path / "videos"), features_path=str(tmp_path / "s"),
                                           vae="none", **VIDEO_FLAGS))
    assert not os.path.exists(tmp_path / "s")
    for argv, why in [(["--data-path", "d", "--frame-stride", "2"], "--frame-stride and --clips-per-video need --num-frames"),
                      (["--data-path", "d", "--num-frames", "4", "--repa-encoder", REPA_ENCODER],
                       "--repa-encoder is for images"),
                      (["--fast-dit-path", "f", "--num-frames", "4"], "--num-frames needs videos"),
                      (["--data-path", "d", "--num-frames", "4", "--clips-per-video", "0"], "must be positive")]:
        with pytest.raises(SystemExit):
            extract_features.parse_args(argv + ["--features-path", "s"])
        assert why in capsys.readouterr().err
    assert extract_features.parse_args(["--data-path", "d", "--features-path", "s", "--num-frames", "16"])[1].frame_stride == 3
