"""A-priori floating-point error bounds for certification mode.

Certification must hold for the real-number model *and* for any IEEE evaluation of it, without
hoping that rounding errors are small. We use the classical a-priori bound for a dot product of
``n`` terms computed in any summation order with round-to-nearest (Higham, Thm 3.1; Rump's
midpoint–radius papers):

    |fl(a·b) − a·b| ≤ γ_n · |a|·|b| + n·η,     γ_n = n·u / (1 − n·u),

where ``u`` is the unit roundoff and ``η`` the smallest positive subnormal (underflow). Each
bounded layer computes, besides its centre/radius (or lower/upper) in floating point, a *magnitude*
``Mag ≥ |a|·|b|`` with one extra product of non-negative operands, and widens its output by

    slack = c_n · Mag + k_n · η,

with ``c_n`` covering (i) the rounding of our own bound computation, (ii) the rounding of ``Mag``
itself (which can only be under-estimated by a factor (1 − u)(1 − γ_n)), and (iii) the rounding of
a float forward pass of any parameter vector in the box (so sampled float forwards are enclosed
too). Every final subtraction/addition is then rounded outward by one ulp with ``nextafter``.

The bound requires a plain dot-product kernel (BLAS gemm, im2col convolution): no Winograd/FFT
convolutions, no TF32 or bf16 reduced precision. ``certification_backend()`` switches off TF32,
oneDNN, cuDNN and NNPACK, which leaves torch's im2col + gemm convolution (slow_conv2d) and BLAS
matmuls. NNPACK (torch's CPU fallback when oneDNN is off) was measured at 1.9e-4·Σ|x||w| on the
stacked MNIST CNN pass — 4× beyond the bound — hence the explicit switch.
What is covered: the real-number model and any float evaluation whose matmuls/convolutions are
plain dot products (any summation order, FMA or not). Winograd/FFT convolution kernels at
deployment time are not covered by the bound.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .errors import UnsoundBoundError

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
_SMALLEST_SUBNORMAL = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}
SUPPORTED_DTYPES = tuple(_UNIT_ROUNDOFF)


def unit_roundoff(dtype: torch.dtype) -> float:
    try:
        return _UNIT_ROUNDOFF[dtype]
    except KeyError:
        raise ValueError(f"certification supports float32 and float64, got {dtype}") from None


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = n·u / (1 − n·u), the relative error bound of an n-term dot product."""
    u = unit_roundoff(dtype)
    if n * u >= 0.5:
        raise UnsoundBoundError(
            f"a dot product of length {n} is too long for a rounding bound in {dtype}; certify in torch.float64"
        )
    return n * u / (1 - n * u)


def slack_coefficients(n_terms: int, dtype: torch.dtype) -> tuple[float, float]:
    """(c, k) such that ``c·Mag + k·η`` bounds all rounding of an ``n_terms`` dot product layer.

    2γ covers our own computation and a float forward pass of any θ' in the box; 4u covers
    forming ``centre ± radius`` (both bounded by ``Mag``); the division by (1 − u)(1 − γ) covers
    ``Mag`` having been computed in floating point; the final 1.01 margin absorbs the rounding of
    the multiplication ``c·Mag`` itself.
    """
    u, g = unit_roundoff(dtype), gamma(n_terms, dtype)
    c = (2.0 * g + 4.0 * u) / ((1 - u) * (1 - g)) * 1.01
    k = 4.0 * (n_terms + 1)
    return c, k


def eta(dtype: torch.dtype) -> float:
    return _SMALLEST_SUBNORMAL[dtype]


def smallest_normal(dtype: torch.dtype) -> float:
    """2⁻¹²⁶ (float32) or 2⁻¹⁰²² (float64): below it, vectorised math kernels may flush to zero."""
    return torch.finfo(dtype).tiny


