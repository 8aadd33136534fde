"""NWB helpers shared by the ephys and ophys writers."""

from __future__ import annotations

from nwbflow.synth.config import SynthConfig


def _data_io(data, config: SynthConfig):
    from hdmf.backends.hdf5 import H5DataIO

    if config.compression:
        return H5DataIO(data=data, compression="gzip", compression_opts=4)
    return H5DataIO(data=data)


def _create_device(nwbfile, name: str, description: str):
    """A Device linked to a DeviceModel (NWB >= 2.9 keeps the manufacturer on the model)."""
    model = nwbfile.create_device_model(name=f"{name}Model", manufacturer="nwbflow (synthetic)",
                                        description=description)
    return nwbfile.create_device(name=name, description=description, model=model)
