"""Read a 2-D chunked HDF5 dataset from its stored chunks: each decoded once, on a thread pool.

h5py decodes a compressed chunk for every read that touches it (its chunk
cache, 1 MiB by default, holds none of the 2-10 MiB chunks NWB writers use),
holds the GIL and one global lock while it inflates, and decodes one chunk at
a time. A stream of windows with margins over such a dataset decodes the
chunks at each window's edges twice and leaves the other core idle.

:class:`StoredChunks` reads the stored bytes of whole chunk rows itself
(``read_direct_chunk``: no decoding under h5py's lock), inflates them with
``zlib`` on a pool of threads (zlib lets go of the GIL while it inflates),
undoes HDF5's byte shuffle with numpy, and keeps the last few decoded chunk
rows, so consecutive windows decode each chunk once. It reads datasets whose
filters are deflate (gzip) and shuffle, in any order and any subset, which is
what pynwb, NeuroConv, MatNWB and AqNWB write; :func:`decodable` says whether
a dataset is one (the caller reads others through h5py).

:meth:`StoredChunks.stored_digest` hashes the chunks' stored bytes without
decoding them: exact (any change to the data changes a stored chunk) and a
fraction of the cost of hashing decoded samples, but it depends on how the
file chunks and compresses the data (``sha256-stored:`` says so).
"""

from __future__ import annotations

import hashlib
import math
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from nwbflow.errors import BadInputError, TransientError
from nwbflow.nwb_io._hdf5 import CORRUPT_FIX, H5_ERRORS, is_io_failure

#: HDF5 filter ids this reader decodes: deflate (gzip) and byte shuffle.
DEFLATE, SHUFFLE = h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE
#: Decoded chunk rows kept for the next read, at most this many bytes (about 3 rows of 2-MiB chunks x 384 ch).
CACHE_BYTES = 64 << 20


def filter_pipeline(dataset: h5py.Dataset) -> tuple[int, ...]:
    """The ids of ``dataset``'s filters in the order they were applied on writing."""
    plist = dataset.id.get_create_plist()
    return tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))


def decodable(dataset: h5py.Dataset) -> bool:
    """Whether :class:`StoredChunks` can read ``dataset``: 2-D, chunked, filters among deflate and shuffle."""
    return (dataset.ndim == 2 and dataset.chunks is not None and dataset.dtype.kind in "iuf"
            and set(filter_pipeline(dataset)) <= {DEFLATE, SHUFFLE})


