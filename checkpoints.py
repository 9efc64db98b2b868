"""
The checkpoint format, written and read here: train.py's checkpoints (atomic save with pruning,
RNG states, the compatibility check for resuming), the files the sampling scripts accept (the
released DiT-XL/2 and SiT-XL/2 weights, fetched through downloads.py and verified; plain state_dicts;
DiT's and SiT's train.py checkpoints; ours, each field checked as it is read), with the objective
each holds (DDPM or SiT's flow), and the strict build of a model from them.

    from checkpoints import load_checkpoint, resolve_spec, build_model
    ckpt = load_checkpoint("DiT-XL-2-256x256.pt")   # downloads into pretrained_models/ if missing
    spec = resolve_spec(ckpt)                        # model, image size, autoencoder, classes
    model = build_model(spec, ckpt, vae, "cuda")     # strict load of the (EMA) weights

A train.py checkpoint (`results/NNN-<model>/checkpoints/SSSSSSS.pt`) is a dict of plain data,
loadable with torch.load(weights_only=True):
    model, ema       {name: tensor} of the trained and the EMA weights (float32, whole, on the CPU)
    opt, scheduler   the optimizer's and the learning-rate schedule's state_dicts
    model_config     DiT_models or VDiT_models name and constructor arguments (model, input_size, in_channels,
                     ...; num_frames for a video model, and only for one)
    latents          the latent store's meta.json (autoencoder, scaling factor, image size, classes, ...)
    train_config     train.py's flags
    step             optimisation steps taken
    rng_states       every process's RNG states, in rank order
    parent           the checkpoint this run branched from (None for a run started fresh)
    objective        the training objective's config(): {"objective": "ddpm", ...} or {"objective": "flow",
                     "path": "linear", "prediction": "velocity", "time": ..., "time_sampling": ...}
                     (diffusion/); a file without it is DDPM
    projector        REPA's projector MLP {name: tensor}, apart from `model` and `ema` so that those load
                     strictly into DiT_models; None without REPA
"""
import argparse
import dataclasses
import functools
import glob
import hashlib
import math
import os
import random
import re
import zipfile

import numpy as np
import torch

from diffusion.flow import FlowMatching, TimeSampling
from downloads import PRETRAINED_DIR, DownloadError, download, fetch, first_line
from files import UserError, atomic_write
from models import DIT_CONFIGS, DiT_models, VDiT_models
from vae import VAE_PRESETS

# The released weights (plain state_dicts of EMA models, all with DiT-XL/2's keys and shapes) and their
# image sizes: DiT's, and SiT's (Ma et al. 2024), whose file is DiT-XL/2 trained with the flow objective.
RELEASED_CHECKPOINTS = {"DiT-XL-2-256x256.pt": 256, "DiT-XL-2-512x512.pt": 512, "SiT-XL-2-256x256.pt": 256}
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
DOWNLOAD_URL_ENV = "DIT_DOWNLOAD_URL"  # overrides DOWNLOAD_URL (a mirror, or the tests' local server)
# Released files that are not at DOWNLOAD_URL/<name>: SiT's README and download.py link (willisma/SiT
# at 947f95b). A DOWNLOAD_URL_ENV mirror serves them under their names like the others.
RELEASED_URLS = {"SiT-XL-2-256x256.pt": "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
                                        "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"}

# What a checkpoint without an objective record holds: DiT's objective, DDPM.
DDPM_OBJECTIVE = {"objective": "ddpm"}
# SiT's: the linear path, velocity prediction, uniform t (its train.py's defaults, its released weights').
SIT_OBJECTIVE = FlowMatching(TimeSampling.UNIFORM).config()
RELEASED_OBJECTIVES = {name: SIT_OBJECTIVE if name.startswith("SiT-") else DDPM_OBJECTIVE
                       for name in RELEASED_CHECKPOINTS}
# Every size the scripts build by name: the image DiTs and the video ones (clips [N, C, F, H, W]).
MODELS = DiT_models | VDiT_models
CKPT_RE = re.compile(r"^(\d{7,})\.pt$")  # train.py's checkpoint names: the step, 7 digits or more

