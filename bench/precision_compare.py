"""bf16 against float32 on one study, paired by seed: is bf16 training within seed noise?

    python bench/precision_compare.py BF16_STUDY FLOAT32_STUDY --out results/precision

Both folders are results of the same study command at the same commit, one trained with the
default precision decision (bf16 on a CPU with native bf16) and one with ``SELD_PRECISION=float32``
(the config, and so each run's seed and data, are identical: the precision is a property of the
machine, not of the config). For every variant and each Table 1 metric (Stage 1, Stage 2, Stage 2 +
PP F20; DOAE and RDE after PP), the paired Student-t interval of bf16 - float32 over the seeds both
have (`seld.paired.paired_t`), the smallest difference those seeds could detect
(`seld.paired.minimum_detectable_effect`, 95 % / 80 %), and the verdict: "within seed noise" when
the interval holds 0. Also each variant's mean wall time per run and its ratio. Writes
OUT/bf16_vs_float32.md and .csv and prints the markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from seld.paired import minimum_detectable_effect, paired_sd, paired_t

METRICS = (("stage1_test/f20", "Stage 1 F20 (%)"), ("test/f20", "Stage 2 F20 (%)"), ("test_pp/f20", "Stage 2 + PP F20 (%)"),
           ("test_pp/doae_cd", "DOAE_CD after PP (°)"), ("test_pp/rde_cd", "RDE_CD after PP"))


def compare(bf16: pd.DataFrame, fp32: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for variant in dict.fromkeys(bf16["variant"]):
        a, b = bf16[bf16["variant"] == variant], fp32[fp32["variant"] == variant]
        for col, label in METRICS:
            if col not in a or col not in b:
                continue
            sa = dict(zip(a["seed"], a[col], strict=True))
            sb = dict(zip(b["seed"], b[col], strict=True))
            iv = paired_t(sa, sb)
            sd, n = paired_sd(sa, sb)
            rows.append({"variant": variant, "metric": label, "seeds": iv.n,
                         "bf16": float(pd.Series(sa).mean()), "float32": float(pd.Series(sb).mean()),
                         "diff": iv.estimate, "lo": iv.lo, "hi": iv.hi, "mde": minimum_detectable_effect(sd, n),
                         "verdict": ("within seed noise" if iv.lo <= 0 <= iv.hi else
                                     "bf16 higher" if iv.lo > 0 else "bf16 lower") if iv.defined else "–",
                         "bf16_wall_min": a["wall_s"].mean() / 60, "float32_wall_min": b["wall_s"].mean() / 60})
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, bf16_dir: Path, fp32_dir: Path) -> str:
    lines = [f"# bf16 against float32, paired by seed ({bf16_dir.name} vs {fp32_dir.name})", "",
             "bf16 - float32 per seed, mean and 95 % paired Student-t interval over the seeds; MDE: the smallest "
             "true difference these seeds detect at 95 % / 80 % power. Wall: mean minutes per run.", "",
             "| variant | metric | seeds | bf16 | float32 | bf16 - float32 [95 %] | MDE | verdict | wall bf16 / float32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.variant} | {r.metric} | {r.seeds} | {r.bf16:.2f} | {r.float32:.2f} | "
                     f"{r.diff:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}] | {r.mde:.2f} | {r.verdict} | "
                     f"{r.bf16_wall_min:.1f} / {r.float32_wall_min:.1f} ({r.float32_wall_min / r.bf16_wall_min:.2f}x) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bf16", type=Path)
    ap.add_argument("float32", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bf16, fp32 = (pd.read_csv(d / "summary.csv") for d in (args.bf16, args.float32))
    for d, df, want in ((args.bf16, bf16, "bf16"), (args.float32, fp32, "float32")):
        got = set(df["precision"])
        if got != {want}:
            raise SystemExit(f"{d}/summary.csv: precision {sorted(got)}, expected only {want!r}")
    df = compare(bf16, fp32)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "bf16_vs_float32.csv", index=False, float_format="%.4f")
    md = to_markdown(df, args.bf16, args.float32)
    (args.out / "bf16_vs_float32.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
