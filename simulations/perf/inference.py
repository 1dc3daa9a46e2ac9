"""`fedmeta perf inference` (a part of fedmeta.simulations.perf.perf): a whole CT segmented in its own grid, time and
peak memory, the previous implementation and the current one side by side.

The scan: a synthetic CT-like volume, 512 x 512 x N float32 at 0.78 x 0.78 x 1.25 mm, stored L-P-S like a DICOM
conversion (so the RAS reorientation has flips to undo): a 34 x 24 cm body of soft tissue (40 HU), a liver
(60 HU) with a tumour (25 HU) in the middle slices, lungs (-850 HU) in the upper ones, a spine (700 HU), air
(-1000 HU) outside, and noise. The model: the 2D UNet fedmeta builds (``RunConfig.model_config()``, base channels
16, 4 levels), 3 classes (background, liver, tumour), seeded random weights: time and memory do not depend on
what it learned. The preprocessing: what ``fedmeta plan`` proposes for such scans (in-plane 1.56 mm, so the 400
mm field of view fits image-size 256; slices at their native 1.25 mm), with a liver CT window and statistics.

Each implementation runs in a fresh spawned process: torch imported, the model built, the scan made, then
``segment_scan`` timed. The process reports its wall time, the model's share (forward hooks), its peak resident
set (``VmHWM``, counted from its own exec: no parent's pages) and its resident set before segmenting (the
interpreter, torch, the model and the scan itself), and its mask, which the parent compares voxel for voxel.
"previous" is :func:`segment_scan_previous`, commit a057a3a's ``fedmeta.common.inference`` (with its
``np.argwhere`` crop centre) kept here so both are measured on one machine under one load.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any

from fedmeta.common.progress import Heartbeat

IMPLEMENTATIONS = ("previous", "current")
# Issue 30, item 3: a 512 x 512 x 400 CT on 2 cores within a minute and 4 GB.
TARGET_SLICES, TARGET_THREADS, TARGET_SECONDS, TARGET_BYTES = 400, 2, 60.0, 4 * 10**9


@dataclass(frozen=True)
class InferenceCase:
    """One scan and the run config that segments it (``fedmeta plan``'s proposal for 512 x 512 CTs by default)."""

    slices: int = TARGET_SLICES
    in_plane: int = 512
    voxel_mm: tuple[float, float, float] = (0.78, 0.78, 1.25)
    image_size: int = 256
    spacing_mm: float = 1.56
    slice_spacing_mm: float = 1.25
    num_classes: int = 3
    # nnU-Net's foreground statistics of MSD Task03 (liver), about: the window and standardisation a plan writes.
    ct_window: tuple[float, float] = (-17.0, 201.0)
    ct_mean: float = 99.4
    ct_std: float = 39.4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("slices", "in_plane"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: the scan's size in voxels must be a positive integer, e.g. "
                                 f"{TARGET_SLICES} slices of 512 x 512.")

    def run_config(self):
        from fedmeta.common.config import RunConfig  # torch: not for `fedmeta perf --help`

        low, high = self.ct_window
        return RunConfig(image_size=self.image_size, spacing_mm=self.spacing_mm,
                         slice_spacing_mm=self.slice_spacing_mm, num_classes=self.num_classes, in_channels=1,
                         channels="CT", ct_clip_low=low, ct_clip_high=high, ct_mean=self.ct_mean, ct_std=self.ct_std)

    @property
    def is_target(self) -> bool:
        return (self.slices, self.in_plane) == (TARGET_SLICES, 512)


def synthetic_ct(case: InferenceCase):
    """``(volume float32 [in_plane, in_plane, slices] in HU, affine)``, stored L-P-S (x toward the patient's left,
    y toward posterior), the same for a case every time."""
    import numpy as np

    rng = np.random.default_rng(case.seed)
    n, slices = case.in_plane, case.slices
    dx, dy, dz = case.voxel_mm
    # Millimetres from the centre, in RAS terms; the volume's first two axes run the other way (L-P-S storage).
    r = (n / 2 - 0.5 - np.arange(n)) * dx
    a = (n / 2 - 0.5 - np.arange(n)) * dy
    R, A = np.meshgrid(r, a, indexing="ij")
    body = (R / 170) ** 2 + ((A + 10) / 120) ** 2 <= 1
    liver = ((R + 60) / 80) ** 2 + ((A - 5) / 60) ** 2 <= 1
    lungs = (((np.abs(R) - 75) / 55) ** 2 + ((A - 10) / 70) ** 2) <= 1
    spine = (R / 18) ** 2 + ((A + 95) / 18) ** 2 <= 1
    noise = rng.normal(0.0, 12.0, size=(n, n)).astype(np.float32)
    volume = np.empty((n, n, slices), dtype=np.float32)
    s = (np.arange(slices) + 0.5) / slices  # 0 at the feet, 1 at the head
    for z in range(slices):
        plane = np.where(body, 40.0, -1000.0).astype(np.float32)
        if s[z] > 0.7:
            plane[lungs & body] = -850.0
        if 0.3 < s[z] < 0.7:
            plane[liver] = 60.0
            tumour = ((R + 60) / 20) ** 2 + ((A - 5) / 20) ** 2 + ((s[z] - 0.5) * slices * dz / 20) ** 2 <= 1
            plane[tumour] = 25.0
        plane[spine] = 700.0
        volume[..., z] = plane + np.roll(noise, 7 * z, axis=0)  # noise that differs from slice to slice, cheaply
    affine = np.diag([-dx, -dy, dz, 1.0])
    affine[:3, 3] = [(n - 1) / 2 * dx, (n - 1) / 2 * dy, -(slices - 1) / 2 * dz]
    return volume, affine


# --------------------------------------------------------------------------------------------------
# The previous implementation (commit a057a3a), as it was, to measure against


def _argwhere_bounds(foreground):
    """a057a3a's way to the crop's box (``fedmeta.common.data.prepare_image``): every foreground voxel listed."""
    import numpy as np

    found = np.argwhere(foreground)
    return (found.min(axis=0), found.max(axis=0)) if len(found) else None


def segment_scan_previous(model, params: Mapping[str, Any], image_data, affine, config, *, num_classes: int,
                          batch_size: int = 16, probabilities: bool = False, device="cpu", channels=None):
    """a057a3a's ``fedmeta.common.inference.segment_scan``: the window's logits whole, the crop undone on the
    class probabilities, each class resampled to the scan's whole grid, a running arg-max over those volumes,
    the orientation undone by copies, ``np.unique`` for the counts."""
    import numpy as np
    import torch
    from nibabel import orientations
    from torch.func import functional_call

    from fedmeta.common.data import channel_kind, crop_channels, prepare_image, resampling_problem, to_ras
    from fedmeta.common.inference import Segmentation

    def to_scan_orientation(volume, transform):
        back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), transform)
        return np.ascontiguousarray(orientations.apply_orientation(volume, back))

    def uncrop(window, centre, shape, fill):
        size = window.shape[:len(centre)]
        out = torch.full(tuple(shape[:len(centre)]) + tuple(window.shape[len(centre):]), fill, dtype=window.dtype)
        source, target = [], []
        for axis, n in enumerate(size):
            start = int(round(centre[axis] - n / 2))
            lo, hi = max(start, 0), min(start + n, shape[axis])
            target.append(slice(lo, max(hi, lo)))
            source.append(slice(lo - start, lo - start + max(hi - lo, 0)))
        out[tuple(target)] = window[tuple(source)]
        return out

    affine = np.asarray(affine, dtype=np.float64)
    transform = orientations.io_orientation(affine)
    image, zooms = to_ras(np.asarray(image_data, dtype=np.float32), affine)
    ras_shape = image.shape[:3]
    problem = resampling_problem("the scan", ras_shape, zooms, config)
    if problem:
        raise ValueError(problem)
    names = channels if channels is not None else (config.channel_names or ("",) * config.in_channels)
    prepared = prepare_image(image, zooms, config, tuple(channel_kind(n or None) for n in names))
    del image
    centre = prepared.centre[:config.spatial_dims] if config.spatial_dims == 2 else prepared.centre
    window = torch.from_numpy(crop_channels(prepared, centre, config.image_size)).to(device)
    image_shape = prepared.channels.shape[1:]
    del prepared
    params = {n: p.to(device) for n, p in params.items()}
    with torch.no_grad():
        if config.spatial_dims == 3:
            logits = functional_call(model, dict(params), (window[None],))[0]
        else:
            slices = window.permute(3, 0, 1, 2)
            out = [functional_call(model, dict(params), (slices[i:i + batch_size],))
                   for i in range(0, len(slices), batch_size)]
            logits = torch.cat(out).permute(1, 2, 3, 0)
    logits = logits.float().cpu()
    window_probs = torch.softmax(logits, dim=0).movedim(0, -1)
    background = torch.zeros(num_classes)
    background[0] = 1.0
    probs = uncrop(window_probs, centre, image_shape, 0.0)
    outside = uncrop(torch.ones(window_probs.shape[:-1]), centre, image_shape, 0.0) == 0
    probs[outside] = background
    probs = probs.movedim(-1, 0)
    best = torch.full(ras_shape, -1.0)
    mask = torch.zeros(ras_shape, dtype=torch.uint8)
    scan_shape = tuple(int(n) for n in np.asarray(image_data).shape[:3])
    kept = np.empty((*scan_shape, num_classes), dtype=np.float32) if probabilities else None
    for c in range(num_classes):
        p = probs[c]
        if tuple(p.shape) != tuple(ras_shape):
            p = torch.nn.functional.interpolate(p[None, None], size=ras_shape, mode="trilinear",
                                                align_corners=False)[0, 0]
        better = p > best
        best = torch.where(better, p, best)
        mask[better] = c
        if kept is not None:
            kept[..., c] = to_scan_orientation(p.numpy(), transform)
    mask_np = to_scan_orientation(mask.numpy(), transform)
    counts = {int(v): int(n) for v, n in zip(*np.unique(mask_np, return_counts=True))}
    return Segmentation(mask_np, kept, counts)


