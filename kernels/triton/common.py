"""Launch-time helpers shared by the dense and grouped kernels (no kernels here)."""

from __future__ import annotations

import os

import torch

#: When True, launchers fill their outputs with NaN instead of leaving them uninitialised, so a
#: tile a kernel never wrote shows up in tests (costs one fill per output; off by default).
POISON_OUTPUTS = False

#: Force the fp32-upcast of ``tl.dot`` operands (None = automatic: on under the interpreter, whose
#: bf16/fp16 ``tl.dot`` multiplies raw bit patterns, off on a GPU, where bf16 operands feed the
#: tensor cores with an fp32 accumulator).
UPCAST: bool | None = None


def interpreting() -> bool:
    """True when triton runs in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast() -> bool:
    """Whether kernels cast ``tl.dot`` tiles to fp32 (see :data:`UPCAST`)."""
    return interpreting() if UPCAST is None else bool(UPCAST)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two ``>= max(n, minimum)``: ``tl.arange`` needs powers of two and
    ``tl.dot`` needs every dim ``>= 16``."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def out_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer every element of which the kernel writes (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def ieee(*dtypes: torch.dtype) -> bool:
    """fp32 operands use IEEE fp32 products (not TF32) so the GPU matches torch's default matmul."""
    return upcast() or all(d == torch.float32 for d in dtypes)


def row_block(t: int) -> int:
    """Token-block size. A GPU gets 64 (the fp32 64×R_pad accumulator stays in registers up to
    R_pad = 256). The interpreter pays per program and per loop step in Python, so large T gets
    128-row tiles (5× faster at T = 5000); small T keeps 32 so small tests still span several tiles."""
    if interpreting():
        return 32 if t <= 256 else 128
    return 64


def col_block(n: int) -> int:
    """Output-column tile of expand / xty: 64 on a GPU; in the interpreter 128 for small N (tests
    still cover several N-tiles) and 512 for large N (fewer, larger numpy steps)."""
    if interpreting():
        return 128 if n <= 256 else 512
    return 64


def reduce_block(t: int) -> int:
    """Rows per step of the reductions over T (xty). Same reasoning as :func:`row_block`."""
    if interpreting():
        return 32 if t <= 256 else 256
    return 64
