"""
What sample.py and sample_ddp.py share: turning the sampling flags into a ready model and
autoencoder, the per-image random streams, and the samplers: three for DDPM models, three for
flow models (SiT's objective, diffusion/flow.py). Checkpoints themselves are read in checkpoints.py.

    from sampling import ImageNoise, load_model, sample_latents
    loaded = load_model(args, "cuda", default_vae="mse")   # --ckpt, --model, --image-size, --vae, --sampler, ...
    noise = ImageNoise(seed=0, indices=range(8), shape=loaded.latent_shape, device="cuda")
    z = sample_latents(loaded.model, noise, y, loaded.sampler, loaded.steps, cfg_scale=4.0)
    images = decode(loaded.vae, z, loaded.scaling_factor)
"""
import argparse
import contextlib
import dataclasses
import enum

import numpy as np
import torch
from tqdm.auto import tqdm

from checkpoints import (MODELS, RELEASED_CHECKPOINTS, Checkpoint, CheckpointError, ModelSpec, build_model,
                         load_checkpoint, resolve_spec)
from diffusion import create_diffusion
from diffusion.dpm_solver import DPMSolver, Spacing, solver_timesteps
from diffusion.flow import FlowMatching, ODESolver
from diffusion.respace import space_timesteps
from files import UserError
from models import Guidance
from vae import downsampling_factor, load_vae, scaling_factor


class Sampler(enum.Enum):
    # For DDPM models (DiT's objective):
    DDPM = "ddpm"  # ancestral sampling with the learned variances (DiT's)
    DDIM = "ddim"  # deterministic DDIM, eta = 0
    DPM_SOLVER = "dpm-solver"  # deterministic multistep DPM-Solver++ (2M), diffusion/dpm_solver.py
    # For flow models (SiT's linear flow with velocity prediction), diffusion/flow.py:
    EULER = "euler"  # the probability-flow ODE, Euler steps
    HEUN = "heun"  # the same, Heun's steps (SiT's fixed-step heun2)
    SDE = "sde"  # SiT's SDE sampler as its sample.py runs it by default (Euler-Maruyama)


# Which samplers fit which objective (a checkpoint's objective["objective"]), the first its default:
# DiT's ddpm, and SiT's sde (its FID setting).
OBJECTIVE_SAMPLERS = {"ddpm": (Sampler.DDPM, Sampler.DDIM, Sampler.DPM_SOLVER),
                      "flow": (Sampler.SDE, Sampler.EULER, Sampler.HEUN)}


class SamplingError(UserError, ValueError):
    """A sampling setting does not fit the model (a class label out of its range, guidance for a model
    without a null class), or the sample folder holds another run's images."""


# Steps when --num-sampling-steps is not given: DiT's 250 for DDPM; where DDIM and the solver get
# close to that quality. SiT's 250 for its SDE (its FID setting); the ODE solvers at about 100 model
# evaluations (Euler 100 grid times, Heun 50: SiT's ODE count, with 2 evaluations per interval).
DEFAULT_STEPS = {Sampler.DDPM: 250, Sampler.DDIM: 50, Sampler.DPM_SOLVER: 20,
                 Sampler.EULER: 100, Sampler.HEUN: 50, Sampler.SDE: 250}


#################################################################################
#                                The model to sample                            #
#################################################################################


@dataclasses.dataclass
class SamplingModel:
    """A checkpoint's model, ready to sample, and what turns its samples into images."""

    ckpt: Checkpoint
    spec: ModelSpec
    model: torch.nn.Module  # a DiT (or a video DiT) in eval mode, float32
    vae: torch.nn.Module  # the AutoencoderKL, None in pixel space
    latent_shape: tuple  # (C, H, W) of one sample in the model's space; (C, F, H, W) of a video model's clip
    scaling_factor: float  # what latents were multiplied by before training
    objective: str  # "ddpm" or "flow": what the model predicts
    sampler: Sampler  # --sampler, or the objective's default
    steps: int  # --num-sampling-steps, or the sampler's default


def latent_geometry(spec, vae):
    """
    :param vae: the loaded AutoencoderKL, or None for pixel space.
    :return: (in_channels, input_size) of the model's inputs.
    :raises CheckpointError: when the checkpoint's model does not fit the autoencoder.
    """
    channels = 3 if vae is None else vae.config.latent_channels
    down = downsampling_factor(vae)
    if spec.in_channels is not None and spec.in_channels != channels:
        raise CheckpointError(f"the checkpoint's model takes {spec.in_channels}-channel inputs but --vae "
                              f"{spec.vae} gives {channels} channels")
    if spec.input_size is not None:
        return channels, spec.input_size
    if spec.image_size % down:
        raise CheckpointError(f"--image-size {spec.image_size} is not divisible by the autoencoder's factor {down}")
    return channels, spec.image_size // down