# --------------------------------------------------------------------------------------------------
# One measurement, in a fresh process


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure_here(case: InferenceCase, implementation: str, threads: int, mask_path: str | None = None) -> dict:
    """Segments ``case``'s scan with ``implementation`` in this process; returns its figures (see the module)."""
    import numpy as np
    import torch

    from fedmeta.common import data
    from fedmeta.common.inference import segment_scan
    from fedmeta.common.model import build_model, initial_params

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: choose from {', '.join(IMPLEMENTATIONS)}.")
    torch.set_num_threads(threads)
    torch.manual_seed(case.seed)
    config = case.run_config()
    model = build_model(config.model_config())
    params = initial_params(model)
    forward = [0.0]
    model.register_forward_pre_hook(lambda module, args: forward.__setitem__(0, forward[0] - time.perf_counter()))
    model.register_forward_hook(lambda module, args, out: forward.__setitem__(0, forward[0] + time.perf_counter()))
    volume, affine = synthetic_ct(case)
    segment = segment_scan
    if implementation == "previous":
        segment = segment_scan_previous
        data.foreground_bounds = _argwhere_bounds  # a fresh process of its own: nothing else sees the swap
    resident = _status_bytes("VmRSS")
    began = time.perf_counter()
    result = segment(model, params, volume, affine, config.data_config(), num_classes=config.num_classes,
                     batch_size=config.eval_batch_size)
    seconds = time.perf_counter() - began
    peak = _status_bytes("VmHWM")
    if mask_path:
        np.save(mask_path, result.mask)
    return {"implementation": implementation, "threads": threads, "seconds": seconds, "model_seconds": forward[0],
            "peak_bytes": peak, "resident_before_bytes": resident, "voxel_counts": result.voxel_counts,
            "scan_bytes": int(volume.nbytes)}


