"""Lesion quantities (quantities.py) on hand-built images with known answers, and against a float64
loop oracle that sums the sphere voxel by voxel (written deliberately unlike the FFT code)."""

import logging
import math

import numpy as np
import pytest

from nnunetv2_l1dfl.evaluation import quantities as Q


def oracle_sphere_mean(suv, centre, spacing, radius=6.2):
    """Mean SUV of the in-image voxels whose centres lie within ``radius`` mm of ``centre``."""
    total, n = 0.0, 0
    reach = [int(math.floor(radius / s)) + 1 for s in spacing]
    ranges = [range(max(c - r, 0), min(c + r + 1, size)) for c, r, size in zip(centre, reach, suv.shape)]
    for z in ranges[0]:
        for y in ranges[1]:
            for x in ranges[2]:
                d2 = ((z - centre[0]) * spacing[0]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2
                d2 += ((x - centre[2]) * spacing[2]) ** 2
                if d2 <= radius * radius * (1 + 1e-9):
                    total += float(suv[z, y, x])
                    n += 1
    return total / n


def oracle_peaks(instances, suv, spacing):
    peaks, at_max = [], []
    for label in range(1, int(instances.max()) + 1):
        voxels = np.argwhere(instances == label)
        means = np.array([oracle_sphere_mean(suv, tuple(v), spacing) for v in voxels])
        values = suv[tuple(voxels.T)]
        peaks.append(means.max())
        at_max.append(means[values == values.max()].max())
    return np.array(peaks), np.array(at_max)


def ball(shape, centre_mm, radius_mm, spacing):
    axes = [(np.arange(n) * s - c) ** 2 for n, s, c in zip(shape, spacing, centre_mm)]
    return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]) <= radius_mm**2


def test_sphere_kernel_voxel_counts():
    """Voxel centres within 6.2 mm: at 4 mm isotropic |d|^2 <= 2.4 -> 1 + 6 + 12 = 19 offsets; at
    (4, 2, 2) mm: 29 lattice points of b^2 + c^2 <= 9 in the central slice and 21 of b^2 + c^2 <= 5
    in each neighbouring slice, 71 in all."""
    assert Q.sphere_kernel((4.0, 4.0, 4.0)).sum() == 19
    kernel = Q.sphere_kernel((4.0, 2.0, 2.0))
    assert kernel.shape == (3, 7, 7) and kernel.sum() == 71
    # 1 mm isotropic: the lattice points of |d|^2 <= 38, 1021 voxels = 1.021 ml (the ball is 0.998 ml)
    assert Q.sphere_kernel((1.0, 1.0, 1.0)).sum() == 1021
    with pytest.raises(ValueError, match="spacing_mm"):
        Q.sphere_kernel((0.0, 1.0, 1.0))


def test_uniform_sphere():
    """A ball of radius 10 mm at SUV 10 in background SUV 1: every quantity is known; the 6.2 mm
    sphere at the centre lies inside the lesion, so SUVpeak = 10 (also at the tied SUVmax voxels)."""
    spacing = (1.0, 1.0, 1.0)
    shape = (32, 32, 32)
    lesion = ball(shape, (16, 16, 16), 10.0, spacing)
    suv = np.where(lesion, 10.0, 1.0).astype(np.float32)
    q = Q.lesion_quantities(lesion.astype(np.uint8), suv, spacing)
    n = int(lesion.sum())
    np.testing.assert_array_equal(q.label, [1])
    np.testing.assert_array_equal(q.n_voxels, [n])
    np.testing.assert_allclose(q.volume_ml, [n * 0.001])
    np.testing.assert_allclose(q.suv_max, [10.0])
    np.testing.assert_allclose(q.suv_mean, [10.0])
    np.testing.assert_allclose(q.suv_peak, [10.0], rtol=1e-9)
    np.testing.assert_allclose(q.suv_peak_at_max, [10.0], rtol=1e-9)
    np.testing.assert_allclose(q.tlg, [10.0 * n * 0.001])
    np.testing.assert_allclose(q.tlg, q.suv_mean * q.volume_ml)
    np.testing.assert_allclose(q.centroid_zyx, [[16.0, 16.0, 16.0]])
    np.testing.assert_array_equal(q.suvmax_zyx, [np.argwhere(lesion)[0]])  # ties: first in array order


