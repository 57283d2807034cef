"""The ``l1dfl`` command line: one subcommand per concern, each registered by its own module.

Every module listed in ``SUBCOMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
parser(s) and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
Modules import heavy libraries (torch, SimpleITK, nnU-Net) inside their functions so that
``l1dfl --help`` stays fast.
"""

import argparse
import logging
import sys
from importlib import import_module

SUBCOMMAND_MODULES = (
    "nnunetv2_l1dfl.doctor",  # doctor
    "nnunetv2_l1dfl.conversion.cli",  # convert {dicom,autopet,nifti,hecktor}, suv, splits
    "nnunetv2_l1dfl.conversion.mask_command",  # mask
    "nnunetv2_l1dfl.evaluation.cli",  # compare
    "nnunetv2_l1dfl.phantom.cli",  # phantom
    "nnunetv2_l1dfl.bench",  # bench
    "nnunetv2_l1dfl.demo",  # demo
    "nnunetv2_l1dfl.predict.cli",  # predict
    "nnunetv2_l1dfl.experiment.cli",  # experiment {init,plan,run,submit,status,collect}
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l1dfl",
        description=(
            "nnunetv2-l1dfl: train nnU-Net with the L1-weighted Dice Focal Loss, convert PET/CT data "
            "into two-channel nnU-Net datasets (CT + PET in SUV), and compare trainers on PET lesions."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a real missing dependency inside the module: say so
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
