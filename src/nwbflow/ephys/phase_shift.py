"""ADC sample-shift correction: align channels that were digitised a fraction of a sample apart (torch).

A Neuropixels 1.0 probe digitises its 384 channels with 32 ADCs, each
sampling 12 channels one after another within a sample period of 13 ADC
cycles: channel ``c`` of a frame is taken ``inter_sample_shift[c]`` (0 to 12/13)
of a sample period after the frame's first. NeuroConv writes that fraction per
channel in the electrodes table (column ``inter_sample_shift``; SpikeInterface
reads it as the property of the same name). Left alone, a common-mode signal
(line noise, a lick or chewing artefact, reference pickup) reaches the channels
at staggered times, the median across channels no longer cancels it, and the
residue grows with frequency.

:func:`delay_channels` delays each channel by its shift, ``y_c[t] =
x_c[t - shift_c]``, by band-limited (Fourier) interpolation: the spectrum of
the window is rotated by ``exp(-2 pi i f shift_c)``. Before the FFT the line
through the window's first and last samples is taken out (and put back,
delayed), so the window's two ends meet and the circular FFT adds no jump at
the edge; what is left of the edge effect lies in the window's margin, which the
caller drops. SpikeInterface's ``phase_shift`` computes the same rotation (on
a tapered window with its own 40 ms margin); tests compare the two.

:func:`neuropixels_1_shifts` gives the Neuropixels 1.0 pattern for files that
do not carry the column (and for the synthetic sessions).

Examples
--------
>>> import torch
>>> t = torch.arange(3000, dtype=torch.float64)
>>> x = torch.sin(2 * torch.pi * 0.05 * (t + 0.5))[:, None]   # sampled half a sample late
>>> y = delay_channels(x, torch.tensor([0.5], dtype=torch.float64))
>>> float((y[500:2500, 0] - torch.sin(2 * torch.pi * 0.05 * t[500:2500])).abs().max()) < 1e-3
True
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["delay_channels", "neuropixels_1_shifts"]


def delay_channels(traces: torch.Tensor, shifts_samples: torch.Tensor) -> torch.Tensor:
    """Each channel delayed by its own fraction of a sample: ``y_c[t] = x_c[t - shift_c]``.

    Parameters
    ----------
    traces : (n, num_channels) float tensor
        A window (core plus margins), time-major.
    shifts_samples : (num_channels,) float tensor, samples
        The delay of each channel (an ADC's ``inter_sample_shift``), on ``traces``' device.

    Returns
    -------
    (n, num_channels) tensor of ``traces``' dtype and device (a new tensor).
    """
    n = traces.shape[0]
    if n < 2:
        return traces.clone()
    real = torch.float64 if traces.dtype == torch.float64 else torch.float32
    time = torch.arange(n, dtype=real, device=traces.device)[:, None]
    shifts = shifts_samples.to(device=traces.device, dtype=real)[None, :]
    first, slope = traces[:1].to(real), (traces[-1:] - traces[:1]).to(real) / (n - 1)
    spectrum = torch.fft.rfft(traces.to(real) - (first + slope * time), dim=0)
    angles = (-2 * torch.pi) * torch.fft.rfftfreq(n, dtype=real, device=traces.device)[:, None] * shifts
    spectrum *= torch.polar(torch.ones_like(angles), angles)
    delayed = torch.fft.irfft(spectrum, n=n, dim=0)
    delayed += first + slope * (time - shifts)
    return delayed.to(traces.dtype)


def neuropixels_1_shifts(num_channels: int = 384, channels_per_adc: int = 12, cycles: int = 13) -> np.ndarray:
    """The Neuropixels 1.0 ADC pattern: (num_channels,) float64, fractions of a sample.

    Channels come in blocks of ``2 * channels_per_adc``: even channels of a block on one ADC, odd ones
    on the next; the k-th channel an ADC samples is taken ``k / cycles`` of a sample period late.

    >>> neuropixels_1_shifts(48)[:6].round(3).tolist()
    [0.0, 0.0, 0.077, 0.077, 0.154, 0.154]
    """
    channels = np.arange(num_channels)
    order_on_adc = (channels % (2 * channels_per_adc)) // 2
    return order_on_adc / float(cycles)
