"""A new hospital adopts the consortium's model: ``fedmeta adapt`` makes its own site model, ``fedmeta predict``
segments its scans with it.

``adapt`` verifies the release (``fedmeta.common.release``), adapts θ on k labelled slices of the site's
support patients with the rule the checkpoint's algorithm implies (the run's inner step size, Meta-SGD's
learned step sizes, ANIL's head only: ``fedmeta.common.adaptation.load_initialisation``), and scores the
initialisation and the adapted model on the site's other, held-out patients: Dice per patient over the
whole scan **in the scan's own grid**, computed from the very masks ``predict`` writes
(``fedmeta.common.inference.segment_scan``), so what the model card reports is what the site will get.

A site model is a folder::

    MODEL/model.pt          θ adapted (weights only) and the run config that describes the network
    MODEL/model-card.json   what it is: init digest and round, release id, shots, steps, the data's
                            fingerprint (counts, spacing, intensity statistics: no file name, no patient id),
                            Dice before and after adaptation on the held-out patients
    MODEL/model-card.md     the same, for people

``predict`` refuses a model whose ``model.pt`` no longer has the SHA-256 its card records, and a model
card or weights that do not match (the same weight checks as every checkpoint loader).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common.jsonio import write_json

MODEL_FILE, CARD_JSON, CARD_MD = "model.pt", "model-card.json", "model-card.md"
SITE_MODEL_FORMAT = "fedmeta-site-model"
SITE_MODEL_VERSION = 1
SCAN_SUFFIXES = (".nii.gz", ".nii")
# A volume with fewer voxels than this along an axis is a localiser or a slice, not a scan to segment.
MIN_SCAN_SLICES = 3


@dataclass
class SiteModel:
    params: dict  # name -> tensor
    run_config: dict
    card: dict
    path: Path


def case_name(path: Path) -> str:
    """``<case>`` for ``<case>_0000.nii.gz`` (nnU-Net's first-channel suffix), ``<case>.nii.gz``, ``<case>.nii``
    or a DICOM series folder ``<case>/``."""
    name = path.name
    if path.is_dir():
        return name
    for suffix in SCAN_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name.endswith("_0000"):  # nnU-Net's first channel; '_2023' is part of a name
        name = name[:-5]
    return name


def pick_device(requested: str):
    """``--device``, as the ClientApp picks its run config's device (``fedmeta.client.site.device_named``)."""
    from fedmeta.client.site import device_named

    try:
        return device_named(requested)
    except RuntimeError as err:
        raise ValueError(str(err)) from None


# --------------------------------------------------------------------------------------------------
# adapt


def adapt_site(checkpoint: Path, data: Path, out: Path, *, shots: int, steps: int, seed: int = 0,
               image_glob: str | None = None, label_glob: str | None = None, release: dict | None = None,
               device: str = "auto", overwrite: bool = False, progress=print) -> dict[str, Any]:
    """Adapts ``checkpoint`` to the site at ``data``; writes the site model folder ``out`` (an earlier site model
    there only with ``overwrite``; never a file adapt did not write); returns its card."""
    import torch

    from fedmeta.common.adaptation import AdaptationDiverged, check_adapted, load_initialisation
    from fedmeta.common.data import SiteDataset, adaptation_patients, adaptation_support
    from fedmeta.common.losses import DiceCELoss, one_hot
    from fedmeta.common.meta import adaptation_trajectory
    from fedmeta.common.metrics import foreground_classes
    from fedmeta.common.model import build_model, head_parameter_names
    from fedmeta.common.config import MAX_STEPS
    from fedmeta.common.outputs import file_sha256
    from fedmeta.common.validate import discover_site

    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"--shots {shots!r}: the labelled slices to adapt on, an integer >= 1, e.g. 5.")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps {steps!r}: gradient steps, an integer from 0 (the initialisation as it is) to "
                         f"{MAX_STEPS:,}; a few-shot adaptation takes 5-50.")
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder; pass the site folder (dataset.json, imagesTr/, labelsTr/).")
    from fedmeta.common.outputs import Outputs

    Outputs(out, "adapt").check(SITE_MODEL_FILES, overwrite=overwrite)  # before minutes of adaptation, not after
    began = time.perf_counter()
    dev = pick_device(device)
    init, config = load_initialisation(checkpoint)
    data_config = config.data_config(image_glob=image_glob, label_glob=label_glob)
    raw = _RawStats()  # the data's fingerprint, gathered as the site is read (not by reading it again)
    site = SiteDataset.load(data, data_config, on_case=raw.add)
    model = build_model(config.model_config()).to(dev)
    classes = foreground_classes(site.label_names, config.num_classes, site.labelled_classes)

    if site.num_patients >= 2:
        support_patients, heldout = adaptation_patients(site, seed)
        support_x, support_y = adaptation_support(site, shots, seed)
    else:  # one patient: adapt on it, nothing left to score on
        support_patients, heldout = [0], []
        picks = site.foreground_indices(0)[:shots]
        if len(picks) < shots:
            raise ValueError(f"site {site.name} has {len(picks)} labelled slices, fewer than --shots {shots}.")
        support_x, support_y = site.images[0][picks], site.labels[0][picks].long()
    progress(f"adapting on {shots} labelled slice(s) of {len(support_patients)} support patient(s), {steps} step(s) "
             f"({init.label}) on {dev}")
    params = {n: p.to(dev) for n, p in init.params.items()}
    inner_lr = ({n: a.to(dev) for n, a in init.inner_lr.items()} if isinstance(init.inner_lr, dict) else init.inner_lr)
    support = (support_x.to(dev), one_hot(support_y.to(dev), config.num_classes, torch.float32))

    # "Before" is the learner at 0 steps: θ itself, or θ as the other families prepare it for this support
    # set (a generated head, the support prototypes), which is all a 0-step site model holds.
    prepared = adapted = None
    for done, adapted in enumerate(adaptation_trajectory(
            model, params, *support, inner_steps=steps, inner_lr=inner_lr, loss_fn=DiceCELoss(config.num_classes),
            inner_params=head_parameter_names(model) if init.head_only else None)):
        try:  # a broken model is neither scored (a Dice of 0) nor saved for predict
            check_adapted(adapted, step=done, inner_steps=steps)
        except AdaptationDiverged as err:
            raise ValueError(f"{checkpoint} on {data}: {err} ({_rule(config.algorithm, init, steps)}). Fix: adapt with "
                             f"{f'--steps {done - 1} or fewer' if done > 1 else '--steps 0'}, or more --shots; if it "
                             "diverges at every step count, report it to the consortium.") from None
        prepared = adapted if prepared is None else prepared
    prepared, adapted = ({n: p.detach().cpu() for n, p in d.items()} for d in (prepared, adapted))
    adapt_seconds = time.perf_counter() - began

    dice: dict[str, Any] = {"held_out_patients": len(heldout)}
    if heldout:
        cases = {case.case_id: case for case in discover_site(data, image_glob, label_glob).cases}
        scored = [cases[site.patient_ids[p]] for p in sorted(heldout)]
        before = _score_native(model, prepared, config, scored, classes, dev, progress, "initialisation")
        after = before if steps == 0 else _score_native(model, adapted, config, scored, classes, dev, progress, "adapted")
        dice.update({"before": before, "after": after, "classes": classes})
    else:
        dice["note"] = "one usable patient: every slice went to adaptation, none is left to score the model on"

    card = {
        "format": SITE_MODEL_FORMAT,
        "version": SITE_MODEL_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "initialisation": {
            "sha256": file_sha256(Path(checkpoint)),
            "round": init.round,
            "algorithm": config.algorithm,
            "release_id": (release or {}).get("release_id"),
            "release_verified": bool(release),
            "signing_key_sha256": (release or {}).get("signing_key_sha256"),
        },
        "adaptation": {
            "shots": shots, "steps": steps, "seed": seed,
            "rule": _rule(config.algorithm, init, steps),
            "support_patients": len(support_patients),
            "seconds": round(adapt_seconds, 3),
        },
        "data": raw.fingerprint(site),
        "dice": dice,
        "metric": "Dice per held-out patient over the whole scan in the scan's own grid (the masks fedmeta predict "
                  "writes), per foreground class the site labels, mean over classes then patients",
        "model": {"spatial_dims": data_config.spatial_dims, "image_size": list(data_config.image_size),
                  "spacing_mm": list(data_config.spacing), "num_classes": config.num_classes,
                  "label_names": {str(k): v for k, v in (site.label_names or {}).items()}},
    }
    save_site_model(out, adapted, config.to_run_config(), card, overwrite=overwrite)
    return card


