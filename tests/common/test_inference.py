"""A whole scan segmented in its own grid: the reader's reorientation, resampling and crop are undone exactly."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmeta.common import inference
from fedmeta.common.data import DataConfig, to_ras
from fedmeta.common.inference import segment_scan
from fedmeta.common.model import ModelConfig, build_model, initial_params


class _Threshold(torch.nn.Module):
    """A 'model' that labels bright voxels 1: its mask must land exactly where the bright voxels are."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), self.scale * (x - 0.5)], dim=1)


@pytest.mark.parametrize("affine", [
    np.diag([2.0, 2.0, 2.0, 1.0]),  # RAS already, at the model's spacing: nothing to undo but the crop
    np.array([[0, 0, -1.5, 90], [-1.0, 0, 0, 100], [0, 1.2, 0, -50], [0, 0, 0, 1]]),  # permuted, flipped, anisotropic
])
def test_the_mask_is_the_bright_region_in_the_scans_own_grid(affine):
    scan = np.zeros((40, 36, 30), np.float32)
    scan[5:30, 8:28, 6:24] = 1.0  # a head
    scan[12:20, 14:22, 10:18] = 3.0  # a bright structure inside it
    model = _Threshold()
    params = dict(model.named_parameters())
    result = segment_scan(model, params, scan, affine, DataConfig(image_size=(64, 64)), num_classes=2)
    truth = scan > 2.0
    assert result.mask.shape == scan.shape and result.mask.dtype == np.uint8
    # Resampling there and back blurs a boundary voxel or two; the structure itself is where it was.
    agreement = 2 * (truth & (result.mask == 1)).sum() / (truth.sum() + (result.mask == 1).sum())
    assert agreement > 0.8, agreement


def test_a_3d_model_segments_its_training_patch_and_calls_the_rest_background():
    config = DataConfig(spatial_dims=3, image_size=(16, 16, 16))
    model = build_model(ModelConfig(spatial_dims=3, channels=(4, 8), strides=(2,)))
    scan = np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32) + 5
    result = segment_scan(model, initial_params(model), scan, np.diag([2.0, 2.0, 2.0, 1.0]), config, num_classes=4,
                          probabilities=True)
    assert result.mask.shape == scan.shape and result.probabilities.shape == (*scan.shape, 4)
    assert np.allclose(result.probabilities.sum(axis=-1), 1.0, atol=1e-4)
    assert (result.mask[0] == 0).all()  # outside the 16-voxel window: background


# The back-resampling: torch's trilinear kernel, three linear passes, a chunk of output slices at a time.

def _whole_volume(probs: torch.Tensor, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The previous implementation's back-resampling: each class [X, Y, Z] resampled whole (trilinear), a running
    arg-max with torch.where; returns (mask, probabilities [X, Y, Z, classes])."""
    best = torch.full(shape, -1.0)
    mask = torch.zeros(shape, dtype=torch.uint8)
    kept = []
    for c in range(probs.shape[0]):
        p = torch.nn.functional.interpolate(probs[c][None, None], size=shape, mode="trilinear",
                                            align_corners=False)[0, 0]
        better = p > best
        best = torch.where(better, p, best)
        mask[better] = c
        kept.append(p)
    return mask.numpy(), torch.stack(kept, dim=-1).numpy()


@pytest.mark.parametrize(("model_grid", "scan_grid", "classes"), [
    ((21, 22, 23), (61, 45, 70), 3),  # upsampled on every axis, as a brain at 3 mm back to 1 mm
    ((32, 30, 9), (64, 61, 9), 4),  # slices kept (CT at its native slice spacing): that pass is skipped
    ((40, 33, 20), (17, 33, 51), 2),  # down, kept, up
    ((1, 12, 7), (5, 1, 13), 3),  # single voxels
    ((10, 11, 12), (23, 19, 17), 20),  # many classes: counted with bincount
])
def test_back_resampling_is_torchs_trilinear_bit_for_bit(model_grid, scan_grid, classes, monkeypatch):
    monkeypatch.setattr(inference, "CHUNK_BYTES", 4 * classes * scan_grid[0] * scan_grid[1] * 2)  # 2 slices a chunk
    generator = torch.Generator().manual_seed(sum(scan_grid))
    probs = torch.softmax(4 * torch.randn((classes, *model_grid), generator=generator), dim=0)  # [classes, X, Y, Z]
    probs[:, :3, :2] = probs[:, :1, :1, :1].clone()  # ties between voxels, and between classes below
    probs[:2, -2:] = 0.5
    mask, kept = np.empty(scan_grid, np.uint8), np.empty((*scan_grid, classes), np.float32)
    counts = inference._to_scan_grid(inference._linear(probs.permute(0, 3, 1, 2), 1, scan_grid[2]), scan_grid,
                                     mask, kept)
    expected_mask, expected_kept = _whole_volume(probs, scan_grid)
    assert np.array_equal(mask, expected_mask) and np.array_equal(kept, expected_kept)
    assert counts.tolist() == np.bincount(expected_mask.ravel(), minlength=classes).tolist()


def test_a_nan_probability_never_wins_the_arg_max_as_before(monkeypatch):
    monkeypatch.setattr(inference, "CHUNK_BYTES", 4 * 3 * 20 * 20)
    probs = torch.softmax(torch.randn(3, 10, 10, 6, generator=torch.Generator().manual_seed(1)), dim=0)
    probs[1, 2:5, 3:6] = float("nan")
    probs[0, 6:, :, 2] = float("nan")
    mask = np.empty((20, 20, 12), np.uint8)
    inference._to_scan_grid(inference._linear(probs.permute(0, 3, 1, 2), 1, 12), (20, 20, 12), mask, None)
    assert np.array_equal(mask, _whole_volume(probs, (20, 20, 12))[0])


ORIENTATIONS = [np.diag([*signs, 1.0])[:, [*order, 3]] for order in itertools.permutations(range(3))
                for signs in itertools.product((1.0, -1.0), repeat=3)]


@pytest.mark.parametrize("affine", ORIENTATIONS, ids=[
    "".join(nib.aff2axcodes(a)) for a in ORIENTATIONS])
def test_what_is_written_in_ras_order_lands_in_the_scans_own_voxel_order(affine):
    """The mask is written through a view of the scan-ordered array: to_ras of it gives back what was written."""
    scan = np.empty((4, 5, 6), dtype=np.uint8, order="F")
    view = inference._scan_view(scan, affine)
    written = np.arange(scan.size, dtype=np.uint8).reshape(view.shape)
    view[...] = written
    assert np.array_equal(to_ras(scan, affine)[0], written)
