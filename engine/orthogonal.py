"""Orthogonal matrices for rotations of a model (``engine/rotation.py``): Hadamard matrices where one is known,
Haar-random orthogonal ones otherwise.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``, so ``H / sqrt(n)`` is orthogonal and
spreads every coordinate evenly over all the others: what QuaRot (Ashkboos et al. 2024, arXiv:2404.00456) uses to
remove outliers from the residual stream. Orders built here:

* ``2^k``: Sylvester, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``;
* ``q + 1`` for a prime ``q = 3 (mod 4)``: Paley's construction I, ``I + S`` with ``S`` the skew conference matrix
  ``[[0, 1^T], [-1, J]]`` of the Jacobsthal matrix ``J[i, j] = chi(j - i)`` (``chi``: the quadratic character of
  GF(q));
* ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``: Paley's construction II, where ``S = [[0, 1^T], [1, J]]`` is
  symmetric and each entry becomes a 2 x 2 block: ``S (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``;
* ``2^k m`` with ``m`` one of the above: the Kronecker product ``H_m (x) H_{2^k}``.

SmolLM2's width 576 = 36 x 16: order 36 is Paley II over GF(17) (2 (17 + 1) = 36), Kronecker with Sylvester 16.
(The same trick as QuaRot's ``hadamard_utils.py``, which stores its base matrices as tables; here they are built.)

A randomised Hadamard rotation is ``diag(s) H / sqrt(n)`` with a seeded random sign vector ``s``: still orthogonal,
and a different matrix per seed. Where no construction applies (an order that is not 1, 2 or a multiple of 4 has
no Hadamard matrix at all), :func:`rotation_matrix` falls back to a Haar-random orthogonal matrix and says so.
Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TritonqError

ROTATION_KINDS = ("none", "hadamard", "random")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise TritonqError(f"a Sylvester Hadamard matrix has a power-of-two order, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``J[i, j] = chi(j - i)`` over GF(q), q prime: +1 for a nonzero square, -1 for a non-square, 0 on the diagonal."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int, skew: bool) -> torch.Tensor:
    """The conference matrix of order ``q + 1`` bordering the Jacobsthal matrix: skew (``q = 3 mod 4``) or
    symmetric (``q = 1 mod 4``)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0 if skew else 1.0
    s[1:, 1:] = _jacobsthal(q)
    return s


def paley_1(q: int) -> torch.Tensor:
    """Hadamard of order ``q + 1``, ``q`` a prime with ``q = 3 (mod 4)`` (Paley 1933, construction I)."""
    return torch.eye(q + 1, dtype=torch.float64) + _conference(q, skew=True)


def paley_2(q: int) -> torch.Tensor:
    """Hadamard of order ``2 (q + 1)``, ``q`` a prime with ``q = 1 (mod 4)`` (Paley 1933, construction II)."""
    s = _conference(q, skew=False)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # replaces each +-1 entry (times it)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)  # replaces each 0 (the diagonal)
    return torch.kron(s, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _base(m: int) -> tuple[str, torch.Tensor] | None:
    """A Hadamard matrix of order ``m`` from Paley's constructions (or order 1 / 2), with how it was built."""
    if m in (1, 2):
        return f"Sylvester {m}", sylvester(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return f"Paley I (GF({m - 1}))", paley_1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return f"Paley II (GF({m // 2 - 1}))", paley_2(m // 2 - 1)
    return None


def hadamard(n: int) -> tuple[torch.Tensor, str] | None:
    """A Hadamard matrix of order ``n`` (entries +-1) and how it was built, or None where no construction here
    applies. ``n = m 2^k`` with the smallest base order ``m`` that Paley builds."""
    if n < 1:
        raise TritonqError(f"a Hadamard matrix needs a positive order, not {n}")
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        base = _base(n // power)
        if base is not None:
            how, h = base
            if n // power <= 2:
                return sylvester(n), f"Sylvester {n}"
            return torch.kron(h, sylvester(power)), f"{how} {n // power}" + (f" x Sylvester {power}" if power > 1
                                                                             else "")
        power //= 2
    return None


def hadamard_factors(n: int) -> tuple[torch.Tensor | None, int, str] | None:
    """``H_n = B (x) Sylvester(p)`` as its factors ``(B, p, how)`` for the fast transform (``kernels/hadamard.py``):
    ``B`` the +-1 base of the smallest order ``m = n / p`` Paley builds (None where ``m`` is 1, ``p = n``), the
    same matrix as :func:`hadamard`; None where no construction here applies."""
    built = hadamard(n)
    if built is None:
        return None
    _, how = built
    if how.startswith("Sylvester"):
        return None, n, how
    power = n & -n
    while _base(n // power) is None or n // power <= 2:
        power //= 2
    return _base(n // power)[1], power, how


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``[n, n]`` in float64: QR of a Gaussian, the signs of ``diag(R)`` moved into ``Q``
    so the distribution is uniform (Mezzadri 2007, "How to generate random matrices from the classical compact
    groups")."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


@dataclass(frozen=True)
class Rotation:
    """One orthogonal matrix and how it was made (recorded in ``quantization.json``)."""

    matrix: torch.Tensor  # float64 [n, n], orthogonal
    kind: str  # "hadamard" or "random"
    construction: str  # e.g. "Paley II (GF(17)) 36 x Sylvester 16, random signs" or "Haar random (QR)"

    def describe(self) -> dict:
        return {"size": self.matrix.shape[0], "kind": self.kind, "construction": self.construction}


def rotation_matrix(n: int, kind: str, generator: torch.Generator) -> Rotation:
    """An orthogonal ``[n, n]`` of ``kind``: ``"hadamard"`` (sign-randomised ``diag(s) H / sqrt(n)``; a random
    orthogonal matrix where no Hadamard construction of order ``n`` is known here) or ``"random"`` (Haar)."""
    if kind not in ROTATION_KINDS[1:]:
        raise TritonqError(f"unknown rotation {kind!r}; use one of {', '.join(ROTATION_KINDS[1:])}")
    if kind == "hadamard":
        built = hadamard(n)
        if built is not None:
            h, how = built
            signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
            return Rotation(signs[:, None] * h / n**0.5, "hadamard", f"{how}, random signs")
        return Rotation(random_orthogonal(n, generator), "random", f"no Hadamard construction of order {n} here: "
                                                                    "Haar random (QR)")
    return Rotation(random_orthogonal(n, generator), "random", "Haar random (QR)")
