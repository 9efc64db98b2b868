"""
The image autoencoder DiT works in, and ADM's image preprocessing.

DiT trains in the latent space of Stable Diffusion's fine-tuned KL autoencoders
(stabilityai/sd-vae-ft-ema and -mse, 8x downsampling, 4 channels) loaded through diffusers'
AutoencoderKL. `--vae none` everywhere means pixel space: no autoencoder, images in [-1, 1].

    from vae import load_vae, scaling_factor, downsampling_factor, decode, center_crop_arr
    vae = load_vae("ema", device="cuda")          # or a hub id, a save_pretrained folder, "none"
    latent_size = 256 // downsampling_factor(vae)  # 32
    images = decode(vae, z, scaling_factor(vae))  # [N, 3, H, W] in [-1, 1]
"""
import os

import numpy as np
import torch
from PIL import Image

from files import UserError

VAE_PRESETS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class VAEError(UserError, ValueError):
    """The requested autoencoder cannot be loaded (unknown name, no network and not cached, ...)."""


def load_vae(spec, device="cpu"):
    """
    Load an autoencoder for encoding images to latents and back.

    :param spec: "none" (pixel space), a preset name from VAE_PRESETS ("ema", "mse"), a Hugging Face
                 hub id, or a local folder written by AutoencoderKL.save_pretrained.
    :param device: where to put it.
    :return: a diffusers AutoencoderKL in eval mode with gradients off, or None for "none".
    :raises VAEError: when it cannot be loaded (for hub ids: not in the local cache and no network).
    """
    if spec == "none":
        return None
    from diffusers import AutoencoderKL  # imported here so pixel-space runs do not pay for it

    name = VAE_PRESETS.get(spec, spec)
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise VAEError(f"{spec!r} is a folder but has no config.json: not a save_pretrained autoencoder")
    try:
        # The local cache first: no network round trips (and their retries) when it is there.
        vae = AutoencoderKL.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:  # hub errors are OSError subclasses; bad configs ValueError
        vae, error = None, e
    if vae is None and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "false", "no", ""):
        try:
            vae = AutoencoderKL.from_pretrained(name)
        except (OSError, ValueError) as e:
            error = e
    if vae is None:
        raise VAEError(
            f"cannot load the autoencoder {spec!r} ({name}): {error}\n"
            f"Use --vae none, a local folder made with save_pretrained, or download {name} into "
            f"the Hugging Face cache on a machine with network access first."
        ) from error
    return vae.to(device).eval().requires_grad_(False)


def scaling_factor(vae):
    """The factor that brings the autoencoder's latents to roughly unit variance (0.18215 for the SD
    autoencoders, from their own config); 1.0 in pixel space (vae None)."""
    return 1.0 if vae is None else float(vae.config.scaling_factor)


def downsampling_factor(vae):
    """Pixels per latent along each side: 2 per down block after the first (8 for the SD
    autoencoders); 1 in pixel space (vae None)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae, z, scaling_factor):
    """
    Turn model-space samples into images.

    :param vae: an AutoencoderKL, or None for pixel space.
    :param z: [N x C x h x w] samples in the model's space (latents already multiplied by
              scaling_factor, or pixels in [-1, 1]), or videos [N x C x F x h x w].
    :param scaling_factor: the factor z was multiplied by (the store's meta["scaling_factor"]).
    :return: [N x 3 x H x W] images clamped to [-1, 1], or videos [N x 3 x F x H x W], decoded a frame
             at a time (the image autoencoder knows no time; one frame of N videos bounds the memory).
    """
    if vae is None:
        return z.clamp(-1, 1)
    if z.dim() == 5:
        return torch.stack([decode(vae, z[:, :, f], scaling_factor) for f in range(z.shape[2])], dim=2)
    param = next(vae.parameters())
    x = vae.decode(z.to(param.device, param.dtype) / scaling_factor).sample
    return x.float().clamp(-1, 1)


def center_crop_arr(pil_image, image_size):
    """
    ADM's (guided-diffusion) center crop, used by DiT: halve the image with a box filter while its
    short side is at least twice image_size (cheap and alias-free), then resize with bicubic so the
    short side equals image_size, then cut the centered image_size square.

    :param pil_image: a PIL image (already RGB for training use).
    :param image_size: side of the square output, in pixels.
    :return: a PIL image of size (image_size, image_size).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])
