"""The README's commands, run as printed (issue 25): every ```sh block of README.md, command by
command, in README order, from one fresh temporary folder with relative paths, at smoke size.

The contract with the README: a fenced block tagged ``sh`` holds commands, one per non-empty line
(``\\`` continues a line, a trailing ``# comment`` is not part of it, a here-document belongs to its
command); blocks tagged ``text``/``console`` or untagged are output or examples and are not run.
Each command either runs here and must succeed, or is listed in NOT_RUN with the reason, or is run in
the smaller form of SWAPPED (the reason beside it); a new README command that is neither fails this
test, so no command goes untested by accident. The two set-up commands (``python3 -m venv ...``)
are not run: the test command must be the one `.ci/run` runs, and the main job's flags are checked
with ``--dry-run``.

Where the commands run: a temporary folder that holds what a checkout's root gives a user who types
them there: ``studies/`` and ``cluster/`` (links into this checkout), ``README.md``, ``docs/`` and
``results/`` (copies without run folders: ``--report-only --readme`` rewrites them). Every other
path in the commands (data, store, run, predictions, study folders) is relative to that folder, as
printed. ``seld`` is the console script next to this interpreter, ``python`` this interpreter. The
study commands join the session's Ray ($RAY_ADDRESS, as `ray job submit` does) instead of starting
one each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seld.study.cli import add_arguments

ROOT = Path(__file__).resolve().parent.parent

# Commands that cannot run here: a regex searched in the command -> why.
NOT_RUN = {
    r"^seld convert-foa FOA_ROOT\b": "needs DCASE2024 FOA recordings (FOA_ROOT stands for them); "
                                     "tests/test_stereo.py converts generated ones",
    r"^ray (up|down|attach|dashboard|exec|submit|job)\b": "needs a cloud cluster (cluster/gpu.yaml, an AWS account) "
                                                          "or a running Ray job; tests/test_multinode.py covers the loopback cluster",
    r"^sbatch\b": "needs a SLURM allocation",
    r"^(docker|cat > /tmp/Dockerfile)\b": "builds and pushes an image to a registry",
    r"^wandb (sync|login)\b": "talks to the W&B server",
    r"--data-root (DCASE2025|/mnt/)": "needs the real DCASE2025 data",
    r"--cluster cluster/gpu\.yaml(?!.*--dry-run)": "starts a GPU cluster (with --dry-run it is run here)",
}

# Commands that take long here, run in a smaller form: a regex matching the whole command -> (its
# replacement, why). Each is said beside it, and in the failure message.
SWAPPED = {
    r"python studies/ablation\.py( --resume)?": (
        r"python studies/ablation.py\1 --dry-run",
        "the main job trains the local preset for about 30 min: its plan only here; the "
        "`--preset smoke` line trains the same study at smoke size"),
    r"python studies/ablation\.py --preset local-extended(.*)": (
        r"python studies/ablation.py --preset local-extended\1 --dry-run",
        "the extended ablation trains 19 variants x 3 seeds at the local size (hours): its plan only"),
    r"python studies/sweep\.py --preset smoke(.*)": (
        r"python studies/sweep.py --preset smoke\1 --trials 1",
        "one trial instead of 3 (CI time; tests/test_sweep.py runs the smoke sweep in full)"),
    r"(.*) --out /tmp/(\S+)(.*)": (
        r"\1 --out \2\3",
        "a fixed /tmp folder would be shared by every run of this test (and refused the second "
        "time): relative to the temporary folder instead"),
}

# What Ray's own console output looks like; none of it may reach a command's console by default.
RAY_NOISE = ("Checkpoint successfully created", "Reporting training result", "(RayTrainWorker pid=",
             "(TrainController pid=", "core_worker.cc", "PreemptionWatcher", "Started a local Ray instance",
             "\x1b[")

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def sh_blocks(markdown: str) -> list[str]:
    """The bodies of the ```sh blocks, in order (indented ones in list items too, dedented)."""
    blocks = []
    for m in FENCE.finditer(markdown):
        if m.group("info").strip().split(" ")[0] == "sh":
            indent = len(m.group("indent"))
            blocks.append("\n".join(line[indent:] for line in m.group("body").splitlines()))
    return blocks


def commands(block: str) -> list[str]:
    """The commands of a ```sh block, each as one line: continuations joined, comments dropped
    (shell rules: a ``#`` starting a word), a here-document kept with its command."""
    lines, out = block.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:  # its lines are the command's input, up to the terminator
            while i + 1 < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
        i += 1
        line = _without_comment(line).strip()
        if line:
            out.append(line)
    return out


def _without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a word outside quotes (the shell's comment rule)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


def plan(command: str) -> tuple[str | None, str | None]:
    """(what to run, why it differs from the README) for a README command; (None, why) for one
    in NOT_RUN."""
    for pattern, why in NOT_RUN.items():
        if re.search(pattern, command):
            return None, why
    reasons = []
    for pattern, (replacement, why) in SWAPPED.items():
        swapped = re.sub(rf"^{pattern}$", replacement, command)
        if swapped != command:
            command = swapped
            reasons.append(why)
    return command, "; ".join(reasons) or None


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    seld = Path(sys.executable).with_name("seld")
    programs = {"python": [sys.executable], "python3": [sys.executable],
                "seld": [str(seld)] if seld.is_file() else [sys.executable, "-m", "seld"]}
    if words[0] not in programs:
        pytest.fail(f"README command {command!r}: neither run by tests/test_readme.py nor listed in "
                    "its NOT_RUN (with the reason it cannot run here)")
    return programs[words[0]] + words[1:]


def test_the_contract_reads_blocks_lines_continuations_comments_and_heredocs():
    md = ("```sh\nseld a --x 1 'b#c'  # first\n\n# a comment line\nseld b \\\n    --y 2\n```\n"
          "```text\nseld not-a-command\n```\n```\nseld untagged\n```\n"
          "3. item\n\n   ```sh\n   ray up c.yaml\n   cat > /tmp/D <<'D'\n   FROM x\n   D\n   docker build .\n   ```\n")
    assert [commands(b) for b in sh_blocks(md)] == [["seld a --x 1 'b#c'", "seld b --y 2"],
                                                     ["ray up c.yaml", "cat > /tmp/D <<'D'", "docker build ."]]
    assert plan("ray up cluster/gpu.yaml")[0] is None
    assert plan("python studies/ablation.py --preset smoke --out /tmp/abl") == (
        "python studies/ablation.py --preset smoke --out abl", SWAPPED[r"(.*) --out /tmp/(\S+)(.*)"][1])
    assert plan("python studies/ablation.py --preset paper --cluster cluster/gpu.yaml --dry-run")[0]
    assert plan("python studies/ablation.py --preset paper --cluster cluster/gpu.yaml")[0] is None


def test_setup_commands_are_what_ci_runs():
    """The README's two set-up commands: the test command is `.ci/run`'s; the main job's flags
    are the study script's (its plan is checked with --dry-run in the next test, as
    `python studies/ablation.py`)."""
    setup = [c for b in sh_blocks((ROOT / "README.md").read_text(encoding="utf-8")) for c in commands(b)
             if c.startswith("python3 -m venv")]
    assert len(setup) == 2, setup
    raw = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
           if line.startswith("python3 -m venv")]
    test_command = next(c for c in raw if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    main_job = next(c for c in setup if "pytest" not in c).split(" && ")[-1]
    assert main_job.startswith(".venv/bin/python studies/"), main_job
    script, *flags = shlex.split(main_job)[1:]
    spec = importlib.util.spec_from_file_location("readme_main_job", ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # its __main__ block not run
    parser = argparse.ArgumentParser()
    add_arguments(parser, list(mod.STUDIES), "local")
    args = parser.parse_args(flags)  # a flag the script does not take exits here
    assert args.preset == "local"  # the main job is the local study


def _checkout_root(tmp: Path) -> Path:
    """The temporary folder the commands run in (see the module docstring)."""
    for name in ("studies", "cluster"):
        (tmp / name).symlink_to(ROOT / name, target_is_directory=True)
    shutil.copy2(ROOT / "README.md", tmp / "README.md")
    if (ROOT / "docs").is_dir():
        shutil.copytree(ROOT / "docs", tmp / "docs")
    shutil.copytree(ROOT / "results", tmp / "results", ignore=shutil.ignore_patterns("runs", "_work"))
    return tmp


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 4 min on a quiet 2-core machine; 15 min were seen under a load of 50
def test_readme_commands_run_as_printed_from_a_fresh_folder(tmp_path, ray_session):
    cwd = _checkout_root(tmp_path)
    cmds = [c for b in sh_blocks((ROOT / "README.md").read_text(encoding="utf-8")) for c in commands(b)
            if not c.startswith("python3 -m venv")]
    assert any(c.startswith("seld train ") for c in cmds), cmds  # the README's pipeline was found
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("RAY_LOG_TO_DRIVER", None)  # the commands' own default
    ran, skipped = [], []
    for command in cmds:
        run, why = plan(command)
        if run is None:
            skipped.append((command, why))
            continue
        t0 = time.perf_counter()
        done = subprocess.run(_argv(run), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        ran.append((command, run, round(time.perf_counter() - t0, 1)))
        said = f"README command {command!r}" + (f" (run as {run!r}: {why})" if why else "")
        assert done.returncode == 0, f"{said} exited {done.returncode}:\n{done.stderr[-3000:]}"
        console = done.stdout + done.stderr
        noise = [x for x in RAY_NOISE if x in console]
        assert not noise and "Traceback" not in console, f"{said} printed {noise}:\n{console[-3000:]}"
        if run.startswith("seld train "):
            # Its progress: one line per epoch from the driver (the workers' echoes stay in Ray's logs).
            out = Path(cwd, shlex.split(run)[shlex.split(run).index("--out") + 1])
            n_epochs = len((out / "metrics.csv").read_text().splitlines()) - 1
            lines = [x for x in done.stderr.splitlines() if f"{out.name} · epoch " in x]
            assert len(lines) == n_epochs >= 1, done.stderr
    # Everything the commands wrote is in the temporary folder, where their relative paths point,
    # and names no path of the shell: run and study folders keep paths relative to themselves (the
    # store's manifest records where its data came from: data_root, absolute, provenance only).
    train = shlex.split(next(r for _, r, _ in ran if r.startswith("seld train ")))
    synth = shlex.split(next(r for _, r, _ in ran if r.startswith("seld synth ")))
    store, run_dir, data = train[2], _option(train, "--out"), _option(synth, "--out")
    assert (cwd / run_dir / "metrics.json").is_file() and (cwd / data / "synth.json").is_file()
    leaks = []
    for path in cwd.rglob("*"):
        if path.suffix not in (".json", ".jsonl", ".csv") or {"_work", "ray", "wandb", "results"} & set(path.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.name == "manifest.json":
            text = text.replace(json.loads(text).get("data_root", "\0"), "")
        if str(cwd) in text:
            leaks.append(str(path.relative_to(cwd)))
    assert not leaks, leaks
    _moved_run_and_store_still_predict_and_resume(cwd, env, store, run_dir, data, _option(train, "--preset"))
    print("\n".join(f"{t:6.1f} s  {c}" + (f"   [as: {r}]" if r != c else "") for c, r, t in ran))
    print("\n".join(f"not run: {c}   [{why}]" for c, why in skipped))


def _option(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def _moved_run_and_store_still_predict_and_resume(cwd: Path, env: dict[str, str], store: str, run_dir: str,
                                                  data: str, preset: str) -> None:
    """The README's run folder and store moved elsewhere: `seld predict` from the moved run writes
    the same CSVs, and `seld train --resume` on the moved run and store (from another folder, with
    relative paths) restores the finished run from its last checkpoint: no epoch is trained again,
    the same scores."""
    moved = cwd / "elsewhere" / "moved"
    moved.mkdir(parents=True)
    for name, new in ((run_dir, "run"), (store, "store")):
        (cwd / name).rename(moved / new)
    csv_before = (moved / "run" / "metrics.csv").read_text()
    f20 = json.loads((moved / "run" / "metrics.json").read_text())["test/f20"]
    wavs = cwd / data / "stereo_dev" / "dev-test-tau"
    seld = _argv("seld")
    for argv in (["predict", "moved/run", f"../{wavs.relative_to(cwd)}", "--out", "../pred-moved"],
                 ["train", "moved/store", "--preset", preset, "--out", "moved/run", "--resume"]):
        done = subprocess.run(seld + argv, cwd=cwd / "elsewhere", env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (argv, done.stderr[-3000:])
    assert sorted(p.stem for p in (cwd / "pred-moved").glob("*.csv")) == sorted(p.stem for p in wavs.glob("*.wav"))
    assert (moved / "run" / "metrics.csv").read_text() == csv_before
    assert json.loads((moved / "run" / "metrics.json").read_text())["test/f20"] == f20
