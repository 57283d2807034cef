"""Time the scoring of one large synthetic case (the figure quoted in docs/evaluation.md).

    python -m nnunetv2_l1dfl.evaluation.timing                 # 600 x 512 x 512, 50 lesions, 2 trainers
    python -m nnunetv2_l1dfl.evaluation.timing --with-files    # also through .nii.gz files on disk

The case: PET noise around SUV 1 with 50 spherical lesions (radius 2-12 voxels, SUV 4-20) as GT;
trainer A misses 5 lesions, grows the rest by one voxel and adds 10 false-positive blobs; trainer
B shifts every lesion by one voxel. Only metric computation is timed in the first figure (arrays
in memory); ``--with-files`` adds reading compressed NIfTI files, as ``l1dfl compare`` does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def _paint(volume: np.ndarray, centre: np.ndarray, radius: int, value=True) -> None:
    ball = _ball(radius)
    lo = centre - radius
    region = tuple(slice(int(a), int(a) + ball.shape[0]) for a in lo)
    view = volume[region]
    view[ball[: view.shape[0], : view.shape[1], : view.shape[2]]] = value


def synthetic_case(
    shape: tuple[int, int, int] = (600, 512, 512), n_lesions: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(gt uint8, suv float32, {trainer: prediction uint8}) of the benchmark case."""
    rng = np.random.default_rng(seed)
    suv = rng.gamma(4.0, 0.25, size=shape).astype(np.float32)  # background around SUV 1
    gt = np.zeros(shape, dtype=np.uint8)
    pred_a = np.zeros(shape, dtype=np.uint8)
    pred_b = np.zeros(shape, dtype=np.uint8)
    # one lesion per 40-voxel grid cell, so that no two lesions (or predictions) touch
    cells = np.array(np.unravel_index(rng.choice(np.prod([s // 40 for s in shape]), n_lesions, replace=False),
                                      [s // 40 for s in shape])).T  # fmt: skip
    for i in range(n_lesions):
        radius = int(rng.integers(2, 13))
        centre = cells[i] * 40 + 20 + rng.integers(-4, 5, size=3)
        _paint(gt, centre, radius, 1)
        _paint(suv, centre, radius, np.float32(rng.uniform(4, 20)))
        _paint(suv, centre, max(radius // 2, 1), np.float32(rng.uniform(21, 30)))  # a hotter core
        if i >= 5:  # A misses the first five lesions and over-segments the others
            _paint(pred_a, centre, radius + 1, 1)
        _paint(pred_b, centre + 1, radius, 1)
    for _ in range(10):  # false positives on cell corners, away from every lesion
        _paint(pred_a, (np.array([rng.integers(1, s // 40) for s in shape]) * 40), 3, 1)
    return gt, suv, {"A": pred_a, "B": pred_b}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(600, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--lesions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs on arrays (default: 3)")
    parser.add_argument("--with-files", action="store_true", help="also time reading .nii.gz files")
    args = parser.parse_args(argv)

    from nnunetv2_l1dfl.evaluation.compare import CompareOptions, evaluate_case_arrays, evaluate_case_files

    spacing = (2.0, 1.37, 1.37)
    options = CompareOptions(plots=False, calibration=False)
    small_gt, small_suv, small_predictions = synthetic_case((80, 80, 80), 2)
    evaluate_case_arrays("warm-up", small_gt, small_suv, small_predictions, spacing, options)  # one-off costs
    gt, suv, predictions = synthetic_case(tuple(args.shape), args.lesions)
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = evaluate_case_arrays("bench", gt, suv, predictions, spacing, options)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = float(np.median(times))
    n_gt = result.case_rows[0]["n_lesions_gt"]
    scores = ", ".join(
        "{trainer} DSC {dice:.3f} TP {tp} FP {fp} FN {fn}".format(**row) for row in result.case_rows
    )
    print(
        f"arrays: {tuple(args.shape)} voxels, {n_gt} GT lesions, {len(predictions)} trainers: median {seconds:.2f} s "
        f"of {args.repeats} runs (min {min(times):.2f} s, CPU time {float(np.median(cpu_times)):.2f} s); {scores}"
    )
    if args.with_files:
        import SimpleITK as sitk

        from nnunetv2_l1dfl.evaluation.io import CaseFiles

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)

            def write(array: np.ndarray, name: str) -> Path:
                image = sitk.GetImageFromArray(array)
                image.SetSpacing(tuple(reversed(spacing)))
                sitk.WriteImage(image, str(folder / name), useCompression=True)
                return folder / name

            case = CaseFiles(
                "bench",
                write(gt, "gt.nii.gz"),
                write(suv, "pet_0001.nii.gz"),
                {t: write(p, f"{t}.nii.gz") for t, p in predictions.items()},
            )
            start, cpu_start = time.perf_counter(), time.process_time()
            evaluate_case_files(case, options)
            print(
                f"files: reading + scoring the same case from .nii.gz: {time.perf_counter() - start:.2f} s "
                f"(CPU time {time.process_time() - cpu_start:.2f} s)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