class StoredChunks:
    """Rows of a 2-D chunked ``dataset`` (:func:`decodable`), decoded from its stored chunks.

    Parameters
    ----------
    dataset : h5py.Dataset
        (rows, columns), chunked; its file stays open while this is used.
    threads : int
        Threads that inflate chunks at once.
    path, obj : the file and the dataset's object path, for messages.
    cache_bytes : int
        Decoded chunk rows kept for later reads (at least one row is kept).
    """

    def __init__(self, dataset: h5py.Dataset, *, threads: int, path: Path, obj: str,
                 cache_bytes: int = CACHE_BYTES):
        self._data, self.path, self.obj = dataset, path, obj
        self.rows, self.columns = dataset.shape
        self.chunk_rows, self.chunk_columns = dataset.chunks
        self._pipeline = filter_pipeline(dataset)
        self._fill = dataset.fillvalue
        row_bytes = self.chunk_rows * self.columns * dataset.dtype.itemsize
        self._cache_rows = max(1, cache_bytes // max(row_bytes, 1))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # one read at a time (a prefetch thread and the caller)
        self._pool = ThreadPoolExecutor(max_workers=max(int(threads), 1), thread_name_prefix="nwbflow-inflate")

    def close(self) -> None:
        """Stop the pool and drop the cache."""
        self._pool.shutdown(wait=True)
        self._cache.clear()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (clipped to the dataset), (n, columns) of the stored dtype."""
        start, stop = max(int(start), 0), min(int(stop), self.rows)
        out = np.empty((max(stop - start, 0), self.columns), dtype=self._data.dtype)
        if stop <= start:
            return out
        with self._lock:
            first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
            missing = [k for k in range(first, last + 1) if k not in self._cache]
            decoded = dict(zip(missing, self._decode_rows(missing)))
            blocks = {k: decoded[k] if k in decoded else self._cache[k] for k in range(first, last + 1)}
            for k, block in blocks.items():
                self._remember(k, block)
                lo = k * self.chunk_rows
                a, b = max(start, lo), min(stop, lo + block.shape[0])
                out[a - start:b - start] = block[a - lo:b - lo]
        return out

    def stored_digest(self) -> str:
        """``"sha256-stored:<hex>"`` of the dtype, shape, chunk shape, filters and every chunk's stored bytes
        (with its filter mask), in row-major chunk order; nothing is decoded."""
        digest = hashlib.sha256()
        digest.update(f"dtype={self._data.dtype.str};shape={self._data.shape};chunks={self._data.chunks};"
                      f"filters={self._pipeline}".encode())
        with self._lock:
            for k in range(math.ceil(self.rows / self.chunk_rows)):
                for offset in self._offsets(k):
                    stored = self._stored(offset)
                    digest.update(b"fill" if stored is None else stored[0].to_bytes(4, "little") + stored[1])
        return "sha256-stored:" + digest.hexdigest()

    def _offsets(self, k: int) -> list[tuple[int, int]]:
        return [(k * self.chunk_rows, j) for j in range(0, self.columns, self.chunk_columns)]

    def _remember(self, k: int, block: np.ndarray) -> None:
        self._cache[k] = block
        self._cache.move_to_end(k)
        while len(self._cache) > self._cache_rows:
            self._cache.popitem(last=False)

    def _decode_rows(self, ks: list[int]) -> list[np.ndarray]:
        """Chunk rows ``ks`` decoded, (chunk_rows or fewer at the end, columns) each: stored bytes read here,
        in order, inflated on the pool."""
        blocks = [np.empty((min(self.chunk_rows, self.rows - k * self.chunk_rows), self.columns),
                           dtype=self._data.dtype) for k in ks]

        def place(block: np.ndarray, k: int, offset: tuple[int, int], stored) -> None:
            column = offset[1]
            width = min(self.chunk_columns, self.columns - column)
            block[:, column:column + width] = self._decode(k, offset, stored)[:len(block), :width]

        jobs = [self._pool.submit(place, block, k, offset, self._stored(offset))
                for block, k in zip(blocks, ks) for offset in self._offsets(k)]
        for job in jobs:
            job.result()  # each piece lands in its own columns; an error is raised here
        return blocks

    def _stored(self, offset: tuple[int, int]) -> tuple[int, bytes] | None:
        """(filter mask, stored bytes) of the chunk at ``offset``; None where the chunk was never written."""
        try:
            info = self._data.id.get_chunk_info_by_coord(offset)
            if info.byte_offset is None:
                return None
            return self._data.id.read_direct_chunk(offset)
        except H5_ERRORS as exc:
            if is_io_failure(exc):
                raise TransientError(f"{self.path}: {self.obj}: reading the chunk at {offset} failed ({exc}); "
                                     "retry, or check the file's integrity") from exc
            raise self._corrupt(offset, exc) from exc

    def _decode(self, k: int, offset: tuple[int, int], stored: tuple[int, bytes] | None) -> np.ndarray:
        """One chunk, (chunk_rows, chunk_columns) of the stored dtype."""
        shape = (self.chunk_rows, self.chunk_columns)
        if stored is None:
            return np.full(shape, self._fill, dtype=self._data.dtype)
        mask, data = stored
        try:
            for position in reversed(range(len(self._pipeline))):  # undone last-applied first
                if mask & (1 << position):
                    continue  # HDF5 skipped this filter for this chunk
                if self._pipeline[position] == DEFLATE:
                    data = zlib.decompress(data)
                else:
                    data = _unshuffle(data, self._data.dtype.itemsize)
            return np.frombuffer(data, dtype=self._data.dtype).reshape(shape)
        except (zlib.error, ValueError) as exc:
            raise self._corrupt(offset, exc) from exc

    def _corrupt(self, offset: tuple[int, int], exc: BaseException) -> BadInputError:
        lo = offset[0]
        return BadInputError(f"rows {lo}:{min(lo + self.chunk_rows, self.rows)} of "
                             f"{self._data.name.lstrip('/')} cannot be decoded, so the file is corrupt ({exc})",
                             path=self.path, obj=self.obj, fix=CORRUPT_FIX)


def _unshuffle(data: bytes, itemsize: int) -> bytes:
    """Undo HDF5's shuffle filter: byte ``b`` of every element was stored together, bytes past the last whole
    element as they were."""
    if itemsize == 1:
        return data
    whole = len(data) // itemsize * itemsize
    planes = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(itemsize, -1)
    return planes.T.tobytes() + data[whole:]
