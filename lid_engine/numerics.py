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

The bound requires a plain dot-product kernel (BLAS gemm, im2col or direct convolution): no
Winograd/FFT convolutions, no TF32 or bf16 reduced precision. ``certification_backend()`` switches
off TF32, bf16 math, oneDNN's automatic dispatch, cuDNN and NNPACK, which leaves torch's im2col +
gemm convolution (slow_conv2d) and BLAS matmuls. NNPACK (torch's CPU fallback when oneDNN is off)
was measured at 1.9e-4·Σ|x||w| on the stacked MNIST CNN pass — 4× beyond the bound — hence the
explicit switch. Float32 convolutions on the CPU are instead called explicitly on oneDNN's *direct*
convolution (``direct_conv2d``), 5–14× faster than im2col + gemm on the bound pass's few-channel
shapes and still a plain dot product per output.
What is covered: the real-number model and any float evaluation whose matmuls/convolutions are
plain dot products (any summation order, FMA or not). Winograd/FFT convolution kernels at
deployment time are not covered by the bound.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
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
    """Widen a computed interval by the a-priori rounding slack of an ``n_terms`` dot product:
    ``[round_down(lo − slack), round_up(hi + slack)]`` with ``slack ≥ c·Mag + k·η``.

    ``slack = max(next_up(s), C)`` with ``s = round_up(Mag·c)``, instead of ``round_up(s + k·η)``:
    adding the subnormal ``k·η`` to every element runs ~15× slower than a normal add on x86 (a
    microcode assist per element; 14.6 ms against 0.9 ms on a 2.7M-element tensor here). It is
    still ≥ s + k·η: with ``t`` the power of two ≥ k·η / (2u) (a normal number), an ``s ≥ t`` has
    ulp(s) ≥ 2u·t ≥ k·η, so ``next_up(s) = s + ulp(s) ≥ s + k·η``; an ``s < t`` gets
    ``C = round_up(t + k·η) > s + k·η``. It is never wider than the old form where ``s ≥ t``
    (``round_up(s + kη)`` is s + 1 or 2 ulps there), and at most ``C`` ≈ 2⁻¹¹⁹·k (float32) where
    ``s < t``, i.e. where ``Mag`` is itself below ~1e-31. Buffers are reused in place: a full-size
    temporary costs a pass of page faults on the CPU, about as much as the arithmetic.
    """
    slack = _slack(lo, mag, n_terms)
    up, down = lo.new_full((), math.inf), lo.new_full((), -math.inf)
    out_lo = torch.sub(lo, slack)
    torch.nextafter(out_lo, down, out=out_lo)
    out_hi = slack.add_(hi) if slack.shape == hi.shape else torch.add(hi, slack)  # slack is not needed any more
    torch.nextafter(out_hi, up, out=out_hi)
    return out_lo, out_hi


def widen_stacked(lo: Tensor, hi: Tensor, mag: Tensor, n_terms: int) -> Tensor:
    """``widen``'s result written straight into one tensor stacked along dim 1 (lower bounds, then
    upper bounds: the bound engine's layout), saving the ``cat`` pass; the same numbers."""
    if lo.dim() < 2 or lo.shape != hi.shape or mag.shape != lo.shape:
        return torch.cat(widen(lo, hi, mag, n_terms), dim=1)
    slack = _slack(lo, mag, n_terms)
    ch = lo.shape[1]
    out = lo.new_empty((lo.shape[0], 2 * ch, *lo.shape[2:]))
    out_lo, out_hi = out[:, :ch], out[:, ch:]
    torch.sub(lo, slack, out=out_lo)
    torch.add(hi, slack, out=out_hi)
    torch.nextafter(out_lo, out.new_full((), -math.inf), out=out_lo)
    torch.nextafter(out_hi, out.new_full((), math.inf), out=out_hi)
    return out


def _slack(lo: Tensor, mag: Tensor, n_terms: int) -> Tensor:
    c, k = slack_coefficients(n_terms, lo.dtype)
    slack = torch.mul(mag, c)
    torch.nextafter(slack, lo.new_full((), math.inf), out=slack)  # s = round_up(Mag·c)
    return add_eta_up_(slack, k)


def add_eta_up_(s: Tensor, k: float) -> Tensor:
    """In place: ``s`` becomes an upper bound on ``s + k·η`` (``s ≥ 0``, η the smallest subnormal),
    ``max(next_up(s), C)`` as in ``widen`` (the proof is there), without adding a subnormal to every
    element (an x86 microcode assist per element, ~15× a normal add). Never above ``round_up(s + k·η)``
    where ``s ≥ t`` (``widen``'s normal threshold, ≈ k·2⁻¹²⁶ in float32); ``C`` ≈ 2⁻¹¹⁹·k (float32) below."""
    torch.nextafter(s, s.new_full((), math.inf), out=s)
    return torch.maximum(s, _slack_floor(k, s.dtype, s.device), out=s)


@functools.lru_cache(maxsize=64)
def _slack_floor(k: float, dtype: torch.dtype, device) -> Tensor:
    """``C = round_up(t + k·η)`` of ``widen``, with ``t = 2^ceil(log2(k·η / 2u))`` (a normal number).
    Cached: a constant, only ever read."""
    u, e = unit_roundoff(dtype), eta(dtype)
    t = 2.0 ** math.ceil(math.log2(k * e / (2 * u)))
    return round_up(torch.tensor(t + k * e, dtype=dtype, device=device))


def invalid_bounds(lo: Tensor, hi: Tensor | None = None) -> Tensor:
    """0-dim bool tensor: ``[lo, hi]`` holds a NaN or an infinity somewhere, or has lo > hi (for a
    point, ``hi=None``: ``lo`` holds a NaN or an infinity).

    Four reductions (``hi − lo``, its minimum, ``lo``'s minimum, ``hi``'s maximum; min/max propagate
    NaN) instead of ``isfinite`` (three passes over both bounds) + ``all`` + ``>`` + ``any``: the
    minimum of ``hi − lo`` is negative or NaN iff lo > hi or a bound is NaN or both are the same
    infinity; otherwise an infinity shows as ``lo = −inf`` or ``hi = +inf``."""
    if lo.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=lo.device)
    if hi is None:
        mn, mx = torch.aminmax(lo)
        return ~(torch.isfinite(mn) & torch.isfinite(mx))
    return ~((hi - lo).amin() >= 0) | (lo.amin() == -math.inf) | (hi.amax() == math.inf)


