"""GPU verification of the fused L1DFL kernels: ``l1dfl bench --verify-cuda`` on a machine with CUDA.

Checks, each reported as ok / FAIL with its numbers:

1. ``equal_to_cpu``: Triton statistics and gradient equal the CPU kernels (numba) and the PyTorch
   reference, for softmax, regions and the ignore label (counts exactly, sums and gradients to
   1e-5 of their scale; inputs kept away from bin edges, where float rounding may pick a bin);
2. ``no_host_sync``: ``L1DFLLoss`` forward + backward (deep supervision included) under
   ``torch.cuda.set_sync_debug_mode("error")``;
3. ``autocast_fp16``: float16 logits under autocast give the float32 result of the same values,
   and a float16 gradient;
4. ``deep_supervision``: nnU-Net's DeepSupervisionWrapper around the fused loss equals it around
   the reference path, value and gradient of every scale;
5. ``torch_compile``: a ``torch.compile``-d training step (inductor; the loss is a graph break)
   equals the eager one;
6. ``deterministic``: two runs are bitwise equal;
7. ``speed`` (run by :func:`nnunetv2_l1dfl.bench.verify_cuda_main` after the checks): forward + backward time and peak memory of the fused loss against nnU-Net's
   DC_and_CE_loss (``l1dfl bench`` on 3d_fullres and on 2 x 2 x 128^3 without deep supervision),
   and the kernels' own time against a copy of the logits (reading the logits and writing a
   tensor of their size, the least a backward can do).

On a machine without CUDA, ``run_checks(torch.device("cpu"), ...)`` runs the same code with the
CPU kernels (used by the tests to keep this script working); the sync check is then skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    numbers: dict = field(default_factory=dict)


def _size(device: torch.device, gpu: tuple[int, ...], cpu: tuple[int, ...]) -> tuple[int, ...]:
    """Case shape: GPU-sized on CUDA, small on CPU (where the script only checks itself)."""
    return gpu if device.type == "cuda" else cpu


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _case(shape, num_classes, n_per_unit, regions, ignore_label, seed, device):
    """Random logits and target away from bin edges (float64 probabilities decide), on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    batch, spatial = shape[0], shape[1:]
    logits = torch.randn((batch, num_classes, *spatial), generator=generator) * 3
    if regions:
        target = torch.rand((batch, num_classes + (ignore_label is not None), *spatial), generator=generator) > 0.6
        if ignore_label is not None:
            target[:, -1] = False
            target[:, -1, :2] = True
        y = target[:, :num_classes].double()
    else:
        target = torch.randint(0, num_classes, (batch, 1, *spatial), generator=generator).to(torch.int16)
        if ignore_label is not None:
            target[:, :, :2] = ignore_label
        labels = target[:, 0].long()
        if ignore_label is not None:
            labels = labels.masked_fill(labels == ignore_label, 0)
        y = torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).double()
    for _ in range(100):
        p = torch.sigmoid(logits.double()) if regions else torch.softmax(logits.double(), 1)
        g = (p - y).abs() * n_per_unit + 0.5
        bad = ((g - g.round()).abs() < 1e-4).any(dim=1, keepdim=True).expand_as(logits)
        if not bad.any():
            break
        logits = torch.where(bad, torch.randn(logits.shape, generator=generator) * 3, logits)
    return logits.to(device), target.to(device)


