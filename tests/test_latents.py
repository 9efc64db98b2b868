"""latents.LatentDataset: DiT's sampling distribution, seeded reproducibility, DataLoader use as users
write it, damaged stores refused at open, and reading fast-DiT features through a converted store."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import extract_features
import latents
from conftest import extract_args

SF = 0.18215


def stored(path):
    """(mean, std) float32 [rows, V, C, H, W] straight from the shard files."""
    meta = json.load(open(os.path.join(path, "meta.json")))
    rows = np.concatenate([np.load(os.path.join(path, s["file"])) for s in meta["shards"]])
    return rows[:, :, 0].astype(np.float32), rows[:, :, 1].astype(np.float32)


def test_deterministic_views_are_scaled_means(latent_store):
    mean, _ = stored(latent_store)
    ds = latents.LatentDataset(latent_store, flip=False, sample_posterior=False)
    x, y = ds.read_batch(list(range(len(ds))))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 4, 8, 8)
    np.testing.assert_allclose(x.numpy(), SF * mean[ds.rows, 0], rtol=1e-6)
    xi, yi = ds[4]
    assert torch.equal(xi, x[4]) and yi.shape == () and yi == y[4]


def test_flip_picks_the_encoded_mirror(latent_store):
    mean, _ = stored(latent_store)
    ds = latents.LatentDataset(latent_store, flip=True, sample_posterior=False)
    torch.manual_seed(0)
    x, _ = ds.read_batch([2] * 64)
    orig, mirror = SF * mean[ds.rows[2], 0], SF * mean[ds.rows[2], 1]
    is_orig = [np.allclose(a, orig, rtol=1e-6) for a in x.numpy()]
    is_mirror = [np.allclose(a, mirror, rtol=1e-6) for a in x.numpy()]
    assert all(o != m for o, m in zip(is_orig, is_mirror))
    assert 16 < sum(is_mirror) < 48  # a fair coin, 64 throws


def test_posterior_samples_have_the_stored_mean_and_std(latent_store):
    mean, std = stored(latent_store)
    ds = latents.LatentDataset(latent_store, flip=False)
    torch.manual_seed(0)
    x, _ = ds.read_batch([5] * 4000)
    m, s = SF * mean[ds.rows[5], 0], SF * std[ds.rows[5], 0]
    assert s.min() > 0 and not np.allclose(s, s.flat[0])
    z = (x.numpy() - m) / s  # standard normal if x = sf * (mean + std * noise)
    assert np.abs(z.mean(0)).max() < 0.08 and np.abs(z.std(0) - 1).max() < 0.08


def test_seeded_draws_across_epochs_are_fair_flips_and_standard_normal_noise(latent_store):
    """train.py's seeded path: item 5 over 2000 epochs sees the mirror half the time, fresh noise each."""
    mean, std = stored(latent_store)
    flips = latents.LatentDataset(latent_store, seed=11, sample_posterior=False)
    noisy = latents.LatentDataset(latent_store, seed=11, flip=False)
    mirror, draws = [], []
    for epoch in range(2000):
        flips.set_epoch(epoch)
        noisy.set_epoch(epoch)
        mirror.append(np.allclose(flips[5][0].numpy(), SF * mean[flips.rows[5], 1], rtol=1e-6))
        draws.append(noisy[5][0].numpy())
    assert 900 < sum(mirror) < 1100  # a fair coin, 2000 throws (about 4.5 standard deviations)
    z = (np.stack(draws) - SF * mean[noisy.rows[5], 0]) / (SF * std[noisy.rows[5], 0])
    assert np.abs(z.mean(0)).max() < 0.15 and np.abs(z.std(0) - 1).max() < 0.15
    assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < 0.02  # no noise repeated across epochs


