"""Finding and checking a trained nnU-Net model, and building nnU-Net's own predictor for it.

A model is a trainer output folder (``<Trainer>__<Plans>__<configuration>`` with ``plans.json``,
``dataset.json`` and ``fold_*/checkpoint_final.pth``), found either in ``$nnUNet_results`` from
dataset, configuration, trainer and plans (as ``nnUNetv2_predict -d -c -tr -p``), or given directly
as such a folder, a folder holding one (the layout of an exported model), or a zip written by
``nnUNetv2_export_model_to_zip`` (extracted into a temporary folder). Everything that would make
prediction fail or go wrong later is checked first and reported in one line (:class:`ModelError`):
no checkpoint, a missing fold, a model with another number of input channels than the two this
command provides (CT, PET), channels in another order, several models in one zip without ``-c``/``-tr``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "checkpoint_final.pth"
DEFAULT_PLANS = "nnUNetPlans"
#: The channels this command feeds the network, in nnU-Net's channel order.
EXPECTED_CHANNELS = ("CT", "PET")


class ModelError(RuntimeError):
    """A model that cannot be used; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    """A checked model: the trainer output folder, the folds to ensemble and what it was trained on.

    folds: fold names as nnU-Net takes them (ints, or ``"all"``). labels: dataset.json's labels
    (name -> value, or name -> list of values for regions). file_ending: of the training images.
    """

    folder: Path
    folds: tuple[int | str, ...]
    checkpoint: str
    trainer: str
    plans: str
    configuration: str
    dataset_name: str
    labels: dict[str, Any]
    file_ending: str

    def describe(self) -> str:
        return f"{self.dataset_name} {self.trainer}__{self.plans}__{self.configuration} folds {list(self.folds)}"


def _results_dir() -> Path:
    value = os.environ.get("nnUNet_results")
    if not value:
        raise ModelError("nnUNet_results is not set: set it to your nnU-Net results folder, or give the model with -m")
    return Path(value)


def dataset_folder_in_results(dataset: str, results: Path) -> Path:
    """``results/DatasetXXX_Name`` for an ID (``501``) or a full name (``Dataset501_PSMA``)."""
    if dataset.startswith("Dataset"):
        candidates = [results / dataset]
    elif dataset.isdigit():
        candidates = sorted(results.glob(f"Dataset{int(dataset):03d}_*"))
    else:
        raise ModelError(f"-d {dataset!r}: give a dataset ID (501) or a name (Dataset501_PSMA)")
    candidates = [c for c in candidates if c.is_dir()]
    if not candidates:
        raise ModelError(f"dataset {dataset} not found in nnUNet_results ({results})")
    if len(candidates) > 1:
        raise ModelError(f"dataset ID {dataset} matches {len(candidates)} folders in {results}: "
                         f"{[c.name for c in candidates]}")
    return candidates[0]


def _is_model_folder(folder: Path) -> bool:
    return (folder / "plans.json").is_file() and (folder / "dataset.json").is_file()


def _split_identifier(name: str) -> tuple[str, str, str]:
    parts = name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else (name, "", "")


def extract_zip(zip_path: Path, into: Path) -> Path:
    """Extract an exported model zip into ``into`` (member paths checked to stay inside)."""
    if not zipfile.is_zipfile(zip_path):
        raise ModelError(f"{zip_path}: not a zip file (expected one written by nnUNetv2_export_model_to_zip)")
    root = into.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.namelist():
            target = (root / member).resolve()
            if target != root and root not in target.parents:
                raise ModelError(f"{zip_path}: member {member!r} would be written outside the extraction folder")
        archive.extractall(root)
    return root


def _select_model_folder(root: Path, configuration: str | None, trainer: str | None, plans: str | None) -> Path:
    if _is_model_folder(root):
        return root
    found = sorted(p.parent for p in root.rglob("plans.json") if _is_model_folder(p.parent) and "__" in p.parent.name)
    wanted = [
        f for f in found
        if (trainer is None or _split_identifier(f.name)[0] == trainer)
        and (plans is None or _split_identifier(f.name)[1] == plans)
        and (configuration is None or _split_identifier(f.name)[2] == configuration)
    ]  # fmt: skip
    if not wanted:
        raise ModelError(
            f"{root}: no trained model folder (<Trainer>__<Plans>__<configuration> with plans.json and dataset.json)"
            + (f" matching -c/-tr/-p; it holds {[f.name for f in found]}" if found else "")
        )
    if len(wanted) > 1:
        raise ModelError(f"{root} holds {len(wanted)} models {[f.name for f in wanted]}: choose one with -c, -tr, -p")
    return wanted[0]


def _fold_name(fold: int | str) -> str:
    return "fold_all" if str(fold) == "all" else f"fold_{int(fold)}"


def available_folds(folder: Path, checkpoint: str = DEFAULT_CHECKPOINT) -> list[int | str]:
    """Numbered folds with ``checkpoint`` (nnU-Net's auto-detection); ``["all"]`` when only ``fold_all`` has one."""
    numbered = sorted(
        int(m.group(1)) for p in folder.glob("fold_*")
        if (m := re.fullmatch(r"fold_(\d+)", p.name)) and (p / checkpoint).is_file()
    )  # fmt: skip
    if numbered:
        return list(numbered)
    return ["all"] if (folder / "fold_all" / checkpoint).is_file() else []


