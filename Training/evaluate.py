"""Evaluate a model through the engine (the code path of ``livertumorseg segment``).

    python Training/evaluate.py --model MODEL --data-dir D [--split val|test|all] --out OUT
    python Training/evaluate.py --model MODEL --image CT --label LABELS [--liver-only] --out OUT

Writes OUT/metrics.json (per case; means such as mean.liver.dice, mean.tumor.dice;
lesion detection overall and by diameter), OUT/metrics.csv, plots, and overlays
(PNG + GIF) of the best and worst cases. See docs/TRAINING.md.
"""

from __future__ import annotations

import sys

from _bootstrap import add_repo_to_path, run_script

add_repo_to_path()


def main() -> int:
    from livertumorseg_training.evaluate_cli import run

    return run()


if __name__ == "__main__":
    sys.exit(run_script("evaluate.py", main))
