"""Writing a segmentation run's files, all or nothing.

``segmentation.nii.gz`` (uint8 labels in the input grid), ``stats.json``,
``stats.csv``, ``liver.stl`` and ``tumor.stl`` (or ``.obj``; the tumor file only when a
tumor was found; coordinates LPS mm, as 3D Slicer writes STL), and ``preview.png``.
Files are written into a staging folder and moved into the output folder together.
``stats.json`` lists the files of its run (``run.outputs``), says the surfaces'
coordinate system (``surfaces``: LPS, while its own coordinates are RAS) and is moved in last; when
the folder holds an earlier run's ``stats.json`` (not a link), the files that run listed
and this one does not write are removed once the new files are in, and no other file is
touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from .atomic import StagedOutput, atomic_write_text
from .io import write_volume
from .pipeline import ProgressFn, SegmentationResult
from .volume import Volume

SURFACE_CLASSES = {"liver": (1, 2), "tumor": (2,)}
MESH_FORMATS = ("stl", "obj")
# Every file a run may write; an earlier run's list is trusted only within these names.
OUTPUT_NAMES = ("segmentation.nii.gz", "stats.json", "stats.csv", "preview.png",
                *(f"{name}.{ext}" for name in SURFACE_CLASSES for ext in MESH_FORMATS))


def earlier_outputs(outdir: Path) -> List[str]:
    """The files an earlier run in ``outdir`` wrote, from its ``stats.json``
    (``run.outputs``); [] when there is none, it is a link, or it is not one of ours. A
    ``stats.json`` of ours from before that list existed counts as listing every name."""
    path = Path(outdir) / "stats.json"
    if path.is_symlink():
        return []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        run = document["run"]
        listed = run["outputs"] if "outputs" in run else (OUTPUT_NAMES if "schema_version" in document else [])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(listed, (list, tuple)):
        return []
    return [name for name in listed if isinstance(name, str) and name in OUTPUT_NAMES]


def write_outputs(result: SegmentationResult, ct: Volume, outdir: Path, *, surfaces: bool = True,
                  mesh_format: str = "stl", smoothing_iterations: int = 10,
                  preview: bool = True, extra: Optional[dict] = None,
                  progress: Optional[ProgressFn] = None) -> dict:
    """Write every output of ``result`` into ``outdir``; returns {kind: path}.

    ``progress(fraction, message)`` hears of each file; it hears 1.0 only once every file
    is in ``outdir``.
    """
    from .preview import write_preview_png
    from .stats import write_stats_csv
    from .surfaces import surfaces_for_labels, write_obj, write_stl

    if not isinstance(result, SegmentationResult):
        from .errors import OutputError

        raise OutputError(f"write_outputs() takes the SegmentationResult that Segmenter.segment() returned, "
                          f"not {type(result).__name__}")

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    written = {}
    # The earlier run's list is read when publishing, under the folder's lock: a run that
    # published meanwhile is the earlier run then.
    with StagedOutput(outdir, replaces=lambda: earlier_outputs(outdir), last="stats.json") as stage:
        report(0.0, "writing the segmentation")
        write_volume(result.labels, stage.path / "segmentation.nii.gz")
        written["segmentation"] = "segmentation.nii.gz"
        write_stats_csv(result.stats, stage.path / "stats.csv")
        written["stats_csv"] = "stats.csv"
        if surfaces:
            report(0.15, "building surfaces")
            meshes = surfaces_for_labels(result.labels, SURFACE_CLASSES, smoothing_iterations=smoothing_iterations)
            writer = write_stl if mesh_format == "stl" else write_obj
            for name, mesh in meshes.items():
                if mesh is None:
                    continue
                filename = f"{name}.{mesh_format}"
                writer(mesh, stage.path / filename)
                written[f"{name}_surface"] = filename
        if preview:
            report(0.85, "writing the preview")
            write_preview_png(ct, result.labels, stage.path / "preview.png")
            written["preview"] = "preview.png"
        written["stats_json"] = "stats.json"  # last: it lists every file of the run
        document = dict(result.stats)
        if surfaces:  # LPS, as Slicer writes STL, unlike the statistics' RAS: said where it is read
            document["surfaces"] = {"coordinate_system": "LPS", "units": "mm",
                                    "files": sorted(v for k, v in written.items() if k.endswith("_surface"))}
        document["run"] = dict(result.info, timings_s={k: round(v, 3) for k, v in result.timings.items()},
                               **(extra or {}), outputs=sorted(written.values()))
        atomic_write_text(stage.path / "stats.json", json.dumps(document, indent=2) + "\n")
        report(0.95, "publishing the files")
    report(1.0, "written")
    return {kind: str(stage.target / name) for kind, name in written.items()}
