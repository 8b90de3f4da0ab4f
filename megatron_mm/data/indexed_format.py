"""megatron-core's indexed dataset format (PREFIX.bin / PREFIX.idx), written and checked without
importing megatron-core (its import takes seconds; a small preprocessing job takes less).

PREFIX.idx, little-endian: magic b"MMIDIDX\\0\\0" | version u64 (=1) | dtype code u8 | sequence count u64 |
document count u64 | sequence lengths i32[sequences] | sequence byte offsets in .bin i64[sequences] |
document boundaries i64[documents] (sequence indices, starting at 0) | optionally modes i8[sequences].
PREFIX.bin: the token ids of every sequence, back to back, in the dtype the code names.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

import numpy

from megatron_mm.errors import UserError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
INDEX_HEADER = struct.Struct("<9sQBQQ")
# megatron-core's DType codes
DTYPE_CODES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 6: numpy.float64,
               7: numpy.float32, 8: numpy.uint16}
# megatron-core's DType.optimal_dtype: uint16 below this vocabulary size, int32 from it on
UINT16_VOCAB_LIMIT = 65500


def optimal_dtype(vocab_size: int) -> type:
    return numpy.uint16 if vocab_size < UINT16_VOCAB_LIMIT else numpy.int32


def _code_of(dtype) -> int:
    return next(code for code, known in DTYPE_CODES.items() if numpy.dtype(known) == numpy.dtype(dtype))


class IndexedWriter:
    """One sequence per document appended to `bin_path`; `finalize` writes the index."""

    def __init__(self, bin_path: str, dtype: type):
        self.dtype = numpy.dtype(dtype)
        self._bin = open(bin_path, "wb")
        self._lengths: list[int] = []

    def add_document(self, ids: numpy.ndarray) -> None:
        self._bin.write(numpy.asarray(ids, dtype=self.dtype).tobytes())
        self._lengths.append(len(ids))

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        lengths = numpy.asarray(self._lengths, dtype=numpy.int32)
        pointers = (numpy.cumsum(lengths, dtype=numpy.int64) - lengths) * self.dtype.itemsize
        documents = numpy.arange(len(lengths) + 1, dtype=numpy.int64)
        with open(idx_path, "wb") as idx:
            idx.write(INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, _code_of(self.dtype), len(lengths),
                                        len(documents)))
            idx.write(lengths.tobytes())
            idx.write(pointers.tobytes())
            idx.write(documents.tobytes())

    def close(self) -> None:
        self._bin.close()


class IndexSummary(NamedTuple):
    dtype: numpy.dtype
    sequences: int
    documents: int
    bin_bytes: int  # the bytes of .bin the index points into


def check_indexed_dataset(prefix: str) -> IndexSummary:
    """The index of PREFIX, once its .idx is complete, its .bin holds every byte the index points to
    and it holds at least one document; otherwise a UserError naming the file and the problem."""
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as idx:
        header = idx.read(INDEX_HEADER.size)
        if len(header) < INDEX_HEADER.size:
            if not INDEX_MAGIC.startswith(header[:len(INDEX_MAGIC)]):
                raise UserError(f"{idx_path} is not a megatron-core indexed dataset index (no MMIDIDX header)")
            raise UserError(f"{idx_path} is truncated: {idx_size} bytes, shorter than the "
                            f"{INDEX_HEADER.size}-byte header")
        magic, version, code, sequences, documents = INDEX_HEADER.unpack(header)
        if magic != INDEX_MAGIC:
            raise UserError(f"{idx_path} is not a megatron-core indexed dataset index (no MMIDIDX header)")
        if version != INDEX_VERSION or code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unsupported index (version {version}, dtype code {code})")
        tables = sequences * (4 + 8) + documents * 8
        expected = INDEX_HEADER.size + tables
        if idx_size not in (expected, expected + sequences):  # + one mode byte per sequence, when written
            state = "truncated" if idx_size < expected else "longer than its header describes"
            raise UserError(f"{idx_path} is {state}: {idx_size} bytes, its header ({sequences} sequences, "
                            f"{documents} documents) needs {expected}")
        if sequences == 0:
            raise UserError(f"{idx_path} holds no document: an empty dataset cannot be trained on")
        dtype = numpy.dtype(DTYPE_CODES[code])
        lengths = numpy.frombuffer(idx.read(4 * sequences), dtype="<i4")
        pointers = numpy.frombuffer(idx.read(8 * sequences), dtype="<i8")
    needed = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
    if needed == 0:
        raise UserError(f"{idx_path} holds no token: an empty dataset cannot be trained on")
    bin_size = os.path.getsize(bin_path)
    if bin_size < needed:
        raise UserError(f"{bin_path} is truncated: {bin_size} bytes, its index ({sequences} sequences of "
                        f"{dtype.name}) needs {needed}")
    return IndexSummary(dtype, sequences, documents, needed)


def max_token_id(prefix: str, summary: IndexSummary, chunk_items: int = 1 << 24) -> int:
    """The largest id in PREFIX.bin (read in chunks: the file may be larger than memory)."""
    count = summary.bin_bytes // summary.dtype.itemsize
    data = numpy.memmap(f"{prefix}.bin", dtype=summary.dtype, mode="r", shape=(count,))
    return max(int(data[start:start + chunk_items].max()) for start in range(0, count, chunk_items))
