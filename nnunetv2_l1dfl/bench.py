"""``l1dfl bench``: time and memory of L1DFL against nnU-Net's stock loss and MONAI's DiceFocalLoss.

For each shape and loss: forward + backward time (median over repeats after warm-up, losses run
interleaved so that they share the machine's conditions) and peak extra memory (on CUDA the
allocator's peak; on CPU the peak of PyTorch's CPU allocations recorded by the profiler, which
misses the kernels' small per-thread scratch buffers), each also as a ratio to nnU-Net's
``DC_and_CE_loss`` built as ``nnUNetTrainer._build_loss`` builds it (MemoryEfficientSoftDiceLoss,
smooth 1e-5, no background, ``torch.compile`` of the Dice part on CUDA unless ``nnUNet_compile``
says otherwise, deep supervision weights ``1/2**i`` with the last one 0).

Losses:

- ``l1dfl_fused``: :class:`~nnunetv2_l1dfl.losses.l1dfl.L1DFLLoss` (fused kernels, the default);
- ``l1dfl_pytorch``: the same loss on its plain PyTorch path (``backend="reference"``);
- ``l1dfl_straightforward``: L1DFL as a reader of the paper would write it (bucketize, scatter,
  a full-size weight tensor, a separate MONAI-style focal term): :func:`straightforward_l1dfl`,
  the baseline the fused loss must equal;
- ``dc_and_ce``: nnU-Net's ``DC_and_CE_loss``;
- ``monai_dicefocal``: MONAI's ``DiceFocalLoss`` (softmax, one-hot target, gamma 2), when MONAI
  is installed.

Shapes (B x C x spatial; C from ``--classes``): ``cpu96`` 2 x C x 96^3 (the CPU target case),
``cuda128`` 2 x C x 128^3 (the CUDA target case), ``3d_fullres`` 2 x C x 128^3 with 5
deep-supervision outputs, ``2d`` 12 x C x 512^2 with 7, and ``tiny`` 2 x C x 32^3 for smoke
tests. fp32 logits on CPU, fp16 logits under autocast on CUDA (what ``nnUNetTrainer.train_step``
hands the loss).

``--training`` instead times training iterations of nnUNetTrainerL1DFL against nnUNetTrainer on
the same synthetic dataset and batches (:func:`run_training_comparison`).

``--verify-cuda`` runs the GPU checks of :mod:`nnunetv2_l1dfl.kernels.verify_cuda` instead (:func:`verify_cuda_main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

LOSS_NAMES = ("l1dfl_fused", "l1dfl_pytorch", "l1dfl_straightforward", "dc_and_ce", "monai_dicefocal")
REFERENCE_LOSS = "dc_and_ce"


@dataclass(frozen=True)
class BenchShape:
    """A benchmark case: batch, spatial size, deep-supervision downsamplings (each halves every axis),
    and the plans' ``batch_dice`` that nnU-Net's DC_and_CE_loss gets (nnU-Net: True for 2d)."""

    name: str
    batch: int
    spatial: tuple[int, ...]
    ds_downsamplings: int
    batch_dice: bool

    def scales(self) -> list[tuple[int, ...]]:
        """Spatial shapes of the outputs the loss sees (one without deep supervision)."""
        return [tuple(s // 2**i for s in self.spatial) for i in range(max(self.ds_downsamplings, 1))]


SHAPES = {
    "tiny": BenchShape("tiny", 2, (32, 32, 32), 0, False),
    "cpu96": BenchShape("cpu96", 2, (96, 96, 96), 0, False),
    "cuda128": BenchShape("cuda128", 2, (128, 128, 128), 0, False),
    "3d_fullres": BenchShape("3d_fullres", 2, (128, 128, 128), 5, False),
    "2d": BenchShape("2d", 12, (512, 512), 7, True),
}


@dataclass
class BenchResult:
    """One (shape, loss) measurement; times in milliseconds, memory in MiB."""

    shape: str
    loss: str
    device: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int
    peak_extra_mib: float | None
    loss_value: float
    time_ratio: float | None = None
    memory_ratio: float | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The straightforward L1DFL (the baseline)
# --------------------------------------------------------------------------------------------------


def straightforward_l1dfl(logits, target, bin_width: float = 0.1, gamma: float = 2.0, smooth: float = 1e-8):
    """L1DFL written plainly from the paper: per-voxel weights, then weighted Dice + focal loss.

    logits (B, C, ...) float, target (B, 1, ...) integer labels in [0, C); no ignore label, no
    regions. Bins ``floor(g / bin_width + 1/2)`` by ``torch.bucketize`` on float64 edges, counts
    by ``scatter_add_``, a full-size weight tensor ``beta[bin]``, and the focal term as MONAI
    ``FocalLoss(gamma, use_softmax=True)`` on the one-hot target. Returns a float32 scalar.
    """
    import torch

    x = logits.float()
    num_classes = x.shape[1]
    n_per_unit = round(1 / bin_width)
    p = torch.softmax(x, dim=1)
    y = torch.nn.functional.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1).to(p.dtype)

    g = (p - y).abs().detach().double()
    edges = (torch.arange(n_per_unit, dtype=torch.float64, device=x.device) + 0.5) / n_per_unit
    bins = torch.bucketize(g, edges, right=True)  # bin k holds [edge_{k-1}, edge_k)
    counts = torch.zeros(n_per_unit + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, bins.flatten(), torch.ones_like(bins.flatten()))
    widths = torch.full((n_per_unit + 1,), 1.0 / n_per_unit, dtype=torch.float64, device=x.device)
    widths[0] = widths[-1] = 0.5 / n_per_unit
    density = counts / widths
    beta = torch.where(counts > 0, counts.sum() / density.clamp_min(1e-300), torch.zeros_like(density))
    weights = beta[bins].to(p.dtype)  # the full-size weight tensor

    spatial = tuple(range(2, x.ndim))
    intersection = (weights * p * y).sum(spatial)
    union = (weights * (p * p + y * y)).sum(spatial)
    dice_loss = 1 - ((2 * intersection + smooth) / (union + smooth)).mean()

    log_p = torch.log_softmax(x, dim=1)
    focal_loss = (-((1 - log_p.exp()) ** gamma) * y * log_p).mean()
    return dice_loss + focal_loss


# --------------------------------------------------------------------------------------------------
# Building the losses
# --------------------------------------------------------------------------------------------------


def deep_supervision_weights(num_outputs: int):
    """nnUNetTrainer's weights: ``1/2**i``, the lowest resolution 0, normalized (1 for a single output)."""
    import numpy as np

    if num_outputs == 1:
        return np.ones(1)
    weights = np.array([1 / 2**i for i in range(num_outputs)])
    weights[-1] = 0
    return weights / weights.sum()