# Store metadata that must match for a checkpoint to continue training on a store.
STORE_IDENTITY = ("vae", "scaling_factor", "image_size", "latent_shape", "num_classes", "class_names",
                  "count", "files_sha1", "frames", "frame_stride")


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be found or read, or does not fit the requested model."""


#################################################################################
#                          The released checkpoints                             #
#################################################################################


def released_shapes(name):
    """{key: shape} of the released checkpoint `name`: DiT-XL/2's state_dict, built on the meta device."""
    return dict(_dit_xl_2_shapes(RELEASED_CHECKPOINTS[name]))


@functools.cache  # building DiT-XL/2, even on the meta device, takes seconds; a file is checked twice
def _dit_xl_2_shapes(image_size):
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=image_size // 8, num_classes=1000)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def why_not_released(name, state_dict):
    """:return: None if state_dict has exactly the released checkpoint's keys and shapes, else why not."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        return f"is a {type(state_dict).__name__}, not a state_dict"
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    expected = released_shapes(name)
    if found != expected:
        wrong = sorted(expected.keys() ^ found.keys()) or sorted(k for k in expected if expected[k] != found[k])
        return f"does not have the released DiT-XL/2 keys and shapes (e.g. {wrong[0]})"
    return None


def fetch_released(name, dest_dir=PRETRAINED_DIR, base_url=None):
    """
    A released checkpoint in dest_dir, downloaded the first time; the file (downloaded or found) is
    used only if it loads safely as a state_dict with exactly the released model's keys and shapes.

    :param base_url: where the files are; default $DIT_DOWNLOAD_URL, else RELEASED_URLS[name] or DOWNLOAD_URL.
    :return: the path of the file.
    :raises DownloadError.
    """
    base_url = base_url or os.environ.get(DOWNLOAD_URL_ENV)
    own_url = RELEASED_URLS.get(name) if base_url is None else None
    base_url = base_url or DOWNLOAD_URL

    def verify(path):
        if not zipfile.is_zipfile(path):
            raise DownloadError("is not a torch checkpoint (torch.save writes a zip archive)")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any unreadable file: HTML, empty, truncated, foreign pickles
            raise DownloadError(f"is not a torch checkpoint ({first_line(e)})") from e
        why = why_not_released(name, data)
        if why:
            raise DownloadError(why)

    if own_url and not os.path.isfile(os.path.join(dest_dir, name)):
        download(own_url, os.path.join(dest_dir, name), verify)  # then found, and checked again, by fetch
    return fetch(base_url, name, dest_dir, verify)


#################################################################################
#                                    Reading                                    #
#################################################################################


@dataclasses.dataclass
class Checkpoint:
    """Weights to sample with, and what the file says about the model they belong to: `config` holds
    whichever of model, input_size, in_channels, num_classes, learn_sigma, class_dropout_prob,
    image_size, vae and scaling_factor the file fixes; `objective` what it was trained for (checked
    plain data, as an objective's config() writes it; DDPM_OBJECTIVE when the file has no record)."""

    path: str
    state_dict: dict  # the EMA weights
    config: dict
    objective: dict = dataclasses.field(default_factory=lambda: dict(DDPM_OBJECTIVE))
    # False for a plain state_dict that is not a released one: its weights cannot tell DDPM from flow.
    objective_recorded: bool = True


def read_checkpoint(path):
    """torch.load on the CPU with weights_only (safe unpickling), or a CheckpointError saying why not."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot read {path} as a checkpoint: the file is empty (0 bytes)")
    try:  # DiT's own train.py also stores its argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        why = first_line(e)
        if "Weights only load failed" in why:  # torch's advice (weights_only=False) is not ours to give
            why = "it is corrupt, or pickles objects other than tensors and plain containers"
        elif isinstance(e, KeyError):  # torch's legacy reader on bytes that are no torch file: a bare number
            why = "it is corrupt, or not a file torch.save wrote"
        raise CheckpointError(f"cannot read {path} as a checkpoint: {why}") from e


def _is_int(v, low, high):
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_real(v):
    return isinstance(v, float) and math.isfinite(v) or _is_int(v, -math.inf, math.inf)


def _shown(value):
    """repr(value), cut short: a crafted file's values can be any size."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What a checkpoint may say about its model (Checkpoint.config's keys), each with what a value must be.
