"""Two runs of one study, paired by seed: do they agree within seed noise?

    python bench/study_compare.py BF16_STUDY FLOAT32_STUDY --labels bf16 float32 --out results/precision
    python bench/study_compare.py ROWGROUPS_STUDY RAYDATA_STUDY --labels rowgroups ray_data --out results/engines

Both folders are results of the same study (same variants and seeds) that differ in one thing: the
precision (one trained with the default decision, bf16 on a CPU with native bf16, one with
``SELD_PRECISION=float32``: the configs are identical, the precision is the machine's) or the
ingest engine (``--set data.engine=ray_data``). Labels that are precisions ("bf16", "float32") are
checked against each summary's ``precision`` column. For every variant and each Table 1 metric
(Stage 1, Stage 2, Stage 2 + PP F20; DOAE and RDE after PP), the paired Student-t interval of A - B
over the seeds both have (`seld.paired.paired_t`), the smallest difference those seeds could
detect (`seld.paired.minimum_detectable_effect`, 95 % / 80 %), and the verdict: "within seed noise"
when the interval holds 0. Also each variant's mean wall time per run and data wait. Writes
OUT/A_vs_B.md and .csv and prints the markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from seld.paired import minimum_detectable_effect, paired_sd, paired_t

METRICS = (("stage1_test/f20", "Stage 1 F20 (%)"), ("test/f20", "Stage 2 F20 (%)"), ("test_pp/f20", "Stage 2 + PP F20 (%)"),
           ("test_pp/doae_cd", "DOAE_CD after PP (°)"), ("test_pp/rde_cd", "RDE_CD after PP"))


def compare(first: pd.DataFrame, second: pd.DataFrame, labels: tuple[str, str]) -> pd.DataFrame:
    la, lb = labels
    rows = []
    for variant in dict.fromkeys(first["variant"]):
        a, b = first[first["variant"] == variant], second[second["variant"] == variant]
        for col, label in METRICS:
            if col not in a or col not in b:
                continue
            sa = dict(zip(a["seed"], a[col], strict=True))
            sb = dict(zip(b["seed"], b[col], strict=True))
            iv = paired_t(sa, sb)
            if iv.n == 0:  # a metric the variant does not have (Baseline-A has one stage)
                continue
            sd, n = paired_sd(sa, sb)
            rows.append({"variant": variant, "metric": label, "seeds": iv.n,
                         "a": float(pd.Series(sa).mean()), "b": float(pd.Series(sb).mean()),
                         "diff": iv.estimate, "lo": iv.lo, "hi": iv.hi, "mde": minimum_detectable_effect(sd, n),
                         "verdict": ("within seed noise" if iv.lo <= 0 <= iv.hi else
                                     f"{la} higher" if iv.lo > 0 else f"{la} lower") if iv.defined else "–",
                         "a_wall_min": a["wall_s"].mean() / 60, "b_wall_min": b["wall_s"].mean() / 60,
                         "a_data_wait": a["cost/data_wait_frac"].mean(), "b_data_wait": b["cost/data_wait_frac"].mean()})
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, labels: tuple[str, str], dirs: tuple[Path, Path]) -> str:
    la, lb = labels
    lines = [f"# {la} against {lb}, paired by seed ({dirs[0]} vs {dirs[1]})", "",
             f"{la} - {lb} per seed, mean and 95 % paired Student-t interval over the seeds; MDE: the smallest "
             "true difference these seeds detect at 95 % / 80 % power. Wall: mean minutes per run; data wait: "
             "mean fraction of the training loop spent waiting for batches.", "",
             f"| variant | metric | seeds | {la} | {lb} | {la} - {lb} [95 %] | MDE | verdict | wall {la} / {lb} (min) "
             f"| data wait {la} / {lb} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.variant} | {r.metric} | {r.seeds} | {r.a:.2f} | {r.b:.2f} | "
                     f"{r.diff:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}] | {r.mde:.2f} | {r.verdict} | "
                     f"{r.a_wall_min:.1f} / {r.b_wall_min:.1f} | {100 * r.a_data_wait:.1f} % / {100 * r.b_data_wait:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--labels", nargs=2, required=True, metavar=("A", "B"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    labels = tuple(args.labels)
    frames = [pd.read_csv(d / "summary.csv") for d in (args.a, args.b)]
    for d, df, want in zip((args.a, args.b), frames, labels, strict=True):
        got = set(df["precision"])
        if want in ("bf16", "float32") and got != {want}:
            raise SystemExit(f"{d}/summary.csv: precision {sorted(got)}, expected only {want!r}")
    df = compare(*frames, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{labels[0]}_vs_{labels[1]}"
    df.to_csv(args.out / f"{stem}.csv", index=False, float_format="%.4f")
    md = to_markdown(df, labels, (args.a, args.b))
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
