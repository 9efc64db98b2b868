"""checkpoints.py: reading every accepted format, refusing crafted files field by field, strict model
building, and train.py's atomic save with pruning (the released checkpoints' download: test_downloads)."""
import argparse
import dataclasses
import json
import os
import re

import pytest
import torch

import checkpoints
from checkpoints import CheckpointError
from conftest import GOLDEN_DIR, SMALL_MODEL, released_like, small_state_dict, torch_bytes, train_checkpoint
from downloads import DownloadError

RELEASED = "DiT-XL-2-256x256.pt"


def test_released_keys_are_the_manifests():
    for size in (256, 512):
        manifest = json.loads((GOLDEN_DIR / f"DiT-XL-2-{size}x{size}.keys.json").read_text())
        assert checkpoints.released_shapes(f"DiT-XL-2-{size}x{size}.pt") == {k: tuple(v) for k, v in manifest.items()}


def test_a_cached_released_name_loads_strictly_as_dit_xl_2(tmp_path):
    dest = tmp_path / "pretrained_models"  # what downloads.fetch left there (its tests are in test_downloads)
    dest.mkdir()
    (dest / RELEASED).write_bytes(released_like(256))
    ckpt = checkpoints.load_checkpoint(RELEASED, dest_dir=str(dest))
    spec = checkpoints.resolve_spec(ckpt)
    assert (spec.model, spec.image_size, spec.num_classes) == ("DiT-XL/2", 256, 1000)
    model = checkpoints.build_model(spec, ckpt, 4, 32, "cpu")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert torch.equal(model.state_dict()["final_layer.linear.bias"], ckpt.state_dict["final_layer.linear.bias"])
    with pytest.raises(CheckpointError, match="--image-size 512 contradicts .*image size 256"):
        checkpoints.resolve_spec(ckpt, image_size=512)
    other = tmp_path / RELEASED  # a file passed by path under a released name is checked as well
    other.write_bytes(torch_bytes(small_state_dict()))
    with pytest.raises(CheckpointError, match=f"{other} does not have the released DiT-XL/2 keys and shapes"):
        checkpoints.load_checkpoint(str(other))


