"""Ray jobs: what `ray job submit --working-dir .` uploads (Ray's own packaging of a checkout that
holds data, stores, runs, a venv and W&B folders) and how W&B settings reach the trials."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = ("seld/", "studies/", "cluster/", "bench/", "tests/", "docs/", "pyproject.toml", "README.md",
        "BENCHMARKS.md", ".rayignore")


def _checkout_copy(dst: Path) -> Path:
    """The repository's files as a clone has them (tracked + not ignored), copied to ``dst``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    for rel in files:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def _junk(path: Path, n_bytes: int) -> None:
    """Incompressible bytes: if they were packaged, the zip would grow by as much."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(n_bytes // (1 << 20)):
            f.write(os.urandom(1 << 20))


@pytest.mark.parametrize("include_gitignore", [True, False])
def test_working_dir_package_holds_only_the_code(tmp_path, include_gitignore):
    """A checkout with 300 MB of DCASE2025 audio where the README puts it, a data/ folder, a feature
    store, a study's run folders and work cache, a .venv/ and wandb/: Ray's working-dir packaging
    (as `ray job submit --working-dir .` calls it, also with .gitignore ignored:
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) packs the code files only, well under Ray's 512 MiB."""
    # Private, in a test only: Ray has no public call that builds the package without submitting a job.
    from ray._private.runtime_env.packaging import create_package

    repo = _checkout_copy(tmp_path / "checkout")
    for i in range(3):
        _junk(repo / f"DCASE2025/stereo_dev/dev-train-tau/fold3_room{i}_mix001.wav", 100 << 20)
    for rel in ("data/stereo_dev/dev-test-sony/a.wav", "store/features-0123/part-0.parquet",
                "results/ablation/runs/baseline-s0-abc/checkpoints/selected.pt",
                "results/ablation/_work/synth-1/x.wav", ".venv/lib/python3.11/site-packages/torch/lib/x.so",
                "wandb/offline-run-1/run-1.wandb", "seld/__pycache__/train.cpython-311.pyc",
                "my-store/features-abcd/part-0.parquet"):
        _junk(repo / rel, 2 << 20)
    pkg = tmp_path / "pkg.zip"
    create_package(str(repo), pkg, include_gitignore=include_gitignore)
    names = [n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")]
    assert names and all(n.startswith(CODE) for n in names), sorted({n.split("/")[0] for n in names})
    assert not [n for n in names if n.endswith((".wav", ".parquet", ".pt", ".pyc", ".wandb", ".so"))]
    for needed in ("seld/train.py", "studies/ablation.py", "cluster/gpu.yaml", "pyproject.toml"):
        assert needed in names
    code_bytes = sum((repo / n).stat().st_size for n in names)
    assert pkg.stat().st_size < 5 << 20 and code_bytes < 10 << 20, (pkg.stat().st_size, code_bytes)
