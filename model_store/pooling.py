"""Pooling a conv feature map (N, C, h, w) into one descriptor per photo (N, C), L2-normalised."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import normalize


def gem(fmap: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Generalised mean over the whole map: p=1 is average pooling, large p approaches max pooling."""
    return normalize(fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p), dim=1)


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[slice, slice]]:
    """R-MAC grid (Tolias et al. 2016): at level l, square regions of side 2*min(h,w)/(l+1), l per short side,
    evenly spaced and overlapping; 1 + 4 + 9 = 14 regions on a square map at 3 levels."""
    out = []
    for level in range(1, levels + 1):
        side = max(1, round(2 * min(h, w) / (level + 1)))
        ny, nx = (level + round((d - min(h, w)) / side) for d in (h, w))
        for y in np.linspace(0, h - side, ny).round().astype(int):
            for x in np.linspace(0, w - side, nx).round().astype(int):
                out.append((slice(int(y), int(y) + side), slice(int(x), int(x) + side)))
    return out


def rmac(fmap: torch.Tensor, p: float = 3.0, levels: int = 3) -> torch.Tensor:
    """Regional GeM: each region pooled and L2-normalised, summed, L2 again. An object that fills only part of
    a cluttered photo weighs as much in its regions as the clutter does in theirs."""
    total = torch.zeros(fmap.shape[:2], dtype=fmap.dtype, device=fmap.device)
    for ys, xs in rmac_regions(fmap.shape[2], fmap.shape[3], levels):
        total += gem(fmap[:, :, ys, xs], p)
    return normalize(total, dim=1)