def test_seeded_items_do_not_depend_on_batching(latent_store):
    ds = latents.LatentDataset(latent_store, seed=7)
    batch, _ = ds.read_batch([3, 0, 9, 3])
    assert torch.equal(batch[0], batch[3])
    assert torch.equal(ds[9][0], batch[2]) and torch.equal(ds[0][0], batch[1])
    again = latents.LatentDataset(latent_store, seed=7)
    assert torch.equal(again.read_batch([9, 3])[0], batch[[2, 0]])
    again.set_epoch(1)
    assert not torch.equal(again[3][0], batch[0])
    assert not torch.equal(latents.LatentDataset(latent_store, seed=8)[3][0], batch[0])


def loaded(loader):
    """Every batch of a loader: list of (x [B x C x H x W], y [B])."""
    batches = list(loader)
    assert all(x.dtype == torch.float32 and x.dim() == 4 and y.dtype == torch.int64 and y.dim() == 1
               for x, y in batches)
    return batches


def test_plain_dataloader_with_the_default_collate(latent_store):
    """DataLoader(LatentDataset(path), batch_size=256, shuffle=True) as users write it: every item
    once per epoch, each exactly as ds[i]; unshuffled batches in order."""
    ds = latents.LatentDataset(latent_store, seed=1)
    every_x, every_y = ds.read_batch(range(len(ds)))
    (x, y), = loaded(DataLoader(ds, batch_size=256, shuffle=True))
    order = [next(i for i in range(len(ds)) if torch.equal(a, every_x[i])) for a in x]
    assert sorted(order) == list(range(len(ds))) and order != sorted(order)  # a permutation, shuffled
    assert y.tolist() == every_y[order].tolist()
    batches = loaded(DataLoader(ds, batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), every_x)
    assert torch.equal(torch.cat([y for _, y in batches]), every_y)


def test_dataloader_with_workers(latent_store):
    ds = latents.LatentDataset(latent_store, seed=1)
    ds[0]  # memory maps opened in this process are not pickled (as spawned workers would receive them)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._shards is None and torch.equal(copy[3][0], ds[3][0])
    batches = loaded(DataLoader(ds, batch_size=4, num_workers=2))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), ds.read_batch(range(10))[0])
    assert torch.cat([y for _, y in batches]).tolist() == ds.labels.tolist()


def test_unfinished_or_foreign_folders_are_refused(tmp_path, latent_store):
    with pytest.raises(FileNotFoundError, match="not a latent store"):
        latents.LatentDataset(str(tmp_path))
    meta = json.load(open(os.path.join(latent_store, "meta.json")))
    part = tmp_path / "part"
    part.mkdir()
    (part / "meta.json").write_text(json.dumps(dict(meta, complete=False)))
    with pytest.raises(latents.StoreError, match="unfinished"):
        latents.LatentDataset(str(part))


def test_repa_on_a_store_without_encoder_features_names_the_flag_that_makes_them(latent_store):
    with pytest.raises(latents.StoreError, match="holds no encoder features for REPA: extract the images again into "
                                                 "a new store with extract_features.py --repa-encoder NAME"):
        latents.LatentDataset(latent_store, repa=True)


def test_a_store_older_than_repa_and_video_reads_as_an_image_store_without_features(tmp_path, latent_store,
                                                                                    tiny_vae_path, image_folder,
                                                                                    capsys):
    """A meta.json written before the "repa" and video settings existed: read as None, and left as it is by
    a rerun."""
    store = tmp_path / "store"
    shutil.copytree(latent_store, store)
    meta = json.loads((store / "meta.json").read_text())
    for key in ("repa", "frames", "frame_stride", "clips_per_video"):
        del meta[key]
    (store / "meta.json").write_text(json.dumps(meta))
    ds = latents.LatentDataset(str(store), seed=2)
    assert ds.meta["repa"] is ds.meta["frames"] is None and torch.equal(ds[4][0], latents.LatentDataset(latent_store, seed=2)[4][0])
    before = (store / "meta.json").read_text()
    extract_features.main(extract_args(data_path=image_folder[0], features_path=str(store), vae=tiny_vae_path))
    assert "nothing to do" in capsys.readouterr().out and (store / "meta.json").read_text() == before


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "other shape", "labels", "meta",
                                    "meta without a key", "meta not an object", "meta value", "shard named outside",
                                    "label out of range", "meta repa value", "meta frames of an image store",
                                    "meta clips"])
