"""Train the LiverTumorSeg 3D U-Net on an MSD Task03-layout data set.

    python Training/train.py --data-dir PATH/Task03_Liver [--config seed|default|FILE]
                             [--out RUN_DIR] [--resume] [--folds 5 --fold k]
                             [--devices N --num-nodes M --strategy ddp] [key.sub=value ...]

See docs/TRAINING.md.
"""

from __future__ import annotations

import sys

from _bootstrap import add_repo_to_path, run_script

add_repo_to_path()


def main() -> int:
    from livertumorseg_training.run import train

    return train()


if __name__ == "__main__":
    sys.exit(run_script("train.py", main))