def midpoint_radius(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Floating-point (mid, rad) with [mid − rad, mid + rad] ⊇ [lower, upper] guaranteed."""
    mid = (lower + upper) / 2
    gap = torch.maximum(upper - mid, mid - lower)
    # A float difference is 0 only when the operands are equal (gradual underflow, which
    # certification_backend() ensures), so a zero gap is exact and stays 0 rather than becoming the
    # smallest subnormal: subnormal operands make every later GEMM ~30× slower on x86.
    rad = torch.where(gap > 0, round_up(gap), gap)
    return mid, rad


# The kernel switches below (oneDNN, cuDNN, NNPACK, matmul precision, TF32) are process-wide, not per
# thread: a thread leaving its block would put them back while another thread still bounds with them
# (certification on NNPACK's or oneDNN's fast algorithms, whose rounding the γ_n model does not cover).
# Every block that sets them holds this lock, so the engine's bound passes in one process's threads
# (Dask thread workers, say) run one at a time; re-entrant for the nested blocks. So never wait, inside
# such a block, for work that other threads of this process bound (a counter on thread workers called
# from within certification_backend() would wait for the lock its caller holds).
SWITCHES = threading.RLock()


@contextlib.contextmanager
def native_kernels(nnpack: bool = True) -> Iterator[None]:
    """Run convolutions on torch's native CPU path instead of oneDNN/cuDNN (search mode).

    The native path is 2–4× faster than oneDNN for the few-channel convolutions of the stacked
    bound pass (measured on the paper's MNIST CNN). Its rounding is NOT bounded by the dot-product
    model, which is fine for the search (it certifies nothing); certification uses im2col + gemm or
    oneDNN's direct convolution called explicitly (``direct_conv2d``).

    Sets the three backend switches directly (``torch._C._set_*_enabled``, what
    ``torch.backends.*.flags`` set) and only where they differ: the ``flags`` context managers cost
    ~50 µs a call, a quarter of a small head's whole bound pass, and reset oneDNN's TF32/precision
    settings as a side effect.
    """
    C = torch._C
    wanted = ((C._get_mkldnn_enabled, C._set_mkldnn_enabled, False),
              (C._get_cudnn_enabled, C._set_cudnn_enabled, False),
              (C._get_nnpack_enabled, C._set_nnpack_enabled, nnpack))
    changed = []
    SWITCHES.acquire()
    try:
        for get, set_, value in wanted:
            old = get()
            if old != value:
                set_(value)
                changed.append((set_, old))
        yield
    finally:
        for set_, old in reversed(changed):
            set_(old)
        SWITCHES.release()


@contextlib.contextmanager
def onednn_kernels() -> Iterator[None]:
    """oneDNN (mkldnn) convolutions, for search-mode work where they are the fast path (the linear
    bound's per-example grouped and transposed convolutions). Never used while certifying."""
    with SWITCHES:
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
    errors the γ_n bound does not cover; the native im2col + gemm path does obey it. Holds ``SWITCHES``
    throughout (the switches are process-wide).
    """
    with SWITCHES:
        old_precision = torch.get_float32_matmul_precision()
        old_tf32_matmul = torch.backends.cuda.matmul.allow_tf32
        old_tf32_cudnn = torch.backends.cudnn.allow_tf32
        old_flush = flushes_denormals()
        conv_precision = getattr(torch.backends.mkldnn, "conv", None)
        old_conv_precision = getattr(conv_precision, "fp32_precision", None)
        if old_conv_precision not in (None, "ieee"):  # no bf16/TF32 inside oneDNN's direct convolution
            conv_precision.fp32_precision = "ieee"
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
            if old_conv_precision not in (None, "ieee"):
                conv_precision.fp32_precision = old_conv_precision
            if old_flush:
                torch.set_flush_denormal(True)


FPMATH_VARIABLES = ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")


def direct_conv_available(x: Tensor) -> bool:
    """Whether ``direct_conv2d`` runs on ``x``: float32 on a CPU with oneDNN, and oneDNN's default math
    mode left strict. ``ONEDNN_DEFAULT_FPMATH_MODE=BF16`` (or ``TF32``/``ANY``; ``DNNL_…`` before oneDNN 2.7)
    lets the "direct" kernel round its operands to bf16 whatever torch's precision switches say — up to
    10× past the γ_K allowance on an AMX CPU — so then certification takes the im2col + gemm path, which
    the variable does not reach."""
    strict = all(os.environ.get(v, "").strip().upper() in ("", "STRICT") for v in FPMATH_VARIABLES)
    return strict and x.dtype == torch.float32 and x.device.type == "cpu" and torch.backends.mkldnn.is_available()


def direct_conv2d(x: Tensor, w: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """A float32 CPU convolution whose rounding obeys the dot-product model: oneDNN's direct
    convolution, called explicitly (``aten::mkldnn_convolution``), never Winograd/FFT.

    Why the γ_K bound of this module holds for it:

    * torch creates the oneDNN primitive with ``algorithm::convolution_direct`` (ideep's default in
      ``aten/src/ATen/native/mkldnn/Conv.cpp``); ONEDNN_VERBOSE on this CPU reports
      ``alg:convolution_direct`` with implementation ``jit:avx512_core`` for every shape of the bound
      pass (``tests/lid_engine/test_numerics_kernels.py`` checks the verbose line). Winograd is a
      separate algorithm (``convolution_winograd``) oneDNN never picks unless asked; FFT does not
      exist in oneDNN.
    * A direct convolution computes each output as ``bias + Σ x·w`` over the C_in/groups·k_h·k_w
      terms with float32 FMAs, the reduction split over blocks and threads in some order:
      Higham's bound holds for any summation order, FMA or not.
    * No reduced precision: ``certification_backend()`` pins ``torch.backends.mkldnn.conv.fp32_precision``
      to ``"ieee"`` (a ``"bf16"``/``"tf32"`` setting would let oneDNN round the operands) and the
      matmul precision to ``"highest"``; the verbose line shows plain ``f32`` for src/wei/dst.
    * Gradual underflow: oneDNN leaves the FPU's MXCSR as it is (subnormal products are kept, checked
      in the same test); ``certification_backend()`` turns flush-to-zero off.

    Measured error on the MNIST CNN's stacked pass: 4.6e-5 max absolute against a float64 reference,
    well inside γ_K·Σ|x||w| (same test). 5–14× faster than the im2col + gemm kernel (slow_conv2d) on
    the bound pass's few-channel convolutions (``benchmarks/results/bounds.md``).
    """
    pad = list(padding) if isinstance(padding, (tuple, list)) else [padding, padding]
    st = list(stride) if isinstance(stride, (tuple, list)) else [stride, stride]
    dil = list(dilation) if isinstance(dilation, (tuple, list)) else [dilation, dilation]
    return torch.ops.aten.mkldnn_convolution(x.contiguous(), w.contiguous(), bias, pad, st, dil, groups)


_SUBNORMAL_TIMES_ONE = [2.0**-1060, 1.0]  # operands in a list: Python cannot fold the product at compile time


def flushes_denormals() -> bool:
    """Whether CPU arithmetic flushes subnormals to zero (``torch.set_flush_denormal``, which has
    no getter): a subnormal float64 times one comes out as zero. Python's own float product runs on
    the SSE unit under the same control register (MXCSR) that ``torch.set_flush_denormal`` sets for
    this thread, so it sees the setting without creating tensors (10 µs a call, once per bound pass)."""
    a, b = _SUBNORMAL_TIMES_ONE
    return a * b == 0.0
