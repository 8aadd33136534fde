"""The spike-inference network: a small 1-D CNN over sliding windows of ΔF/F.

In the spirit of the Spikefinder CNN (Rupprecht) and CASCADE: each output
sample is computed from a window of ΔF/F centred on it (here 223 samples at
the model rate of 100 Hz, 2.2 s) by three convolution layers and a small
dense head. The network is written as a fully convolutional stack, which is
the same function as sliding the window one sample at a time, at a fraction
of the cost. It is noise-level aware: besides ΔF/F it sees, as constant
channels, the trace's noise level (CASCADE's definition) and the frame rate
the data were recorded at, so one network covers 7-100 Hz recordings and
clean to noisy data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CnnSpec:
    """Architecture and input convention of one trained network (stored next to its weights).

    Parameters
    ----------
    model_rate_hz : rate the network runs at (Hz); traces are resampled to it.
    channels : width of the convolution layers.
    kernels : kernel length of the three convolution layers (samples).
    dilations : dilation of the three convolution layers.
    head : width of the dense (1x1) hidden layer.
    """

    model_rate_hz: float = 100.0
    channels: int = 24
    kernels: tuple[int, int, int] = (31, 17, 17)
    dilations: tuple[int, int, int] = (1, 4, 8)
    head: int = 16

    @property
    def window(self) -> int:
        """Samples of ΔF/F each output sample sees (the receptive field, odd)."""
        return 1 + sum((k - 1) * d for k, d in zip(self.kernels, self.dilations))

    @property
    def half_window(self) -> int:
        return self.window // 2

    def as_dict(self) -> dict:
        return {**asdict(self), "kernels": list(self.kernels), "dilations": list(self.dilations)}

    @classmethod
    def from_dict(cls, values: dict) -> CnnSpec:
        return cls(**{**values, "kernels": tuple(values["kernels"]), "dilations": tuple(values["dilations"])})


#: Input channels: ΔF/F, log noise level, log(recorded frame rate / model rate).
NUM_INPUTS = 3
#: Initial bias of the last layer: softplus(-4) = 0.018 spikes per sample (1.8 Hz at 100 Hz).
INITIAL_OUTPUT_BIAS = -4.0
#: ΔF/F is clipped to this range before entering the network (unitless).
DFF_CLIP = (-1.0, 20.0)
#: Recorded frame rates the network was trained on (Hz). Faster recordings are fed to the network as
#: 100 Hz ones (at or above the 100 Hz model rate they look alike once resampled); slower ones as 7 Hz.
TRAINED_RATE_RANGE_HZ = (7.0, 100.0)


class PhaseConv(nn.Module):
    """A valid dilated 1-D convolution computed as an ordinary one on the ``dilation`` interleaved phases.

    The same function as ``nn.Conv1d(..., dilation=d)`` (same weights), several times faster on CPUs
    for training; the input length must be a multiple of ``dilation``.
    """

    def __init__(self, width_in: int, width_out: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(width_in, width_out, kernel)
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        if d == 1:
            return self.conv(x)
        batch, width, length = x.shape
        phases = x.reshape(batch, width, length // d, d).permute(0, 3, 1, 2).reshape(batch * d, width, length // d)
        y = self.conv(phases)
        return y.reshape(batch, d, y.shape[1], y.shape[2]).permute(0, 2, 3, 1).reshape(batch, y.shape[1], -1)


class SpikeCnn(nn.Module):
    """ΔF/F windows -> expected spikes per model sample (non-negative).

    Input (batch, 3, length) float32; output (batch, length - window + 1): the
    valid part, output sample j belonging to input sample j + half_window.
    """

    def __init__(self, spec: CnnSpec = CnnSpec()):
        super().__init__()
        self.spec = spec
        c = spec.channels
        layers: list[nn.Module] = []
        width_in = NUM_INPUTS
        for kernel, dilation in zip(spec.kernels, spec.dilations):
            layers += [PhaseConv(width_in, c, kernel, dilation), nn.ReLU()]
            width_in = c
        layers += [nn.Conv1d(c, spec.head, 1), nn.ReLU(), nn.Conv1d(spec.head, 1, 1), nn.Softplus()]
        self.net = nn.Sequential(*layers)
        # Start near the typical output (~1 Hz = 0.02 spikes per sample), not at softplus(0) = 35 Hz: from
        # there the first steps push every unit into the flat negative end of the softplus, where it stays.
        nn.init.constant_(layers[-2].bias, INITIAL_OUTPUT_BIAS)
        self._multiple = math.lcm(*spec.dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        valid = length - self.spec.window + 1
        # Every dilated layer needs an input length divisible by its dilation: pad the end, trim the output.
        extra = (-(length - (self.spec.kernels[0] - 1))) % self._multiple
        if extra:
            x = nn.functional.pad(x, (0, extra), mode="replicate")
        return self.net(x)[:, 0, :valid]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_sample(spec: CnnSpec) -> int:
    """Multiply-accumulates per output sample (for throughput estimates)."""
    c = spec.channels
    widths = [NUM_INPUTS, c, c, c]
    convs = sum(widths[i] * widths[i + 1] * spec.kernels[i] for i in range(3))
    return int(convs + c * spec.head + spec.head)

