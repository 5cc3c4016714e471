"""The summary row of a run: reads its run folder (config, metrics.json with the test breakdowns
that seld/evaluate.py put there, metrics.csv, attempts.jsonl), never the raw data; writes
``summary.csv`` / ``trials.csv`` rows and ``curves.csv`` frames.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from seld.config import ExperimentConfig, config_hash
from seld.report import device_hours
from seld.runfolder import ATTEMPTS, METRICS_CSV, METRICS_JSON, atomic_write
from seld.study.prepare import DataPlan

SUMMARY_COLUMNS = (
    "study", "variant", "seed", "status", "error", "attempts", "preset", "dataset", "protocol",
    "git_sha", "config_hash", "data_hash", "run_dir", "n_devices", "wall_s", "device_hours",
)


def git_sha(root: Path | None = None) -> str:
    """The commit of the code that ran (``-dirty`` when tracked files changed), or "unknown"
    outside git.

    Changes under ``results/`` and to Markdown files do not count: a study rewrites its own results
    and pastes its table into the README, and neither changes what ran.

    Args:
        root: a folder of the repository (default: the one this package lives in).
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                  ":(exclude,top)results", ":(exclude,top,glob)**/*.md"], cwd=root,
                                 capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json -> flat columns: scalars and strings (e.g. ``precision``) as they are,
    ``classwise.<split>[c].f20`` as ``<split>/class/<c>/f20`` and its reference event count as
    ``<split>/class/<c>/n_ref`` (the rest stays in the run folder)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            flat[key] = int(value)
        elif isinstance(value, int | float | str) or value is None:
            flat[key] = value
        elif key == "classwise" and isinstance(value, dict):
            for split, rows in value.items():
                for row in rows:
                    flat[f"{split}/class/{row['class']}/f20"] = row.get("f20")
                    if "n_ref" in row:  # 0: the class has no event in the split (its F20 says nothing)
                        flat[f"{split}/class/{row['class']}/n_ref"] = row["n_ref"]
    return flat


def run_status(run_dir: Path, cfg: ExperimentConfig, error: str | None) -> tuple[str, str]:
    """(status, error) of a run from its folder: "ok"; "time_budget" when metrics.json says the
    budget stopped it (the error names the stages left); "failed" without metrics.json (``error``:
    Tune's one-line cause, if any).
    """
    path = run_dir / METRICS_JSON
    if not path.exists():
        return "failed", error or "no metrics.json (interrupted?)"
    metrics = json.loads(path.read_text())
    status = metrics.get("status", "ok")
    if status == "time_budget":
        left = sorted(set(cfg.train.stage_numbers) - set(metrics.get("stages_done", [])))
        return status, (f"train.time_budget_s={cfg.train.time_budget_s:g} s reached; stage(s) "
                        f"{', '.join(map(str, left))} not finished")
    return status, ""


def summary_row(study: str, variant: str, seed: int, cfg: ExperimentConfig, run_dir: Path, out: Path,
         data: DataPlan | None, sha: str, status: str, error: str, extra: dict[str, Any]) -> dict[str, Any]:
    attempts_file = run_dir / ATTEMPTS
    attempts = len(attempts_file.read_text().splitlines()) if attempts_file.exists() else 0
    row: dict[str, Any] = {
        "study": study, "variant": variant, "seed": seed, "status": status, "error": error,
        "attempts": attempts, "preset": cfg.preset, "dataset": data.dataset if data else "",
        "protocol": cfg.data.protocol, "git_sha": sha, "config_hash": config_hash(cfg),
        "data_hash": data.data_hash if data else "", "run_dir": os.path.relpath(run_dir, out),
        "n_devices": cfg.train.num_workers,
    }
    metrics_path = run_dir / METRICS_JSON
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        # The row's status is the study's verdict (run_status), not metrics.json's own field.
        row.update({k: v for k, v in flatten_metrics(metrics).items() if k != "status"})
        row["wall_s"] = metrics.get("cost/wall_s")
        if row["wall_s"] is None and attempts:
            # Driver-side wall time of the run that finished: its last start to its metrics.json.
            start = json.loads(attempts_file.read_text().splitlines()[-1])["start_unix_s"]
            row["wall_s"] = round(metrics_path.stat().st_mtime - start, 2)
        if row["wall_s"] is not None:
            row["device_hours"] = round(device_hours(row["wall_s"], cfg.train.num_workers), 5)
    row.update(extra)
    return row


def write_rows(rows: list[dict[str, Any]], path: Path, lead: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows)
    cols = [c for c in lead if c in df.columns] + sorted(c for c in df.columns if c not in lead)
    df = df[cols]
    with atomic_write(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    return df


def read_curves(runs: list[tuple[str, int, Path]]) -> pd.DataFrame | None:
    parts = []
    for variant, seed, run_dir in runs:
        p = run_dir / METRICS_CSV
        if p.exists() and p.stat().st_size:
            df = pd.read_csv(p)
            df.insert(0, "step", range(1, len(df) + 1))
            df.insert(0, "seed", seed)
            df.insert(0, "variant", variant)
            parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else None
