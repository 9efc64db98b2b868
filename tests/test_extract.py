"""extract_features.py: what it stores, under one and two processes, after a kill, on bad input."""
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import extract_features
import latents
from conftest import extract_args
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
    assert len(meta["skipped_indices"]) == 2
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
    args = extract_args(data_path=image_folder[0], features_path=latent_store, vae=tiny_vae_path)
    vars(args).update(change)
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
    cli = subprocess.run([sys.executable, "extract_features.py", "--data-path", str(tmp_path / "empty"),
                          "--features-path", str(tmp_path / "s"), "--vae", "none"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "error: --data-path" in cli.stderr and "Traceback" not in cli.stderr


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


def run_extract(store, root, vae, nproc=None, prefix=(), timeout=240):
    """extract_features.py as a subprocess, one thread per process so that 1 and N processes do
    bit-identical float math (torchrun sets OMP_NUM_THREADS=1 itself)."""
    launch = [sys.executable] + ([] if nproc is None else
                                 ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"])
    cmd = launch + list(prefix) + ["extract_features.py", "--data-path", root, "--features-path", store,
                                   "--image-size", "16", "--vae", vae, "--batch-size", "3",
                                   "--shard-size", "4", "--num-workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_store(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, tiny_vae_path, image_folder):
    path = str(tmp_path_factory.mktemp("ref") / "store")
    r = run_extract(path, image_folder[0], tiny_vae_path)
    assert r.returncode == 0, r.stderr
    return path


def test_two_processes_write_the_same_store(tmp_path, reference_store, tiny_vae_path, image_folder):
    path = str(tmp_path / "store")
    r = run_extract(path, image_folder[0], tiny_vae_path, nproc=2)
    assert r.returncode == 0, r.stderr
    assert "over 2 processes" in r.stdout and r.stdout.count("done:") == 1  # logs on rank 0 only
    assert_same_store(reference_store, path)


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


def test_killed_run_resumes_to_the_same_store(tmp_path, reference_store, tiny_vae_path, image_folder):
    path = str(tmp_path / "store")
    r = run_extract(path, image_folder[0], tiny_vae_path, prefix=["-c", KILL_BEFORE_SECOND_MARKER])
    assert r.returncode == -9, r.stderr
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["complete"] is False
    progress = json.load(open(os.path.join(path, "shard-00000.json")))
    assert progress["done"] == 3 and "stats" not in progress
    with pytest.raises(ValueError, match="unfinished"):
        latents.LatentDataset(path)
    r = run_extract(path, image_folder[0], tiny_vae_path)
    assert r.returncode == 0, r.stderr
    assert "has 9 left" in r.stdout
    assert_same_store(reference_store, path)


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
