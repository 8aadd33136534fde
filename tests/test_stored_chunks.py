"""Reading stored chunks ourselves (nwbflow.nwb_io._chunks): the same samples as h5py, each chunk decoded once,
corrupt chunks named, and the stored-bytes digest exact."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hdmf.backends.hdf5 import H5DataIO

from nwbflow.errors import BadInputError
from nwbflow.nwb_io import read
from nwbflow.nwb_io._chunks import StoredChunks, decodable
from nwbflow.nwb_io.read import open_session
from nwb_writers import edit_h5, ephys_traces, write_ephys_file

ES = "acquisition/ElectricalSeries"
FILTERS = {"gzip": {"compression": "gzip"}, "gzip+shuffle": {"compression": "gzip", "shuffle": True},
           "shuffle": {"shuffle": True}, "none": {}}


def _dataset(path, data, chunks, fillvalue=None, **filters):
    with h5py.File(path, "w") as handle:
        handle.create_dataset("d", data=data, chunks=chunks, fillvalue=fillvalue, **filters)
    return path


@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "float32", "float64"])
def test_every_window_reads_as_h5py_reads_it(tmp_path, filters, dtype):
    rng = np.random.default_rng(0)
    data = (rng.normal(0, 300, (1003, 37))).astype(dtype)  # rows and columns not multiples of the chunk
    path = _dataset(tmp_path / "d.h5", data, (128, 16), **FILTERS[filters])
    with h5py.File(path, "r") as handle:
        assert decodable(handle["d"])
        reader = StoredChunks(handle["d"], threads=2, path=path, obj="d", cache_bytes=3 * 128 * 37 * 8)
        try:
            for start, stop in [(0, 1003), (5, 6), (120, 700), (690, 1003), (0, 128), (1000, 2000), (-5, 3)]:
                np.testing.assert_array_equal(reader.read(start, stop), data[max(start, 0):min(stop, 1003)])
        finally:
            reader.close()


def test_consecutive_windows_decode_each_chunk_once(tmp_path, monkeypatch):
    data = ephys_traces(4000)
    path = _dataset(tmp_path / "d.h5", data, (256, data.shape[1]), compression="gzip", shuffle=True)
    decoded = []
    real = StoredChunks._decode
    monkeypatch.setattr(StoredChunks, "_decode", lambda self, *job: decoded.append(job[1]) or real(self, *job))
    with h5py.File(path, "r") as handle:
        reader = StoredChunks(handle["d"], threads=2, path=path, obj="d")
        for start in range(0, 4000, 300):  # windows with margins of 50 samples, straddling chunk edges
            np.testing.assert_array_equal(reader.read(start - 50, start + 350), data[max(start - 50, 0):start + 350])
        reader.close()
    assert sorted(decoded) == [(k, 0) for k in range(0, 4000, 256)]  # 16 chunks, each decoded once


def test_chunks_never_written_read_as_the_fill_value(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("d", shape=(500, 8), dtype="int16", chunks=(100, 4), fillvalue=-7,
                                        compression="gzip")
        dataset[0:100, 0:4] = 1
    with h5py.File(path, "r") as handle:
        reader = StoredChunks(handle["d"], threads=1, path=path, obj="d")
        np.testing.assert_array_equal(reader.read(0, 500), handle["d"][:])
        assert (reader.read(0, 500) == -7).sum() == 500 * 8 - 400
        reader.close()


def test_a_corrupt_chunk_names_the_file_object_and_rows(tmp_path):
    data = ephys_traces()[:2000]
    path = _dataset(tmp_path / "d.h5", data, (500, data.shape[1]), compression="gzip")
    with h5py.File(path, "r+") as handle:
        mask, stored = handle["d"].id.read_direct_chunk((500, 0))
        handle["d"].id.write_direct_chunk((500, 0), b"\x00" * 10 + stored[10:], mask)
    with h5py.File(path, "r") as handle:
        reader = StoredChunks(handle["d"], threads=2, path=path, obj="acquisition/x/data")
        np.testing.assert_array_equal(reader.read(0, 500), data[:500])  # the good chunk still reads
        with pytest.raises(BadInputError, match="rows 500:1000 of d cannot be decoded") as caught:
            reader.read(0, 2000)
        assert "d.h5" in str(caught.value) and "acquisition/x/data" in str(caught.value)
        reader.close()


@pytest.mark.parametrize("filters, ok", [({"compression": "lzf"}, False), ({"fletcher32": True}, False),
                                         ({"scaleoffset": 0}, False), ({"compression": "gzip"}, True)])
def test_only_deflate_and_shuffle_are_decoded_here(tmp_path, filters, ok):
    path = _dataset(tmp_path / "d.h5", np.arange(4000, dtype="int16").reshape(1000, 4), (100, 4), **filters)
    with h5py.File(path, "a") as handle:
        assert decodable(handle["d"]) is ok
        handle.create_dataset("flat", data=np.arange(10), chunks=(5,), compression="gzip")
        assert not decodable(handle["flat"])  # 1-D


def test_the_stored_digest_is_stable_sees_one_sample_and_ignores_threads(tmp_path):
    data = ephys_traces()[:3000]
    paths = [_dataset(tmp_path / f"{name}.h5", data, (256, 4), compression="gzip") for name in "ab"]
    with h5py.File(paths[1], "r+") as handle:
        handle["d"][1234, 2] += 1
    digests = []
    for path, threads in ((paths[0], 1), (paths[0], 3), (paths[1], 2)):
        with h5py.File(path, "r") as handle:
            reader = StoredChunks(handle["d"], threads=threads, path=path, obj="d")
            digests.append(reader.stored_digest())
            reader.close()
    assert digests[0] == digests[1] != digests[2]
    assert digests[0].startswith("sha256-stored:") and len(digests[0]) == len("sha256-stored:") + 64


def test_a_series_in_gzip_chunks_is_read_and_hashed_from_its_stored_chunks(tmp_path):
    data = ephys_traces()
    packed = write_ephys_file(tmp_path / "packed.nwb", conversion=1e-6,
                              data=H5DataIO(data, compression="gzip", shuffle=True, chunks=(256, 4)))
    with open_session(packed) as session:
        series = session.select_ephys()
        assert series._chunks is not None
        np.testing.assert_array_equal(series.get_traces(100, 700), data[100:700])
        assert series.content_hash().startswith("sha256-stored:")


def test_a_flat_series_in_chunks_is_still_refused(tmp_path):
    flat = np.full((3000, 4), 5, dtype=np.int16)
    path = write_ephys_file(tmp_path / "flat.nwb", conversion=1e-6,
                            data=H5DataIO(flat, compression="gzip", chunks=(256, 4)))
    with open_session(path) as session, pytest.raises(BadInputError, match="every channel is constant"):
        session.select_ephys().content_hash()


@pytest.mark.parametrize("peak, refused", [(10, False), (2**31 - 1, True)])
def test_a_conversion_the_dtype_range_overflows_is_checked_on_every_value(tmp_path, peak, refused):
    # int32 x 1e30 V: the dtype's range overflows float32 µV; the values decide (read in full).
    data = np.zeros((3000, 4), dtype=np.int32)
    data[::7, :] = np.arange(4)
    data[2500, 1] = peak
    path = write_ephys_file(tmp_path / "big.nwb", conversion=1e24,
                            data=H5DataIO(data, compression="gzip", chunks=(256, 4)))
    with open_session(path) as session:
        series = session.select_ephys()
        if refused:
            with pytest.raises(BadInputError, match="beyond the float32 range"):
                series.content_hash()
        else:
            assert series.content_hash().startswith("sha256:")  # the decoded-values hash: every value read


def test_a_corrupt_chunk_past_the_checked_block_is_found_where_it_is_first_decoded(tmp_path, monkeypatch):
    # The stored-bytes hash decodes nothing past the first block in which a channel varies: a damaged chunk
    # further on is named by the read that first decodes it (preprocess, in a run).
    monkeypatch.setattr(read, "HASH_BLOCK_BYTES", 1000)
    path = write_ephys_file(tmp_path / "s.nwb", conversion=1e-6,
                            data=H5DataIO(ephys_traces(), compression="gzip", chunks=(500, 4)))
    with h5py.File(path, "r") as handle:
        chunk = handle[f"{ES}/data"].id.get_chunk_info(4)
    with open(path, "r+b") as handle:
        handle.seek(chunk.byte_offset + chunk.size // 2)
        handle.write(b"\xff" * 8)
    with open_session(path) as session:
        series = session.select_ephys()
        assert series.content_hash().startswith("sha256-stored:")
        np.testing.assert_array_equal(series.get_traces(0, 2000), ephys_traces()[:2000])
        with pytest.raises(BadInputError, match=f"{ES}/data: rows 2000:2500 of {ES}/data cannot be decoded"):
            series.get_traces(1900, 2600)
