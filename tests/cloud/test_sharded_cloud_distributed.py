"""FSDP2 on two real processes saves a sharded checkpoint to s3:// and gs:// and loads it back.

Lightning's FSDP strategy wrote an ``s3://`` checkpoint into a local folder named ``s3:``. Here
each rank runs in an empty working directory; afterwards the bucket holds ``.metadata`` and one
piece (+ checksum record) per rank in one version folder, and no local folder named ``s3:`` or
``gs:`` exists. Model and optimizer (AdamW after real steps) come back bitwise on every rank,
after being shown to differ. Real gloo processes (tests/helpers/distributed.py), real s3fs and
gcsfs against the session's servers, reached through the storage options passed in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lightweight_ckpt import Fabric
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.distributed import run_distributed
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, Store

pytestmark = [
    pytest.mark.cloud,
    pytest.mark.distributed,
    pytest.mark.slow,
    GCSFS_LARGE_BODY_WARNING,
]


def _fsdp2_round_trip(
    rank: int, world_size: int, url: str, options: dict[str, Any], workdir: str
) -> None:
    from tests.strategies.test_matrix import build, perturb, reference

    os.chdir(workdir)  # a relative "s3:/..." folder would land here
    model, optimizer = build("fsdp2", seed=3, steps=2)
    fabric = Fabric(strategy=FSDPStrategy())
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 2}, storage_options=options)
    expected = reference("fsdp2", model, optimizer)

    perturb(model, optimizer)
    changed = reference("fsdp2", model, optimizer)
    assert_states_differ(changed["model"], expected["model"])
    assert_states_differ(changed["optimizer"], expected["optimizer"])
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(url, state, storage_options=options) == {}
    assert state["step"] == 2
    after = reference("fsdp2", model, optimizer)
    assert_states_equal(after["model"], expected["model"])
    assert_states_equal(after["optimizer"], expected["optimizer"])
    fabric.barrier()


def test_fsdp2_world_2_sharded_round_trip_on_the_store(store: Store, tmp_path: Path) -> None:
    url = store.url("run", "sharded")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    run_distributed(_fsdp2_round_trip, 2, tmp_path, args=(url, store.storage_options, str(workdir)))

    keys = [key.removeprefix("run/sharded/") for key in store.objects()]
    (version,) = {key.split("/")[0] for key in keys if key.startswith("v-")}
    pieces = [f"{version}/__{rank}_0.distcp" for rank in range(2)]
    assert sorted(keys) == sorted([".metadata", *pieces, *(p + ".crc32" for p in pieces)])
    assert store.incomplete_uploads() == []
    # nothing local: no "s3:" / "gs:" folder where the ranks ran, nor here
    assert list(workdir.iterdir()) == []
    assert not Path(f"{store.protocol}:").exists()
