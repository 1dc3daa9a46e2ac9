"""`fedmeta perf inference`: the previous implementation it measures against gives the current one's masks, and the
part runs end to end in its own processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmeta.common.data import DataConfig
from fedmeta.common.inference import segment_scan
from fedmeta.common.model import ModelConfig, build_model, initial_params
from fedmeta.simulations.cli import main
from fedmeta.simulations.perf.inference import InferenceCase, segment_scan_previous, synthetic_ct
from fedmeta.simulations.perf.report import format_report

AFFINES = {
    "ras-2mm": np.diag([2.0, 2.0, 2.0, 1.0]),
    "lps-anisotropic": np.diag([-1.0, -1.2, 0.9, 1.0]),
    "permuted": np.array([[0, 0, -1.5, 90], [-1.0, 0, 0, 100], [0, 1.2, 0, -50], [0, 0, 0, 1]]),
}


def _brain(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A bright ellipsoid with texture in dim noise: a head the MR preprocessing finds."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = x**2 + y**2 + z**2 < 0.7
    scan = np.where(head, 100 + 30 * np.sin(8 * x) * np.cos(5 * y), 5.0)
    return (scan + rng.normal(0, 3, shape)).astype(np.float32)


@pytest.mark.parametrize("affine", list(AFFINES.values()), ids=list(AFFINES))
@pytest.mark.parametrize(("spatial_dims", "image_size", "classes"), [(2, (64, 64), 4), (2, (24, 40), 3),
                                                                      (3, (16, 16, 16), 4)])
def test_the_previous_implementation_and_the_current_one_give_the_same_bits(affine, spatial_dims, image_size,
                                                                            classes):
    torch.manual_seed(0)
    model = build_model(ModelConfig(spatial_dims=spatial_dims, out_channels=classes, channels=(4, 8, 16),
                                    strides=(2, 2)))
    params = initial_params(model)
    config = DataConfig(spatial_dims=spatial_dims, image_size=image_size, spacing=(3.0, 3.0, 3.0),
                        num_classes=classes)
    scan = _brain((70, 64, 50), seed=classes)
    # One batch size for both: oneDNN may choose another convolution algorithm for another batch size.
    previous = segment_scan_previous(model, params, scan, affine, config, num_classes=classes, probabilities=True,
                                     batch_size=8)
    current = segment_scan(model, params, scan, affine, config, num_classes=classes, probabilities=True, batch_size=8)
    assert np.array_equal(current.mask, previous.mask) and current.voxel_counts == previous.voxel_counts
    assert np.array_equal(current.probabilities, previous.probabilities)


def test_the_synthetic_ct_is_a_body_in_air_stored_lps():
    volume, affine = synthetic_ct(InferenceCase(slices=20))
    assert volume.shape == (512, 512, 20) and volume.dtype == np.float32
    assert np.sign(np.diag(affine)[:3]).tolist() == [-1.0, -1.0, 1.0]
    assert volume[0, 0].max() < -900 and volume[256, 256].min() > -200  # air in the corner, tissue in the middle
    body = (volume > -500).mean()
    assert 0.3 < body < 0.6, body  # the ellipse: ~40 % of the field of view


def test_perf_inference_runs_both_implementations_in_their_own_processes(tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert main(["perf", "inference", "--slices", "8", "--threads", "1", "--out", str(out),
                 "--work", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())["inference"]
    assert [row["implementation"] for row in result["rows"]] == ["previous", "current"]
    for row in result["rows"]:
        # the forward pass is timed inside the whole call, on the same clock: a part, whatever the load
        assert row["threads"] == 1 and 0 < row["model_seconds"] <= row["seconds"]
        assert row["peak_bytes"] >= row["resident_before_bytes"] > row["scan_bytes"] == 512 * 512 * 8 * 4
    assert result["by_threads"]["1"]["voxels_differing"] == 0
    assert "target" not in result  # 8 slices: not the case
    report = (tmp_path / "perf.md").read_text()
    assert "| previous | 1 |" in report and "masks identical" in report and "applies to 512 x 512 x 400" in report
    assert not list((tmp_path / "work").glob("*.npy"))  # the masks compared are not left behind


def test_the_report_says_whether_the_target_is_met():
    row = {"threads": 2, "seconds": 30.0, "model_seconds": 20.0, "peak_bytes": 2 * 10**9,
           "resident_before_bytes": 8 * 10**8, "load_before": 1.0}
    result = {"case": {**InferenceCase().__dict__}, "voxels": 512 * 512 * 400,
              "rows": [{**row, "implementation": "previous", "seconds": 40.0, "peak_bytes": 4 * 10**9},
                       {**row, "implementation": "current"}],
              "by_threads": {"2": {"time_vs_previous": 0.75, "rest_vs_previous": 0.5, "peak_vs_previous": 0.5,
                                   "growth_vs_previous": 0.375,
                                   "voxels_differing": 0}},
              "target": {"seconds": 30.0, "peak_bytes": 2 * 10**9, "met": True}}
    report = format_report({"machine": "test", "inference": result})
    assert "| current | 2 | 30.0 | 20.0 | 10.0 | 2.00 | 0.80 | 1.20 | 1.0 |" in report
    assert "time 0.75x (outside the model 0.50x), peak 0.50x" in report and "masks identical" in report
    assert "| CT 400 slices, 2 threads: wall s | 30.00 | ≤ 60.0 | yes |" in report
    assert "| CT 400 slices, 2 threads: peak GB | 2.00 | ≤ 4.0 | yes |" in report


@pytest.mark.parametrize(("argv", "message"), [
    (["perf", "inference", "--slices", "0"], "'0' is not a positive whole number"),
    (["perf", "inference", "--threads", "two"], "'two' is not a positive whole number"),
])
def test_bad_sizes_are_refused_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
