"""checkpoints.py: reading every accepted format, the verified download, strict model building, and
train.py's atomic save with pruning."""
import argparse
import io
import json
import os
import zlib

import pytest
import torch

import checkpoints
from checkpoints import CheckpointError, DownloadError
from conftest import GOLDEN_DIR, small_state_dict, train_checkpoint

RELEASED = "DiT-XL-2-256x256.pt"


def released_like(size):
    """A file with the exact keys and shapes of the released DiT-XL/2 checkpoint (from the golden key
    manifest); each tensor is one value broadcast, so the 2.7 GB model is a few KB on disk."""
    shapes = json.loads((GOLDEN_DIR / f"DiT-XL-2-{size}x{size}.keys.json").read_text())
    state = {k: torch.full((), zlib.crc32(k.encode()) % 97 / 97.0).expand(shape) for k, shape in shapes.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_released_keys_are_the_manifests():
    for size in (256, 512):
        manifest = json.loads((GOLDEN_DIR / f"DiT-XL-2-{size}x{size}.keys.json").read_text())
        assert checkpoints.released_shapes(f"DiT-XL-2-{size}x{size}.pt") == {k: tuple(v) for k, v in manifest.items()}


def serve(server, data):
    """Routes for the released name: `good` the file, `cut` half of it under the full Content-Length,
    `html` an error page as a 200, `empty` a 200 with no body."""
    server.routes.update({f"good/{RELEASED}": (data, "application/octet-stream", None),
                          f"cut/{RELEASED}": (data[: len(data) // 2], "application/octet-stream", len(data)),
                          f"html/{RELEASED}": (b"<html><body>rate limit exceeded</body></html>", "text/html", None),
                          f"empty/{RELEASED}": (b"", "application/octet-stream", None)})


def test_download_interrupted_then_complete_and_strict_released_load(file_server, tmp_path, monkeypatch):
    base, server = file_server
    serve(server, released_like(256))
    dest = tmp_path / "pretrained_models"
    with pytest.raises(DownloadError, match="256x256.*stopped after"):
        checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest), base_url=base + "/cut")
    assert os.listdir(dest) == []  # nothing half-written is left, under any name
    monkeypatch.setenv(checkpoints.DOWNLOAD_URL_ENV, base + "/good")  # the override the docs mention
    ckpt = checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest))
    assert os.listdir(dest) == [RELEASED] and (dest / RELEASED).read_bytes() == released_like(256)
    monkeypatch.setenv(checkpoints.DOWNLOAD_URL_ENV, base + "/cut")  # present now: no second download
    assert checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest)).config["model"] == "DiT-XL/2"

    spec = checkpoints.resolve_spec(ckpt)
    assert (spec.model, spec.image_size, spec.num_classes) == ("DiT-XL/2", 256, 1000)
    model = checkpoints.build_model(spec, ckpt, 4, 32, "cpu")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert torch.equal(model.state_dict()["final_layer.linear.bias"], ckpt.state_dict["final_layer.linear.bias"])
    with pytest.raises(CheckpointError, match="--image-size 512 contradicts .*image size 256"):
        checkpoints.resolve_spec(ckpt, image_size=512)


@pytest.mark.parametrize("mode, what", [("html", r"got 45 bytes of text/html.*not a torch checkpoint"),
                                        ("empty", r"got 0 bytes of application/octet-stream"),
                                        ("wrong", r"got .* bytes of application/octet-stream.*does not have the "
                                                  r"released DiT-XL/2 keys and shapes")])
def test_a_wrong_download_is_not_kept(file_server, tmp_path, mode, what):
    base, server = file_server
    serve(server, torch_bytes(small_state_dict()))  # "wrong": a real checkpoint, but of another model
    dest = tmp_path / "pretrained_models"
    with pytest.raises(DownloadError, match=what + ".*nothing was kept"):
        checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest), base_url=base + ("/good" if mode == "wrong"
                                                                                        else f"/{mode}"))
    assert os.listdir(dest) == []
    serve(server, released_like(256))  # the mirror is fixed: the next run fetches the real file
    assert checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest), base_url=base + "/good").config["image_size"] == 256


def test_a_wrong_cached_released_file_says_how_to_refetch(tmp_path):
    dest = tmp_path / "pretrained_models"
    dest.mkdir()
    (dest / RELEASED).write_bytes(torch_bytes(small_state_dict()))
    with pytest.raises(CheckpointError, match=rf"not the released {RELEASED}. Delete it to fetch it again: rm .*{RELEASED}"):
        checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest))


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_released_512_checkpoint_against_256_model_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pt"  # a plain state_dict: the flags (here the defaults) decide the model
    path.write_bytes(released_like(512))
    ckpt = checkpoints.load_checkpoint(str(path))
    assert ckpt.config == {}
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 1024, 1152\), model \(1, 256, 1152\)"
                                              r".*holds DiT-XL/2 for 4-channel 64x64 inputs"):
        checkpoints.build_model(checkpoints.resolve_spec(ckpt), ckpt, 4, 32, "cpu")


