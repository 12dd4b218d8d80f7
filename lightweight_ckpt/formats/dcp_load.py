"""Reading a committed sharded (DCP) checkpoint's tensors and values into a tree.

- ``read``: one DCP pass over every rank (a collective), filling a template in place;
- ``plan_read`` / ``PlannedRead``: this rank's part planned and CRC-checked with no collective,
  values read at once, tensors read later (a few top-level keys at a time if asked), so that the
  caller can agree across ranks between the steps;
- ``skeleton`` / ``tensors_of``: the checkpoint's tree built from its metadata, for DCP to fill;
- ``read_items`` / ``read_values``: item by item in this process only (consolidation, diffs).

Reads go through ``dcp_reader``'s safe reader and planner; failures become our errors
(``dcp_calls``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from lightweight_ckpt.compat import dcp_load
from lightweight_ckpt.errors import CheckpointError
from lightweight_ckpt.formats import dcp_reader
from lightweight_ckpt.formats.dcp_calls import distributed, single_process_ok, translate, translated

if TYPE_CHECKING:
    from collections.abc import Collection

    from lightweight_ckpt.storage import Location


def read(template: dict[str, Any], location: Location, weights_only: bool) -> None:
    """Fill ``template`` in place from the checkpoint (a collective: every rank calls it).

    The metadata ``read_metadata`` parsed for this load is not parsed again (local disk).
    """
    reader = dcp_reader.reader_for(location)
    reader.known_metadata = dcp_reader.take_parsed(location)
    try:
        with single_process_ok():
            dcp_load(
                template,
                storage_reader=reader,
                planner=dcp_reader.SafeLoadPlanner(location.url, weights_only),
                no_dist=not distributed(),
            )
    except CheckpointException as err:
        raise translate(location.url, err, writing=False) from err
    finally:
        reader.release()


class PlannedRead:
    """This rank's part of a sharded load, planned and checked; no tensor target written yet.

    From ``plan_read``: the items this rank reads are CRC-checked, their pieces pinned, and the
    non-tensor values read into the template's own slots. ``read`` fills the tensors (the
    targets), all at once or a few top-level keys at a time; ``close`` lets go without reading
    (another rank failed).
    """

    def __init__(self, url: str, reader: Any, planner: Any, plan: Any) -> None:
        self._url = url
        self._reader = reader
        self._planner = planner
        self._plan = plan

    def _top_level_key(self, item: Any) -> str:
        fqn = item.dest_index.fqn
        return str(getattr(self._planner, "mappings", {}).get(fqn, (fqn,))[0])

    def read(self, keys: Collection[str] | None = None) -> None:
        """Read the tensor items under the top-level ``keys`` (None: every one left).

        An item is read once; when none is left, the pieces are let go. A failure lets go of
        them at once.
        """
        now: list[Any] = []
        later: list[Any] = []
        for item in self._plan.items:
            (now if keys is None or self._top_level_key(item) in keys else later).append(item)
        self._plan = dataclasses.replace(self._plan, items=later)
        try:
            if now:
                self._reader.read_data(
                    dataclasses.replace(self._plan, items=now), self._planner
                ).wait()
        except BaseException as err:
            self.close()
            if isinstance(err, CheckpointError) or not isinstance(err, Exception):
                raise
            raise translated(self._url, err, "read") from err
        if not later:
            self.close()

    def close(self) -> None:
        """Release the pinned pieces (again: nothing)."""
        self._reader.release()


def plan_read(template: dict[str, Any], location: Location, weights_only: bool) -> PlannedRead:
    """Plan this rank's part of a sharded load of ``template``, with no collective.

    DCP's local steps (plan, ``prepare_local_plan``: pin and CRC-check every item this rank
    reads) and its global step, which is the identity for loads, run here; DCP's own agreement
    steps are left to the caller, who agrees on this step's outcome across ranks before
    ``read``. Non-tensor values are read now (they may fail under ``weights_only``), into the
    template; nothing the caller owns is written.
    """
    reader = dcp_reader.reader_for(location)
    reader.known_metadata = dcp_reader.take_parsed(location)
    planner = dcp_reader.SafeLoadPlanner(location.url, weights_only)
    try:
        metadata = reader.read_metadata()
        coordinator = not distributed() or torch.distributed.get_rank() == 0
        planner.set_up_planner(template, metadata, coordinator)
        reader.set_up_storage_reader(metadata, coordinator)
        (plan,) = reader.prepare_global_plan(
            planner.create_global_plan([reader.prepare_local_plan(planner.create_local_plan())])
        )
        plan = planner.finish_plan(plan)
        values = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if values:
            reader.read_data(dataclasses.replace(plan, items=values), planner).wait()
        tensors = [item for item in plan.items if item.type != LoadItemType.BYTE_IO]
    except BaseException as err:
        reader.release()
        if isinstance(err, CheckpointError) or not isinstance(err, Exception):
            raise
        raise translated(location.url, err, "plan") from err
    return PlannedRead(location.url, reader, planner, dataclasses.replace(plan, items=tensors))


def skeleton(metadata: Metadata, keys: set[str] | None = None) -> dict[str, Any]:
    """Build the checkpoint's tree (or its top-level ``keys``) for DCP to fill.

    Tensors are full-size, allocated but unread (untouched memory is not resident); non-tensor
    values are ``None`` placeholders that the load replaces.
    """
    tree: dict[str, Any] = {}
    mappings = metadata.planner_data or {}
    for fqn, item in metadata.state_dict_metadata.items():
        path = mappings.get(fqn, (fqn,))
        if keys is not None and str(path[0]) not in keys:
            continue
        value = None
        if isinstance(item, TensorStorageMetadata):
            value = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        set_element(tree, path, value)
    return tree


def tensors_of(tree: Any, metadata: Metadata) -> dict[str, torch.Tensor]:
    """Map each tensor item's name in ``metadata`` to its tensor in a ``skeleton`` tree."""
    found: dict[str, torch.Tensor] = {}
    mappings = metadata.planner_data or {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            node = tree
            for part in mappings.get(fqn, (fqn,)):
                node = node[part]
            found[fqn] = node
    return found


def read_items(
    location: Location,
    items: dict[str, Any],
    weights_only: bool,
    *,
    metadata: Metadata | None = None,
) -> None:
    """Fill ``{item name: tensor or None}`` in place from the checkpoint, in this process only.

    Pass the checkpoint's ``metadata`` when reading item by item: DCP otherwise reads and
    unpickles ``.metadata`` again on every call (90% of a 600-tensor consolidate).
    """
    reader = dcp_reader.reader_for(location)
    reader.known_metadata = metadata
    try:
        _load_state_dict(
            items,
            storage_reader=reader,
            planner=dcp_reader.SafeLoadPlanner(location.url, weights_only),
            no_dist=True,
        )
    except CheckpointException as err:
        raise translate(location.url, err, writing=False) from err
    finally:
        reader.release()


def read_values(
    location: Location,
    metadata: Metadata,
    tree: dict[str, Any],
    *,
    weights_only: bool,
) -> None:
    """Read every non-tensor item and put it into ``tree`` where it belongs."""
    mappings = metadata.planner_data or {}
    names = [
        fqn
        for fqn, item in metadata.state_dict_metadata.items()
        if isinstance(item, BytesStorageMetadata)
    ]
    values: dict[str, Any] = dict.fromkeys(names)
    read_items(location, values, weights_only, metadata=metadata)
    for name, value in values.items():
        set_element(tree, mappings.get(name, (name,)), value)