def test_one_voxel_lesion_in_a_delta_image():
    """One lesion voxel holding SUV 71, zero elsewhere, at (4, 2, 2) mm: the sphere holds 71 voxels,
    so SUVpeak = 71 / 71 = 1; a sphere centred one voxel away would see the same 71 / 71 but is no
    lesion voxel."""
    spacing = (4.0, 2.0, 2.0)
    suv = np.zeros((9, 15, 15), dtype=np.float32)
    suv[4, 7, 7] = 71.0
    instances = np.zeros(suv.shape, dtype=np.uint8)
    instances[4, 7, 7] = 1
    q = Q.lesion_quantities(instances, suv, spacing)
    np.testing.assert_allclose(q.suv_peak, [1.0], rtol=1e-9)
    np.testing.assert_allclose(q.suv_peak_at_max, [1.0], rtol=1e-9)
    np.testing.assert_allclose(q.suv_max, [71.0])


@pytest.mark.parametrize("axis, spacing", [(2, (2.0, 2.0, 2.0)), (0, (3.0, 1.0, 1.0)), (1, (2.5, 0.8, 1.6))])
def test_linear_gradient_peak_is_the_value_at_the_hottest_centre(axis, spacing):
    """SUV = 2 + 0.5 i along one axis: the sphere is symmetric, so its mean equals the SUV at its
    centre wherever it stays inside the image; SUVpeak is then 2 + 0.5 i_max of the lesion, and the
    SUVmax voxels (all in the slice i_max) give the same."""
    shape = (20, 24, 24)
    index = np.arange(shape[axis], dtype=np.float64)
    suv = np.broadcast_to((2 + 0.5 * index).reshape([-1 if a == axis else 1 for a in range(3)]), shape).copy()
    instances = np.zeros(shape, dtype=np.int32)
    instances[7:13, 9:15, 9:15] = 1  # at least 7 voxels from every border along each axis
    q = Q.lesion_quantities(instances, suv, spacing)
    i_max = 12 if axis == 0 else 14
    np.testing.assert_allclose(q.suv_peak, [2 + 0.5 * i_max], rtol=1e-9)
    np.testing.assert_allclose(q.suv_peak_at_max, [2 + 0.5 * i_max], rtol=1e-9)
    np.testing.assert_allclose(q.suv_max, [2 + 0.5 * i_max])


def test_two_touching_lesions_and_the_image_border_against_the_loop_oracle():
    """Two face-touching instances (labels 1 and 2, as the predictor's instance map may hold) and a
    third lesion in the image corner, random SUV, anisotropic spacing: per-lesion statistics use
    each lesion's own voxels, the spheres the whole image (lesion 2's sphere sees lesion 1's hot
    voxels), truncated at the border (mean of the in-image voxels)."""
    rng = np.random.default_rng(3)
    spacing = (2.0, 1.5, 1.0)
    shape = (10, 14, 16)
    suv = rng.gamma(2.0, 1.0, size=shape)
    instances = np.zeros(shape, dtype=np.uint16)
    instances[3:6, 4:8, 4:7] = 1
    instances[3:6, 4:8, 7:10] = 2
    instances[0:2, 0:3, 13:16] = 3  # touches three faces of the image
    suv[instances == 1] += 8.0
    q = Q.lesion_quantities(instances, suv, spacing)
    peaks, at_max = oracle_peaks(instances, suv, spacing)
    np.testing.assert_allclose(q.suv_peak, peaks, rtol=1e-9)
    np.testing.assert_allclose(q.suv_peak_at_max, at_max, rtol=1e-9)
    for k, label in enumerate((1, 2, 3)):
        values = suv[instances == label]
        assert q.n_voxels[k] == values.size
        assert q.suv_max[k] == values.max() and q.suv_mean[k] == pytest.approx(values.mean())
        assert q.tlg[k] == pytest.approx(values.sum() * 3e-3)
        np.testing.assert_allclose(q.centroid_zyx[k], np.argwhere(instances == label).mean(axis=0))
        assert suv[tuple(q.suvmax_zyx[k])] == values.max()
    assert q.suv_peak[1] > oracle_sphere_mean(np.where(instances == 1, 0.0, suv), tuple(q.suvmax_zyx[1]), spacing)


