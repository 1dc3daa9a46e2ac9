"""A site model on disk: θ adapted to one hospital, and its model card (Mitchell et al. 2019, "Model Cards for
Model Reporting").

A site model is a folder::

    MODEL/model.pt          θ adapted (weights only) and the run config that describes the network
    MODEL/model-card.json   what it is: init digest and round, release id, shots, steps (and, with --steps
                            auto, the count asked for and how it was chosen: ``step_choice``), the data's
                            fingerprint (counts, spacing, intensity statistics: no file name, no patient id),
                            Dice before and after adaptation on the held-out patients
    MODEL/model-card.md     the same, for people

``fedmeta adapt`` writes it (:func:`save_site_model`); ``fedmeta predict`` reads it back checked
(:func:`load_site_model`): a ``model.pt`` that no longer has the SHA-256 its card records, or a card or
weights that do not match, is refused (the same weight checks as every checkpoint loader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmeta.common.checkpoint import check_weights
from fedmeta.common.config import stored_run_config
from fedmeta.common.model import initial_params, seeded_model
from fedmeta.common.outputs import Outputs, file_sha256

MODEL_FILE, CARD_JSON, CARD_MD = "model.pt", "model-card.json", "model-card.md"
SITE_MODEL_FILES = (MODEL_FILE, CARD_JSON, CARD_MD)
SITE_MODEL_FORMAT = "fedmeta-site-model"
SITE_MODEL_VERSION = 1


@dataclass
class SiteModel:
    params: dict  # name -> tensor
    run_config: dict
    card: dict
    path: Path


def save_site_model(out: Path, params: dict, run_config: dict, card: dict, *, overwrite: bool = True) -> None:
    """Writes the site model folder ``out``; replaces only a site model fedmeta adapt wrote there, and that only
    with ``overwrite`` (``fedmeta.common.outputs``)."""
    outputs = Outputs(out, "adapt")
    outputs.claim(SITE_MODEL_FILES, overwrite=overwrite)
    payload = {"format": SITE_MODEL_FORMAT, "version": SITE_MODEL_VERSION, "params": params, "run_config": run_config}
    outputs.write(MODEL_FILE, lambda tmp: torch.save(payload, tmp))
    card["model_sha256"] = file_sha256(Path(out) / MODEL_FILE)
    outputs.write_json(CARD_JSON, card)
    outputs.write_text(CARD_MD, card_markdown(card))


def load_site_model(path: Path) -> SiteModel:
    """A site model folder written by :func:`save_site_model`, checked: card present, ``model.pt`` the file the
    card describes, weights finite and plausible and shaped like the network the run config describes."""
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
    sections, as ``fedmeta.client.adapt.adapt_site`` writes them), or None."""
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


def card_markdown(card: dict) -> str:
    """The model card for people: ``model-card.md``."""
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
        f"- rule: {adaptation['rule']}",
        *([f"- variant: {adaptation['variant']}"] if adaptation.get("variant") else []),  # cards before variants: none
        *([f"- steps chosen (--steps auto): {adaptation['step_choice']['reason']}"]
          if adaptation.get("step_choice") else []),  # a card written before steps auto has no step_choice
        f"- {adaptation['seconds']:.1f} s", "",
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


__all__ = ["CARD_JSON", "CARD_MD", "MODEL_FILE", "SITE_MODEL_FILES", "SITE_MODEL_FORMAT", "SITE_MODEL_VERSION",
           "SiteModel", "card_markdown", "card_problem", "load_site_model", "save_site_model"]
