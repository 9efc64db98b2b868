"""
Sample a grid of images from a DiT and save it as a PNG.

    python sample.py                                   # released DiT-XL/2 256x256, cfg 4.0, 250 DDPM steps, mse
    python sample.py --image-size 512 --seed 1
    python sample.py --sampler dpm-solver --num-sampling-steps 20
    python sample.py --ckpt results/000-DiT-S-2/checkpoints/0100000.pt --class-labels 0 1 2 3
    python sample.py --ckpt SiT-XL-2-256x256.pt                 # SiT's released weights, 250 SDE steps
    python sample.py --ckpt SiT-XL-2-256x256.pt --sampler heun --num-sampling-steps 50

With no --ckpt the released DiT-XL/2 weights for --image-size are downloaded into pretrained_models/
(once) and the autoencoder comes from the Hugging Face hub (or its local cache). A train.py
checkpoint brings its own model, image size, autoencoder and objective: DDPM checkpoints sample
with ddpm, flow ones (train.py --objective flow, SiT's) with sde unless --sampler says otherwise.
Runs on a GPU if there is one, else on the CPU (slowly for DiT-XL/2: use --sampler dpm-solver there).
"""
import argparse
import os

import torch
from PIL import Image
from torchvision.utils import save_image

from files import run_script
from sampling import ImageNoise, SamplingError, add_sampling_args, check_sampling_args, load_model, sample_latents
from vae import decode


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

    # Image i's noise comes from (seed, i) alone: the same as image i of sample_ddp.py with this seed.
    n = len(args.class_labels)
    noise = ImageNoise(args.seed, range(n), loaded.latent_shape, device)
    y = torch.tensor(args.class_labels, device=device)
    samples = sample_latents(loaded.model, noise, y, loaded.sampler, loaded.steps, args.cfg_scale,
                             args.guidance, args.guidance_interval, progress=True, spacing=args.solver_spacing)
    images = decode(loaded.vae, samples, loaded.scaling_factor)
    save_image(images, args.output, nrow=args.nrow, normalize=True, value_range=(-1, 1))
    print(f"saved {n} samples of {spec.model} ({spec.image_size}x{spec.image_size}, {loaded.objective}, "
          f"{loaded.sampler.value}, {loaded.steps} steps, cfg {args.cfg_scale}) to {args.output}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    add_sampling_args(parser, cfg_scale=4.0, vae="mse")
    parser.add_argument("--class-labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                        help="one image per label (DiT's sample.py classes by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="sample.png", help="the grid's file; its extension picks the format")
    parser.add_argument("--nrow", type=int, default=4, help="images per row of the grid")
    args = parser.parse_args(argv)
    check_sampling_args(parser, args)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if min(args.class_labels) < 0:
        parser.error(f"--class-labels must be >= 0, got {min(args.class_labels)}")
    if args.nrow < 1:
        parser.error("--nrow must be >= 1")
    # Checked now, not after the whole sampling run.
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        parser.error(f"--output {args.output}: the folder {folder} does not exist")
    extension = os.path.splitext(args.output)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:  # what save_image can write
        parser.error(f"--output {args.output}: unknown image extension {extension or '(none)'!r}; use .png or .jpg")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
