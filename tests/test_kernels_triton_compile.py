"""The Triton kernels compile to Hopper (sm_90, the H100) and Ampere (sm_80) machine code, on a CPU.

Triton's interpreter (``tests/test_kernels_triton.py``) checks what the kernels compute, but it runs
them in NumPy and never sees the compiler: a type error in a branch, a constexpr misuse or a
construct that does not lower to PTX would only show on a GPU. Triton compiles ahead of time for a
named target without one (``triton.compile`` with a ``GPUTarget``; its wheel bundles ``ptxas``), so
every kernel is compiled here, to a cubin, for the argument types the launch code in
``nnunetv2_l1dfl/kernels/cuda.py`` passes: logits float16/bfloat16/float32/float64, targets of the
integer, bool and float dtypes nnU-Net hands over, with and without an ignore label, integer and
non-integer gamma, several class and bin counts.
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with PyTorch's CUDA wheels)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nnunetv2_l1dfl.kernels import cuda  # noqa: E402

FLOAT = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "fp64": "fp64"}


def compile_kernel(kernel, types: dict[str, str], constexprs: dict, arch: int):
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": cuda.NUM_WARPS})


def compile_pair(forward_kernel, backward_kernel, types: dict[str, str], common: dict, arch: int):
    """Compile a forward kernel (with its histogram width KP) and its backward; both must give
    machine code for ``sm_{arch}``. Returns the two compiled kernels."""
    padded_bins = triton.next_power_of_2(common["N_PER_UNIT"] + 1)
    forward = compile_kernel(forward_kernel, types, {**common, "KP": padded_bins}, arch)
    backward = compile_kernel(backward_kernel, types, common, arch)
    for compiled in (forward, backward):
        assert compiled.asm.get("cubin"), "no machine code"
        assert f".target sm_{arch}" in compiled.asm["ptx"]
    return forward, backward


def launch_types(logits: str, target: str) -> dict[str, str]:
    """Argument types as ``cuda.forward`` / ``cuda.backward`` pass them (statistics in float32, or
    float64 for float64 logits; the gradient in the logits' dtype)."""
    stats = "fp64" if logits == "fp64" else "fp32"
    return {
        "x_ptr": f"*{logits}", "t_ptr": f"*{target}", "counts_ptr": "*i32", "inter_ptr": f"*{stats}",
        "union_ptr": f"*{stats}", "focal_ptr": f"*{stats}", "g_inter_ptr": f"*{stats}",
        "g_union_ptr": f"*{stats}", "g_focal_ptr": f"*{stats}", "grad_ptr": f"*{logits}",
        "V": "i32", "ignore_label": "i32", "gamma": "fp32",
    }  # fmt: skip


SOFTMAX_CASES = [
    # logits, target (after _target_for_kernel), C, n per unit, ignore, gamma
    ("fp16", "i16", 2, 10, False, 2.0),
    ("bf16", "i32", 2, 10, True, 2.0),
    ("fp32", "u8", 3, 20, True, 5.0),
    ("fp32", "i64", 4, 5, False, 1.5),
    ("fp64", "i32", 2, 10, True, 0.0),
]
REGION_CASES = [
    # logits, target, regions, n per unit, ignore mask channel, gamma
    ("fp16", "u8", 2, 10, False, 2.0),
    ("bf16", "fp32", 3, 10, True, 2.0),
    ("fp32", "fp16", 1, 20, True, 1.5),
    ("fp64", "u8", 2, 5, False, 1.0),
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize(("logits", "target", "classes", "n", "ignore", "gamma"), SOFTMAX_CASES)
def test_softmax_kernels_compile(arch, logits, target, classes, n, ignore, gamma):
    types = launch_types(logits, target)
    common = {"C": classes, "N_PER_UNIT": n, "HAS_IGNORE": ignore, "GAMMA_INT": cuda._gamma_int(gamma),
              "IS_FP64": logits == "fp64", "BLOCK": cuda.BLOCK}
    _, backward = compile_pair(cuda._softmax_forward_kernel, cuda._softmax_backward_kernel, types, common, arch)
    # the backward writes the gradient, and nothing else, in the logits' dtype
    width = {"fp16": "b16", "bf16": "b16", "fp32": "b32", "fp64": "b64"}[logits]
    stores = re.findall(r"st\.global[.\w]*", backward.asm["ptx"])
    assert stores and all(store.endswith(width) for store in stores), stores


@pytest.mark.parametrize("arch", [90])
@pytest.mark.parametrize(("logits", "target", "regions", "n", "ignore", "gamma"), REGION_CASES)
def test_region_kernels_compile(arch, logits, target, regions, n, ignore, gamma):
    types = launch_types(logits, target)
    common = {"R": regions, "T_CHANNELS": regions + int(ignore), "N_PER_UNIT": n, "HAS_IGNORE": ignore,
              "GAMMA_INT": cuda._gamma_int(gamma), "IS_FP64": logits == "fp64", "BLOCK": cuda.BLOCK}
    compile_pair(cuda._sigmoid_forward_kernel, cuda._sigmoid_backward_kernel, types, common, arch)
