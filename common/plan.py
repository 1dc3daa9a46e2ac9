"""The federation's plan: merge the sites' fingerprints into the run-config values a run trains with, with reasons.

Each choice follows nnU-Net's experiment planning (Isensee et al., Nature Methods 2021), over sites' aggregates
instead of a pooled dataset: target spacing as the median spacing (sites weighted by their cases), 2D when the
spacing is anisotropic (max/min > 3), an image size that holds the median field of view, the CT window as the
0.5 / 99.5 percentiles of foreground HU and the CT mean/std of foreground voxels, exact from the merged 1-HU
histograms. fedmeta trains 2D axial slices only; the plan says so where nnU-Net would choose 3D.

:func:`merge_fingerprints` proposes, :func:`write_plan` writes ``plan.json`` (every choice with its reason) and
``run-config.toml`` (the flat run-config keys, a ``fedmeta simulate --preset`` file) with ``plan-sha256``, the
SHA-256 of plan.json's bytes, which puts the plan in the run's trajectory hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common.config_sections import MAX_IMAGE_SIZE, MAX_MODEL_LEVELS, SPACING_MM_RANGE
from fedmeta.common.data import channel_kind
from fedmeta.common.fingerprint import HU_BINS, HU_HIGH, HU_LOW, QUANTILES, check_fingerprint

PLAN_FORMAT = "fedmeta-plan"
PLAN_VERSION = 1
PLAN_FILE, RUN_CONFIG_FILE = "plan.json", "run-config.toml"
ANISOTROPY = 3.0  # nnU-Net's threshold: a spacing ratio above it makes the coarse axis a poor third dimension
CT_PERCENTILES = (0.5, 99.5)
MIN_SITE_CASES = 2  # an episode's support and query come from different patients
# A CT site's foreground whose 0.5 / 99.5 % quantiles lie this close together, or both in [0, this range], was not
# exported in Hounsfield units (a normalised or 0..1 export): tissue under a label spans tens to hundreds of HU.
NOT_HU_SPREAD, NOT_HU_UNIT_RANGE = 5.0, 1.5
CROP_NOTE = 1.25  # a site whose field of view exceeds the image's side by more than this is said to be cropped
RUN_CONFIG_KEYS = ("image-size", "spacing-mm", "slice-spacing-mm", "in-channels", "channels", "num-classes",
                   "ct-clip-low", "ct-clip-high", "ct-mean", "ct-std")
CHOICES = ("channels", "spacing", "image-size", "ct-window", "ct-normalisation", "labels")  # in the order shown


def weighted_median(values: list[float], weights: list[int]) -> float:
    """The median of ``values`` each repeated ``weights`` times (sites weighted by cases), as ``np.median`` of the
    repeated values: where the cumulative weight sits exactly at half the total, the mean of the values either side
    (two equal sites of 32 and 96 mm give 64 mm, not the lower 32); values of weight 0 take no part."""
    kept = [(float(v), float(w)) for v, w in zip(values, weights) if w > 0]
    if not kept:
        raise ValueError(f"weighted_median: weights {list(weights)!r} hold no positive weight; give each value its "
                         "site's cases (at least 1).")
    kept.sort(key=lambda pair: pair[0])
    ordered = np.asarray([v for v, _ in kept])
    cumulative = np.cumsum([w for _, w in kept])
    half = cumulative[-1] / 2
    index = int(np.searchsorted(cumulative, half))  # the first value whose cumulative weight reaches half
    if cumulative[index] == half and index + 1 < len(ordered):  # exact with integer weights: halves are exact floats
        return float((ordered[index] + ordered[index + 1]) / 2)
    return float(ordered[index])


def min_image_size(model_levels: int) -> int:
    """The least image size a UNet of ``model_levels`` levels takes: it halves a slice ``model_levels - 1`` times,
    and instance norm needs at least 2 pixels a side at the deepest level (1 pixel has no variance to normalise)."""
    return 2 * 2 ** (model_levels - 1)


def check_image_budget(max_image_size: Any, model_levels: Any) -> int:
    """``2 ** (model_levels - 1)``, the multiple an image size must be, once ``model_levels`` (--model-levels) and
    ``max_image_size`` (--max-image-size) are valid; a ValueError naming the value, the range and a fix otherwise.
    Cheap: `fedmeta plan` calls it before reading any site, :func:`merge_fingerprints` again."""
    if isinstance(model_levels, bool) or not isinstance(model_levels, int) or not 2 <= model_levels <= MAX_MODEL_LEVELS:
        raise ValueError(f"model_levels (--model-levels) {model_levels!r}: must be an integer in "
                         f"[2, {MAX_MODEL_LEVELS}], as the run config's model-levels. Fix: e.g. --model-levels 4.")
    factor = 2 ** (model_levels - 1)
    least = min_image_size(model_levels)
    if isinstance(max_image_size, bool) or not isinstance(max_image_size, int) or max_image_size < least \
            or max_image_size % factor or max_image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"max_image_size (--max-image-size) {max_image_size!r}: must be a multiple of {factor} "
                         f"(2^(model-levels - 1) for model-levels={model_levels}) from {least} to {MAX_IMAGE_SIZE}: "
                         f"the UNet halves a slice {model_levels - 1} times and instance norm needs at least 2 pixels "
                         f"a side at its deepest level, so {least} is the least. Fix: e.g. --max-image-size "
                         f"{max(least, 256)}.")
    return factor


def site_problem(site: str, report: dict[str, Any]) -> str | None:
    """Why the site of this (checked) fingerprint cannot take part in a federation, or None: fewer than
    :data:`MIN_SITE_CASES` usable cases, or a CT channel whose values are not Hounsfield units (which the
    federation's window would clip as if they were, and which would pull that window for every site)."""
    if report["cases"] < MIN_SITE_CASES:
        return (f"site {site}: only {report['cases']} usable case(s) ({report['cases-skipped']} skipped); support and "
                f"query come from different patients, so a site needs at least {MIN_SITE_CASES}. Fix: add patients, "
                "or repair the skipped cases (`fedmeta check-data` on the site's folder names them).")
    low_q, high_q = QUANTILES.index(CT_PERCENTILES[0]), QUANTILES.index(CT_PERCENTILES[1])
    for index, stats in enumerate(report["intensity"]):
        if stats["kind"] != "ct":
            continue
        low, high = stats["quantiles"][low_q], stats["quantiles"][high_q]
        spread = (f"its foreground's {CT_PERCENTILES[0]:g} and {CT_PERCENTILES[1]:g} % quantiles are {low:g} and "
                  f"{high:g}")
        if stats["fraction-outside-hu-range"] >= 1.0:
            why = f"every voxel lies outside the [{HU_LOW}, {HU_HIGH}] HU a CT holds"
        elif 0.0 <= low and high <= NOT_HU_UNIT_RANGE:
            why = f"{spread}, within [0, {NOT_HU_UNIT_RANGE:g}]: values scaled to 0..1, not HU"
        elif high - low <= NOT_HU_SPREAD:
            why = f"{spread}, within {NOT_HU_SPREAD:g} HU of each other, where tissue spans tens to hundreds of HU"
        else:
            continue
        channel = report["channels"][index] if report["channels"] else "(one undeclared)"
        return (f"site {site}: its CT channel {channel!r} does not hold Hounsfield units: {why}. The federation's CT "
                "window would clip and normalise it as HU, and pull that window for the other sites. Fix: re-export "
                "the site's CT in HU (the scanner's values, its rescale slope and intercept applied); `fedmeta "
                "check-data` on the site's folder names the files.")
    return None


def histogram_percentile(counts: np.ndarray, percent: float) -> float:
    """``np.percentile`` (linear interpolation) of the voxels a 1-HU histogram counts, without expanding them."""
    total = int(counts.sum())
    position = percent / 100 * (total - 1)
    below = math.floor(position)
    cumulative = np.cumsum(counts)

    def value(rank: int) -> float:  # the HU of the rank-th smallest voxel (0-based)
        return float(HU_LOW + np.searchsorted(cumulative, rank, side="right"))

    low = value(below)
    return low + (position - below) * (value(min(below + 1, total - 1)) - low)


def histogram_moments(counts: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Mean and std of the histogram's voxels clipped to [low, high], as the model sees them after the window."""
    hu = np.clip(np.arange(HU_LOW, HU_HIGH + 1, dtype=np.float64), low, high)
    total = counts.sum()
    mean = float((counts * hu).sum() / total)
    return mean, float(math.sqrt(max(0.0, float((counts * (hu - mean) ** 2).sum() / total))))


def _round_up(pixels: float, multiple: int) -> int:
    """``pixels`` rounded up to a multiple of ``multiple``; a thousandth of a pixel over (a header's float32 voxel
    size, 0.800000012 mm) does not add a whole multiple."""
    return max(multiple, math.ceil(round(pixels, 3) / multiple) * multiple)


def merge_fingerprints(reports: dict[str, dict[str, Any]], *, max_image_size: int = 256,
                       model_levels: int = 4) -> dict[str, Any]:
    """The plan for the sites' fingerprints (``reports``: site name -> fingerprint, each checked again here).

    ``max_image_size``: the budget, pixels a side of a 2D slice, a multiple of ``2 ** (model_levels - 1)``; a
    field of view that needs more coarsens the in-plane spacing. Returns ``{"format", "version", "sites",
    "choices": {name: {"value", "reason"}}, "run-config"}``; a ValueError naming the value or the sites when the
    budget is out of range (:func:`check_image_budget`), a site cannot take part (:func:`site_problem`) or the sites
    cannot train one model (different channels).
    """
    if not reports:
        raise ValueError("no site fingerprint to plan from; pass at least one site.")
    check_image_budget(max_image_size, model_levels)
    checked = {}
    for site, report in reports.items():
        try:
            checked[site] = check_fingerprint(report)
        except ValueError as err:
            raise ValueError(f"site {site}: its fingerprint is refused: {err}") from None
        problem = site_problem(site, checked[site])
        if problem:
            raise ValueError(problem)
    choices: dict[str, dict[str, Any]] = {}
    names = _channels(checked, choices)
    spacing, slice_spacing = _spacing(checked, choices)
    spacing, image_size = _image_size(checked, spacing, max_image_size, model_levels, choices)
    ct = _ct(checked, choices)
    num_classes = _labels(checked, choices)
    run_config = {
        "image-size": image_size, "spacing-mm": spacing, "slice-spacing-mm": slice_spacing,
        "in-channels": max(1, len(names)), "channels": ",".join(names), "num-classes": num_classes, **ct,
    }
    # a header's float32 voxel size (0.800000012) to the micrometre: the plan is read by people
    sites = {site: {"cases": r["cases"], "channels": r["channels"], "labels": r["labels"],
                    "median-spacing-mm": [round(v, 4) for v in r["spacing-mm"]["median"]],
                    "median-field-of-view-mm": [round(v, 2) for v in r["field-of-view-mm"]]}
             for site, r in checked.items()}
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "sites": sites, "choices": choices,
            "run-config": run_config}


def _channels(reports: dict[str, dict[str, Any]], choices: dict[str, Any]) -> list[str]:
    """The channel names the model reads, in the first site's order; refuses sites with different channel sets.
    One-channel sites that name their channel differently (T1 here, T2 there: the brain federations) train one
    model on "any one channel", as the run config's channels = "" says."""
    declared = {site: r["channels"] for site, r in reports.items()}
    first_site, first = next(iter(declared.items()))
    lowered = {site: [n.lower() for n in names] for site, names in declared.items()}  # as the reader matches them
    if all(set(names) == set(lowered[first_site]) for names in lowered.values()):
        kinds = ", ".join(f"{n} ({channel_kind(n)})" for n in first) or "one undeclared channel (mr)"
        others = [site for site, names in lowered.items() if names != lowered[first_site]]
        order = f"; {', '.join(others)} stack theirs in this order" if others else ""
        choices["channels"] = {"value": list(first), "reason": (
            f"every site declares {kinds}; the model reads them in {first_site}'s order{order}. CT channels are "
            "clipped and normalised with the federation's values below, MR channels z-scored per image.")}
        bad = [n for n in first if "," in n]
        if bad:
            raise ValueError(f"channel name {bad[0]!r} (site {first_site}'s dataset.json) holds a comma, which the run "
                             "config's comma-separated channels cannot carry. Fix: rename the channel in every site's "
                             "dataset.json.")
        return list(first)
    if all(len(names) <= 1 for names in declared.values()):
        named = ", ".join(f"{site}: {names[0] if names else '(undeclared)'}" for site, names in declared.items())
        choices["channels"] = {"value": [], "reason": (
            f"each site has one channel, named differently ({named}): the model reads any one channel "
            "(channels = \"\"), each normalised by its own kind (CT with the window below, MR z-scored per image).")}
        return []
    listing = "; ".join(f"{site}: {', '.join(names) or '(one undeclared)'}" for site, names in declared.items())
    raise ValueError(f"the sites declare different channel sets ({listing}); one model reads one set of input "
                     "channels. Fix: plan the sites that share channels as one federation, or write the missing "
                     "channels (or drop the extra ones) in the others' images and dataset.json.")


def _spacing(reports: dict[str, dict[str, Any]], choices: dict[str, Any]) -> tuple[float, float]:
    """(in-plane spacing, slice spacing) in mm: sites' median spacings, their median weighted by cases."""
    cases = [r["cases"] for r in reports.values()]
    medians = [r["spacing-mm"]["median"] for r in reports.values()]  # R, A, S
    target = [weighted_median([m[axis] for m in medians], cases) for axis in range(3)]
    in_plane = weighted_median([m[axis] for m in medians for axis in (0, 1)], [c for c in cases for _ in (0, 1)])
    slice_spacing = target[2]
    ratio = max(target) / min(target)
    coarse = "RAS"[int(np.argmax(target))]
    low, high = SPACING_MM_RANGE
    clamped = [round(min(max(v, low), high), 4) for v in (in_plane, slice_spacing)]
    # Said only when a spacing was below the minimum, not when rounding to 4 decimals lifted a float32 0.7 a hair.
    note = f" (raised to fedmeta's {low:g} mm minimum)" if min(in_plane, slice_spacing) < low else ""
    shown = "x".join(f"{v:.3g}" for v in target)
    if ratio > ANISOTROPY:
        dims = (f"anisotropic: the coarsest axis ({coarse}) is {ratio:.1f}x the finest (> {ANISOTROPY:g}), so nnU-Net "
                "would also train 2D")
        if coarse != "S":
            dims += "; but the coarse axis is not S, and fedmeta slices axially (an in-plane axis is resampled coarse)"
    else:
        dims = (f"near-isotropic (max/min {ratio:.1f} <= {ANISOTROPY:g}): nnU-Net would train 3D; fedmeta trains 2D "
                "axial slices only")
    choices["spacing"] = {"value": {"in-plane-mm": clamped[0], "slice-mm": clamped[1], "dimensions": "2d"},
                          "reason": (f"median spacing over sites weighted by cases {shown} mm (R x A x S); in-plane "
                                     f"{clamped[0]:g} mm (the median R/A spacing), slices {clamped[1]:g} mm{note}; "
                                     f"{dims}.")}
    return clamped[0], clamped[1]


def _image_size(reports: dict[str, dict[str, Any]], spacing: float, budget: int, model_levels: int,
                choices: dict[str, Any]) -> tuple[float, int]:
    """(in-plane spacing, image size): the median in-plane field of view at ``spacing``, rounded up to a multiple
    of ``2 ** (model_levels - 1)`` and at least :func:`min_image_size`; over ``budget``, the spacing is coarsened
    until it fits. The reason names each site whose field of view the image crops by more than a quarter."""
    factor, least = 2 ** (model_levels - 1), min_image_size(model_levels)
    cases = [r["cases"] for r in reports.values()]
    fov = max(weighted_median([r["field-of-view-mm"][axis] for r in reports.values()], cases) for axis in (0, 1))
    size = _round_up(fov / spacing, factor)
    reason = (f"the median in-plane field of view {fov:.1f} mm at {spacing:g} mm is {fov / spacing:.0f} pixels, "
              f"rounded up to a multiple of {factor} (the UNet halves it {model_levels - 1} times)")
    if size > budget:
        # 4 decimals, rounded up so the field of view fits the budget (but not for a float32 header's last bit)
        coarse = math.ceil(round(fov / budget * 1e4, 3)) / 1e4
        coarse = min(max(coarse, spacing), SPACING_MM_RANGE[1])
        reason += (f": {size}, above the budget of {budget}, so the in-plane spacing is coarsened from {spacing:g} to "
                   f"{coarse:g} mm")
        spacing, size = coarse, min(budget, _round_up(fov / coarse, factor))
        choices["spacing"]["value"]["in-plane-mm"] = spacing
        choices["spacing"]["reason"] += f" In-plane coarsened to {spacing:g} mm to fit the image-size budget."
    if size < least:  # a tiny field of view (0.02 mm voxels, a 32-voxel scan) would leave the deepest level 1 pixel
        reason += (f": {size}, raised to {least}, the least the UNet takes (instance norm needs 2 pixels a side after "
                   f"{model_levels - 1} halvings)")
        size = least
    side = size * spacing
    reason += f"; image-size {size} ({side:.1f} mm a side)."
    cropped = {site: max(r["field-of-view-mm"][:2]) for site, r in reports.items()
               if max(r["field-of-view-mm"][:2]) > CROP_NOTE * side}
    if cropped:
        listing = ", ".join(f"{site} {mm:.1f} mm ({(mm / side - 1) * 100:.0f} % more)" for site, mm in cropped.items())
        reason += (f" Cropped: the median in-plane field of view of {listing} exceeds the image's {side:.1f} mm side "
                   f"by more than {(CROP_NOTE - 1) * 100:.0f} %: their slices are cropped around the foreground, "
                   "and the model never sees the anatomy beyond. If that matters, plan sites of similar fields of "
                   "view as one federation.")
    choices["image-size"] = {"value": size, "reason": reason}
    return spacing, size


def _ct(reports: dict[str, dict[str, Any]], choices: dict[str, Any]) -> dict[str, float]:
    """The CT window and normalisation from the CT sites' merged histograms; the run config's defaults without CT."""
    merged = np.zeros(HU_BINS, dtype=np.int64)
    ct_sites = []
    for site, report in reports.items():
        for stats in report["intensity"]:
            if stats["kind"] == "ct":
                merged += np.asarray(stats["hu-histogram"], dtype=np.int64)
                ct_sites.append(site)
    if not ct_sites:
        choices["ct-window"] = {"value": [float(HU_LOW), float(HU_HIGH)],
                                "reason": "no site has a CT channel: the run config's default window, unused."}
        choices["ct-normalisation"] = {"value": {"mean": 0.0, "std": 0.0},
                                       "reason": "no site has a CT channel: ct-std 0 (no federation-wide CT values)."}
        return {"ct-clip-low": float(HU_LOW), "ct-clip-high": float(HU_HIGH), "ct-mean": 0.0, "ct-std": 0.0}
    low, high = (round(histogram_percentile(merged, p), 1) for p in CT_PERCENTILES)
    mean, std = histogram_moments(merged, low, high)
    mean, std = round(mean, 3), round(std, 3)
    named = ", ".join(dict.fromkeys(ct_sites))
    where = f"{int(merged.sum()):,} foreground voxels of {len(set(ct_sites))} CT site(s) ({named})"
    choices["ct-window"] = {"value": [low, high], "reason": (
        f"the {CT_PERCENTILES[0]:g} / {CT_PERCENTILES[1]:g} percentiles of foreground HU over the {where}, from their "
        f"merged 1-HU histograms (nnU-Net's CT window): [{low:g}, {high:g}] HU.")}
    choices["ct-normalisation"] = {"value": {"mean": mean, "std": std}, "reason": (
        f"mean {mean:g} and std {std:g} HU of the same voxels clipped to the window, exact from the histograms; every "
        "CT channel is clipped, then (x - mean) / std.")}
    if std <= 0:
        raise ValueError(f"the CT sites ({named}) have one foreground HU value only "
                         f"({mean:g}), so no CT normalisation can be planned. Fix: check their labels and images with "
                         "fedmeta check-data.")
    return {"ct-clip-low": low, "ct-clip-high": high, "ct-mean": mean, "ct-std": std}


def _labels(reports: dict[str, dict[str, Any]], choices: dict[str, Any]) -> int:
    """num-classes = the largest label value + 1; the label map value -> {site: name} and what each site annotates."""
    by_value: dict[int, dict[str, str]] = {}
    annotates: dict[str, dict[str, str]] = {}
    absent: dict[str, list[int]] = {}
    for site, report in reports.items():
        declared = report["labels"] or {value: f"label {value}" for value in report["label-fractions"]}
        annotates[site] = {}
        for key, name in sorted(declared.items(), key=lambda item: int(item[0])):
            value = int(key)
            by_value.setdefault(value, {})[site] = name
            fraction = report["label-fractions"].get(key, {}).get("case-fraction", 0.0)
            if value > 0 and fraction > 0:
                annotates[site][key] = name
            elif value > 0:
                absent.setdefault(site, []).append(value)
    num_classes = max(2, max(by_value) + 1)
    differ = [value for value, names in sorted(by_value.items())
              if value > 0 and len({n.strip().lower() for n in names.values()}) > 1]
    notes = []
    if differ:
        value = differ[0]
        meanings = ", ".join(f"{name!r} at {site}" for site, name in by_value[value].items())
        notes.append(f"value {value} means {meanings}" + (f" (and {len(differ) - 1} more value(s) differ)"
                                                          if len(differ) > 1 else "")
                     + ": each site is trained and scored in its own labels (its label protocol)")
    if absent:
        notes.append("declared but in no case: " + "; ".join(f"{site}: {values}" for site, values in absent.items()))
    listing = "; ".join(f"{site}: {', '.join(names.values()) or 'nothing'}" for site, names in annotates.items())
    choices["labels"] = {"value": {"num-classes": num_classes,
                                   "map": {str(v): names for v, names in sorted(by_value.items())},
                                   "annotates": annotates},
                         "reason": (f"num-classes {num_classes} = the largest label value {max(by_value)} + 1; "
                                    f"annotated: {listing}" + "".join(f"; {note}" for note in notes) + ".")}
    return num_classes


# ----------------------------------------------------------------------------------------------------
# the plan's files


def plan_bytes(plan: dict[str, Any]) -> bytes:
    """plan.json's canonical bytes: strict JSON (no NaN), sorted keys, 2-space indent, one trailing newline."""
    return (json.dumps(plan, allow_nan=False, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()


def plan_sha256(plan: dict[str, Any]) -> str:
    """The SHA-256 (hex) of plan.json's bytes: `sha256sum plan.json` gives it too."""
    return hashlib.sha256(plan_bytes(plan)).hexdigest()


def run_config_toml(plan: dict[str, Any], *, usage: str = "fedmeta simulate --preset run-config.toml (or copy the "
                    "keys into a run's config)", run_keys: dict[str, Any] | None = None) -> str:
    """run-config.toml: the plan's flat run-config keys and plan-sha256, a `fedmeta simulate --preset` file.

    ``usage``: the header's "Use:" line. ``run_keys``: more run-config keys after the plan's (a plan round's own
    settings, since `flwr run --run-config FILE` takes no other key beside a file); a plan key among them is an
    error, as the file would hold it twice."""
    import tomli_w

    values = {key: plan["run-config"][key] for key in RUN_CONFIG_KEYS}
    values["plan-sha256"] = plan_sha256(plan)
    twice = sorted(set(values) & set(run_keys or {}))
    if twice:
        raise ValueError(f"run_keys {twice} are the plan's own keys; leave them out (the plan sets them).")
    sites = ", ".join(plan["sites"])
    header = (f"# fedmeta plan: the run-config values planned from the fingerprints of {len(plan['sites'])} site(s) "
              f"({sites}).\n# plan.json beside this file holds each choice's reason; plan-sha256 is its SHA-256.\n"
              f"# Use: {usage}.\n")
    text = header + tomli_w.dumps(values)
    if run_keys:
        text += "\n# the run's own settings (not planned)\n" + tomli_w.dumps(dict(run_keys))
    return text


def write_plan(plan: dict[str, Any], out_dir: Path | str, *, overwrite: bool = False) -> dict[str, Path]:
    """Writes ``plan.json`` and ``run-config.toml`` into ``out_dir`` (new, empty, or an earlier `fedmeta plan`'s,
    replaced only with ``overwrite``; never a folder another command or anyone else wrote into). Returns
    ``{"plan": path, "run-config": path}``; :class:`fedmeta.common.outputs.OutputRefused` when refused."""
    from fedmeta.common.outputs import Outputs

    outputs = Outputs(out_dir, "plan")
    outputs.claim_folder(overwrite=overwrite, detail={"sites": len(plan["sites"])})
    return {"plan": outputs.write_bytes(PLAN_FILE, plan_bytes(plan)),
            "run-config": outputs.write_text(RUN_CONFIG_FILE, run_config_toml(plan))}


def format_plan(plan: dict[str, Any]) -> str:
    """The proposal as lines: each choice, its value and its reason, then the run-config keys."""
    lines = [f"plan from {len(plan['sites'])} site(s): "
             + ", ".join(f"{site} ({info['cases']} cases)" for site, info in plan["sites"].items())]
    for name in CHOICES:
        choice = plan["choices"][name]
        lines.append(f"  {name}: {json.dumps(choice['value'], sort_keys=True)[:160]}")
        lines.append(f"    because {choice['reason']}")
    lines.append("  run config: " + " ".join(f"{key}={plan['run-config'][key]!r}" for key in RUN_CONFIG_KEYS))
    return "\n".join(lines)


__all__ = ["ANISOTROPY", "MIN_SITE_CASES", "PLAN_FILE", "PLAN_FORMAT", "RUN_CONFIG_FILE", "RUN_CONFIG_KEYS",
           "check_image_budget", "format_plan", "histogram_moments", "histogram_percentile", "merge_fingerprints",
           "min_image_size", "plan_bytes", "plan_sha256", "run_config_toml", "site_problem", "weighted_median",
           "write_plan"]