def check_equal_to_cpu(device: torch.device) -> Check:
    from nnunetv2_l1dfl.kernels import fused_bin_statistics
    from nnunetv2_l1dfl.losses.l1dfl import bin_statistics_reference

    worst = {}
    ok = True
    for regions, ignore in ((False, None), (False, 3), (True, None), (True, 1)):
        logits, target = _case(_size(device, (2, 40, 36, 24), (2, 12, 10, 8)), 3, 10, regions, ignore, 1, device)
        options = {"n_per_unit": 10, "gamma": 2.0, "regions": regions, "ignore_label": ignore}
        outputs = {}
        for name, x, t, fn in (
            ("device", logits, target, fused_bin_statistics),
            ("cpu", logits.cpu(), target.cpu(), fused_bin_statistics),
            ("reference", logits.cpu(), target.cpu(), bin_statistics_reference),
        ):
            x = x.clone().requires_grad_()
            stats = fn(x, t, **options)
            w = torch.linspace(-1, 1, stats.intersection.numel(), dtype=torch.float64).reshape(stats.intersection.shape)
            total = (stats.intersection.double() * w.to(x.device)).sum() - (stats.union.double() * w.to(x.device)).sum()
            (total + 0.3 * stats.focal_sum.double()).backward()
            outputs[name] = (stats, x.grad)
        for other in ("cpu", "reference"):
            stats, grad = outputs[other]
            dev_stats, dev_grad = outputs["device"]
            counts_equal = torch.equal(dev_stats.counts.cpu(), stats.counts)
            errors = {
                "intersection": _relative_error(dev_stats.intersection, stats.intersection),
                "union": _relative_error(dev_stats.union, stats.union),
                "focal": _relative_error(dev_stats.focal_sum, stats.focal_sum),
                "grad": _relative_error(dev_grad, grad),
            }
            key = f"regions={regions},ignore={ignore},vs={other}"
            worst[key] = {"counts_equal": counts_equal, **errors}
            ok &= counts_equal and max(errors.values()) <= 1e-5
    return Check("equal_to_cpu", ok, "counts equal, sums and gradient within 1e-5 relative", worst)