def _score_native(model, params, config, cases, classes, device, progress, what: str) -> dict[str, Any]:
    """Per-patient Dice of ``params``' masks in each scan's own grid, against the scan's label file."""
    import torch

    from fedmeta.common.metrics import patient_dice, summarise_patients
    from fedmeta.common.validate import check_case

    per_patient = {}
    for i, case in enumerate(cases, 1):
        problems, loaded = check_case(case, None, config.num_classes)
        if problems:  # SiteDataset.load read it a moment ago; a file changed under us is still a named error
            raise ValueError("; ".join(problems))
        mask = segment_loaded(model, params, config, loaded.image_data, loaded.image.affine, device)
        per_patient[f"patient-{i}"] = patient_dice(torch.from_numpy(mask.mask.astype(np.int64)),
                                                   torch.from_numpy(loaded.label_data), classes)
        progress(f"  scored {what} on held-out patient {i}/{len(cases)}: Dice "
                 f"{sum(per_patient[f'patient-{i}'].values()) / len(classes):.3f}")
    return summarise_patients(per_patient)


def segment_loaded(model, params, config, image_data, affine, device, probabilities: bool = False):
    from fedmeta.common.inference import segment_scan

    return segment_scan(model, params, image_data, np.asarray(affine), config.data_config(),
                        num_classes=config.num_classes, batch_size=config.eval_batch_size,
                        probabilities=probabilities, device=device)


