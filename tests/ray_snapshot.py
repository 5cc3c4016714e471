"""Reading Ray Train's checkpoint-manager snapshot in tests: which epoch a resume would start after.

Ray Train V2's controller registers a reported checkpoint when it next polls its workers (every
2 s in ray 2.60, `DEFAULT_HEALTH_CHECK_INTERVAL_S`), and the worker's report queue holds one
report, so under load metrics.csv (written before each report) runs one or two epochs ahead of the
registered checkpoint. Kill tests therefore pick their kill point from this snapshot, not from
metrics.csv. The layout (`latest_checkpoint_result.metrics`) is ray 2.60's, as pinned: if a Ray
upgrade changes it, this stays None, no kill point is ever seen, and those tests fail saying so.
"""

from __future__ import annotations

import json

SNAPSHOT = "ray/train/checkpoint_manager_snapshot.json"  # under a run folder (RAY_SUBDIR/RAY_RUN_NAME)


def registered_epoch(blob: bytes | str | None) -> int | None:
    """The epoch of the latest registered checkpoint in a snapshot's bytes, or None when there is
    none yet or the bytes are not (yet) a whole JSON document."""
    if not blob:
        return None
    try:
        latest = json.loads(blob).get("latest_checkpoint_result") or {}
    except ValueError:
        return None
    epoch = latest.get("metrics", {}).get("epoch")
    return None if epoch is None else int(epoch)