def test_patient_quantities():
    """Two lesions (4 voxels SUV 2, 1 voxel SUV 6) at 2 x 1 x 1 mm; Dmax between voxel centres
    (1, 1, 1) and (4, 6, 8): 6 mm, 5 mm, 7 mm apart."""
    spacing = (2.0, 1.0, 1.0)
    instances = np.zeros((6, 10, 10), dtype=np.uint8)
    suv = np.ones(instances.shape)
    instances[1:3, 1:3, 1] = 1
    suv[1:3, 1:3, 1] = 2.0
    instances[4, 6, 8] = 2
    suv[4, 6, 8] = 6.0
    p = Q.patient_quantities(instances, suv, spacing)
    assert p["n_lesions"] == 2
    assert p["tmtv_ml"] == pytest.approx(5 * 0.002)
    assert p["total_tlg"] == pytest.approx(14 * 0.002)
    assert p["suv_max"] == 6.0 and p["suv_mean"] == pytest.approx(14 / 5)
    assert p["dmax_mm"] == pytest.approx(math.sqrt(6**2 + 5**2 + 7**2))
    q = Q.lesion_quantities(instances, suv, spacing)
    assert q.tlg.sum() == pytest.approx(p["total_tlg"]) and q.volume_ml.sum() == pytest.approx(p["tmtv_ml"])
    empty = Q.patient_quantities(np.zeros_like(instances), suv, spacing)
    assert (empty["n_lesions"], empty["tmtv_ml"], empty["total_tlg"]) == (0, 0.0, 0.0)
    assert all(math.isnan(empty[k]) for k in ("suv_max", "suv_mean", "dmax_mm"))
    none = Q.lesion_quantities(np.zeros_like(instances), suv, spacing)
    assert none.n_lesions == 0 and none.suv_peak.shape == (0,) and none.centroid_zyx.shape == (0, 3)


def test_bad_inputs_and_non_finite_pet(caplog):
    spacing = (1.0, 1.0, 1.0)
    suv = np.ones((8, 8, 8))
    instances = np.zeros(suv.shape, dtype=np.int16)
    instances[1, 1, 1] = 1
    instances[6, 6, 6] = 3  # label 2 absent
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        Q.lesion_quantities(instances, suv, spacing)
    with pytest.raises(ValueError, match="integer labels"):
        Q.lesion_quantities(instances.astype(np.float32), suv, spacing)
    with pytest.raises(ValueError, match="differ"):
        Q.lesion_quantities(instances, suv[:-1], spacing)
    instances[6, 6, 6] = 2
    bad = suv.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        Q.lesion_quantities(instances, bad, spacing)
    bad = suv.copy()
    bad[1, 1, 3] = np.inf  # inside lesion 1's sphere (2 mm away), far from lesion 2
    with caplog.at_level(logging.WARNING, logger="nnunetv2_l1dfl.evaluation.quantities"):
        q = Q.lesion_quantities(instances, bad, spacing)
    assert math.isnan(q.suv_peak[0]) and math.isnan(q.suv_peak_at_max[0]) and q.suv_peak[1] == pytest.approx(1.0)
    assert "lesion 1" in caplog.text and "non-finite" in caplog.text


def test_compare_lesion_rows_equal_lesion_quantities():
    """l1dfl compare's per-lesion numbers are lesion_quantities of the GT's connected components."""
    import cc3d

    from nnunetv2_l1dfl.evaluation.compare import CompareOptions, evaluate_case_arrays

    rng = np.random.default_rng(5)
    spacing = (3.0, 2.0, 2.0)
    gt = (rng.random((12, 20, 20)) < 0.05).astype(np.uint8)
    gt[4:8, 5:11, 5:11] = 1
    suv = rng.gamma(3.0, 1.0, size=gt.shape).astype(np.float32)
    result = evaluate_case_arrays("c", gt, suv, {"a": gt, "b": np.zeros_like(gt)}, spacing, CompareOptions(plots=False))
    labels = cc3d.connected_components(gt.astype(bool), connectivity=18)
    q = Q.lesion_quantities(labels, suv, spacing)
    rows = [r for r in result.lesion_rows if r["trainer"] == "a"]
    assert len(rows) == q.n_lesions > 5
    for key, values in (("volume_ml", q.volume_ml), ("suv_max", q.suv_max), ("suv_mean", q.suv_mean),
                        ("suv_peak", q.suv_peak), ("suv_peak_at_max", q.suv_peak_at_max), ("tlg", q.tlg),
                        ("tla", q.tlg), ("n_voxels", q.n_voxels)):  # fmt: skip
        np.testing.assert_array_equal([r[key] for r in rows], values, err_msg=key)
    np.testing.assert_array_equal([[r["suvmax_z"], r["suvmax_y"], r["suvmax_x"]] for r in rows], q.suvmax_zyx)
    patient = Q.patient_quantities(labels, suv, spacing)
    case = result.case_rows[0]
    assert case["tmtv_gt_ml"] == patient["tmtv_ml"] and case["tla_gt"] == patient["total_tlg"]
    assert case["suv_max_gt"] == patient["suv_max"] and case["dmax_mm"] == patient["dmax_mm"]
    assert case["suv_max_pred"] == patient["suv_max"] and case["tla_pred"] == pytest.approx(patient["total_tlg"])
    empty = result.case_rows[1]
    assert empty["n_lesions_pred"] == 0 and math.isnan(empty["suv_max_pred"]) and math.isnan(empty["dmax_pred_mm"])
