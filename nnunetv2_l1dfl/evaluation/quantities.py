"""PET lesion quantities, defined once: volume (MTV), SUVmax, SUVmean, SUVpeak, TLG, centroid,
SUVmax position per lesion, and TMTV, total TLG, SUVmax, SUVmean and Dmax per patient.

``l1dfl compare`` (the GT lesions in ``metrics.analyse_ground_truth`` and the predicted patient
numbers in ``metrics.evaluate_prediction``) and ``l1dfl predict`` (its lesion report) both read
these numbers from here; nothing else computes them.

Conventions (as in ``metrics.py``): arrays are (z, y, x); ``spacing_mm`` is the voxel size in mm in
the same order; the PET holds SUV (the statistics inherit the PET file's unit).

SUVpeak (IBSI "intensity peak", PERCIST's 1 ml sphere): the mean SUV of the voxels whose centres lie
within ``SUVPEAK_RADIUS_MM`` = 6.2 mm (a sphere of 0.998 ml) of a voxel's centre. The sphere samples
the *image*, not the mask: it may extend beyond the lesion into the background or a neighbouring
lesion, as IBSI's intensity peak does. Where the sphere leaves the image, the mean is over the
sphere's voxels inside the image. ``suv_peak`` is the highest such mean over every voxel of the
lesion (IBSI global intensity peak); ``suv_peak_at_max`` centres the sphere on the SUVmax voxel
(IBSI local intensity peak; when several voxels share SUVmax, the highest of their spheres' means,
as IBSI specifies). The sphere means are a convolution of the SUV with the sphere kernel, computed
by FFT on each lesion's bounding box grown by the kernel radius, so the cost does not depend on the
number of lesion voxels times the kernel size and nothing loops over voxels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist

logger = logging.getLogger(__name__)

#: radius of the SUVpeak sphere: 4/3 pi 6.2^3 = 998 mm^3, i.e. 1 ml
SUVPEAK_RADIUS_MM = 6.2


# ----------------------------------------------------------------------------- units and Dmax


def voxel_volume_ml(spacing_mm: tuple[float, float, float]) -> float:
    """Volume of one voxel in ml (= cm^3) from its spacing in mm."""
    return float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0


def max_pairwise_distance(points: np.ndarray) -> float:
    """Largest Euclidean distance between any two rows of ``points`` (k, d), in their units.

    The diameter of a point set is attained between vertices of its convex hull, so only those are
    compared. Degenerate sets are handled explicitly: k < 2 gives 0.0; points on a line give the
    extent along it; points in a plane (a one-slice lesion) use the 2D hull in that plane.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"points must be (k, d), got shape {points.shape}")
    if len(points) < 2:
        return 0.0
    centred = points - points.mean(axis=0)
    _, singular_values, basis = np.linalg.svd(centred, full_matrices=False)
    if singular_values[0] == 0:
        return 0.0  # all points identical
    rank = int(np.count_nonzero(singular_values > singular_values[0] * 1e-9))
    if rank == 1:
        along = centred @ basis[0]
        return float(along.max() - along.min())
    in_subspace = centred @ basis[:rank].T  # distances are preserved: the points lie in the subspace
    try:
        candidates = points[ConvexHull(in_subspace).vertices]
    except QhullError:  # numerically degenerate beyond the rank test: compare all points
        candidates = points
    return _max_distance_brute_force(candidates)


def _max_distance_brute_force(points: np.ndarray, block: int = 2048) -> float:
    best = 0.0
    for start in range(0, len(points), block):
        distances = cdist(points[start : start + block], points[start:])
        best = max(best, float(distances.max()))
    return best


