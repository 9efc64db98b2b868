"""
Train a DiT on a latent store written by extract_features.py.

    python train.py --model DiT-S/2 --features-path features/imagenet256 --max-steps 400000
    torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --features-path features/imagenet256
    accelerate launch --multi_gpu --num_processes 8 train.py --model DiT-XL/2 --features-path features/imagenet256
    accelerate launch --config_file configs/multinode_ddp.yaml --machine_rank R train.py --model DiT-XL/2 --features-path features/imagenet256
    accelerate launch --config_file configs/fsdp.yaml train.py --model DiT-XL/2 --features-path features/imagenet256
    python train.py --model DiT-S/2 --features-path features/imagenet256 --resume auto

The model is built to fit the store (latent channels and size, class count); defaults are the
paper's (AdamW at a constant 1e-4 without weight decay, global batch 256, EMA 0.9999, label dropout
0.1, 1000-step linear diffusion with learned sigma). Differences from DiT's and fast-DiT's train.py:
bf16 autocast by default (float32 master weights, optimizer state and EMA), the logged loss is the
true global mean, checkpoints carry everything needed to resume exactly (scheduler, every process's
RNG states, the position in the epoch) and are written atomically, and the same code runs on one CPU,
under torchrun on CPUs (gloo) and on GPUs across nodes (DDP or FSDP through accelerate).

Runs go to `<results-dir>/NNN-<model>/` (log.txt, tracker files, checkpoints/0050000.pt).
"""
import argparse
import glob
import hashlib
import importlib.util
import logging
import os
import random
import re
import sys
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, reduce
from torch.utils.data import DataLoader
from tqdm import tqdm

from diffusion import create_diffusion
from latents import LatentDataset, collate
from models import DiT_models
from checkpoints import CheckpointError, read_checkpoint

# Store metadata that must match for a checkpoint to continue training on a store.
STORE_IDENTITY = ("vae", "scaling_factor", "image_size", "latent_shape", "num_classes", "class_names",
                  "count", "files_sha1")
CKPT_RE = re.compile(r"^(\d{7,})\.pt$")


class TrainError(ValueError):
    """A user error: bad flags, a model that does not fit the store, a checkpoint that does not fit."""


#################################################################################
#                                  Helpers                                      #
#################################################################################


