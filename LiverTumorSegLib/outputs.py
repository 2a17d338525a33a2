"""Writing a segmentation run's files, all or nothing.

``segmentation.nii.gz`` (uint8 labels in the input grid), ``stats.json``,
``stats.csv``, ``liver.stl`` and ``tumor.stl`` (or ``.obj``; the tumor file only when a
tumor was found; coordinates LPS mm, as 3D Slicer writes STL), and ``preview.png``.
Files are written into a staging folder and moved into the output folder together;
any of these files left there by an earlier run and not written by this one are removed
then (:data:`OUTPUT_NAMES`), and other files are left alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .atomic import StagedOutput, atomic_write_text
from .io import write_volume
from .pipeline import SegmentationResult
from .volume import Volume

SURFACE_CLASSES = {"liver": (1, 2), "tumor": (2,)}
MESH_FORMATS = ("stl", "obj")
# Every file a run may write: in an existing output folder, those a new run does not
# write are an earlier run's, and are removed when the new files are moved in.
OUTPUT_NAMES = ("segmentation.nii.gz", "stats.json", "stats.csv", "preview.png",
                *(f"{name}.{ext}" for name in SURFACE_CLASSES for ext in MESH_FORMATS))


def write_outputs(result: SegmentationResult, ct: Volume, outdir: Path, *, surfaces: bool = True,
                  mesh_format: str = "stl", smoothing_iterations: int = 10,
                  preview: bool = True, extra: Optional[dict] = None) -> dict:
    """Write every output of ``result`` into ``outdir``; returns {kind: path}."""
    from .preview import write_preview_png
    from .stats import write_stats_csv
    from .surfaces import surfaces_for_labels, write_obj, write_stl

    written = {}
    with StagedOutput(outdir, replaces=OUTPUT_NAMES) as stage:
        write_volume(result.labels, stage.path / "segmentation.nii.gz")
        written["segmentation"] = "segmentation.nii.gz"
        document = dict(result.stats)
        document["run"] = dict(result.info, timings_s={k: round(v, 3) for k, v in result.timings.items()},
                               **(extra or {}))
        atomic_write_text(stage.path / "stats.json", json.dumps(document, indent=2) + "\n")
        write_stats_csv(result.stats, stage.path / "stats.csv")
        written["stats_json"], written["stats_csv"] = "stats.json", "stats.csv"
        if surfaces:
            meshes = surfaces_for_labels(result.labels, SURFACE_CLASSES, smoothing_iterations=smoothing_iterations)
            writer = write_stl if mesh_format == "stl" else write_obj
            for name, mesh in meshes.items():
                if mesh is None:
                    continue
                filename = f"{name}.{mesh_format}"
                writer(mesh, stage.path / filename)
                written[f"{name}_surface"] = filename
        if preview:
            write_preview_png(ct, result.labels, stage.path / "preview.png")
            written["preview"] = "preview.png"
    return {kind: str(stage.target / name) for kind, name in written.items()}