class _RawStats:
    """What the site's scans look like before preprocessing, case by case as :meth:`SiteDataset.load` reads
    them; :meth:`fingerprint` adds the counts. No file name and no patient identifier."""

    def __init__(self) -> None:
        self.spacings: list[np.ndarray] = []
        self.shapes: list[tuple[int, ...]] = []
        self.intensities: list[np.ndarray] = []

    def add(self, loaded) -> None:
        affine = np.asarray(loaded.image.affine, dtype=np.float64)
        self.spacings.append(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        self.shapes.append(loaded.image_data.shape)
        values = loaded.image_data[loaded.image_data > loaded.image_data.mean()]  # the head, as the reader sees it
        if values.size:
            self.intensities.append(np.percentile(values, [1, 50, 99]))

    def fingerprint(self, site) -> dict[str, Any]:
        def median(rows, digits=3):
            return [round(float(v), digits) for v in np.median(np.asarray(rows), axis=0)] if rows else None

        return {
            "patients": site.num_patients,
            "skipped_cases": len(site.skipped),
            "unlisted_files_ignored": len(site.ignored),
            "slices": int(sum(len(x) for x in site.images)),
            "labelled_slices": int(sum(len(site.foreground_indices(p)) for p in range(site.num_patients))),
            "median_voxel_mm": median(self.spacings),
            "median_shape": [int(v) for v in median(self.shapes, 0)] if self.shapes else None,
            "head_intensity_percentiles_1_50_99": median(self.intensities),
            "classes_labelled": sorted(int(c) for c in site.labelled_classes),
        }


SITE_MODEL_FILES = (MODEL_FILE, CARD_JSON, CARD_MD)


def save_site_model(out: Path, params: dict, run_config: dict, card: dict, *, overwrite: bool = True) -> None:
    """Writes the site model folder ``out``; replaces only a site model fedmeta adapt wrote there, and that only
    with ``overwrite`` (``fedmeta.common.outputs``)."""
    import torch

    from fedmeta.common.outputs import Outputs

    outputs = Outputs(out, "adapt")
    outputs.claim(SITE_MODEL_FILES, overwrite=overwrite)
    payload = {"format": SITE_MODEL_FORMAT, "version": SITE_MODEL_VERSION, "params": params, "run_config": run_config}
    outputs.write(MODEL_FILE, lambda tmp: torch.save(payload, tmp))
    from fedmeta.common.outputs import file_sha256

    card["model_sha256"] = file_sha256(Path(out) / MODEL_FILE)
    outputs.write_json(CARD_JSON, card)
    outputs.write_text(CARD_MD, card_markdown(card))


def load_site_model(path: Path) -> SiteModel:
    """A site model folder written by :func:`save_site_model`, checked: card present, ``model.pt`` the file the
    card describes, weights finite and plausible and shaped like the network the run config describes."""
    import json

    import torch

    from fedmeta.common.checkpoint import check_weights
    from fedmeta.common.config import stored_run_config
    from fedmeta.common.model import initial_params, seeded_model
    from fedmeta.common.outputs import file_sha256

    path = Path(path)
    model_file, card_file = path / MODEL_FILE, path / CARD_JSON
    if not path.is_dir() or not model_file.is_file() or not card_file.is_file():
        raise FileNotFoundError(f"--model {path}: not a site model folder ({MODEL_FILE} and {CARD_JSON}); make one with "
                                "`fedmeta adapt ... --out FOLDER`, or pass a consortium checkpoint.pt.")
    try:
        card = json.loads(card_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{card_file}: not a readable model card ({err}); make the model again with fedmeta adapt.") from None
    if not isinstance(card, dict) or card.get("format") != SITE_MODEL_FORMAT:
        raise ValueError(f"{card_file}: not a fedmeta site model card; make the model again with fedmeta adapt.")
    if file_sha256(model_file) != card.get("model_sha256"):
        raise ValueError(f"{model_file}: its SHA-256 differs from the one its model card records: the weights were "
                         "altered or replaced after fedmeta adapt wrote them. Do not use it; adapt again.")
    try:
        payload = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file: name it
        raise ValueError(f"{model_file}: not readable ({type(err).__name__}); adapt again.") from None
    if not isinstance(payload, dict) or payload.get("format") != SITE_MODEL_FORMAT or "params" not in payload:
        raise ValueError(f"{model_file}: not a fedmeta site model; adapt again.")
    params, run_config = payload["params"], payload.get("run_config")
    check_weights(model_file, {"params": params})
    if not isinstance(run_config, dict):  # an empty or missing one would build the default network silently
        raise ValueError(f"{model_file}: its 'run_config' is {type(run_config).__name__}, not the mapping of run-config "
                         "keys fedmeta adapt stores; the file is damaged or was tampered with. Adapt again from the "
                         "consortium's release.")
    config = stored_run_config(run_config, str(model_file),  # before the network is built below
                               "the file is damaged or was tampered with. Adapt again from the consortium's release.")
    expected = {n: tuple(t.shape) for n, t in initial_params(seeded_model(config.model_config(), 0)).items()}
    if expected != {n: tuple(t.shape) for n, t in params.items()}:
        raise ValueError(f"{model_file}: its weights do not match the network its run config describes; adapt again.")
    if problem := card_problem(card):
        raise ValueError(f"{card_file}: {problem}; the card was damaged or edited. Make the model again with fedmeta "
                         "adapt.")
    return SiteModel(params, run_config, card, path)


def card_problem(card: dict) -> str | None:
    """What is wrong with the structure of a model card that predict reads (its ``initialisation`` and ``model``
    sections, as :func:`adapt_site` writes them), or None."""
    def text_or_none(value) -> bool:
        return value is None or isinstance(value, str)

    initialisation, model = card.get("initialisation"), card.get("model")
    if not isinstance(initialisation, dict):
        return (f"its field 'initialisation' is {'missing' if initialisation is None else type(initialisation).__name__}, "
                "not the section that says which checkpoint the model was adapted from")
    for key in ("release_id", "sha256", "algorithm"):
        if not text_or_none(initialisation.get(key)):
            return f"its field 'initialisation.{key}' is {type(initialisation[key]).__name__}, not text"
    if not isinstance(model, dict):
        return (f"its field 'model' is {'missing' if model is None else type(model).__name__}, not the section that "
                "describes the model's input and labels")
    label_names = model.get("label_names", {})
    if not (isinstance(label_names, dict) and all(isinstance(v, str) for v in label_names.values())
            and all(k.lstrip("-").isdigit() for k in label_names)):
        return "its field 'model.label_names' is not a mapping of label values to names (e.g. {\"1\": \"tumour\"})"
    return None


def _rule(algorithm: str, init, steps: int) -> str:
    """How the site model was adapted, in words for the model card."""
    step = ("Meta-SGD's learned per-parameter step sizes" if isinstance(init.inner_lr, dict)
            else f"SGD, step size {init.inner_lr:g} (the run's inner-lr)") + ("; head only (ANIL)" if init.head_only else "")
    if algorithm == "fast-weights":
        return "head generated from the support images and masks" + (f", then {step}" if steps else "")
    if algorithm == "prototypes":
        return ("class prototypes from the support masks (cosine matching)"
                + (f", after fine-tuning the encoder: {step}" if steps else ""))
    if algorithm == "lstm-optimizer":
        return f"the consortium's learned LSTM optimiser (a learned correction of {step})"
    return step


def card_markdown(card: dict) -> str:
    init, adaptation, data, dice = card["initialisation"], card["adaptation"], card["data"], card["dice"]
    release = (f"release `{init['release_id']}`, signature verified (key {str(init['signing_key_sha256'])[:16]})"
               if init["release_verified"] else "**unverified** (adapted with --allow-unsigned)")
    lines = [
        "# Site model card", "",
        f"Made {card['created']} by `fedmeta adapt`.", "",
        "## Initialisation", "",
        f"- {init['algorithm']}, round {init['round']}, SHA-256 `{init['sha256']}`",
        f"- {release}", "",
        "## Adaptation", "",
        f"- {adaptation['shots']} labelled slice(s) from {adaptation['support_patients']} patient(s), "
        f"{adaptation['steps']} step(s), seed {adaptation['seed']}",
        f"- rule: {adaptation['rule']}", f"- {adaptation['seconds']:.1f} s", "",
        "## Data (no file names, no patient identifiers)", "",
        f"- {data['patients']} usable patient(s) ({data['skipped_cases']} skipped), {data['slices']} axial slices, "
        f"{data['labelled_slices']} with a structure",
        f"- median voxel {data['median_voxel_mm']} mm, median shape {data['median_shape']}",
        f"- head intensity percentiles 1/50/99: {data['head_intensity_percentiles_1_50_99']}",
        f"- classes labelled: {data['classes_labelled']}", "",
        "## Dice on held-out patients", "",
    ]
    if dice.get("held_out_patients"):
        lines += [
            f"{card['metric']}; {dice['held_out_patients']} patient(s), classes {dice['classes']}.", "",
            "| model | mean Dice | worst patient |", "|---|---|---|",
            f"| initialisation (0 steps) | {dice['before']['dice']:.3f} | {dice['before']['worst_patient_dice']:.3f} |",
            f"| adapted ({adaptation['steps']} steps) | {dice['after']['dice']:.3f} | "
            f"{dice['after']['worst_patient_dice']:.3f} |",
        ]
    else:
        lines.append(dice.get("note", "not scored"))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# predict


def scan_paths(source: Path) -> list[Path]:
    """The scans ``--input`` names: a NIfTI file, a DICOM series folder, or a folder of NIfTI files and/or
    series folders (sorted)."""
    from fedmeta.common.dicom import is_series_folder

    source = Path(source)
    if source.is_file():
        if not source.name.endswith(SCAN_SUFFIXES):
            raise ValueError(f"--input {source}: not a NIfTI file (.nii.gz or .nii) or a DICOM series folder.")
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--input {source}: no such file or folder.")
    if is_series_folder(source):
        return [source]
    scans = sorted(p for p in source.iterdir() if not p.name.startswith(".") and (
        (p.is_file() and p.name.endswith(SCAN_SUFFIXES)) or is_series_folder(p)))
    if not scans:
        raise ValueError(f"--input {source}: holds no .nii.gz or .nii file and no DICOM series folder.")
    return scans  # two scans that would write one mask: refused by output_names, with every output kind


OUTPUT_SUFFIXES = (".nii.gz", "_overlay.png", "_probabilities.nii.gz", ".seg.dcm")


def output_names(scans: list[Path], *, probabilities: bool, overlays: bool, dicom_seg: bool) -> dict[Path, list[str]]:
    """Every file predict writes for each scan; refuses two scans whose outputs would share a name."""
    kinds = [".nii.gz"] + (["_overlay.png"] if overlays else []) + (["_probabilities.nii.gz"] if probabilities else [])
    owners: dict[str, Path] = {}
    out: dict[Path, list[str]] = {}
    for scan in scans:
        names = [case_name(scan) + kind for kind in kinds]
        if dicom_seg and scan.is_dir():
            names.append(case_name(scan) + ".seg.dcm")
        for name in names:
            key = name.casefold()  # macOS and Windows file systems ignore case: Case3 and case3 are one file
            if key in owners:
                raise ValueError(f"--input: {owners[key].name} and {scan.name} would both write {name}; rename one "
                                 "of them (or pass one channel per case).")
            owners[key] = scan
        out[scan] = names
    return out


def output_folder_problem(out: Path, inputs: Path, planned: list[str], overwrite: bool) -> str | None:
    """Why predict must not write into ``out``: it is (inside) the input, holds scans or labels it did not
    write, or already holds one of the planned files (without --overwrite). Checked before any scan is read."""
    from fedmeta.common.dicom import is_series_folder

    out, source = Path(out).resolve(), Path(inputs).resolve()
    source_dir = source.parent if source.is_file() else source
    if out == source_dir or source_dir in out.parents or out in source.parents:
        return (f"--out {out}: is the input folder or inside it (or holds it); masks named after their scans would "
                "overwrite them. Choose a folder of its own, e.g. a new 'masks' folder.")
    from fedmeta.common.outputs import OutputRefused, refuse_data_folder

    previous = _previous_outputs(out) if out.is_dir() else set()
    foreign = [p.name for p in sorted(out.iterdir())
               if p.name not in previous and (p.name.endswith(SCAN_SUFFIXES) or p.name.endswith(".dcm")
                                              or is_series_folder(p))] if out.is_dir() else []
    if foreign:
        return (f"--out {out}: already holds scans, labels or DICOM files fedmeta predict did not write "
                f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); predict never writes over a site's "
                "data. Choose an empty folder.")
    try:
        refuse_data_folder(out, "--out")
    except OutputRefused as err:
        return str(err)
    if not out.is_dir():
        return None
    links = [name for name in planned if (out / name).is_symlink()]
    if links:
        return f"--out {out}: {', '.join(links[:3])} is a symbolic link; predict writes only plain files. Remove it."
    existing = [name for name in planned if (out / name).exists()]
    if existing and not overwrite:
        return (f"--out {out}: already holds {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} from an "
                "earlier prediction; pass --overwrite to replace them, or choose another folder.")
    clash = [name for name in existing if name not in previous]
    if clash:
        return (f"--out {out}: {', '.join(clash[:3])} exists but no earlier prediction here wrote it; predict replaces "
                "only its own outputs. Move it away.")
    return None


def _previous_outputs(out: Path) -> set[str]:
    """The files an earlier prediction in ``out`` wrote: those the folder's journal records as predict's (claimed
    before the first mask was written, so a prediction killed halfway is still known), and, from releases before
    the journal, those its predictions.json lists."""
    import json

    from fedmeta.common.outputs import Outputs

    owned = Outputs(out, "predict").owned()
    try:
        listed = json.loads((out / "predictions.json").read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return owned
    return owned | {str(name) for name in listed if isinstance(name, str) and "/" not in name}


def _summary_here(out: Path) -> bool:
    """Whether ``out`` holds a predictions.json that predict wrote (its masks and outputs listed)."""
    import json

    try:
        summary = json.loads((out / "predictions.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and isinstance(summary.get("masks"), list) and "outputs" in summary


def _save_atomically(write, path: Path) -> None:
    """``write(temporary path)`` then rename onto ``path``: a crash never leaves half a mask under its name. The
    temporary file is new and exclusive (``mkstemp``): a link planted under a predictable name is never followed."""
    from fedmeta.common.outputs import write_atomically

    write_atomically(path, write, mode=None)


def _mask_header(image, dtype, num_classes: int):
    """The scan's geometry (qform, sform, units) for an output; none of its free-text fields, which converters
    fill with patient names and protocol notes."""
    header = image.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1, 0)
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        if field in header:
            header[field] = b""
    if hasattr(header, "extensions"):  # DICOM-derived NIfTI extensions (ecode 2, 6) carry whole headers
        header.extensions.clear()
    if "cal_min" in header:
        header["cal_min"], header["cal_max"] = 0, num_classes - 1 if dtype == np.uint8 else 1
    return header


def predict_scans(model_path: Path, inputs: Path, out: Path, *, public_key: Path | None = None,
                  allow_unsigned: bool = False, probabilities: bool = False, overlays: bool = True,
                  dicom_seg: bool = False, overwrite: bool = False, device: str = "auto",
                  progress=print) -> dict[str, Any]:
    """One mask per scan into ``out`` (``<case>.nii.gz``); returns a summary with the refused scans. A scan
    that cannot be segmented (bad file, too large, a failure while segmenting or writing) is refused by name,
    and the others go on."""
    from fedmeta.common.config import RunConfig
    from fedmeta.common.model import build_model

    dev = pick_device(device)
    model_path = Path(model_path)
    scans = scan_paths(inputs)
    planned = output_names(scans, probabilities=probabilities, overlays=overlays, dicom_seg=dicom_seg)
    problem = output_folder_problem(out, inputs, [n for names in planned.values() for n in names], overwrite)
    if problem:
        raise ValueError(problem)
    if model_path.is_file():  # a consortium checkpoint used as it is: the release must verify
        from fedmeta.common.adaptation import load_initialisation
        from fedmeta.common.release import verify

        release = verify(model_path, public_key, allow_unsigned=allow_unsigned)
        init, config = load_initialisation(model_path)
        if config.algorithm == "prototypes":
            raise ValueError(f"--model {model_path}: a prototypes checkpoint holds an embedding, not a segmenter: "
                             "its class prototypes come from your labelled slices. Make a site model first: "
                             "`fedmeta adapt --checkpoint ... --data YOUR_SITE --steps 0 --out MODEL`, then predict "
                             "with --model MODEL.")
        if config.algorithm == "fast-weights":
            progress(f"note: {model_path} is used as it is, its head not generated for your site (`fedmeta adapt "
                     "--steps 0` generates it from your labelled slices).")
        params = init.params
        source = {"checkpoint": str(model_path), "release_id": (release or {}).get("release_id"),
                  "release_verified": bool(release)}
        label_names: dict = {}
    else:
        site_model = load_site_model(model_path)
        config = RunConfig.from_run_config(site_model.run_config)
        params = site_model.params
        # The card's word, not a verified fact: anyone who can write the model folder can rewrite the card.
        source = {"site_model": str(model_path), "card_release_id": site_model.card["initialisation"].get("release_id"),
                  "card_authenticated": False}
        label_names = site_model.card.get("model", {}).get("label_names", {})
    out = Path(out)
    from fedmeta.common.outputs import Outputs

    # Every name this batch may write is recorded before the first is written: a re-run after a kill (SIGKILL
    # runs no `finally`, so predictions.json may never be written) knows these files are predict's own.
    journal = Outputs(out, "predict")
    journal.claim([*(n for names in planned.values() for n in names), "predictions.json"], overwrite=True,
                  recognised=_previous_outputs(out) | {"predictions.json"} if _summary_here(out) else ())
    model = build_model(config.model_config()).to(dev)
    # What the folder holds of predict's own (the journal also lists names claimed but never written).
    written, refused, notes, outputs = [], {}, {}, sorted(n for n in _previous_outputs(out) if (out / n).is_file())
    try:
        for i, scan in enumerate(scans, 1):
            began = time.perf_counter()
            try:
                entry = _predict_one(scan, out, model, params, config, label_names, dev, probabilities=probabilities,
                                     overlays=overlays, dicom_seg=dicom_seg)
            except _Refused as err:
                refused[scan.name] = str(err)
            except MemoryError:
                refused[scan.name] = f"{scan}: segmenting it ran out of memory; free memory or crop the scan."
            except Exception as err:  # noqa: BLE001 - one scan's failure never ends the batch; its type only (no data)
                refused[scan.name] = f"{scan}: segmenting or writing it failed ({type(err).__name__}); the others went on."
            if scan.name in refused:
                progress(f"[{i}/{len(scans)}] {scan.name}: refused: {refused[scan.name]}")
                continue
            journal.record(*entry["files"])
            outputs = sorted(set(outputs) | set(entry.pop("files")))
            entry["seconds"] = round(time.perf_counter() - began, 3)
            written.append(entry)
            progress(f"[{i}/{len(scans)}] {scan.name} -> {entry['case']}.nii.gz ({entry['seconds']:.1f} s)")
    finally:  # what was written is listed even when the batch is interrupted
        summary = {"model": source, "device": str(dev), "masks": written, "refused": refused, "warnings": notes,
                   "outputs": outputs}
        _save_atomically(lambda tmp: write_json(tmp, summary), out / "predictions.json")
        journal.record("predictions.json")
    return summary


def _predict_one(scan: Path, out: Path, model, params, config, label_names: dict, dev, *, probabilities: bool,
                 overlays: bool, dicom_seg: bool) -> dict[str, Any]:
    """One scan: checked, segmented, its outputs written (each atomically); raises _Refused with the reason."""
    import nibabel as nib

    from fedmeta.common.data import ras_grid, resampling_problem
    from fedmeta.common.validate import check_scan

    name = case_name(scan)
    problems, image, data = check_scan(scan, min_slices=MIN_SCAN_SLICES)  # a uniform scan is refused here
    if problems:
        raise _Refused(problems[0])
    problem = resampling_problem(scan, *ras_grid(data.shape, image.affine), config.data_config())
    if problem:
        raise _Refused(problem)
    result = segment_loaded(model, params, config, data, image.affine, dev, probabilities)
    files: list[str] = []
    try:  # a scan's outputs are all written or none stays: a refused scan leaves nothing unlisted behind
        mask_header = _mask_header(image, np.uint8, config.num_classes)
        files.append(f"{name}.nii.gz")
        _save_atomically(lambda tmp: nib.save(nib.Nifti1Image(result.mask, image.affine, mask_header), str(tmp)),
                         out / files[-1])
        if probabilities:
            prob_header = _mask_header(image, np.float32, config.num_classes)
            files.append(f"{name}_probabilities.nii.gz")
            _save_atomically(lambda tmp: nib.save(nib.Nifti1Image(result.probabilities, image.affine, prob_header),
                                                  str(tmp)), out / files[-1])
        if overlays:
            files.append(f"{name}_overlay.png")
            _save_atomically(lambda tmp: overlay_montage(data, result.mask, tmp, title=name), out / files[-1])
    except BaseException:
        for written in files:
            (out / written).unlink(missing_ok=True)
        raise
    entry: dict[str, Any] = {"case": name, "shape": list(result.mask.shape),
                             "voxels_per_class": {str(k): v for k, v in result.voxel_counts.items()}}
    if dicom_seg and scan.is_dir():
        from fedmeta.common.dicom import write_segmentation

        try:
            _save_atomically(lambda tmp: write_segmentation(scan, result.mask, tmp, num_classes=config.num_classes,
                                                            label_names=label_names), out / f"{name}.seg.dcm")
            files.append(f"{name}.seg.dcm")
            entry["dicom_seg"] = files[-1]
        except Exception as err:  # noqa: BLE001 - the series lacks what a SEG must reference; the mask stands
            entry["dicom_seg"] = (f"not written ({type(err).__name__}): the series lacks an attribute a DICOM SEG "
                                  "must reference (e.g. FrameOfReferenceUID, StudyInstanceUID)")
    return {**entry, "files": files}


class _Refused(Exception):
    """A scan the model cannot handle, with the reason."""


def overlay_montage(image: np.ndarray, mask: np.ndarray, path: Path, title: str, panels: int = 6) -> None:
    """A row of axial slices through the mask's extent with the mask over the scan, for a quick look."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    axis = int(np.argmin(image.shape)) if min(image.shape) * 2 < max(image.shape) else 2  # the through-plane axis
    has = np.flatnonzero(np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).any(axis=1))
    lo, hi = (int(has[0]), int(has[-1])) if len(has) else (0, mask.shape[axis] - 1)
    picks = np.unique(np.linspace(lo, hi, num=min(panels, hi - lo + 1)).round().astype(int))
    colours = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.5), (0.2, 0.8, 0.2, 0.5), (0.2, 0.4, 1.0, 0.5),
                              (1.0, 0.8, 0.1, 0.5), (0.8, 0.2, 0.9, 0.5)] + [(1, 1, 1, 0.5)] * 250)
    fig, axes = plt.subplots(1, len(picks), figsize=(2.4 * len(picks), 2.6), squeeze=False)
    for ax, index in zip(axes[0], picks):
        ax.imshow(np.take(image, index, axis=axis).T, cmap="gray", origin="lower")
        ax.imshow(np.take(mask, index, axis=axis).T, cmap=colours, vmin=0, vmax=255, origin="lower",
                  interpolation="nearest")
        ax.set_title(f"slice {index}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# the commands


def register(subparsers) -> None:
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
    adapt_parser.add_argument("--steps", type=int, default=10,
                              help="gradient steps (default 10; 0 writes the initialisation unadapted, to compare; "
                                   "at most 10,000, fedmeta's cap on every step count)")
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


def _release_options(parser, what: str = "the checkpoint") -> None:
    parser.add_argument("--public-key", type=Path, default=None,
                        help=f"the consortium's Ed25519 release key (PEM) that {what} must be signed with (default: "
                             "$FEDMETA_RELEASE_KEY, else release.pub in the current folder, as fedmeta provision "
                             "ships it in each site bundle)")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="use an unsigned checkpoint unverified (your own runs; never a release)")


def default_public_key(given: Path | None) -> Path | None:
    """``--public-key``; else ``$FEDMETA_RELEASE_KEY``; else ``./release.pub`` when this is a site bundle whose
    ``site.json`` (written by ``fedmeta provision``) pins that key's fingerprint. A ``release.pub`` lying in
    the current folder without that pin is not taken: it may have come with the checkpoint it would verify."""
    import json

    if given is not None:
        return given
    env = os.environ.get("FEDMETA_RELEASE_KEY")
    if env:
        return Path(env)
    bundled, site_json = Path("release.pub"), Path("site.json")
    if not bundled.is_file() or not site_json.is_file():
        return None
    from fedmeta.common.release import key_fingerprint, load_public_key

    try:
        pinned = json.loads(site_json.read_text()).get("release_key_sha256")
    except (OSError, ValueError, AttributeError):
        pinned = None
    if not pinned:
        return None
    if key_fingerprint(load_public_key(bundled)) != pinned:
        raise ValueError(f"{bundled.resolve()}: its fingerprint is not the one {site_json} pins "
                         f"({str(pinned)[:16]}...): the file was replaced. Restore the bundle's release.pub, or pass the "
                         "consortium's key with --public-key.")
    return bundled


def adapt_command(args) -> int:
    from fedmeta.client.commands import output_problem, verified_release

    try:
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out}: is a file; give a folder for the site model.")
        problem = output_problem(args.out / CARD_JSON, "--out")
        if problem:
            raise ValueError(problem)
        from fedmeta.common.outputs import Outputs

        Outputs(args.out, "adapt").check(SITE_MODEL_FILES, overwrite=args.overwrite)
        args.public_key = default_public_key(args.public_key)
        release = verified_release(args)
        card = adapt_site(args.checkpoint, args.data, args.out, shots=args.shots, steps=args.steps, seed=args.seed,
                          image_glob=args.image_glob, label_glob=args.label_glob, release=release, device=args.device,
                          overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedmeta adapt: error: {err}", file=sys.stderr)
        return 1
    dice = card["dice"]
    if dice.get("held_out_patients"):
        print(f"Dice on {dice['held_out_patients']} held-out patient(s), whole scans in their own grid: "
              f"{dice['before']['dice']:.3f} before, {dice['after']['dice']:.3f} after {args.steps} step(s) "
              f"(worst patient {dice['after']['worst_patient_dice']:.3f})")
    else:
        print(dice["note"])
    print(f"written: {args.out / MODEL_FILE}, {args.out / CARD_JSON}, {args.out / CARD_MD}")
    return 0


def predict_command(args) -> int:
    from fedmeta.client.commands import output_problem

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
                                device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedmeta predict: error: {err}", file=sys.stderr)
        return 1
    print(f"{len(summary['masks'])} mask(s) written to {args.out}; {len(summary['refused'])} scan(s) refused")
    return 1 if summary["refused"] and not summary["masks"] else 0


__all__ = ["adapt_site", "case_name", "load_site_model", "predict_scans", "register", "save_site_model"]