def test_damaged_store_is_refused_at_open_naming_the_file(tmp_path, latent_store, damage):
    """Found when the dataset is made (train.py: before a run folder exists), not by a read error or a
    SIGBUS in a DataLoader worker later."""
    store = tmp_path / "store"
    shutil.copytree(latent_store, store)
    shard = store / "shard-00002.npy"
    if damage == "truncated shard":
        size = os.path.getsize(shard)
        os.truncate(shard, size - 1)
        want = f"shard-00002.npy is truncated: {size - 1:,} of {size:,} bytes: the store is damaged; rerun"
    elif damage == "missing shard":
        os.remove(shard)
        want = r"shard-00002.npy is missing"
    elif damage == "other shape":
        np.save(shard, np.zeros((2, 2, 2, 4, 8, 4), np.float16))
        want = r"shard-00002.npy holds float16 \(2, 2, 2, 4, 8, 4\) where the store needs float16 \(4, 2, 2, 4, 8, 8\)"
    elif damage == "labels":
        os.truncate(store / "labels.npy", 100)
        want = r"labels.npy is damaged"
    elif damage == "meta":
        (store / "meta.json").write_text('{"complete": tr')
        want = r"meta.json is damaged \(not JSON"
    elif damage == "label out of range":
        labels = np.load(store / "labels.npy")
        labels[3] = 3  # classes 0, 1, 2
        np.save(store / "labels.npy", labels)
        want = r"labels.npy holds int64 \(12,\), the store needs int64 \(12,\) in \[0, 3\)"
    elif damage == "meta not an object":
        (store / "meta.json").write_text('["complete"]')
        want = r"meta.json is damaged \(a JSON list, not an object\)"
    else:  # a crafted meta.json: the reader must not trust it for names or fields
        meta = json.loads((store / "meta.json").read_text())
        if damage == "meta without a key":
            del meta["views"]
            want = r"meta.json is damaged: no views; delete the store and run"
        elif damage == "meta value":
            meta["dtype"] = "float8"
            want = r"meta.json is damaged: dtype='float8'"
        elif damage == "meta frames of an image store":  # the reader would take [C, H, W] rows for clips
            meta.update(frames=8, frame_stride=1, clips=[["v.mp4", 0]] * 12)
            want = r"meta.json is damaged: latent_shape=\[4, 8, 8\] with frames=8, frame_stride=1 and 12 clips for 12 rows"
        elif damage == "meta clips":
            meta.update(frames=8, frame_stride=1, latent_shape=[4, 8, 8, 8], clips=[["v.mp4", 0]] * 11)
            want = r"meta.json is damaged: latent_shape=\[4, 8, 8, 8\] with frames=8, frame_stride=1 and 11 clips"
        elif damage == "meta repa value":  # the reader builds the features' shape from it
            meta["repa"] = latents.repa_settings("vit", "timm hub", 32, [2, 2], 192, [0.5] * 3, [0.5] * 3)
            meta["repa"]["grid"] = [2, -2]
            want = r"meta.json is damaged: repa=\{'encoder': 'vit'"
        else:
            shutil.move(shard, tmp_path / "secret.npy")
            meta["shards"][2]["file"] = "../secret.npy"
            want = r"meta.json is damaged: its shard list is not the layout of 12 rows in shards of 4"
        (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(latents.StoreError, match=want):
        latents.LatentDataset(str(store))


def write_fast_dit(path, n=12, shape=(4, 8, 8)):
    """Feature folders laid out as fast-DiT's extract_features.py writes them: one file per image,
    named by step, [1, C, H, W] latents already scaled by 0.18215, [1] labels."""
    rng = np.random.default_rng(0)
    feats, labels = path / "imagenet16_features", path / "imagenet16_labels"
    feats.mkdir(parents=True)
    labels.mkdir()
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, 5, n)
    for i in range(n):
        # A few files without the batch dimension, which readers of such folders also meet.
        np.save(feats / f"{i}.npy", x[i] if i % 5 == 0 else x[i][None])
        np.save(labels / f"{i}.npy", np.array([y[i]]))
    return x, y


