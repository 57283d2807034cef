"""Inputs and comparisons shared by the fused-kernel tests (numba, Triton interpreter, bench).

Also runnable as a script, which the Triton test does in a subprocess with
``TRITON_INTERPRET=1`` (the variable must be set before Triton kernels are defined):
``python tests/_kernels_helpers.py triton`` checks the Triton kernels against the reference on
CPU tensors and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a script from anywhere: the working tree comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from nnunetv2_l1dfl.losses.l1dfl import bin_statistics_reference  # noqa: E402

EDGE_MARGIN = 1e-4
"""Inputs keep every difficulty g at least this far (relative to the bin width) from a bin edge,
so that fused and reference probabilities, equal to a few ulps, always give the same bins."""


def probabilities(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    x = logits.double()
    return torch.sigmoid(x) if regions else torch.softmax(x, dim=1)


def one_hot(target: torch.Tensor, num_classes: int, ignore_label: int | None) -> torch.Tensor:
    labels = target[:, 0].long()
    if ignore_label is not None:
        labels = torch.where(labels == ignore_label, torch.zeros_like(labels), labels)
    return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).double()


def make_case(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    n_per_unit: int,
    regions: bool = False,
    ignore_label: int | None = None,
    seed: int = 0,
    scale: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float32 logits (B, C, *shape[1:]) and a target, with no g near a bin edge.

    Softmax: int16 labels (B, 1, ...) in [0, C), a slab set to ``ignore_label`` when given.
    Regions: bool targets (B, C[+1], ...), the ignore mask last when ``ignore_label`` is given.
    Voxels with an element within EDGE_MARGIN of an edge get new logits until none is left.
    """
    generator = torch.Generator().manual_seed(seed)
    batch, spatial = shape[0], shape[1:]
    logits = torch.randn((batch, num_classes, *spatial), generator=generator) * scale
    if regions:
        channels = num_classes + (1 if ignore_label is not None else 0)
        target = torch.rand((batch, channels, *spatial), generator=generator) > 0.6
        if ignore_label is not None:
            target[:, -1] = False
            target[:, -1, :1] = True
        y = target[:, :num_classes].double()
    else:
        target = torch.randint(0, num_classes, (batch, 1, *spatial), generator=generator).to(torch.int16)
        if ignore_label is not None:
            target[:, :, :1] = ignore_label
        y = one_hot(target, num_classes, ignore_label)
    for _ in range(100):
        g = (probabilities(logits, regions) - y).abs() * n_per_unit + 0.5
        near_edge = (g - g.round()).abs() < EDGE_MARGIN
        bad_voxels = near_edge.any(dim=1, keepdim=True).expand_as(logits)
        if not bad_voxels.any():
            return logits, target
        fresh = torch.randn(logits.shape, generator=generator) * scale
        logits = torch.where(bad_voxels, fresh, logits)
    raise RuntimeError("could not move the test logits away from the bin edges")


def assert_statistics_equal(fused, reference, rtol: float = 1e-5) -> None:
    """Counts exactly equal; float sums equal to rtol relative to their largest magnitude."""
    assert fused.counts.dtype == torch.int64
    assert torch.equal(fused.counts.cpu(), reference.counts.cpu()), (fused.counts, reference.counts)
    for name in ("intersection", "union", "focal_sum"):
        a = getattr(fused, name).detach().double().cpu()
        b = getattr(reference, name).detach().double().cpu()
        assert a.shape == b.shape, name
        scale = max(b.abs().max().item(), 1e-12)
        assert (a - b).abs().max().item() <= rtol * scale, (name, (a - b).abs().max().item(), scale)