def _row_extreme_indices(flat_indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Of sorted flat indices, keep the first and last voxel of every (z, y) row.

    Any convex-hull vertex of a voxel set is extreme along x within its row, so this keeps every
    hull vertex while shrinking a solid lesion's point set to its surface in x.
    """
    rows = flat_indices // shape[-1]
    new_row = np.flatnonzero(np.diff(rows)) + 1
    starts = np.concatenate(([0], new_row))
    ends = np.concatenate((new_row - 1, [len(flat_indices) - 1]))
    return flat_indices[np.unique(np.concatenate((starts, ends)))]


def dmax_from_flat_indices(
    flat_indices: np.ndarray, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]
) -> float:
    """Dmax in mm of the voxels at the given sorted flat indices (array order); NaN when empty."""
    if len(flat_indices) == 0:
        return float("nan")
    extremes = _row_extreme_indices(np.asarray(flat_indices), shape)
    coordinates = np.stack(np.unravel_index(extremes, shape), axis=1).astype(np.float64)
    return max_pairwise_distance(coordinates * np.asarray(spacing_mm, dtype=np.float64))


def dmax_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> float:
    """Lesion dissemination Dmax (mm): largest distance between the centres of any two foreground
    voxels of a 3D mask, spacing applied. NaN for an empty mask, 0.0 for a single voxel."""
    mask = np.ascontiguousarray(mask)
    return dmax_from_flat_indices(np.flatnonzero(mask), mask.shape, spacing_mm)


# ----------------------------------------------------------------------------- SUVpeak sphere


def sphere_kernel(spacing_mm: tuple[float, float, float], radius_mm: float = SUVPEAK_RADIUS_MM) -> np.ndarray:
    """Boolean (2kz+1, 2ky+1, 2kx+1) kernel of the voxel offsets whose centres lie within
    ``radius_mm`` of the central voxel's centre (distance <= radius, with a 1e-9 relative tolerance
    so that offsets exactly on the sphere count). kz = floor(radius / spacing_z), etc."""
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_mm must be three positive numbers (z, y, x), got {spacing_mm}")
    if not radius_mm > 0:
        raise ValueError(f"radius_mm must be > 0, got {radius_mm}")
    half = np.floor(radius_mm / spacing * (1 + 1e-9)).astype(int)
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing)]
    squared = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    return squared <= radius_mm**2 * (1 + 1e-9)


# ----------------------------------------------------------------------------- per lesion


@dataclass(frozen=True)
class LesionQuantities:
    """Quantities of n lesions; entry k is the lesion with instance label k + 1.

    Units: ml for volumes, the PET's unit (SUV) for SUV values, SUV x ml for TLG; positions are
    voxel indices (z, y, x) into the arrays the quantities were computed from.
    """

    label: np.ndarray  # (n,) int64, 1..n
    n_voxels: np.ndarray  # (n,) int64
    volume_ml: np.ndarray  # (n,) MTV = n_voxels x voxel volume
    suv_max: np.ndarray  # (n,)
    suv_mean: np.ndarray  # (n,)
    suv_sum: np.ndarray  # (n,) sum of SUV over the lesion's voxels
    suv_peak: np.ndarray  # (n,) highest 1 ml sphere mean centred on any lesion voxel (IBSI global peak)
    suv_peak_at_max: np.ndarray  # (n,) 1 ml sphere mean centred on the SUVmax voxel (IBSI local peak)
    tlg: np.ndarray  # (n,) SUVmean x MTV (= TLA, the sum of SUV x voxel volume)
    centroid_zyx: np.ndarray  # (n, 3) float64 mean voxel index
    suvmax_zyx: np.ndarray  # (n, 3) int64, first voxel in array order on ties
    suvmax_flat_index: np.ndarray  # (n,) int64 flat index (array order) of the SUVmax voxel

    @property
    def n_lesions(self) -> int:
        return len(self.label)

    def rows(self) -> list[dict]:
        """One dict per lesion with every quantity as plain Python numbers."""
        return [
            {
                "lesion_id": int(self.label[k]),
                "n_voxels": int(self.n_voxels[k]),
                "volume_ml": float(self.volume_ml[k]),
                "suv_max": float(self.suv_max[k]),
                "suv_mean": float(self.suv_mean[k]),
                "suv_peak": float(self.suv_peak[k]),
                "suv_peak_at_max": float(self.suv_peak_at_max[k]),
                "tlg": float(self.tlg[k]),
                "centroid_z": float(self.centroid_zyx[k, 0]),
                "centroid_y": float(self.centroid_zyx[k, 1]),
                "centroid_x": float(self.centroid_zyx[k, 2]),
                "suvmax_z": int(self.suvmax_zyx[k, 0]),
                "suvmax_y": int(self.suvmax_zyx[k, 1]),
                "suvmax_x": int(self.suvmax_zyx[k, 2]),
            }
            for k in range(self.n_lesions)
        ]


def _check_inputs(instances: np.ndarray, suv: np.ndarray, spacing_mm) -> None:
    if instances.ndim != 3:
        raise ValueError(f"instance map must be 3D (z, y, x), got shape {instances.shape}")
    if instances.shape != suv.shape:
        raise ValueError(f"instance map shape {instances.shape} and PET shape {suv.shape} differ")
    if not np.issubdtype(instances.dtype, np.integer) and instances.dtype != bool:
        raise ValueError(f"instance map must hold integer labels, got dtype {instances.dtype}")
    if len(tuple(spacing_mm)) != 3:
        raise ValueError(f"spacing_mm must be (z, y, x), got {spacing_mm}")


def lesion_quantities(
    instances: np.ndarray,
    suv: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    peak_radius_mm: float = SUVPEAK_RADIUS_MM,
) -> LesionQuantities:
    """Every per-lesion quantity of an instance map (0 = background, lesions 1..n).

    Args:
        instances: (z, y, x) integer instance labels, each of 1..n present at least once (e.g.
            connected components from cc3d); any other numbering is an error.
        suv: (z, y, x) PET in SUV; must be finite inside the lesions. A non-finite value inside
            a lesion's SUVpeak sphere (outside the lesion) makes that sphere's mean NaN; a lesion
            with any such sphere gets ``suv_peak`` NaN (logged), never a peak over fewer spheres.
        spacing_mm: voxel size (z, y, x) in mm.
        peak_radius_mm: radius of the SUVpeak sphere (default 6.2 mm, 1 ml).

    SUVmax ties resolve to the first voxel in array order (``suvmax_zyx``). No lesion gives empty
    arrays.
    """
    instances = np.asarray(instances)
    _check_inputs(instances, suv, spacing_mm)
    flat_indices = np.flatnonzero(instances)
    if len(flat_indices) and int(instances.ravel()[flat_indices].min()) < 0:
        raise ValueError("instance map has negative labels")
    n = int(instances.max()) if instances.size else 0
    return lesion_quantities_from_flat(instances, n, flat_indices, suv, spacing_mm, peak_radius_mm=peak_radius_mm)


def lesion_quantities_from_flat(
    instances: np.ndarray,
    n_lesions: int,
    flat_indices: np.ndarray,
    suv: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    peak_radius_mm: float = SUVPEAK_RADIUS_MM,
) -> LesionQuantities:
    """:func:`lesion_quantities` for callers that already hold the sorted flat indices of the
    foreground and the number of lesions (``metrics.analyse_ground_truth``): no second scan."""
    shape = instances.shape
    lesion_of_voxel = instances.ravel()[flat_indices].astype(np.int64)
    suv_flat = np.ascontiguousarray(suv).ravel()
    suv_values = suv_flat[flat_indices].astype(np.float64)
    if not np.all(np.isfinite(suv_values)):
        raise ValueError("PET has non-finite values (NaN or inf) inside the lesions")
    counts = np.bincount(lesion_of_voxel, minlength=n_lesions + 1)[1:].astype(np.int64)
    missing = np.flatnonzero(counts == 0) + 1
    if len(missing):
        raise ValueError(
            f"instance labels must be 1..{n_lesions} with every label present; missing {missing[:10].tolist()}"
        )
    suv_sum = np.bincount(lesion_of_voxel, weights=suv_values, minlength=n_lesions + 1)[1:]
    # Sort voxels by lesion, then SUV descending, then array order: the first of each lesion is its
    # SUVmax voxel with ties going to the earliest voxel.
    order = np.lexsort((flat_indices, -suv_values, lesion_of_voxel))
    starts = np.searchsorted(lesion_of_voxel[order], np.arange(1, n_lesions + 1))
    firsts = order[starts]
    suvmax_flat = flat_indices[firsts].astype(np.int64)
    coordinates = np.unravel_index(flat_indices, shape)
    centroid = np.stack(
        [np.bincount(lesion_of_voxel, weights=c, minlength=n_lesions + 1)[1:] for c in coordinates], axis=1
    ) / np.maximum(counts, 1)[:, None]
    vv = voxel_volume_ml(spacing_mm)
    suv_max = suv_values[firsts]
    peak, peak_at_max = _suv_peaks(
        suv, shape, flat_indices, lesion_of_voxel, order, starts, suv_values, suv_max, n_lesions, spacing_mm,
        peak_radius_mm,
    )  # fmt: skip
    return LesionQuantities(
        label=np.arange(1, n_lesions + 1, dtype=np.int64),
        n_voxels=counts,
        volume_ml=counts * vv,
        suv_max=suv_max,
        suv_mean=suv_sum / np.maximum(counts, 1),
        suv_sum=suv_sum,
        suv_peak=peak,
        suv_peak_at_max=peak_at_max,
        tlg=suv_sum * vv,  # = SUVmean x MTV, without the round trip through the mean
        centroid_zyx=centroid.reshape(n_lesions, 3),
        suvmax_zyx=np.stack(np.unravel_index(suvmax_flat, shape), axis=1).astype(np.int64).reshape(n_lesions, 3),
        suvmax_flat_index=suvmax_flat,
    )


def _suv_peaks(
    suv, shape, flat_indices, lesion_of_voxel, order, starts, suv_values, suv_max, n_lesions, spacing_mm,
    radius_mm,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """SUVpeak over all lesion voxels and at the SUVmax voxel(s), per lesion, by FFT convolution of
    each lesion's bounding box grown by the kernel half-width (clipped at the image border)."""
    peak = np.full(n_lesions, np.nan)
    peak_at_max = np.full(n_lesions, np.nan)
    if n_lesions == 0:
        return peak, peak_at_max
    kernel = sphere_kernel(spacing_mm, radius_mm).astype(np.float64)
    half = (np.asarray(kernel.shape) - 1) // 2
    ends = np.append(starts[1:], len(order))
    shape_arr = np.asarray(shape)
    # Small lesions (a one-voxel speck, a few voxels) are summed directly: lesion voxels x sphere
    # offsets, vectorised over all of them at once, instead of one FFT call per lesion (a prediction
    # of 60 000 specks took minutes in the per-lesion loop). Larger lesions keep the FFT.
    counts = ends - starts
    zyx_all = np.stack(np.unravel_index(flat_indices, shape), axis=1).astype(np.int32)
    lows = np.minimum.reduceat(zyx_all[order], starts, axis=0) if len(order) else np.zeros((0, 3), int)
    highs = np.maximum.reduceat(zyx_all[order], starts, axis=0) if len(order) else np.zeros((0, 3), int)
    box_voxels = np.prod(np.minimum(highs + half + 1, shape_arr) - np.maximum(lows - half, 0), axis=1)
    # an FFT call costs about as much as summing a few thousand voxels, whatever its box
    direct = counts * int(kernel.sum()) <= _DIRECT_SUM_FACTOR * np.maximum(box_voxels, 4096)
    if direct.any():
        _direct_peaks(
            suv, shape, np.flatnonzero(direct), order, starts, ends, zyx_all, suv_values, suv_max, kernel, peak,
            peak_at_max,
        )  # fmt: skip
    for k in np.flatnonzero(~direct):
        members = order[starts[k] : ends[k]]  # this lesion's voxels, SUVmax first
        zyx = zyx_all[members]
        lo = np.maximum(zyx.min(axis=0) - half, 0)
        hi = np.minimum(zyx.max(axis=0) + half + 1, shape_arr)
        crop = np.asarray(suv[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float64)
        finite = np.isfinite(crop)
        # Voxels outside the crop lie outside the image or beyond every sphere of this lesion, so
        # zero padding of the crop is the "mean of the sphere's voxels inside the image" rule.
        sums = fftconvolve(np.where(finite, crop, 0.0), kernel, mode="same")
        local = tuple((zyx - lo).T)
        if np.any(zyx.min(axis=0) - half < 0) or np.any(zyx.max(axis=0) + half + 1 > shape_arr):
            n_inside = np.rint(fftconvolve(np.ones(crop.shape), kernel, mode="same"))[local]
        else:  # no sphere of this lesion leaves the image
            n_inside = kernel.sum()
        means = sums[local] / n_inside
        if not finite.all():
            touched = np.rint(fftconvolve((~finite).astype(np.float64), kernel, mode="same"))[local] > 0
            means[touched] = np.nan
        at_max = suv_values[members] == suv_max[k]
        if np.isnan(means).any():
            logger.warning(
                "lesion %d: the SUVpeak sphere of %d voxel(s) holds non-finite PET values; SUVpeak is NaN",
                k + 1, int(np.isnan(means).sum()),
            )  # fmt: skip
            peak[k] = np.nan
            peak_at_max[k] = np.nan if np.isnan(means[at_max]).any() else means[at_max].max()
        else:
            peak[k] = means.max()
            peak_at_max[k] = means[at_max].max()
    return peak, peak_at_max


#: a lesion's sphere means are summed directly when (its voxels x sphere voxels) is at most this
#: factor x the voxels of its FFT box; tests set it to 0 (FFT only) and to infinity (direct only)
_DIRECT_SUM_FACTOR = 1.0


def _direct_peaks(
    suv, shape, lesions, order, starts, ends, zyx_all, suv_values, suv_max, kernel, peak, peak_at_max
) -> None:  # fmt: skip
    """Sphere means at every voxel of the given lesions by summing the in-image sphere voxels
    offset by offset (float64), then the same per-lesion maxima and NaN rule as the FFT path;
    fills ``peak`` and ``peak_at_max`` in place."""
    members = np.concatenate([order[starts[k] : ends[k]] for k in lesions])
    sizes = (ends - starts)[lesions]
    first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    zyx = zyx_all[members]
    suv_flat = np.ascontiguousarray(suv).ravel()
    half = (np.asarray(kernel.shape) - 1) // 2
    offsets = np.argwhere(kernel) - half
    sums = np.zeros(len(members))
    n_inside = np.zeros(len(members))
    touched = np.zeros(len(members), dtype=bool)
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    for offset in offsets:
        neighbour = zyx + offset
        inside = np.all((neighbour >= 0) & (neighbour < np.asarray(shape)), axis=1)
        values = suv_flat[neighbour[inside] @ strides].astype(np.float64)
        finite = np.isfinite(values)
        sums[inside] += np.where(finite, values, 0.0)
        n_inside[inside] += 1
        touched[np.flatnonzero(inside)[~finite]] = True
    means = sums / n_inside
    means[touched] = np.nan
    at_max = suv_values[members] == np.repeat(suv_max[lesions], sizes)
    lesion_peak = np.maximum.reduceat(means, first)  # NaN propagates: a NaN sphere makes the peak NaN
    lesion_at_max = np.maximum.reduceat(np.where(at_max, means, -np.inf), first)
    for k, value, value_at_max, n_nan in zip(lesions, lesion_peak, lesion_at_max, np.add.reduceat(touched.astype(np.int64), first)):
        if n_nan:
            logger.warning(
                "lesion %d: the SUVpeak sphere of %d voxel(s) holds non-finite PET values; SUVpeak is NaN",
                k + 1, int(n_nan),
            )  # fmt: skip
        peak[k] = value
        peak_at_max[k] = value_at_max


# ----------------------------------------------------------------------------- per patient


def patient_quantities_from_flat(
    flat_indices: np.ndarray,
    n_lesions: int,
    suv_values: np.ndarray,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
) -> dict:
    """Patient numbers from the sorted flat indices of the foreground, the SUV at those voxels and
    the number of lesions (see :func:`patient_quantities`)."""
    vv = voxel_volume_ml(spacing_mm)
    n_voxels = len(flat_indices)
    suv_values = np.asarray(suv_values, dtype=np.float64)
    total = float(suv_values.sum())
    return {
        "n_lesions": int(n_lesions),
        "tmtv_ml": n_voxels * vv,
        "total_tlg": total * vv,
        "suv_max": float(suv_values.max()) if n_voxels else float("nan"),
        "suv_mean": total / n_voxels if n_voxels else float("nan"),
        "dmax_mm": dmax_from_flat_indices(flat_indices, shape, spacing_mm),
    }


def patient_quantities(instances: np.ndarray, suv: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict:
    """Patient-level quantities of an instance map (0 = background, lesions 1..n).

    Returns ``n_lesions`` (the number of distinct labels > 0), ``tmtv_ml`` (foreground voxels x voxel
    volume), ``total_tlg`` (sum of SUV x voxel volume over the foreground = the sum of the lesions'
    TLG), ``suv_max`` (highest SUV in the foreground), ``suv_mean`` (mean SUV of all foreground
    voxels, i.e. total TLG / TMTV) and ``dmax_mm`` (largest distance between the centres of any two
    foreground voxels, as ``metrics.dmax_mm``). Without lesions: 0, 0.0, 0.0, NaN, NaN, NaN.
    """
    instances = np.asarray(instances)
    _check_inputs(instances, suv, spacing_mm)
    flat_indices = np.flatnonzero(instances)
    labels = instances.ravel()[flat_indices]
    suv_values = np.ascontiguousarray(suv).ravel()[flat_indices].astype(np.float64)
    if not np.all(np.isfinite(suv_values)):
        raise ValueError("PET has non-finite values (NaN or inf) inside the lesions")
    n_lesions = len(np.unique(labels))
    return patient_quantities_from_flat(flat_indices, n_lesions, suv_values, instances.shape, spacing_mm)
