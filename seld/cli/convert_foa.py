"""`seld convert-foa`: DCASE2024-style FOA recordings -> 5-s stereo clips with 2025 labels."""

from __future__ import annotations

import argparse

from seld.cli import existing_path, user_path
from seld.config import SPLITS

NAME = "convert-foa"
HELP = "cut DCASE2024-style FOA recordings into 5-s stereo clips (official FOA->stereo recipe)"
EXAMPLE = """example:
  seld convert-foa /data/dcase2024_synth --out data --split dev-train-synth --clips 2000 --seed 0

FOA_ROOT is searched for foa_dev/<sub>/*.wav (4 channels W Y Z X, ACN/SN3D, 24 kHz) with
metadata_dev/<sub>/<same name>.csv next to it. Writes DATA/stereo_dev/<split>/*.wav and
DATA/metadata_dev/<split>/*.csv named fold<F>_room<R>_mix<NNN>_deg<VVV>_start<SSSS>."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("foa_root", metavar="FOA_ROOT", type=existing_path("FOA root"), help="folder holding foa_dev/ and metadata_dev/")
    parser.add_argument("--out", type=user_path, required=True, metavar="DATA", help="dataset root to write into")
    parser.add_argument("--split", default="dev-train-synth", choices=list(SPLITS),
                        help="split folder for the clips (default: dev-train-synth)")
    parser.add_argument("--clips", type=int, required=True, metavar="N", help="number of 5-s clips")
    parser.add_argument("--seed", type=int, default=0, help="random seed (viewing angles, start frames)")


def run(args: argparse.Namespace) -> int:
    from seld.stereo import convert_foa

    paths = convert_foa(args.foa_root, args.out, args.split, args.clips, seed=args.seed, progress=True)
    print(f"wrote {len(paths)} clips to {args.out}/stereo_dev/{args.split}")
    return 0