def check_channels(dataset_json: dict[str, Any], folder: Path) -> None:
    """The model must take exactly two channels, CT then PET (dataset.json ``channel_names`` and, when
    recorded by this project's converter, ``channel_modalities``)."""
    names = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    if len(names) != len(EXPECTED_CHANNELS):
        raise ModelError(
            f"{folder}: the model was trained on {len(names)} input channel(s) {dict(names)} (dataset.json "
            f"channel_names); this command provides {len(EXPECTED_CHANNELS)}: _0000 CT (HU), _0001 PET (SUV)"
        )
    modalities = dataset_json.get("channel_modalities")
    if isinstance(modalities, dict) and modalities:
        # this project's converter writes e.g. "CT in Hounsfield units, ...", "PET in SUVbw ..."
        got = tuple((str(modalities.get(str(i), "")).split() or [""])[0].upper() for i in range(len(EXPECTED_CHANNELS)))
        if got != EXPECTED_CHANNELS:
            raise ModelError(f"{folder}: dataset.json channel_modalities {modalities} is not CT then PET, the order "
                             "this command provides")


def resolve_model(
    *,
    dataset: str | None = None,
    configuration: str | None = None,
    trainer: str | None = None,
    plans: str | None = None,
    model: Path | str | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
    extract_into: Path | None = None,
) -> ModelSpec:
    """Find and check a model (see the module docstring). ``model``: folder or zip; otherwise dataset,
    configuration and trainer (plans default ``nnUNetPlans``) in ``$nnUNet_results``. A zip is
    extracted into ``extract_into`` (required then; the caller removes it)."""
    if model is not None:
        model = Path(model)
        if not model.exists():
            raise ModelError(f"model not found: {model}")
        if model.is_file():
            if extract_into is None:
                raise ModelError(f"{model}: a zip needs a folder to extract into")
            root = extract_zip(model, Path(extract_into))
        else:
            root = model
        folder = _select_model_folder(root, configuration, trainer, plans)
    else:
        if not (dataset and configuration and trainer):
            raise ModelError("give the model as -d DATASET -c CONFIG -tr TRAINER [-p PLANS], or -m MODEL_DIR_OR_ZIP")
        results = _results_dir()
        folder = dataset_folder_in_results(str(dataset), results) / f"{trainer}__{plans or DEFAULT_PLANS}__{configuration}"
        if not folder.is_dir():
            there = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
            raise ModelError(f"no trained model {folder.name} in {folder.parent} (there: {there})")
    for required in ("plans.json", "dataset.json"):
        if not (folder / required).is_file():
            raise ModelError(f"{folder}: {required} missing; not an nnU-Net model folder")
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    check_channels(dataset_json, folder)
    if folds:
        chosen: list[int | str] = []
        for fold in folds:
            fold = "all" if str(fold) == "all" else int(fold)
            if not (folder / _fold_name(fold) / checkpoint).is_file():
                raise ModelError(f"{folder}: fold {fold}: no {checkpoint} in {_fold_name(fold)}")
            chosen.append(fold)
    else:
        chosen = available_folds(folder, checkpoint)
        if not chosen:
            raise ModelError(f"{folder}: no checkpoint ({checkpoint}) in any fold_* folder; is the model trained?")
    name_trainer, name_plans, name_configuration = _split_identifier(folder.name)
    plans_json = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    configurations = plans_json.get("configurations", {})
    configuration = configuration or name_configuration
    if configuration and configuration not in configurations:
        raise ModelError(f"{folder}: plans.json has no configuration {configuration!r} ({sorted(configurations)})")
    return ModelSpec(
        folder=folder, folds=tuple(chosen), checkpoint=checkpoint, trainer=name_trainer,
        plans=name_plans or plans_json.get("plans_name", ""), configuration=configuration,
        dataset_name=folder.parent.name if folder.parent.name.startswith("Dataset") else plans_json.get("dataset_name", ""),
        labels=dict(dataset_json.get("labels", {})), file_ending=str(dataset_json.get("file_ending", ".nii.gz")),
    )  # fmt: skip


def build_predictor(spec: ModelSpec, device: str = "cuda", use_mirroring: bool = True,
                    verbose: bool = False) -> nnUNetPredictor:
    """nnU-Net's ``nnUNetPredictor`` for ``spec`` with nnU-Net's defaults (step 0.5, Gaussian weighting,
    mirroring TTA unless disabled). The trainer class is looked up by nnU-Net (its package and
    ``nnUNet_extTrainer``, which this package's start-up hook extends); a trainer it cannot find is a
    :class:`ModelError`."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: torch sees no CUDA device (use --device cpu)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("--device mps: torch sees no MPS device (use --device cpu)")
    torch_device = torch.device(device)
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
        perform_everything_on_device=torch_device.type == "cuda", device=torch_device, verbose=verbose,
        verbose_preprocessing=False, allow_tqdm=False,
    )  # fmt: skip
    try:
        predictor.initialize_from_trained_model_folder(str(spec.folder), use_folds=spec.folds,
                                                       checkpoint_name=spec.checkpoint)
    except RuntimeError as e:
        text = str(e).strip().splitlines()
        if any("Could not find" in line or "trainer" in line.lower() for line in text[:3]):
            raise ModelError(
                f"{spec.folder}: nnU-Net cannot find the trainer class of the checkpoint ({spec.trainer}): install "
                "the package that defines it, or list its folder in nnUNet_extTrainer"
            ) from e
        raise ModelError(f"{spec.folder}: cannot load the model: {text[-1] if text else type(e).__name__}") from e
    except (KeyError, OSError, EOFError, ValueError) as e:
        raise ModelError(f"{spec.folder}: cannot load the checkpoint(s) {spec.checkpoint}: {type(e).__name__}: {e}") from e
    return predictor


def temporary_extraction_dir(parent: Path | None = None) -> Path:
    """A fresh folder for an extracted zip (under ``parent`` when given)."""
    return Path(tempfile.mkdtemp(prefix=".l1dfl-model-", dir=parent))
