"""A whole scan segmented in its own grid: the reader's reorientation, resampling and crop are undone exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeta.common.data import DataConfig
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
