"""Reading and writing checkpoints one tensor at a time, so converting a model needs memory for the
largest tensor group, not for the model.

- `save_model_streaming` writes a megatron-core dist-checkpoint (torch_dist format) from a model whose
  parameters live on the meta device: torch.distributed.checkpoint asks the planner for each chunk's
  data only when it writes that chunk, and our planner computes it then.
- `CheckpointReader` reads one of our parameters (all its shards, merged) from any dist-checkpoint,
  whatever layout saved it.
- `SafetensorsReader` / `SafetensorsWriter` read HuggingFace shards lazily and write them
  incrementally (every header is known before the first byte of data).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import gc
import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from megatron_mm.checkpoint.hf_rules import HFConversionError

STREAMING_CACHE_SIZE = 4  # materialised parameters kept while their shards are written
GC_EVERY_LOADS = 200


def _applied_shards(name: str, entry) -> list:
    """The ShardedTensors an entry of a sharded state dict becomes (factories built)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    holder = {name: entry}
    apply_factories(holder)
    return list(nested_values(holder))


def _chunk_id(shard) -> tuple[str, tuple[int, ...]]:
    return shard.key, tuple(shard.global_offset)


def save_model_streaming(sharded_state_dict: dict, directory: Path, materialize: Callable[[str], torch.Tensor]):
    """Write `sharded_state_dict` (a one-rank model on the meta device) as a dist-checkpoint.

    `materialize(name)` returns the real tensor of the parameter stored under `name` in the sharded
    state dict; it is called while writing, a few parameters at a time.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    owner: dict[tuple, tuple[str, object]] = {}  # chunk -> (parameter name, its state-dict entry)
    applied = {}
    for name, entry in sharded_state_dict.items():
        if isinstance(entry, ShardedObject):
            applied[name] = entry
            continue
        for i, shard in enumerate(_applied_shards(name, entry)):
            owner[_chunk_id(shard)] = (name, entry)
            applied[f"{name}#{i}"] = copy.copy(shard)  # the translation below reshapes .data in place
    grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(applied)
    pyt_state_dict = mcore_to_pyt_state_dict(grouped, False)

    cache: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def real_chunks(name: str, entry) -> dict:
        if name not in cache:
            tensor = materialize(name)
            real = dataclasses.replace(entry, data=tensor)
            cache[name] = {_chunk_id(s): s.data.reshape((1,) * s.prepend_axis_num + tuple(s.local_shape))
                           for s in _applied_shards(name, real)}
            while len(cache) > STREAMING_CACHE_SIZE:
                cache.popitem(last=False)
        cache.move_to_end(name)
        return cache[name]

    class StreamingPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk = (write_item.index.fqn, tuple(write_item.index.offset))
            name, entry = owner[chunk]
            return real_chunks(name, entry)[chunk].contiguous()

    directory.mkdir(parents=True, exist_ok=True)
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1, sync_files=True,
                              overwrite=True)
    dcp_save(pyt_state_dict, storage_writer=writer, planner=StreamingPlanner(flatten_state_dict=False),
             no_dist=True)
    torch.save({}, directory / "common.pt")  # no common (unsharded) state in a weights-only checkpoint
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(directory))


class CheckpointReader:
    """Reads our parameters, one at a time, from a dist-checkpoint saved at any layout."""

    def __init__(self, directory: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = Path(directory)
        self.metadata = FileSystemReader(str(directory)).read_metadata()
        metadata = self.metadata

        class MetadataOnce(FileSystemReader):  # read per tensor, the metadata file only once
            def read_metadata(self):
                return metadata

        self.storage = MetadataOnce(str(directory))
        self.loads = 0
        self.dtypes = {key: md.properties.dtype for key, md in metadata.state_dict_metadata.items()
                       if isinstance(md, TensorStorageMetadata)}
        counts = collections.Counter()
        for key, md in metadata.state_dict_metadata.items():
            if (isinstance(md, TensorStorageMetadata) and md.properties.dtype.is_floating_point
                    and not key.startswith("optimizer.")):  # fp32 Adam state and main params aside
                counts[md.properties.dtype] += math.prod(md.size)
        self.main_dtype = counts.most_common(1)[0][0]  # the model parameters' dtype

    def load(self, name: str, entry) -> torch.Tensor:
        """Our parameter `name` (its one-rank, meta-device state-dict entry), in its stored dtype.

        Reads only the stored chunks that overlap this parameter: one layer of a key megatron-core
        stacks over all layers costs one layer's memory. (dist_checkpointing.load cannot ask for part
        of a stacked key from a single process, so this plans the read with torch.distributed.checkpoint.)
        """
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        if entry.key not in self.dtypes:
            raise KeyError(f"{self.directory}: no tensor {entry.key} (for {name})")
        buffer = torch.empty(entry.data.shape, dtype=entry.data.dtype)  # converted from the stored dtype
        regions = {}
        for shard in _applied_shards(name, dataclasses.replace(entry, data=buffer)):
            if shard.data.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr():
                raise RuntimeError(f"{name}: its sharded form is not a view of the parameter")
            regions[_chunk_id(shard)] = shard.data.reshape((1,) * shard.prepend_axis_num + tuple(shard.local_shape))
        stored = self.metadata.state_dict_metadata

        class RegionLoadPlanner(DefaultLoadPlanner):
            def create_local_plan(self):
                items = []
                for (key, offset), target in regions.items():
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=target.shape)
                    items += create_read_items_for_chunk_list(key, stored[key], [chunk])
                return LoadPlan(items)

            def resolve_tensor(self, read_item):
                target = regions[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
                for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                    target = target.narrow(dim, start, length)
                return target

        dcp_load({}, storage_reader=self.storage, planner=RegionLoadPlanner(), no_dist=True)
        # Each read leaves reference cycles (planner, read plans); with a large model's many live
        # objects Python's full collection runs too rarely to keep memory flat on its own.
        self.loads += 1
        if self.loads % GC_EVERY_LOADS == 0:
            gc.collect()
        return buffer


# ---- safetensors --------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of one safetensors file, its header checked against the file: a file
    that is missing, truncated, or whose header is not valid JSON or points past the end raises one
    line naming the file and the problem."""
    dtypes = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
    if not path.is_file():
        raise HFConversionError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise HFConversionError(f"{path}: truncated safetensors file ({size} bytes, shorter than its 8-byte header size)")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise HFConversionError(f"{path}: truncated safetensors file (a {length}-byte header in a {size}-byte file)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as err:
            raise HFConversionError(f"{path}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise HFConversionError(f"{path}: safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HFConversionError(f"{path}: header entry of {name} lacks dtype, shape or data_offsets") from None
        if code not in dtypes:
            raise HFConversionError(f"{path}: {name} has dtype {code!r}, which this converter does not read")
        needed = math.prod(shape) * torch.empty((), dtype=dtypes[code]).element_size()
        if not 0 <= start <= end or end - start != needed:
            raise HFConversionError(f"{path}: {name} has data_offsets [{start}, {end}], but its {code} shape "
                                    f"{list(shape)} takes {needed} bytes")
        if end > data_bytes:
            raise HFConversionError(f"{path}: {name} has data_offsets [{start}, {end}] past the end of the file's "
                                    f"{data_bytes} data bytes (truncated?)")
        tensors[name] = (dtypes[code], shape)
    return tensors


class SafetensorsReader:
    """The tensors of a HuggingFace directory (one model.safetensors or an index of shards), opened
    one file at a time so that only the tensors asked for are read."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise HFConversionError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
        elif single.is_file():
            files = [single.name]
        else:
            raise HFConversionError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")
        self.file_of: dict[str, str] = {}
        self.header: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for file in files:  # headers only: names, dtypes, shapes
            for name, dtype_shape in safetensors_header(self.directory / file).items():
                self.file_of[name] = file
                self.header[name] = dtype_shape

    def names(self) -> set[str]:
        return set(self.file_of)

    def meta(self, names: Iterable[str]) -> list[torch.Tensor]:
        """Meta-device stand-ins (shape and dtype from the file headers, no data read)."""
        return [torch.empty(self.header[name][1], dtype=self.header[name][0], device="meta") for name in names]

    def main_dtype(self) -> torch.dtype:
        """The dtype most of the bytes are stored in."""
        counts = collections.Counter()
        for dtype, shape in self.header.values():
            counts[dtype] += math.prod(shape)
        return counts.most_common(1)[0][0]

    def get(self, names: Iterable[str]) -> list[torch.Tensor]:
        from safetensors import safe_open

        names = list(names)
        by_file = collections.defaultdict(list)
        for name in names:
            by_file[self.file_of[name]].append(name)
        found = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.directory / file), "pt") as handle:
                for name in file_names:
                    found[name] = handle.get_tensor(name)
        return [found[name] for name in names]


@dataclasses.dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsWriter:
    """Writes planned tensors, in plan order, into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own) plus model.safetensors.index.json when there is more than one."""

    def __init__(self, directory: Path, plan: list[PlannedTensor], max_shard_bytes: int):
        self.directory = Path(directory)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in plan:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = shards
        self.order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self.position = 0
        self.handle = None
        self.current_file = -1

    def _open(self, index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor in self.shards[index]:
            header[tensor.name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        self.handle = open(self.directory / self.files[index], "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.current_file = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, planned = self.order[self.position]
        if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"writing {name} {tuple(tensor.shape)} {tensor.dtype}, planned {planned}")
        if index != self.current_file:
            self._open(index)
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self.handle.write(data.reshape(-1).view(torch.uint8).numpy())
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.order):
            raise RuntimeError(f"only {self.position} of {len(self.order)} planned tensors were written")
        if self.handle is not None:
            self.handle.close()
        if len(self.files) > 1:
            weight_map = {t.name: self.files[i] for i, t in self.order}
            total = sum(t.nbytes for _, t in self.order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def parse_size(text: Optional[str]) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    text = str(text).strip().upper()
    for suffix, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)
