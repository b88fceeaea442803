"""Where a GaLore subspace comes from: the rules of `strategy.svd`, and rank-deficient gradients.

A matrix takes a basis when it has none (its first step, or back in a LISA / OwLore sample), when
its staggered refresh is due, and when its basis has empty columns to fill (below). The rules:
- `sketch`: every micro-batch's gradient A_i (oriented, d x D: the projected side first) adds to
  two randomized sketches in the backward hook, Y += A_i Ω (d x k) and W += Ψ A_i (l x D), with
  k = r + 8, l = 2k + 1 and the same Gaussian Ω, Ψ for all micro-batches of the step (redrawn from
  a seed, never stored). The gradient of the whole batch is then A ≈ Q X with Q = orth(Y) and
  X = (Ψ Q)⁺ W (Tropp, Yurtsever, Udell and Cevher 2017, one-pass low-rank approximation); the
  basis is the top-r left singular vectors of Q X and the step's low-rank gradient is Bᵀ Q X. The
  full gradient never outlives its hook, at any step, and the sketches are about the size of a
  projector and an accumulator.
- `exact` / `randomized`: the SVD (LAPACK, or randomized with power iterations) of the gradient
  accumulated over the step, which layerwise mode keeps until `step()` for the matrices taking a
  basis (galore-torch's rule; the planner counts those gradients).
- `first_micro_batch`: the exact SVD of the first micro-batch's gradient, taken in the hook (the
  rule before the sketch; kept so the two can be compared). Its basis is whatever LAPACK returns,
  including directions a rank-deficient gradient does not support.

Rank-deficient gradients (`sketch`, `exact`, `randomized`): a basis never holds a direction the
gradient does not support. Directions whose singular value is below max(d, D) · eps
times the largest one (numpy's matrix_rank tolerance) are left out and their columns stay zero —
a zero column projects to a zero row of R, which Adam turns into a zero update. The matrix is then
due at its next step, where the empty columns take the leading directions of that step's gradient
outside the kept ones; kept columns (and their moments) are untouched. The decompositions run in
float32 (float64 for a float64 model).

Signs (`sketch`, `randomized`): each new basis vector is turned so that its largest entry is
positive. A singular vector's sign is arbitrary, and LAPACK's choice can flip on a last-bit change
of the matrix (seen: two sketches 4e-16 apart, one of eight vectors reversed); under the default
moment policy (`keep`) Adam's first moment then points backwards along that direction until it
decays, so a basis whose sign follows rounding makes the trajectory follow it too (layerwise and
ordinary mode ended 17% apart on one matrix). `exact` and `first_micro_batch` keep LAPACK's
signs, as galore-torch does, so they stay comparable with it.

Thread count: on the CPU the decompositions run on one thread. LAPACK's QR and SVD (MKL's here)
return last-bit different results at 1 and 2 threads, and a basis carries them into every later
step — the demo's losses parted at step 4 and ended 0.19 apart; torch's matmuls, reductions and
AdamW did not differ at all (300 steps of full AdamW, bitwise equal). One thread costs little: the
decompositions are of a sketch (d x k) or of one matrix at a refresh, and a CPU run trains a small model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch

from lowmem_tune.optim.projector import GaLoreProjector, SVDFailure, as_contiguous, is_fake

BASIS_RULES = ("sketch", "exact", "randomized", "first_micro_batch")
OVERSAMPLE = 8


@contextmanager
def one_cpu_thread(like: torch.Tensor) -> Iterator[None]:
    """Run the block on one intra-op thread when `like` is on the CPU (see the module's "Thread count")."""
    threads = torch.get_num_threads()
    if like.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top_singular_vectors(matrix: torch.Tensor, rank: int, method: str, seed: int = 0, side: str = "left",
                         oversample: int = OVERSAMPLE, power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` singular vectors of a matrix on one side, as columns (U[:, :rank],
    or Vh[:rank]ᵀ for side "right"), and the singular values S[:rank].

    `randomized` is the Halko-Martinsson-Tropp range finder with `oversample` extra columns and
    re-orthonormalized power iterations, written out because svd_lowrank draws from the global
    RNG: here the test matrix comes from a generator seeded per matrix and step, so a resumed or
    a layerwise run reproduces the same basis. Singular vectors come from the SVD of the matrix as
    given (not of its transpose), so their signs are LAPACK's for it, as in galore-torch.
    """
    with one_cpu_thread(matrix):
        if method in ("exact", "first_micro_batch"):
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        else:
            m, n = matrix.shape
            q = min(rank + oversample, m, n)
            basis = torch.linalg.qr(matrix @ gaussian((n, q), seed, matrix)).Q
            for _ in range(power_iters):
                basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
            u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
            u = basis @ u_small
    rank = min(rank, s.shape[0])
    vectors = u.narrow(1, 0, rank) if side == "left" else vh.narrow(0, 0, rank).T
    return vectors, s.narrow(0, 0, rank)


WIDEN_SLAB_BYTES = 64 * 2**20
"""The most of a 16-bit gradient RangeSketch.add holds widened at once."""


def wide(dtype: torch.dtype) -> torch.dtype:
    """What decompositions and sketches run in: float32, or float64 for float64 gradients."""
    return torch.promote_types(dtype, torch.float32)


def gaussian(shape: tuple[int, int], seed: int, like: torch.Tensor) -> torch.Tensor:
    """An N(0, 1) matrix in `like`'s device and dtype, the same for the same seed."""
    if is_fake(like):
        return like.new_empty(shape)
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


def sketch_shape(d: int, big: int, rank: int) -> tuple[int, int]:
    """(k, l): the sketches' widths for an oriented d x big gradient at `rank`; (d, 0) when the
    gradient itself is no bigger than its two sketches, and is then summed exactly instead."""
    k = min(rank + OVERSAMPLE, d)
    l = 2 * k + 1
    return (d, 0) if d * big <= d * k + l * big else (k, l)


class RangeSketch:
    """Y = A Ω and W = Ψ A of an oriented gradient A (d x D), summed over micro-batches (or A
    itself, summed, when that is smaller: see `sketch_shape`)."""

    def __init__(self, d: int, big: int, rank: int, seed: int, like: torch.Tensor) -> None:
        self.k, self.l = sketch_shape(d, big, rank)
        self.seed = seed
        self.micro_batches = 0
        self.exact = self.l == 0
        self.y = like.new_zeros((d, big) if self.exact else (d, self.k), dtype=wide(like.dtype))
        self.w = None if self.exact else like.new_zeros((self.l, big), dtype=wide(like.dtype))

    def add(self, a: torch.Tensor) -> None:
        self.micro_batches += 1
        if self.exact:
            self.y.add_(a)
            return
        omega, psi = gaussian((a.shape[1], self.k), self.seed, self.y), gaussian((self.l, a.shape[0]), self.seed + 1, self.y)
        if a.dtype == self.y.dtype:
            self.y.addmm_(a, omega)
            self.w.addmm_(psi, a)
            return
        # a 16-bit gradient is widened a slab of rows at a time: whole, a 128k-vocabulary
        # embedding's float32 copy alone would be 2 GiB
        rows = max(1, WIDEN_SLAB_BYTES // (a.shape[1] * self.y.element_size()))
        for start in range(0, a.shape[0], rows):
            slab = a[start:start + rows].to(self.y.dtype)
            self.y[start:start + rows].addmm_(slab, omega)
            self.w.addmm_(psi[:, start:start + rows], slab)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, X) with A ≈ Q X: Q (d x k) orthonormal, X (k x D); exactly (I, A) when summed exactly."""
        if self.exact:
            return torch.eye(self.y.shape[0], dtype=self.y.dtype, device=self.y.device), self.y
        with one_cpu_thread(self.y):
            q = torch.linalg.qr(self.y).Q
            psi_q = gaussian((self.l, self.y.shape[0]), self.seed + 1, self.y) @ q
            q2, r2 = torch.linalg.qr(psi_q)
            x = torch.linalg.solve_triangular(r2, q2.T @ self.w, upper=True)
        return q, x

    def nbytes(self) -> int:
        return 4 * (self.y.numel() + (0 if self.w is None else self.w.numel()))


class SketchRoom:
    """How many first-basis sketches one step may open when they must live through several
    micro-batches (with one micro-batch a sketch becomes a basis inside its own hook). They may
    take what the accumulators and projectors of the matrices still without a basis will hold, so
    first bases never need more memory than training with them; one sketch is always admitted.
    The matrices over it take their first basis at a later step (their gradient is dropped)."""

    def __init__(self) -> None:
        self.step, self.room, self.opened = -1, 0, 0

    def admits(self, step: int, nbytes: int, waiting_bytes: Callable[[], int]) -> bool:
        if self.step != step:
            self.step, self.room, self.opened = step, waiting_bytes(), 0
        if self.opened and nbytes > self.room:
            return False
        self.room -= nbytes
        self.opened += 1
        return True


def _decompose(matrix: torch.Tensor, count: int, method: str, seed: int, name: str, shape: tuple[int, ...],
               side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """top_singular_vectors, with a failure (NaN/Inf, no convergence) named after the parameter."""
    try:
        u, s = top_singular_vectors(matrix, count, method, seed, side)
    except torch.linalg.LinAlgError as err:
        if not bool(torch.isfinite(matrix).all()):
            raise _non_finite(name, shape) from None
        raise SVDFailure(
            f"GaLore: the SVD of the gradient of {name or 'a matrix'} {shape} did not converge "
            f"({str(err).splitlines()[0]}); try strategy.svd: randomized or a lower train.lr"
        ) from None
    if not is_fake(s) and not bool(torch.isfinite(s).all()):  # the SVD has synchronized already
        raise _non_finite(name, shape)
    return u, s


def _non_finite(name: str, shape: tuple[int, ...]) -> SVDFailure:
    return SVDFailure(
        f"GaLore: the gradient of {name or 'a matrix'} {shape} contains NaN/Inf, so its projector cannot "
        "be computed (lower train.lr, keep train.max_grad_norm set, check the data)"
    )


@dataclass
class BasisUpdate:
    """What a refresh did: the previous basis (for the moment policy), and whether it only filled
    empty columns (the kept columns, and their moments, are then unchanged)."""

    old_left: torch.Tensor | None
    old_right: torch.Tensor | None
    filled: bool


Gradient = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
"""This step's gradient of a matrix: in full (m x n), or as the sketch factors (Q, X) of the oriented one."""


def refresh(proj: GaLoreProjector, gradient: Gradient, rule: str, dtype: torch.dtype, seed: int,
            inform: Callable[[str], None] | None = None) -> BasisUpdate:
    """Give `proj` a new basis from this step's gradient, or fill its empty columns if it has some."""
    shape = tuple(proj.shape)
    if not proj.one_sided:  # two-sided (proj_type full): exact SVD of the full gradient
        matrix = gradient.to(wide(gradient.dtype))
        u, s = _decompose(matrix, proj.rank, "exact", seed, proj.name, shape)
        v, _ = _decompose(matrix, proj.rank, "exact", seed, proj.name, shape, side="right")
        old = proj.set_two_sided_basis(u, v.T, 0.0 if is_fake(s) else float(s[0]), dtype)
        return BasisUpdate(*old, filled=False)
    filling = proj.incomplete()
    work = wide(gradient[1].dtype if isinstance(gradient, tuple) else gradient.dtype)
    kept = proj.oriented_basis().narrow(1, 0, proj.supported).to(work) if filling else None
    if isinstance(gradient, tuple):  # candidates inside range(Q), scored through X
        q, x = gradient
        if kept is not None:
            q = q - kept @ (kept.T @ q)
        with one_cpu_thread(q):
            qc, rc = torch.linalg.qr(q)
        u_small, s = _decompose(rc @ x, proj.rank, "exact", seed, proj.name, shape)
        u = qc @ u_small
    else:
        matrix = gradient.to(work)
        if kept is not None:  # deflate the kept directions, on the projected side
            a = proj.orient(matrix)
            a = a - kept @ (kept.T @ a)
            matrix = a if proj.sides == ("left",) else a.T
        u, s = _decompose(matrix, proj.rank, rule, seed, proj.name, shape, side=proj.sides[0])
    have = 0 if kept is None else kept.shape[1]
    need = proj.rank - have
    if is_fake(s):
        found, scale = min(need, u.shape[1]), 0.0
    elif rule == "first_micro_batch":  # whatever LAPACK returns, supported or not
        found, scale = min(need, u.shape[1]), float(s[0])
    else:
        scale = max(float(s[0]) if s.numel() else 0.0, proj.top_singular_value if filling else 0.0)
        tolerance = max(proj.shape) * torch.finfo(work).eps * scale
        found = min(need, int((s > tolerance).sum()))
    found_vectors = u.narrow(1, 0, found)
    if rule in ("sketch", "randomized"):
        found_vectors = with_fixed_signs(found_vectors)
    columns = ([] if kept is None else [kept]) + [found_vectors]
    supported = have + found
    if supported < proj.rank:
        columns.append(u.new_zeros((u.shape[0], proj.rank - supported)))
        if inform is not None:
            inform(f"GaLore: the gradient of {proj.name or 'a matrix'} {shape} supports {supported} of "
                   f"{proj.rank} directions; its basis keeps those and fills the rest from the next steps' gradients")
    old = proj.set_oriented_basis(torch.cat(columns, dim=1), supported, scale, dtype)
    return BasisUpdate(*old, filled=filling)


def with_fixed_signs(vectors: torch.Tensor) -> torch.Tensor:
    """The columns turned so that each one's largest-magnitude entry is positive (see "Signs")."""
    if is_fake(vectors) or vectors.shape[1] == 0:
        return vectors
    largest = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
    return vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)


def low_rank_from_sketch(proj: GaLoreProjector, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The step's low-rank gradient Bᵀ Q X, shaped as `proj.project` would give it."""
    oriented = (proj.oriented_basis().to(q.dtype).T @ q) @ x
    return oriented if proj.sides == ("left",) else as_contiguous(oriented.T)
