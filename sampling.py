"""
What sample.py and sample_ddp.py share: finding and loading checkpoints (released, plain, DiT's
train.py format, ours), working out the model and autoencoder they need, the per-image random
streams, and the three samplers.

    from sampling import ImageNoise, build_model, load_checkpoint, resolve_spec, sample_latents
    from vae import load_vae
    ckpt = load_checkpoint("DiT-XL-2-256x256.pt")    # downloads into pretrained_models/ if missing
    spec = resolve_spec(ckpt)                         # model, image size, autoencoder, classes
    vae = load_vae(spec.vae, "cuda")
    model = build_model(spec, ckpt, vae, "cuda")      # strict load of the (EMA) weights
    noise = ImageNoise(seed=0, indices=range(8), shape=(4, 32, 32), device="cuda")
    z = sample_latents(model, noise, y, "dpm-solver", 20, cfg_scale=4.0)
"""
import argparse
import dataclasses
import enum
import http.client
import os
import tempfile
import urllib.request

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion import create_diffusion
from diffusion.respace import space_timesteps
from diffusion.dpm_solver import DPMSolver, Spacing, solver_timesteps
from models import DIT_CONFIGS, DiT_models, Guidance
from vae import VAE_PRESETS, VAEError

# The released DiT-XL/2 weights (plain state_dicts of the EMA model) and their image sizes.
RELEASED_CHECKPOINTS = {"DiT-XL-2-256x256.pt": 256, "DiT-XL-2-512x512.pt": 512}
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
DOWNLOAD_URL_ENV = "DIT_DOWNLOAD_URL"  # overrides DOWNLOAD_URL (a mirror, or the tests' local server)
PRETRAINED_DIR = "pretrained_models"


class Sampler(enum.Enum):
    DDPM = "ddpm"  # ancestral sampling with the learned variances (DiT's)
    DDIM = "ddim"  # deterministic DDIM, eta = 0
    DPM_SOLVER = "dpm-solver"  # deterministic multistep DPM-Solver++ (2M), diffusion/dpm_solver.py


# Steps when --num-sampling-steps is not given: DiT's 250 for DDPM; where DDIM and the solver get
# close to that quality.
DEFAULT_STEPS = {Sampler.DDPM: 250, Sampler.DDIM: 50, Sampler.DPM_SOLVER: 20}


class CheckpointError(ValueError):
    """A checkpoint cannot be found or read, or does not fit the requested model."""


class DownloadError(RuntimeError):
    """A released checkpoint could not be downloaded completely."""


#################################################################################
#                                  Checkpoints                                  #
#################################################################################


