"""Orthogonal rotations for the rotate pass (QuaRot / SpinQuant style), as pure tensors.

Hadamard matrices (entries ±1, H Hᵀ = n I) are built for every order this module can reach:
  Sylvester   H_2n = [[H_n, H_n], [H_n, -H_n]]                      (doubling)
  Paley I     order q + 1 for a prime q ≡ 3 (mod 4)   (12, 20, 24, 32, 44, 48, 60, 72, ...)
  Paley II    order 2 (q + 1) for a prime q ≡ 1 (mod 4)   (12, 28, 36, 60, 76, ...)
  Kronecker   H_a ⊗ H_b for any two reachable orders
so SmolLM2's sizes are covered: 576 = H_72 (Paley I, q = 71) doubled three times, 1536 = H_12 ⊗
H_128, 64 = Sylvester. Orders with no reachable Hadamard (any n ≡ 2 mod 4 beyond 2, odd n > 1,
and a few multiples of 4 whose Paley prime does not exist) fall back to a seeded random orthogonal
matrix (QR of a Gaussian with the sign of R's diagonal fixed, so the seed alone decides it).

An online rotation of a width n is kept in Kronecker form: n = m · p with p a power of two, the
rotation R = A ⊗ H_p / √p where A is an m×m orthogonal block (a normalised Hadamard of order m
when one exists, else the seeded random one). A graph node applies it as a fast Walsh-Hadamard
over p plus an m×m matmul (ir/ops.py: apply_online, the op online_rotate); the same R, dense, folds into the weights.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..ir.ops import apply_online

KINDS = ("hadamard", "random")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod the prime q (0 at 0, ±1 elsewhere)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if d in residues else -1 for d in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley_core(q: int, sign: int) -> torch.Tensor:
    """[[0, 1ᵀ], [sign·1, Q]] of order q + 1."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = sign
    c[1:, 1:] = _jacobsthal(q)
    return c


def _double(h: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)


@lru_cache(maxsize=None)
def _build(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    if n & (n - 1) == 0:  # Sylvester's, the matrix a fast Walsh-Hadamard transform applies
        return _double(_build(n // 2))
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        # Q is skew-symmetric here, so I + [[0, 1ᵀ], [-1, Q]] is a Hadamard matrix.
        return torch.eye(n, dtype=torch.float64) + _paley_core(n - 1, -1)
    q = n // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        c = _paley_core(q, 1)  # symmetric conference matrix
        h2 = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64),
                                              torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    half = _build(n // 2)
    if half is not None:
        return _double(half)
    for a in range(4, math.isqrt(n) + 1, 2):
        if n % a == 0:
            ha, hb = _build(a), _build(n // a)
            if ha is not None and hb is not None:
                return torch.kron(ha, hb)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (float64), or None when none is reachable (see above)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive int order, got {n!r}")
    h = _build(n)
    return None if h is None else h.clone()


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal n×n matrix (float64): Q of a Gaussian's QR, columns signed by
    R's diagonal so the result is Haar-distributed and fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def kronecker_split(n: int) -> tuple[int, int]:
    """n = m · p with p the largest power of two for which a Hadamard of order m is reachable;
    when none is, m is n's odd part (its block will be random orthogonal)."""
    p = n & -n
    while p > 1 and _build(n // p) is None:
        p //= 2
    if _build(n // p) is None:
        p = n & -n
    return n // p, p


def online_block(n: int, seed: int = 0) -> torch.Tensor:
    """The m×m orthogonal block A of the online rotation A ⊗ H_p / √p of width n (float64)."""
    m, _ = kronecker_split(n)
    h = _build(m)
    return h / math.sqrt(m) if h is not None else random_orthogonal(m, seed)


def describe_online(n: int) -> str:
    m, p = kronecker_split(n)
    block = f"H{m}" if _build(m) is not None else f"random-orthogonal{m}"
    return block if p == 1 else f"{block} x H{p}" if m > 1 else f"H{p}"


def dense_online(n: int, seed: int = 0) -> torch.Tensor:
    """The online rotation of width n as a dense n×n matrix (float64), for folding into weights."""
    return apply_online(torch.eye(n, dtype=torch.float64), online_block(n, seed))


def residual_rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    """The residual-stream rotation R1 (n×n, float64, orthogonal). hadamard: QuaRot's randomised
    Hadamard diag(s) · H / √n with seeded random signs s (H the Kronecker form above, which is a
    plain Hadamard when m has one); random: a seeded random orthogonal matrix."""
    if kind == "random":
        return random_orthogonal(n, seed)
    if kind != "hadamard":
        raise ValueError(f"unknown rotation kind {kind!r}; kinds: {', '.join(KINDS)}")
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * dense_online(n, seed)


def head_rotation(head_dim: int, heads: int) -> torch.Tensor:
    """Block-diagonal rotation of `heads` heads of width head_dim, each by the online rotation of
    head_dim (a normalised Hadamard for power-of-two head dims)."""
    return torch.block_diag(*[dense_online(head_dim)] * heads)
