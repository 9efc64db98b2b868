"""
Sample a grid of images from a DiT and save it as a PNG, or a grid of videos from a video DiT as a GIF or mp4.

    python sample.py                                   # released DiT-XL/2 256x256, cfg 4.0, 250 DDPM steps, mse
    python sample.py --image-size 512 --seed 1
    python sample.py --sampler dpm-solver --num-sampling-steps 20
    python sample.py --ckpt results/000-DiT-S-2/checkpoints/0100000.pt --class-labels 0 1 2 3
    python sample.py --ckpt SiT-XL-2-256x256.pt                 # SiT's released weights, 250 SDE steps
    python sample.py --ckpt SiT-XL-2-256x256.pt --sampler heun --num-sampling-steps 50
    python sample.py --ckpt results/000-VDiT-S-2/checkpoints/0100000.pt --class-labels 0 1 2 3 --output grid.mp4

With no --ckpt the released DiT-XL/2 weights for --image-size are downloaded into pretrained_models/
(once) and the autoencoder comes from the Hugging Face hub (or its local cache). A train.py
checkpoint brings its own model, image size, autoencoder and objective: DDPM checkpoints sample
with ddpm, flow ones (train.py --objective flow, SiT's) with sde unless --sampler says otherwise.
Runs on a GPU if there is one, else on the CPU (slowly for DiT-XL/2: use --sampler dpm-solver there).
A video checkpoint (train.py on a video store) samples clips and writes an animated grid: each frame
of the grid holds that frame of every video; --output's extension picks GIF (PIL) or mp4 (PyAV, H.264).
"""
import argparse
import os
from fractions import Fraction

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from files import run_script
from sampling import (ImageNoise, SamplingError, add_sampling_args, check_sampling_args, load_model, sample_latents,
                      to_uint8)
from vae import decode

VIDEO_EXTENSIONS = (".gif", ".mp4")  # what an animated grid is written as


def animated_grid(videos, nrow):
    """
    :param videos: [N x 3 x F x H x W] in [-1, 1].
    :return: [F x H' x W' x 3] uint8: frame f is the grid (torchvision's make_grid) of every video's frame f.
    """
    frames = [make_grid(videos[:, :, f], nrow=nrow, value_range=(-1, 1)) for f in range(videos.shape[2])]
    return to_uint8(torch.stack(frames))  # (F, H', W', 3)


def save_animation(frames, path, fps):
    """
    Write [F x H x W x 3] uint8 frames as an animated GIF (PIL, looping) or an H.264 mp4 (PyAV), by
    path's extension. :raises SamplingError: PyAV cannot write mp4 here.
    """
    if path.lower().endswith(".gif"):
        first, *rest = [Image.fromarray(frame) for frame in frames]
        first.save(path, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
        return
    try:
        import av
    except ImportError as e:
        raise SamplingError(f"writing {path} needs PyAV (pip install av); or write a .gif") from e
    # H.264's 4:2:0 colour needs even sides: the grid is padded with black at the right and bottom.
    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    padded = np.zeros((len(frames), height, width, 3), np.uint8)
    padded[:, :frames.shape[1], :frames.shape[2]] = frames
    try:
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame in padded:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder
    except av.FFmpegError as e:  # e.g. an FFmpeg built without libx264
        raise SamplingError(f"PyAV cannot write {path} ({e}); write a .gif instead") from e


@torch.no_grad()  # and the caller's grad mode is left as it was (tests call main in-process)
def main(args):
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = "cuda" if torch.cuda.is_available() else "cpu"

    loaded = load_model(args, device, default_vae="mse")
    spec = loaded.spec
    bad = [c for c in args.class_labels if c >= spec.num_classes]
    if bad:
        raise SamplingError(f"--class-labels {bad} are outside the model's {spec.num_classes} classes (0 to "
                            f"{spec.num_classes - 1})")
    video = spec.num_frames is not None
    output = args.output or ("sample.gif" if video else "sample.png")
    if video != output.lower().endswith(VIDEO_EXTENSIONS):
        raise SamplingError(f"--output {output}: {spec.model} samples "
                            + (f"videos, written as {' or '.join(VIDEO_EXTENSIONS)}" if video else
                               "images, written as .png or .jpg"))

    # Image i's noise comes from (seed, i) alone: the same as image i of sample_ddp.py with this seed.
    n = len(args.class_labels)
    noise = ImageNoise(args.seed, range(n), loaded.latent_shape, device)
    y = torch.tensor(args.class_labels, device=device)
    samples = sample_latents(loaded.model, noise, y, loaded.sampler, loaded.steps, args.cfg_scale,
                             args.guidance, args.guidance_interval, progress=True, spacing=args.solver_spacing)
    images = decode(loaded.vae, samples, loaded.scaling_factor)  # (N, 3, H, W), or (N, 3, F, H, W)
    if video:
        save_animation(animated_grid(images, args.nrow), output, args.fps)
    else:
        save_image(images, output, nrow=args.nrow, normalize=True, value_range=(-1, 1))
    frames = f"{spec.num_frames} frames of " if video else ""
    print(f"saved {n} samples of {spec.model} ({frames}{spec.image_size}x{spec.image_size}, {loaded.objective}, "
          f"{loaded.sampler.value}, {loaded.steps} steps, cfg {args.cfg_scale}) to {output}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    add_sampling_args(parser, cfg_scale=4.0, vae="mse")
    parser.add_argument("--class-labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                        help="one image per label (DiT's sample.py classes by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="the grid's file; its extension picks the format: .png, .jpg, ... for images, .gif or "
                             ".mp4 for videos (default sample.png, sample.gif)")
    parser.add_argument("--nrow", type=int, default=4, help="images per row of the grid")
    parser.add_argument("--fps", type=float, default=8.0, help="frames per second of an animated grid")
    args = parser.parse_args(argv)
    check_sampling_args(parser, args)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if min(args.class_labels) < 0:
        parser.error(f"--class-labels must be >= 0, got {min(args.class_labels)}")
    if args.nrow < 1 or not args.fps > 0:
        parser.error("--nrow must be >= 1, --fps > 0")
    # Checked now, not after the whole sampling run.
    if args.output is not None:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            parser.error(f"--output {args.output}: the folder {folder} does not exist")
        extension = os.path.splitext(args.output)[1].lower()
        if extension not in VIDEO_EXTENSIONS and Image.registered_extensions().get(extension) not in Image.SAVE:
            parser.error(f"--output {args.output}: unknown extension {extension or '(none)'!r}; use .png or .jpg "
                         f"for images, {' or '.join(VIDEO_EXTENSIONS)} for videos")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
