"""DiT: the diffusion transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers".

    from models import DiT_models
    model = DiT_models["DiT-XL/2"](input_size=32)            # 256x256 images -> 32x32 latents
    model.load_state_dict(torch.load("DiT-XL-2-256x256.pt"))  # released checkpoints load unchanged

    from models import VDiT_models, load_image_weights    # video: [N, C, F, H, W] clips
    video = VDiT_models["VDiT-XL/2"](input_size=32, num_frames=16)
    load_image_weights(video, torch.load("DiT-XL-2-256x256.pt"))  # the spatial part; starts as DiT per frame

Module and parameter names follow the paper and are the checkpoint's keys, so they must not change.
Numerically this equals the published code (facebookresearch/DiT, commit ed81ce2) for the same
weights and inputs; tests/test_models.py checks it against tests/golden/. It differs in how the
work is done: attention goes through `scaled_dot_product_attention`, adaLN modulation and gated
residuals are fused into single `addcmul` kernels, the patch embedding is a matmul, and each block can
be recomputed in the backward pass (gradient checkpointing) without changing any number. VDiT, the
video model, is DiT's blocks plus temporal ones (see its docstring).
"""
import enum
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Guidance(enum.Enum):
    """Which output channels classifier-free guidance acts on."""

    # The published DiT code guides only the first 3 of the 4 latent channels (a leftover it keeps
    # for reproducibility); its FID figures were measured that way, so it stays the default.
    DIT = "dit"
    # Standard classifier-free guidance: every noise-prediction channel.
    ALL = "all"


#################################################################################
#                     Embedding layers for timesteps and labels                 #
#################################################################################


class PatchEmbed(nn.Module):
    """Cuts a [N, C, H, W] input into p x p patches and projects each to a D-vector token.

    Stored as a stride-p convolution (`proj`, the checkpoints' layout) but computed as one matmul
    over the unfolded patches, which is the same sum and is faster than a convolution on CPU.
    """

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        N, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(N, C, H // p, p, W // p, p)                   # (N, C, h, p, w, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * p * p)  # (N, T, C*p*p), row-major patches
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, C*p*p)
        return F.linear(x, weight, self.proj.bias)                 # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar (possibly fractional) timesteps into D-vectors: sinusoids, then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """
        Sinusoidal timestep embeddings, cosines first, as in the reference.
        :param t: [N] timesteps, integer or fractional.
        :param dim: the embedding width.
        :param max_period: the lowest frequency is 1 / max_period.
        :return: [N x dim] float32 embeddings.
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                            # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding                                                   # (N, dim)

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))               # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels into D-vectors; label dropout (to the extra null class) trains CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replaces labels by the null class `num_classes`: at random, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


def _xavier_linear(module):
    """Transformer linears: Xavier-uniform weights (ViT practice), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.constant_(module.bias, 0)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per sample; x (N, T, D), shift and scale (N, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class Attention(nn.Module):
    """Multi-head self-attention; `qkv` and `proj` keep the names (and layout) of timm's Attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, "hidden size must be divisible by the number of heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.ulysses = None  # sequence parallel: a DistributedAttention, set by DiT.set_sequence_parallel

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)  # (N, T, 3, H, D/H)
        if self.ulysses is not None:  # T is this process's share of each sequence
            q, k, v = qkv.unbind(2)                                              # 3 x (N, T, H, D/H)
            x = self.ulysses(q, k, v, batch_dim_idx=0)                           # (N, T, H, D/H) over all tokens
            return self.proj(x.reshape(N, T, D))                                 # (N, T, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                           # 3 x (N, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)                              # (N, H, T, D/H)
        x = x.transpose(1, 2).reshape(N, T, D)                                   # (N, T, D)
        return self.proj(x)                                                      # (N, T, D)