def test_sits_released_name_is_fetched_from_its_own_link_and_verified(file_server, tmp_path, monkeypatch):
    base, server = file_server
    name = "SiT-XL-2-256x256.pt"
    link = "scl/fi/x/SiT-XL-2-256.pt?rlkey=k&dl=0"  # SiT's link is not <base>/<name>
    server.routes[link] = (released_like(256), "application/octet-stream", None)
    monkeypatch.setitem(checkpoints.RELEASED_URLS, name, f"{base}/{link}")
    monkeypatch.delenv(checkpoints.DOWNLOAD_URL_ENV, raising=False)
    dest = tmp_path / "pretrained_models"
    ckpt = checkpoints.load_checkpoint(name, dest_dir=str(dest))
    assert server.requests == [link] and os.listdir(dest) == [name]
    assert ckpt.config["model"] == "DiT-XL/2" and ckpt.objective == checkpoints.SIT_OBJECTIVE
    assert checkpoints.load_checkpoint(name, dest_dir=str(dest)).objective["objective"] == "flow"  # cached
    assert server.requests == [link]
    # A mirror ($DIT_DOWNLOAD_URL) serves it under its name; a file of other shapes is not kept.
    server.routes[f"mirror/{name}"] = (torch_bytes(small_state_dict()), "application/octet-stream", None)
    monkeypatch.setenv(checkpoints.DOWNLOAD_URL_ENV, f"{base}/mirror")
    with pytest.raises(DownloadError, match="does not have the released DiT-XL/2 keys and shapes"):
        checkpoints.load_checkpoint(name, dest_dir=str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == []


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
    assert (spec.model, spec.image_size, spec.vae, spec.num_classes, spec.input_size) == (SMALL_MODEL, 8, "none", 10, 8)
    model = checkpoints.build_model(spec, ckpt, 3, 8, "cpu")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert checkpoints.resolve_spec(ckpt, model=SMALL_MODEL, image_size=8, vae="none").model == SMALL_MODEL
    for flags, message in [(dict(model="DiT-B/8"), f"--model DiT-B/8 contradicts .* model {SMALL_MODEL}"),
                           (dict(image_size=32), "--image-size 32 contradicts .* image size 8"),
                           (dict(vae="ema"), "--vae ema contradicts .* vae none"),
                           (dict(num_classes=1000), "--num-classes 1000 contradicts .* num classes 10")]:
        with pytest.raises(CheckpointError, match=message):
            checkpoints.resolve_spec(ckpt, **flags)


def test_a_video_checkpoint_builds_its_video_model_strictly(tmp_path):
    from models import VDiT_models

    ema = VDiT_models["VDiT-Digits/4"](input_size=8, in_channels=3, num_classes=10, num_frames=3).state_dict()
    path = str(tmp_path / "0000100.pt")
    torch.save(dict(model=ema, ema=ema, opt={}, step=100, train_config=dict(global_batch_size=4),
                    model_config=dict(CONFIG, model="VDiT-Digits/4", num_frames=3),
                    latents=dict(LATENTS, frames=3, latent_shape=[3, 3, 8, 8])), path)
    ckpt = checkpoints.load_checkpoint(path)
    spec = checkpoints.resolve_spec(ckpt)
    assert (spec.model, spec.num_frames) == ("VDiT-Digits/4", 3)
    model = checkpoints.build_model(spec, ckpt, 3, 8, "cpu")
    assert model.num_frames == 3 and all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="--model DiT-Digits/4 contradicts .* model VDiT-Digits/4"):
        checkpoints.resolve_spec(ckpt, model="DiT-Digits/4")
    # Another clip length's temporal position table does not fit: strict, and said so.
    short = dataclasses.replace(spec, num_frames=2)
    with pytest.raises(CheckpointError, match="in clips of 2 frames with 10 classes: 1 wrong shape "
                                              r"\(e.g. temporal_pos_embed"):
        checkpoints.build_model(short, ckpt, 3, 8, "cpu")
    torch.save(ema, tmp_path / "plain.pt")
    plain = checkpoints.load_checkpoint(str(tmp_path / "plain.pt"))  # a bare state_dict: no clip length
    with pytest.raises(CheckpointError, match="--model VDiT-Digits/4 is a video model: pass one of train.py's"):
        checkpoints.resolve_spec(plain, model="VDiT-Digits/4", image_size=8, vae="none", num_classes=10)


def test_non_finite_weights_are_refused_before_sampling(tmp_path):
    ema = small_state_dict()
    ema["final_layer.linear.bias"][3] = float("inf")
    ckpt = checkpoints.load_checkpoint(train_checkpoint(tmp_path / "0000100.pt", ema))
    with pytest.raises(CheckpointError, match=r"0000100.pt: final_layer.linear.bias is not finite \(a diverged run\)"):
        checkpoints.build_model(checkpoints.resolve_spec(ckpt), ckpt, 3, 8, "cpu")
    # Finite weights whose sum overflows are finite all the same; a NaN among them is not.
    checkpoints.require_finite({"w": torch.tensor([3e38, 3e38])}, "big")
    with pytest.raises(CheckpointError, match="^nan: w is not finite"):
        checkpoints.require_finite({"w": torch.tensor([3e38, float("nan")])}, "nan")


def test_vae_presets_decode_each_other():
    ckpt = checkpoints.Checkpoint("x.pt", {}, dict(vae="stabilityai/sd-vae-ft-ema"))
    assert checkpoints.resolve_spec(ckpt, vae="mse").vae == "mse"  # same encoder, other decoder: allowed
    with pytest.raises(CheckpointError, match="--vae some/other contradicts"):
        checkpoints.resolve_spec(ckpt, vae="some/other")


def test_dit_train_format_with_namespace(tmp_path):
    ema = small_state_dict()
    path = tmp_path / "0050000.pt"
    torch.save(dict(model=ema, ema=ema, opt={}, args=argparse.Namespace(model=SMALL_MODEL, image_size=8,
                                                                        num_classes=10, vae="ema")), path)
    ckpt = checkpoints.load_checkpoint(str(path))
    assert ckpt.config == dict(model=SMALL_MODEL, image_size=8, num_classes=10, vae="ema")
    assert ckpt.state_dict is not None and all(torch.equal(ckpt.state_dict[k], v) for k, v in ema.items())
    with pytest.raises(CheckpointError, match="--model DiT-XL/2 contradicts"):
        checkpoints.resolve_spec(ckpt, model="DiT-XL/2")