def _child(case: InferenceCase, implementation: str, threads: int, mask_path: str | None, queue) -> None:
    from fedmeta.common.workers import end_with_parent

    end_with_parent()  # ends with a perf run killed with SIGKILL
    try:
        queue.put(measure_here(case, implementation, threads, mask_path))
    except BaseException as err:  # the parent says what failed; the traceback stays on this process's stderr
        queue.put({"error": f"{type(err).__name__}: {err}"})
        raise


def measure_in_child(case: InferenceCase, implementation: str, threads: int, mask_path: str | None = None) -> dict:
    """:func:`measure_here` in a fresh spawned process: its peak memory is the segmentation's alone."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    load = os.getloadavg()[0]
    process = context.Process(target=_child, args=(case, implementation, threads, mask_path, queue))
    process.start()
    row = None
    try:
        while row is None:
            try:
                row = queue.get(timeout=1.0)
            except Empty:
                if not process.is_alive():  # killed (out of memory, a signal) before it could report
                    try:
                        row = queue.get(timeout=1.0)
                    except Empty:
                        row = {"error": "the process ended without a report (killed for lack of memory?)"}
    finally:
        process.join(timeout=60)
    if "error" in row or process.exitcode not in (0, None):
        raise RuntimeError(f"perf inference: the {implementation} implementation failed in its child process "
                           f"(exit {process.exitcode}): {row.get('error', 'no report')}. Its stderr above has the "
                           "traceback.")
    return {**row, "load_before": load}


def _mask_difference(first: Path, second: Path) -> int:
    import numpy as np

    a, b = np.load(first, mmap_mode="r"), np.load(second, mmap_mode="r")
    if a.shape != b.shape:
        raise RuntimeError(f"perf inference: the masks in {first} and {second} have different shapes "
                           f"{a.shape} and {b.shape}; both implementations must return the scan's shape.")
    return int(np.count_nonzero(np.asarray(a) != np.asarray(b)))


def bench_inference(work: Path, *, case: InferenceCase = InferenceCase(), threads=(TARGET_THREADS,),
                    beat: Heartbeat | None = None) -> dict[str, Any]:
    """The previous and the current implementation on ``case``, for each thread count, each in its own process
    (previous first, then current); their masks compared voxel for voxel."""
    beat = beat or Heartbeat("perf inference", quiet=True)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rows, by_threads = [], {}
    total = len(threads) * len(IMPLEMENTATIONS)
    for count in threads:
        runs = {}
        for implementation in IMPLEMENTATIONS:
            beat.update(f"{case.in_plane} x {case.in_plane} x {case.slices}, the {implementation} implementation, "
                        f"{count} thread(s)")
            mask_path = work / f"inference-mask-{implementation}-{count}.npy"
            runs[implementation] = row = measure_in_child(case, implementation, count, str(mask_path))
            rows.append(row)
            beat.say(f"perf inference: {implementation} implementation, {count} thread(s): {row['seconds']:.1f} s, "
                     f"peak {row['peak_bytes'] / 1e9:.2f} GB ({len(rows)}/{total})")
        masks = [work / f"inference-mask-{implementation}-{count}.npy" for implementation in IMPLEMENTATIONS]
        differing = _mask_difference(*masks)
        for path in masks:
            path.unlink()
        previous, current = runs["previous"], runs["current"]
        by_threads[str(count)] = {
            "time_vs_previous": current["seconds"] / previous["seconds"],
            # The model's forward pass is the same code in both: the time around it is what changed.
            "rest_vs_previous": _rest(current) / _rest(previous),
            "peak_vs_previous": current["peak_bytes"] / previous["peak_bytes"],
            "growth_vs_previous": _growth(current) / max(_growth(previous), 1),
            "voxels_differing": differing,
        }
    result = {"case": asdict(case), "rows": rows, "by_threads": by_threads,
              "voxels": case.in_plane * case.in_plane * case.slices}
    target = next((r for r in rows if r["implementation"] == "current" and r["threads"] == TARGET_THREADS), None)
    if case.is_target and target is not None:
        result["target"] = {"seconds": target["seconds"], "peak_bytes": target["peak_bytes"],
                            "met": target["seconds"] <= TARGET_SECONDS and target["peak_bytes"] <= TARGET_BYTES}
    return result


def _rest(row: dict) -> float:
    """Seconds outside the model's forward passes: preprocessing, softmax, resampling back, arg-max, orientation."""
    return row["seconds"] - row["model_seconds"]


