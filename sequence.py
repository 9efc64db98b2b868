"""
Sequence parallelism (DeepSpeed-Ulysses): each sample's tokens split over N processes, for sequences whose
activations do not fit one device (a high-resolution image, a long clip), whatever the batch.

    torchrun --nproc_per_node 8 train.py --model VDiT-XL/2 --features-path features/ucf101-64f --sequence-parallel 4
    torchrun --nproc_per_node 2 sample_ddp.py --ckpt results/000-VDiT-XL-2/checkpoints/0100000.pt --sequence-parallel 2

The W processes form W / N sequence groups of N consecutive ranks ([g*N, (g+1)*N)); group g is data-parallel
replica g of W / N. Every process of a group sees the same samples, timesteps, noise and labels, and holds a
contiguous N-th of each image's tokens (of each frame's, for a video model). Everything token-wise (the MLPs,
adaLN, the final layer) and a video model's temporal attention (each process holds every frame of its
positions) run locally; the attention over a frame's tokens goes through DeepSpeed's DistributedAttention, whose
all-to-alls give each process every token for N-th of the heads and return the result to the token split
(Jacobs et al. 2023, "DeepSpeed Ulysses"). The final layer's output is gathered back, so the loss and the
samplers see the whole [N x C x H x W] (or [N x C x F x H x W]) output, on every process of the group.

A video model splits the tokens of each frame and keeps the temporal attention local, as Open-Sora 1.2 keeps
one axis local. Splitting the frames instead would move the same all-to-all volume (the same q, k, v and output,
only of the other attention) and leave each process the same N-th of every activation (by that count; only
this split is measured), but F is often small (16 frames) while a frame's tokens grow with the resolution
(256 at 256 px, patch 2), so more degrees divide them, and images and videos split alike.
bench/sequence_parallel.py measures the memory: N = 2 keeps 0.53x of the activations for one 64-frame clip.

Gradients: every process of a group computes the same loss from the gathered output, and the gather's backward
sums the group's N equal gradients of its share; data parallelism's mean over all W processes then divides
by W = N x replicas, which leaves the mean over the replicas: one process's gradient for the global batch.
(The same holds for FSDP, whose gradient reduction is also a mean over all W processes.)

DeepSpeed is needed only here, and only for N > 1: `pip install deepspeed`.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from files import UserError


class SequenceParallelError(UserError, ValueError):
    """--sequence-parallel does not fit the launch or the model, or DeepSpeed is not installed."""


def check(degree, world, model, name):
    """
    Whether `degree` processes can share each sample of `model` (e.g. built on the meta device) in a launch
    of `world` processes.
    :param name: the model's name, for the messages.
    :raises SequenceParallelError: heads or tokens per frame that do not split evenly, a world that is not
        whole groups, or no DeepSpeed.
    """
    tokens = (model.input_size // model.patch_size) ** 2
    per = "frame" if hasattr(model, "num_frames") else "image"
    if model.num_heads % degree:
        raise SequenceParallelError(f"--sequence-parallel {degree}: {name}'s {model.num_heads} attention heads "
                                    f"do not split over {degree} processes")
    if tokens % degree:
        raise SequenceParallelError(f"--sequence-parallel {degree}: {name}'s {tokens} tokens per {per} on this "
                                    f"input do not split over {degree} processes")
    if world % degree:
        raise SequenceParallelError(f"--sequence-parallel {degree}: the {world} processes do not form groups "
                                    f"of {degree}; launch a multiple of {degree}")
    import_deepspeed(degree)


def import_deepspeed(degree):
    """:return: the deepspeed module. :raises SequenceParallelError: when it is not installed."""
    try:
        import deepspeed
    except ImportError as e:
        raise SequenceParallelError(f"--sequence-parallel {degree} runs DeepSpeed's Ulysses attention: pip "
                                    f"install deepspeed ({e})") from e
    return deepspeed


class HeadAttention(nn.Module):
    """Attention over whole sequences for some of the heads, in DistributedAttention's layout
    (batch_dim_idx 0): q, k, v [B x T x h x d] -> [B x T x h x d]."""

    def forward(self, q, k, v):
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, T, d)
        return x.transpose(1, 2)                                                                        # (B, T, h, d)


class SequenceParallel:
    """
    This process's sequence group: the split and gather of tokens, and the Ulysses attention over the group.
    Every process must build it, in the same order (it creates the process groups), after torch.distributed
    is initialised (accelerate's Accelerator or PartialState does that).
    """

    def __init__(self, degree):
        deepspeed = import_deepspeed(degree)
        import deepspeed.ops
        from deepspeed.sequence.layer import DistributedAttention

        # On a CPU, DeepSpeed's communication backend would compile its shared-memory all-reduce with the C++
        # compiler when it starts (about 2 minutes, again for each new Python environment, since the build is
        # keyed on the install path); Ulysses never uses it. This marks it unavailable, as on a platform without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # With torch.distributed initialised, DeepSpeed's communication wraps its default group and creates
        # none (deepspeed.comm.init_distributed in 0.19.8: "The user initialized torch.dist themselves").
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        rank, world = dist.get_rank(), dist.get_world_size()
        groups = [dist.new_group(list(range(g * degree, (g + 1) * degree))) for g in range(world // degree)]
        self.group = groups[rank // degree]
        self.degree, self.rank = degree, rank % degree
        self.distributed_attention = DistributedAttention

    def attention(self):
        """A DistributedAttention over this group: q, k, v [B x T/N x H x d] in, [B x T/N x H x d] out, each
        process attending over all T tokens for H/N of the heads in between."""
        return self.distributed_attention(HeadAttention(), self.group, scatter_idx=2, gather_idx=1)

    def split(self, x):
        """
        :param x: [B x T x D] every token of each sequence.
        :return: [B x T/N x D] this process's contiguous share, a copy: a view would keep the whole alive.
        """
        return x.chunk(self.degree, dim=1)[self.rank].clone(memory_format=torch.contiguous_format)

    def gather(self, x):
        """
        The inverse of split, on every process of the group (differentiable: see GatherTokens).
        :param x: [B x T/N x C] this process's share. :return: [B x T x C].
        """
        return GatherTokens.apply(x, self.group, self.rank)


class GatherTokens(torch.autograd.Function):
    """
    All-gather along the tokens over a sequence group. Its backward is the gather's transpose: the sum over the
    group's processes of the gradient of this process's share (an all-reduce, then the share). Not torch's
    torch.distributed.nn.functional.all_gather: on gloo its backward scatters from a group's ranks as if they were
    global ones, which fails in every group but the first (torch 2.14.1; measured with 4 processes in 2 groups).
    """

    @staticmethod
    def forward(ctx, x, group, rank):
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)                                   # (B, T, C)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)         # (B, T, C), reduced in place
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), dim=1)[ctx.rank], None, None  # (B, T/N, C)
