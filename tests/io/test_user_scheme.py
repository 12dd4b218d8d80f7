"""A user's CheckpointIO with a storage scheme of its own (not an fsspec URL) is used throughout."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from lightweight_ckpt import Fabric
from lightweight_ckpt.io import CheckpointIO
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.models import make_state


class KeyValueIO(CheckpointIO):
    """Checkpoints kept as bytes in a dict under ``kv://NAME`` keys (a stand-in for a database)."""

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}

    def save_checkpoint(
        self, checkpoint: Any, path: Any, storage_options: dict[str, Any] | None = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self.store[str(path)] = buffer.getvalue()

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> Any:
        if str(path) not in self.store:
            raise FileNotFoundError(path)
        return torch.load(io.BytesIO(self.store[str(path)]), weights_only=weights_only is not False)

    def remove_checkpoint(self, path: Any) -> None:
        self.store.pop(str(path), None)


def test_a_scheme_only_the_users_io_knows_saves_and_loads() -> None:
    kv = KeyValueIO()
    fabric = Fabric(checkpoint_io=kv)
    state = make_state()
    fabric.save("kv://run-1/last", state)
    assert set(kv.store) == {"kv://run-1/last"}
    expected = snapshot(state["model"])

    target = make_state()
    assert_states_differ(target["model"], expected)
    fabric.load("kv://run-1/last", target)
    assert_states_equal(target["model"], expected)
    assert_states_equal(target["optimizer"], state["optimizer"])


def test_storage_options_for_an_io_that_takes_none_get_a_clear_error() -> None:
    kv = KeyValueIO()
    fabric = Fabric(checkpoint_io=kv)
    state = make_state()
    fabric.save("kv://run-2/last", state)
    before = snapshot(make_state()["model"])
    target = make_state()
    target["model"].load_state_dict(before)
    with pytest.raises(TypeError, match=r"kv://run-2/last: .*KeyValueIO\.load_checkpoint"):
        fabric.load("kv://run-2/last", target, storage_options={"anon": True})
    assert_states_equal(target["model"], before)