def test_train_checkpoint_uses_ema_and_its_config(tmp_path):
    ema = small_state_dict()
    ckpt = checkpoints.load_checkpoint(train_checkpoint(tmp_path / "0000100.pt", ema))
    spec = checkpoints.resolve_spec(ckpt)
    assert (spec.model, spec.image_size, spec.vae, spec.num_classes, spec.input_size) == ("DiT-S/8", 16, "none", 10, 16)
    model = checkpoints.build_model(spec, ckpt, 3, 16, "cpu")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert checkpoints.resolve_spec(ckpt, model="DiT-S/8", image_size=16, vae="none").model == "DiT-S/8"
    for flags, message in [(dict(model="DiT-B/8"), "--model DiT-B/8 contradicts .* model DiT-S/8"),
                           (dict(image_size=32), "--image-size 32 contradicts .* image size 16"),
                           (dict(vae="ema"), "--vae ema contradicts .* vae none"),
                           (dict(num_classes=1000), "--num-classes 1000 contradicts .* num classes 10")]:
        with pytest.raises(CheckpointError, match=message):
            checkpoints.resolve_spec(ckpt, **flags)


def test_vae_presets_decode_each_other():
    ckpt = checkpoints.Checkpoint("x.pt", {}, dict(vae="stabilityai/sd-vae-ft-ema"))
    assert checkpoints.resolve_spec(ckpt, vae="mse").vae == "mse"  # same encoder, other decoder: allowed
    with pytest.raises(CheckpointError, match="--vae some/other contradicts"):
        checkpoints.resolve_spec(ckpt, vae="some/other")


def test_dit_train_format_with_namespace(tmp_path):
    ema = small_state_dict()
    path = tmp_path / "0050000.pt"
    torch.save(dict(model=ema, ema=ema, opt={}, args=argparse.Namespace(model="DiT-S/8", image_size=16,
                                                                        num_classes=10, vae="ema")), path)
    ckpt = checkpoints.load_checkpoint(str(path))
    assert ckpt.config == dict(model="DiT-S/8", image_size=16, num_classes=10, vae="ema")
    assert ckpt.state_dict is not None and all(torch.equal(ckpt.state_dict[k], v) for k, v in ema.items())
    with pytest.raises(CheckpointError, match="--model DiT-XL/2 contradicts"):
        checkpoints.resolve_spec(ckpt, model="DiT-XL/2")


def test_wrong_model_and_bad_files_are_clear_errors(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(small_state_dict(), path)
    ckpt = checkpoints.load_checkpoint(str(path))
    spec = checkpoints.resolve_spec(ckpt, model="DiT-B/8", image_size=16, vae="none", num_classes=10)
    with pytest.raises(CheckpointError, match=r"does not fit DiT-B/8 .*holds DiT-S/8 for 3-channel 16x16 inputs"):
        checkpoints.build_model(spec, ckpt, 3, 16, "cpu")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoints.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pt as a checkpoint: it is corrupt") as e:
        checkpoints.load_checkpoint(str(tmp_path / "junk.pt"))
    assert "weights_only" not in str(e.value)  # torch's advice to unpickle unsafely is not passed on
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read .*empty.pt as a checkpoint: the file is empty"):
        checkpoints.load_checkpoint(str(tmp_path / "empty.pt"))
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut.pt as a checkpoint: \S"):
        checkpoints.load_checkpoint(str(tmp_path / "cut.pt"))


def test_weights_digest_is_the_content():
    a = small_state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert checkpoints.weights_digest(a) == checkpoints.weights_digest(b)
    b["final_layer.linear.bias"][0] += 1e-6
    assert checkpoints.weights_digest(a) != checkpoints.weights_digest(b)


def test_save_prunes_and_never_leaves_temporary_files(tmp_path, monkeypatch):
    for step in range(1, 8):
        checkpoints.save_checkpoint(dict(step=step), str(tmp_path), keep_last=2, keep_every=3)
    assert sorted(checkpoints.checkpoint_files(str(tmp_path))) == [3, 6, 7]
    assert sorted(os.listdir(tmp_path)) == ["0000003.pt", "0000006.pt", "0000007.pt"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="no space left on the device while writing .*0000008.pt"):
        checkpoints.save_checkpoint(dict(step=8), str(tmp_path), keep_last=2, keep_every=3)
    assert sorted(os.listdir(tmp_path)) == ["0000003.pt", "0000006.pt", "0000007.pt"]  # nothing lost or left
