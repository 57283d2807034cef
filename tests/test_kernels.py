"""The fused CPU (numba) kernels against the plain PyTorch reference of the L1DFL statistics.

Inputs keep every difficulty away from bin edges (see ``_kernels_helpers.make_case``) except in
the tests that put elements exactly on edges on purpose, where both paths compute p exactly.
"""

from __future__ import annotations

import pytest
import torch
from _kernels_helpers import assert_close_relative, assert_statistics_equal, make_case, weighted_sum

from nnunetv2_l1dfl.kernels import FusedBinStatistics, cpu_backend, fused_bin_statistics
from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss, bin_statistics_reference

CASES = [
    # (spatial incl. batch, C, bin width, gamma, regions, ignore_label)
    ((2, 13, 11, 7), 2, 0.1, 2.0, False, None),
    ((2, 17, 19), 3, 0.05, 1.0, False, None),
    ((1, 9, 8, 6), 4, 0.2, 5.0, False, None),
    ((2, 12, 10, 5), 3, 0.1, 2.0, False, 3),
    ((2, 21, 23), 2, 0.2, 1.0, False, 255),
    ((2, 8, 9, 7), 4, 0.05, 5.0, False, 4),
    ((2, 11, 9, 6), 2, 0.1, 2.0, True, None),
    ((2, 19, 17), 3, 0.05, 5.0, True, 1),
    ((1, 10, 8, 7), 4, 0.2, 1.0, True, 1),
    ((2, 7, 6, 5), 3, 0.1, 0.5, False, None),  # non-integer gamma: exp/log path
]


def _stats(logits, target, *, n, gamma, regions, ignore, fused: bool):
    x = logits.clone().requires_grad_()
    options = {"n_per_unit": n, "gamma": gamma, "regions": regions, "ignore_label": ignore}
    stats = fused_bin_statistics(x, target, **options) if fused else bin_statistics_reference(x, target, **options)
    weighted_sum(stats).backward()
    return stats, x.grad


@pytest.mark.parametrize("shape,C,bin_width,gamma,regions,ignore", CASES)
def test_fused_statistics_and_gradient_match_reference(shape, C, bin_width, gamma, regions, ignore):
    n = round(1 / bin_width)
    logits, target = make_case(shape, C, n_per_unit=n, regions=regions, ignore_label=ignore, seed=len(shape) + C)
    fused, grad_fused = _stats(logits, target, n=n, gamma=gamma, regions=regions, ignore=ignore, fused=True)
    ref, grad_ref = _stats(logits, target, n=n, gamma=gamma, regions=regions, ignore=ignore, fused=False)
    assert_statistics_equal(fused, ref)
    assert_close_relative(grad_fused, grad_ref)
    if ignore is not None:  # ignored voxels get exactly zero gradient
        ignored = (target[:, -1:] != 0) if regions else (target == ignore)
        assert torch.all(grad_fused.masked_select(ignored.expand_as(grad_fused)) == 0)


@pytest.mark.parametrize("regions", [False, True])
def test_loss_value_and_gradient_match_reference_backend(regions):
    logits, target = make_case((2, 14, 12, 9), 3, n_per_unit=10, regions=regions, ignore_label=1, seed=5)
    results = []
    for backend in ("fused", "reference"):
        x = logits.clone().requires_grad_()
        value = L1DFLLoss(regions=regions, ignore_label=1, backend=backend)(x, target)
        value.backward()
        results.append((value, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    assert_close_relative(results[0][1], results[1][1])


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64, torch.uint8, torch.float32])
def test_label_dtypes_give_the_same_result(target_dtype):
    logits, target = make_case((2, 9, 8, 7), 3, n_per_unit=10, seed=2)
    base = fused_bin_statistics(logits, target, n_per_unit=10, gamma=2.0, regions=False, ignore_label=None)
    other = fused_bin_statistics(
        logits, target.to(target_dtype), n_per_unit=10, gamma=2.0, regions=False, ignore_label=None
    )
    for a, b in zip(base, other):
        assert torch.equal(a, b)


def test_region_targets_of_any_dtype_give_the_same_result():
    logits, target = make_case((2, 9, 8, 7), 2, n_per_unit=10, regions=True, ignore_label=1, seed=4)
    base = fused_bin_statistics(logits, target, n_per_unit=10, gamma=2.0, regions=True, ignore_label=1)
    for dtype in (torch.int16, torch.int64, torch.float32):
        other = fused_bin_statistics(logits, target.to(dtype), n_per_unit=10, gamma=2.0, regions=True, ignore_label=1)
        for a, b in zip(base, other):
            assert torch.equal(a, b)


def test_fp16_and_bf16_logits_give_the_fp32_result_and_gradient_dtype():
    logits, target = make_case((2, 10, 9, 8), 3, n_per_unit=10, seed=7)
    for dtype in (torch.float16, torch.bfloat16):
        low = logits.to(dtype)
        x = low.clone().requires_grad_()
        value = L1DFLLoss(backend="fused")(x, target)
        value.backward()
        assert value.dtype == torch.float32
        assert x.grad.dtype == dtype
        x32 = low.float().requires_grad_()
        expected = L1DFLLoss(backend="reference")(x32, target)
        expected.backward()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
        assert_close_relative(x.grad.float(), x32.grad.to(dtype).float(), rtol=1e-2)


