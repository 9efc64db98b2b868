"""
Train a DiT on a latent store written by extract_features.py.

    python train.py --model DiT-S/2 --features-path features/imagenet256 --max-steps 400000
    torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --features-path features/imagenet256
    accelerate launch --multi_gpu --num_processes 8 train.py --model DiT-XL/2 --features-path features/imagenet256
    accelerate launch --mixed_precision fp16 train.py --model DiT-XL/2 --features-path features/imagenet256
    accelerate launch --config_file configs/multinode_ddp.yaml --machine_rank R train.py --model DiT-XL/2 --features-path features/imagenet256
    accelerate launch --config_file configs/fsdp.yaml train.py --model DiT-XL/2 --features-path features/imagenet256
    python train.py --model DiT-XL/2 --features-path features/imagenet256 --gradient-accumulation-steps 4
    python train.py --model DiT-S/2 --features-path features/imagenet256 --resume auto
    python train.py --model DiT-XL/2 --features-path features/imagenet256 --objective flow --time-sampling logit-normal
    python train.py --model DiT-XL/2 --features-path features/imagenet256-dinov2 --objective flow \
        --repa-encoder vit_base_patch14_dinov2.lvd142m --repa-depth 8 --repa-coeff 0.5
    python train.py --model VDiT-S/2 --features-path features/ucf101-16f --objective flow   # a video store
    python train.py --model VDiT-XL/2 --features-path features/ucf101-16f --init-from DiT-XL-2-256x256.pt
    torchrun --nproc_per_node=8 train.py --model VDiT-XL/2 --features-path features/ucf101-64f --sequence-parallel 4

The model is built to fit the store (latent channels and size, class count); defaults are the paper's
(AdamW at a constant 1e-4 without weight decay, global batch 256, EMA 0.9999, label dropout 0.1,
1000-step linear diffusion with learned sigma). `--objective flow` trains SiT's linear flow with
velocity prediction instead (the same DiT, its learned-sigma channels unused), `--time-sampling
logit-normal` draws its t as SD3 and LightningDiT, and `--repa-encoder` adds REPA's alignment of one
block's tokens with an encoder's patch tokens, read from the store (extract_features.py computed
them). The checkpoint records the objective, so the sampling scripts pick its samplers. A video store
(extract_features.py --num-frames) trains a video size (models.VDiT_models) with the same loop; its
checkpoint records num_frames in model_config; `--init-from` starts it from an image model's weights
(its spatial blocks: it starts as that image model on each frame, as Open-Sora and Latte start).
`--sequence-parallel N` splits each sample's tokens (each frame's, for video) over N consecutive processes with
DeepSpeed-Ulysses attention (sequence.py), for samples whose activations do not fit one device; the world / N
groups are data parallel, and the losses, gradients and checkpoints are what one process would have.

Unlike DiT's and fast-DiT's train.py: bf16 autocast unless the flag or accelerate's launcher/config
says otherwise (float32 master weights, optimizer state and EMA), the logged loss is the true global
mean, the batch may be accumulated, checkpoints resume exactly, and a non-finite step never reaches
the weights (--on-nonfinite). The run folder, its lock, resuming and branching, log.txt and
stats.jsonl are runs.py's.
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, reduce
from torch.utils.data import DataLoader
from tqdm import tqdm

import runs
import sequence
from checkpoints import (MODELS, CheckpointError, check_compatible, load_checkpoint, require_finite, rng_state,
                         save_checkpoint, set_rng_state, training_checkpoint)
from diffusion import Objective, TimeSampling, create_objective
from files import UserError, run_script
from latents import LatentDataset
from downloads import DownloadError
from models import VDiT, DiT_models, Projector, VDiT_models, alignment_loss, forward_flops_per_image, load_image_weights


class TrainError(UserError, ValueError):
    """A user error: bad flags, a model that does not fit the store, a checkpoint that does not fit."""


@dataclasses.dataclass
class Alignment:
    """REPA's settings for a run: the block whose output tokens are aligned with the encoder's."""

    depth: int  # the aligned block, counted from 1 (REPA: 8 of DiT-XL/2's 28)
    coeff: float  # the alignment loss's weight (REPA's lambda)
    feature_dim: int  # the encoder's token width
    projector_dim: int  # the projector MLP's hidden width
    pool: int  # the encoder's tokens are averaged over pool x pool squares to give the DiT's token grid


@dataclasses.dataclass
class Training:
    """The model being trained and what updates it."""

    model: torch.nn.Module  # as accelerate prepared it (DDP, FSDP or plain)
    raw: torch.nn.Module  # the DiT inside
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    names: list  # parameter names, in the order of params and ema
    params: list  # the DiT's parameters (FSDP2 shards under FSDP)
    ema: list  # float32 copies of params, sharded like them
    projector: torch.nn.Module = None  # REPA's projector as accelerate prepared it; None without REPA
    hidden: dict = None  # "tokens": the aligned block's output in the current forward pass (REPA)
    sequence_parallel: int = 1  # processes sharing each sample's tokens (sequence.py)

    @property
    def modules(self):
        """What the optimizer updates: the model, and the projector under REPA."""
        return [self.model] + ([self.projector] if self.projector is not None else [])


def build_model(model_config, grad_checkpointing=False):
    return MODELS[model_config["model"]](**{k: v for k, v in model_config.items() if k != "model"},
                                         grad_checkpointing=grad_checkpointing)


def fill(model, state_dict):
    """
    Load state_dict into model: each of its keys must be one of the model's with the same shape (a video model
    takes an image model's: its spatial blocks, models.load_image_weights). :return: the model's keys it left.
    :raises ValueError, RuntimeError: a key the model lacks, or a shape it does not have, naming them.
    """
    if isinstance(model, VDiT):
        return load_image_weights(model, state_dict)
    missing, extra = model.load_state_dict(state_dict, strict=False)  # RuntimeError on a shape, named
    if extra:
        raise ValueError(f"{len(extra)} keys are not the model's ({', '.join(extra[:3])})")
    return missing


def initial_weights(spec, model_config):
    """
    --init-from: the EMA weights of a checkpoint (a path or a released name, checkpoints.load_checkpoint)
    that a new run starts from, checked against the model on the meta device before any run folder is made.
    A label table of another class count (ImageNet's 1,000 for UCF-101's 101) is left out: the model keeps
    its own, initialised.
    :return: (the state_dict, the model's keys it leaves at their initialisation).
    :raises TrainError: the file cannot be had or read, or its weights do not fit the model.
    """
    table = "y_embedder.embedding_table.weight"
    try:
        weights = dict(load_checkpoint(spec).state_dict)
        with torch.device("meta"), warnings.catch_warnings():  # loading into meta tensors checks, copies nothing
            warnings.simplefilter("ignore", UserWarning)        # (torch warns that it is a no-op)
            model = build_model(model_config)
            ours = model.state_dict().get(table)
            if table in weights and ours is not None and weights[table].shape != ours.shape:
                del weights[table]
            left = fill(model, weights)
    except (CheckpointError, DownloadError) as e:
        raise TrainError(f"--init-from {spec}: {e}") from e
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"--init-from {spec}: its weights do not fit {model_config['model']} on this store: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from e
    return weights, left


def make_training(accelerator, model_config, lr, warmup_steps=0, grad_checkpointing=False, compile=False,
                  state_dict=None, init=None, alignment=None, projector_state=None, sequence_group=None):
    """
    Build the model (with `state_dict`'s weights when given, a resumed checkpoint's: every key; else with
    `init`'s, --init-from's: see fill and initial_weights), REPA's projector when `alignment` is given
    (with `projector_state`'s weights when given), DiT's AdamW over both (no weight decay; the fused kernel
    on CUDA where it applies, not on FSDP's DTensors), the linear-warmup schedule and the EMA of the DiT,
    and let accelerate wrap them. With `sequence_group` (a sequence.SequenceParallel) the model splits each
    sample's tokens over its processes.
    """
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    model = build_model(model_config, grad_checkpointing)
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # the EMA holds parameters only
    if state_dict is not None:
        model.load_state_dict(state_dict)
    elif init is not None:
        fill(model, init)
    if sequence_group is not None:
        model.set_sequence_parallel(sequence_group)
    hidden = projector = None
    if alignment is not None:
        # The aligned block's output, caught by a hook: the DiT's forward and its keys stay as they are.
        hidden = {}
        model.blocks[alignment.depth - 1].register_forward_hook(lambda block, inputs, out: hidden.update(tokens=out))
        projector = Projector(model.pos_embed.shape[-1], alignment.feature_dim, alignment.projector_dim)
        if projector_state is not None:
            projector.load_state_dict(projector_state)
    if compile:
        # Regional compilation (a video model's temporal blocks too): short compile, module names unchanged.
        for block in [*model.blocks, *getattr(model, "temporal_blocks", [])]:
            block.compile()
    trained = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0, fused=accelerator.device.type == "cuda" and not fsdp)
    if projector is not None:
        model, projector, opt = accelerator.prepare(model, projector, opt)
    else:
        model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)
    names, params = zip(*raw.named_parameters())
    ema = [p.detach().clone().float() for p in params]
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return Training(model, raw, opt, scheduler, list(names), list(params), ema, projector, hidden,
                    sequence_group.degree if sequence_group is not None else 1)


def restore(training, ckpt, accelerator, lr, seed, notes):
    """Load a checkpoint's optimizer, EMA, schedule and RNG states (the weights went in at make_training);
    the learning rate from now on is `lr`. The RNG states are reseeded from `seed` (this process's, the same
    on every process of a sequence group) when the process count or --sequence-parallel changed."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(training.raw, training.opt.optimizer, ckpt["opt"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        training.opt.load_state_dict(ckpt["opt"])
    with torch.no_grad():
        for e, p, n in zip(training.ema, training.params, training.names):
            value = ckpt["ema"][n].to(accelerator.device)
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value, p.device_mesh, p.placements)
            e.copy_(value)
    training.scheduler.load_state_dict(ckpt["scheduler"])
    # The schedule is this run's --lr and --warmup-steps (runs.HONOURED_ON_RESUME), not the checkpoint's:
    # this step's rate from them (the same value when neither changed, so resuming stays exact).
    scheduler = training.scheduler
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(training.opt.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    # A sequence group's processes hold equal RNG states; restored onto another grouping they would not be.
    written = (len(ckpt["rng_states"]), ckpt["train_config"].get("sequence_parallel", 1))
    if written != (world, training.sequence_parallel):
        notes.append(f"the checkpoint was written by {written[0]} processes with --sequence-parallel {written[1]}, "
                     f"this run has {world} with {training.sequence_parallel}: RNG states are reseeded, so the run is "
                     f"not bit-exact with an uninterrupted one")
        torch.manual_seed(seed + 7919 * ckpt["step"])
        return
    try:
        set_rng_state(ckpt["rng_states"][rank])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"the checkpoint's RNG state of process {rank} cannot be restored ({e!r})") from e


def full_tensor(t):
    """A parameter's whole value on the CPU (gathers an FSDP2 shard; every process must call it)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def checkpoint_state(training, accelerator, step, model_config, meta, train_config, parent, objective):
    """This run's checkpoint (every process takes part: FSDP gathers shards, RNG states are gathered)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        opt_state = get_optimizer_state_dict(training.raw, training.opt.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        opt_state = training.opt.state_dict()
    projector = None
    if training.projector is not None:
        projector = {n: full_tensor(p) for n, p in accelerator.unwrap_model(training.projector).named_parameters()}
    return training_checkpoint(
        step=step, model={n: full_tensor(p) for n, p in zip(training.names, training.params)},
        ema={n: full_tensor(e) for n, e in zip(training.names, training.ema)}, opt=opt_state,
        scheduler=training.scheduler.state_dict(), model_config=model_config, latents=meta,
        train_config=train_config, rng_states=gather_object([rng_state()]), parent=parent, objective=objective,
        projector=projector)


def train_step(accelerator, training, objective, x, y, max_norm, decay, micro_batches=1, z=None, alignment=None):
    """
    One optimisation step on this process's batch, then the EMA update, unless the step is not finite.
    Timesteps, noise and label dropout are drawn per sample for the whole batch before it is split
    into `micro_batches` (accumulated without gradient sync), so accumulating changes no draw.

    :param objective: what diffusion.create_objective returns.
    :param x: [B x C x H x W] images or [B x C x F x H x W] clips, y: [B] labels, on the device.
    :param max_norm: clip the global gradient norm to this; inf only measures it (gradients x 1).
    :param z: [B x T' x F] the encoder's patch tokens of x (REPA), T' = alignment.pool^2 x the DiT's tokens.
    :param alignment: an Alignment (REPA), or None.
    :return: (whether the step was taken, then the global gradient norm, loss sums, sample counts and
             alignment-loss sums per timestep quartile: the step's figures over all processes).
    """
    model, raw = training.model, training.raw
    t = objective.sample_time(x.shape[0], x.device)
    noise = torch.randn_like(x)
    kwargs = {}
    if raw.y_embedder is not None:
        drop = (torch.rand(x.shape[0], device=x.device) < raw.y_embedder.dropout_prob).long()
        kwargs = dict(y=y, force_drop_ids=drop)
    if alignment is not None:
        z = pool_tokens(z, alignment.pool)  # (B, T, F)
    losses, aligns = [], []
    for i in torch.arange(x.shape[0], device=x.device).chunk(micro_batches):
        with accelerator.accumulate(*training.modules):  # syncs gradients on the last micro-batch only
            micro = objective.training_losses(model, x[i], t[i], {k: v[i] for k, v in kwargs.items()},
                                              noise=noise[i])["loss"]  # (B / micro_batches,) float32
            loss = micro
            if alignment is not None:
                projected = training.projector(training.hidden.pop("tokens"))        # (b, T, F)
                align = alignment_loss(projected.float(), z[i])                       # (b,)
                loss = micro + alignment.coeff * align
                aligns.append(align.detach())
            accelerator.backward(loss.mean())  # accelerate divides by the micro-batch count
        losses.append(micro.detach())
    losses = torch.cat(losses).double()  # (B,)
    aligns = torch.cat(aligns).double() if aligns else torch.zeros_like(losses)  # (B,)
    trained = [p for module in training.modules for p in module.parameters()]
    grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(trained, max_norm), device=x.device)
    quartile = objective.noise_quartile(t)  # (B,)
    per_quartile = torch.zeros(3, 4, device=x.device, dtype=torch.float64).index_add_(
        1, quartile, torch.stack([losses, torch.ones_like(losses), aligns]))  # (3, 4): loss, count, alignment sums
    # The step's one host sync, its global figures: a non-finite step must not reach the weights, and every
    # process decides on the same reduced figures. Under fp16 the grad scaler skips overflowing steps
    # itself (an inf norm is how it finds its scale), so only the loss counts there.
    # A sequence group's processes hold the same samples: each adds its share, so a sample counts once.
    local = torch.cat([grad_norm.double()[None] / accelerator.num_processes,
                       per_quartile.flatten() / training.sequence_parallel])
    grad_norm, *sums = reduce(local, "sum").tolist()
    taken = math.isfinite(sum(sums[:4]) + sum(sums[8:])) and (accelerator.scaler is not None
                                                              or math.isfinite(grad_norm))
    if taken:
        training.opt.step()
    training.scheduler.step()
    training.opt.zero_grad(set_to_none=True)
    if taken:
        with torch.no_grad():
            torch._foreach_mul_(training.ema, decay)
            torch._foreach_add_(training.ema, [p.detach() for p in training.params], alpha=1 - decay)
    return taken, grad_norm, sums[:4], sums[4:8], sums[8:]


def pool_tokens(z, pool):
    """
    Average an encoder's square token grid over pool x pool squares (its finer grid to the DiT's).
    :param z: [B x T' x F] tokens in row-major grid order, T' = g'^2. :return: [B x T'/pool^2 x F].
    """
    if pool == 1:
        return z
    grid = math.isqrt(z.shape[1])
    z = z.unflatten(1, (grid, grid)).permute(0, 3, 1, 2)       # (B, F, g', g')
    return F.avg_pool2d(z, pool).flatten(2).transpose(1, 2)   # (B, T, F)


def make_accelerator(args):
    """:return: (Accelerator, the precision it runs, where that choice came from)."""
    if args.mixed_precision is not None:
        precision, source = args.mixed_precision, "--mixed-precision"
    elif os.environ.get("ACCELERATE_MIXED_PRECISION"):  # set by accelerate launch from its flag or config
        precision, source = os.environ["ACCELERATE_MIXED_PRECISION"], "accelerate launch / accelerate config"
    else:
        precision, source = "bf16", "train.py's default"
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise TrainError(f"--report-to {args.report_to} needs the {args.report_to} package: pip install "
                         f"{args.report_to}, or pass --report-to none")
    try:
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  log_with=None if args.report_to == "none" else args.report_to,
                                  project_dir=args.results_dir or "results")  # the run folder, once known
    except ValueError as e:  # e.g. a mode this accelerate does not know, from the environment
        raise TrainError(f"mixed precision {precision} (from {source}): {e}") from e
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise TrainError("FSDP needs fsdp_version: 2 in the accelerate config (see configs/fsdp.yaml)")
    return accelerator, precision, source