def _nnunet_compiles(device_type: str) -> bool:
    """Whether nnUNetTrainer would ``torch.compile`` the Dice part (its ``_do_i_compile``)."""
    if device_type != "cuda" or os.name == "nt":
        return False
    return os.environ.get("nnUNet_compile", "true").lower() in ("true", "1", "t")


def build_loss(name: str, shape: BenchShape, device_type: str, compile_dice: bool | None = None):
    """The loss ``name`` for ``shape``, wrapped in nnU-Net's DeepSupervisionWrapper when it has DS."""
    import torch
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss

    # L1DFL as nnUNetTrainerL1DFL builds it (Dice per sample and class, as the method does);
    # the plans' batch_dice only applies to nnU-Net's own loss
    if name == "l1dfl_fused":
        loss = L1DFLLoss(backend="fused")
    elif name == "l1dfl_pytorch":
        loss = L1DFLLoss(backend="reference")
    elif name == "l1dfl_straightforward":
        loss = _FunctionLoss(straightforward_l1dfl)
    elif name == "dc_and_ce":
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        loss = DC_and_CE_loss(
            {"batch_dice": shape.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=None,
            dice_class=MemoryEfficientSoftDiceLoss,
        )
        if _nnunet_compiles(device_type) if compile_dice is None else compile_dice:
            loss.dc = torch.compile(loss.dc)
    elif name == "monai_dicefocal":
        from monai.losses import DiceFocalLoss

        loss = DiceFocalLoss(include_background=True, to_onehot_y=True, softmax=True, gamma=2.0)
    else:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
    if shape.ds_downsamplings:
        loss = DeepSupervisionWrapper(loss, deep_supervision_weights(len(shape.scales())))
    return loss


class _FunctionLoss:
    """Adapter so a plain function can be wrapped like a loss module."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, logits, target):
        return self.fn(logits, target)


# --------------------------------------------------------------------------------------------------
# Inputs and measurements
# --------------------------------------------------------------------------------------------------


def make_inputs(shape: BenchShape, num_classes: int, device, dtype, seed: int = 0):
    """Logits (leaf tensors, one per output scale) and int16 label maps (B, 1, ...) like nnU-Net's.

    The labels hold a few random cuboid "lesions" per sample; the logits lean towards the labels
    with noise, so that the difficulty histogram is spread as during training.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros((shape.batch, 1, *shape.spatial), dtype=torch.int16)
    for b in range(shape.batch):
        for _ in range(4):
            cls = int(torch.randint(1, num_classes, (1,), generator=generator)) if num_classes > 1 else 0
            sizes = [max(2, s // 6) for s in shape.spatial]
            corner = [int(torch.randint(0, s - w, (1,), generator=generator)) for s, w in zip(shape.spatial, sizes)]
            region = tuple(slice(c, c + w) for c, w in zip(corner, sizes))
            labels[(b, 0) + region] = cls
    logits_list, targets = [], []
    for i, spatial in enumerate(shape.scales()):
        step = 2**i
        target = labels[(slice(None), slice(None)) + tuple(slice(None, None, step) for _ in spatial)]
        target = target[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)].contiguous()
        onehot = torch.nn.functional.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1).float()
        noise = torch.randn((shape.batch, num_classes, *spatial), generator=generator)
        logits = 3.0 * onehot + 1.5 * noise
        logits_list.append(logits.to(device=device, dtype=dtype).requires_grad_())
        targets.append(target.to(device))
    return logits_list, targets


@contextlib.contextmanager
def _stderr_silenced():
    """Silence C-level stderr (the profiler's start/stop lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_extra_bytes(step: Callable[[], object]) -> int | None:
    """Peak of PyTorch CPU allocations made by ``step()`` above what was allocated before, in bytes.

    Read from the profiler's memory events (allocations and frees in time order). None when this
    PyTorch build does not expose them.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
    except (AttributeError, RuntimeError) as e:
        logger.warning("CPU memory profile not available in this PyTorch build: %s", e)
        return None
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def _make_step(loss, logits_list, targets, autocast_dtype):
    import torch

    def step():
        for logits in logits_list:
            logits.grad = None
        device_type = logits_list[0].device.type
        context = (
            torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        )
        with context:
            if len(logits_list) > 1:
                value = loss(logits_list, targets)
            else:
                value = loss(logits_list[0], targets[0])
        value.backward()
        return value

    return step


def run_benchmark(
    shape_names: list[str],
    loss_names: list[str],
    *,
    device: str,
    num_classes: int = 2,
    repeats: int = 20,
    warmup: int = 3,
    measure_memory: bool = True,
    compile_dice: bool | None = None,
    progress: bool = True,
) -> list[BenchResult]:
    """Measure every (shape, loss); ratios are to ``dc_and_ce`` when it is among the losses."""
    import torch
    from tqdm import tqdm

    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    dtype = torch.float16 if is_cuda else torch.float32
    autocast_dtype = torch.float16 if is_cuda else None
    results: list[BenchResult] = []
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        available = []
        for name in loss_names:
            try:
                available.append((name, build_loss(name, shape, dev.type, compile_dice)))
            except ImportError as e:
                logger.warning("skipping %s: %s", name, e)
        logits_list, targets = make_inputs(shape, num_classes, dev, dtype)
        steps = {name: _make_step(loss, logits_list, targets, autocast_dtype) for name, loss in available}
        values = {name: float(step().detach()) for name, step in steps.items()}  # also compiles
        for _ in range(warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        rounds = tqdm(range(repeats), desc=f"bench {shape_name}", disable=not progress, leave=False)
        for _ in rounds:
            for name, step in steps.items():  # interleaved: every loss sees the same conditions
                times[name].append(_time_once(step, is_cuda))
        for name, step in steps.items():
            peak = _peak_extra_bytes(step, is_cuda) if measure_memory else None
            ts = sorted(times[name])
            quartiles = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0], ts[0], ts[0]]
            results.append(
                BenchResult(
                    shape=shape_name,
                    loss=name,
                    device=device,
                    median_ms=statistics.median(ts) * 1e3,
                    p25_ms=quartiles[0] * 1e3,
                    p75_ms=quartiles[2] * 1e3,
                    repeats=repeats,
                    peak_extra_mib=None if peak is None else peak / 2**20,
                    loss_value=values[name],
                )
            )
        del logits_list, targets, steps
    _add_ratios(results)
    return results


