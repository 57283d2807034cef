"""L1DFLLoss against an independent float64 oracle, MONAI's focal loss, and its edge cases.

The oracle below is deliberately written differently from the package: per-element weight tensor
filled bin by bin from explicit rational edges, one-hot by comparisons, Dice and focal in float64
straight from the method page. Both backends of the criterion ("reference" and the default
"auto", which takes the fused kernel where one exists) are held to it.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch

from nnunetv2_l1dfl import DiceFocalLoss, L1DFLLoss, SquaredDiceLoss
from nnunetv2_l1dfl.losses.l1dfl import bin_index, bins_per_unit

BACKENDS = ["reference", "auto"]
GRID = [(bw, g) for bw in (0.05, 0.1, 0.2) for g in (1.0, 2.0, 5.0)]


def oracle_l1dfl(x, target, bin_width, gamma, *, ignore_label=None, regions=False, batch_dice=False,
                 smooth=1e-8, weighted=True):
    """float64 L1DFL from the method page, written independently. Returns (total, dice term, focal)."""
    x = x.double()
    n = round(1 / bin_width)
    if regions:
        if ignore_label is not None:
            valid = (target[:, -1:] == 0).expand(-1, x.shape[1], *[-1] * (x.ndim - 2))
            y = target[:, :-1].double()
        else:
            valid = torch.ones_like(x, dtype=torch.bool)
            y = target.double()
        p = 1 / (1 + torch.exp(-x))
        log_p, log_1mp = -torch.nn.functional.softplus(-x), -torch.nn.functional.softplus(x)
        focal_el = -(y * (1 - p) ** gamma * log_p + (1 - y) * p**gamma * log_1mp)
    else:
        labels = target[:, 0]
        C = x.shape[1]
        y = torch.stack([(labels == c) for c in range(C)], dim=1).double()
        valid = torch.ones_like(x, dtype=torch.bool)
        if ignore_label is not None:
            valid = (labels != ignore_label)[:, None].expand_as(x)
        log_p = x - torch.logsumexp(x, dim=1, keepdim=True)
        p = torch.exp(log_p)
        focal_el = -((1 - p) ** gamma) * y * log_p
    g = (p - y).abs().detach()
    N = int(valid.sum())
    w = torch.zeros_like(p)
    for k in range(n + 1):
        lo = max(Fraction(2 * k - 1, 2 * n), Fraction(0))
        hi = min(Fraction(2 * k + 1, 2 * n), Fraction(1))
        upper = (g <= 1.0) if k == n else (g < float(hi))
        in_bin = (g >= float(lo)) & upper & valid
        count = int(in_bin.sum())
        if count:
            w[in_bin] = N / (count / float(hi - lo)) if weighted else 1.0
    dims = tuple(range(2, x.ndim))
    inter = (w * p * y).sum(dims)
    union = (w * (p * p + y * y)).sum(dims)
    if batch_dice:
        inter, union = inter.sum(0), union.sum(0)
    dice_term = 1 - ((2 * inter + smooth) / (union + smooth)).mean()
    focal = (focal_el * valid).sum() / max(N, 1)
    return dice_term + focal, dice_term, focal


def make_case(dim, C, seed, *, batch=2, ignore_label=None, regions=False, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    spatial = (6, 5, 4) if dim == 3 else (7, 6)
    x = torch.randn(batch, C, *spatial, generator=gen, dtype=torch.float64) * scale
    if regions:
        target = (torch.rand(batch, C, *spatial, generator=gen) > 0.6).to(torch.int16)
        if ignore_label is not None:
            ignore = (torch.rand(batch, 1, *spatial, generator=gen) > 0.8).to(torch.int16)
            target = torch.cat([target, ignore], dim=1)
    else:
        target = torch.randint(0, C, (batch, 1, *spatial), generator=gen).to(torch.int16)
        if ignore_label is not None:
            target[torch.rand(target.shape, generator=gen) > 0.8] = ignore_label
    return x, target


def value_and_grad(fn, x, target):
    x = x.clone().requires_grad_(True)
    value = fn(x, target)
    value.backward()
    return value.detach(), x.grad.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bin_width,gamma", GRID)
@pytest.mark.parametrize("dim,C", [(2, 2), (2, 3), (2, 4), (3, 2), (3, 3), (3, 4)])
def test_matches_float64_oracle(backend, bin_width, gamma, dim, C):
    x, target = make_case(dim, C, seed=dim * 100 + C * 10 + int(gamma) + int(bin_width * 100))
    loss = L1DFLLoss(bin_width=bin_width, gamma=gamma, backend=backend)
    value, grad = value_and_grad(loss, x, target)
    ref_value, ref_grad = value_and_grad(lambda a, b: oracle_l1dfl(a, b, bin_width, gamma)[0], x, target)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_ignore_label_matches_oracle(backend, dim, batch_dice):
    x, target = make_case(dim, 3, seed=7 + dim, ignore_label=3)
    loss = L1DFLLoss(bin_width=0.1, gamma=2.0, ignore_label=3, batch_dice=batch_dice, backend=backend)
    value, grad = value_and_grad(loss, x, target)
    ref_value, ref_grad = value_and_grad(
        lambda a, b: oracle_l1dfl(a, b, 0.1, 2.0, ignore_label=3, batch_dice=batch_dice)[0], x, target)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    ignored = (target == 3).expand_as(grad)
    assert torch.all(grad[ignored] == 0), "ignored voxels must get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("with_ignore", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 2.0, 5.0])
def test_regions_match_oracle(backend, dim, with_ignore, gamma):
    ignore = 1 if with_ignore else None
    x, target = make_case(dim, 2, seed=31 + dim + int(gamma), ignore_label=ignore, regions=True)
    loss = L1DFLLoss(bin_width=0.1, gamma=gamma, regions=True, ignore_label=ignore, backend=backend)
    value, grad = value_and_grad(loss, x, target)
    ref_value, ref_grad = value_and_grad(
        lambda a, b: oracle_l1dfl(a, b, 0.1, gamma, regions=True, ignore_label=ignore)[0], x, target)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dice_focal_baseline_matches_unweighted_oracle(backend):
    x, target = make_case(3, 3, seed=5)
    value, grad = value_and_grad(DiceFocalLoss(gamma=2.0, backend=backend), x, target)
    ref_value, ref_grad = value_and_grad(lambda a, b: oracle_l1dfl(a, b, 0.1, 2.0, weighted=False)[0], x, target)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regions", [False, True])
def test_squared_dice_baseline_matches_oracle_dice_term(backend, regions):
    """The paper's DL: the oracle's unweighted Dice term alone, value and gradient."""
    ignore = 1 if regions else 3
    x, target = make_case(3, 3, seed=9, ignore_label=ignore, regions=regions)
    loss = SquaredDiceLoss(regions=regions, ignore_label=ignore, backend=backend)
    value, grad = value_and_grad(loss, x, target)
    ref_value, ref_grad = value_and_grad(
        lambda a, b: oracle_l1dfl(a, b, 0.1, 2.0, weighted=False, regions=regions, ignore_label=ignore)[1],
        x, target)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    with pytest.raises(TypeError, match="focal"):
        SquaredDiceLoss(focal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("C", [2, 4])
def test_focal_term_equals_monai(backend, gamma, C):
    from monai.losses import FocalLoss

    x, target = make_case(3, C, seed=11 + C)
    x = x.float()
    _, focal = L1DFLLoss(gamma=gamma, backend=backend).components(x, target)
    one_hot = torch.nn.functional.one_hot(target[:, 0].long(), C).movedim(-1, 1).float()
    expected = FocalLoss(gamma=gamma, use_softmax=True, to_onehot_y=False, reduction="mean")(x, one_hot)
    torch.testing.assert_close(focal, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_focal_term_equals_monai(backend):
    from monai.losses import FocalLoss

    x, target = make_case(3, 2, seed=3, regions=True)
    x = x.float()
    _, focal = L1DFLLoss(gamma=2.0, regions=True, backend=backend).components(x, target)
    expected = FocalLoss(gamma=2.0, use_softmax=False, to_onehot_y=False, reduction="mean")(x, target.float())
    torch.testing.assert_close(focal, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regions", [False, True])
def test_gradcheck_float64(backend, regions):
    x, target = make_case(3, 3 if not regions else 2, seed=2, batch=1, regions=regions, scale=1.5)
    loss = L1DFLLoss(bin_width=0.1, gamma=2.0, regions=regions, backend=backend)
    # bins are piecewise constant in x: make sure no element sits within the finite-difference step of an edge
    with torch.no_grad():
        p = torch.sigmoid(x) if regions else torch.softmax(x, 1)
        edges_distance = ((p * 10 + 0.5) - torch.floor(p * 10 + 0.5)).abs()
        assert edges_distance.min() > 1e-4 and (1 - edges_distance).min() > 1e-4, "reseed: element on an edge"
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: loss(a, target), (x,), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_bin_index_exact_on_edges():
    # bin k holds [(k - 1/2)/n, (k + 1/2)/n): an element exactly on an edge goes to the upper bin, g = 1 to the last
    g = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, np.nextafter(np.float32(0.25), np.float32(0)), 0.05, 0.95],
                     dtype=torch.float32)
    # float32 0.05 is 0.0500000007 (>= the edge 0.05: bin 1); float32 0.95 is 0.9499999881 (< 0.95: bin 9)
    assert bin_index(g, 10).tolist() == [0, 3, 5, 8, 10, 2, 1, 9]
    assert bin_index(torch.tensor([0.125, 0.375, 0.875, 0.0249]), 20).tolist() == [3, 8, 18, 0]
    assert bin_index(torch.tensor([0.5, 0.4999, 1.0]), 5).tolist() == [3, 2, 5]


@pytest.mark.parametrize("n", [20, 10, 5])
def test_bin_index_matches_exact_rational_rule(n):
    # float32 values right next to every edge: floor(g n + 1/2) evaluated exactly with fractions
    edges = np.array([(2 * k + 1) / (2 * n) for k in range(n)], dtype=np.float32)
    near = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 1),
                           np.nextafter(np.nextafter(edges, 0), 0)]).astype(np.float32)
    expected = [int(np.floor(Fraction(float(v)) * n + Fraction(1, 2))) for v in near]
    assert bin_index(torch.from_numpy(near), n).tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_probabilities_fill_first_and_last_bins(backend):
    # huge logits give p exactly 0 and 1 in float32: agreeing voxels have g = 0, disagreeing ones g = 1
    x = torch.full((1, 2, 4, 4, 4), -100.0)
    x[:, 1] = 100.0  # predicts foreground everywhere
    target = torch.zeros((1, 1, 4, 4, 4), dtype=torch.int16)
    target[..., :2] = 1  # half the voxels are foreground: g = 0 there, g = 1 elsewhere
    loss = L1DFLLoss(bin_width=0.1, backend=backend)
    stats = loss.statistics(x, target)
    assert stats.counts.tolist() == [64] + [0] * 9 + [64]
    x.requires_grad_(True)
    value = loss(x, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_uniform_difficulty_reduces_to_plain_squared_dice():
    # counts proportional to the effective widths (edge bins half) give equal densities, hence equal weights
    n, m = 10, 4
    g = [0.02] * m + [0.98] * m + [k / n for k in range(1, n) for _ in range(2 * m)]
    p = torch.tensor(g, dtype=torch.float64)
    x = torch.log(p / (1 - p)).reshape(1, 1, -1, 1)  # regions mode, y = 0: g = p
    target = torch.zeros_like(x, dtype=torch.int16)
    weighted = L1DFLLoss(bin_width=0.1, regions=True, smooth=0.0, backend="reference")
    counts = weighted.statistics(x, target).counts
    assert counts.tolist() == [m] + [2 * m] * (n - 1) + [m]
    x2 = torch.cat([x, -x], dim=2)  # add a region with foreground so the Dice is not degenerate
    t2 = torch.cat([target, torch.ones_like(target)], dim=2)
    for backend in BACKENDS:
        w = L1DFLLoss(bin_width=0.1, regions=True, smooth=0.0, backend=backend)(x2, t2)
        plain = DiceFocalLoss(regions=True, smooth=0.0, backend=backend)(x2, t2)
        torch.testing.assert_close(w, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_input_gives_fp32_result(backend):
    x, target = make_case(3, 3, seed=9)
    x16 = x.half().requires_grad_(True)
    x32 = x.half().float().requires_grad_(True)
    loss = L1DFLLoss(backend=backend)
    v16, v32 = loss(x16, target), loss(x32, target)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, v32, rtol=0, atol=0)
    v16.backward()
    v32.backward()
    assert x16.grad.dtype == torch.float16
    torch.testing.assert_close(x16.grad.float(), x32.grad.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_region_computes_in_float32(backend):
    # nnU-Net's train_step calls the loss under autocast; the result must equal the float32 computation
    x, target = make_case(3, 3, seed=21)
    x = x.bfloat16()
    loss = L1DFLLoss(backend=backend)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = loss(x, target)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, loss(x.float(), target), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regions", [False, True])
def test_empty_and_fully_ignored_patches_are_finite(backend, regions):
    shape = (2, 2, 5, 5, 5)
    x = torch.randn(shape, requires_grad=True)
    if regions:
        empty = torch.zeros(shape, dtype=torch.int16)
        ignored = torch.cat([empty, torch.ones((2, 1, 5, 5, 5), dtype=torch.int16)], dim=1)
    else:
        empty = torch.zeros((2, 1, 5, 5, 5), dtype=torch.int16)
        ignored = torch.full((2, 1, 5, 5, 5), 2, dtype=torch.int16)
    v = L1DFLLoss(regions=regions, backend=backend)(x, empty)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x.grad = None
    v = L1DFLLoss(regions=regions, ignore_label=2 if not regions else 1, backend=backend)(x, ignored)
    v.backward()
    assert torch.isfinite(v) and v.item() == 0.0
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x, target = make_case(3, 3, seed=13)
    x = x.float()
    results = [value_and_grad(L1DFLLoss(backend=backend), x, target) for _ in range(2)]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("bad", [0.3, 0.15, 0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bin_width_must_divide_one(bad):
    with pytest.raises(ValueError, match="bin_width"):
        L1DFLLoss(bin_width=bad)


def test_accepted_bin_widths():
    assert [bins_per_unit(w) for w in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 0.01)] == [20, 10, 5, 4, 2, 1, 100]


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), None])
def test_gamma_must_be_non_negative(bad):
    with pytest.raises(ValueError, match="gamma"):
        L1DFLLoss(gamma=bad)


def test_shape_mismatch_names_both_shapes():
    loss = L1DFLLoss()
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4, 3\).*\(2, 3, 4, 4, 4\)"):
        loss(torch.randn(2, 3, 4, 4, 4), torch.zeros(2, 1, 4, 4, 3, dtype=torch.int16))
    with pytest.raises(ValueError, match="C >= 2"):
        loss(torch.randn(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4, dtype=torch.int16))
    with pytest.raises(ValueError, match="region-based target must have 3 channels"):
        L1DFLLoss(regions=True, ignore_label=1)(torch.randn(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))


def test_forward_does_not_mutate_module_state():
    loss = L1DFLLoss()
    before = dict(vars(loss))
    x, target = make_case(2, 2, seed=1)
    loss(x, target)
    assert {k: v for k, v in vars(loss).items() if not k.startswith("_")} == {
        k: v for k, v in before.items() if not k.startswith("_")}


def test_ddp_defaults_to_true_and_changes_nothing_without_a_process_group():
    """Like nnU-Net's MemoryEfficientSoftDiceLoss: ddp=True by default, effective only under an
    initialized process group (tests/test_l1dfl_ddp.py covers two gloo ranks, default and False)."""
    assert L1DFLLoss().ddp is True and DiceFocalLoss().ddp is True and SquaredDiceLoss().ddp is True
    assert not torch.distributed.is_available() or not torch.distributed.is_initialized()
    x, target = make_case(3, 3, seed=4)
    for backend in BACKENDS:
        on = value_and_grad(L1DFLLoss(backend=backend), x.float(), target)
        off = value_and_grad(L1DFLLoss(backend=backend, ddp=False), x.float(), target)
        assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label, ignore_label", [(3, None), (255, None), (-1, None), (3, 255), (-1, 255)])
def test_label_outside_the_classes_is_an_error_on_cpu(backend, label, ignore_label):
    """Both CPU backends refuse a label that is no class and not the ignore label, naming it
    (the numba kernel used to count it as "no class" and return a finite loss)."""
    x = torch.randn(2, 3, 4, 5, 3, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 5, 3)).to(torch.int16)
    target[1, 0, 2, 1, 0] = label
    loss = L1DFLLoss(backend=backend, ignore_label=ignore_label)
    with pytest.raises(ValueError, match=rf"label value\(s\) {label} \(1 voxels\) outside \[0, 3\)"):
        loss(x, target)
    with pytest.raises(ValueError, match=rf"label value\(s\) {label} "):
        loss(x, target.float())  # float label maps: truncated as target.long() would
    if ignore_label is not None:  # the ignore label itself stays allowed
        target[1, 0, 2, 1, 0] = ignore_label
        assert torch.isfinite(loss(x, target))


def test_fused_cpu_kernel_refuses_no_class_labels_when_called_directly():
    from nnunetv2_l1dfl.kernels import fused_bin_statistics

    x = torch.randn(1, 2, 6, 6)
    target = torch.zeros(1, 1, 6, 6, dtype=torch.int16)
    target[0, 0, 3, 3] = 2
    with pytest.raises(ValueError, match=r"label value\(s\) 2 "):
        fused_bin_statistics(x, target, n_per_unit=10, gamma=2.0, regions=False, ignore_label=None)


def test_reference_path_off_cpu_makes_the_loss_nan_for_no_class_labels(monkeypatch):
    """Where the host check is not made (CUDA: it would stall the host), the reference path keeps
    the one-hot scatter in bounds and makes the loss NaN instead. Emulated on CPU by switching the
    host check off; everything else is the code a CUDA tensor runs."""
    import nnunetv2_l1dfl.losses.l1dfl as module

    monkeypatch.setattr(module, "check_labels_on_host", lambda *args: None)
    x = torch.randn(2, 3, 4, 5, 3)
    target = torch.randint(0, 3, (2, 1, 4, 5, 3))
    for focal in (True, False):  # the Dice term alone (SquaredDice) is NaN too
        assert torch.isfinite(L1DFLLoss(backend="reference", focal=focal)(x, target))
        for label, ignore_label in ((3, None), (255, None), (-1, None), (7, 255)):
            bad = target.clone()
            bad[0, 0, 1, 1, 1] = label
            value = L1DFLLoss(backend="reference", focal=focal, ignore_label=ignore_label)(x, bad)
            assert torch.isnan(value), (label, ignore_label, focal)
    ignored = target.clone()
    ignored[0, 0, 1, 1, 1] = 255
    assert torch.isfinite(L1DFLLoss(backend="reference", ignore_label=255)(x, ignored))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4, 4), (2, 3, 0, 4, 4), (2, 3, 4, 4, 0), (0, 2, 5, 5)])
def test_empty_batch_or_spatial_dimension_is_a_clear_error(backend, shape):
    x = torch.randn(shape)
    target = torch.zeros((shape[0], 1, *shape[2:]), dtype=torch.int16)
    with pytest.raises(ValueError, match=r"hold no elements \(batch size 0"):
        L1DFLLoss(backend=backend)(x, target)
    with pytest.raises(ValueError, match="hold no elements"):
        L1DFLLoss(backend=backend, regions=True)(x, torch.zeros(shape))
