"""safetensors files written and read piece by piece, so that no rank ever holds a
whole sharded model or optimizer state, and loading never runs code.

Writing (`write_gathered`): every rank walks the same tensors in the same order;
a sharded tensor is gathered (a collective), rank 0 appends its bytes to the file
at once and drops it. The header (names, shapes, byte offsets) is known before
any gathering, from the global shapes, so it is written first.

Reading (`read_into`): each rank reads only the rows of its own shard (FSDP2
shards dim 0) through safetensors' lazy slices.

safetensors is a JSON header followed by raw bytes: unlike pickle (which
`torch.load` and `torch.distributed.checkpoint`'s metadata use), a file from
someone else cannot run code when it is opened.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct

import torch
from safetensors import SafetensorError, safe_open

from nanobumble.base.distributed import is_main
from nanobumble.base.errors import UserError
from nanobumble.base.files import atomic_path

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}


class DamagedFile(UserError):
    """A safetensors file that cannot be read as written (truncated, garbage, wrong tensors)."""


def write_gathered(path: str, named_tensors: list[tuple[str, torch.Tensor]],
                   metadata: dict[str, str] | None = None) -> None:
    """Write full tensors to a safetensors file; every rank calls this with the same
    names in the same order (sharded tensors are gathered), rank 0 writes. The file
    appears under its name only when complete, with the permissions of any other new file."""
    header, offset = {}, 0
    for name, tensor in named_tensors:
        nbytes = math.prod(tensor.shape) * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    main = is_main()
    with atomic_path(path) if main else contextlib.nullcontext() as tmp, \
            open(tmp, "wb") if main else contextlib.nullcontext() as f:
        if main:
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
            f.write(struct.pack("<Q", len(blob)) + blob)
        for _, tensor in named_tensors:
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if main:
                f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # freed before the next gather


def shard_rows(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The rows [start, stop) of the full tensor that this rank's FSDP2 shard
    holds, or None for a tensor that is not sharded. FSDP2 cuts dim 0 like
    torch.chunk: pieces of ceil(rows / ranks) rows, the last ones shorter or empty."""
    if not hasattr(tensor, "device_mesh"):
        return None
    from torch.distributed.tensor import Shard

    if len(tensor.placements) != 1 or tensor.placements[0] != Shard(0):
        raise NotImplementedError(f"only dim-0 sharding on one mesh dimension is supported, got {tensor.placements}")
    rows, ranks = tensor.shape[0], tensor.device_mesh.size()
    per_rank = math.ceil(rows / ranks)
    start = min(tensor.device_mesh.get_local_rank() * per_rank, rows)
    stop = min(start + per_rank, rows)
    if tensor.to_local().shape[0] != stop - start:
        raise RuntimeError(f"unexpected shard layout: {tuple(tensor.to_local().shape)} for rows {start}:{stop}")
    return start, stop


def open_file(path: str):
    """safe_open that names the file when it is truncated or not safetensors."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise DamagedFile(f"{path}: not a readable safetensors file ({e})") from None


FLOAT_NAMES = ("F64", "F32", "BF16", "F16")


def header_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the header only (nothing else is read)."""
    with open_file(path) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def header_dtypes(path: str) -> dict[str, str]:
    """Each tensor's dtype as the header names it ("F32", "U8", ...)."""
    with open_file(path) as f:
        return {name: f.get_slice(name).get_dtype() for name in f.keys()}


def check_float(path: str, dtypes: dict[str, str]) -> None:
    """Weights and optimizer moments are floating point: integer bytes would load as
    numbers of another meaning (and pass every finite check)."""
    for name, dtype in dtypes.items():
        if dtype not in FLOAT_NAMES:
            raise DamagedFile(f"{path}: tensor {name} is {dtype}, expected a floating-point tensor "
                              f"({'/'.join(FLOAT_NAMES)})")


@torch.no_grad()
def read_into(f, name: str, target: torch.Tensor, source: str) -> None:
    """Fill `target` (a plain tensor or this rank's shard of a DTensor) from tensor
    `name` of an open file, reading only the rows this rank keeps."""
    stored = tuple(f.get_slice(name).get_shape())
    if stored != tuple(target.shape):
        raise DamagedFile(f"{source}: tensor {name} has shape {stored}, expected {tuple(target.shape)}")
    if target.is_floating_point():
        check_float(source, {name: f.get_slice(name).get_dtype()})
    rows = shard_rows(target)
    if rows is None:
        target.copy_(f.get_tensor(name))
    else:
        local = target.to_local()
        if local.numel():
            local.copy_(f.get_slice(name)[rows[0]:rows[1]])
