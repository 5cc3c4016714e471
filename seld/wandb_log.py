"""W&B logging of one training run: reads RUN/metrics.csv (each epoch once, from a driver thread)
and the final metrics; writes one W&B run under RUN/wandb (offline unless $WANDB_MODE says otherwise).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
from pathlib import Path

from seld.config import ExperimentConfig, to_dict
from seld.runfolder import METRICS_CSV


class WandbLogger:
    """One W&B run per training run, fed from metrics.csv (each epoch once) by a driver thread."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, opts: dict):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ["WANDB_DIR"] = str(run_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=opts.get("project") or "seld", group=opts.get("group"),
                              name=run_dir.name, dir=str(run_dir), config=to_dict(cfg),
                              mode=os.environ["WANDB_MODE"], reinit="create_new")
        self.csv = run_dir / METRICS_CSV
        self.logged = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _rows(self) -> list[dict]:
        with contextlib.suppress(OSError):
            return list(csv.DictReader(io.StringIO(self.csv.read_text())))
        return []

    def _flush(self) -> None:
        for row in self._rows():
            ep = int(row["epoch"])
            if ep > self.logged:
                self.run.log({k: float(v) for k, v in row.items() if v not in ("", None)}, step=ep)
                self.logged = ep

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            self._flush()

    def finish(self, metrics: dict) -> None:
        import wandb

        self._stop.set()
        self._thread.join()
        self._flush()
        rows = metrics.get("classwise", {}).get("test_pp", [])
        table = {}
        if rows:
            cols = sorted(rows[0])
            table = {"test_pp/classwise": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}
        # Commit the last epoch's row first: a row committed later would overwrite the summary's
        # final val/* figures (also per-epoch keys) with the last epoch's instead of metrics.json's.
        self.run.log(table, commit=True)
        for k, v in metrics.items():
            if isinstance(v, int | float):
                self.run.summary[k] = v

    def close(self) -> None:
        self._stop.set()
        finish_wandb_run(self.run)


def finish_wandb_run(run) -> None:
    """Finish a W&B run and return only once its offline transaction log is complete on disk.

    wandb 0.31's ``run.finish()`` returns when wandb-core has handled the exit record, but the core
    closes (flushes) the run's ``.wandb`` file later, on its own, after the fire-and-forget
    ``inform_finish``: a reader right after ``finish()`` could find the file empty or without its
    history (seen: a sweep's report run with no ``trials`` table). ``wandb.teardown()`` waits for
    the core process to exit, which closes every stream's file; the next ``wandb.init`` in this
    process starts a new core (~0.3 s).
    """
    import wandb

    run.finish()
    wandb.teardown()
