"""Online Hadamard rotation of the MLP's down-projection input (after QuaRot, Ashkboos et al., 2024).

The input of down_proj, ``act(gate(x)) * up(x)``, has a few channels hundreds of times larger than the
rest. SmoothQuant can only move that range into the weights; a rotation spreads it over many channels.
With ``R = diag(signs) . blockdiag(H_b, ..., H_b)`` (``H_b`` the normalised Sylvester Hadamard matrix
of order ``b``, ``signs`` random +-1), ``R`` is orthogonal, so ``(x R) (W R)^T = x W^T``: the weight is
rotated offline and the activation online, by one small MatMul per layer (``b`` multiply-adds per
element of the input; 128 of them against down_proj's 576 for SmolLM2-135M). The elementwise product
before down_proj keeps ``R`` from being folded into up_proj, hence the online half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slm_export.errors import ConfigError

MAX_BLOCK = 128


def hadamard(n: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of order ``n`` (a power of two); symmetric, orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, not {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / float(np.sqrt(n))


def block_size(dim: int, cap: int = MAX_BLOCK, strict: bool = True) -> int:
    """The largest power of two that divides ``dim``, at most ``cap``; ``strict``: refuse one under 16."""
    b = 1
    while b * 2 <= cap and dim % (b * 2) == 0:
        b *= 2
    if b < 16 and strict:
        raise ConfigError(f"an input of {dim} channels has no power-of-two block of 16 or more to rotate in")
    return b


@dataclass(frozen=True)
class Rotation:
    """``x -> x R``; ``signs`` [dim], ``block`` [b, b]."""

    signs: torch.Tensor
    block: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` for rows ``x`` [..., dim]; also ``W R`` for a weight [out, dim]."""
        b = self.block.shape[0]
        y = (x * self.signs).reshape(*x.shape[:-1], x.shape[-1] // b, b) @ self.block
        return y.reshape(x.shape)


def make_rotation(dim: int, seed: int, cap: int = MAX_BLOCK) -> Rotation:
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1
    return Rotation(signs, hadamard(block_size(dim, cap)))