def parallel_layout(args, world, model_config, alignment):
    """
    How the `world` processes share the work: --sequence-parallel N processes per sample (sequence.py), the
    rest data parallel; checked against the model, REPA and the batch.
    :return: the data-parallel degree world / N.
    :raises TrainError, sequence.SequenceParallelError: what does not fit, before any run folder is made.
    """
    n = args.sequence_parallel
    if n > 1:
        if alignment is not None:
            raise TrainError(f"--sequence-parallel {n} with --repa-encoder: REPA aligns one block's tokens, which "
                             f"sequence parallelism splits over the processes; train REPA without it")
        if args.compile:  # measured with torch 2.14.1 and deepspeed 0.19.8: AOTAutograd fails on its all-to-all
            raise TrainError(f"--sequence-parallel {n} with --compile: torch.compile fails on DeepSpeed's "
                             f"all-to-all; drop --compile")
        with torch.device("meta"):
            sequence.check(n, world, build_model(model_config), args.model)
    replicas = world // n
    if args.global_batch_size % (replicas * args.gradient_accumulation_steps):
        processes = f"{world} processes" if n == 1 else f"{replicas} data-parallel groups of {n} processes"
        raise TrainError(f"--global-batch-size {args.global_batch_size} is not divisible by the {processes} x "
                         f"{args.gradient_accumulation_steps} micro-batches")
    return replicas


