"""The XLA-FSDP sharded format: one file per rank plus torch_xla's shard metadata, in a directory.

Layout (``XLAFSDPStrategy`` writes it, ``python -m lightweight_ckpt consolidate`` reads it)::

    <path>/.xla_fsdp.json                     the commit marker, published last
    <path>/shards-<id>/rank-00000-of-00002.ckpt
    <path>/shards-<id>/rank-00001-of-00002.ckpt

Each rank file is a single-file checkpoint (``formats.torch_file``: ``torch.load``-able, CRC32
checked on load) holding that rank's entries (``XlaFullyShardedDataParallel.state_dict()`` for
its modules) and, under ``SHARD_METADATA_KEY``, ``{state key: module.get_shard_metadata()}``.

Atomic as a whole, like the DCP layout (``formats.dcp_dir``): every save writes a fresh
``shards-<id>`` folder, each file through ``storage.staged_write``; after every rank agreed its
file is written, rank 0 publishes ``.xla_fsdp.json`` (naming the folder and the world size)
through the same atomic staged write, then removes the folders the commit replaced. Until the
marker is replaced the previous checkpoint is intact; a directory without a marker holds no
checkpoint.

Consolidation into one full state dict goes through torch_xla's own
``consolidate_sharded_state_dicts`` and the saved shard metadata; the reverse (a full state dict
cut into this rank's shard, to load a full file into an XLA FSDP model) follows the same
metadata. torch_xla is imported lazily: only consolidation needs it.
"""

from __future__ import annotations

import importlib
import json
import posixpath
import uuid
from typing import TYPE_CHECKING, Any

import torch

from lightweight_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    StateMismatchError,
)
from lightweight_ckpt.formats import torch_file, torch_writer
from lightweight_ckpt.storage import Location, open_source, staged_write

if TYPE_CHECKING:
    from types import ModuleType

MARKER = ".xla_fsdp.json"
SHARDS_PREFIX = "shards-"
SHARD_METADATA_KEY = "xla_fsdp_shard_metadata"
FORMAT_NAME = "lightweight_ckpt/xla_fsdp"
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_fpw_module.")
INSTALL_HINT = (
    "pip install 'lightweight-ckpt[xla]' (torch_xla needs the torch release it was built for)"
)


def import_torch_xla(module: str = "torch_xla", feature: str = "XLA checkpoints") -> ModuleType:
    """Import a torch_xla module, or raise with the install hint naming the ``xla`` extra.

    Raises:
        ModuleNotFoundError: torch_xla is not installed (or does not import on this torch).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModuleNotFoundError(f"{feature} need torch_xla: {INSTALL_HINT}. ({err})") from err


def new_version() -> str:
    """Return a fresh shards folder name (rank 0 picks it; every rank uses the same)."""
    return f"{SHARDS_PREFIX}{uuid.uuid4().hex[:12]}"


def shard_file(version: str, rank: int, world_size: int) -> str:
    """Return the path of ``rank``'s file relative to the checkpoint directory."""
    return f"{version}/rank-{rank:05d}-of-{world_size:05d}.ckpt"


def is_xla_sharded(location: Location) -> bool:
    """Return True if ``location`` is a directory holding a committed XLA-FSDP checkpoint."""
    return bool(location.fs.isfile(posixpath.join(location.path, MARKER)))


def prepare(location: Location, version: str) -> None:
    """Create the shards folder on this rank's view of the filesystem."""
    if location.fs.isfile(location.path):
        raise CheckpointWriteError(
            f"{location.url}: a single-file checkpoint is there; an XLA-FSDP sharded checkpoint "
            "is a directory. Choose another path or remove the file."
        )
    location.fs.makedirs(posixpath.join(location.path, version), exist_ok=True)


def commit(location: Location, version: str, world_size: int) -> None:
    """Publish the marker naming ``version`` (rank 0, after every rank wrote its file)."""
    files = [shard_file(version, rank, world_size) for rank in range(world_size)]
    missing = [f for f in files if not location.fs.exists(posixpath.join(location.path, f))]
    if missing:
        raise CheckpointWriteError(f"{location.url}: shard files missing at commit: {missing}")
    marker = {"format": FORMAT_NAME, "version": version, "world_size": world_size, "files": files}
    with staged_write(location_of(location, MARKER)) as sink:
        sink.write(json.dumps(marker, indent=1).encode())