# The bounds only keep crafted values from reaching the model's constructor; real ones are far below.
CONFIG_CHECKS = {
    "model": ("a name in models.DiT_models or VDiT_models", lambda v: isinstance(v, str) and v in MODELS),
    "num_frames": ("an integer in 1..4096", lambda v: _is_int(v, 1, 2**12)),
    "input_size": ("an integer in 1..65536", lambda v: _is_int(v, 1, 2**16)),
    "in_channels": ("an integer in 1..65536", lambda v: _is_int(v, 1, 2**16)),
    "image_size": ("an integer in 1..65536", lambda v: _is_int(v, 1, 2**16)),
    "num_classes": ("an integer in 0..2**24", lambda v: _is_int(v, 0, 2**24)),
    "learn_sigma": ("True or False", lambda v: isinstance(v, bool)),
    "class_dropout_prob": ("a number in [0, 1)", lambda v: _is_real(v) and 0 <= v < 1),
    "vae": ("a non-empty string", lambda v: isinstance(v, str) and v != ""),
    "scaling_factor": ("a positive finite number", lambda v: _is_real(v) and v > 0),
}
# What train.py writes in model_config (the model's constructor arguments) and reads back from latents.
MODEL_CONFIG_KEYS = ("model", "input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob",
                     "num_frames")
LATENTS_KEYS = ("image_size", "vae", "scaling_factor")


def _read_config(path, field, values, keys, required=()):
    """
    The entries `keys` of the dict `values`, the file's `field`, each checked against CONFIG_CHECKS.

    :raises CheckpointError: values is not a dict, lacks one of `required` or holds a bad value (the
                             message names the file and the field).
    """
    if values is None:
        raise CheckpointError(f"{path} has no {field}")
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: {field} is a {type(values).__name__}, not a dict")
    missing = [k for k in required if k not in values]
    if missing:
        raise CheckpointError(f"{path}: {field} has no {', '.join(missing)}")
    config = {k: values[k] for k in keys if k in values}
    for key, value in config.items():
        what, ok = CONFIG_CHECKS[key]
        if not ok(value):
            raise CheckpointError(f"{path}: {field}.{key} is {_shown(value)}, not {what}")
    return config


def _check_weights(path, field, state_dict):
    """:raises CheckpointError: the file's `field` (None: the whole file) is not a non-empty dict of
    named dense floating-point tensors."""
    where = f"{path}: {field}" if field else path
    if not isinstance(state_dict, dict) or not state_dict:
        what = "an empty dict" if isinstance(state_dict, dict) else f"a {type(state_dict).__name__}"
        raise CheckpointError(f"{where} is {what}, not weights")
    for key, value in state_dict.items():
        name = f"{where}[{_shown(key)}]"
        if not isinstance(key, str):
            raise CheckpointError(f"{name}: weights are named by strings, not by {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point() or value.layout != torch.strided:
            raise CheckpointError(f"{name} is a {value.layout} {value.dtype} tensor, not dense floating-point weights")


def _our_config(path, data):
    """What one of our train.py checkpoints says about its model, each field checked.
    :raises CheckpointError."""
    config = _read_config(path, "model_config", data["model_config"], MODEL_CONFIG_KEYS,
                          required=("model", "input_size", "in_channels", "num_classes"))
    unknown = sorted(map(repr, data["model_config"].keys() - set(MODEL_CONFIG_KEYS)))
    if unknown:
        raise CheckpointError(f"{path}: model_config has unknown keys {', '.join(unknown)[:200]} "
                              f"(known: {', '.join(MODEL_CONFIG_KEYS)})")
    if (config["model"] in VDiT_models) != ("num_frames" in config):
        raise CheckpointError(f"{path}: model_config is for {config['model']} "
                              + ("without num_frames" if config["model"] in VDiT_models else "with num_frames"))
    config.update(_read_config(path, "latents", data.get("latents"), LATENTS_KEYS, required=LATENTS_KEYS))
    _check_weights(path, "model", data.get("model"))
    train_config = data.get("train_config")
    if train_config is None:
        raise CheckpointError(f"{path} has no train_config")
    if not isinstance(train_config, dict) or not train_config:
        what = "empty" if isinstance(train_config, dict) else f"a {type(train_config).__name__}"
        raise CheckpointError(f"{path}: train_config is {what}, not train.py's flags")
    return config


def _read_objective(path, record):
    """
    A checkpoint's objective record, checked: a dict of plain values naming "ddpm" or "flow"; a flow
    record must state the conventions diffusion/flow.py samples with (SiT's linear path, velocity, its time).

    :return: the record (DDPM_OBJECTIVE when `record` is None).
    :raises CheckpointError: naming the file and what is wrong.
    """
    if record is None:
        return dict(DDPM_OBJECTIVE)
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: objective is a {type(record).__name__}, not a dict")
    for key, value in record.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, (str, bool)) or _is_real(value)):
            raise CheckpointError(f"{path}: objective[{_shown(key)}] is {_shown(value)}, not a plain value")
    kind = record.get("objective")
    if kind not in ("ddpm", "flow"):
        raise CheckpointError(f"{path}: objective.objective is {_shown(kind)}, not 'ddpm' or 'flow'")
    if kind == "flow":
        for key in ("path", "prediction", "time"):
            if record.get(key) != SIT_OBJECTIVE[key]:
                raise CheckpointError(f"{path}: objective.{key} is {_shown(record.get(key))}; only SiT's "
                                      f"{SIT_OBJECTIVE[key]!r} is supported")
    return record