def open_store(args):
    """:return: the dataset, the model configuration that fits it, and REPA's Alignment (None without)."""
    try:
        dataset = LatentDataset(args.features_path, flip=args.flip, seed=args.global_seed)
        frames = dataset.meta.get("frames")  # None for an image store
        if args.repa_encoder is not None:
            if frames is not None:
                raise TrainError(f"--repa-encoder: {args.features_path} is a video store, and REPA is for "
                                 f"image stores only; drop the REPA flags")
            dataset = LatentDataset(args.features_path, flip=args.flip, seed=args.global_seed, repa=True)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from e
    family, sizes = ("VDiT_models", VDiT_models) if frames is not None else ("DiT_models", DiT_models)
    if args.model not in sizes:
        raise TrainError(f"--model {args.model} does not fit {args.features_path}, a store of "
                         f"{'videos' if frames is not None else 'images'}: choose one of {family} "
                         f"({', '.join(sizes)})")
    channels, *_, size, width = dataset.meta["latent_shape"]  # [C, H, W], or [C, F, H, W] for video
    patch = int(args.model.rsplit("/", 1)[1])
    shape = "x".join(map(str, dataset.meta["latent_shape"]))
    if size % patch or width != size:
        raise TrainError(f"{args.model} (patch {patch}) does not fit the store's {shape} latents: the patch "
                         f"must divide the latent size; choose another --model or image size")
    if len(dataset) < args.global_batch_size:
        raise TrainError(f"the store holds {len(dataset)} {'clips' if frames is not None else 'images'}, fewer "
                         f"than --global-batch-size {args.global_batch_size}")
    model_config = dict(model=args.model, input_size=size, in_channels=channels,
                        num_classes=dataset.meta["num_classes"], learn_sigma=True,
                        class_dropout_prob=args.class_dropout_prob)
    if frames is not None:
        model_config["num_frames"] = frames
    return dataset, model_config, alignment_for(args, dataset.meta, size // patch)


def alignment_for(args, meta, grid):
    """
    REPA's settings from the flags and the store's encoder features (meta["repa"]), for a DiT with a
    grid x grid token grid. :return: an Alignment, or None without --repa-encoder.
    :raises TrainError: the store holds another encoder's features, the block is beyond the model's
            depth, or the encoder's token grid is not the DiT's or a whole multiple of it.
    """
    if args.repa_encoder is None:
        return None
    features = meta["repa"]
    if features["encoder"] != args.repa_encoder:
        raise TrainError(f"--repa-encoder {args.repa_encoder}: the store {args.features_path} holds the features of "
                         f"{features['encoder']}; pass that name or extract the features of this encoder")
    with torch.device("meta"):
        depth = len(DiT_models[args.model](input_size=grid * int(args.model.rsplit("/", 1)[1])).blocks)
    if args.repa_depth > depth:
        raise TrainError(f"--repa-depth {args.repa_depth} is beyond {args.model}'s {depth} blocks")
    rows, cols = features["grid"]
    if rows != cols or rows % grid:
        raise TrainError(f"{args.repa_encoder}'s {rows}x{cols} token grid cannot be matched to {args.model}'s "
                         f"{grid}x{grid} tokens (it must be the same grid or a whole multiple of it): extract the "
                         f"features with another --repa-input-size, or choose a --model of another patch size")
    return Alignment(args.repa_depth, args.repa_coeff, features["dim"], args.repa_projector_dim, rows // grid)


def save(training, accelerator, step, ckpt_dir, args, guard, *fixed):
    """
    Write step's checkpoint (every process takes part) unless its weights are not finite, which stops
    the run on every process, so the last finite checkpoint is kept. :return: the path written.
    """
    data = checkpoint_state(training, accelerator, step, *fixed)
    try:
        require_finite(data["model"], f"step {step}'s weights")
        require_finite(data["ema"], f"step {step}'s EMA weights")
        if data["projector"] is not None:
            require_finite(data["projector"], f"step {step}'s REPA projector")
    except CheckpointError as e:
        raise guard.stop(str(e)) from e
    path = save_checkpoint(data, ckpt_dir, args.ckpt_keep_last, args.ckpt_keep_every) \
        if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return gather_object([path])[0]


def main(args):
    accelerator, precision, precision_source = make_accelerator(args)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT: faster float32 matmuls on Ampere and later
    torch.backends.cudnn.allow_tf32 = True

    dataset, model_config, alignment = open_store(args)
    if alignment is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise TrainError("--repa-encoder is not supported under FSDP yet: train with DDP (accelerate's default)")
    replicas = parallel_layout(args, world, model_config, alignment)
    replica = rank // args.sequence_parallel  # this process's data-parallel rank
    sequence_group = sequence.SequenceParallel(args.sequence_parallel) if args.sequence_parallel > 1 else None
    objective = create_objective(args.objective, args.time_sampling)
    meta = dataset.meta
    steps_per_epoch = len(dataset) // args.global_batch_size
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    train_config = dict(vars(args), mixed_precision=precision)  # what runs: the precision once chosen

    def vet(ckpt, path):  # a checkpoint of this model and store, with the flags that may change
        check_compatible(ckpt, path, model_config, meta)
        return runs.check_resumed_flags(ckpt["train_config"], path, train_config)

    init, left = initial_weights(args.init_from, model_config) if args.init_from else (None, [])
    run = runs.open_run(args.resume, args.results_dir, args.model, vet, accelerator.is_main_process,
                        share=lambda obj: gather_object([obj])[0])
    run_dir, ckpt, notes = run.dir, run.ckpt, run.notes
    if init is not None:
        notes.append(f"--init-from {args.init_from}: not used, the resumed checkpoint has the weights" if ckpt else
                     f"weights from {args.init_from}" + (f"; {len(left)} keys keep their initialisation "
                                                         f"({', '.join(left[:2])}, ...)" if left else ""))
    with run.log as log:
        # Each replica its own seed, as DiT's each process (the same for the processes of a sequence group, so
        # they draw the same timesteps, noise and label dropout); a resumed run restores its own.
        seed = args.global_seed * replicas + replica
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        training = make_training(accelerator, model_config, args.lr, args.warmup_steps, args.grad_checkpointing,
                                 args.compile, state_dict=ckpt["model"] if ckpt else None, init=init,
                                 alignment=alignment, projector_state=ckpt.get("projector") if ckpt else None,
                                 sequence_group=sequence_group)
        if ckpt is not None:
            restore(training, ckpt, accelerator, args.lr, seed, notes)
        training.model.train()
        flops_per_image = 3 * forward_flops_per_image(training.raw)
        item = "clip" if "num_frames" in model_config else "image"

        sampler = runs.EpochBatches(len(dataset), args.global_batch_size, replica, replicas, args.global_seed)
        # Its own generator, so creating an iterator never draws from the global RNG (exact resume).
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.global_seed))
        if args.report_to != "none":
            accelerator.project_configuration.set_directories(run_dir)  # tensorboard writes under the run
            accelerator.init_trackers(os.path.basename(run_dir), config={
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in train_config.items()})

        log.info(f"{args.model}: {sum(p.numel() for p in training.raw.parameters()) / 1e6:.2f}M parameters, "
                 f"{flops_per_image / 1e9:.2f} training GFLOPs per {item}, input "
                 f"{'x'.join(map(str, meta['latent_shape']))}, {meta['num_classes']} classes")
        log.info(f"{len(dataset)} {item}s from {args.features_path}; {world} process(es) "
                 f"({accelerator.distributed_type.value}) on {device.type}, {args.global_batch_size // replicas} "
                 f"{item}s per process per step in {args.gradient_accumulation_steps} micro-batch(es), "
                 f"{steps_per_epoch} steps per epoch, {max_steps} steps; mixed precision {precision} (from "
                 f"{precision_source})")
        log.info(tokens_line(training.raw, replicas, args.sequence_parallel, item))
        log.info(f"objective {args.objective}" + (f", t drawn {args.time_sampling}" if args.objective == "flow" else "")
                 + (f"; REPA: block {alignment.depth} aligned with {args.repa_encoder}'s {meta['repa']['dim']}-wide "
                    f"tokens (averaged {alignment.pool}x{alignment.pool}), coefficient {alignment.coeff}"
                    if alignment else ""))
        if accelerator.distributed_type != DistributedType.FSDP and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            notes.append("the accelerate config asks for FSDP, which accelerate runs on GPUs only: "
                         f"training without sharding ({accelerator.distributed_type.value})")
        for note in [f"run folder {run_dir}"] + notes:
            log.info(note)

        step = ckpt["step"] if ckpt else 0
        interval = runs.Interval(aligned=alignment is not None)
        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        t_start, start_step, guard = time.time(), step, runs.NonFinite(args.on_nonfinite, run.ckpt_path)
        bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process or args.no_progress,
                   dynamic_ncols=True, mininterval=2.0)
        while step < max_steps:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch, start=step % steps_per_epoch)
            dataset.set_epoch(epoch)
            for batch in loader:  # (x, y), and z under REPA
                x, y, *z = (b.to(device, non_blocking=True) for b in batch)
                decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
                taken, grad_norm, loss_sums, samples, align_sums = train_step(
                    accelerator, training, objective, x, y, max_norm, decay, args.gradient_accumulation_steps,
                    z=z[0] if z else None, alignment=alignment)
                step += 1
                bar.update(1)
                if taken:
                    interval.add(grad_norm, loss_sums, samples, align_sums)
                    guard.in_a_row = 0
                else:
                    interval.skipped += 1
                    log.info(guard.skip(step, grad_norm, loss_sums, samples))
                if step % args.log_every == 0 or step == max_steps:
                    record = dict(step=step, epoch=epoch, **interval.record(args.global_batch_size, args.log_quartiles),
                                  lr=training.scheduler.get_last_lr()[0])
                    record["tflops_per_device"] = record["images_per_s"] * flops_per_image / world / 1e12
                    log.interval(record, max_steps, (max_steps - step) * (time.time() - t_start) / (step - start_step))
                    if args.report_to != "none":
                        accelerator.log(record, step=step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    interval = runs.Interval(aligned=alignment is not None)
                if step % args.ckpt_every == 0 or step == max_steps:
                    guard.last_good = save(training, accelerator, step, os.path.join(run_dir, "checkpoints"), args,
                                           guard, model_config, meta, train_config, run.parent, objective.config())
                    log.info(f"saved checkpoint {guard.last_good}")
                if step >= max_steps:
                    break
        bar.close()
        check_replicas(training, accelerator, log)
        log.info("done")
        accelerator.end_training()
    return run_dir


def tokens_line(model, replicas, n, item):
    """The start-up log's line on the parallel layout: both degrees and the tokens each process holds."""
    tokens, frames = model.pos_embed.shape[1], getattr(model, "num_frames", None)  # tokens per image or frame
    total = tokens * (frames or 1)
    return (f"data parallel {replicas} x sequence parallel {n}: {total // n} of each {item}'s {total} tokens per "
            f"process" + (f" ({tokens // n} of each frame's {tokens}, in all {frames} frames)" if frames else ""))


def check_replicas(training, accelerator, log):
    """DDP keeps replicas equal; check it (a divergence would mean a nondeterministic collective)."""
    if accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.FSDP:
        return
    digest = hashlib.sha1()
    for p in training.params:
        digest.update(p.detach().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) != 1:
        raise RuntimeError(f"model replicas differ after training: {digests}")
    log.info(f"weights identical on all {accelerator.num_processes} processes (sha1 {digests[0][:12]})")


# REPA's settings (its paper's), which only --repa-encoder turns on.
REPA_DEFAULTS = dict(repa_depth=8, repa_coeff=0.5, repa_projector_dim=2048)

# DiT's and fast-DiT's train.py flags for the images; here they belong to extract_features.py.
IMAGE_FLAGS = ("--data-path", "--image-size", "--num-classes", "--vae")


def image_flags_error(argv):
    """The message for DiT's image flags: train.py reads a latent store, and the command that makes one."""
    legacy = argparse.ArgumentParser(add_help=False)
    for flag in IMAGE_FLAGS:
        legacy.add_argument(flag)
    given, _ = legacy.parse_known_args(argv)
    store = f"features/imagenet{given.image_size or 256}"
    command = (f"python extract_features.py --data-path {given.data_path or '/path/to/imagenet/train'} --features-path "
               f"{store}" + (f" --image-size {given.image_size}" if given.image_size else "")
               + (f" --vae {given.vae}" if given.vae else ""))
    return (f"{' '.join(f for f in IMAGE_FLAGS if any(a.split('=')[0] == f for a in argv))}: train.py trains from a "
            f"latent store, which fixes the images, their size, the autoencoder and the classes. Make one first "
            f"with\n  {command}\nthen pass --features-path {store} to train.py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features-path", "--feature-path", dest="features_path", type=str, required=True,
                        help="latent store from extract_features.py (--feature-path: fast-DiT's spelling)")
    parser.add_argument("--results-dir", type=str, default=None,
                        help="where run folders go (default results; with --resume: see the module docstring)")
    parser.add_argument("--model", type=str, choices=list(MODELS), default="DiT-XL/2",
                        help="an image size (DiT_models) for an image store, a video size (VDiT_models) for a "
                             "video store")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1400)
    length.add_argument("--max-steps", type=int, default=None, help="train this many steps (overrides --epochs)")
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1,
                        help="split each process's batch into this many micro-batches (the same update, less memory)")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="clip the global gradient norm to this (0: no clipping, as DiT)")
    parser.add_argument("--on-nonfinite", choices=["stop", "skip"], default="stop",
                        help=f"a step with a non-finite loss or gradient norm stops the run, or is skipped (at most "
                             f"{runs.MAX_SKIPS_IN_A_ROW} in a row); either way it never reaches the weights")
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--ema-warmup", action="store_true",
                        help="decay min(ema_decay, (1 + step) / (10 + step)): useful for short runs")
    parser.add_argument("--class-dropout-prob", type=float, default=0.1)
    parser.add_argument("--objective", choices=[o.value for o in Objective], default=Objective.DDPM.value,
                        help="ddpm: DiT's (noise and learned variance, 1000 steps); flow: SiT's linear flow from "
                             "noise (t=0) to data (t=1) with velocity prediction")
    parser.add_argument("--time-sampling", choices=[t.value for t in TimeSampling], default=TimeSampling.UNIFORM.value,
                        help="flow's t: uniform in [0, 1] (SiT), or logit-normal: sigmoid of a standard normal "
                             "(SD3, LightningDiT), which trains the middle of the path most")
    parser.add_argument("--repa-encoder", default=None,
                        help="REPA: align a block's tokens with this encoder's patch tokens (a timm name, e.g. "
                             "vit_base_patch14_dinov2.lvd142m), read from the store: extract_features.py "
                             "--repa-encoder computes them")
    parser.add_argument("--repa-depth", type=int, default=REPA_DEFAULTS["repa_depth"],
                        help="REPA: the block (from 1) whose output is aligned (REPA's 8)")
    parser.add_argument("--repa-coeff", type=float, default=REPA_DEFAULTS["repa_coeff"],
                        help="REPA: the alignment loss's weight (REPA's lambda 0.5)")
    parser.add_argument("--repa-projector-dim", type=int, default=REPA_DEFAULTS["repa_projector_dim"],
                        help="REPA: the projector MLP's hidden width (REPA's 2048)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    parser.add_argument("--mixed-precision", type=str, choices=["bf16", "fp16", "no"], default=None,
                        help="default: what accelerate launch or accelerate config sets, else bf16")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    parser.add_argument("--sequence-parallel", type=int, default=1,
                        help="split each sample's tokens (a frame's, for video) over this many consecutive processes "
                             "(DeepSpeed-Ulysses attention; needs pip install deepspeed); the rest is data parallel")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--log-quartiles", action="store_true", help="also log the loss per timestep quartile")
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--ckpt-keep-last", type=int, default=3, help="keep this many latest checkpoints")
    parser.add_argument("--ckpt-keep-every", type=int, default=100_000,
                        help="also keep every checkpoint whose step is a multiple of this (0: none)")
    parser.add_argument("--init-from", default=None,
                        help="start a new run from this checkpoint's EMA weights (a path or a released name, e.g. "
                             "DiT-XL-2-256x256.pt); an image model's fill a video model's spatial blocks")
    parser.add_argument("--resume", type=str, default=None,
                        help="a checkpoint path, or auto: the latest readable checkpoint of the newest run of "
                             "--model in --results-dir (starts fresh if there is none)")
    parser.add_argument("--report-to", type=str, choices=["tensorboard", "wandb", "none"], default="none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    argv = sys.argv[1:] if argv is None else argv
    if any(a.split("=")[0] in IMAGE_FLAGS for a in argv):  # before argparse asks for --features-path
        parser.error(image_flags_error(argv))
    args = parser.parse_args(argv)
    for name in ("epochs", "max_steps", "global_batch_size", "gradient_accumulation_steps", "log_every", "ckpt_every",
                 "ckpt_keep_last", "sequence_parallel"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 <= args.ema_decay < 1.0 or not 0.0 <= args.class_dropout_prob < 1.0:
        parser.error("--ema-decay and --class-dropout-prob must be in [0, 1)")
    if args.num_workers < 0 or args.warmup_steps < 0 or args.ckpt_keep_every < 0:
        parser.error("--num-workers, --warmup-steps and --ckpt-keep-every must be >= 0")
    if args.objective == Objective.DDPM.value and args.time_sampling != TimeSampling.UNIFORM.value:
        parser.error(f"--time-sampling {args.time_sampling} is for --objective flow; DDPM draws its 1000 discrete "
                     f"steps uniformly, as DiT")
    if args.repa_encoder is None:
        given = [f"--{k.replace('_', '-')}" for k, v in REPA_DEFAULTS.items() if getattr(args, k) != v]
        if given:
            parser.error(f"{', '.join(given)} without --repa-encoder: REPA is off")
    if args.repa_depth < 1 or args.repa_coeff < 0 or args.repa_projector_dim < 1:
        parser.error("--repa-depth and --repa-projector-dim must be >= 1, --repa-coeff >= 0")
    if args.results_dir is not None and os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        parser.error(f"--results-dir {args.results_dir} is a file, not a folder")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