def location_of(location: Location, relative: str) -> Location:
    """Return the ``Location`` of ``relative`` inside the checkpoint directory."""
    sep = "" if location.url.endswith("/") else "/"
    return Location(
        location.fs, posixpath.join(location.path, relative), f"{location.url}{sep}{relative}"
    )


def remove_stale_versions(location: Location, keep: str) -> None:
    """Delete shards folders other than ``keep`` (after the commit; rank 0 only)."""
    for entry in location.fs.ls(location.path, detail=False):
        name = posixpath.basename(str(entry).rstrip("/"))
        if name.startswith(SHARDS_PREFIX) and name != keep:
            location.fs.rm(entry, recursive=True)


def read_marker(location: Location) -> dict[str, Any]:
    """Return the committed marker, checked, with every shard file present.

    Raises:
        CheckpointNotFoundError: no committed XLA-FSDP checkpoint at ``location``.
        CorruptCheckpointError: the marker is unreadable, or a shard file is missing.
    """
    marker_path = posixpath.join(location.path, MARKER)
    if not location.fs.isfile(marker_path):
        raise CheckpointNotFoundError(
            f"{location.url}: no committed XLA-FSDP checkpoint ({MARKER} is missing)."
        )
    try:
        marker = json.loads(location.fs.cat_file(marker_path))
        files = [str(f) for f in marker["files"]]
        world_size = int(marker["world_size"])
        valid = marker["format"] == FORMAT_NAME and len(files) == world_size
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{location.url}: unreadable {MARKER}: {err}") from err
    if not valid:
        raise CorruptCheckpointError(f"{location.url}: {MARKER} does not describe XLA-FSDP shards")
    missing = [f for f in files if not location.fs.exists(posixpath.join(location.path, f))]
    if missing:
        raise CorruptCheckpointError(
            f"{location.url}: damaged XLA-FSDP checkpoint: shard files missing {missing}. "
            "Load an earlier checkpoint."
        )
    return {"world_size": world_size, "files": files, "version": str(marker["version"])}


# -- shard metadata: full <-> sharded state dicts ----------------------------------------------


def plain_name(name: str) -> str:
    """Drop XLA FSDP's wrapper names, as ``consolidate_sharded_state_dicts`` does."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _split_sharded(name: str) -> tuple[str, str] | None:
    """Split a sharded parameter's name into (module prefix, shard name), as torch_xla does."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_fsdp_shard"):
            return ".".join(parts[:index]), ".".join(parts[index:])
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _pieces(metadata: dict[str, Any], name: str) -> list[tuple[str, torch.Size]]:
    """The original (full name, shape) pairs that sharded parameter ``name`` holds."""
    prefix, shard = _split_sharded(name) or ("", name)
    info = metadata["shard_info"][prefix][shard]
    full = _join(prefix, info["_orig_name"])
    flat = metadata.get("flatten_info", {}).get(full)
    if flat is None:
        return [(plain_name(full), torch.Size(info["_orig_size"]))]
    names, shapes, _ = flat
    owner = ".".join(full.split(".")[:-1])
    return [
        (plain_name(_join(owner, n)), torch.Size(s)) for n, s in zip(names, shapes, strict=True)
    ]


