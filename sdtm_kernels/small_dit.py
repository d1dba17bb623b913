"""A compact adaLN-Zero DiT (facebookresearch/DiT layout) for benchmarks without diffusers.

``SmallDiT(in_channels, hidden, depth, heads, patch, grid, cond_dim)`` maps a latent
``[B, in_channels, H, W]``, a timestep ``t [B]`` and a pooled condition ``y [B, cond_dim]``
(e.g. a text embedding) to a velocity of the latent's shape. Blocks are standard DiT blocks::

    shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate1 * attn(modulate(norm1(x), shift1, scale1))
    x = x + gate2 * mlp(modulate(norm2(x), shift2, scale2))

so ``sdtm_kernels.dit.wrap_dit_blocks`` wraps them with ``modulation=dit_modulation``.
Weights are random (the adaLN layers are *not* zero-initialised, so every block does work);
speed does not depend on the weights.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def dit_modulation(block, c):
    """The six ``[B, C]`` modulation tensors of a ``DiTBlock`` for condition ``c``."""
    return block.adaLN_modulation(c).chunk(6, dim=1)


def timestep_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(grid, dim):
    """Fixed 2D sin-cos position embedding ``[H*W, dim]`` (raster order)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = dit_modulation(self, c)
        x = x + gate1.unsqueeze(1) * self.attn(self.norm1(x) * (1 + scale1.unsqueeze(1)) + shift1.unsqueeze(1))
        return x + gate2.unsqueeze(1) * self.mlp(self.norm2(x) * (1 + scale2.unsqueeze(1)) + shift2.unsqueeze(1))


class SmallDiT(nn.Module):
    """adaLN-Zero DiT with a pooled condition instead of class labels."""

    def __init__(self, in_channels=4, hidden=256, depth=4, heads=4, patch=2, grid=(16, 16), cond_dim=256,
                 mlp_ratio=4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be a multiple of heads={heads}")
        self.in_channels, self.hidden, self.patch, self.grid = in_channels, hidden, patch, tuple(grid)
        self.mlp_ratio = mlp_ratio
        self.x_embed = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, hidden), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Linear(cond_dim, hidden)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.proj_out = nn.Linear(hidden, patch * patch * in_channels)

    def forward(self, x, t, y):
        b, _, h, w = x.shape
        p = self.patch
        if (h // p, w // p) != self.grid:
            raise ValueError(f"latent {h}x{w} with patch {p} does not match the model grid {self.grid}")
        tokens = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embed(timestep_embedding(t, 256).to(x.dtype)) + self.y_embed(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=1)
        tokens = self.proj_out(self.norm_out(tokens) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        gh, gw = self.grid
        out = tokens.reshape(b, gh, gw, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.in_channels, gh * p, gw * p)
