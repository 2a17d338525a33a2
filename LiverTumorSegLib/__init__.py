"""LiverTumorSegLib: liver and liver-tumor segmentation of CT volumes.

The engine behind the LiverTumorSeg 3D Slicer module, the ``livertumorseg`` command
line and the training package's evaluation. It imports no front end (no Qt, no Slicer
application, no Lightning). Heavy modules load lazily, so ``import LiverTumorSegLib``
is cheap.

Typical use::

    from LiverTumorSegLib import Segmenter, read_volume
    result = Segmenter().segment(read_volume("ct.nii.gz"))
    result.labels, result.stats
"""

from __future__ import annotations

from .errors import Cancelled, InputError, LiverTumorSegError, ModelError, OutputError, ResourceError

__version__ = "0.1.0"

__all__ = [
    "__version__", "Cancelled", "InputError", "LiverTumorSegError", "ModelError", "OutputError",
    "ResourceError", "Segmenter", "SegmentOptions", "SegmentationResult", "Volume", "read_volume",
]


def __getattr__(name: str):
    if name in ("Segmenter", "SegmentOptions", "SegmentationResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Volume":
        from .volume import Volume

        return Volume
    if name == "read_volume":
        from .io import read_volume

        return read_volume
    raise AttributeError(f"module 'LiverTumorSegLib' has no attribute {name!r}")
