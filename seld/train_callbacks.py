"""Ray Train callbacks of a training run, run in Train's controller (on the driver's node): reads the
workers' reports; writes RUN/checkpointed.json (`{"epoch": N, "stage": S}`), the last epoch whose
resume state Ray Train has registered, i.e. the epoch a resume continues after (pushed to the run
folder's object store too, when it has one).

Imports Ray at module level, so it is imported only once Ray is up (by
:func:`seld.train.build_trainer`): :func:`seld.study.session.init_ray` sets Ray's environment
before Ray is first imported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray.train

from seld.runfolder import CHECKPOINTED, write_json_atomic
from seld.storage import Mirror

log = logging.getLogger(__name__)


class CheckpointMarker(ray.train.UserCallback):
    """Writes RUN/checkpointed.json each time Ray Train has registered an epoch's checkpoint.

    Train's controller calls ``after_report`` once every worker has reported and its checkpoint
    manager has registered the report's checkpoint (the manager is the first report callback, user
    callbacks follow), so a resume starts after the epoch the marker names, or a later one.
    tests/test_train.py and tests/test_storage.py kill runs at this marker and check that.
    """

    def __init__(self, run_dir: str | Path, mirror: Mirror | None = None):
        self.run_dir = Path(run_dir)
        self.mirror = mirror

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None or not metrics or "epoch" not in metrics[0]:
            return  # the final report (metrics.json's figures) carries no checkpoint
        write_json_atomic(self.run_dir / CHECKPOINTED,
                          {"epoch": int(metrics[0]["epoch"]), "stage": int(metrics[0].get("stage", 0))})
        if self.mirror is not None:
            try:
                self.mirror.push(only=(CHECKPOINTED,))
            except OSError as e:  # informative only: rank 0's next push of the run folder has it
                log.warning("%s: could not push %s: %s", self.mirror.uri, CHECKPOINTED, e)
