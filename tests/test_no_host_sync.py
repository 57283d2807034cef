"""The criterion dispatches no operator that makes the host wait for a CUDA device.

nnU-Net's training step must not stall on the loss. On a GPU ``l1dfl bench --verify-cuda`` runs the
loss under ``torch.cuda.set_sync_debug_mode("error")``; here (CI has no GPU) the same mistakes are
caught by name on CPU tensors (``tests/_sync_guard.py``): a scalar read back, a data-dependent
output size, a boolean-mask index. Covered: the two paths a CUDA tensor can take, the plain PyTorch
reference and the Triton kernels (under Triton's interpreter), each with the Dice/focal reduction,
and nnU-Net's deep-supervision wrapper under autocast. The numba kernel is CPU-only and reads the
label range on the host, which costs nothing there, so it is not held to this. The same holds for
the label check of the reference path (``check_labels_on_host``): it runs for CPU tensors only, reads
them through numpy and dispatches no operator; a CUDA tensor skips it (its invalid labels make the loss
NaN instead), so what the guard sees here is what a CUDA tensor runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _sync_guard import HostSyncGuard
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunetv2_l1dfl import DiceFocalLoss, L1DFLLoss


def test_guard_catches_the_usual_syncs():
    x = torch.randn(4, 5)
    with HostSyncGuard() as guard:
        x.sum().item()
        bool((x > 0).any())
        x[x > 0]
        torch.nonzero(x)
        x.repeat_interleave(torch.tensor([1, 2, 1, 1]), dim=0)
    assert len(guard.syncs) == 5, guard.syncs


def test_guard_passes_sync_free_code():
    x = torch.randn(4, 5, requires_grad=True)
    with HostSyncGuard() as guard:
        y = torch.where(x > 0, x, torch.zeros_like(x)).sum() / x.numel()
        y.backward()
    assert guard.seen > 3 and not guard.syncs, guard.syncs


def _softmax_case(batch=2, classes=3, shape=(6, 5, 4), ignore_label=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, classes, *shape), generator=generator) * 3
    t = torch.randint(0, classes, (batch, 1, *shape), generator=generator)
    if ignore_label is not None:
        t[:, :, 0] = ignore_label
    return x, t


def _region_case(batch=2, regions=2, shape=(6, 5, 4), with_ignore=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, regions, *shape), generator=generator) * 3
    t = (torch.rand((batch, regions + int(with_ignore), *shape), generator=generator) > 0.6).float()
    return x, t


CASES = {
    "softmax": (lambda: _softmax_case(), {}),
    "ignore_label": (lambda: _softmax_case(ignore_label=3), {"ignore_label": 3}),
    "batch_dice": (lambda: _softmax_case(), {"batch_dice": True}),
    "regions": (lambda: _region_case(), {"regions": True}),
    "regions_ignore": (lambda: _region_case(with_ignore=True), {"regions": True, "ignore_label": 1}),
    "2d_gamma5_bw005": (lambda: _softmax_case(shape=(9, 7)), {"gamma": 5.0, "bin_width": 0.05}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_forward_backward_has_no_host_sync(case):
    """The plain PyTorch path (what CUDA runs without Triton) and the Dice/focal reduction."""
    make, options = CASES[case]
    x, t = make()
    x.requires_grad_()
    loss_fn = L1DFLLoss(backend="reference", **options)
    with HostSyncGuard() as guard:
        loss = loss_fn(x, t)
        loss.backward()
    assert torch.isfinite(loss) and x.grad is not None
    assert not guard.syncs, f"{case}: {guard.syncs}"


@pytest.mark.parametrize("loss_cls", [L1DFLLoss, DiceFocalLoss])
def test_deep_supervision_under_autocast_has_no_host_sync(loss_cls):
    """nnU-Net's call: a list of scales, bfloat16 autocast (CPU's), the stock wrapper's weights."""
    scales = [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    generator = torch.Generator().manual_seed(3)
    outputs = [torch.randn((2, 3, *s), generator=generator, requires_grad=True) for s in scales]
    targets = [torch.randint(0, 3, (2, 1, *s), generator=generator) for s in scales]
    loss_fn = DeepSupervisionWrapper(loss_cls(backend="reference"), (4 / 7, 2 / 7, 1 / 7))
    with HostSyncGuard() as guard:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(outputs, targets)
        loss.backward()
    assert all(o.grad is not None for o in outputs)
    assert not guard.syncs, guard.syncs


def test_triton_kernels_have_no_host_sync_in_interpreter(repo_root):
    pytest.importorskip("triton", reason="Triton is not installed (it ships with PyTorch's CUDA wheels)")
    result = subprocess.run(
        [sys.executable, str(repo_root / "tests" / "_kernels_helpers.py"), "triton-sync"],
        cwd=repo_root,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("no sync ") == 2, result.stdout
