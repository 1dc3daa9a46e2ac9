"""What a new hospital runs to adopt the consortium's model: ``fedmeta adapt`` makes its own site model
(``fedmeta.client.adapt``), ``fedmeta predict`` segments its scans with it (``fedmeta.client.predict``).

This module is the commands' edge: their options, the release key they verify with
(``fedmeta.client.commands.default_public_key``), and what they print; the work is done below it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fedmeta.client.commands import default_public_key, output_problem, verified_release
from fedmeta.common.read_limits import ReadLimits

# fedmeta.client.adapt, .predict and .model_card load inside the handlers: `fedmeta --help` imports every command
# module, and they pull in torch, MONAI and nibabel (~5 s, python -X importtime).


def register(subparsers: argparse._SubParsersAction) -> None:
    adapt_parser = subparsers.add_parser(
        "adapt",
        help="adapt the consortium's initialisation to this site with k labelled slices; write a site model",
        description="Verifies the release, adapts it on k labelled slices of the site's support patients with the "
        "rule its algorithm implies, scores it before and after on the site's held-out patients (Dice per patient "
        "in the scans' own grid), and writes MODEL/model.pt with a model card (JSON + Markdown).",
    )
    adapt_parser.add_argument("--checkpoint", type=Path, required=True, help="the consortium's release (checkpoint.pt)")
    adapt_parser.add_argument("--data", type=Path, required=True, help="this site's labelled folder (dataset.json, ...)")
    adapt_parser.add_argument("--shots", type=int, default=5, help="labelled slices to adapt on (default 5)")
    adapt_parser.add_argument("--steps", default="auto",
                              help="gradient steps: auto (the default) chooses the count from the k support slices "
                                   "alone, by cross-validation over them, the count with the highest check Dice (0 steps, "
                                   "the initialisation as it is, among the candidates), then adapts on all k; or a "
                                   "count, e.g. 10 (0 writes the initialisation unadapted, to compare; at most "
                                   "10,000, fedmeta's cap on every step count)")
    adapt_parser.add_argument("--max-steps", type=int, default=None,
                              help="with --steps auto: the largest count it may choose (default 20; the candidates "
                                   "are 0, 1, 2, 3, 5, 7, 10, 15, 20 up to it, and it)")
    adapt_parser.add_argument("--variant", default=None,
                              help="how the site adapts (default: what the checkpoint's run config names, adapt-variant "
                                   "— fine-tune unless the consortium chose another): fine-tune (every parameter the "
                                   "initialisation adapts), head-only, norm-only, bias-only, proximal-0.1|1|10|100, or "
                                   "frozen-prototypes (the prototype learner: step 0's prototypes kept as the classifier "
                                   "while the encoder is fine-tuned; docs/results-benchmark.md has its figures)")
    adapt_parser.add_argument("--seed", type=int, default=0, help="seed of the support/held-out patient split")
    adapt_parser.add_argument("--out", type=Path, required=True, help="the site model folder to write")
    adapt_parser.add_argument("--overwrite", action="store_true",
                              help="replace a site model an earlier fedmeta adapt wrote in --out (never another file)")
    adapt_parser.add_argument("--image-glob", help="for non-MSD folders, e.g. '*_img.nii.gz'")
    adapt_parser.add_argument("--label-glob", help="for non-MSD folders, e.g. '*_seg.nii.gz'")
    _release_options(adapt_parser)
    adapt_parser.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu or cuda[:N]")
    adapt_parser.set_defaults(handler=adapt_command)

    predict_parser = subparsers.add_parser(
        "predict",
        help="segment scans with a site model (or a release): one NIfTI mask per scan, in the scan's own grid",
        description="Writes OUT/<case>.nii.gz for each scan (same shape, affine and orientation as the scan; "
        "label values are the consortium's classes), an overlay PNG per scan and OUT/predictions.json. A scan the "
        "model cannot handle is refused with the reason; the others are still segmented.",
    )
    predict_parser.add_argument("--model", type=Path, required=True,
                                help="a site model folder (fedmeta adapt) or a consortium checkpoint.pt")
    predict_parser.add_argument("--input", type=Path, required=True,
                                help="a NIfTI scan, a DICOM series folder, or a folder of either")
    predict_parser.add_argument("--out", type=Path, required=True, help="folder for the masks")
    predict_parser.add_argument("--probabilities", action="store_true",
                                help="also write <case>_probabilities.nii.gz (float32, one volume per class)")
    predict_parser.add_argument("--no-overlays", action="store_true", help="skip the PNG overlay montages")
    predict_parser.add_argument("--overwrite", action="store_true",
                                help="replace the outputs of an earlier prediction in --out (never a scan or a label)")
    predict_parser.add_argument("--dicom-seg", action="store_true",
                                help="for a DICOM series input, also write <case>.seg.dcm: a DICOM Segmentation "
                                     "(highdicom) referencing the source series, for the PACS")
    _release_options(predict_parser, what="a checkpoint.pt given as --model")
    predict_parser.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu or cuda[:N]")
    predict_parser.set_defaults(handler=predict_command)


def _release_options(parser: argparse.ArgumentParser, what: str = "the checkpoint") -> None:
    parser.add_argument("--public-key", type=Path, default=None,
                        help=f"the consortium's Ed25519 release key (PEM) that {what} must be signed with (default: "
                             "$FEDMETA_RELEASE_KEY, else release.pub in the current folder, as fedmeta provision "
                             "ships it in each site bundle)")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="use an unsigned checkpoint unverified (your own runs; never a release)")


def adapt_command(args: argparse.Namespace) -> int:
    # torch, MONAI, nibabel (~2 s): inside the handlers, see the note at the top of this module.
    from fedmeta.client.adapt import adapt_site, check_steps_option, steps_summary
    from fedmeta.client.model_card import CARD_JSON, CARD_MD, MODEL_FILE, SITE_MODEL_FILES  # as adapt above
    from fedmeta.common.outputs import Outputs  # +8 ms on this module's import: `fedmeta predict --help`

    try:
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out}: is a file; give a folder for the site model.")
        problem = output_problem(args.out / CARD_JSON, "--out")
        if problem:
            raise ValueError(problem)
        Outputs(args.out, "adapt").check(SITE_MODEL_FILES, overwrite=args.overwrite)
        steps = steps_option(args.steps)
        check_steps_option(steps, args.max_steps)  # before the release is read, not after
        args.public_key = default_public_key(args.public_key)
        release = verified_release(args)
        card = adapt_site(args.checkpoint, args.data, args.out, shots=args.shots, steps=steps,
                          max_steps=args.max_steps, seed=args.seed, image_glob=args.image_glob,
                          label_glob=args.label_glob, release=release, device=args.device, overwrite=args.overwrite,
                          limits=ReadLimits.from_environment(), variant=args.variant)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedmeta adapt: error: {err}", file=sys.stderr)
        return 1
    dice, steps = card["dice"], steps_summary(card["adaptation"])
    if dice.get("held_out_patients"):
        print(f"Dice on {dice['held_out_patients']} held-out patient(s), whole scans in their own grid: "
              f"{dice['before']['dice']:.3f} before, {dice['after']['dice']:.3f} after {steps} "
              f"(worst patient {dice['after']['worst_patient_dice']:.3f})")
    else:
        print(f"{dice['note']}; adapted with {steps}")
    print(f"written: {args.out / MODEL_FILE}, {args.out / CARD_JSON}, {args.out / CARD_MD}")
    return 0


def steps_option(text: str) -> int | str:
    """``--steps`` as given: ``auto``, or the count it names (checked, with the value named, by adapt_site)."""
    text = str(text).strip()
    if re.fullmatch(r"[+-]?[0-9]+", text):  # ASCII digits only: '--5' or '²' pass isdigit() and then fail int()
        return int(text)
    return "auto" if text.lower() == "auto" else text


def predict_command(args: argparse.Namespace) -> int:
    from fedmeta.client.predict import predict_scans  # torch, MONAI (~2 s): see the note at the top

    try:
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out}: is a file; give a folder for the masks.")
        problem = output_problem(args.out / "predictions.json", "--out")
        if problem:
            raise ValueError(problem)
        public_key = default_public_key(args.public_key) if args.model.is_file() else None
        summary = predict_scans(args.model, args.input, args.out, public_key=public_key,
                                allow_unsigned=args.allow_unsigned, probabilities=args.probabilities,
                                overlays=not args.no_overlays, dicom_seg=args.dicom_seg, overwrite=args.overwrite,
                                device=args.device, limits=ReadLimits.from_environment())
    except (ValueError, FileNotFoundError) as err:
        print(f"fedmeta predict: error: {err}", file=sys.stderr)
        return 1
    print(f"{len(summary['masks'])} mask(s) written to {args.out}; {len(summary['refused'])} scan(s) refused")
    return 1 if summary["refused"] and not summary["masks"] else 0


__all__ = ["adapt_command", "predict_command", "register"]