def test_the_objective_is_recorded_and_read_back(tmp_path):
    flow = dict(checkpoints.SIT_OBJECTIVE, time_sampling="logit-normal", logit_normal_loc=0.0, logit_normal_scale=1.0)
    projector = {"0.weight": torch.ones(2, 2)}
    data = checkpoints.training_checkpoint(100, W, W, {}, {}, CONFIG, LATENTS, dict(global_batch_size=4), [], None,
                                           objective=flow, projector=projector)
    assert data["projector"] is projector and data["ema"] is W  # apart: ema stays a strict DiT state_dict
    torch.save(data, tmp_path / "0000100.pt")
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "0000100.pt"))
    assert (ckpt.objective, ckpt.objective_recorded) == (flow, True)
    # Before objectives were recorded every file was DDPM; a plain state_dict cannot tell.
    assert checkpoints.load_checkpoint(crafted(tmp_path / "old.pt")).objective == {"objective": "ddpm"}
    torch.save(W, tmp_path / "plain.pt")
    assert not checkpoints.load_checkpoint(str(tmp_path / "plain.pt")).objective_recorded


def test_sit_train_checkpoints_load_as_flow_for_sits_default_setting_only(tmp_path):
    path = tmp_path / "0050000.pt"
    sit_args = dict(model="SiT-S/8", image_size=256, num_classes=1000, vae="ema", path_type="Linear",
                    prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None)
    torch.save(dict(model=W, ema=W, opt={}, args=argparse.Namespace(**sit_args)), path)
    ckpt = checkpoints.load_checkpoint(str(path))
    assert ckpt.config["model"] == "DiT-S/8" and ckpt.objective == checkpoints.SIT_OBJECTIVE
    for setting, shown in [(dict(path_type="GVP"), "--path-type GVP --prediction velocity"),
                           (dict(prediction="noise"), "--path-type Linear --prediction noise")]:
        torch.save(dict(ema=W, args=argparse.Namespace(**dict(sit_args, **setting))), path)
        with pytest.raises(CheckpointError, match=f"^{path} is a SiT checkpoint trained with {shown}: only SiT's "
                                                  f"--path-type Linear --prediction velocity is supported$"):
            checkpoints.load_checkpoint(str(path))