def test_fast_dit_features_convert_to_a_store(tmp_path):
    x, y = write_fast_dit(tmp_path / "fast")
    with pytest.raises(FileNotFoundError, match="--fast-dit-path"):
        latents.LatentDataset(str(tmp_path / "fast"))
    store = str(tmp_path / "store")
    meta = extract_features.main(extract_args(fast_dit_path=str(tmp_path / "fast"), features_path=store,
                                              vae="ema"))
    assert meta["count"] == 12 and meta["flip"] == latents.FLIP_NONE and meta["vae"] == "ema"
    assert meta["scaling_factor"] == SF and meta["latent_shape"] == [4, 8, 8]
    with pytest.warns(UserWarning, match="no mirror"):
        ds = latents.LatentDataset(store)
    got, labels = ds.read_batch(list(range(12)))  # files 0..11 in numeric order, 10 after 9
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-3, atol=1e-3)  # float16 storage
    assert labels.tolist() == y.tolist() and meta["num_classes"] == int(y.max()) + 1


@pytest.mark.parametrize("label", [np.array([{"class": 3}], dtype=object), np.array([2.5]), np.array([1, 2])])
def test_fast_dit_label_file_that_is_not_one_class_index_is_a_clear_error(tmp_path, label):
    write_fast_dit(tmp_path / "fast")
    bad = tmp_path / "fast" / "imagenet16_labels" / "7.npy"
    np.save(bad, label, allow_pickle=True)
    with pytest.raises(extract_features.StoreError, match=f"{bad} (is not a label file|holds)"):
        extract_features.main(extract_args(fast_dit_path=str(tmp_path / "fast"), features_path=str(tmp_path / "s")))
    assert not os.path.exists(tmp_path / "s")


def test_video_store_items_are_clips_of_the_stored_view_with_noise_drawn_per_clip(video_store):
    """x [C, F, h, w]: the scaled posterior mean of the clip (view 0) or of the mirrored clip (view 1), and a
    posterior sample mean + std * noise of the whole clip, seeded per clip as for images."""
    mean, std = stored(video_store)  # (8, 2 views, C, F, h, w)
    plain = latents.LatentDataset(video_store, flip=False, sample_posterior=False)
    x, y = plain.read_batch(range(len(plain)))
    assert x.shape == (6, 4, 3, 4, 4) and y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(x.numpy(), SF * mean[plain.rows, 0], rtol=1e-6)
    torch.manual_seed(0)
    flipped = latents.LatentDataset(video_store, sample_posterior=False).read_batch([2] * 32)[0].numpy()
    mirror = [np.allclose(a, SF * mean[plain.rows[2], 1], rtol=1e-6) for a in flipped]
    assert all(m or np.allclose(a, x[2].numpy(), rtol=1e-6) for m, a in zip(mirror, flipped)) and 4 < sum(mirror) < 28
    noisy = latents.LatentDataset(video_store, seed=3, flip=False)
    draws = np.stack([noisy.read_batch([4])[0][0].numpy() for noisy.epoch in range(400)])
    z = (draws - SF * mean[noisy.rows[4], 0]) / (SF * std[noisy.rows[4], 0])
    assert np.abs(z.mean(0)).max() < 0.25 and np.abs(z.std(0) - 1).max() < 0.25
    assert np.abs(np.corrcoef(z[:, :, 0].reshape(400, -1), z[:, :, 2].reshape(400, -1), rowvar=False)
                  [:48, 48:]).max() < 0.3  # frames get noise of their own