def _sit_objective(path, args):
    """The objective of one of SiT's train.py checkpoints, from its flags.
    :raises CheckpointError: a setting other than SiT's default (Linear path, velocity prediction)."""
    setting = (args.get("path_type"), args.get("prediction"))
    if setting != ("Linear", "velocity"):
        raise CheckpointError(f"{path} is a SiT checkpoint trained with --path-type {setting[0]} --prediction "
                              f"{setting[1]}: only SiT's --path-type Linear --prediction velocity is supported")
    return dict(SIT_OBJECTIVE)


def load_checkpoint(spec, dest_dir=PRETRAINED_DIR, base_url=None):
    """
    :param spec: a released name (downloaded into dest_dir if not there), or a path to a plain
                 state_dict, a DiT or SiT train.py checkpoint or one of our train.py checkpoints.
    :return: a Checkpoint.
    :raises CheckpointError: the file cannot be read, or a field the sampling scripts use is missing or
                             not what it should be (the message names the file and the field).
    :raises DownloadError.
    """
    name = os.path.basename(spec)
    released = name in RELEASED_CHECKPOINTS
    path = fetch_released(name, dest_dir, base_url) if released and not os.path.isfile(spec) else spec
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {spec!r} (released names: {', '.join(RELEASED_CHECKPOINTS)})")
    data = read_checkpoint(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state_dict or checkpoint dict")
    if released:  # fetched files were verified already; this is for a file passed by path
        why = why_not_released(name, data)
        if why:
            raise CheckpointError(f"{path} {why}: it is not the released {name}")
        weights, field, objective = data, None, dict(RELEASED_OBJECTIVES[name])
        config = dict(model="DiT-XL/2", image_size=RELEASED_CHECKPOINTS[name], num_classes=1000, learn_sigma=True)
    elif data and all(isinstance(v, torch.Tensor) for v in data.values()):
        _check_weights(path, None, data)
        return Checkpoint(path, data, {}, dict(DDPM_OBJECTIVE), objective_recorded=False)
    elif "ema" not in data:
        raise CheckpointError(f"{path} is neither a state_dict nor a training checkpoint "
                              f"(keys: {sorted(map(str, data))[:8]})")
    elif "model_config" in data:  # ours: describes itself
        weights, field, config = data["ema"], "ema", _our_config(path, data)
        objective = _read_objective(path, data.get("objective"))
    else:  # DiT's or SiT's train.py: its flags as an argparse.Namespace (SiT's has path_type)
        args = vars(data["args"]) if isinstance(data.get("args"), argparse.Namespace) else {}
        weights, field = data["ema"], "ema"
        objective = _sit_objective(path, args) if "path_type" in args else dict(DDPM_OBJECTIVE)
        if "path_type" in args and isinstance(args.get("model"), str) and args["model"].startswith("SiT-"):
            args = dict(args, model="DiT-" + args["model"][len("SiT-"):])  # SiT_models are DiT_models renamed
        config = _read_config(path, "args", args, ("model", "image_size", "num_classes", "vae"))
    _check_weights(path, field, weights)
    return Checkpoint(path, weights, config, objective)


def weights_digest(state_dict):
    """A sha256 of a state_dict's names, dtypes, shapes and values: the identity of a set of weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#################################################################################
#                     Reconciling flags and building the model                  #
#################################################################################


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to build the model and turn its samples into images."""

    model: str
    image_size: int
    vae: str
    num_classes: int
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1  # > 0 gives the label table its null class (needed for guidance)
    input_size: int = None  # None: image_size over the autoencoder's downsampling factor
    in_channels: int = None  # None: the autoencoder's latent channels (3 in pixel space)
    scaling_factor: float = None  # None: the autoencoder's own
    num_frames: int = None  # a video model's clip length; None for an image model


def _same_vae(a, b):
    """The ema and mse autoencoders share their encoder (only the decoder was fine-tuned), so
    latents of one decode with the other, as DiT's --vae choice relies on."""
    a, b = VAE_PRESETS.get(a, a), VAE_PRESETS.get(b, b)
    return a == b or {a, b} <= set(VAE_PRESETS.values())


def resolve_spec(ckpt, model=None, image_size=None, vae=None, num_classes=None, default_vae="ema"):
    """
    Combine what the checkpoint fixes with the command line. Flags left at None take the checkpoint's
    value, else DiT's default (DiT-XL/2, 256, default_vae, 1000 classes).

    :raises CheckpointError: a flag contradicts the checkpoint (the message names both).
    """
    flags = dict(model=model, image_size=image_size, vae=vae, num_classes=num_classes)
    defaults = dict(model="DiT-XL/2", image_size=256, vae=default_vae, num_classes=1000)
    cli = dict(model="--model", image_size="--image-size", vae="--vae", num_classes="--num-classes")
    values = {}
    for key in flags:
        fixed, given = ckpt.config.get(key), flags[key]
        if fixed is not None and given is not None:
            agree = _same_vae(given, fixed) if key == "vae" else given == fixed
            if not agree:
                raise CheckpointError(f"{cli[key]} {given} contradicts the checkpoint {ckpt.path}, which is "
                                      f"for {key.replace('_', ' ')} {fixed}; drop the flag or pick another checkpoint")
        values[key] = given if given is not None else fixed if fixed is not None else defaults[key]
    if values["model"] not in MODELS:
        raise CheckpointError(f"unknown model {values['model']!r}; choose from {', '.join(MODELS)}")
    if values["model"] in VDiT_models and ckpt.config.get("num_frames") is None:
        raise CheckpointError(f"--model {values['model']} is a video model: pass one of train.py's video "
                              f"checkpoints with --ckpt (they record the clip length)")
    if values["num_classes"] < 1:
        raise CheckpointError("the sampling scripts are for class-conditional models (num_classes >= 1)")
    extra = {k: ckpt.config[k] for k in ("learn_sigma", "class_dropout_prob", "input_size", "in_channels",
                                         "scaling_factor", "num_frames")
             if ckpt.config.get(k) is not None}
    return ModelSpec(**values, **extra)


def _describe(state_dict):
    """What a DiT state_dict's shapes say about its model (for error messages); None if not a DiT."""
    try:
        hidden = state_dict["pos_embed"].shape[-1]
        _, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        grid = round(state_dict["pos_embed"].shape[1] ** 0.5)
        table = state_dict.get("y_embedder.embedding_table.weight")
        rows = None if table is None else table.shape[0]
    except (KeyError, ValueError, IndexError):  # not DiT's names or shapes
        return None
    names = [n for n, (d, w, _, p) in DIT_CONFIGS.items() if (d, w, p) == (depth, hidden, patch)]
    text = f"{names[0] if names else f'a DiT of depth {depth}, width {hidden}, patch {patch}'} " \
           f"for {in_channels}-channel {grid * patch}x{grid * patch} inputs"
    return text + (f" with a {rows}-row label table" if rows is not None else ", unconditional")


def build_model(spec, ckpt, in_channels, input_size, device):
    """
    Build spec's model for [in_channels x input_size x input_size] inputs (clips of spec.num_frames such
    frames for a video model), load the checkpoint's weights strictly and put it in eval mode on device.

    :raises CheckpointError: the weights do not fit (names the checkpoint's apparent model) or are not finite.
    """
    video = {} if spec.num_frames is None else dict(num_frames=spec.num_frames)
    inputs = f"{in_channels}-channel {input_size}x{input_size} inputs" + (
        f" in clips of {spec.num_frames} frames" if video else "")
    try:
        # On the meta device: no memory and no random initialisation, the checkpoint supplies every value.
        with torch.device("meta"):
            model = MODELS[spec.model](input_size=input_size, in_channels=in_channels, num_classes=spec.num_classes,
                                       learn_sigma=spec.learn_sigma, class_dropout_prob=spec.class_dropout_prob,
                                       **video)
    except ValueError as e:
        raise CheckpointError(f"cannot build {spec.model} for {inputs}: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
    if expected != found:
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                problems.append(f"{len(keys)} {what} (e.g. {keys[0]}"
                                + (f": checkpoint {found[keys[0]]}, model {expected[keys[0]]})" if what == "wrong shape" else ")"))
        held = _describe(ckpt.state_dict)
        raise CheckpointError(
            f"{ckpt.path} does not fit {spec.model} for {inputs} with {spec.num_classes} classes: "
            f"{'; '.join(problems)}."
            + (f" The checkpoint holds {held}." if held else ""))
    # After the shapes: a crafted file's tensor can claim any size, and this check reads every element.
    require_finite(ckpt.state_dict, ckpt.path)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
    return model.to(device, torch.float32).eval().requires_grad_(False)


#################################################################################
#                            Training checkpoints                               #
#################################################################################


def checkpoint_files(ckpt_dir):
    """{step: path} of the finished checkpoints in ckpt_dir."""
    found = {}
    for path in glob.glob(os.path.join(ckpt_dir, "*.pt")):
        m = CKPT_RE.match(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    return found


def save_checkpoint(data, ckpt_dir, keep_last, keep_every):
    """
    Write a training checkpoint atomically as ckpt_dir/<step>.pt, then prune: keep the `keep_last`
    latest and every one whose step is a multiple of `keep_every` (0: none). A crash at any point
    leaves the previous checkpoints intact, and non-finite weights are never written, so pruning never
    removes the last finite checkpoint. :return: the path written.
    """
    path = os.path.join(ckpt_dir, f"{data['step']:07d}.pt")
    require_finite(data["model"], f"the weights for {path}")
    require_finite(data["ema"], f"the EMA weights for {path}")
    with atomic_write(path) as f:
        torch.save(data, f)
    kept = sorted(checkpoint_files(ckpt_dir))
    for s in kept[:-keep_last]:
        if not (keep_every and s % keep_every == 0):
            os.remove(os.path.join(ckpt_dir, f"{s:07d}.pt"))
    return path


def require_finite(state_dict, source):
    """:raises CheckpointError: naming `source` and its first tensor that holds a NaN or an infinity."""
    for name, value in state_dict.items():
        # A finite sum means every element is finite: one pass, no mask the size of the tensor (15x faster
        # on DiT-XL/2's 675M). Only a non-finite sum (a NaN or infinity, or an overflow) needs the elements.
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value.sum()) \
                and not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: {name} is not finite (a diverged run); refused")


def training_checkpoint(step, model, ema, opt, scheduler, model_config, latents, train_config, rng_states, parent,
                        *, objective, projector=None):
    """A train.py checkpoint: the layout this module's docstring describes, as one dict of plain data.
    :param objective: the objective's config(); projector: REPA's projector state_dict, or None."""
    return dict(model=model, ema=ema, opt=opt, scheduler=scheduler, model_config=model_config, latents=latents,
                train_config=train_config, step=step, rng_states=rng_states, parent=parent, objective=objective,
                projector=projector)


def check_compatible(ckpt, path, model_config, meta):
    """Refuse a training checkpoint of another model or another store, naming what differs.
    :raises CheckpointError."""
    theirs = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this train.py (no model_config)")
    diffs = [f"{k}: checkpoint {theirs.get(k)!r}, now {v!r}" for k, v in model_config.items() if theirs.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} is a checkpoint of another model ({'; '.join(diffs)})")
    stored = ckpt.get("latents") or {}
    diffs = [f"{k}: checkpoint {stored.get(k)!r}, store {meta.get(k)!r}" for k in STORE_IDENTITY
             if stored.get(k) != meta.get(k)]
    if diffs:
        raise CheckpointError(f"{path} was trained on another latent store ({'; '.join(diffs)})")


def rng_state():
    """This process's RNG states as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what rng_state returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
