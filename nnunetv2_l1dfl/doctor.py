"""``l1dfl doctor``: what is installed, and whether nnU-Net finds every trainer of this package."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
from importlib.metadata import PackageNotFoundError, version


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def collect_report() -> dict:
    """Versions, devices, nnU-Net paths and trainer resolution, as a plain dict."""
    import torch

    report: dict = {
        "versions": {name: _version(name) for name in
                     ("nnunetv2-l1dfl", "nnunetv2", "torch", "triton", "numba", "SimpleITK", "pydicom",
                      "highdicom", "connected-components-3d", "monai")},
        "cuda": {
            "torch_built_with": torch.version.cuda,
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
        },
        "paths": {name: os.environ.get(name) for name in
                  ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")},
    }
    report["fused_kernels"] = {
        "cpu (numba)": "available" if importlib.util.find_spec("numba") else "numba missing: reference path",
        "cuda (triton)": ("available" if importlib.util.find_spec("triton") and torch.cuda.is_available()
                          else "no CUDA device" if not torch.cuda.is_available() else "triton missing: reference path"),
    }

    trainers: dict[str, str] = {}
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        from nnunetv2_l1dfl.training.trainers import TRAINER_NAMES
    except ImportError as e:  # too old an nnunetv2, or nnunetv2 missing: say what to do
        trainers["(import)"] = f"FAILED: {e}"
    else:
        for name in ["nnUNetTrainer", "nnUNetTrainerDiceLoss", *TRAINER_NAMES]:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's lookup is chatty
                    cls = recursive_find_trainer_class_by_name(name)
                trainers[name] = f"ok ({cls.__module__})"
            except Exception as e:  # noqa: BLE001 - reported, not raised
                trainers[name] = f"NOT FOUND: {str(e).splitlines()[0][:200]}"
    report["trainers"] = trainers
    return report


def run(args: argparse.Namespace) -> int:
    report = collect_report()
    print("nnunetv2-l1dfl doctor")
    print("\nVersions:")
    for name, v in report["versions"].items():
        print(f"  {name:<26} {v}")
    cuda = report["cuda"]
    print(f"\nCUDA: torch built with {cuda['torch_built_with']}, available: {cuda['available']}"
          + (f", devices: {', '.join(cuda['devices'])}" if cuda["devices"] else ""))
    print("Fused L1DFL kernels: " + ", ".join(f"{k}: {v}" for k, v in report["fused_kernels"].items()))
    print("\nnnU-Net paths:")
    for name, value in report["paths"].items():
        print(f"  {name:<20} {value if value else '(not set)'}")
    print("\nTrainer lookup (nnUNetv2_train -tr NAME):")
    failures = 0
    for name, status in report["trainers"].items():
        if not status.startswith("ok"):
            failures += 1
        if args.all_trainers or not status.startswith("ok") or name in (
                "nnUNetTrainer", "nnUNetTrainerL1DFL", "nnUNetTrainerDiceFocal", "nnUNetTrainerSquaredDice"):
            print(f"  {name:<40} {status}")
    total = len(report["trainers"])
    print(f"  ... {total - failures}/{total} trainer names resolve"
          + ("" if args.all_trainers else " (--all-trainers lists every one)"))
    return 1 if failures else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check the installation: versions, CUDA/Triton, nnU-Net paths, trainer lookup",
        description="Print versions of nnunetv2, torch, CUDA, Triton and numba, the nnU-Net folders, and "
                    "whether nnU-Net resolves every trainer name of this package. Exit code 1 if a "
                    "trainer name does not resolve.",
    )
    parser.add_argument("--all-trainers", action="store_true", help="list every trainer name, not only failures")
    parser.set_defaults(func=run)
