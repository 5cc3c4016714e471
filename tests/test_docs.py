"""The documentation says what the code does: the README stays a front door, every relative link of
the README and docs/ leads to a file, and the presets' table is the one the presets generate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from seld.cli.model_summary import preset_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# [text](target) outside code spans; images too. Targets with a scheme (https:, mailto:) are not files.
LINK = re.compile(r"(?<!`)\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def table() -> str:
    """The presets' table, generated once for the module."""
    return preset_table()


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code, where a bracket is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_is_a_front_door_of_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move topics to docs/"


def test_every_relative_link_points_to_an_existing_file():
    checked, broken = 0, []
    for page in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *DOCS]:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            checked += 1
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
    assert checked >= 20, checked  # the README and docs do link to each other


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = "see [the design](docs/NOPE.md) and `[not a link](x.md)`\n```text\n[no](y.md)\n```\n"
    assert LINK.findall(_prose(page)) == ["docs/NOPE.md"]


def test_presets_table_in_the_docs_is_the_generated_one(table):
    text = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"<!-- presets:start -->\n(.*?)<!-- presets:end -->", text, flags=re.S)
    assert block, "docs/configuration.md: no <!-- presets:start --> ... <!-- presets:end --> block"
    assert block.group(1) == table, (
        "docs/configuration.md's presets table differs from the presets; paste `seld model-summary --markdown`")


def test_presets_table_states_what_the_code_trains_with(table):
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    # The optimiser the training loop builds (seld.train.stage_optimizer), not AdamW.
    assert all("Adam (L2 weight decay 0" in cell for cell in rows["batch, optimiser"]), rows["batch, optimiser"]
    assert "AdamW" not in table
    smoke, local, paper = rows["stage 2"]
    assert (local, paper.rstrip(" |")) == ("up to 8 at 6e-4, patience 4", "up to 200 at 2e-5, patience 20")
    assert rows["Stereo-RCnet parameters / forward FLOPs per clip"][1] == "82 133 / 48 MFLOP"
    assert rows["Baseline-A schedule (one stage)"][1].endswith("up to 20 epochs, patience 4")


def test_model_summary_markdown_prints_the_table(table):
    done = subprocess.run([sys.executable, "-m", "seld", "model-summary", "--markdown"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == table


def test_code_cites_the_design_document_that_exists():
    assert (ROOT / "docs" / "DESIGN.md").is_file()
    stale = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "seld").rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if "DESIGN.md" in line and "docs/DESIGN.md" not in line]
    assert not stale, f"cite docs/DESIGN.md: {stale}"


def test_every_test_the_docs_cite_exists():
    """A page that says "tested by tests/test_x.py::test_y" names a test that is there."""
    cited, missing = 0, []
    for page in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *DOCS]:
        for file, name in re.findall(r"(?:tests/)?(test_\w+\.py)::(\w+)", page.read_text()):
            cited += 1
            path = ROOT / "tests" / file
            if not path.is_file() or not re.search(rf"^def {name}\b", path.read_text(), flags=re.M):
                missing.append(f"{page.relative_to(ROOT)}: {file}::{name}")
    assert not missing, missing
    assert cited >= 30, cited


def test_every_dotted_name_the_docs_cite_exists():
    """`seld.module.name` in the README, BENCHMARKS and docs/ imports and resolves."""
    import importlib

    cited, missing = set(), []
    for page in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *DOCS]:
        cited |= set(re.findall(r"`(seld(?:\.\w+)+)`", page.read_text()))
    for dotted in sorted(cited):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        if obj is None:
            missing.append(dotted)
    assert not missing, missing
    assert len(cited) >= 5, cited


def test_training_policy_states_the_presets_budgets():
    """The epoch budgets and patiences docs/training-policy.md writes in prose are the presets'."""
    from seld.config import baseline_overrides, preset_config

    text = " ".join((ROOT / "docs" / "training-policy.md").read_text().split())
    local, paper = preset_config("local").train, preset_config("paper").train
    budget = (f"(`local`: {local.stage1.epochs} + {local.stage2.epochs} = {local.max_epochs}; "
              f"`paper`: {paper.stage1.epochs} + {paper.stage2.epochs})")
    assert budget in text, budget
    base = preset_config("local", baseline_overrides("local")).train.stage1
    assert (base.epochs, base.patience) == (local.max_epochs, local.stage2.patience)
    assert f"(`local`: {local.stage1.patience} epochs in each stage and for Baseline-A;" in text
    assert local.stage1.patience == local.stage2.patience == base.patience
    assert f"then patience {paper.stage2.patience})" in text and paper.stage1.patience is None
    assert f"Adam at lr {base.lr:.0e}".replace("e-0", "e-") in text