def _time_once(step: Callable[[], object], is_cuda: bool) -> float:
    import torch

    if is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _peak_extra_bytes(step: Callable[[], object], is_cuda: bool) -> int | None:
    import torch

    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_extra_bytes(step)


def _add_ratios(results: list[BenchResult]) -> None:
    reference = {r.shape: r for r in results if r.loss == REFERENCE_LOSS}
    for r in results:
        ref = reference.get(r.shape)
        if ref is None:
            continue
        r.time_ratio = r.median_ms / ref.median_ms
        if r.peak_extra_mib is not None and ref.peak_extra_mib:
            r.memory_ratio = r.peak_extra_mib / ref.peak_extra_mib


# --------------------------------------------------------------------------------------------------
# Training iterations: nnUNetTrainerL1DFL against nnUNetTrainer
# --------------------------------------------------------------------------------------------------

TRAINING_DATASET_ID = 987
TRAINING_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerL1DFL")


def run_training_comparison(
    device: str, *, iterations: int = 10, warmup: int = 2, image_size: int = 64, cases: int = 4, log_path=None
) -> dict:
    """Mean ``train_step`` time of nnUNetTrainerL1DFL and nnUNetTrainer on the same batches.

    A synthetic two-channel dataset of ``cases`` cubes of ``image_size``^3 voxels (1 mm, a bright
    lesion per case) goes through nnU-Net's own fingerprint, planning (3d_fullres, default
    planner) and preprocessing in a temporary folder; then both trainers are built from those plans
    and run the same ``warmup + iterations`` batches (patch size and batch size from the plans,
    deep-supervision targets at the trainer's scales), alternating trainer by trainer so that both
    see the same machine conditions. Runs in a subprocess: nnU-Net reads its folders from the
    environment when it is imported. Returns the worker's result dictionary.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="l1dfl_bench_training_") as work:
        env = dict(os.environ)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[name] = os.path.join(work, name)
            os.makedirs(env[name])
        out = os.path.join(work, "result.json")
        options = {"device": device, "iterations": iterations, "warmup": warmup, "image_size": image_size,
                   "cases": cases, "out": out}  # fmt: skip
        code = f"from nnunetv2_l1dfl.bench import _training_worker; _training_worker({options!r})"
        log_path = log_path or os.path.join(work, "training.log")
        with open(log_path, "w") as log:
            completed = subprocess.run([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
        if completed.returncode != 0:
            with open(log_path) as log:
                tail = log.read()[-3000:]
            raise RuntimeError(f"training comparison failed (exit {completed.returncode}); log tail:\n{tail}")
        with open(out) as f:
            return json.load(f)


def _write_training_dataset(raw_folder: str, dataset_name: str, cases: int, size: int) -> None:
    """Two channels (CT-like, PET-like) and a label map with one spherical lesion per case."""
    import numpy as np
    import SimpleITK as sitk

    folder = os.path.join(raw_folder, dataset_name)
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*(np.arange(size),) * 3, indexing="ij")
    for i in range(cases):
        center = rng.uniform(size * 0.3, size * 0.7, 3)
        radius = rng.uniform(size * 0.06, size * 0.15)
        lesion = ((zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2) < radius**2
        ct = rng.normal(0, 30, (size,) * 3) + 40
        pet = rng.gamma(2.0, 0.5, (size,) * 3) + 8.0 * lesion
        for channel, array in enumerate((ct, pet)):
            image = sitk.GetImageFromArray(array.astype(np.float32))
            sitk.WriteImage(image, os.path.join(folder, "imagesTr", f"case_{i:03d}_{channel:04d}.nii.gz"))
        sitk.WriteImage(
            sitk.GetImageFromArray(lesion.astype(np.uint8)), os.path.join(folder, "labelsTr", f"case_{i:03d}.nii.gz")
        )
    dataset = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset, f)


def _training_worker(options: dict) -> None:
    """Subprocess body of :func:`run_training_comparison` (nnU-Net folders set in the environment)."""
    import numpy as np
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_l1dfl.training.trainers import nnUNetTrainerL1DFL

    name = f"Dataset{TRAINING_DATASET_ID}_L1DFLBench"
    _write_training_dataset(nnUNet_raw, name, options["cases"], options["image_size"])
    extract_fingerprints([TRAINING_DATASET_ID], num_processes=1, verbose=False, show_progress_bar=False)
    plan_experiments([TRAINING_DATASET_ID])
    preprocess([TRAINING_DATASET_ID], configurations=["3d_fullres"], num_processes=[1], show_progress_bar=False)
    with open(os.path.join(nnUNet_preprocessed, name, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(nnUNet_raw, name, "dataset.json")) as f:
        dataset_json = json.load(f)

    device = torch.device(options["device"])
    trainers = {}
    for cls in (nnUNetTrainer, nnUNetTrainerL1DFL):
        torch.manual_seed(0)
        # run_training sets (and the trainer pops) "continue_training"; each trainer gets its own copy
        trainer = cls({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, device)
        trainer.initialize()
        trainers[cls.__name__] = trainer
    first = trainers["nnUNetTrainer"]
    patch = [int(s) for s in first.configuration_manager.patch_size]
    batch_size = first.batch_size
    scales = first._get_deep_supervision_scales() or [[1.0] * len(patch)]
    generator = torch.Generator().manual_seed(0)

    def make_batch():
        data = torch.randn((batch_size, 2, *patch), generator=generator)
        labels = (torch.rand((batch_size, 1, *patch), generator=generator) > 0.97).float()
        labels = torch.nn.functional.max_pool3d(labels, 5, stride=1, padding=2)  # small blobs
        targets = []
        for scale in scales:
            shape = [max(1, int(round(p * s))) for p, s in zip(patch, scale)]
            targets.append(torch.nn.functional.interpolate(labels, size=shape, mode="nearest").to(torch.int16))
        return {"data": data, "target": targets}

    batches = [make_batch() for _ in range(options["warmup"] + options["iterations"])]
    times = {trainer_name: [] for trainer_name in trainers}
    for i, batch in enumerate(batches):
        for trainer_name, trainer in trainers.items():
            trainer.network.train()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.train_step(batch)  # returns the loss on the host: the step has finished
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= options["warmup"]:
                times[trainer_name].append(time.perf_counter() - t0)
    result = {
        "device": str(device),
        "patch_size": patch,
        "batch_size": batch_size,
        "deep_supervision_outputs": len(scales),
        "iterations": options["iterations"],
        "warmup": options["warmup"],
        "image_size": options["image_size"],
        "torch_threads": torch.get_num_threads(),
        "mean_ms": {k: float(np.mean(v) * 1e3) for k, v in times.items()},
        "median_ms": {k: float(np.median(v) * 1e3) for k, v in times.items()},
    }
    result["ratio_mean"] = result["mean_ms"]["nnUNetTrainerL1DFL"] / result["mean_ms"]["nnUNetTrainer"]
    with open(options["out"], "w") as f:
        json.dump(result, f, indent=2)


# --------------------------------------------------------------------------------------------------
# Reporting and the command line
# --------------------------------------------------------------------------------------------------


def machine_description(device: str) -> dict:
    """Versions and hardware the figures were measured on."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    from importlib.metadata import PackageNotFoundError, version

    for package in ("numba", "triton", "monai", "nnunetv2"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(results: list[BenchResult]) -> str:
    """A plain-text table: one row per (shape, loss)."""
    header = f"{'shape':<11} {'loss':<22} {'median ms':>10} {'IQR ms':>15} {'x DC+CE':>8} {'peak MiB':>9} {'x DC+CE':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        iqr = f"{r.p25_ms:.1f}-{r.p75_ms:.1f}"
        ratio = f"{r.time_ratio:.2f}" if r.time_ratio is not None else "-"
        peak = f"{r.peak_extra_mib:.1f}" if r.peak_extra_mib is not None else "-"
        mem_ratio = f"{r.memory_ratio:.2f}" if r.memory_ratio is not None else "-"
        lines.append(f"{r.shape:<11} {r.loss:<22} {r.median_ms:>10.1f} {iqr:>15} {ratio:>8} {peak:>9} {mem_ratio:>8}")
    return "\n".join(lines)


def register(subparsers) -> None:
    """Add the ``bench`` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="time and memory of the fused L1DFL against nnU-Net's DC_and_CE_loss and MONAI's DiceFocalLoss",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated cases from {', '.join(SHAPES)} (default: cpu96 on CPU, 3d_fullres,2d on CUDA)",
    )
    parser.add_argument(
        "--losses", default=",".join(LOSS_NAMES), help=f"comma-separated losses (default: all of {', '.join(LOSS_NAMES)})"
    )
    parser.add_argument("--classes", type=int, default=2, help="number of classes C incl. background (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available; default)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward+backward runs per loss (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per loss before timing (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the tiny shape, 3 repeats, 1 warm-up")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--no-compile", action="store_true", help="do not torch.compile DC_and_CE_loss's Dice on CUDA (nnU-Net does)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results and the machine description as JSON")
    parser.add_argument(
        "--training",
        action="store_true",
        help="instead: mean training-iteration time of nnUNetTrainerL1DFL vs nnUNetTrainer on the same synthetic "
        "dataset and batches (nnU-Net plans it in a temporary folder)",
    )
    parser.add_argument("--training-iterations", type=int, default=10, help="timed iterations per trainer (default 10)")
    parser.add_argument(
        "--training-image-size", type=int, default=None, help="edge of the synthetic cubes (default 64 on CPU, 192 on CUDA)"
    )
    parser.add_argument(
        "--verify-cuda",
        action="store_true",
        help="run the GPU verification of the Triton kernels (equality with the CPU path, no host syncs, "
        "autocast, deep supervision, torch.compile, determinism) and the cuda128 and 3d_fullres benchmarks",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``l1dfl bench``."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("l1dfl bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.verify_cuda:
        return verify_cuda_main(json_path=args.json)
    threads = args.threads or (2 if device == "cpu" else None)
    if args.training:
        return _training_main(args, device, threads)
    previous_threads = torch.get_num_threads()
    if args.quick:
        shapes, repeats, warmup = ["tiny"], 3, 1
    else:
        shapes = (args.shapes or ("cpu96" if device == "cpu" else "3d_fullres,2d")).split(",")
        repeats, warmup = args.repeats, args.warmup
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"l1dfl bench: unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    losses = args.losses.split(",")
    unknown = [name for name in losses if name not in LOSS_NAMES]
    if unknown:
        print(f"l1dfl bench: unknown loss(es) {unknown}; choose from {', '.join(LOSS_NAMES)}", file=sys.stderr)
        return 2
    if args.classes < 2:
        print(f"l1dfl bench: --classes must be >= 2, got {args.classes}", file=sys.stderr)
        return 2
    try:
        if threads:
            torch.set_num_threads(threads)
        machine = machine_description(device)
        results = run_benchmark(
            shapes,
            losses,
            device=device,
            num_classes=args.classes,
            repeats=max(1, repeats),
            warmup=max(0, warmup),
            measure_memory=not args.no_memory,
            compile_dice=False if args.no_compile else None,
        )
    finally:
        torch.set_num_threads(previous_threads)
    print(format_table(results))
    if args.json:
        payload = {
            "arguments": {key: value for key, value in vars(args).items() if key != "func"},
            "machine": machine,
            "classes": args.classes,
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    fused = [r for r in results if r.loss == "l1dfl_fused" and r.time_ratio is not None]
    summary = ", ".join(f"{r.shape} {r.time_ratio:.2f}x time" for r in fused) or "no ratio (dc_and_ce not run)"
    print(f"bench: {len(results)} measurements on {device}; fused L1DFL vs DC_and_CE_loss: {summary}")
    return 0


def verify_cuda_main(json_path: str | None = None, device: str = "cuda",
                     bench_shapes: tuple[str, ...] = ("cuda128", "3d_fullres")) -> int:
    """``l1dfl bench --verify-cuda``: the checks of :mod:`nnunetv2_l1dfl.kernels.verify_cuda`, then the
    speed comparison; one line per check; 0 when all pass. Lives here, not in ``verify_cuda``, so
    that imports point one way (``bench -> kernels.verify_cuda``)."""
    import torch

    from nnunetv2_l1dfl.kernels.verify_cuda import kernel_vs_copy_time, run_checks

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("verify-cuda: no CUDA device available", file=sys.stderr)
        return 2
    checks = run_checks(dev)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail} {json.dumps(check.numbers, default=str)}")
    results = run_benchmark(list(bench_shapes), ["l1dfl_fused", "dc_and_ce"], device=device, repeats=20, warmup=3,
                            progress=False)
    print(format_table(results))
    kernel = kernel_vs_copy_time(dev)
    print(f"kernels alone (fwd + bwd) {kernel['fused_fwd_bwd_ms']:.3f} ms, copy of the logits {kernel['copy_ms']:.3f} ms, "
          f"ratio {kernel['ratio_to_copy']:.2f}")  # fmt: skip
    if json_path:
        payload = {
            "machine": machine_description(device),
            "checks": [asdict(c) for c in checks],
            "bench": [asdict(r) for r in results],
            "kernel_vs_copy": kernel,
        }
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    failed = [c.name for c in checks if not c.ok]
    print(f"verify-cuda: {len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


def _training_main(args: argparse.Namespace, device: str, threads: int | None) -> int:
    """``l1dfl bench --training``: the training-iteration comparison, printed and optionally saved."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the worker process's torch thread count
    size = args.training_image_size or (64 if device == "cpu" else 192)
    result = run_training_comparison(device, iterations=max(1, args.training_iterations), warmup=2, image_size=size)
    for trainer, ms in result["mean_ms"].items():
        print(f"{trainer:<22} mean {ms:9.1f} ms   median {result['median_ms'][trainer]:9.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(device), "training": result}, f, indent=2)
    print(
        f"bench --training: {result['iterations']} iterations, patch {result['patch_size']} x batch "
        f"{result['batch_size']} on {device}: nnUNetTrainerL1DFL / nnUNetTrainer = {result['ratio_mean']:.3f}"
    )
    return 0