def _growth(row: dict) -> int:
    """What segmenting added to the process: its peak over what it held before (interpreter, model, scan)."""
    return row["peak_bytes"] - row["resident_before_bytes"]


def format_inference(result: dict[str, Any]) -> list[str]:
    """The report's section: one row per run, the ratios, the mask comparison and the target."""
    case = result["case"]
    lines = [f"## Inference on a whole CT: {case['in_plane']} x {case['in_plane']} x {case['slices']} at "
             f"{' x '.join(f'{v:g}' for v in case['voxel_mm'])} mm, 2D UNet, image-size {case['image_size']} at "
             f"{case['spacing_mm']:g} x {case['spacing_mm']:g} x {case['slice_spacing_mm']:g} mm, "
             f"{case['num_classes']} classes", "",
             "| implementation | threads | wall s | model forward s | rest s | peak RSS GB | before segmenting GB "
             "| added by segmenting GB | load before |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['implementation']} | {row['threads']} | {row['seconds']:.1f} | "
                     f"{row['model_seconds']:.1f} | {_rest(row):.1f} | "
                     f"{row['peak_bytes'] / 1e9:.2f} | {row['resident_before_bytes'] / 1e9:.2f} | "
                     f"{_growth(row) / 1e9:.2f} | {row.get('load_before', float('nan')):.1f} |")
    lines.append("")
    for count, ratio in result["by_threads"].items():
        same = ("masks identical" if ratio["voxels_differing"] == 0 else
                f"masks differ in {ratio['voxels_differing']:,} of {result['voxels']:,} voxels")
        lines.append(f"{count} thread(s), current / previous: time {ratio['time_vs_previous']:.2f}x (outside the "
                     f"model {ratio['rest_vs_previous']:.2f}x), peak "
                     f"{ratio['peak_vs_previous']:.2f}x, added by segmenting {ratio['growth_vs_previous']:.2f}x; "
                     f"{same}.")
    target = result.get("target")
    if target is not None:
        lines.append(f"Target (issue 30): {TARGET_SLICES} slices on {TARGET_THREADS} threads within "
                     f"{TARGET_SECONDS:.0f} s and {TARGET_BYTES / 1e9:.0f} GB: {target['seconds']:.1f} s, "
                     f"{target['peak_bytes'] / 1e9:.2f} GB: {'met' if target['met'] else 'not met'}.")
    else:
        lines.append(f"Target (issue 30) applies to 512 x 512 x {TARGET_SLICES} on {TARGET_THREADS} threads; not "
                     "measured in this run.")
    return lines + [""]
