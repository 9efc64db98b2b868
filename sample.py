"""
Sample a grid of images from a DiT and save it as a PNG.

    python sample.py                                   # released DiT-XL/2 256x256, cfg 4.0, 250 DDPM steps, mse
    python sample.py --image-size 512 --seed 1
    python sample.py --sampler dpm-solver --num-sampling-steps 20
    python sample.py --ckpt results/000-DiT-S-2/checkpoints/0100000.pt --class-labels 0 1 2 3

With no --ckpt the released DiT-XL/2 weights for --image-size are downloaded into pretrained_models/
(once) and the autoencoder comes from the Hugging Face hub (or its local cache). A train.py
checkpoint brings its own model, image size and autoencoder. Runs on a GPU if there is one, else
on the CPU (slowly for DiT-XL/2: use --sampler dpm-solver there).
"""
import argparse

import torch
from torchvision.utils import save_image

from sampling import (CheckpointError, ImageNoise, add_sampling_args, build_model, latent_geometry,
                      load_checkpoint, resolve_spec, run_script, sample_latents)
from vae import decode, load_vae, scaling_factor


def main(args):
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.ckpt is None:
        if args.model not in (None, "DiT-XL/2"):
            raise CheckpointError(f"only DiT-XL/2 has released checkpoints: --model {args.model} needs --ckpt")
        args.ckpt = f"DiT-XL-2-{args.image_size or 256}x{args.image_size or 256}.pt"
    ckpt = load_checkpoint(args.ckpt)
    spec = resolve_spec(ckpt, args.model, args.image_size, args.vae, args.num_classes, default_vae="mse")
    vae = load_vae(spec.vae, device)
    model = build_model(spec, ckpt, vae, device)
    bad = [c for c in args.class_labels if not 0 <= c < spec.num_classes]
    if bad:
        raise CheckpointError(f"--class-labels {bad} are outside the model's {spec.num_classes} classes")

    # Image i's noise comes from (seed, i) alone: the same as image i of sample_ddp.py with this seed.
    n = len(args.class_labels)
    channels, size = latent_geometry(spec, vae)
    noise = ImageNoise(args.seed, range(n), (channels, size, size), device)
    y = torch.tensor(args.class_labels, device=device)
    samples = sample_latents(model, noise, y, args.sampler, args.num_sampling_steps, args.cfg_scale,
                             args.guidance, args.guidance_interval, progress=True)
    scale = spec.scaling_factor if spec.scaling_factor is not None else scaling_factor(vae)
    images = decode(vae, samples, scale)
    save_image(images, args.output, nrow=args.nrow, normalize=True, value_range=(-1, 1))
    print(f"saved {n} samples of {spec.model} ({spec.image_size}x{spec.image_size}, {args.sampler}, "
          f"{args.num_sampling_steps} steps, cfg {args.cfg_scale}) to {args.output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    add_sampling_args(parser, cfg_scale=4.0, vae="mse")
    parser.add_argument("--class-labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                        help="one image per label (DiT's sample.py classes by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="sample.png")
    parser.add_argument("--nrow", type=int, default=4, help="images per row of the grid")
    args = parser.parse_args()
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.nrow < 1:
        parser.error("--nrow must be >= 1")
    run_script(parser, args, main)
