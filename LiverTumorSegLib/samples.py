"""The bundled sample CT used by ``livertumorseg demo`` and the Slicer self-test.

It is a synthetic phantom (``LiverTumorSegLib.phantom``, seed and preset recorded in
``data/README.md``), not patient data.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_CT = DATA_DIR / "sample_phantom_ct.nii.gz"
SAMPLE_LABELS = DATA_DIR / "sample_phantom_labels.nii.gz"


def sample_ct_path() -> Path:
    """Path of the bundled sample CT (NIfTI, HU)."""
    if not SAMPLE_CT.is_file():
        raise InputError(f"the bundled sample CT {SAMPLE_CT} is missing; reinstall LiverTumorSeg")
    return SAMPLE_CT