class Mlp(nn.Module):
    """Token-wise MLP with tanh-approximated GELU; `fc1` and `fc2` keep timm's names."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (N, T, D)


class DiTBlock(nn.Module):
    """A transformer block whose LayerNorms are modulated, and residuals gated, by the condition c.

    It attends within each of its B input sequences. B may be G times the number N of conditions, each
    sample's G sequences consecutive (VDiT's frames, or its spatial positions): the modulation is then
    computed once per sample and broadcast over its G*T tokens rather than once per sequence.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, pos=None):
        # x (B, T, D) tokens, B = N*G; c (N, D) condition; pos None or (1, T, D), added to the attention's
        # input only, never to the residual stream (VDiT's temporal position: see VDiT)
        B, T, D = x.shape
        N = c.shape[0]
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)                 # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        h = self.norm1(x if pos is None else x + pos).reshape(N, -1, D)      # (N, G*T, D)
        h = self.attn(modulate(h, shift_msa, scale_msa).reshape(B, T, D))   # (B, T, D)
        x = torch.addcmul(x.reshape(N, -1, D), gate_msa.unsqueeze(1), h.reshape(N, -1, D))  # (N, G*T, D)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))          # (N, G*T, D)
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), h)                       # (N, G*T, D)
        return x.reshape(B, T, D)                                            # (B, T, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a projection of each token to its patch of output channels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)           # (N, T, D)
        return self.linear(x)                                    # (N, T, p*p*out_channels)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    num_classes=0 builds an unconditional model (no label input). With learn_sigma the output has
    2 * in_channels channels: the noise prediction, then the variance interpolation v of
    Nichol & Dhariwal. grad_checkpointing recomputes each block in the backward pass.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        grad_checkpointing=False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the input size {input_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos embedding, kept as a frozen parameter because the checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.sequence = None  # a sequence.SequenceParallel: see set_sequence_parallel
        self.initialize_weights()

    def initialize_weights(self):
        """The reference's initialisation; each choice with its reason."""
        # Transformer linears: Xavier-uniform (ViT practice), zero biases.
        self.apply(_xavier_linear)

        # Position embedding: fixed 2-D sin-cos, so the model needs no learned positions.
        grid_size = self.input_size // self.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding: Xavier-uniform as if it were a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Embedding tables and the timestep MLP: small normal weights, as in ViT/ADM embeddings.
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero the modulation outputs so every block starts as the identity (gates are
        # zero), the paper's best-performing conditioning (Section 3.2).
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Final layer zeroed too: the untrained model predicts exactly zero.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens -> (N, C, H, W) images."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)           # (N, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)                    # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)      # (N, C, H, W)

    def forward(self, x, t, y=None, force_drop_ids=None):
        """
        :param x: [N x C x H x W] noisy inputs (latents or pixels).
        :param t: [N] diffusion timesteps.
        :param y: [N] class labels (num_classes is the null label); None for unconditional models.
        :param force_drop_ids: [N], 1 where the label is replaced by the null label; None: dropped at
            random in training mode, as DiT (train.py draws them per sample itself, so that a batch split
            into micro-batches draws the same).
        :return: [N x out_channels x H x W].
        """
        x = self.x_embedder(x) + self.pos_embed              # (N, T, D), T = H*W / p^2
        c = self.condition(t, y, force_drop_ids)             # (N, D)
        if self.sequence is not None:
            x = self.sequence.split(x)                       # (N, T/P, D) this process's tokens of P
        for block in self.blocks:
            x = self.run_block(block, x, c)                  # (N, T, D), or (N, T/P, D)
        x = self.final_layer(x, c)                           # (N, T, p*p*out_channels), or (N, T/P, ...)
        if self.sequence is not None:
            x = self.sequence.gather(x)                      # (N, T, p*p*out_channels) from the P processes
        return self.unpatchify(x)                            # (N, out_channels, H, W)

    def set_sequence_parallel(self, sequence):
        """
        Split each sample's tokens (each frame's, in a VDiT) over the processes of `sequence`, a
        sequence.SequenceParallel (see sequence.py): forward then takes and returns whole samples, as the same
        inputs on every process of the group, and each process keeps only its share of the activations. The
        attention of `blocks` goes through the group's Ulysses attention; a VDiT's temporal attention stays local.
        Weights and state_dict keys are unchanged (DistributedAttention holds no parameter).
        """
        assert self.num_heads % sequence.degree == 0 and self.pos_embed.shape[1] % sequence.degree == 0  # sequence.check
        self.sequence = sequence
        for block in self.blocks:
            block.attn.ulysses = sequence.attention()

    def condition(self, t, y, force_drop_ids):
        """:return: [N x D] the condition c of adaLN: the timestep embedding plus the label's (see forward)."""
        c = self.t_embedder(t)                               # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        return c

    def run_block(self, block, x, c, pos=None):
        """block(x, c, pos), recomputed in the backward pass under grad_checkpointing."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, pos, use_reentrant=False)
        return block(x, c, pos)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance=Guidance.DIT, interval=None):
        """
        Classifier-free guidance: one batched pass over the conditional and the null-label half.
        :param x: [2N x C x H x W] ([2N x C x F x H x W] for a VDiT); only the first half is read, the second
            is its copy.
        :param t: [2N] timesteps of the original (unrespaced) process.
        :param y: [2N] labels: the N classes, then N null labels (num_classes).
        :param cfg_scale: the guidance scale s in eps_uncond + s * (eps_cond - eps_uncond).
        :param guidance: a Guidance (or its string): which noise channels are guided.
        :param interval: optional (t_lo, t_hi): guide only where t_lo <= t <= t_hi; elsewhere the
            conditional prediction is returned unchanged.
        :return: [2N x out_channels x H x W] (x F for a VDiT), both halves the guided prediction.
        """
        if self.y_embedder is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes > 0)")
        guidance = Guidance(guidance)
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)  # (2N, out_channels, H, W)
        # Never guide the variance channels, also when there are fewer than 3 input channels.
        n_guided = min(3, self.in_channels) if guidance is Guidance.DIT else self.in_channels
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # 2 x (N, n_guided, H, W)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if interval is not None:
            t_lo, t_hi = interval
            t_half = t[: len(half)].view(-1, *[1] * (half_eps.dim() - 1))  # (N, 1, 1, 1), or (N, 1, 1, 1, 1) for video
            half_eps = torch.where((t_lo <= t_half) & (t_half <= t_hi), half_eps, cond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class VDiT(DiT):
    """DiT over video: [N, C, F, H, W] clips, every DiT block followed by a temporal block.

    The factorisation is Latte's variant 1 (Ma et al. 2024, "Latte: Latent Diffusion Transformer for Video
    Generation"), spatial and temporal transformer blocks interleaved, which its ablation of four ways to
    split spatio-temporal attention found best (against all spatial blocks before all temporal ones,
    spatial then temporal attention inside one block, and heads split between the two). Full attention
    over all F*h*w tokens is what the four avoid: its cost grows with (F*h*w)^2. (Code read for these
    facts: github.com/Vchitect/Latte/blob/b27c24a17487e3c33ae4e92364521303d0f14845/models/latte.py and
    github.com/hpcaitech/Open-Sora/blob/c861b988ad109e528a919f99f1a6e74137365f91/opensora/models/stdit/stdit.py.)

    Each of DiT's `depth` blocks (`blocks`, the image model's keys and weights: attention over a frame's
    h*w tokens) is followed by `temporal_blocks[i]`, a DiTBlock of the same width attending over the F
    frames at each spatial position, conditioned by adaLN-Zero on the same c (time + class). Its gates
    start at zero, so it starts as the identity and the untrained VDiT is the image DiT applied to each
    frame, as Open-Sora 1.0's STDiT starts from its image model (there by a zeroed temporal output
    projection). An image checkpoint therefore fills every spatial block (load_image_weights), and the
    video model has twice the image model's blocks (Latte instead splits one depth between the two).

    The frame order is a fixed 1-D sin-cos embedding, `temporal_pos_embed` [1, F, D], added to the input
    of every temporal block's attention (before its LayerNorm) and never to the residual stream: Latte
    adds it to the stream before the first temporal block, which would change the next spatial blocks'
    input and break the per-frame start; Open-Sora adds it to the first temporal attention's input only,
    but at initialisation that block writes nothing into the stream, so the later temporal attentions
    would not see the order; adding it to each costs one addition per block.
    """

    def __init__(self, num_frames=16, **kwargs):
        super().__init__(**kwargs)
        self.num_frames = num_frames
        hidden_size = self.pos_embed.shape[-1]
        mlp_ratio = self.blocks[0].mlp.fc1.out_features / hidden_size
        self.temporal_blocks = nn.ModuleList(
            [DiTBlock(hidden_size, self.num_heads, mlp_ratio) for _ in range(len(self.blocks))])
        # Fixed sin-cos embedding, a frozen parameter as pos_embed, so checkpoints store it alike.
        self.temporal_pos_embed = nn.Parameter(torch.zeros(1, num_frames, hidden_size), requires_grad=False)
        self.initialize_temporal_weights()

    def initialize_temporal_weights(self):
        """The temporal part's initialisation (DiT.initialize_weights did the spatial part); each choice with
        its reason."""
        # Linears as DiT's own: Xavier-uniform, zero biases.
        self.temporal_blocks.apply(_xavier_linear)
        # Frame positions: fixed 1-D sin-cos over the frame index, as pos_embed is 2-D sin-cos over the grid.
        pos = get_1d_sincos_pos_embed(self.temporal_pos_embed.shape[-1], np.arange(self.num_frames, dtype=np.float64))
        self.temporal_pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # adaLN-Zero: zero gates, so each temporal block is the identity and the model starts as the image
        # model on each frame (the identity-at-initialisation test holds to float precision).
        for block in self.temporal_blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

    def forward(self, x, t, y=None, force_drop_ids=None):
        """
        :param x: [N x C x F x H x W] noisy clips, F = num_frames.
        :param t, y, force_drop_ids: as DiT.forward, one per clip.
        :return: [N x out_channels x F x H x W].
        """
        N, C, Fr, H, W = x.shape
        if Fr != self.num_frames:
            raise ValueError(f"this VDiT takes clips of {self.num_frames} frames, not {Fr}")
        x = x.transpose(1, 2).reshape(N * Fr, C, H, W)             # (N*F, C, H, W) frames as images
        x = self.x_embedder(x) + self.pos_embed                     # (N*F, S, D), S = H*W / p^2
        if self.sequence is not None:
            x = self.sequence.split(x)                              # (N*F, S/P, D): this process's positions
        S, D = x.shape[1:]                                          # S/P from here on under sequence parallel
        c = self.condition(t, y, force_drop_ids)                    # (N, D)
        for block, temporal in zip(self.blocks, self.temporal_blocks):
            x = self.run_block(block, x, c)                         # (N*F, S, D) attention within each frame
            x = x.reshape(N, Fr, S, D).transpose(1, 2).reshape(N * S, Fr, D)  # (N*S, F, D)
            x = self.run_block(temporal, x, c, self.temporal_pos_embed)     # (N*S, F, D) attention over frames
            x = x.reshape(N, S, Fr, D).transpose(1, 2).reshape(N * Fr, S, D)  # (N*F, S, D)
        x = self.final_layer(x.reshape(N, Fr * S, D), c)            # (N, F*S, p*p*out_channels)
        x = x.reshape(N * Fr, S, -1)                                # (N*F, S, p*p*out_channels)
        if self.sequence is not None:
            x = self.sequence.gather(x)                             # (N*F, S*P, p*p*out_channels): every position
        x = self.unpatchify(x)                                      # (N*F, out_channels, H, W)
        return x.reshape(N, Fr, -1, H, W).transpose(1, 2).contiguous()  # (N, out_channels, F, H, W)


def load_image_weights(video_model, state_dict):
    """
    Fills a VDiT's spatial part from an image DiT's state_dict of the same width (a released DiT-XL/2
    checkpoint for VDiT-XL/2 included): every key of state_dict must be a key of the video model with the
    same shape. To start a model with other classes from ImageNet weights, leave y_embedder's table out of
    state_dict: it then keeps its initialisation and is listed with the rest.
    :param video_model: a VDiT.
    :param state_dict: the image model's weights (name -> tensor).
    :return: the video model's keys it did not fill, in state_dict order (the temporal ones, and any left out).
    :raises ValueError: naming an image key the video model lacks, or a key and both shapes where they differ.
    """
    target = video_model.state_dict()
    extra = [k for k in state_dict if k not in target]
    if extra:
        raise ValueError(f"{len(extra)} image keys have no place in the video model: {', '.join(extra[:5])}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"{k}: the image checkpoint has shape {list(v.shape)}, the video model "
                             f"{list(target[k].shape)} (another width, patch, input size or class count)")
    video_model.load_state_dict(state_dict, strict=False)
    return [k for k in target if k not in state_dict]


#################################################################################
#                      REPA: alignment with an encoder's tokens                 #
#################################################################################


class Projector(nn.Module):
    """
    REPA's projector (Yu et al. 2025, "Representation Alignment for Generation"): an MLP taking the hidden
    tokens of one DiT block to the width of a frozen encoder's patch tokens. It is trained with the DiT and
    dropped after training; train.py keeps it out of the DiT's state_dict (checkpoints store it apart), so
    the trained weights stay strict-loadable into DiT_models.
    """

    def __init__(self, hidden_size, feature_dim, projector_dim=2048):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, feature_dim),
        )
        # Xavier-uniform weights and zero biases, as every linear of the DiT (REPA initialises it so too).
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, h):
        return self.mlp(h)  # (N, T, D) -> (N, T, feature_dim)


def alignment_loss(projected, features):
    """
    REPA's loss: minus the cosine similarity of each projected token with the encoder's token at the same
    place, averaged over the tokens.
    :param projected: [N x T x F] the projector's output; features: [N x T x F] the encoder's patch tokens.
    :return: [N] per-sample losses in [-1, 1].
    """
    similarity = (F.normalize(projected, dim=-1) * F.normalize(features, dim=-1)).sum(dim=-1)  # (N, T)
    return -similarity.mean(dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def forward_flops_per_image(model):
    """
    Matmul FLOPs (2 per multiply-add) of one forward pass of a DiT for one image, or of a VDiT for one clip
    of F = num_frames frames, from its shapes. Per block and token: qkv 3D^2, attention projection D^2,
    MLP 2 * D * hidden multiply-adds, plus QK^T and AV, 2 L D each for a sequence of L tokens; per block
    and sample the adaLN linear (D -> 6D). A DiT block attends over the T tokens of a frame (F = 1 for a
    DiT); a VDiT's temporal block over the F frames at each of the T positions. Then the patch embedding,
    the final layer and its adaLN (D -> 2D), and the timestep MLP (256 -> D -> D). Norms, softmax and
    elementwise work are left out, as in MFU figures. Training costs 3x this (the backward is two matmuls
    per forward matmul); gradient checkpointing recomputes the forward, but that extra work is not counted
    as useful (the usual MFU convention).
    """
    T = (model.input_size // model.patch_size) ** 2
    frames = getattr(model, "num_frames", 1)
    D = model.pos_embed.shape[-1]
    p2 = model.patch_size ** 2
    hidden = model.blocks[0].mlp.fc1.out_features
    per_token = 4 * D * D + 2 * D * hidden
    block = frames * T * (per_token + 2 * T * D) + 6 * D * D
    temporal = T * frames * (per_token + 2 * frames * D) + 6 * D * D
    rest = frames * T * (model.in_channels * p2 * D + D * p2 * model.out_channels) + 2 * D * D \
        + model.t_embedder.frequency_embedding_size * D + D * D
    return 2 * (len(model.blocks) * block + len(getattr(model, "temporal_blocks", ())) * temporal + rest)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """
    :return: [grid_size*grid_size x embed_dim] float64, token k = (row i, column j) in row-major
        order; the first half of the dims encodes j, the second half i (the reference's layout).
    """
    assert embed_dim % 4 == 0, "the 2-D sin-cos embedding needs a width divisible by 4"
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32), indexing="ij")
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))  # (T, D/2)
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))  # (T, D/2)
    return np.concatenate([emb_cols, emb_rows], axis=1)                  # (T, D)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """:return: [len(pos) x embed_dim]: sin(pos * omega) then cos(pos * omega), omega = 1e4^(-2k/embed_dim)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D/2,)
    out = np.outer(pos, omega)                                   # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)    # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# name: (depth, hidden_size, num_heads, patch_size); the paper's Table 1 sizes times patch sizes 2, 4, 8.