def full_shapes(sharded: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """Describe the full state dict of a sharded module: ``{full name: meta tensor}``."""
    shapes: dict[str, Any] = {}
    for name, tensor in sharded.items():
        if _split_sharded(name) is None:
            shapes[plain_name(name)] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            continue
        for full, shape in _pieces(metadata, name):
            shapes[full] = torch.empty(shape, dtype=tensor.dtype, device="meta")
    return shapes


def shard_full(
    full: dict[str, torch.Tensor], sharded: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Cut ``full`` into this rank's shards, shaped like ``sharded`` (the module's state dict).

    Only entries of ``full`` that are present are cut (a non-strict load may lack some).
    """
    rank, world_size = int(metadata["rank"]), int(metadata["world_size"])
    result: dict[str, torch.Tensor] = {}
    for name, target in sharded.items():
        if _split_sharded(name) is None:
            if plain_name(name) in full:
                result[name] = full[plain_name(name)].to(target.dtype)
            continue
        pieces = _pieces(metadata, name)
        if not all(n in full for n, _ in pieces):
            continue
        whole = torch.cat([full[n].detach().reshape(-1) for n, _ in pieces])
        if target.dim() > 1:  # shard_param_on_dim_0: cut along dim 0, not flattened
            whole = full[pieces[0][0]]
        local = target.shape[0]
        padding = local * world_size - whole.shape[0]
        if padding < 0:
            raise StateMismatchError(f"{name}: {whole.shape[0]} rows exceed {world_size} shards")
        padded = torch.nn.functional.pad(whole, [0, 0] * (whole.dim() - 1) + [0, padding])
        result[name] = padded[rank * local : (rank + 1) * local].to(target.dtype).clone()
    return result


def consolidate_module(
    url: str, shards: list[dict[str, torch.Tensor]], metadata: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """Join every rank's module state dict into the full one, through torch_xla.

    Args:
        url: named in errors.
        shards: each rank's ``module.state_dict()``, in rank order.
        metadata: each rank's ``module.get_shard_metadata()``, in rank order.

    Raises:
        InvalidCheckpointError: the shards do not belong together (ranks, world size, keys).
    """
    world_size = len(shards)
    for rank, meta in enumerate(metadata):
        if int(meta["rank"]) != rank or int(meta["world_size"]) != world_size:
            raise InvalidCheckpointError(
                f"{url}: shard {rank} says it is rank {meta['rank']} of {meta['world_size']}, "
                f"but {world_size} shards are there"
            )
    keys = set(shards[0])
    for rank, shard in enumerate(shards):
        if set(shard) != keys:
            raise InvalidCheckpointError(f"{url}: shard {rank} holds other keys than shard 0")
    utils = import_torch_xla(
        "torch_xla.distributed.fsdp.state_dict_utils", "consolidating XLA-FSDP checkpoints"
    )
    cpu = [{k: v.cpu() for k, v in shard.items()} for shard in shards]
    return dict(utils.consolidate_sharded_state_dicts(cpu, metadata[0]))


def consolidate(url: str, shards: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Turn every rank's shard checkpoint (rank order) into one full checkpoint.

    Module entries are consolidated through their shard metadata; plain values come from rank
    0. XLA FSDP optimizer state lives on flattened, padded shards that no plain optimizer can
    take, so those entries are left out.

    Returns:
        The full checkpoint, and the optimizer keys left out.
    """
    metas = [shard.get(SHARD_METADATA_KEY) for shard in shards]
    if not all(isinstance(m, dict) and "modules" in m for m in metas):
        raise InvalidCheckpointError(f"{url}: a shard file lacks {SHARD_METADATA_KEY!r}")
    modules: dict[str, Any] = metas[0]["modules"]  # type: ignore[index]
    dropped: list[str] = sorted(metas[0].get("optimizers", []))  # type: ignore[union-attr]
    full: dict[str, Any] = {}
    for key, value in shards[0].items():
        if key in modules:
            per_rank = [m["modules"][key] for m in metas]  # type: ignore[index]
            full[key] = consolidate_module(f"{url} [{key}]", [s[key] for s in shards], per_rank)
        elif key != SHARD_METADATA_KEY and key not in dropped:
            full[key] = value
    return full, dropped


def read_shard(location: Location, weights_only: bool = True) -> dict[str, Any]:
    """Read one shard file to the CPU, every record's CRC32 checked."""
    source = open_source(location)
    try:
        reader = torch_file.TorchFileReader(source, weights_only=weights_only, map_location="cpu")
        checkpoint = reader.skeleton()
        reader.verify({})
        reader.fill()
    finally:
        source.close()
    if not isinstance(checkpoint, dict):
        raise InvalidCheckpointError(f"{location.url}: not an XLA-FSDP shard file")
    return checkpoint


def consolidate_dir(
    source: Location, target: Location, weights_only: bool = True
) -> tuple[int, list[str]]:
    """Write the committed XLA-FSDP checkpoint at ``source`` as one full file at ``target``.

    Returns:
        The bytes written, and the optimizer keys left out (see ``consolidate``).
    """
    marker = read_marker(source)
    shards = [read_shard(location_of(source, f), weights_only) for f in marker["files"]]
    full, dropped = consolidate(source.url, shards)
    del shards
    with staged_write(target) as sink:
        torch_writer.write(full, sink)
        return sink.tell(), dropped