def test_wrong_model_and_bad_files_are_clear_errors(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(small_state_dict(), path)
    ckpt = checkpoints.load_checkpoint(str(path))
    spec = checkpoints.resolve_spec(ckpt, model="DiT-Digits/2", image_size=8, vae="none", num_classes=10)
    with pytest.raises(CheckpointError, match=r"does not fit DiT-Digits/2 .*holds a DiT of depth 6, width 192, patch "
                                              r"4 for 3-channel 8x8 inputs with a 11-row label table"):
        checkpoints.build_model(spec, ckpt, 3, 8, "cpu")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoints.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pt as a checkpoint: it is corrupt") as e:
        checkpoints.load_checkpoint(str(tmp_path / "junk.pt"))
    assert "weights_only" not in str(e.value)  # torch's advice to unpickle unsafely is not passed on
    (tmp_path / "text.pt").write_bytes(b"junk\n")  # torch's legacy reader raises KeyError('174812789')
    with pytest.raises(CheckpointError, match=r"cannot read .*text.pt as a checkpoint: it is corrupt, or not a file "
                                              r"torch.save wrote$"):
        checkpoints.load_checkpoint(str(tmp_path / "text.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read .*empty.pt as a checkpoint: the file is empty"):
        checkpoints.load_checkpoint(str(tmp_path / "empty.pt"))
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut.pt as a checkpoint: \S"):
        checkpoints.load_checkpoint(str(tmp_path / "cut.pt"))


W = {"w": torch.zeros(2)}  # field checks come before any shape check: tiny weights will do
CONFIG = dict(model=SMALL_MODEL, input_size=8, in_channels=3, num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
LATENTS = dict(vae="none", scaling_factor=1.0, image_size=8)


def crafted(path, **fields):
    """A train.py checkpoint of W with `fields` replacing its entries."""
    torch.save(dict(dict(model=W, ema=W, opt={}, step=100, model_config=CONFIG, latents=LATENTS,
                         train_config=dict(global_batch_size=4)), **fields), path)
    return str(path)


@pytest.mark.parametrize("fields, message", [
    (dict(ema={"w": "0.5"}), r"ema\['w'\] is a str, not a tensor"),
    (dict(ema={}), r"ema is an empty dict, not weights"),
    (dict(ema=[torch.zeros(2)]), r"ema is a list, not weights"),
    (dict(ema={"w": torch.zeros(2, dtype=torch.int64)}), r"ema\['w'\] is a torch.strided torch.int64 tensor, not "
                                                         r"dense floating-point weights"),
    (dict(ema={"w": torch.zeros(2).to_sparse()}), r"ema\['w'\] is a torch.sparse_coo torch.float32 tensor"),
    (dict(ema={3: torch.zeros(2)}), r"ema\[3\]: weights are named by strings, not by int"),
    (dict(model={"w": None}), r"model\['w'\] is a NoneType, not a tensor"),
    (dict(model=None), r"model is a NoneType, not weights"),
    (dict(model_config="DiT-S/8"), r"model_config is a str, not a dict"),
    (dict(model_config=dict(CONFIG, input_size="16")), r"model_config.input_size is '16', not an integer in 1..65536"),
    (dict(model_config=dict(CONFIG, input_size=-8)), r"model_config.input_size is -8, not an integer in 1..65536"),
    (dict(model_config=dict(CONFIG, input_size=True)), r"model_config.input_size is True, not an integer in 1..65536"),
    (dict(model_config=dict(CONFIG, input_size=8.0)), r"model_config.input_size is 8.0, not an integer in 1..65536"),
    (dict(model_config=dict(CONFIG, in_channels=0)), r"model_config.in_channels is 0, not an integer in 1..65536"),
    (dict(model_config=dict(CONFIG, num_classes=-1)), r"model_config.num_classes is -1, not an integer in "
                                                                 r"0..2\*\*24"),
    (dict(model_config=dict(CONFIG, model="DiT-Q/3")), r"model_config.model is 'DiT-Q/3', not a name in "
                                                       r"models.DiT_models"),
    (dict(model_config=dict(CONFIG, model=["DiT-S/8"])), r"model_config.model is \['DiT-S/8'\], not a name"),
    (dict(model_config=dict(CONFIG, num_frames=0)), r"model_config.num_frames is 0, not an integer in 1..4096"),
    (dict(model_config=dict(CONFIG, num_frames=4)), r"model_config is for DiT-Digits/4 with num_frames"),
    (dict(model_config=dict(CONFIG, model="VDiT-S/8")), r"model_config is for VDiT-S/8 without num_frames"),
    (dict(model_config=dict(CONFIG, learn_sigma="yes")), r"model_config.learn_sigma is 'yes', not True or False"),
    (dict(model_config=dict(CONFIG, class_dropout_prob=float("nan"))),
     r"model_config.class_dropout_prob is nan, not a number in \[0, 1\)"),
    (dict(model_config=dict(CONFIG, class_dropout_prob=1.5)), r"model_config.class_dropout_prob is 1.5, not a "
                                                                  r"number in"),
    (dict(model_config=dict(CONFIG, depth=3, hidden_size=8)), r"model_config has unknown keys 'depth', "
                                                              r"'hidden_size' \(known: model, input_size"),
    (dict(model_config={k: v for k, v in CONFIG.items() if k != "in_channels"}), r"model_config has no in_channels"),
    (dict(model_config=dict(CONFIG, input_size="x" * 1000)), r"model_config.input_size is 'x{56}\.\.\., not"),
    (dict(model_config=dict(CONFIG, input_size=10 ** 500)), r"model_config.input_size is 10{56}\.\.\., not"),
    (dict(model_config=dict(CONFIG, input_size=2 ** 40)), r"model_config.input_size is 1099511627776, not an "
                                                          r"integer in 1..65536"),
    (dict(model_config=dict(CONFIG, class_dropout_prob=10 ** 400)), r"model_config.class_dropout_prob is 1000"),
    (dict(latents=None), r"has no latents"),
    (dict(latents=[1, 2]), r"latents is a list, not a dict"),
    (dict(latents=dict(LATENTS, vae=5)), r"latents.vae is 5, not a non-empty string"),
    (dict(latents={k: v for k, v in LATENTS.items() if k != "scaling_factor"}), r"latents has no scaling_factor"),
    (dict(latents=dict(LATENTS, scaling_factor=float("inf"))), r"latents.scaling_factor is inf, not a positive "
                                                               r"finite number"),
    (dict(latents=dict(LATENTS, scaling_factor=0)), r"latents.scaling_factor is 0, not a positive finite number"),
    (dict(latents=dict(LATENTS, image_size="256")), r"latents.image_size is '256', not an integer in 1..65536"),
    (dict(train_config={}), r"train_config is empty, not train.py's flags"),
    (dict(train_config="--lr 1e-4"), r"train_config is a str, not train.py's flags"),
    (dict(train_config=None), r"has no train_config"),
    (dict(objective="flow"), r"objective is a str, not a dict"),
    (dict(objective=dict(objective="vp")), r"objective.objective is 'vp', not 'ddpm' or 'flow'"),
    (dict(objective=dict(checkpoints.SIT_OBJECTIVE, prediction="noise")), r"objective.prediction is 'noise'; only "
                                                                          r"SiT's 'velocity' is supported"),
    (dict(objective=dict(checkpoints.SIT_OBJECTIVE, time="t=0 data")), r"objective.time is 't=0 data'; only SiT's"),
    (dict(objective=dict(objective="ddpm", steps=torch.zeros(2))), r"objective\['steps'\] is tensor\(\[0\., 0\.\]\), "
                                                                   r"not a plain value"),
])
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_crafted_train_checkpoints_are_one_line_errors_naming_the_field(tmp_path, fields, message):
    path = crafted(tmp_path / "0000100.pt", **fields)
    with pytest.raises(CheckpointError, match=f"^{re.escape(path)}:? {message}") as e:
        checkpoints.load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_crafted_plain_and_dit_files_are_one_line_errors_naming_the_field(tmp_path):
    assert checkpoints.load_checkpoint(crafted(tmp_path / "good.pt")).config == dict(CONFIG, **LATENTS)
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.complex64)}, path)
    with pytest.raises(CheckpointError, match=rf"^{path}\['b'\] is a torch.strided torch.complex64 tensor"):
        checkpoints.load_checkpoint(str(path))
    for args, message in [(dict(image_size="256"), r"args.image_size is '256', not an integer in 1..65536"),
                          (dict(model=None), r"args.model is None, not a name in models.DiT_models"),
                          (dict(vae=""), r"args.vae is '', not a non-empty string")]:
        torch.save(dict(ema=W, args=argparse.Namespace(**args)), path)
        with pytest.raises(CheckpointError, match=f"^{path}: {message}"):
            checkpoints.load_checkpoint(str(path))
    torch.save(dict(ema={"w": 1.0}, args=argparse.Namespace()), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: ema\['w'\] is a float, not a tensor"):
        checkpoints.load_checkpoint(str(path))


def test_weights_digest_is_the_content():
    a = small_state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert checkpoints.weights_digest(a) == checkpoints.weights_digest(b)
    b["final_layer.linear.bias"][0] += 1e-6
    assert checkpoints.weights_digest(a) != checkpoints.weights_digest(b)


def test_save_prunes_and_never_leaves_temporary_files(tmp_path, monkeypatch):
    for step in range(1, 8):
        checkpoints.save_checkpoint(dict(step=step, model=W, ema=W), str(tmp_path), keep_last=2, keep_every=3)
    assert sorted(checkpoints.checkpoint_files(str(tmp_path))) == [3, 6, 7]
    assert sorted(os.listdir(tmp_path)) == ["0000003.pt", "0000006.pt", "0000007.pt"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="no space left on the device while writing .*0000008.pt"):
        checkpoints.save_checkpoint(dict(step=8, model=W, ema=W), str(tmp_path), keep_last=2, keep_every=3)
    assert sorted(os.listdir(tmp_path)) == ["0000003.pt", "0000006.pt", "0000007.pt"]  # nothing lost or left
