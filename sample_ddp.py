"""
Sample many images in parallel for FID/IS/precision/recall with ADM's evaluation suite.

    torchrun --nproc_per_node=8 sample_ddp.py --model DiT-XL/2 --num-fid-samples 50000
    accelerate launch --num_processes 8 sample_ddp.py --sampler dpm-solver --num-sampling-steps 20
    accelerate launch --cpu --num_processes 2 sample_ddp.py --ckpt <train.py checkpoint> --num-fid-samples 100
    python sample_ddp.py --ckpt results/000-DiT-S-2/checkpoints/0100000.pt --num-fid-samples 1000
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt SiT-XL-2-256x256.pt          # SiT's FID setting: 250 SDE steps
    torchrun --nproc_per_node=2 sample_ddp.py --ckpt results/000-VDiT-S-2/checkpoints/0100000.pt --num-fid-samples 2048
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt results/000-VDiT-XL-2/checkpoints/0100000.pt --sequence-parallel 4

Defaults are DiT's FID settings (released DiT-XL/2 256x256, ema autoencoder, cfg 1.5, 250 DDPM steps); a
flow checkpoint (train.py --objective flow, SiT's) samples with its own default, 250 SDE steps. Each image
is written as <sample-dir>/<run name>/NNNNNN.png, then all are packed into <run name>.npz: `arr_0`
(uint8, N x H x W x 3, what ADM's evaluator reads) and `labels` (int64, N). Image i has its own
noise and class label drawn from (--global-seed, i), so the images depend neither on the number of
processes nor on the batch size. A killed run, rerun with the same command, keeps the finished PNGs
and samples the rest. NCCL on GPUs, gloo on CPUs. A video checkpoint samples clips the same way: each
video i is kept as NNNNNN.png, its F frames stacked top to bottom (written atomically like an image), and
the .npz's `arr_0` is N x F x H x W x 3 uint8. With --sequence-parallel N, each group of N consecutive
processes samples one batch together, every image's tokens split over the group (sequence.py); the group's first
process writes the images, the same images as one process makes.
"""
import argparse
import json
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

import sequence
from checkpoints import weights_digest
from files import atomic_write, run_script, sweep_temp_files
from sampling import (ImageNoise, Sampler, SamplingError, add_sampling_args, check_sampling_args, load_model,
                      random_labels, sample_latents, to_uint8)
from vae import decode


def run_name(args, loaded):
    """A folder name showing the settings that change the pixels (all of them are in settings.json).
    :param loaded: the SamplingModel the flags gave."""
    spec = loaded.spec
    ckpt = os.path.splitext(os.path.basename(loaded.ckpt.path))[0]
    vae = os.path.basename(os.path.normpath(spec.vae))
    # The sampler names the objective too: ddpm, ddim and dpm-solver are DDPM's, euler, heun and sde flow's.
    name = (f"{spec.model.replace('/', '-')}-{ckpt}-size-{spec.image_size}-vae-{vae}-cfg-{args.cfg_scale}"
            f"-{loaded.sampler.value}-{loaded.steps}-seed-{args.global_seed}")
    if loaded.sampler is Sampler.DPM_SOLVER and args.solver_spacing != "logsnr":
        name += f"-spacing-{args.solver_spacing}"
    if args.cfg_scale != 1.0 and args.guidance != "dit":
        name += f"-guidance-{args.guidance}"
    if args.cfg_scale != 1.0 and args.guidance_interval is not None:
        name += "-interval-{:g}-{:g}".format(*args.guidance_interval)
    return name


def write_npz(path, png_paths, labels, frames=None):
    """
    Pack the PNGs into an .npz one image at a time (50k 512x512 images are 39 GB as one array):
    `arr_0` [N x H x W x 3] uint8 and `labels` [N] int64, written to a temporary file then renamed.
    With `frames`, each PNG is a video's frames stacked top to bottom and `arr_0` is [N x frames x H x W x 3].
    """
    first = np.asarray(Image.open(png_paths[0]))
    shape = first.shape if frames is None else (frames, first.shape[0] // frames, *first.shape[1:])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(png_paths), *shape)}
    with atomic_write(path) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for p in png_paths:
                image = np.asarray(Image.open(p))
                assert image.shape == first.shape and image.dtype == np.uint8, (p, image.shape, image.dtype)
                f.write(image.tobytes())
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))


