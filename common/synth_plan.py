"""The plan of a synthetic federation: its presets and every drawn site and subject parameter (no image work).

Every number a site's scanner, population and raters use, and every subject's pose, warp and atrophy, is
drawn here from seeds alone (:func:`plan_federation`); :mod:`fedmeta.common.synth_render` turns them
into volumes and :mod:`fedmeta.common.synth` writes the federation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmeta.common.protocol import ROLE_HELDOUT, ROLE_TRAIN

# 1.1: label protocols beyond csf-merged, the unseen-anatomy held-out site. 2.0: the texture generation (T1
# texture through nonlinear contrast curves, deep grey nuclei, delineation protocols); presets carry their
# generation, so every preset's cache key changed, though the tissue generation renders what 1.1 rendered.
GENERATOR_VERSION = "2.0"
# tissue: one signal per tissue and sequence (a label is nearly a function of intensity; the 1.x federations);
# texture: the template's T1 texture through per-site contrast curves, labels by anatomy and delineation protocol.
GENERATIONS = ("tissue", "texture")

LABELS = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
# What a site's raters label (the label values stay the consortium's; an unlabelled class is background):
#   standard   CSF, grey matter and white matter;  csf-merged  grey and white matter (CSF is background);
#   gm-only    grey matter;  wm-only  white matter;
#   ventricles label 1 on ventricular CSF only (deep CSF enclosed by the parenchyma), no other class.
# The texture generation's delineation protocols: every one labels CSF, GM and WM, but they differ in
# what those hold. grey: "cortex+deep" (grey matter = cortex and the deep grey nuclei: caudate, putamen,
# pallidum, thalamus) or "cortex" (grey matter = the cortex; the deep nuclei are labelled 3 with the white
# matter, as non-cortical cerebral tissue); csf: "all" (ventricles, sulci, cisterns) or "ventricles" (sulcal and
# cisternal CSF are background). "ventricular-cortical" is the combination no training site uses (held out).
DELINEATION_PROTOCOLS = {
    "anatomical": {"grey": "cortex+deep", "csf": "all"},
    "cortical": {"grey": "cortex", "csf": "all"},
    "ventricular": {"grey": "cortex+deep", "csf": "ventricles"},
    "ventricular-cortical": {"grey": "cortex", "csf": "ventricles"},
}
EXTENTS = ("whole-brain", "cerebrum")  # the texture generation's annotation extent, drawn per site
LABEL_PROTOCOLS = ("standard", "csf-merged", "gm-only", "wm-only", "ventricles", *DELINEATION_PROTOCOLS)
_GREY = {"cortex+deep": "grey matter (cortex and deep grey nuclei)", "cortex": "cortical grey matter"}
_WHITE = {"cortex+deep": "white matter", "cortex": "white matter and deep grey nuclei (non-cortical cerebral tissue)"}
_CSF = {"all": "CSF (ventricles, sulci, cisterns)", "ventricles": "ventricles"}
PROTOCOL_LABELS = {
    "standard": {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"},
    "csf-merged": {0: "background (including CSF)", 2: "grey matter", 3: "white matter"},
    "gm-only": {0: "background (including CSF and white matter)", 2: "grey matter"},
    "wm-only": {0: "background (including CSF and grey matter)", 3: "white matter"},
    "ventricles": {0: "background (including sulcal CSF and brain tissue)", 1: "ventricles"},
    **{name: {0: "background" + (" (including sulcal and cisternal CSF)" if p["csf"] == "ventricles" else ""),
              1: _CSF[p["csf"]], 2: _GREY[p["grey"]], 3: _WHITE[p["grey"]]}
       for name, p in DELINEATION_PROTOCOLS.items()},
}
SEQUENCES = ("T1w", "T2w", "PD", "FLAIR")
TRAIN_SEQUENCES = ("T1w", "T2w", "PD")  # FLAIR is kept back for the unseen-sequence site
# Held-out (new-hospital) sites: a new mix of seen scanner settings; a sequence no training site has
# (FLAIR); the CSF-merged protocol; anatomy beyond every training site's range (strong atrophy and
# warps outside the training ranges: a guard against an initialisation that only learned the
# generator's usual brains); and, in the `protocols` federation, a protocol (white matter only) and a
# structure definition (ventricles only) that no training site labels.
# The texture generation's held-out protocol site (unseen-delineation) labels cortex only and the
# ventricles only: each half is some training site's, the combination none's.
HELDOUT_KINDS = ("unseen-mix", "unseen-sequence", "unseen-annotation", "unseen-anatomy")
TEXTURE_HELDOUT_KINDS = ("unseen-mix", "unseen-sequence", "unseen-delineation", "unseen-anatomy")
HELDOUT_PROTOCOLS = {"unseen-annotation": "csf-merged", "unseen-protocol": "wm-only", "unseen-structure": "ventricles",
                     "unseen-delineation": "ventricular-cortical"}

# Relative equilibrium signal of (CSF, grey matter, white matter) per sequence at 1.5 T. T1w: WM > GM > CSF;
# T2w and PD invert the GM/WM order (CSF brightest on T2w); FLAIR is T2-like with the CSF nulled.
TISSUE_SIGNAL = {
    "T1w": (0.22, 0.58, 0.86),
    "T2w": (1.00, 0.62, 0.44),
    "PD": (0.90, 0.82, 0.66),
    "FLAIR": (0.07, 0.74, 0.52),
}
# The head's tissues (the `head` preset), relative signal on the scale of TISSUE_SIGNAL: fat (subcutaneous
# and the skull's marrow; short T1, bright on every sequence here, FLAIR does not null it), muscle (scalp
# muscle and galea; darker than grey matter, dark on T2w), cortical bone (next to no signal) and skin.
HEAD_SIGNAL = {
    "T1w": {"fat": 1.02, "muscle": 0.40, "bone": 0.04, "skin": 0.55},
    "T2w": {"fat": 0.80, "muscle": 0.24, "bone": 0.04, "skin": 0.45},
    "PD": {"fat": 0.95, "muscle": 0.62, "bone": 0.05, "skin": 0.70},
    "FLAIR": {"fat": 0.78, "muscle": 0.30, "bone": 0.04, "skin": 0.50},
}
# The head's layers outward from the brain's surface, in order, and the range of a subject's mean thickness
# of each (mm): the skull's inner table, its marrow (diploe), its outer table, scalp muscle, fat, skin.
HEAD_LAYERS = (("bone", (1.5, 2.5)), ("fat", (2.0, 5.0)), ("bone", (1.0, 2.0)), ("muscle", (1.0, 4.0)),
               ("fat", (2.0, 6.0)), ("skin", (1.0, 2.0)))
HEAD_MARGIN_MM = 30.0  # the field of view's growth on every side but the inferior: room for the thickest head
HEAD_CLOSING_MM = 12.0  # the skull follows the brain's outline closed by a ball this wide, not every fold
# How the head is rendered, in a head preset's cache key (fedmeta.common.synth): 2 closes the brain's outline.
HEAD_RENDERING = 2
STORAGE_ORIENTATIONS = ("RAS", "LAS", "LPS", "RPI")  # NIfTI from different converters (FSL, DICOM, ...)
# The texture generation's iron term: relative signal change of the deep grey nuclei per sequence (iron
# shortens T2: pallidum and putamen darker on T2w and FLAIR, a little on PD, none to speak of on T1w).
DEEP_GREY_SIGNAL = {"T1w": (-0.03, 0.03), "T2w": (-0.18, -0.06), "PD": (-0.08, 0.0), "FLAIR": (-0.18, -0.06)}


@dataclass(frozen=True)
class Preset:
    """Size and ranges of one federation preset."""

    num_train_sites: int
    heldout_kinds: tuple[str, ...]
    patients: tuple[int, int]  # inclusive range of patients per site
    inplane_mm: tuple[float, float]
    slice_thickness_mm: tuple[float, float]
    fov_scale: float = 1.0  # < 1 shrinks the field of view around the brain centre (smoke volumes)
    train_sequences: tuple[str, ...] | None = None  # fixed per-site sequences; None draws them
    train_protocols: tuple[str, ...] = ("standard",)  # label protocols, cycled over the training sites
    # Lazy: generating writes the manifest only, and a site's volumes are rendered the first time it is
    # used (`SiteInfo.folder`), so a federation of a thousand sites costs what its sampled sites cost.
    lazy: bool = False
    generation: str = "tissue"  # one of GENERATIONS: how images and labels are made (fedmeta.common.synth_render)
    # The head around the brain (skull, marrow, scalp muscle and fat, skin), as a scan comes off the scanner
    # before anyone strips the skull: tissue no protocol labels, at intensities that overlap the brain's.
    # The texture generation only; it enters a preset's cache key only when set (fedmeta.common.synth).
    head: bool = False

    def __post_init__(self) -> None:
        if self.generation not in GENERATIONS:
            raise ValueError(f"generation={self.generation!r} is not known; use one of {GENERATIONS}.")
        if self.head and self.generation != "texture":
            raise ValueError("head=True needs generation='texture': the tissue generation renders the brain only.")
        unknown = [p for p in self.train_protocols if p not in PROTOCOL_LABELS]
        if unknown:
            raise ValueError(f"train_protocols {unknown} are not known; use those of PROTOCOL_LABELS.")
        texture = [p in DELINEATION_PROTOCOLS for p in self.train_protocols]
        if any(texture) != (self.generation == "texture") or not (all(texture) or not any(texture)):
            raise ValueError(f"train_protocols {self.train_protocols} do not fit generation={self.generation!r}: the "
                             f"texture generation labels with {tuple(DELINEATION_PROTOCOLS)}, the tissue generation "
                             "with the others.")


PRESETS: dict[str, Preset] = {
    # Tiny: 5 sites x 4 patients at ~2.5 mm, a few seconds. Sequences fixed so the tests can rely on a
    # T1w and a T2w training site.
    "smoke": Preset(
        num_train_sites=3,
        heldout_kinds=("unseen-sequence", "unseen-annotation"),
        patients=(4, 4),
        inplane_mm=(2.2, 2.6),
        slice_thickness_mm=(2.5, 4.0),
        train_sequences=("T1w", "T2w", "PD"),
    ),
    # The default: real T1 texture through per-site contrast curves, deep grey nuclei, and labels by anatomy
    # and delineation protocol (grey matter with or without the deep nuclei, all CSF or the ventricles
    # only), so a per-site intensity threshold does not segment it; new hospitals: a new scanner mix,
    # FLAIR, a protocol combination no training site uses (unseen-delineation), anatomy beyond the range.
    "default": Preset(
        num_train_sites=8,
        heldout_kinds=TEXTURE_HELDOUT_KINDS,
        patients=(10, 20),
        inplane_mm=(1.2, 2.0),
        slice_thickness_mm=(1.5, 5.0),
        train_protocols=("anatomical", "cortical", "ventricular"),
        generation="texture",
    ),
    # The default as it was up to generator 1.1 (the tissue generation), image for image.
    "tissue": Preset(
        num_train_sites=8,
        heldout_kinds=HELDOUT_KINDS,
        patients=(10, 20),
        inplane_mm=(1.2, 2.0),
        slice_thickness_mm=(1.5, 5.0),
    ),
    # The texture generation at smoke size: 3 training sites (one per protocol) and 2 new hospitals
    # (FLAIR; the unseen delineation) x 4 patients, for tests and quick looks.
    "smoke-anatomy": Preset(
        num_train_sites=3,
        heldout_kinds=("unseen-sequence", "unseen-delineation"),
        patients=(4, 4),
        inplane_mm=(2.2, 2.6),
        slice_thickness_mm=(2.5, 4.0),
        train_sequences=("T1w", "T2w", "PD"),
        train_protocols=("anatomical", "cortical", "ventricular"),
        generation="texture",
    ),
    # Protocol-heterogeneous consortium, where one FedAvg head is ill-posed: training sites label
    # every tissue, tissue without CSF, or grey matter only; new hospitals ask for white matter only
    # or for the ventricles (a structure no training site delineates), plus the unseen-anatomy site.
    # Volumes as in `default`, so its scanners and anatomy are a like-for-like comparison.
    "protocols": Preset(
        num_train_sites=8,
        heldout_kinds=("unseen-protocol", "unseen-structure", "unseen-anatomy"),
        patients=(10, 20),
        inplane_mm=(1.2, 2.0),
        slice_thickness_mm=(1.5, 5.0),
        train_protocols=("standard", "csf-merged", "gm-only"),
    ),
}
# The default with the head left on (no site strips the skull): the same sites, scanners, protocols and
# subjects' draws, and around each brain a skull, fatty marrow, scalp muscle, fat and skin that no protocol
# labels, at signals that overlap the brain's on every sequence (fat as bright as white matter on T1w, as grey
# matter on FLAIR; muscle between CSF and grey matter). Anatomy, not intensity, says where the brain ends, so a
# per-site intensity lookup cannot segment it; the field of view grows by the head's margin.
PRESETS["head"] = replace(PRESETS["default"], head=True)
# Scaling federations (`fedmeta perf scaling`, `fedmeta simulate --preset scale-1000`): many small
# training sites (3 patients each, smoke-sized volumes) and the smoke preset's two new hospitals, lazy:
# a site is rendered when first sampled, so generation time and disk follow the sites used.
SCALE_COUNTS = (10, 30, 100, 1000)
for _count in SCALE_COUNTS:
    PRESETS[f"scale-{_count}"] = Preset(
        num_train_sites=_count,
        heldout_kinds=("unseen-sequence", "unseen-annotation"),
        patients=(3, 3),
        inplane_mm=(2.2, 2.6),
        slice_thickness_mm=(2.5, 4.0),
        lazy=True,
    )
del _count


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def _uniform(rng: np.random.Generator, lo: float, hi: float, digits: int = 3) -> float:
    return round(float(rng.uniform(lo, hi)), digits)


def _draw_site_params(rng: np.random.Generator, preset: Preset, sequence: str, kind: str | None,
                      protocol: str = "standard") -> dict[str, Any]:
    """Scanner, population and annotation parameters of one site (all plain JSON values)."""
    field_t = float(rng.choice([1.5, 3.0]))
    jitter = rng.uniform(0.92, 1.08, size=3)  # vendor/coil differences in relative tissue signal
    signal = np.asarray(TISSUE_SIGNAL[sequence]) * jitter
    if field_t == 3.0:
        # Longitudinal relaxation times converge at 3 T, so the GM/WM contrast shrinks a little.
        mid = (signal[1] + signal[2]) / 2
        signal[1:] = mid + 0.85 * (signal[1:] - mid)
    slice_axis = str(rng.choice(["axial", "axial", "axial", "coronal", "sagittal"]))
    artefact = str(rng.choice(["none", "none", "gibbs", "motion"]))
    snr_lo, snr_hi = (10.0, 28.0) if field_t == 1.5 else (18.0, 40.0)
    bias_lo, bias_hi = (0.05, 0.2) if field_t == 1.5 else (0.15, 0.4)
    params: dict[str, Any] = {
        "scanner": {
            "field_strength_t": field_t,
            "sequence": sequence,
            "tissue_signal": {"csf": round(float(signal[0]), 4), "grey_matter": round(float(signal[1]), 4),
                              "white_matter": round(float(signal[2]), 4)},
            "inplane_mm": _uniform(rng, *preset.inplane_mm, digits=2),
            "slice_thickness_mm": _uniform(rng, *preset.slice_thickness_mm, digits=2),
            "slice_axis": slice_axis,
            "storage_orientation": str(rng.choice(STORAGE_ORIENTATIONS)),
            "bias_strength": _uniform(rng, bias_lo, bias_hi),
            "snr": _uniform(rng, snr_lo, snr_hi, digits=1),
            "gain": _uniform(rng, 0.75, 1.35),
            "gamma": _uniform(rng, 0.8, 1.25),
            "bits": 12,
            "artefact": artefact,
            "gibbs_kspace_fraction": _uniform(rng, 0.35, 0.6) if artefact == "gibbs" else None,
            "ghost_amplitude": _uniform(rng, 0.04, 0.12) if artefact == "motion" else None,
            # Coverage: some sites stop above the cerebellum; the top of the head is always in view.
            "fov_inferior_mm": _uniform(rng, -76.0, -35.0, digits=1),
        },
        "population": {
            "atrophy_mean": _uniform(rng, 0.0, 0.25),
            "atrophy_sd": 0.05,
        },
        "annotation": {
            "protocol": "standard",
            "threshold": _uniform(rng, 0.4, 0.6),
            "gm_bias_voxels": int(rng.choice([-1, 0, 1])),  # one-voxel erosion (-1) / dilation (+1) of GM
            "label_noise": _uniform(rng, 0.0, 0.05),  # share of boundary voxels given a neighbour's label
        },
    }
    params["annotation"]["protocol"] = HELDOUT_PROTOCOLS.get(kind or "", protocol)
    if kind == "unseen-anatomy":
        # Beyond the training range on purpose: training sites draw atrophy means 0-0.25 and subjects
        # clipped at 0.4, scale 0.92-1.08, rotation +-10 deg, elastic 1.5-4 mm (see _draw_subject_params).
        params["population"] = {"atrophy_mean": _uniform(rng, 0.45, 0.55), "atrophy_sd": 0.05,
                                "anatomy": "beyond-training-range"}
    if preset.generation == "texture":  # drawn after every tissue-generation draw, which stay as they were
        params["generation"] = "texture"
        params["scanner"].update(
            # Where the contrast curve passes between CSF and GM and between GM and WM: a share of half the
            # step above (+) or below (-) the straight line (fedmeta.common.synth_render.contrast_curve).
            contrast_warp=[_uniform(rng, -0.6, 0.6), _uniform(rng, -0.6, 0.6)],
            deep_grey_signal=_uniform(rng, *DEEP_GREY_SIGNAL[sequence]),
            texture_amplitude=_uniform(rng, 0.03, 0.07),  # the subject texture field's relative T1 change
        )
        # What the raters delineate: the whole brain, or the cerebrum only (cerebellum and brainstem left
        # background, as cortical and cerebral protocols do): anatomy, not intensity, draws that line.
        params["annotation"]["extent"] = str(rng.choice(EXTENTS))
    return params


def _draw_subject_params(rng: np.random.Generator, site_params: dict[str, Any]) -> dict[str, Any]:
    subject = _draw_subject_anatomy(rng, site_params)
    if site_params.get("generation") == "texture":  # after the tissue generation's draws, which stay as they were
        subject["texture_seed"] = int(rng.integers(0, 2**31 - 1))
    return subject


def _draw_subject_anatomy(rng: np.random.Generator, site_params: dict[str, Any]) -> dict[str, Any]:
    population = site_params["population"]
    if population.get("anatomy") == "beyond-training-range":
        return _draw_unseen_anatomy(rng, population)
    atrophy = float(np.clip(rng.normal(population["atrophy_mean"], population["atrophy_sd"]), 0.0, 0.4))
    return {
        "rotation_deg": [round(float(v), 2) for v in rng.uniform(-10.0, 10.0, size=3)],
        "scale": [round(float(v), 4) for v in rng.uniform(0.92, 1.08, size=3)],
        "translation_mm": [round(float(v), 2) for v in rng.uniform(-4.0, 4.0, size=3)],
        "elastic_amplitude_mm": _uniform(rng, 1.5, 4.0, digits=2),
        "elastic_seed": int(rng.integers(0, 2**31 - 1)),
        "atrophy": round(atrophy, 4),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _draw_unseen_anatomy(rng: np.random.Generator, population: dict[str, Any]) -> dict[str, Any]:
    """A subject outside every training range: enlarged ventricles and thin cortex (atrophy 0.45-0.6),
    head size 10-16 % off the template (training: within 8 %), rotation 12-20 deg, elastic 5-7 mm."""
    atrophy = float(np.clip(rng.normal(population["atrophy_mean"], population["atrophy_sd"]), 0.45, 0.6))
    side = rng.choice([-1.0, 1.0], size=3)
    return {
        "rotation_deg": [round(float(v), 2) for v in rng.choice([-1.0, 1.0], size=3) * rng.uniform(12.0, 20.0, size=3)],
        "scale": [round(float(v), 4) for v in 1.0 + side * rng.uniform(0.10, 0.16, size=3)],
        "translation_mm": [round(float(v), 2) for v in rng.uniform(-4.0, 4.0, size=3)],
        "elastic_amplitude_mm": _uniform(rng, 5.0, 7.0, digits=2),
        "elastic_seed": int(rng.integers(0, 2**31 - 1)),
        "atrophy": round(atrophy, 4),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _draw_head_signal(rng: np.random.Generator, sequence: str) -> dict[str, float]:
    """The site's signal of each head tissue: HEAD_SIGNAL's for its sequence, with the vendor/coil jitter."""
    return {tissue: round(value * float(rng.uniform(0.9, 1.1)), 4) for tissue, value in HEAD_SIGNAL[sequence].items()}


def _draw_head_subject(rng: np.random.Generator) -> dict[str, Any]:
    """A subject's head: each layer's mean thickness (mm, HEAD_LAYERS' order) and the seed of the smooth
    field that thickens and thins it by up to a third over the head."""
    return {"layers_mm": [_uniform(rng, lo, hi, digits=2) for _, (lo, hi) in HEAD_LAYERS],
            "thickness_seed": int(rng.integers(0, 2**31 - 1))}


def plan_federation(preset: str, seed: int) -> list[dict[str, Any]]:
    """Every site's name, role, kind and parameters, and its subjects' parameters (no image work)."""
    spec = _preset(preset)
    plan: list[dict[str, Any]] = []
    rng = _rng(seed, 0)
    if spec.train_sequences is not None:
        sequences = list(spec.train_sequences)
    else:
        # Every training sequence appears at least twice; the order is seeded.
        pool = [TRAIN_SEQUENCES[i % len(TRAIN_SEQUENCES)] for i in range(spec.num_train_sites)]
        sequences = [str(s) for s in rng.permutation(pool)]
    entries: list[tuple[str, str, str | None, str]] = []
    width = max(2, len(str(len(sequences))))  # site-0001 .. site-1000: names sort in site order
    for i, sequence in enumerate(sequences):
        entries.append((f"site-{i + 1:0{width}d}", ROLE_TRAIN, None, sequence))
    # Protocols are assigned in site order, after every draw, so a federation whose training sites all
    # label the standard way draws exactly what it drew before protocols existed.
    protocols = [spec.train_protocols[i % len(spec.train_protocols)] for i in range(len(sequences))]
    for kind in spec.heldout_kinds:
        if kind == "unseen-sequence":
            sequence = "FLAIR"
        else:
            sequence = str(rng.choice(TRAIN_SEQUENCES))
        entries.append((f"new-{kind.removeprefix('unseen-')}", ROLE_HELDOUT, kind, sequence))
    for index, (name, role, kind, sequence) in enumerate(entries, start=1):
        site_rng = _rng(seed, 1, index)
        params = _draw_site_params(site_rng, spec, sequence, kind,
                                   protocols[index - 1] if role == ROLE_TRAIN else spec.train_protocols[0])
        num_patients = int(site_rng.integers(spec.patients[0], spec.patients[1] + 1))
        subjects = []
        if spec.head:  # its own stream: every other draw stays the one the preset without a head makes
            params["scanner"]["head"] = _draw_head_signal(_rng(seed, 3, index), sequence)
        for p in range(num_patients):
            subject = _draw_subject_params(_rng(seed, 2, index, p), params)
            if spec.head:
                subject["head"] = _draw_head_subject(_rng(seed, 4, index, p))
            subjects.append({"id": f"{name}_{p:03d}", **subject})
        plan.append({"name": name, "role": role, "heldout_kind": kind, "num_patients": num_patients,
                     "params": params, "subjects": subjects, "fov_scale": spec.fov_scale,
                     "generation": spec.generation})
    return plan


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]

