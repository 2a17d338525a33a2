"""Export a training checkpoint as a model folder the engine and the Slicer module load.

    python Training/export.py CHECKPOINT OUT_DIR [--weights-format torch-state-dict|safetensors]

OUT_DIR receives weights.pt (or weights.safetensors) and model.json (recipe, data, git commit, validation
metrics, SHA-256 of the weights). Then: livertumorseg segment CT -o OUT --model OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bootstrap import add_repo_to_path, run_script

add_repo_to_path()


def main() -> int:
    from LiverTumorSegLib.model import load_model
    from livertumorseg_training.exporting import export_checkpoint

    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path,
                        help="a .ckpt written by train.py (e.g. RUN_DIR/checkpoints/last.ckpt)")
    parser.add_argument("out_dir", type=Path, help="model folder to write")
    parser.add_argument("--weights-format", choices=("torch-state-dict", "safetensors"), default=None,
                        help="weights.pt, or weights.safetensors, which torch older than 2.6 (e.g. 3D Slicer on "
                             "macOS) can load safely too (needs the safetensors package); default: weights.pt, or "
                             "safetensors when this torch is older than 2.6")
    args = parser.parse_args()
    folder = export_checkpoint(args.checkpoint, args.out_dir, weights_format=args.weights_format)
    card = load_model(folder).card
    print(f"exported {card.name} ({card.architecture['widths']}, {card.spacing_mm} mm, patch {card.patch_size}) "
          f"to {Path(folder).resolve()}; weights sha256 {card.weights_sha256[:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("export.py", main))
