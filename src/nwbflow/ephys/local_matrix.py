"""Products with matrices whose rows each read a few nearby channels, at a cost linear in the channels.

Footprint sums over a channel's neighbourhood (detection) are ``M @ x`` with ``M`` (R, C) zero outside
each row's neighbourhood. As a dense product that costs ``R x C`` per sample: at 384 channels 95 % of it
multiplies zeros, and the cost grows with the channels squared. :class:`LocalMatrix` groups the rows into
blocks of :data:`BLOCK_ROWS` whose neighbourhoods lie close together (rows ordered along a key, e.g. the
depth of the channel they are centred on), gathers for each block only the columns its rows read, and
multiplies block by block (one batched product): ``R x U`` per sample, ``U`` the columns a block reads,
independent of the probe's length. The result equals the dense product up to float summation order.

When the blocks would read nearly every column anyway (small probes, or rows not local), the dense
product is kept: it is faster there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Rows multiplied together as one block.
BLOCK_ROWS = 32
#: Blocks are used when they read at most this fraction of the columns a dense product would.
MAX_READ_FRACTION = 0.6


@dataclass(frozen=True)
class LocalMatrix:
    """A (rows, columns) matrix applied through blocks of nearby rows; rows come in groups of ``group``
    consecutive rows that share a key (e.g. the footprints centred on one channel) and stay together.

    Attributes
    ----------
    group : int
    dense : (rows, columns) tensor or None
        Kept when blocks would not pay (then the product is dense).
    weights : (blocks, BLOCK_ROWS, U) tensor or None
        Each block's rows restricted to the columns it reads (zero rows pad the last block).
    columns : (blocks, U) int64 tensor or None
        The columns each block reads (repeats pad the shorter lists, with zero weights).
    slots : (rows,) int64 tensor
        Where each row lands among the stacked blocks' rows (``arange`` when dense).
    """

    group: int
    dense: torch.Tensor | None
    weights: torch.Tensor | None
    columns: torch.Tensor | None
    slots: torch.Tensor

    @classmethod
    def build(cls, matrix: np.ndarray, group_keys: np.ndarray, group: int = 1,
              device: torch.device | str = "cpu") -> LocalMatrix:
        """``matrix`` (R, C) float, R = G x ``group``; ``group_keys`` (G,) sort key putting groups whose
        nonzero columns lie together next to each other (e.g. :func:`depth_keys` of the channel each group
        is centred on)."""
        matrix = np.asarray(matrix, dtype=np.float32)
        rows, num_columns = matrix.shape
        groups_per_block = max(BLOCK_ROWS // group, 1)
        ordered = np.argsort(np.asarray(group_keys), kind="stable")
        blocks = [(ordered[lo: lo + groups_per_block, None] * group + np.arange(group)).ravel()
                  for lo in range(0, len(ordered), groups_per_block)]
        reads = [np.flatnonzero(np.any(matrix[block] != 0, axis=0)) for block in blocks]
        width, block_rows = max((len(r) for r in reads), default=0), groups_per_block * group
        if width == 0 or len(blocks) * block_rows * width > MAX_READ_FRACTION * rows * num_columns:
            return cls(group, torch.as_tensor(matrix, device=device), None, None, torch.arange(rows, device=device))
        weights = np.zeros((len(blocks), block_rows, width), dtype=np.float32)
        columns = np.zeros((len(blocks), width), dtype=np.int64)
        slots = np.zeros(rows, dtype=np.int64)
        for index, (block, read) in enumerate(zip(blocks, reads)):
            columns[index] = np.concatenate([read, np.full(width - len(read), read[0] if len(read) else 0)])
            weights[index, :len(block), :len(read)] = matrix[np.ix_(block, read)]
            slots[block] = index * block_rows + np.arange(len(block))
        return cls(group, None, torch.as_tensor(weights, device=device),
                   torch.as_tensor(columns, device=device), torch.as_tensor(slots, device=device))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, L) product ``matrix @ x`` of ``x`` (columns, L)."""
        if self.dense is not None:
            return self.dense @ x
        return torch.bmm(self.weights, x[self.columns]).flatten(0, 1)[self.slots]

    def group_maxima(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(L, G) time-major: for each group, the largest of its rows of ``matrix @ x`` divided by ``scale``
        (``group``,), row ``f`` of every group by ``scale[f]``. ``x`` (columns, L)."""
        if self.dense is not None:
            return (self.dense @ x).view(-1, self.group, x.shape[1]).div_(scale[:, None]).amax(dim=1).T
        # time-major block products (blocks, L, block rows): the layout BLAS writes fastest here
        products = torch.bmm(x[self.columns].transpose(1, 2), self.weights.transpose(1, 2))
        blocks, length, block_rows = products.shape
        maxima = products.view(blocks, length, block_rows // self.group, self.group).div_(scale).amax(dim=3)
        first = self.slots[::self.group]  # slot of each group's first row
        return maxima[first // block_rows, :, (first % block_rows) // self.group].T  # (L, G)


#: Channels farther apart than this across the probe (µm) are taken to lie on different shanks by
#: :func:`depth_keys` (``nwbflow.ephys.shanks.separate_shanks`` lays shanks 10 mm apart).
SHANK_GAP_UM = 1000.0


def depth_keys(channel_positions_um: np.ndarray) -> np.ndarray:
    """(C,) rank of each channel ordered by shank, then depth, then x: consecutive channels are neighbours.

    ``channel_positions_um`` (C, 2) µm; x positions more than :data:`SHANK_GAP_UM` apart count as
    different shanks."""
    positions = np.asarray(channel_positions_um, dtype=np.float64)
    x, y = positions[:, 0], positions[:, 1]
    columns = np.sort(np.unique(x))
    shank_of_column = np.concatenate([[0], np.cumsum(np.diff(columns) > SHANK_GAP_UM)])
    shank = shank_of_column[np.searchsorted(columns, x)]
    ranks = np.empty(len(x), dtype=np.int64)
    ranks[np.lexsort((x, y, shank))] = np.arange(len(x))
    return ranks