def download(name, dest_dir=PRETRAINED_DIR, base_url=None, timeout=60):
    """
    Download a released checkpoint to dest_dir/name, atomically: the bytes go to a temporary file
    in dest_dir that is renamed to its final name only once its size equals the server's
    Content-Length, so an interrupted download never leaves a file that a later run would trust.

    :param name: file name, e.g. "DiT-XL-2-256x256.pt".
    :param dest_dir: folder to put it in (created if missing).
    :param base_url: where the files are; default $DIT_DOWNLOAD_URL or DOWNLOAD_URL.
    :return: the path of the downloaded file.
    :raises DownloadError: on any network error, a missing Content-Length or a short transfer.
    """
    base_url = base_url or os.environ.get(DOWNLOAD_URL_ENV) or DOWNLOAD_URL
    url = base_url.rstrip("/") + "/" + name
    dest = os.path.join(dest_dir, name)
    os.makedirs(dest_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            if expected is None:
                raise DownloadError(f"{url} sent no Content-Length: a complete download cannot be told apart")
            expected, received = int(expected), 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if received != expected:
            raise DownloadError(f"{url}: the transfer stopped after {received} of {expected} bytes")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
        raise DownloadError(f"cannot download {url}: {e!r}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


@dataclasses.dataclass
class Checkpoint:
    """Weights to sample with, and what the file says about the model they belong to: `config` holds
    whichever of model, input_size, in_channels, num_classes, learn_sigma, class_dropout_prob,
    image_size, vae and scaling_factor the file fixes."""

    path: str
    state_dict: dict  # the EMA weights
    kind: str  # "released", "state_dict", "dit-train" (DiT's train.py) or "train" (ours)
    config: dict


def read_checkpoint(path):
    """torch.load on the CPU with weights_only (safe unpickling), or a CheckpointError saying why not."""
    try:  # DiT's own train.py also stores its argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        why = str(e).splitlines()[0]
        if "Weights only load failed" in why:  # torch's advice (weights_only=False) is not ours to give
            why = "it is corrupt, or pickles objects other than tensors and plain containers"
        raise CheckpointError(f"cannot read {path} as a checkpoint: {why}") from e


def load_checkpoint(spec, dest_dir=PRETRAINED_DIR, base_url=None):
    """
    :param spec: a released name (downloaded into dest_dir if not there), or a path to a plain
                 state_dict, a DiT train.py checkpoint or one of our train.py checkpoints.
    :return: a Checkpoint.
    :raises CheckpointError, DownloadError.
    """
    name = os.path.basename(spec)
    released = name in RELEASED_CHECKPOINTS
    path = spec
    if released and not os.path.isfile(spec):
        path = os.path.join(dest_dir, name)
        if not os.path.isfile(path):
            path = download(name, dest_dir, base_url)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {spec!r} (released names: {', '.join(RELEASED_CHECKPOINTS)})")
    data = read_checkpoint(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state_dict or checkpoint dict")
    if released:
        return Checkpoint(path, data, "released", dict(model="DiT-XL/2", image_size=RELEASED_CHECKPOINTS[name],
                                                      num_classes=1000, learn_sigma=True))
    if all(isinstance(v, torch.Tensor) for v in data.values()):
        return Checkpoint(path, data, "state_dict", {})
    if "ema" not in data:
        raise CheckpointError(f"{path} is neither a state_dict nor a training checkpoint (keys: {sorted(data)[:8]})")
    if "model_config" in data:  # ours: describes itself
        config = dict(data["model_config"])
        meta = data.get("latents") or {}
        config.update({k: meta[k] for k in ("image_size", "vae", "scaling_factor") if k in meta})
        return Checkpoint(path, data["ema"], "train", config)
    args = vars(data["args"]) if isinstance(data.get("args"), argparse.Namespace) else {}
    config = {k: args[k] for k in ("model", "image_size", "num_classes", "vae") if k in args}
    return Checkpoint(path, data["ema"], "dit-train", config)


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
    if values["model"] not in DiT_models:
        raise CheckpointError(f"unknown model {values['model']!r}; choose from {', '.join(DiT_models)}")
    if values["num_classes"] < 1:
        raise CheckpointError("the sampling scripts are for class-conditional models (num_classes >= 1)")
    extra = {k: ckpt.config[k] for k in ("learn_sigma", "class_dropout_prob", "input_size", "in_channels",
                                         "scaling_factor")
             if ckpt.config.get(k) is not None}
    return ModelSpec(**values, **extra)


def latent_geometry(spec, vae):
    """
    :param vae: the loaded AutoencoderKL, or None for pixel space.
    :return: (in_channels, input_size) of the model's inputs.
    :raises CheckpointError: when the checkpoint's model does not fit the autoencoder.
    """
    channels = 3 if vae is None else vae.config.latent_channels
    down = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    if spec.in_channels is not None and spec.in_channels != channels:
        raise CheckpointError(f"the checkpoint's model takes {spec.in_channels}-channel inputs but --vae "
                              f"{spec.vae} gives {channels} channels")
    if spec.input_size is not None:
        return channels, spec.input_size
    if spec.image_size % down:
        raise CheckpointError(f"--image-size {spec.image_size} is not divisible by the autoencoder's factor {down}")
    return channels, spec.image_size // down


def _describe(state_dict):
    """What a DiT state_dict's shapes say about its model (for error messages); None if not a DiT."""
    try:
        hidden = state_dict["pos_embed"].shape[-1]
        _, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        grid = round(state_dict["pos_embed"].shape[1] ** 0.5)
    except (KeyError, ValueError, AttributeError):
        return None
    names = [n for n, (d, w, _, p) in DIT_CONFIGS.items() if (d, w, p) == (depth, hidden, patch)]
    text = f"{names[0] if names else f'a DiT of depth {depth}, width {hidden}, patch {patch}'} " \
           f"for {in_channels}-channel {grid * patch}x{grid * patch} inputs"
    table = state_dict.get("y_embedder.embedding_table.weight")
    return text + (f" with a {table.shape[0]}-row label table" if table is not None else ", unconditional")


def build_model(spec, ckpt, vae, device):
    """
    Build spec's model, load the checkpoint's weights strictly and put it in eval mode on device.

    :param vae: the loaded autoencoder (None for pixel space): fixes the input geometry.
    :raises CheckpointError: the weights do not fit (names the checkpoint's apparent model).
    """
    in_channels, input_size = latent_geometry(spec, vae)
    try:
        # On the meta device: no memory and no random initialisation, the checkpoint supplies every value.
        with torch.device("meta"):
            model = DiT_models[spec.model](input_size=input_size, in_channels=in_channels,
                                           num_classes=spec.num_classes, learn_sigma=spec.learn_sigma,
                                           class_dropout_prob=spec.class_dropout_prob)
    except ValueError as e:
        raise CheckpointError(f"cannot build {spec.model} for {input_size}x{input_size} inputs: {e}") from e
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
            f"{ckpt.path} does not fit {spec.model} for {in_channels}-channel {input_size}x{input_size} inputs "
            f"with {spec.num_classes} classes: {'; '.join(problems)}."
            + (f" The checkpoint holds {held}." if held else ""))
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
    return model.to(device, torch.float32).eval().requires_grad_(False)


#################################################################################
#                            Per-image random streams                           #
#################################################################################

# Each image has its own generators keyed on (seed, image index, stream), so what image i looks like
# depends neither on the batch it is drawn in nor on the number of processes. They live on the CPU:
# the same seed gives the same noise on every device.
_LABEL_STREAM, _NOISE_STREAM = 0, 1


def _generators(seed, indices, stream):
    gens = []
    for i in indices:
        state = np.random.SeedSequence([seed, int(i), stream]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1))
    return gens


def random_labels(seed, indices, num_classes):
    """:return: [len(indices)] int64 class labels, label i drawn from (seed, i) alone."""
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in _generators(seed, indices, _LABEL_STREAM)])