def test_elements_exactly_on_bin_edges():
    # C = 4 equal logits: p = 0.25 exactly; non-target g = 0.25 (edge of bins 2|3 for width 0.1),
    # target g = 0.75 (edge 7|8). Bins are closed on the left, so they land in bins 3 and 8.
    target = torch.tensor([0, 1, 2, 3, 1, 0], dtype=torch.int16).reshape(1, 1, 2, 3)
    logits = torch.zeros((1, 4, 2, 3))
    for fused in (True, False):
        stats, _ = _stats(logits, target, n=10, gamma=2.0, regions=False, ignore=None, fused=fused)
        expected = torch.zeros(11, dtype=torch.int64)
        expected[3], expected[8] = 18, 6
        assert torch.equal(stats.counts, expected)
    # regions, logit 0: p = 0.5 exactly, g = 0.5 = edge of bins 2|3 for width 0.2
    region_target = torch.tensor([[True, False], [False, True]]).reshape(1, 2, 2, 1)
    stats = fused_bin_statistics(
        torch.zeros((1, 2, 2, 1)), region_target, n_per_unit=5, gamma=2.0, regions=True, ignore_label=None
    )
    assert torch.equal(stats.counts, torch.tensor([0, 0, 0, 4, 0, 0]))


def test_saturated_probabilities_give_g_zero_and_one():
    # huge logits: p is exactly 0 or 1, so g = 0 (right) or 1 (confidently wrong)
    target = torch.tensor([0, 1, 1, 0], dtype=torch.int16).reshape(1, 1, 4, 1)
    logits = torch.zeros((1, 2, 4, 1))
    logits[0, 0, :, 0] = torch.tensor([1e4, -1e4, 1e4, -1e4])  # voxels 0, 1 right; 2, 3 wrong
    for fused in (True, False):
        stats, grad = _stats(logits, target, n=10, gamma=2.0, regions=False, ignore=None, fused=fused)
        assert stats.counts.tolist() == [4] + [0] * 9 + [4]
        assert torch.isfinite(stats.focal_sum) and torch.isfinite(grad).all()
    fused, _ = _stats(logits, target, n=10, gamma=2.0, regions=False, ignore=None, fused=True)
    ref, _ = _stats(logits, target, n=10, gamma=2.0, regions=False, ignore=None, fused=False)
    assert_statistics_equal(fused, ref)


@pytest.mark.parametrize("regions,ignore", [(False, None), (False, 2), (True, 1)])
def test_gradcheck_float64(regions, ignore):
    logits, target = make_case((2, 4, 3, 3), 3, n_per_unit=10, regions=regions, ignore_label=ignore, seed=11)
    x = logits.double().requires_grad_()

    def statistics(x):
        stats = FusedBinStatistics.apply(x, target, cpu_backend(), 10, 2.0, regions, ignore)
        return stats[1], stats[2], stats[3]

    assert torch.autograd.gradcheck(statistics, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    loss = L1DFLLoss(regions=regions, ignore_label=ignore, backend="fused")
    assert torch.autograd.gradcheck(lambda x: loss(x, target).double(), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_non_integer_gamma():
    logits, target = make_case((1, 5, 4, 3), 2, n_per_unit=5, seed=12)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: FusedBinStatistics.apply(x, target, cpu_backend(), 5, 0.5, False, None)[3], (x,), eps=1e-6
    )


def test_deterministic_and_independent_of_thread_count():
    # 3 samples x 40^3 voxels: several chunks per sample, so threads really split the work
    logits, target = make_case((3, 40, 40, 40), 3, n_per_unit=10, seed=13)
    threads = torch.get_num_threads()
    runs = []
    try:
        for num_threads in (1, 2, 2, 3):
            torch.set_num_threads(num_threads)
            runs.append(_stats(logits, target, n=10, gamma=2.0, regions=False, ignore=None, fused=True))
    finally:
        torch.set_num_threads(threads)
    (first, first_grad), others = runs[0], runs[1:]
    for stats, grad in others:
        for a, b in zip(first, stats):
            assert torch.equal(a, b)
        assert torch.equal(first_grad, grad)


def test_only_the_used_statistics_need_a_gradient():
    logits, target = make_case((2, 6, 5, 4), 2, n_per_unit=10, seed=3)
    x = logits.clone().requires_grad_()
    stats = fused_bin_statistics(x, target, n_per_unit=10, gamma=2.0, regions=False, ignore_label=None)
    stats.focal_sum.backward()  # intersection and union unused: their gradients are None
    x_ref = logits.clone().requires_grad_()
    bin_statistics_reference(x_ref, target, n_per_unit=10, gamma=2.0).focal_sum.backward()
    assert_close_relative(x.grad, x_ref.grad)


def test_safe_under_torch_compile():
    logits, target = make_case((2, 8, 7, 6), 3, n_per_unit=10, seed=9)
    loss = L1DFLLoss(backend="fused")

    def step(x):
        return loss(x * 1.0, target) * 2.0

    compiled = torch.compile(step, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    eager, traced = step(x1), compiled(x2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(eager, traced, rtol=1e-6, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-12)


def test_no_kernel_for_other_devices_means_reference_fallback():
    x = torch.zeros((1, 2, 4, 4), device="meta")
    target = torch.zeros((1, 1, 4, 4), dtype=torch.int16, device="meta")
    assert fused_bin_statistics(x, target, n_per_unit=10, gamma=2.0, regions=False, ignore_label=None) is None
