"""Which paired verdicts changed between two versions of a study's paired table (F20)?

    python bench/verdict_changes.py OLD_PAIRED.csv NEW_PAIRED.csv [--labels "3 seeds" "auto:8"]
    git show 03fdba4:results/ablation-extended/extended_paired.csv > /tmp/old.csv   # the first (3-seed) table
    python bench/verdict_changes.py /tmp/old.csv results/ablation-extended/extended_paired.csv

Both files are a study's `<table>_paired.csv` (seld/report.py). For every F20 comparison (A − B)
in either file: each side's verdict, seeds and interval over seeds (the repeated interval of the
sequential rule where the table has a `sequential` column, which is also shown), the interval over
files, and whether the verdict changed. Prints a markdown table, the changed comparisons first;
exit 0 (a report, not a check).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def _f20(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = {"a", "b", "metric", "verdict", "n_seeds", "seeds_estimate", "seeds_lo", "seeds_hi",
               "files_lo", "files_hi"} - set(df.columns)
    if missing:
        raise SystemExit(f"{path}: not a paired table (no column {', '.join(sorted(missing))})")
    df = df[df["metric"] == "f20"].copy()
    df["comparison"] = df["a"] + " − " + df["b"]
    return df.set_index("comparison")


def _interval(row: pd.Series | None, prefix: str) -> str:
    if row is None or pd.isna(row[f"{prefix}_lo"]):
        if row is not None and prefix == "seeds" and pd.notna(row["seeds_estimate"]):
            return f"{row['seeds_estimate']:+.1f}"
        return "–"
    est = row["seeds_estimate"] if prefix == "seeds" else row.get("files_estimate", row["seeds_estimate"])
    return f"{est:+.1f} [{row[f'{prefix}_lo']:+.1f}, {row[f'{prefix}_hi']:+.1f}]"


def _side(row: pd.Series | None) -> list[str]:
    if row is None:
        return ["(absent)", "–", "–", "–"]
    seeds = f"{int(row['n_seeds'])}"
    if "sequential" in row and isinstance(row["sequential"], str) and row["sequential"]:
        seeds += f" ({row['sequential']})"
    return [row["verdict"], seeds, _interval(row, "seeds"), _interval(row, "files")]


def verdict_changes(old: Path, new: Path, labels: tuple[str, str] = ("old", "new")) -> str:
    """The markdown table (see the module's doc)."""
    a, b = _f20(old), _f20(new)
    names = list(dict.fromkeys([*b.index, *a.index]))
    rows = []
    for name in names:
        ra, rb = (a.loc[name] if name in a.index else None), (b.loc[name] if name in b.index else None)
        changed = ra is None or rb is None or ra["verdict"] != rb["verdict"]
        rows.append((not changed, names.index(name), [name, "yes" if changed else "no", *_side(ra), *_side(rb)]))
    head = ["comparison (A − B)", "changed"] + [f"{h} ({lab})" for lab in labels
                                                for h in ("verdict", "seeds", "Δ F20 (pp), seeds", "Δ F20 (pp), files")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for _, _, cells in sorted(rows, key=lambda r: r[:2])]
    n = sum(1 for unchanged, _, _ in rows if not unchanged)
    return "\n".join(lines) + f"\n\n{n} of {len(rows)} F20 verdicts changed ({old} -> {new}).\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--labels", nargs=2, default=("old", "new"), metavar=("OLD", "NEW"))
    args = p.parse_args(argv)
    print(verdict_changes(args.old, args.new, tuple(args.labels)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