class ImageNoise:
    """The Gaussian noise of a batch of images: the starting noise, then DDPM's per-step noise."""

    def __init__(self, seed, indices, shape, device):
        """:param shape: (C, H, W) of one image's sample."""
        self.gens = _generators(seed, indices, _NOISE_STREAM)
        self.shape, self.device = shape, device

    def __call__(self):
        """:return: [N x C x H x W] the next standard normal draw of each image's stream."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


#################################################################################
#                                    Sampling                                   #
#################################################################################


def add_sampling_args(parser, cfg_scale, vae):
    """The flags sample.py and sample_ddp.py share. :param cfg_scale, vae: the script's defaults
    (DiT's sample.py decodes with mse, its sample_ddp.py, for FID, with ema)."""
    parser.add_argument("--model", choices=list(DiT_models), default=None,
                        help="default: the checkpoint's, else DiT-XL/2")
    parser.add_argument("--ckpt", default=None,
                        help="released name (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt; downloaded into "
                             "pretrained_models/), a state_dict file, or a train.py checkpoint (uses its EMA "
                             "weights and its model/image size/autoencoder). Default: the released DiT-XL/2 "
                             "checkpoint for --image-size")
    parser.add_argument("--image-size", type=int, default=None,
                        help="in pixels; default: the checkpoint's, else 256")
    parser.add_argument("--vae", default=None,
                        help="ema, mse, a hub id, a save_pretrained folder, or none (pixel space); "
                             f"default: the checkpoint's, else {vae}")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    parser.add_argument("--sampler", choices=[s.value for s in Sampler], default=Sampler.DDPM.value,
                        help="ddpm (DiT's), ddim (eta 0) or dpm-solver (DPM-Solver++ 2M)")
    parser.add_argument("--num-sampling-steps", type=int, default=None,
                        help="model evaluations per image (doubled batch under guidance); default: "
                             + ", ".join(f"{s.value} {n}" for s, n in DEFAULT_STEPS.items()))
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale, help="classifier-free guidance; 1 = none")
    parser.add_argument("--guidance", choices=[g.value for g in Guidance], default=Guidance.DIT.value,
                        help="dit: guide the first 3 latent channels as DiT's code (and its FIDs) does; "
                             "all: every channel")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"), default=None,
                        help="guide only at timesteps T_LO <= t <= T_HI of the 1000-step process")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ GPUs (faster; DiT's sample_ddp.py default)")


def check_sampling_args(args):
    """Fill in args.num_sampling_steps; raises ValueError (for parser.error) on impossible settings."""
    sampler = Sampler(args.sampler)
    args.num_sampling_steps = args.num_sampling_steps or DEFAULT_STEPS[sampler]
    if not 1 <= args.num_sampling_steps <= 1000:
        raise ValueError(f"--num-sampling-steps must be in 1..1000, got {args.num_sampling_steps}")
    if sampler is Sampler.DDIM:
        space_timesteps(1000, f"ddim{args.num_sampling_steps}")  # raises if no integer stride gives that count
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        raise ValueError(f"--guidance-interval {args.guidance_interval}: T_LO must not exceed T_HI")


def run_script(parser, args, main):
    """Check the shared sampling flags, then run a script's main: user errors (bad flags, checkpoints,
    downloads, autoencoders) end as parser.error, a message and exit status 2, never a traceback."""
    try:
        check_sampling_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        main(args)
    except (CheckpointError, DownloadError, VAEError) as e:
        parser.error(str(e))


@torch.no_grad()
def sample_latents(model, noise, y, sampler, steps, cfg_scale=1.0, guidance=Guidance.DIT, interval=None,
                   progress=False):
    """
    Draw samples in the model's space (latents or pixels).

    :param model: a DiT in eval mode.
    :param noise: a callable returning [N x C x H x W] standard normal noise, usually an ImageNoise:
                  its first draw is the starting noise; DDPM draws its per-step noise from it too, so
                  with an ImageNoise every image depends on its own stream only.
    :param y: [N] int64 class labels on the model's device, or None for an unconditional model.
    :param sampler: a Sampler (or its value); steps: its number of model evaluations.
    :param cfg_scale: guidance scale; 1 samples without guidance (a plain conditional pass).
    :param guidance: a Guidance: which channels are guided. interval: (t_lo, t_hi) or None.
    :return: [N x C x H x W] samples.
    """
    sampler = Sampler(sampler)
    n = len(y)
    z = noise()
    if cfg_scale != 1.0:
        if model.y_embedder.dropout_prob == 0:
            raise CheckpointError("this model was trained without label dropout, so it has no null class for "
                                  "classifier-free guidance: use --cfg-scale 1")
        # One batched pass over the labels and the null label (DiT's forward_with_cfg layout).
        z = torch.cat([z, z], dim=0)
        y = torch.cat([y, torch.full_like(y, model.num_classes)], dim=0)
        model_fn = model.forward_with_cfg
        kwargs = dict(y=y, cfg_scale=cfg_scale, guidance=guidance, interval=interval)
    else:
        model_fn, kwargs = model.forward, dict(y=y)
    learn_sigma = model.out_channels == 2 * model.in_channels
    if sampler is Sampler.DDPM:
        diffusion = create_diffusion(str(steps), learn_sigma=learn_sigma)
        x = z
        for i in tqdm(range(diffusion.num_timesteps)[::-1], disable=not progress, leave=False):
            t = torch.full((len(x),), i, dtype=torch.long, device=x.device)
            out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=False, model_kwargs=kwargs)
            x = out["mean"]
            if i > 0:  # the last step returns the mean, as DDPM does
                step_noise = noise()
                step_noise = torch.cat([step_noise] * (len(x) // len(step_noise)), dim=0)
                x = x + torch.exp(0.5 * out["log_variance"]) * step_noise
    elif sampler is Sampler.DDIM:
        diffusion = create_diffusion(f"ddim{steps}", learn_sigma=learn_sigma)
        x = diffusion.ddim_sample_loop(model_fn, z.shape, noise=z, clip_denoised=False, model_kwargs=kwargs,
                                       device=z.device, progress=progress, eta=0.0)
    else:
        alphas_cumprod = create_diffusion("", learn_sigma=learn_sigma).alphas_cumprod
        solver = DPMSolver(alphas_cumprod, solver_timesteps(alphas_cumprod, steps, Spacing.LOGSNR))
        x = solver.sample(model_fn, z, model_kwargs=kwargs, progress=progress)
    return x[:n]


def to_uint8(images):
    """:param images: [N x 3 x H x W] in [-1, 1]. :return: [N x H x W x 3] uint8 numpy (DiT's rounding)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()