@torch.no_grad()  # and the caller's grad mode is left as it was (tests call main in-process)
def main(args):
    state = PartialState(cpu=not torch.cuda.is_available())
    device, rank, world = state.device, state.process_index, state.num_processes
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32

    loaded = load_model(args, device, default_vae="ema", first=state.main_process_first)
    spec = loaded.spec
    video = spec.num_frames is not None
    n = args.sequence_parallel
    if n > 1:
        sequence.check(n, world, loaded.model, spec.model)
        loaded.model.set_sequence_parallel(sequence.SequenceParallel(n))
    replica, replicas = rank // n, world // n  # the groups of n processes share the images
    writer = rank % n == 0  # a group's first process writes its images

    # The run folder is keyed on the settings and on the weights' content, not on the file's path: a
    # checkpoint replaced under the same name must not add its images to another's.
    folder = os.path.join(args.sample_dir, run_name(args, loaded))
    settings = dict(ckpt=os.path.abspath(loaded.ckpt.path), weights_sha256=weights_digest(loaded.ckpt.state_dict),
                    model=spec.model, image_size=spec.image_size, vae=spec.vae, num_classes=spec.num_classes,
                    scaling_factor=loaded.scaling_factor, objective=loaded.objective, sampler=loaded.sampler.value,
                    num_sampling_steps=loaded.steps, cfg_scale=args.cfg_scale, guidance=args.guidance,
                    guidance_interval=args.guidance_interval, global_seed=args.global_seed,
                    solver_spacing=args.solver_spacing if loaded.sampler is Sampler.DPM_SOLVER else None)
    settings_path = os.path.join(folder, "settings.json")
    if state.is_main_process:
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(settings_path):
            with atomic_write(settings_path, "w") as f:
                json.dump(settings, f, indent=2)
        sweep_temp_files(folder)  # half-written images of a killed run
    state.wait_for_everyone()
    with open(settings_path) as f:
        previous = json.load(f)
    previous.setdefault("objective", "ddpm")  # folders written before flow models were all DDPM
    if previous != json.loads(json.dumps(settings)):
        changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
        if "weights_sha256" in changed:
            raise SamplingError(f"{folder} holds samples of other weights (sha256 {previous.get('weights_sha256')}, "
                                  f"from {previous.get('ckpt')}) than {loaded.ckpt.path} (sha256 "
                                  f"{settings['weights_sha256']}); use another --sample-dir or remove {folder}")
        raise SamplingError(f"{folder} holds samples made with other settings ({', '.join(changed)}); "
                              f"use another --sample-dir or remove it")

    def png(i):
        return os.path.join(folder, f"{i:06d}.png")

    missing = [i for i in range(args.num_fid_samples) if not os.path.exists(png(i))]
    state.wait_for_everyone()  # everyone has listed the folder before anyone adds to it
    mine = missing[replica::replicas]
    iterations = math.ceil(math.ceil(len(missing) / replicas) / args.per_proc_batch_size)
    if state.is_main_process:
        print(f"{args.num_fid_samples - len(missing)} of {args.num_fid_samples} images already in {folder}; "
              f"sampling {len(missing)} on {world} process(es)" + (f" in {replicas} groups of {n}" if n > 1 else ""))
    start = time.time()
    # Closed on an error too, so that the error starts a line of its own.
    with tqdm(total=len(missing), unit="img", disable=not state.is_main_process) as bar:
        for k in range(iterations):  # the same count on every rank, for the collective below
            batch = mine[k * args.per_proc_batch_size:(k + 1) * args.per_proc_batch_size]
            if batch:
                y = random_labels(args.global_seed, batch, spec.num_classes).to(device)
                noise = ImageNoise(args.global_seed, batch, loaded.latent_shape, device)
                samples = sample_latents(loaded.model, noise, y, loaded.sampler, loaded.steps, args.cfg_scale,
                                         args.guidance, args.guidance_interval, spacing=args.solver_spacing)
            if batch and writer:
                for i, image in zip(batch, to_uint8(decode(loaded.vae, samples, loaded.scaling_factor))):
                    if video:
                        image = image.reshape(-1, *image.shape[2:])  # (F, H, W, 3) -> (F * H, W, 3): a strip
                    with atomic_write(png(i)) as f:  # a PNG under its final name is always complete
                        Image.fromarray(image).save(f, format="PNG")
            done = torch.tensor(len(batch) if writer else 0, device=device)
            if world > 1:
                dist.all_reduce(done)
            bar.update(int(done))
    state.wait_for_everyone()

    if state.is_main_process:
        seconds = time.time() - start
        if missing:
            print(f"sampled {len(missing)} images in {seconds:.1f} s: {len(missing) / seconds:.2f} images/s")
        npz = folder + ".npz"
        labels = random_labels(args.global_seed, range(args.num_fid_samples), spec.num_classes)
        write_npz(npz, [png(i) for i in range(args.num_fid_samples)], labels.numpy(), spec.num_frames)
        frames = f"{spec.num_frames}x" if video else ""
        print(f"wrote {npz}: arr_0 {args.num_fid_samples}x{frames}{spec.image_size}x{spec.image_size}x3 uint8, labels")
    state.wait_for_everyone()
    state.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    add_sampling_args(parser, cfg_scale=1.5, vae="ema")
    parser.add_argument("--sample-dir", default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32,
                        help="images a process samples at a time (a group's, with --sequence-parallel)")
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--sequence-parallel", type=int, default=1,
                        help="split each image's tokens (a frame's, for video) over this many consecutive processes "
                             "(DeepSpeed-Ulysses attention; needs pip install deepspeed)")
    args = parser.parse_args(argv)
    check_sampling_args(parser, args)
    if args.global_seed < 0 or args.per_proc_batch_size < 1 or args.num_fid_samples < 1 or args.sequence_parallel < 1:
        parser.error("--global-seed must be >= 0, --per-proc-batch-size, --num-fid-samples and --sequence-parallel >= 1")
    if os.path.exists(args.sample_dir) and not os.path.isdir(args.sample_dir):
        parser.error(f"--sample-dir {args.sample_dir} is a file, not a folder")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
