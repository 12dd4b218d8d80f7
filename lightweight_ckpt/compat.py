"""The torch releases we accept (``torch>=2.4``) differ in a few names: each difference lives here.

Every other module (and the tests) imports these names from here, so supporting another torch
release is an edit in one place. ``scripts/oldest-torch-tests`` runs the test suite on the
oldest release we accept (2.4.1). Each fallback below names what torch 2.4 lacks; the releases
between 2.4 and the main venv's 2.13 are not tested one by one.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import IO, Any

import torch
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_loader import load as _dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as _dcp_save

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4 keeps DTensor private
    from torch.distributed._tensor import DTensor  # type: ignore[attr-defined]

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.4 keeps FSDP2 private
    from torch.distributed._composable.fsdp import (  # type: ignore[attr-defined]
        fully_shard,
    )

DCP_VERSION: str | None
"""The DCP format version this torch writes into ``.metadata``; ``None`` where it writes none."""
try:
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION as DCP_VERSION
except ImportError:  # torch 2.4 writes no format version
    DCP_VERSION = None

torch_serialization_config: Any
"""``torch.utils.serialization.config`` (``save.compute_crc32``...); ``None`` where absent."""
try:
    from torch.utils.serialization import config as torch_serialization_config
except ImportError:  # torch 2.4: torch.save always computes CRC32s, with no switch
    torch_serialization_config = None

_DCP_TAKES_NO_DIST = "no_dist" in inspect.signature(_dcp_save).parameters


def dcp_save(state_dict: dict[str, Any], *, no_dist: bool, **kwargs: Any) -> Any:
    """``torch.distributed.checkpoint.save``; ``no_dist`` is ``not dist.is_initialized()``.

    Torch 2.4's DCP takes no ``no_dist`` and derives that same value itself.
    """
    if _DCP_TAKES_NO_DIST:
        kwargs["no_dist"] = no_dist
    return _dcp_save(state_dict, **kwargs)


def dcp_load(state_dict: dict[str, Any], *, no_dist: bool, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load``, with ``no_dist`` as in ``dcp_save``."""
    if _DCP_TAKES_NO_DIST:
        kwargs["no_dist"] = no_dist
    _dcp_load(state_dict, **kwargs)


def dcp_metadata_path(reader: Any, rank: int | None) -> Any:
    """Where a DCP file reader finds ``.metadata`` (per rank where this torch writes them so)."""
    per_rank = getattr(reader, "_get_metadata_path", None)  # not in torch 2.4
    if per_rank is not None:
        return per_rank(rank)
    return reader.fs.concat_path(reader.path, ".metadata")


def storage_meta(**fields: Any) -> StorageMeta:
    """DCP's ``StorageMeta`` with ``fields``; those this torch lacks become plain attributes.

    (Torch 2.4's has no ``modules``.) The attributes are pickled into ``.metadata`` with the
    instance and read back with ``getattr`` on any torch.
    """
    known = {field.name for field in dataclasses.fields(StorageMeta)}
    meta = StorageMeta(**{name: value for name, value in fields.items() if name in known})
    for name, value in fields.items():
        if name not in known:
            setattr(meta, name, value)
    return meta


def zip_writer(sink: IO[bytes]) -> Any:
    """Torch's zip writer, records aligned as ``torch.save`` aligns them, its own CRC32s off.

    Torch 2.4's writer takes neither switch: it computes the CRC32s as well.
    """
    alignment = getattr(torch.serialization, "_get_storage_alignment", None)
    if alignment is not None:
        try:
            return torch._C.PyTorchFileWriter(sink, False, alignment())
        except TypeError:
            pass
    return torch._C.PyTorchFileWriter(sink)


__all__ = [
    "DCP_VERSION",
    "DTensor",
    "dcp_load",
    "dcp_metadata_path",
    "dcp_save",
    "fully_shard",
    "storage_meta",
    "torch_serialization_config",
    "zip_writer",
]
