"""seld/compat.py: one test per private name of a dependency, each checking the name exists and
behaves as the product relies on, so that an upgrade fails here and says where."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from seld import compat

ROOT = Path(__file__).resolve().parent.parent


# --- Ray ------------------------------------------------------------------------------------------------
def test_ray_prepare_config_fills_what_the_cluster_planner_reads():
    """ray.autoscaler._private.util.prepare_config: defaults merged, node types for the local
    provider, max_workers per node type; the input left as it was."""
    gpu = yaml.safe_load((ROOT / "cluster/gpu.yaml").read_text())
    before = copy.deepcopy(gpu)
    cfg = compat.ray_prepare_launcher_config(gpu)
    assert gpu == before
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "cluster_synced_files" in cfg  # what validate_config demands of a prepared config
    types_ = cfg["available_node_types"]
    assert types_[cfg["head_node_type"]]["max_workers"] == 0  # the head takes no worker slot
    assert all(isinstance(nt["max_workers"], int) for nt in types_.values())

    local = compat.ray_prepare_launcher_config(yaml.safe_load((ROOT / "cluster/local.yaml").read_text()))
    assert local["provider"]["type"] == "local" and local["head_node_type"] in local["available_node_types"]
    assert isinstance(local["max_workers"], int)


def test_ray_validate_config_accepts_ours_and_rejects_unknown_keys_and_too_many_min_workers():
    """ray.autoscaler._private.util.validate_config: the schema's unknown keys and a sum of
    min_workers above max_workers raise, with Ray's message naming the problem."""
    for name in ("gpu.yaml", "local.yaml", "loopback.yaml"):
        compat.ray_validate_launcher_config(
            compat.ray_prepare_launcher_config(yaml.safe_load((ROOT / "cluster" / name).read_text())))
    raw = yaml.safe_load((ROOT / "cluster/gpu.yaml").read_text())
    with pytest.raises(Exception, match="not_a_ray_key"):
        compat.ray_validate_launcher_config(compat.ray_prepare_launcher_config({**raw, "not_a_ray_key": 1}))
    raw["available_node_types"]["worker.gpu1"].update(min_workers=raw["max_workers"] + 1)
    with pytest.raises(ValueError, match="min_workers"):
        compat.ray_validate_launcher_config(compat.ray_prepare_launcher_config(raw))


def test_importing_compat_imports_no_library():
    import subprocess
    import sys

    code = "import sys, seld.compat; assert not {'ray', 'optuna'} & set(sys.modules), sorted(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


def test_no_private_ray_or_optuna_name_outside_compat():
    """The product reaches Ray's and Optuna's private names only through seld/compat.py (issue 26's
    check: `grep -rn "\\._[a-z]" seld/ | grep -E "ray|optuna"` finds nothing else), so an upgrade
    breaks in one place that says where."""
    import re

    private = re.compile(r"\._[a-z]")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in sorted((ROOT / "seld").rglob("*.py")) if p.name != "compat.py"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if private.search(line) and re.search(r"ray|optuna", line)]
    assert not found, "private names outside seld/compat.py:\n" + "\n".join(found)