DIT_CONFIGS = {
    f"DiT-{size}/{patch}": (depth, width, heads, patch)
    for size, (depth, width, heads) in {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}.items()
    for patch in (2, 4, 8)
}


def _make_constructor(depth, hidden_size, num_heads, patch_size, cls=DiT):
    def constructor(**kwargs):
        return cls(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)

    return constructor


DiT_models = {name: _make_constructor(*config) for name, config in DIT_CONFIGS.items()}

# The reference's function names, which notebooks import directly (`from models import DiT_XL_2`).
DiT_XL_2, DiT_XL_4, DiT_XL_8 = DiT_models["DiT-XL/2"], DiT_models["DiT-XL/4"], DiT_models["DiT-XL/8"]
DiT_L_2, DiT_L_4, DiT_L_8 = DiT_models["DiT-L/2"], DiT_models["DiT-L/4"], DiT_models["DiT-L/8"]
DiT_B_2, DiT_B_4, DiT_B_8 = DiT_models["DiT-B/2"], DiT_models["DiT-B/4"], DiT_models["DiT-B/8"]
DiT_S_2, DiT_S_4, DiT_S_8 = DiT_models["DiT-S/2"], DiT_models["DiT-S/4"], DiT_models["DiT-S/8"]

# Not from the paper: small sizes for demo.py's 8x8 handwritten digits (4.2M parameters with 3
# input channels; a 2-core CPU trains them for the demo in minutes; /4 sees 4 tokens per digit, /2
# 16). The scripts accept them since they are in DiT_models; they are not in DIT_CONFIGS, which
# holds the paper's sizes only.
DiT_models["DiT-Digits/2"] = _make_constructor(depth=6, hidden_size=192, num_heads=4, patch_size=2)
DiT_models["DiT-Digits/4"] = _make_constructor(depth=6, hidden_size=192, num_heads=4, patch_size=4)

# Video sizes: each DiT size (and the digits demo's /4) with a temporal block after every block, so that
# the image model of the same name without the "V" fills its spatial part (load_image_weights).
VDiT_models = {"V" + name: _make_constructor(*config, cls=VDiT) for name, config in DIT_CONFIGS.items()}
VDiT_models["VDiT-Digits/4"] = _make_constructor(depth=6, hidden_size=192, num_heads=4, patch_size=4, cls=VDiT)
