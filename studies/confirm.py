"""Does tuning beat the paper's defaults beyond seed noise? The sweep's best configuration and the
default, re-trained with the same seeds and compared on the test split in paired intervals.

Declarative only. The tuned variant's overrides are read from the sweep's ``best_config.json``
(chosen on validation F20 only; ``SELD_SWEEP_BEST`` names another file); the test split is looked
at here for the first time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from seld.report import Comparison, TableRow, TableSpec
from seld.study import Study, Variant, main

ROOT = Path(__file__).resolve().parents[1]
BEST = Path(os.environ.get("SELD_SWEEP_BEST", ROOT / "results" / "sweep" / "best_config.json"))

CONFIRMATION = TableSpec(
    name="confirmation",
    title="Sweep confirmation: the sweep's best configuration against the defaults (test split)",
    rows=(
        TableRow("Default, Stage 2", "default", "test"),
        TableRow("Tuned, Stage 2", "tuned", "test"),
        TableRow("Default, Stage 2 + PP", "default", "test_pp"),
        TableRow("Tuned, Stage 2 + PP", "tuned", "test_pp", breakdowns=True),
    ),
    comparisons=(
        Comparison("Tuned, Stage 2", "Default, Stage 2", verdict=True),
        Comparison("Tuned, Stage 2 + PP", "Default, Stage 2 + PP", verdict=True),
    ),
)


def tuned_overrides(path: Path) -> dict:
    """The best trial's overrides from a sweep's best_config.json (one line naming the file if not)."""
    try:
        info = json.loads(path.read_text())
        return dict(info["overrides"])
    except FileNotFoundError:
        sys.exit(f"confirm.py: error: {path}: no best_config.json; run `python studies/sweep.py` first "
                 "(or set SELD_SWEEP_BEST to a sweep's best_config.json)")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        sys.exit(f"confirm.py: error: {path}: not a sweep's best_config.json ({e})")


def studies(best: Path) -> dict[str, Study]:
    tuned = tuned_overrides(best)
    variants = (Variant("default", {}), Variant("tuned", tuned))
    return {
        "local": Study("sweep-confirm", "local", variants, seeds=(0, 1, 2), tables=(CONFIRMATION,)),
        "smoke": Study("sweep-confirm", "smoke", variants, seeds=(0,), tables=(CONFIRMATION,)),
        "paper": Study("sweep-confirm", "paper", variants, seeds=(0, 1, 2), tables=(CONFIRMATION,)),
    }


if __name__ == "__main__":
    sys.exit(main(
        studies(BEST), sys.argv[1:],
        description="Re-train the sweep's best configuration and the defaults with the same seeds; "
                    "compare them on the test split in paired intervals.",
        example=("examples:\n"
                 "  python studies/confirm.py                       # after python studies/sweep.py\n"
                 "  SELD_SWEEP_BEST=/tmp/sw/best_config.json python studies/confirm.py --preset smoke --out /tmp/cf"),
    ))
