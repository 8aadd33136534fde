"""Products with local matrices (footprint sums): equal to the dense product, blocks only where they pay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nwbflow.ephys.local_matrix import BLOCK_ROWS, LocalMatrix, depth_keys
from nwbflow.ephys.shanks import separate_shanks


def _neuropixels(num_channels: int) -> np.ndarray:
    """(C, 2) µm: Neuropixels 1.0's checkerboard, 2 channels per 20 µm row."""
    row = np.arange(num_channels) // 2
    return np.stack([np.where(row % 2 == 0, 16.0, 0.0) + 32.0 * (np.arange(num_channels) % 2), 20.0 * row], axis=1)


def _footprints(positions: np.ndarray, sigmas=(15.0, 30.0), cutoff_um: float = 75.0) -> np.ndarray:
    """(C * F, C): row c * F + f a Gaussian of SD sigmas[f] centred on channel c, zero beyond the cutoff."""
    distance = np.linalg.norm(positions[:, None] - positions[None], axis=2)
    return np.stack([np.exp(-0.5 * (distance / s) ** 2) * (distance <= cutoff_um) for s in sigmas],
                    axis=1).reshape(-1, len(positions))


@pytest.mark.parametrize("shuffled", [False, True])
def test_local_products_equal_the_dense_product_whatever_the_channel_order(device, shuffled):
    positions = _neuropixels(384)
    if shuffled:  # a file whose electrodes are not stored by depth
        positions = positions[np.random.default_rng(1).permutation(len(positions))]
    matrix = _footprints(positions)
    local = LocalMatrix.build(matrix, depth_keys(positions), group=2, device=device)
    assert local.dense is None  # 384 channels: blocks read a small part of the columns
    assert local.weights.shape[2] < 0.15 * 384  # each block reads its neighbourhood, not the probe
    x = torch.randn(384, 5000, device=device, generator=torch.Generator(device=device).manual_seed(0))
    dense = torch.as_tensor(matrix, dtype=torch.float32, device=device)
    expected = dense @ x
    # float32 sums in another order: differences of a few ulps of values of size ~5
    torch.testing.assert_close(local.apply(x), expected, rtol=0, atol=1e-4)
    scale = torch.tensor([1.5, 0.5], device=device)
    maxima = (expected.view(384, 2, -1) / scale[None, :, None]).amax(dim=1).T
    torch.testing.assert_close(local.group_maxima(x, scale), maxima, rtol=0, atol=1e-4)


def test_a_small_probe_keeps_the_dense_product(device):
    positions = _neuropixels(32)
    local = LocalMatrix.build(_footprints(positions), depth_keys(positions), group=2, device=device)
    assert local.dense is not None and local.weights is None
    x = torch.randn(32, 300, device=device)
    torch.testing.assert_close(local.group_maxima(x, torch.ones(2, device=device)),
                               (local.dense @ x).view(32, 2, -1).amax(dim=1).T)


def test_groups_stay_whole_and_every_row_has_one_slot():
    positions = _neuropixels(384)
    local = LocalMatrix.build(_footprints(positions, sigmas=(10.0, 20.0, 30.0)), depth_keys(positions), group=3)
    slots = local.slots.numpy()
    assert len(np.unique(slots)) == len(slots) == 3 * 384
    block_rows = (BLOCK_ROWS // 3) * 3
    groups = slots.reshape(384, 3)
    assert (np.diff(groups, axis=1) == 1).all()  # a channel's rows are consecutive slots of one block
    assert (groups[:, 0] // block_rows == groups[:, 2] // block_rows).all()


def test_depth_keys_order_shanks_then_depth():
    # two shanks 250 µm apart, laid 10 mm apart by separate_shanks; the electrodes listed interleaved
    one_shank = _neuropixels(8)
    positions = np.concatenate([one_shank, one_shank + [250.0, 0.0]])[np.array([0, 8, 1, 9, 2, 10, 3, 11,
                                                                                4, 12, 5, 13, 6, 14, 7, 15])]
    shanks = tuple(str(int(x >= 250.0)) for x in positions[:, 0])
    keys = depth_keys(separate_shanks(positions, shanks))
    order = np.argsort(keys)
    assert [shanks[i] for i in order] == ["0"] * 8 + ["1"] * 8
    assert (np.diff(positions[order[:8], 1]) >= 0).all() and (np.diff(positions[order[8:], 1]) >= 0).all()
