"""``convert``, ``diff`` and ``gc`` on a local S3 server (moto): remote sources and targets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch
from torch import nn

from lightweight_ckpt import Fabric
from lightweight_ckpt.convert import convert
from lightweight_ckpt.diff import diff_checkpoints
from lightweight_ckpt.formats import dcp_dir
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.manager.orphans import find_orphans, remove_orphans
from tests.helpers.asserts import assert_states_equal
from tests.helpers.servers import s3_folder

pytestmark = pytest.mark.cloud


@pytest.fixture(scope="module")
def s3_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    with s3_folder(tmp_path_factory.mktemp("moto"), "tools") as found:
        yield found


def test_convert_and_diff_between_s3_objects(s3_dir: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_dir
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight
    Fabric().save(f"{url}/a.ckpt", {"model": model, "step": 5}, storage_options=options)

    report = convert(f"{url}/a.ckpt", f"{url}/a.safetensors", options, options)
    assert report.aliases == {"model.1.weight": "model.0.weight"}
    convert(f"{url}/a.safetensors", f"{url}/b.ckpt", options, options)
    back = Fabric().load(f"{url}/b.ckpt", storage_options=options)
    assert_states_equal(back, {"model": model.state_dict(), "step": 5})
    assert diff_checkpoints(f"{url}/a.ckpt", f"{url}/a.safetensors", options, options).equal

    with torch.no_grad():
        model[0].weight[0, 0] += 2.0
    Fabric().save(f"{url}/c.ckpt", {"model": model, "step": 6}, storage_options=options)
    differences = diff_checkpoints(f"{url}/a.ckpt", f"{url}/c.ckpt", options, options).differences
    assert sorted((d.name, d.kind) for d in differences) == [
        ("model.0.weight", "value"),
        ("model.1.weight", "value"),  # the tied name differs too
        ("step", "value"),
    ]


def test_gc_finds_unreferenced_versions_on_s3(s3_dir: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_dir
    io = TorchCheckpointIO()
    version = dcp_dir.new_version()
    io.prepare_sharded(f"{url}/sharded", version, storage_options=options)
    io.save_sharded({"w": torch.ones(4)}, f"{url}/sharded", version, storage_options=options)
    stale = f"{url}/sharded/{dcp_dir.new_version()}"
    fs = fsspec.filesystem("s3", **options)
    fs.pipe(f"{stale}/__0_0.distcp".removeprefix("s3://"), b"x" * 7)
    fs.invalidate_cache()

    assert find_orphans(url, options) == []  # just written: could be a running save
    orphans = find_orphans(url, options, older_than_s=0)
    assert [(o.path, o.kind, o.nbytes) for o in orphans] == [(stale, "stale version", 7)]
    assert remove_orphans(orphans, options) == [stale]
    fs.invalidate_cache()
    assert find_orphans(url, options, older_than_s=0) == []
    assert diff_checkpoints(f"{url}/sharded", f"{url}/sharded", options, options).equal
