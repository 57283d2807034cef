"""exp and log for numba loops that LLVM can vectorize (float32), and flush-to-zero for kernels.

numba calls libm's scalar ``expf``/``logf`` unless Intel SVML is installed, and a call inside a
loop stops LLVM from vectorizing it; with AVX2/AVX-512 that is a 10x difference for the softmax.
These are the classic Cephes single-precision approximations (range reduction plus a polynomial,
about 1 ulp), written with plain arithmetic and two bit casts so that the loops vectorize.
float64 arguments (the gradcheck path) use ``math.exp``/``math.log`` unchanged.

``fexp(x)``: for x below -87.3 it returns 0 (libm would return a subnormal <= 1.2e-38).
``flog(x)``: for finite x > 0 (subnormals are not handled; the callers pass x >= 1).

``flush_denormals_on()`` / ``restore_fp_state(state)``: on x86, arithmetic that produces or reads
subnormal numbers (below 1.2e-38 in float32: p^2 of a confident prediction, high powers in the
focal term) takes a microcode assist of ~100 cycles per operation, which made the kernels 2-3x
slower on typical training logits. The kernels set the flush-to-zero and denormals-are-zero bits
of MXCSR on entry and restore the caller's state on exit; values below 1.2e-38 then count as 0,
a difference far below the float32 resolution of every sum. No-ops on other architectures.
"""

from __future__ import annotations

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_JIT = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret an int32 as float32 (no conversion)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    """Reinterpret a float32 as int32 (no conversion)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(**_JIT)
def exp_f32(x):
    """exp of a float32: 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial (Cephes expf)."""
    xc = min(x, np.float32(88.0))
    n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    r2 = r * r
    poly = np.float32(1.9875691500e-4)
    poly = poly * r + np.float32(1.3981999507e-3)
    poly = poly * r + np.float32(8.3334519073e-3)
    poly = poly * r + np.float32(4.1665795894e-2)
    poly = poly * r + np.float32(1.6666665459e-1)
    poly = poly * r + np.float32(5.0000001201e-1)
    y = poly * r2 + r + np.float32(1.0)
    ni = np.int32(max(n, np.float32(-126.0)))
    scale = _bits_to_f32(np.int32((ni + np.int32(127)) << np.int32(23)))
    return y * scale if x >= np.float32(-87.3) else np.float32(0.0)


@njit(**_JIT)
def log_f32(x):
    """log of a normal positive float32: mantissa m in [sqrt(1/2), sqrt(2)) times 2^e (Cephes logf)."""
    bits = _f32_to_bits(x)
    e = np.float32(((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(126))
    m = _bits_to_f32(np.int32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000)))  # in [0.5, 1)
    small = m < np.float32(0.707106781186547524)
    e = e - np.float32(1.0) if small else e
    m = (m + m - np.float32(1.0)) if small else (m - np.float32(1.0))
    z = m * m
    poly = np.float32(7.0376836292e-2)
    poly = poly * m + np.float32(-1.1514610310e-1)
    poly = poly * m + np.float32(1.1676998740e-1)
    poly = poly * m + np.float32(-1.2420140846e-1)
    poly = poly * m + np.float32(1.4249322787e-1)
    poly = poly * m + np.float32(-1.6668057665e-1)
    poly = poly * m + np.float32(2.0000714765e-1)
    poly = poly * m + np.float32(-2.4999993993e-1)
    poly = poly * m + np.float32(3.3333331174e-1)
    y = poly * m * z
    y = y + e * np.float32(-2.12194440e-4)
    y = y - np.float32(0.5) * z
    return (m + y) + e * np.float32(0.693359375)


def fexp(x):
    """exp: vectorizable float32 version, ``math.exp`` for float64 (see module docstring)."""
    return math.exp(x)


def flog(x):
    """log: vectorizable float32 version, ``math.log`` for float64 (see module docstring)."""
    return math.log(x)


@overload(fexp)
def _overload_fexp(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: math.exp(x)


@overload(flog)
def _overload_flog(x):
    if x == types.float32:
        return lambda x: log_f32(x)
    return lambda x: math.log(x)


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_FTZ_DAZ = 0x8040  # MXCSR bits: flush to zero (15) and denormals are zero (6)


def _mxcsr_call(builder, name: str, slot) -> None:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [slot.type]), name)
    builder.call(fn, [slot])


@intrinsic
def _read_mxcsr(typingctx):
    def codegen(context, builder, signature, args):
        if not _X86:
            return ir.Constant(ir.IntType(32), 0)
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.load(slot)

    return types.uint32(), codegen


@intrinsic
def _write_mxcsr(typingctx, value):
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        if _X86:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(context.cast(builder, args[0], signature.args[0], types.uint32), slot)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return types.void(value), codegen


@njit(**_JIT)
def flush_denormals_on():
    """Set FTZ and DAZ for this thread (x86); returns the previous state for restore_fp_state."""
    state = _read_mxcsr()
    _write_mxcsr(state | np.uint32(_FTZ_DAZ))
    return state


@njit(**_JIT)
def restore_fp_state(state):
    """Restore the floating-point control state saved by flush_denormals_on."""
    _write_mxcsr(state)
