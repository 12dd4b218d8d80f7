"""What a load hands back owns its memory: rewriting the file afterwards changes none of it.

Tensors the load creates (a fresh optimizer's moments, plain tensor values, everything a
``load(path)`` without state returns) used to be views of a private memory map of the file, as
with ``torch.load(mmap=True)``: pages not yet written by the process still showed the file, so
a later in-place rewrite of that file (a plain ``torch.save`` to the same path, ``cp`` over it)
changed verified state behind the caller's back, and a truncation would raise SIGBUS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightweight_ckpt import Fabric
from lightweight_ckpt.errors import CorruptCheckpointError
from lightweight_ckpt.formats.torch_file import TorchFileReader
from lightweight_ckpt.storage import open_source, resolve
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.models import Tiny, train_steps


def _overwrite_in_place(path: Path) -> None:
    """Rewrite every byte of the file in place (same inode), as a non-atomic writer would."""
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.write(b"\x55" * size)


def test_a_fresh_optimizer_and_plain_tensors_do_not_follow_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer)
    table = torch.randn(256, 64)
    path = tmp_path / "ckpt.pt"
    Fabric().save(path, {"model": model, "optimizer": optimizer, "table": table})
    expected_optimizer = snapshot(optimizer)

    fresh_model = Tiny(64)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)  # no state yet
    state: dict[str, object] = {
        "model": fresh_model,
        "optimizer": fresh_optimizer,
        "table": None,
    }
    assert_states_differ(fresh_optimizer, expected_optimizer)
    Fabric().load(path, state)
    assert_states_equal(fresh_optimizer, expected_optimizer)

    _overwrite_in_place(path)
    assert_states_equal(fresh_optimizer, expected_optimizer)
    assert_states_equal(state["table"], table)
    assert_states_equal(fresh_model, model)


def test_a_raw_load_does_not_follow_the_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Linear(128, 128)
    path = tmp_path / "raw.pt"
    Fabric().save(path, {"model": model, "extra": torch.arange(4096.0)})

    loaded = Fabric().load(path)
    assert_states_equal(loaded["model"], model.state_dict())
    _overwrite_in_place(path)
    assert_states_equal(loaded["model"], model.state_dict())
    assert_states_equal(loaded["extra"], torch.arange(4096.0))


def test_a_flipped_byte_in_an_unbound_tensor_is_still_caught(tmp_path: Path) -> None:
    """The fused read-and-hash path checks what it copies (a fresh optimizer's moments)."""
    torch.manual_seed(2)
    model = nn.Linear(512, 512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, steps=1)
    path = tmp_path / "flip.pt"
    Fabric().save(path, {"model": model, "optimizer": optimizer})
    data = bytearray(path.read_bytes())
    moment = optimizer.state[model.weight]["exp_avg"]
    needle = moment.flatten()[1000:1004].numpy().tobytes()
    at = data.find(needle)
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))

    fresh = nn.Linear(512, 512)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    before = snapshot(fresh)
    with pytest.raises(CorruptCheckpointError, match="optimizer") as caught:
        Fabric().load(path, {"model": fresh, "optimizer": fresh_optimizer})
    assert str(path) in str(caught.value)
    assert_states_equal(fresh, before)
    assert not fresh_optimizer.state


def test_a_file_truncated_between_verify_and_fill_raises_not_sigbus(tmp_path: Path) -> None:
    """Bound records are copied from the file's map; a page past a new end would be SIGBUS.

    The reader's three steps are driven by hand so that the truncation lands exactly between
    the verification and the copy into the caller's tensor (a non-atomic writer's truncate).
    """
    source_model = nn.Linear(1024, 1024)
    path = tmp_path / "shrinks.pt"
    Fabric().save(path, {"model": source_model})
    target = nn.Linear(1024, 1024)
    source = open_source(resolve(path))
    reader = TorchFileReader(source, weights_only=True, map_location=None)
    try:
        tree = reader.skeleton()
        skeleton = tree["model"]["weight"]
        bound = reader.verify({id(skeleton): target.weight.data})
        assert bound == {id(skeleton)}
        with path.open("r+b") as file:
            file.truncate(4096)
        with pytest.raises(CorruptCheckpointError, match="shrank") as caught:
            reader.fill()
        assert str(path) in str(caught.value)
    finally:
        source.close()


def test_a_file_truncated_before_verification_raises_not_sigbus(tmp_path: Path) -> None:
    """The CRC pass reads through the file's map too: a shrunken file is our error."""
    path = tmp_path / "shrinks-early.pt"
    Fabric().save(path, {"model": nn.Linear(1024, 1024)})
    target = nn.Linear(1024, 1024)
    before = snapshot(target)
    source = open_source(resolve(path))
    reader = TorchFileReader(source, weights_only=True, map_location=None)
    try:
        skeleton = reader.skeleton()["model"]["weight"]
        with path.open("r+b") as file:
            file.truncate(4096)
        # the weight's CRC pass reads through the map ("shrank"); the bias, on the other
        # thread, through preadv ("truncated"): whichever stops first is raised
        with pytest.raises(CorruptCheckpointError, match=r"shrank|truncated") as caught:
            reader.verify({id(skeleton): target.weight.data})
        assert str(path) in str(caught.value)
        assert_states_equal(target, before)
    finally:
        source.close()
