"""Finding models and installing what the engine lacks (PyTorch), inside Slicer.

PyTorch is installed through the PyTorch extension's ``PyTorchUtils`` when it is there
(it picks the build that matches the user's GPU and CUDA driver), else with
``slicer.util.pip_install``; always after the user agrees. Packages that Slicer bundles
(numpy, SimpleITK, VTK) are never pip-installed: their absence means a broken Slicer.
"""

import importlib
import logging
from pathlib import Path

import slicer

TORCH_REQUIREMENT = ">=2.2"  # LiverTumorSegLib.torch_versions.TORCH_MINIMUM (2.2.2: the newest on macOS)
FOLDER_ITEM = "__folder__"


def availableModels():
    """(name, description) pairs of the bundled, cached and registered models.

    Before PyTorch is installed the engine's registry cannot be imported (the model
    package imports torch); the bundled model folders are listed then.
    """
    try:
        from LiverTumorSegLib.model.registry import list_models
    except ImportError:
        import LiverTumorSegLib

        folder = Path(LiverTumorSegLib.__file__).parent / "models"
        return [(card.parent.name, "bundled") for card in sorted(folder.glob("*/model.json"))]
    sources = {"bundled": "bundled", "cached": "downloaded", "registered": "downloads on first use",
               "outdated": "a new version downloads on first use"}
    return [(entry.name, sources.get(entry.source, entry.source)) for entry in list_models()]


def ensureEngineDependencies():
    """True when the engine can run; offers to install PyTorch when it is missing, or to
    upgrade it when it is older than 2.2.

    Returns False (after telling the user why) when the user declines or when Slicer's
    own packages are missing. Raises if the installation itself fails.
    """
    from LiverTumorSegLib.runner import missing_dependencies

    missing = missing_dependencies()
    if not missing:
        return True
    bundled = [item["module"] for item in missing if item["bundled"]]
    if bundled:
        slicer.util.errorDisplay(
            f"Slicer's own Python packages {', '.join(bundled)} are missing, so this Slicer installation is "
            "damaged. Reinstall 3D Slicer; do not install these packages with pip.")
        return False
    old = next((item["found"] for item in missing if item.get("found")), None)
    if old:
        message = (f"Liver and tumor segmentation needs PyTorch 2.2 or newer; this Slicer has {old}.\n\n"
                   "Upgrade it now? This downloads up to a few gigabytes and can take several minutes; "
                   "Slicer is busy meanwhile. Other modules that use PyTorch will use the new version too; "
                   "restart Slicer afterwards (on Windows, before, if a module has already loaded PyTorch).")
    else:
        message = ("Liver and tumor segmentation needs PyTorch, which is not installed in Slicer yet.\n\n"
                   "Install it now? This downloads up to a few gigabytes and can take several minutes; "
                   "Slicer is busy meanwhile. PyTorch is then loaded in Slicer: upgrading it later needs "
                   "a restart of Slicer first on Windows.")
    if not slicer.util.confirmOkCancelDisplay(message, windowTitle="Install PyTorch"):
        return False
    with slicer.util.tryWithErrorDisplay("PyTorch could not be installed.", waitCursor=True):
        _installTorch()
    importlib.invalidate_caches()
    still = missing_dependencies()
    if still:
        slicer.util.errorDisplay("PyTorch was installed but cannot be found yet. Restart Slicer and try again.")
        return False
    return True


def _installTorch():
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        logging.info("Installing PyTorch with the PyTorch extension (matching this computer's GPU)")
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError("The PyTorch extension did not install PyTorch.")
    else:
        logging.info("PyTorch extension not found; installing PyTorch with pip")
        slicer.util.pip_install(f"torch{TORCH_REQUIREMENT}")