def round_down(t: Tensor) -> Tensor:
    """One ulp towards −∞: turns a round-to-nearest result into a guaranteed lower bound."""
    return torch.nextafter(t, t.new_full((), -math.inf))


def round_up(t: Tensor) -> Tensor:
    """One ulp towards +∞: turns a round-to-nearest result into a guaranteed upper bound."""
    return torch.nextafter(t, t.new_full((), math.inf))


def widen(lo: Tensor, hi: Tensor, mag: Tensor, n_terms: int) -> tuple[Tensor, Tensor]:
    """Widen a computed interval by the a-priori rounding slack of an ``n_terms`` dot product."""
    c, k = slack_coefficients(n_terms, lo.dtype)
    slack = round_up(round_up(mag * c) + k * eta(lo.dtype))
    return round_down(lo - slack), round_up(hi + slack)


def midpoint_radius(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Floating-point (mid, rad) with [mid − rad, mid + rad] ⊇ [lower, upper] guaranteed."""
    mid = (lower + upper) / 2
    gap = torch.maximum(upper - mid, mid - lower)
    # A float difference is 0 only when the operands are equal (gradual underflow, which
    # certification_backend() ensures), so a zero gap is exact and stays 0 rather than becoming the
    # smallest subnormal: subnormal operands make every later GEMM ~30× slower on x86.
    rad = torch.where(gap > 0, round_up(gap), gap)
    return mid, rad


@contextlib.contextmanager
def native_kernels(nnpack: bool = True) -> Iterator[None]:
    """Run convolutions on torch's native CPU path instead of oneDNN/cuDNN (search mode).

    The native path is 2–4× faster than oneDNN for the few-channel convolutions of the stacked
    bound pass (measured on the paper's MNIST CNN). Its rounding is NOT bounded by the dot-product
    model, which is fine for the search (it certifies nothing); certification uses im2col + gemm.
    """
    with warnings.catch_warnings():
        # torch warns about oneDNN TF32 on Intel GPUs whenever the mkldnn flags are touched.
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        mkldnn_off = torch.backends.mkldnn.flags(enabled=False)
        mkldnn_off.__enter__()
    try:
        with torch.backends.cudnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=nnpack):
            yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            mkldnn_off.__exit__(None, None, None)


@contextlib.contextmanager
def onednn_kernels() -> Iterator[None]:
    """oneDNN (mkldnn) convolutions, for search-mode work where they are the fast path (the linear
    bound's per-example grouped and transposed convolutions). Never used while certifying."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        on = torch.backends.mkldnn.flags(enabled=True)
        on.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            on.__exit__(None, None, None)


@contextlib.contextmanager
def certification_backend() -> Iterator[None]:
    """Force kernels whose rounding obeys the dot-product error model.

    oneDNN (mkldnn) and cuDNN may choose Winograd or FFT convolutions and TF32 matmuls, whose
    errors the γ_n bound does not cover; the native im2col + gemm path does obey it.
    """
    old_precision = torch.get_float32_matmul_precision()
    old_tf32_matmul = torch.backends.cuda.matmul.allow_tf32
    old_tf32_cudnn = torch.backends.cudnn.allow_tf32
    old_flush = flushes_denormals()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if old_flush:  # the η terms assume gradual underflow; flushed subnormals break them
        torch.set_flush_denormal(False)
    try:
        with native_kernels(nnpack=False):  # NNPACK's fast algorithms break the γ_n model
            yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32_matmul
        torch.backends.cudnn.allow_tf32 = old_tf32_cudnn
        if old_flush:
            torch.set_flush_denormal(True)


def flushes_denormals() -> bool:
    """Whether CPU arithmetic flushes subnormals to zero (``torch.set_flush_denormal``, which has
    no getter): a subnormal float32 times one comes out as zero."""
    tiny = torch.tensor([2.0**-140], dtype=torch.float32)
    return bool((tiny * torch.tensor([1.0], dtype=torch.float32) == 0).item())
