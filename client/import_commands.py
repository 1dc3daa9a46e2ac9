"""`fedmeta import msd|chaos`: a public dataset, as its users download it, written as a fedmeta site folder.

The work is :func:`fedmeta.common.import_msd.import_msd` and :func:`fedmeta.common.import_chaos.import_chaos`;
here only the arguments and the printed summary. Then ``fedmeta check-data SITE_DIR`` checks the voxels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "write a downloaded public dataset (an MSD task, CHAOS) as a site folder fedmeta reads"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help=HELP, description=HELP + ".")
    parser.set_defaults(handler=import_usage)
    kinds = parser.add_subparsers(dest="dataset", metavar="DATASET")
    kinds.required = True  # `fedmeta import` alone: argparse names the choices
    msd = kinds.add_parser(
        "msd", help="a Medical Segmentation Decathlon task: TaskNN_Name/ or TaskNN_Name.tar",
        description="Writes an MSD task (any of the ten; folder or its .tar, MSD or nnU-Net v2 dataset.json) as a "
        "site folder: imagesTr/labelsTr as listed, imagesTs kept for prediction, 4D multi-channel images as they "
        "are with their channel names in dataset.json, macOS '._' files skipped. Archives are unpacked safely "
        "(no absolute paths, '..', links or device files; bounded size).")
    msd.add_argument("source", type=Path, help="the task folder (TaskNN_Name/) or its archive (TaskNN_Name.tar)")
    msd.add_argument("--out", type=Path, required=True, help="the site folder to write (new, or empty)")
    msd.add_argument("--max-extract-gb", type=float, default=128.0,
                     help="refuse an archive whose files hold more than this (default 128 GiB)")
    msd.set_defaults(handler=import_msd_command)
    chaos = kinds.add_parser(
        "chaos", help="the CHAOS challenge's training sets (DICOM series + PNG ground truth)",
        description="Writes CHAOS's CT (liver) or MR (liver, right kidney, left kidney, spleen) training patients as "
        "NIfTI images and label maps on the DICOM geometry.")
    chaos.add_argument("source", type=Path, help="the extracted CHAOS_Train_Sets folder (or its Train_Sets/)")
    chaos.add_argument("--modality", choices=("ct", "mr"), required=True, help="which half of CHAOS")
    chaos.add_argument("--sequence", choices=("T2SPIR", "InPhase", "OutPhase"), default="T2SPIR",
                       help="with --modality mr: the MR series (default T2SPIR; InPhase/OutPhase are T1DUAL's)")
    chaos.add_argument("--out", type=Path, required=True, help="the site folder to write (new, or empty)")
    chaos.set_defaults(handler=import_chaos_command)


def import_usage(args: argparse.Namespace) -> int:
    """The parser's own handler; never reached, as a DATASET is required (each sets its own)."""
    print("fedmeta import: name the dataset, msd or chaos (fedmeta import --help).", file=sys.stderr)
    return 2


def import_msd_command(args: argparse.Namespace) -> int:
    from fedmeta.common.import_msd import import_msd

    if not args.max_extract_gb > 0:
        print(f"fedmeta import msd: --max-extract-gb {args.max_extract_gb} must be positive.", file=sys.stderr)
        return 2
    try:
        summary = import_msd(args.source, args.out, max_bytes=int(args.max_extract_gb * 2**30))
    except (FileNotFoundError, ValueError) as err:
        print(f"fedmeta import msd: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    print(f"next: fedmeta check-data {args.out}")
    return 0


def import_chaos_command(args: argparse.Namespace) -> int:
    from fedmeta.common.import_chaos import import_chaos
    from fedmeta.common.read_limits import ReadLimits

    try:
        summary = import_chaos(args.source, args.out, modality=args.modality, sequence=args.sequence,
                               limits=ReadLimits.from_environment())
    except (FileNotFoundError, ValueError) as err:  # SeriesProblem is a ValueError
        print(f"fedmeta import chaos: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    print(f"next: fedmeta check-data {args.out}")
    return 0