def choose_sampler(ckpt, sampler=None, steps=None):
    """
    The sampler for a checkpoint's objective: `sampler` if it fits, else the objective's default. A
    plain state_dict does not record its objective: it is taken as DDPM unless a flow sampler is asked for.

    :param sampler: a Sampler, its value or None; steps: the step count, or None for the sampler's default.
    :return: (objective name, Sampler, steps).
    :raises SamplingError: the sampler is for the other objective (the message names both), or too few steps.
    """
    sampler = None if sampler is None else Sampler(sampler)
    objective = ckpt.objective["objective"]
    if not ckpt.objective_recorded and sampler in OBJECTIVE_SAMPLERS["flow"]:
        objective = "flow"
    fitting = OBJECTIVE_SAMPLERS[objective]
    if sampler is None:
        sampler = fitting[0]
    elif sampler not in fitting:
        names = {"ddpm": "DDPM", "flow": "flow"}
        other = names["flow" if objective == "ddpm" else "ddpm"]
        hint = " (SiT's released weights: --ckpt SiT-XL-2-256x256.pt)" if objective == "ddpm" else ""
        raise SamplingError(f"{ckpt.path} holds a {names[objective]} model; --sampler {sampler.value} is for {other} "
                            f"models: use {', '.join(s.value for s in fitting)}{hint}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if objective == "flow" and steps < 2:
        raise SamplingError(f"--sampler {sampler.value} needs --num-sampling-steps >= 2 (times from 0 to 1), got {steps}")
    return objective, sampler, steps


def load_model(args, device, default_vae, first=contextlib.nullcontext):
    """
    The model the sampling flags ask for: --ckpt (default: the released DiT-XL/2 checkpoint for
    --image-size), reconciled with --model, --image-size, --vae and --num-classes, the autoencoder,
    the strictly loaded EMA weights, and the sampler for the checkpoint's objective (--sampler,
    --num-sampling-steps). `args` is left as it is: the file used is the result's ckpt.path.

    :param default_vae: the autoencoder when neither the flag nor the checkpoint names one.
    :param first: a context manager under which the downloads happen (one process first, the rest
                  wait: accelerate's main_process_first).
    :return: a SamplingModel.
    :raises CheckpointError, DownloadError, VAEError, SamplingError.
    """
    source = args.ckpt
    if source is None:
        if args.model not in (None, "DiT-XL/2"):
            raise CheckpointError(f"only DiT-XL/2 has released checkpoints: --model {args.model} needs --ckpt")
        size = args.image_size or 256
        source = f"DiT-XL-2-{size}x{size}.pt"
        if source not in RELEASED_CHECKPOINTS:
            raise CheckpointError(f"DiT-XL/2 was released for 256 and 512 pixels, not {size}: pass --ckpt")
    with first():
        ckpt = load_checkpoint(source)
        spec = resolve_spec(ckpt, args.model, args.image_size, args.vae, args.num_classes, default_vae=default_vae)
        objective, sampler, steps = choose_sampler(ckpt, args.sampler, args.num_sampling_steps)
        vae = load_vae(spec.vae, device)
    channels, size = latent_geometry(spec, vae)
    model = build_model(spec, ckpt, channels, size, device)
    scale = spec.scaling_factor if spec.scaling_factor is not None else scaling_factor(vae)
    shape = (channels, size, size) if spec.num_frames is None else (channels, spec.num_frames, size, size)
    return SamplingModel(ckpt, spec, model, vae, shape, scale, objective, sampler, steps)


#################################################################################
#                            Per-image random streams                           #
#################################################################################

# Each image (or video) has its own generators keyed on (seed, index, stream), so what image i looks
# like depends neither on the batch it is drawn in nor on the number of processes. They live on the
# CPU: the same seed gives the same noise on every device.
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
    """The Gaussian noise of a batch of images or videos: the starting noise, then the per-step noise."""

    def __init__(self, seed, indices, shape, device):
        """:param shape: (C, H, W) of one image's sample, (C, F, H, W) of one video's."""
        self.gens = _generators(seed, indices, _NOISE_STREAM)
        self.shape, self.device = shape, device

    def __call__(self):
        """:return: [N x *shape] the next standard normal draw of each image's (or video's) stream."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


#################################################################################
#                                    Sampling                                   #
#################################################################################


def add_sampling_args(parser, cfg_scale, vae):
    """The flags sample.py and sample_ddp.py share. :param cfg_scale, vae: the script's defaults
    (DiT's sample.py decodes with mse, its sample_ddp.py, for FID, with ema)."""
    parser.add_argument("--model", choices=list(MODELS), default=None,
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
    parser.add_argument("--sampler", choices=[s.value for s in Sampler], default=None,
                        help="for DDPM models: ddpm (DiT's), ddim (eta 0) or dpm-solver (DPM-Solver++ 2M); for flow "
                             "models (SiT's objective): sde (SiT's Euler-Maruyama), euler or heun (the ODE). "
                             "Default: the checkpoint's objective's first (ddpm, sde)")
    parser.add_argument("--num-sampling-steps", type=int, default=None,
                        help="ddpm, ddim, dpm-solver, sde: model evaluations per image (doubled batch under "
                             "guidance); euler, heun: times on SiT's grid from 0 to 1, so N - 1 steps of 1 (euler) "
                             "or 2 (heun) evaluations. Default: "
                             + ", ".join(f"{s.value} {n}" for s, n in DEFAULT_STEPS.items()))
    parser.add_argument("--solver-spacing", choices=[s.value for s in Spacing], default=Spacing.LOGSNR.value,
                        help="dpm-solver's time grid: logsnr (uniform in log-SNR; the more accurate at 20 steps "
                             "or more) or time (uniform in the timestep; at 10 steps or fewer); measured in "
                             "diffusion/dpm_solver.py")
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale, help="classifier-free guidance; 1 = none")
    parser.add_argument("--guidance", choices=[g.value for g in Guidance], default=Guidance.DIT.value,
                        help="dit: guide the first 3 latent channels as DiT's code (and its FIDs) does; "
                             "all: every channel")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"), default=None,
                        help="guide only at times T_LO <= t <= T_HI: timesteps of the 1000-step process for "
                             "DDPM models (999 is noise), the flow's t in [0, 1] for flow models (0 is noise)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ GPUs (faster; DiT's sample_ddp.py default)")


def check_sampling_args(parser, args):
    """Impossible settings end in parser.error (the sampler and its steps are settled with the checkpoint:
    choose_sampler)."""
    steps = args.num_sampling_steps
    if steps is not None and not 1 <= steps <= 1000:
        parser.error(f"--num-sampling-steps must be in 1..1000, got {steps}")
    if args.sampler == Sampler.DDIM.value and steps is not None:
        try:
            space_timesteps(1000, f"ddim{steps}")  # raises if no integer stride gives that count
        except ValueError as e:
            parser.error(str(e))
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        parser.error(f"--guidance-interval {args.guidance_interval}: T_LO must not exceed T_HI")


@torch.no_grad()
def sample_latents(model, noise, y, sampler, steps, cfg_scale=1.0, guidance=Guidance.DIT, interval=None,
                   progress=False, spacing=Spacing.LOGSNR):
    """
    Draw samples in the model's space (latents or pixels).

    :param model: a DiT in eval mode, or a video DiT (then every [N x C x H x W] here is [N x C x F x H x W]).
    :param noise: a callable returning [N x C x H x W] standard normal noise, usually an ImageNoise:
                  its first draw is the starting noise; DDPM and the SDE draw their per-step noise from
                  it too, so with an ImageNoise every image depends on its own stream only.
    :param y: [N] int64 class labels on the model's device, or None for an unconditional model.
    :param sampler: a Sampler (or its value) that fits the model's objective; steps: as --num-sampling-steps.
    :param cfg_scale: guidance scale; 1 samples without guidance (a plain conditional pass).
    :param guidance: a Guidance: which channels are guided. interval: (t_lo, t_hi) or None.
    :param spacing: a Spacing (or its value): the dpm-solver's time grid; other samplers ignore it.
    :return: [N x C x H x W] samples.
    """
    sampler = Sampler(sampler)
    n = len(y)
    z = noise()
    if cfg_scale != 1.0:
        if model.y_embedder.dropout_prob == 0:
            raise SamplingError("this model was trained without label dropout, so it has no null class for "
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
    elif sampler is Sampler.DPM_SOLVER:
        alphas_cumprod = create_diffusion("", learn_sigma=learn_sigma).alphas_cumprod
        solver = DPMSolver(alphas_cumprod, solver_timesteps(alphas_cumprod, steps, spacing))
        x = solver.sample(model_fn, z, model_kwargs=kwargs, progress=progress)
    elif sampler is Sampler.SDE:
        def step_noise():  # each image's next draw, repeated over the null-label half under guidance
            return torch.cat([noise()] * (len(z) // n), dim=0)

        x = FlowMatching().sample_sde(model_fn, z, step_noise, steps, model_kwargs=kwargs, progress=progress)
    else:
        x = FlowMatching().sample_ode(model_fn, z, steps, ODESolver(sampler.value), model_kwargs=kwargs,
                                      progress=progress)
    return x[:n]


def to_uint8(images):
    """
    :param images: [N x 3 x H x W] in [-1, 1], or videos [N x 3 x F x H x W].
    :return: [N x H x W x 3] uint8 numpy (DiT's rounding), or [N x F x H x W x 3].
    """
    channels_last = (0, 2, 3, 1) if images.dim() == 4 else (0, 2, 3, 4, 1)
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(*channels_last).to("cpu", torch.uint8).numpy()