def assert_close_relative(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """max |a - b| <= rtol * max |b| (gradients: tiny elements are compared on the tensor's scale)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = max(b.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


def weighted_sum(stats, seed: int = 1) -> torch.Tensor:
    """A scalar mixing every differentiable statistic with fixed random weights (for gradients)."""
    generator = torch.Generator().manual_seed(seed)
    w_i = torch.randn(stats.intersection.shape, generator=generator, dtype=torch.float64)
    w_u = torch.randn(stats.union.shape, generator=generator, dtype=torch.float64)
    return (
        (stats.intersection.double() * w_i.to(stats.intersection.device)).sum()
        + (stats.union.double() * w_u.to(stats.union.device)).sum()
        + 0.37 * stats.focal_sum.double()
    )


def check_triton_interpreter() -> int:
    """Triton kernels (under TRITON_INTERPRET=1, CPU tensors) against the reference: 0 when equal."""
    from nnunetv2_l1dfl.kernels import FusedBinStatistics, cuda
    from nnunetv2_l1dfl.losses.l1dfl import BinStatistics

    cases = [
        # (regions, ignore_label, num_classes, n_per_unit, gamma, dtype, spatial)
        (False, None, 3, 10, 2.0, torch.float32, (2, 9, 7, 5)),
        (False, 3, 2, 20, 1.0, torch.float32, (2, 11, 13)),
        (False, None, 4, 5, 0.5, torch.float64, (1, 6, 5, 4)),
        (False, 255, 2, 10, 5.0, torch.float16, (2, 8, 8, 3)),
        (True, None, 2, 10, 2.0, torch.float32, (2, 9, 7, 5)),
        (True, 1, 3, 5, 2.0, torch.float32, (2, 12, 10)),
        (True, None, 2, 20, 1.5, torch.float64, (1, 7, 6, 5)),
    ]
    failures = 0
    for regions, ignore, num_classes, n, gamma, dtype, shape in cases:
        logits, target = make_case(shape, num_classes, n_per_unit=n, regions=regions, ignore_label=ignore, seed=n)
        logits = logits.to(dtype)
        x_fused = logits.clone().requires_grad_()
        x_ref = logits.clone().requires_grad_()
        fused = BinStatistics(*FusedBinStatistics.apply(x_fused, target, cuda, n, gamma, regions, ignore))
        ref = bin_statistics_reference(x_ref, target, n_per_unit=n, gamma=gamma, regions=regions, ignore_label=ignore)
        label = f"regions={regions} ignore={ignore} C={num_classes} n={n} gamma={gamma} {dtype}"
        try:
            assert_statistics_equal(fused, ref, rtol=1e-5)
            weighted_sum(fused).backward()
            weighted_sum(ref).backward()
            assert x_fused.grad.dtype == dtype, x_fused.grad.dtype
            assert_close_relative(x_fused.grad, x_ref.grad, rtol=2e-3 if dtype == torch.float16 else 1e-5)
        except AssertionError as e:
            failures += 1
            print(f"MISMATCH {label}: {e}", file=sys.stderr)
        else:
            print(f"ok {label}")
    return 1 if failures else 0


def check_triton_no_host_sync() -> int:
    """L1DFLLoss forward + backward through the Triton kernels (interpreter, CPU tensors) under
    :class:`HostSyncGuard`, with nnU-Net's deep-supervision wrapper: 0 when no syncing op is seen.

    The guard is paused during the kernel launches alone: the interpreter itself moves data on the
    host, which a compiled launch does not. Everything around them (target cast, partial sums,
    weights, Dice, focal, the wrapper, autograd) is watched.
    """
    from _sync_guard import HostSyncGuard
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from torch.utils._python_dispatch import _disable_current_modes

    import nnunetv2_l1dfl.kernels as kernels
    from nnunetv2_l1dfl.kernels import cuda
    from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss

    class Unguarded:
        """A Triton kernel whose launches run with the guard paused."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                with _disable_current_modes():
                    return self.kernel[grid](*args, **kwargs)

            return launch

    kernel_names = [f"_{kind}_{step}_kernel" for kind in ("softmax", "sigmoid") for step in ("forward", "backward")]
    for name in kernel_names:
        setattr(cuda, name, Unguarded(getattr(cuda, name)))
    kernels.backend_for = lambda device: cuda  # CPU tensors take the Triton path
    failures = 0
    cases = [
        ("softmax, ignore label", False, 255, 3),
        ("regions, ignore mask", True, 1, 2),
    ]
    for label, regions, ignore, channels in cases:
        scales = [(2, 6, 5, 4), (2, 3, 3, 2)]
        inputs = [make_case(s, channels, n_per_unit=10, regions=regions, ignore_label=ignore, seed=i)
                  for i, s in enumerate(scales)]
        outputs = [x.clone().requires_grad_() for x, _ in inputs]
        targets = [t for _, t in inputs]
        loss_fn = DeepSupervisionWrapper(L1DFLLoss(regions=regions, ignore_label=ignore, backend="fused"), (2 / 3, 1 / 3))
        with HostSyncGuard() as guard:
            loss = loss_fn(outputs, targets)
            loss.backward()
        if guard.syncs or any(o.grad is None for o in outputs) or not torch.isfinite(loss):
            failures += 1
            print(f"SYNC {label}: {guard.syncs}", file=sys.stderr)
        else:
            print(f"no sync {label} ({guard.seen} ops)")
    return 1 if failures else 0


def check_triton_no_class_labels() -> int:
    """Labels outside [0, C) that are not the ignore label make the Triton path's loss NaN (CUDA
    cannot check them without a host sync); the same target with valid labels gives a finite loss,
    and the ignore label itself stays allowed. 0 when all hold."""
    import nnunetv2_l1dfl.kernels as kernels
    from nnunetv2_l1dfl.kernels import FusedBinStatistics, cuda
    from nnunetv2_l1dfl.losses.l1dfl import BinStatistics, L1DFLLoss

    kernels.backend_for = lambda device: cuda  # CPU tensors take the Triton path (interpreter)
    failures = 0
    logits, target = make_case((2, 6, 5, 4), 3, n_per_unit=10, seed=5)
    for focal in (True, False):
        loss_fn = L1DFLLoss(backend="fused", focal=focal)
        if not torch.isfinite(loss_fn(logits, target)):
            failures += 1
            print(f"NOT FINITE valid labels focal={focal}", file=sys.stderr)
        for label, ignore in ((3, None), (255, None), (-1, None), (7, 255)):
            bad = target.clone()
            bad[1, 0, 3, 2, 1] = label
            loss = L1DFLLoss(backend="fused", focal=focal, ignore_label=ignore)(logits, bad)
            stats = BinStatistics(*FusedBinStatistics.apply(logits, bad, cuda, 10, 2.0, False, ignore))
            if torch.isnan(loss) and torch.isnan(stats.union[1]).all() and torch.isnan(stats.focal_sum) \
                    and torch.isfinite(stats.union[0]).all():  # only the sample holding the label
                print(f"nan label={label} ignore={ignore} focal={focal}")
            else:
                failures += 1
                print(f"NOT NAN label={label} ignore={ignore} focal={focal}: {loss}", file=sys.stderr)
    ignored = target.clone()
    ignored[1, 0, 3, 2, 1] = 255
    if not torch.isfinite(L1DFLLoss(backend="fused", ignore_label=255)(logits, ignored)):
        failures += 1
        print("NOT FINITE with the ignore label", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    modes = {"triton": check_triton_interpreter, "triton-sync": check_triton_no_host_sync,
             "triton-labels": check_triton_no_class_labels}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: TRITON_INTERPRET=1 python tests/_kernels_helpers.py {{{','.join(modes)}}}")
    sys.exit(modes[sys.argv[1]]())