def forward_flops_per_image(model):
    """
    Matmul FLOPs (2 per multiply-add) of one forward pass for one image, counted from the model's
    shapes. Per block and token: qkv 3D^2, attention projection D^2, MLP 2 * 4D^2 (mlp_ratio 4)
    multiply-adds, plus QK^T and AV, 2 T D each; per block and image the adaLN linear (D -> 6D).
    Then the patch embedding, the final layer and its adaLN (D -> 2D), and the timestep MLP
    (256 -> D -> D). Norms, softmax and elementwise work are left out, as in MFU figures.
    Training costs 3x this (the backward is two matmuls per forward matmul); gradient checkpointing
    recomputes the forward, but that extra work is not counted as useful (the usual MFU convention).
    """
    T = (model.input_size // model.patch_size) ** 2
    D = model.pos_embed.shape[-1]
    p2 = model.patch_size ** 2
    hidden = model.blocks[0].mlp.fc1.out_features
    block = T * (4 * D * D + 2 * D * hidden + 2 * T * D) + 6 * D * D
    rest = T * (model.in_channels * p2 * D + D * p2 * model.out_channels) + 2 * D * D \
        + model.t_embedder.frequency_embedding_size * D + D * D
    return 2 * (len(model.blocks) * block + rest)


class EpochBatches(torch.utils.data.Sampler):
    """
    This process's batches of one epoch: global batch s of epoch e is items perm[s*G:(s+1)*G] of a
    permutation drawn from (seed, e), and process r takes its r-th slice of B = G / world items.
    The tail that does not fill a global batch is dropped, as DiT's drop_last. A resumed run
    starts at batch `start` of the epoch; nothing depends on RNG state outside this object.
    """

    def __init__(self, size, global_batch, rank, world, seed):
        self.size, self.global_batch, self.rank, self.world, self.seed = size, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.size // self.global_batch - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        for s in range(self.start, self.size // self.global_batch):
            lo = s * self.global_batch + self.rank * self.local_batch
            yield perm[lo:lo + self.local_batch]


def rng_state():
    """This process's RNG states as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss],
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_tensor(t):
    """A parameter's whole value on the CPU (gathers an FSDP2 shard; every process must call it)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def checkpoint_files(ckpt_dir):
    """{step: path} of the finished checkpoints in ckpt_dir."""
    found = {}
    for path in glob.glob(os.path.join(ckpt_dir, "*.pt")):
        m = CKPT_RE.match(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    return found


def find_experiment(results_dir, model_name):
    """The highest-numbered `NNN-<model>` folder of results_dir that holds a checkpoint, or None."""
    tag = model_name.replace("/", "-")
    runs = sorted(glob.glob(os.path.join(results_dir, f"[0-9][0-9][0-9]-{tag}")))
    runs = [r for r in runs if checkpoint_files(os.path.join(r, "checkpoints"))]
    return runs[-1] if runs else None


def new_experiment(results_dir, model_name):
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*")))
    return os.path.join(results_dir, f"{index:03d}-{model_name.replace('/', '-')}")


def check_compatible(ckpt, path, model_config, meta):
    """Refuse a checkpoint of another model or another store, naming what differs."""
    theirs = ckpt.get("model_config")
    if not isinstance(theirs, dict):
        raise TrainError(f"{path} is not a checkpoint of this train.py (no model_config)")
    diffs = [f"{k}: checkpoint {theirs.get(k)!r}, now {v!r}" for k, v in model_config.items() if theirs.get(k) != v]
    if diffs:
        raise TrainError(f"{path} is a checkpoint of another model ({'; '.join(diffs)})")
    stored = ckpt.get("latents") or {}
    diffs = [f"{k}: checkpoint {stored.get(k)!r}, store {meta.get(k)!r}" for k in STORE_IDENTITY
             if stored.get(k) != meta.get(k)]
    if diffs:
        raise TrainError(f"{path} was trained on another latent store ({'; '.join(diffs)})")


def make_logger(exp_dir, is_main):
    logger = logging.getLogger("train")
    logger.handlers.clear()
    logger.propagate = False
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(exp_dir, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


#################################################################################
#                                  Training                                     #
#################################################################################


def make_optimizer(model, lr, device, fsdp):
    """DiT's AdamW (no weight decay); the fused CUDA kernel where it applies (not on FSDP's DTensors)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0, fused=device.type == "cuda" and not fsdp)


def train_step(accelerator, model, diffusion, opt, scheduler, ema, params, x, y, max_norm, decay):
    """
    One optimisation step on a batch, then the EMA update; no host synchronisation.

    :param x: [B x C x H x W] inputs, y: [B] labels, on the device.
    :param ema: the EMA tensors, in the order of `params` (the unwrapped model's parameters).
    :param max_norm: clip the global gradient norm to this; inf only measures it (gradients x 1).
    :return: (per-sample losses [B], timesteps [B], global gradient norm), detached.
    """
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    losses = diffusion.training_losses(model, x, t, dict(y=y))["loss"]  # (B,) float32
    accelerator.backward(losses.mean())
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    scheduler.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)
    return losses.detach(), t, grad_norm


def main(args):
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise TrainError(f"--report-to {args.report_to} needs the {args.report_to} package: pip install "
                         f"{args.report_to}, or pass --report-to none")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not accelerator.is_fsdp2:
        raise TrainError("FSDP needs fsdp_version: 2 in the accelerate config (see configs/fsdp.yaml)")
    if args.global_batch_size % world:
        raise TrainError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                         f"{world} processes")
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT: faster float32 matmuls on Ampere and later
    torch.backends.cudnn.allow_tf32 = True

    try:
        dataset = LatentDataset(args.features_path, flip=args.flip, seed=args.global_seed)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from e
    meta = dataset.meta
    channels, size = meta["latent_shape"][0], meta["latent_shape"][1]
    model_config = dict(model=args.model, input_size=size, in_channels=channels, num_classes=meta["num_classes"],
                        learn_sigma=True, class_dropout_prob=args.class_dropout_prob)
    patch = int(args.model.rsplit("/", 1)[1])
    if size % patch or meta["latent_shape"][2] != size:
        raise TrainError(f"{args.model} (patch {patch}) does not fit the store's {channels}x{size}x"
                         f"{meta['latent_shape'][2]} latents: the patch must divide the latent size; "
                         f"choose another --model or image size")
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"the store holds {len(dataset)} images, fewer than --global-batch-size "
                         f"{args.global_batch_size}")
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch

    # Where to resume from and where to write.
    resume = None
    if args.resume == "auto":
        exp = find_experiment(args.results_dir, args.model)
        if exp is not None:
            files = checkpoint_files(os.path.join(exp, "checkpoints"))
            resume = files[max(files)]
    elif args.resume:
        if not os.path.isfile(args.resume):
            raise TrainError(f"--resume {args.resume}: no such checkpoint file")
        resume = args.resume
    ckpt = None
    if resume is not None:
        try:
            ckpt = read_checkpoint(resume)
        except CheckpointError as e:
            raise TrainError(str(e)) from e
        check_compatible(ckpt, resume, model_config, meta)
        saved = ckpt["train_config"]["global_batch_size"]
        if saved != args.global_batch_size:
            raise TrainError(f"{resume} was trained with --global-batch-size {saved}; resume with the same")
        exp_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume)))
    else:
        exp_dir = None
        if accelerator.is_main_process:
            exp_dir = new_experiment(args.results_dir, args.model)
            os.makedirs(os.path.join(exp_dir, "checkpoints"), exist_ok=True)
        exp_dir = gather_object([exp_dir])[0]  # the folder rank 0 made, on every process
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    logger = make_logger(exp_dir, accelerator.is_main_process)

    # Each process its own seed (as DiT); restored below when resuming.
    torch.manual_seed(args.global_seed * world + rank)
    np.random.seed((args.global_seed * world + rank) % 2**32)
    random.seed(args.global_seed * world + rank)

    model = DiT_models[args.model](**{k: v for k, v in model_config.items() if k != "model"},
                                   grad_checkpointing=args.grad_checkpointing)
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # EMA below holds parameters only
    flops_per_image = 3 * forward_flops_per_image(model)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if args.compile:
        for block in model.blocks:  # regional compilation: short compile, module names unchanged
            block.compile()
    opt = make_optimizer(model, args.lr, device, fsdp)
    model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)
    names, params = zip(*raw.named_parameters())
    # The EMA is a float32 copy of the parameters, sharded like them under FSDP.
    ema = [p.detach().clone().float() for p in params]
    warmup = max(args.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    step = 0
    if ckpt is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(raw, opt.optimizer, ckpt["opt"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(ckpt["opt"])
        with torch.no_grad():
            for e, p, n in zip(ema, params, names):
                value = ckpt["ema"][n].to(device)
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value, p.device_mesh, p.placements)
                e.copy_(value)
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        states = ckpt["rng_states"]
        if len(states) == world:
            set_rng_state(states[rank])
        else:
            logger.info(f"checkpoint was written by {len(states)} processes, this run has {world}: "
                        f"RNG states are reseeded, so the run is not bit-exact with an uninterrupted one")
            torch.manual_seed(args.global_seed * world + rank + 7919 * step)
    model.train()

    diffusion = create_diffusion(timestep_respacing="")
    sampler = EpochBatches(len(dataset), args.global_batch_size, rank, world, args.global_seed)
    # Its own generator, so creating an iterator never draws from the global RNG (exact resume).
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.global_seed))

    train_config = {k: v for k, v in vars(args).items()}
    if args.report_to != "none":
        accelerator.project_configuration.set_directories(exp_dir)  # tensorboard writes under the run
        accelerator.init_trackers(os.path.basename(exp_dir),
                                  config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                          for k, v in train_config.items()})
    n_params = sum(p.numel() for p in raw.parameters())
    logger.info(f"{args.model}: {n_params / 1e6:.2f}M parameters, {flops_per_image / 1e9:.2f} training GFLOPs per "
                f"image, input {channels}x{size}x{size}, {meta['num_classes']} classes")
    logger.info(f"{len(dataset)} images from {args.features_path}; "
                f"{world} process(es) ({accelerator.distributed_type.value})"
                f" on {device.type}, {args.global_batch_size // world} images per process per step, "
                f"{steps_per_epoch} steps per epoch, {max_steps} steps; mixed precision {args.mixed_precision}")
    logger.info(f"experiment folder {exp_dir}" + (f"; resumed from {resume} at step {step}" if ckpt else ""))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not fsdp:
        logger.info("the accelerate config asks for FSDP, which accelerate runs on GPUs only: "
                    f"training without sharding ({accelerator.distributed_type.value})")

    def save_checkpoint():
        """Every process takes part (FSDP gathers shards); rank 0 writes tmp then renames."""
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            opt_state = get_optimizer_state_dict(raw, opt.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_state = opt.state_dict()
        data = {
            "model": {n: full_tensor(p) for n, p in zip(names, params)},
            "ema": {n: full_tensor(e) for n, e in zip(names, ema)},
            "opt": opt_state,
            "model_config": model_config,
            "latents": meta,
            "step": step,
            "train_config": train_config,
            "scheduler": scheduler.state_dict(),
            "rng_states": gather_object([rng_state()]),
            "epoch": step // steps_per_epoch,
            "epoch_step": step % steps_per_epoch,
            "world_size": world,
        }
        if accelerator.is_main_process:
            path = os.path.join(ckpt_dir, f"{step:07d}.pt")
            tmp = f"{path}.tmp"
            torch.save(data, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a crash before this line leaves the previous checkpoints intact
            kept = sorted(checkpoint_files(ckpt_dir))
            for s in kept[:-args.ckpt_keep_last]:
                if not (args.ckpt_keep_every and s % args.ckpt_keep_every == 0):
                    os.remove(os.path.join(ckpt_dir, f"{s:07d}.pt"))
            logger.info(f"saved checkpoint {path}")
        accelerator.wait_for_everyone()

    # Running sums over a log interval, kept on the device: no host sync per step.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    quart_sum = torch.zeros(4, device=device, dtype=torch.float64)
    quart_cnt = torch.zeros(4, device=device, dtype=torch.float64)
    norm_sum = torch.zeros((), device=device, dtype=torch.float64)
    interval_steps, t_log, t_start, start_step = 0, time.time(), time.time(), step
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process or args.no_progress,
               dynamic_ncols=True, mininterval=2.0)
    while step < max_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=step % steps_per_epoch)
        dataset.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
            losses, t, grad_norm = train_step(accelerator, model, diffusion, opt, scheduler, ema, params, x, y,
                                              max_norm, decay)
            step += 1
            interval_steps += 1
            loss_sum += losses.sum()
            norm_sum += grad_norm.detach().double() if torch.is_tensor(grad_norm) else grad_norm
            if args.log_quartiles:
                q = (t * 4 // diffusion.num_timesteps).long()
                quart_sum.index_add_(0, q, losses.double())
                quart_cnt.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))
            bar.update(1)

            if step % args.log_every == 0 or step == max_steps:
                total = reduce(torch.stack([loss_sum, *quart_sum, *quart_cnt]), "sum")
                now = time.time()
                steps_per_s = interval_steps / (now - t_log)
                images = steps_per_s * args.global_batch_size
                stats = {
                    "loss": total[0].item() / (interval_steps * args.global_batch_size),
                    "grad_norm": norm_sum.item() / interval_steps,
                    "lr": scheduler.get_last_lr()[0],
                    "steps_per_s": steps_per_s,
                    "images_per_s": images,
                    "tflops_per_device": images * flops_per_image / world / 1e12,
                }
                if args.log_quartiles:
                    for i in range(4):
                        count = total[5 + i].item()
                        stats[f"loss_q{i}"] = total[1 + i].item() / count if count else float("nan")
                eta = (max_steps - step) * (now - t_start) / max(step - start_step, 1)
                logger.info(f"step {step:07d}/{max_steps} epoch {epoch} " + " ".join(
                    f"{k} {v:.4g}" for k, v in stats.items()) + f" eta {format_seconds(eta)}")
                if args.report_to != "none":
                    accelerator.log(stats, step=step)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                loss_sum.zero_(), quart_sum.zero_(), quart_cnt.zero_(), norm_sum.zero_()
                interval_steps, t_log = 0, time.time()

            if step % args.ckpt_every == 0 or step == max_steps:
                save_checkpoint()
            if step >= max_steps:
                break
    bar.close()

    if world > 1 and not fsdp:
        # DDP keeps replicas equal; check it (a divergence would mean a nondeterministic collective).
        digest = hashlib.sha1()
        for p in params:
            digest.update(p.detach().cpu().numpy().tobytes())
        digests = gather_object([digest.hexdigest()])
        if len(set(digests)) != 1:
            raise RuntimeError(f"model replicas differ after training: {digests}")
        logger.info(f"weights identical on all {world} processes (sha1 {digests[0][:12]})")
    logger.info("done")
    accelerator.end_training()
    return exp_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features-path", "--feature-path", dest="features_path", type=str, required=True,
                        help="latent store from extract_features.py (--feature-path: fast-DiT's spelling)")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--model", type=str, choices=list(DiT_models), default="DiT-XL/2")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1400)
    length.add_argument("--max-steps", type=int, default=None, help="train this many steps (overrides --epochs)")
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="clip the global gradient norm to this (0: no clipping, as DiT)")
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--ema-warmup", action="store_true",
                        help="decay min(ema_decay, (1 + step) / (10 + step)): useful for short runs")
    parser.add_argument("--class-dropout-prob", type=float, default=0.1)
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    parser.add_argument("--mixed-precision", type=str, choices=["bf16", "fp16", "no"], default="bf16")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--log-quartiles", action="store_true", help="also log the loss per timestep quartile")
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--ckpt-keep-last", type=int, default=3, help="keep this many latest checkpoints")
    parser.add_argument("--ckpt-keep-every", type=int, default=100_000,
                        help="also keep every checkpoint whose step is a multiple of this (0: none)")
    parser.add_argument("--resume", type=str, default=None,
                        help="a checkpoint path, or auto: the latest checkpoint of the newest experiment "
                             "of --model in --results-dir (starts fresh if there is none)")
    parser.add_argument("--report-to", type=str, choices=["tensorboard", "wandb", "none"], default="none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("epochs", "global_batch_size", "log_every", "ckpt_every", "ckpt_keep_last"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        parser.error("--max-steps must be positive")
    if not 0.0 <= args.ema_decay < 1.0 or not 0.0 <= args.class_dropout_prob < 1.0:
        parser.error("--ema-decay and --class-dropout-prob must be in [0, 1)")
    if args.num_workers < 0 or args.warmup_steps < 0 or args.ckpt_keep_every < 0:
        parser.error("--num-workers, --warmup-steps and --ckpt-keep-every must be >= 0")
    return parser, args


if __name__ == "__main__":
    parser, args = parse_args()
    try:
        main(args)
    except TrainError as e:
        parser.error(str(e))