def check_no_host_sync(device: torch.device) -> Check:
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss

    if device.type != "cuda":
        return Check("no_host_sync", True, "skipped (not a CUDA device)")
    scales = [(2, 2, 64, 64, 64), (2, 2, 32, 32, 32), (2, 2, 16, 16, 16)]
    logits = [torch.randn(s, device=device, dtype=torch.float16, requires_grad=True) for s in scales]
    targets = [torch.randint(0, 2, (s[0], 1, *s[2:]), device=device, dtype=torch.int16) for s in scales]
    loss = DeepSupervisionWrapper(L1DFLLoss(ignore_label=None, backend="fused"), [0.57, 0.29, 0.14])
    loss(logits, targets)  # compile the kernels first (autotuning and loading may synchronize)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        with torch.autocast("cuda", dtype=torch.float16):
            value = loss(logits, targets)
        value.backward()
    except RuntimeError as e:
        return Check("no_host_sync", False, f"a host synchronization happened: {e}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return Check("no_host_sync", True, "forward + backward under set_sync_debug_mode('error')")


def check_autocast_fp16(device: torch.device) -> Check:
    from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss

    logits, target = _case(_size(device, (2, 48, 40, 32), (2, 16, 12, 10)), 2, 10, False, None, 2, device)
    half = logits.half()
    x16 = half.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        value = L1DFLLoss(backend="fused")(x16, target)
    value.backward()
    x32 = half.float().cpu().requires_grad_()
    expected = L1DFLLoss(backend="reference")(x32, target.cpu())
    expected.backward()
    value_error = _relative_error(value, expected)
    grad_error = _relative_error(x16.grad.float(), x32.grad.half().float())
    ok = value.dtype == torch.float32 and x16.grad.dtype == torch.float16 and value_error <= 1e-5 and grad_error <= 1e-2
    numbers = {"value_rel_error": value_error, "grad_rel_error": grad_error, "grad_dtype": str(x16.grad.dtype)}
    return Check("autocast_fp16", ok, "fp16 logits give the fp32 result and an fp16 gradient", numbers)


def check_deep_supervision(device: torch.device) -> Check:
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss

    edges = (32, 16, 8) if device.type == "cuda" else (16, 8, 4)
    cases = [_case((2, s, s, s), 3, 10, False, None, 10 + s, device) for s in edges]
    weights = [4 / 7, 2 / 7, 1 / 7]
    results = {}
    for backend in ("fused", "reference"):
        logits = [c[0].clone().requires_grad_() for c in cases]
        value = DeepSupervisionWrapper(L1DFLLoss(backend=backend), weights)(logits, [c[1] for c in cases])
        value.backward()
        results[backend] = (value, [x.grad for x in logits])
    value_error = _relative_error(results["fused"][0], results["reference"][0])
    grad_errors = [_relative_error(a, b) for a, b in zip(results["fused"][1], results["reference"][1])]
    ok = value_error <= 1e-5 and max(grad_errors) <= 1e-5
    numbers = {"value_rel_error": value_error, "grad_rel_errors": grad_errors}
    return Check("deep_supervision", ok, "DeepSupervisionWrapper: fused equals reference", numbers)


def check_torch_compile(device: torch.device) -> Check:
    from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss

    logits, target = _case((2, 24, 24, 24), 2, 10, False, None, 3, device)
    weight = torch.randn((2, 2, 1, 1, 1), device=device)
    loss = L1DFLLoss(backend="fused")

    def step(x):
        return loss(x * weight + 0.5, target)

    x_eager, x_compiled = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = step(x_eager)
    eager.backward()
    try:
        compiled = torch.compile(step)(x_compiled)
        compiled.backward()
    except Exception as e:  # inductor needs a compiler toolchain; report instead of crashing
        return Check("torch_compile", False, f"torch.compile failed: {type(e).__name__}: {e}")
    numbers = {"value_rel_error": _relative_error(compiled, eager), "grad_rel_error": _relative_error(x_compiled.grad, x_eager.grad)}
    ok = max(numbers.values()) <= 1e-5
    return Check("torch_compile", ok, "compiled step equals eager (the fused loss is a graph break)", numbers)


def check_deterministic(device: torch.device) -> Check:
    from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss

    logits, target = _case(_size(device, (2, 64, 64, 48), (2, 40, 40, 24)), 3, 10, False, None, 4, device)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        value = L1DFLLoss(backend="fused")(x, target)
        value.backward()
        runs.append((value, x.grad))
    ok = torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    return Check("deterministic", ok, "two runs bitwise equal (value and gradient)")


def kernel_vs_copy_time(device: torch.device, shape=(2, 2, 128, 128, 128), repeats: int = 50) -> dict:
    """Median time of the fused kernels alone (forward + backward) and of a copy of the logits."""
    from nnunetv2_l1dfl.kernels import FusedBinStatistics, backend_for

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    logits = torch.randn(shape, device=device, dtype=dtype)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), device=device, dtype=torch.int16)
    backend = backend_for(device)
    g_stats = (
        torch.randn((shape[0], shape[1], 11), device=device),
        torch.randn((shape[0], shape[1], 11), device=device),
        torch.ones((), device=device),
    )

    def fused():
        x = logits if dtype in backend.INPUT_DTYPES else logits.float()
        x = x.detach().requires_grad_()
        stats = FusedBinStatistics.apply(x, target, backend, 10, 2.0, False, None)
        torch.autograd.backward(stats[1:], g_stats)

    def copy():
        torch.empty_like(logits).copy_(logits)

    def median_ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2] * 1e3

    fused_ms, copy_ms = median_ms(fused), median_ms(copy)
    return {"shape": list(shape), "dtype": str(dtype), "fused_fwd_bwd_ms": fused_ms, "copy_ms": copy_ms,
            "ratio_to_copy": fused_ms / copy_ms}  # fmt: skip


def run_checks(device: torch.device, include_compile: bool = True) -> list[Check]:
    """All correctness checks on ``device``; a crashing check is reported as a failure."""
    checks = []
    functions = [check_equal_to_cpu, check_no_host_sync, check_autocast_fp16, check_deep_supervision]
    functions += [check_torch_compile] if include_compile else []
    for fn in functions + [check_deterministic]:
        try:
            checks.append(fn(device))
        except Exception as e:
            logger.exception("%s crashed", fn.__name__)
            checks.append(Check(fn.__name__.removeprefix("check_"), False, f"crashed: {type(e).__name__}: {e}"))
    return checks
