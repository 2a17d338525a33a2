"""Regenerate the bundled sample CT (a synthetic phantom, not patient data).

    python scripts/make_sample.py

writes LiverTumorSegLib/data/sample_phantom_ct.nii.gz and
sample_phantom_labels.nii.gz (the phantom's own labels, for comparison).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LiverTumorSegLib.io import write_volume  # noqa: E402
from LiverTumorSegLib.phantom import make_phantom  # noqa: E402
from LiverTumorSegLib.samples import SAMPLE_CT, SAMPLE_LABELS  # noqa: E402

SEED = 20261123  # far from the seeds the demo model was trained on
ORIENTATION = "oblique"  # shows that any direction matrix works


def main() -> None:
    case = make_phantom(SEED, preset="coarse", orientation=ORIENTATION, n_tumors=3)
    SAMPLE_CT.parent.mkdir(parents=True, exist_ok=True)
    write_volume(case.image, SAMPLE_CT)
    write_volume(case.labels, SAMPLE_LABELS)
    print(f"wrote {SAMPLE_CT} ({SAMPLE_CT.stat().st_size // 1024} KiB): {case.info['shape']} voxels, "
          f"spacing {case.info['spacing']}, tumours {[round(t['diameter_mm']) for t in case.info['tumors']]} mm")


if __name__ == "__main__":
    main()
