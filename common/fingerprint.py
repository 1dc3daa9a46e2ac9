"""A site's fingerprint: the aggregate statistics a federation is planned from, and the check of a received one.

A site reports only declared aggregates (:data:`TOP_KEYS`): how many usable cases it has, its channel and label
names as ``dataset.json`` declares them, voxel spacing and shape (min / median / max per RAS axis) and the median
field of view, per channel the foreground (label > 0, nnU-Net's recipe) voxel count, mean, std and fixed
quantiles, for CT a 1-HU histogram over [-1024, 3071] (sites' histograms add up exactly), and the voxel and case
fractions of each label. Never a voxel array, a case id, a file name, a path or a date. docs/planning.md says
what each statistic reveals about a site.

:func:`check_fingerprint` is the coordinator's check of a report it receives: known keys only, types, lengths,
finite numbers and ranges; anything else is refused with the field, the value and what is allowed. On the wire (a
deployment's plan round, ``fedmeta.server.plan_round``) a report is one bytes value: :func:`encode_fingerprint`
checks it before a site sends it, :func:`decode_fingerprint` bounds it before the coordinator parses it.

Quantiles other than 0 % and 100 % are taken, as nnU-Net takes them, over a seeded sample of
:data:`SAMPLES_PER_CASE` foreground voxels a case (every voxel of a case with fewer), so memory stays bounded over
any number of cases; the count, mean, std, min, max and the CT histogram are exact over every foreground voxel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common.data import CT_RANGE_HU, channel_kind, ras_grid
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.site_layout import MAX_CHANNELS
from fedmeta.common.validate import check_case, discover_site
from fedmeta.common.volume_checks import VOXEL_MM_RANGE

FINGERPRINT_FORMAT = "fedmeta-fingerprint"
FINGERPRINT_VERSION = 1
QUANTILES = (0.0, 0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5, 100.0)  # percent
HU_LOW, HU_HIGH = (int(hu) for hu in CT_RANGE_HU)  # what a 12-bit CT (with the -1024 offset) holds
HU_BINS = HU_HIGH - HU_LOW + 1  # 4096 bins of 1 HU: bin i counts the voxels that round to HU_LOW + i
SAMPLES_PER_CASE = 10_000  # foreground voxels a case adds to the quantile sample (nnU-Net's num_samples)
MAX_LABELS = 256  # label values 0..255 (labels are held as uint8)
MAX_NAME_CHARS = 64
MAX_SHAPE = 4096  # voxels along an axis
MAX_COUNT = 2**53  # counts stay exact as JSON numbers any reader parses as a double
MAX_REPORT_BYTES = 1 << 20  # compact JSON; the largest legitimate report (8 CT channels, 256 labels) is ~0.45 MiB
MAX_FIELD_OF_VIEW_MM = MAX_SHAPE * VOXEL_MM_RANGE[1]

TOP_KEYS = ("format", "version", "cases", "cases-skipped", "channels", "labels", "label-protocol", "spacing-mm",
            "shape", "field-of-view-mm", "intensity", "label-fractions")
SUMMARY_KEYS = ("min", "median", "max")  # spacing-mm and shape: one list of 3 (R, A, S) each
CHANNEL_KEYS = ("kind", "foreground-voxels", "mean", "std", "quantiles")
CT_KEYS = ("hu-histogram", "fraction-outside-hu-range")  # fraction over every voxel of the channel
MR_KEYS = ("fraction-foreground-below-zero",)
LABEL_KEYS = ("voxel-fraction", "case-fraction")


# ----------------------------------------------------------------------------------------------------
# a site's fingerprint


class _ChannelStats:
    """One channel's running foreground statistics over the cases read so far (nothing per voxel kept but a
    bounded sample)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # Chan et al.'s parallel mean/variance merge
        self.low, self.high = math.inf, -math.inf
        self.samples: list[np.ndarray] = []
        self.histogram = np.zeros(HU_BINS, dtype=np.int64) if kind == "ct" else None
        self.outside = self.voxels = self.negative = 0

    def add(self, channel: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> None:
        values = channel[foreground].astype(np.float64)
        self.voxels += channel.size
        if self.kind == "ct":
            # Clipped into the range the histogram holds: air below -1024 HU and metal above 3071 HU are
            # the bounds, so every statistic of a CT channel agrees with its histogram.
            self.outside += int(np.count_nonzero((channel < HU_LOW) | (channel > HU_HIGH)))
            values = np.clip(values, HU_LOW, HU_HIGH)
            self.histogram += np.bincount((np.rint(values) - HU_LOW).astype(np.int64), minlength=HU_BINS)
        else:
            self.negative += int(np.count_nonzero(values < 0))
        n = values.size
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        # A case with few foreground voxels adds all of them (its quantiles then exact), a larger one a sample.
        self.samples.append(values if n <= SAMPLES_PER_CASE else values[rng.integers(0, n, size=SAMPLES_PER_CASE)])

    def report(self) -> dict[str, Any]:
        pooled = np.concatenate(self.samples)
        quantiles = np.percentile(pooled, QUANTILES)
        quantiles[0], quantiles[-1] = self.low, self.high  # the extremes exact, not the sample's
        quantiles = np.maximum.accumulate(quantiles)  # interpolation's rounding never makes them decrease
        out: dict[str, Any] = {"kind": self.kind, "foreground-voxels": self.count, "mean": self.mean,
                               "std": math.sqrt(self.m2 / self.count), "quantiles": [float(q) for q in quantiles]}
        if self.kind == "ct":
            out["hu-histogram"] = [int(c) for c in self.histogram]
            out["fraction-outside-hu-range"] = self.outside / self.voxels
        else:
            out["fraction-foreground-below-zero"] = self.negative / self.count
        return out


def site_fingerprint(root: Path | str, *, limits: ReadLimits, image_glob: str | None = None,
                     label_glob: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The fingerprint of the site folder ``root``: the declared aggregates only (module docstring).

    Cases are found by :func:`fedmeta.common.validate.discover_site` and read one at a time through
    :func:`fedmeta.common.validate.check_case`; cases with problems are skipped and counted, never named.
    ``progress(read, listed)`` is called after each case. A ValueError naming the site when no case is usable.
    """
    layout = discover_site(root, image_glob, label_glob, limits=limits)
    names = layout.channels
    kinds = [channel_kind(name) for name in names] or [channel_kind(None)]  # undeclared: one channel
    allowed = set(layout.labels) if layout.labels is not None else None
    if allowed is not None and (bad := sorted(v for v in allowed if not 0 <= v < MAX_LABELS)):
        raise ValueError(f"{layout.root / 'dataset.json'}: declares label values {bad}, outside 0..{MAX_LABELS - 1} "
                         "(labels are held as uint8). Fix: map them onto 0..255 in dataset.json and the label files.")
    stats = [_ChannelStats(kind) for kind in kinds]
    label_voxels = np.zeros(MAX_LABELS, dtype=np.int64)
    label_cases = np.zeros(MAX_LABELS, dtype=np.int64)
    spacings, shapes = [], []
    skipped, listed = len(layout.problems), layout.num_listed
    for index, case in enumerate(layout.cases):
        problems, loaded = check_case(case, allowed, MAX_LABELS, limits=limits, channels=names)
        if problems:  # check_case also refuses a label value outside 0..MAX_LABELS - 1
            skipped += 1
        else:
            shape, zooms = ras_grid(loaded.image_data.shape[:3], loaded.image.affine)
            shapes.append(shape)
            spacings.append(zooms)
            label = loaded.label_data
            foreground = label > 0
            image = loaded.image_data if loaded.image_data.ndim == 4 else loaded.image_data[..., None]
            rng = np.random.default_rng([FINGERPRINT_VERSION, index])  # the same sample on every run
            for channel, channel_stats in enumerate(stats):
                channel_stats.add(image[..., channel], foreground, rng)
            counts = np.bincount(label.ravel(), minlength=MAX_LABELS)
            label_voxels += counts
            label_cases += counts > 0
        del loaded  # one case in memory at a time
        if progress is not None:
            progress(index + 1 + len(layout.problems), listed)
    if not shapes:
        raise ValueError(f"site {layout.name} ({layout.root}): none of its {listed} listed case(s) is usable, so it "
                         f"has no fingerprint. Fix: repair the cases `fedmeta check-data {layout.root}` lists.")
    voxels = int(label_voxels.sum())
    present = set(np.flatnonzero(label_cases).tolist())
    values = sorted(set(layout.labels) if layout.labels is not None else present)
    spacing, shape = np.asarray(spacings), np.asarray(shapes)
    return {
        "format": FINGERPRINT_FORMAT,
        "version": FINGERPRINT_VERSION,
        "cases": len(shapes),
        "cases-skipped": skipped,
        "channels": list(names),
        "labels": {str(v): name for v, name in sorted(layout.labels.items())} if layout.labels is not None else None,
        "label-protocol": layout.label_protocol,
        "spacing-mm": {"min": spacing.min(axis=0).tolist(), "median": np.median(spacing, axis=0).tolist(),
                       "max": spacing.max(axis=0).tolist()},
        "shape": {"min": [int(n) for n in shape.min(axis=0)], "median": np.median(shape, axis=0).tolist(),
                  "max": [int(n) for n in shape.max(axis=0)]},
        "field-of-view-mm": np.median(shape * spacing, axis=0).tolist(),
        "intensity": [channel_stats.report() for channel_stats in stats],
        "label-fractions": {str(v): {"voxel-fraction": int(label_voxels[v]) / voxels,
                                     "case-fraction": int(label_cases[v]) / len(shapes)} for v in values},
    }


# ----------------------------------------------------------------------------------------------------
# the check of a received fingerprint


def _refuse(field: str, value: Any, allowed: str) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ValueError(f"fingerprint field {field}: {shown} is refused; allowed: {allowed}.")


def _keys(obj: Any, field: str, required: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` when it is an object holding exactly the keys ``required``; ``field`` "" is the report itself."""
    if not isinstance(obj, dict):
        raise _refuse(field or "(report)", obj, f"an object with the keys {', '.join(required)}")
    unknown = sorted(set(obj) - set(required), key=str)
    if unknown:
        raise _refuse(f"{field}.{unknown[0]}".lstrip("."), obj[unknown[0]], f"only the keys {', '.join(required)}")
    missing = [key for key in required if key not in obj]
    if missing:
        raise _refuse(f"{field}.{missing[0]}".lstrip("."), None, "a value (the key is required)")
    return obj


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _refuse(field, value, f"an integer in [{low}, {high}]")
    return value


def _number(value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _refuse(field, value, f"a finite number in [{low:g}, {high:g}]")
    return float(value)


def _numbers(value: Any, field: str, length: int, low: float = -math.inf, high: float = math.inf) -> list[float]:
    if not isinstance(value, list) or len(value) != length:
        raise _refuse(field, value, f"a list of {length} numbers")
    return [_number(v, f"{field}[{i}]", low, high) for i, v in enumerate(value)]


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
        raise _refuse(field, value, f"a name of 1 to {MAX_NAME_CHARS} printable characters")
    return value


def _label_value(key: Any, field: str) -> int:
    if not isinstance(key, str) or not (key.isascii() and key.isdigit()) or key != str(int(key)) \
            or int(key) >= MAX_LABELS:
        raise _refuse(field, key, f"a label value written as a decimal integer 0..{MAX_LABELS - 1}")
    return int(key)


def _ordered(low: list[float], middle: list[float], high: list[float], field: str) -> None:
    for axis in range(3):
        if not low[axis] <= middle[axis] <= high[axis]:
            raise _refuse(f"{field}[axis {axis}]", [low[axis], middle[axis], high[axis]], "min <= median <= max")


def check_fingerprint(report: Any) -> dict[str, Any]:
    """``report`` (as a site sent it) when it is a well-formed fingerprint, as plain JSON values; a ValueError
    naming the field, the value and what is allowed otherwise. Strict: known keys only, bounded lengths, finite
    numbers in their ranges, quantiles non-decreasing, a CT histogram that sums to the foreground count."""
    try:
        encoded = json.dumps(report, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as err:
        raise _refuse("(report)", type(report).__name__, f"JSON values only, finite numbers ({err})") from None
    if len(encoded) > MAX_REPORT_BYTES:
        raise _refuse("(report)", f"{len(encoded):,} bytes", f"at most {MAX_REPORT_BYTES:,} bytes of JSON")
    report = json.loads(encoded)  # a copy of plain values: nothing the caller holds changes under the check
    _keys(report, "", TOP_KEYS)
    if report["format"] != FINGERPRINT_FORMAT:
        raise _refuse("format", report["format"], repr(FINGERPRINT_FORMAT))
    if report["version"] != FINGERPRINT_VERSION or isinstance(report["version"], bool):
        raise _refuse("version", report["version"], str(FINGERPRINT_VERSION))
    cases = _integer(report["cases"], "cases", 1, MAX_COUNT)
    _integer(report["cases-skipped"], "cases-skipped", 0, MAX_COUNT)

    channels = report["channels"]
    if not isinstance(channels, list) or len(channels) > MAX_CHANNELS:
        raise _refuse("channels", channels, f"a list of at most {MAX_CHANNELS} channel names")
    for i, name in enumerate(channels):
        _name(name, f"channels[{i}]")
    if len({name.lower() for name in channels}) != len(channels):  # the reader matches names case-insensitively
        raise _refuse("channels", channels, "each channel named once (case-insensitively)")

    labels = report["labels"]
    if labels is not None:
        if not isinstance(labels, dict) or not labels or len(labels) > MAX_LABELS:
            raise _refuse("labels", labels, f"null, or an object of 1 to {MAX_LABELS} label value -> name")
        for key, name in labels.items():
            _label_value(key, f"labels.{key}")
            _name(name, f"labels.{key}")
    if not isinstance(report["label-protocol"], str) or not report["label-protocol"].isprintable() \
            or len(report["label-protocol"]) > MAX_NAME_CHARS:
        raise _refuse("label-protocol", report["label-protocol"], f"at most {MAX_NAME_CHARS} printable characters")

    spacing = _keys(report["spacing-mm"], "spacing-mm", SUMMARY_KEYS)
    low_mm, high_mm = VOXEL_MM_RANGE
    summary = [_numbers(spacing[k], f"spacing-mm.{k}", 3, low_mm, high_mm) for k in SUMMARY_KEYS]
    _ordered(*summary, "spacing-mm")
    shape = _keys(report["shape"], "shape", SUMMARY_KEYS)
    low_n = [_integer(v, f"shape.min[{i}]", 1, MAX_SHAPE) for i, v in enumerate(_list(shape["min"], "shape.min"))]
    high_n = [_integer(v, f"shape.max[{i}]", 1, MAX_SHAPE) for i, v in enumerate(_list(shape["max"], "shape.max"))]
    _ordered(low_n, _numbers(shape["median"], "shape.median", 3, 1, MAX_SHAPE), high_n, "shape")
    _numbers(report["field-of-view-mm"], "field-of-view-mm", 3, low_mm, MAX_FIELD_OF_VIEW_MM)

    intensity = report["intensity"]
    if not isinstance(intensity, list) or len(intensity) != max(1, len(channels)):
        raise _refuse("intensity", intensity, f"a list of {max(1, len(channels))} channel statistics (one per "
                      "channel; one for a site that declares none)")
    for i, stats in enumerate(intensity):
        _check_channel(stats, f"intensity[{i}]", channel_kind(channels[i] if channels else None))

    fractions = report["label-fractions"]
    if not isinstance(fractions, dict) or not fractions or len(fractions) > MAX_LABELS:
        raise _refuse("label-fractions", fractions, f"an object of 1 to {MAX_LABELS} label value -> fractions")
    total = 0.0
    for key, entry in fractions.items():
        _label_value(key, f"label-fractions.{key}")
        if labels is not None and key not in labels:
            raise _refuse(f"label-fractions.{key}", key, f"a label the site declares ({', '.join(labels)})")
        _keys(entry, f"label-fractions.{key}", LABEL_KEYS)
        total += _number(entry["voxel-fraction"], f"label-fractions.{key}.voxel-fraction", 0.0, 1.0)
        share = _number(entry["case-fraction"], f"label-fractions.{key}.case-fraction", 0.0, 1.0)
        if abs(share * cases - round(share * cases)) > 1e-6 * cases:
            raise _refuse(f"label-fractions.{key}.case-fraction", share, f"a whole number of the {cases} cases "
                          "divided by the cases")
    if total > 1.0 + 1e-6:
        raise _refuse("label-fractions (voxel-fraction, summed)", total, "at most 1")
    return report


# ----------------------------------------------------------------------------------------------------
# on the wire: one bytes value (a deployment's plan round; fedmeta.common.protocol.FINGERPRINT_RECORD)


def encode_fingerprint(report: Any) -> bytes:
    """What a site sends: ``report`` passed through :func:`check_fingerprint` first (a site never sends what the
    coordinator would refuse), as compact, strict, ASCII JSON; the check's ValueError otherwise."""
    return json.dumps(check_fingerprint(report), allow_nan=False, separators=(",", ":"), sort_keys=True).encode()


def decode_fingerprint(data: Any) -> dict[str, Any]:
    """What a coordinator takes from a site's reply: ``data`` must be bytes of at most :data:`MAX_REPORT_BYTES`
    (measured before anything is parsed), strict UTF-8 JSON (no NaN or Infinity, no key twice), and a fingerprint
    :func:`check_fingerprint` accepts; a ValueError naming what is wrong and what is allowed otherwise."""
    if not isinstance(data, bytes):
        raise _refuse("(report)", type(data).__name__, "bytes of UTF-8 JSON")
    if len(data) > MAX_REPORT_BYTES:
        raise _refuse("(report)", f"{len(data):,} bytes", f"at most {MAX_REPORT_BYTES:,} bytes of JSON")

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):  # json keeps the last of two: what the check saw would not be what was sent
            twice = next(key for key in keys if keys.count(key) > 1)
            raise ValueError(f"key {twice[:40]!r} appears twice in one object")
        return dict(pairs)

    try:
        report = json.loads(data.decode("utf-8"), parse_constant=no_constant, object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        raise _refuse("(report)", f"{len(data):,} bytes", f"strict UTF-8 JSON ({type(err).__name__}: "
                      f"{str(err)[:120]})") from None
    return check_fingerprint(report)


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list) or len(value) != 3:
        raise _refuse(field, value, "a list of 3 (R, A, S)")
    return value


def _check_channel(stats: Any, field: str, kind: str) -> None:
    """One channel's statistics: the keys of its kind, counts, moments and quantiles in range and in order."""
    extra = (CT_KEYS if stats.get("kind") == "ct" else MR_KEYS) if isinstance(stats, dict) else ()
    _keys(stats, field, CHANNEL_KEYS + extra)
    if stats["kind"] != kind:
        raise _refuse(f"{field}.kind", stats["kind"], repr(kind) + " (the channel's name says which: 'CT' is ct, "
                      "any other name mr)")
    count = _integer(stats["foreground-voxels"], f"{field}.foreground-voxels", 1, MAX_COUNT)
    low, high = (HU_LOW, HU_HIGH) if kind == "ct" else (-math.inf, math.inf)
    quantiles = _numbers(stats["quantiles"], f"{field}.quantiles", len(QUANTILES), low, high)
    for i in range(1, len(quantiles)):
        if quantiles[i] < quantiles[i - 1]:
            raise _refuse(f"{field}.quantiles[{i}]", quantiles[i],
                          f"non-decreasing quantiles (>= {quantiles[i - 1]!r}, the {QUANTILES[i - 1]:g} % one)")
    spread = max(1e-9, 1e-9 * max(abs(quantiles[0]), abs(quantiles[-1])))  # float rounding of an exact mean
    _number(stats["mean"], f"{field}.mean", quantiles[0] - spread, quantiles[-1] + spread)
    _number(stats["std"], f"{field}.std", 0.0, (quantiles[-1] - quantiles[0]) + spread)
    if kind == "ct":
        histogram = stats["hu-histogram"]
        if not isinstance(histogram, list) or len(histogram) != HU_BINS:
            raise _refuse(f"{field}.hu-histogram", histogram, f"a list of exactly {HU_BINS} counts (1 HU bins "
                          f"{HU_LOW}..{HU_HIGH})")
        for i, c in enumerate(histogram):
            _integer(c, f"{field}.hu-histogram[{i}]", 0, MAX_COUNT)
        if sum(histogram) != count:
            raise _refuse(f"{field}.hu-histogram", f"sum {sum(histogram)}", f"counts summing to foreground-voxels "
                          f"({count})")
        _number(stats["fraction-outside-hu-range"], f"{field}.fraction-outside-hu-range", 0.0, 1.0)
    else:
        _number(stats["fraction-foreground-below-zero"], f"{field}.fraction-foreground-below-zero", 0.0, 1.0)


__all__ = ["FINGERPRINT_FORMAT", "FINGERPRINT_VERSION", "HU_BINS", "HU_HIGH", "HU_LOW", "MAX_LABELS",
           "MAX_REPORT_BYTES", "QUANTILES", "SAMPLES_PER_CASE", "TOP_KEYS", "check_fingerprint", "decode_fingerprint",
           "encode_fingerprint", "site_fingerprint"]
