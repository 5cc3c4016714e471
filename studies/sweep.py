"""The hyperparameter sweep: Ray Tune + Optuna (seeded TPE, file storage) + ASHA on validation F20.

Declarative only: the search space (loss weights, Conformer depth and width, augmentation mix),
trial counts and the preset. Thresholds are swept per trial after training, on the trial's own
validation predictions, never by retraining: one global threshold over a grid (`global_threshold`,
`val_global/*`, `test_global/*` in trials.csv) and class-wise thresholds fitted (`val_pp/*`, `test_pp/*`).
"""

from __future__ import annotations

import sys

from seld.study import Param, Sweep, main

SPACE = {
    "loss.alpha": Param("loguniform", 0.25, 4.0),
    "loss.beta": Param("loguniform", 0.25, 8.0),
    "model.n_conformer_layers": Param("int", 0, 4),
    "model.d_model": Param("choice", choices=(32, 64, 96)),
    "augment.cutout_p": Param("uniform", 0.0, 0.8),
    "augment.specaug_p": Param("uniform", 0.0, 0.8),
    "augment.freq_shift_p": Param("uniform", 0.0, 0.8),
    "augment.augmix_p": Param("uniform", 0.0, 0.6),
    "augment.swap_p": Param("uniform", 0.0, 0.5),
}

SWEEPS = {
    # Grace 6: with stage 1 at lr 3e-3 validation F20 ranks configs only from epoch ~6 on (BENCHMARKS.md).
    "local": Sweep("sweep", "local", SPACE, n_trials=24, seed=0, grace_period=6),
    "smoke": Sweep("sweep", "smoke", {k: SPACE[k] for k in ("loss.alpha", "loss.beta", "model.n_conformer_layers")},
                   n_trials=3, seed=0, grace_period=1),
    "paper": Sweep("sweep", "paper", SPACE | {"model.d_model": Param("choice", choices=(128, 256, 384))},
                   n_trials=64, seed=0, grace_period=10),
}

if __name__ == "__main__":
    sys.exit(main(
        SWEEPS, sys.argv[1:],
        description="Optuna + ASHA sweep over loss weights, Conformer depth/width and the augmentation mix.",
        example=("examples:\n"
                 "  python studies/sweep.py                           # 24 trials on the generated data\n"
                 "  python studies/sweep.py --preset smoke --trials 2 --out /tmp/sw\n"
                 "  python studies/sweep.py --resume                  # continue a killed sweep\n"
                 "  python studies/sweep.py --preset paper --cluster cluster/gpu.yaml --dry-run"),
    ))
