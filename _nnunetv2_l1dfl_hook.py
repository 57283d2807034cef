"""Makes nnU-Net find nnunetv2-l1dfl's trainers; run at interpreter start by ``nnunetv2_l1dfl.pth``.

nnU-Net (>= 2.8.0) looks up ``-tr NAME`` in its own trainer folder and then in every folder listed
in the ``nnUNet_extTrainer`` environment variable. This appends our trainer folder to that list,
after any entries the user already has (theirs are searched first). It is a top-level module beside the package so
that it never imports the package itself (that would pin ``nnunetv2_l1dfl`` to the installed copy
in every process) and it never raises: a broken hook must not break every Python process. ``NNUNETV2_L1DFL_NO_HOOK=1``
switches it off.
"""

import os

TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunetv2_l1dfl", "nnunet_trainers")


def extend_ext_trainer_path(environ: "os._Environ[str] | dict[str, str]") -> str:
    """Return ``nnUNet_extTrainer`` with our trainer folder appended once (existing entries kept)."""
    entries = [e for e in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if e.strip()]
    normalized = {os.path.normcase(os.path.abspath(e)) for e in entries}
    if os.path.normcase(TRAINER_FOLDER) not in normalized:
        entries.append(TRAINER_FOLDER)
    return os.pathsep.join(entries)


def _install() -> None:
    if os.environ.get("NNUNETV2_L1DFL_NO_HOOK", "") not in ("", "0"):
        return
    os.environ["nnUNet_extTrainer"] = extend_ext_trainer_path(os.environ)


try:
    _install()
except Exception:  # noqa: BLE001 - see module docstring
    pass
