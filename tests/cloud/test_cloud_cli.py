"""Every CLI command on object stores: ``python -m lightweight_ckpt ...`` against S3 and GCS.

Each test runs once per store (``store``: a fresh bucket on the session's moto or
fake-gcs-server) and passes the store's options as typed ``--storage-option KEY=VALUE``
arguments (S3's ``client_kwargs`` is a JSON dict). The outcomes are checked on the store
itself: the tensors the output names, damage found in a remote object, files that load with
``torch.load`` and the ``safetensors`` package, leftovers listed and removed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightweight_ckpt import Fabric
from lightweight_ckpt.formats import dcp_dir
from lightweight_ckpt.formats.zip_records import read_index
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.storage import open_source, resolve
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.processes import run_cli
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, Store, cli_storage_options

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]


def _cli(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, *cli_storage_options(store.storage_options))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _save_file(store: Store, name: str, model: nn.Module, step: int) -> str:
    url = store.url(name)
    Fabric().save(url, {"model": model, "step": step}, storage_options=store.storage_options)
    return url


def _save_sharded(store: Store, name: str, checkpoint: dict[str, Any]) -> str:
    url = store.url(name)
    io = TorchCheckpointIO()
    version = dcp_dir.new_version()
    io.prepare_sharded(url, version, storage_options=store.storage_options)
    io.save_sharded(checkpoint, url, version, storage_options=store.storage_options)
    return url


def _flip_tensor_byte(store: Store, name: str) -> None:
    """Flip one bit inside the first tensor's bytes of a remote single-file checkpoint."""
    source = open_source(resolve(store.url(name), store.storage_options))
    try:
        record = next(r for key, r in read_index(source).items() if key.endswith("data/0"))
    finally:
        source.close()
    raw = bytearray(store.fs.cat_file(store.path(name)))
    raw[record.offset + record.size // 2] ^= 0x04
    store.fs.pipe_file(store.path(name), bytes(raw))
    store.fs.invalidate_cache()


def test_inspect_names_the_tensors_of_a_file_and_a_sharded_checkpoint(store: Store) -> None:
    url = _save_file(store, "a.ckpt", _model(), step=3)
    shown = _cli(store, "inspect", url)
    assert shown.returncode == 0, shown.stderr
    assert f"{url} (" in shown.stdout
    for name, shape in (("model.0.weight", "16x8"), ("model.2.weight", "4x16")):
        assert any(name in line and shape in line for line in shown.stdout.splitlines())
    assert "total: 4 tensors" in shown.stdout

    sharded = _save_sharded(store, "sharded", {"w": torch.ones(3, 5), "step": 9})
    report = json.loads(_cli(store, "inspect", sharded, "--json").stdout)
    assert report["layout"] == "sharded"
    assert {"name": "w", "kind": "tensor", "dtype": "float32", "shape": [3, 5], "bytes": 60} in (
        report["entries"]
    )
    assert {"name": "step", "kind": "int", "value": "9"} in report["entries"]


def test_verify_finds_a_flipped_byte_in_a_remote_object(store: Store) -> None:
    url = _save_file(store, "a.ckpt", _model(), step=3)
    clean = _cli(store, "verify", url)
    assert clean.returncode == 0, clean.stderr
    assert f"{url}: ok" in clean.stdout

    _flip_tensor_byte(store, "a.ckpt")
    damaged = _cli(store, "verify", url)
    assert damaged.returncode == 1
    assert "archive/data/0: CRC32 mismatch" in damaged.stderr
    assert f"{url}: 1 damaged" in damaged.stdout


def test_consolidate_from_and_to_the_store(store: Store, tmp_path: Path) -> None:
    model = _model()
    checkpoint = {"model": model.state_dict(), "step": 2, "tag": "run-1"}
    sharded = _save_sharded(store, "sharded", checkpoint)

    local = tmp_path / "full.pt"
    result = _cli(store, "consolidate", sharded, str(local))
    assert result.returncode == 0, result.stderr
    assert_states_equal(torch.load(local, weights_only=True), checkpoint)

    remote = store.url("full.pt")
    result = _cli(store, "consolidate", sharded, remote)
    assert result.returncode == 0, result.stderr
    assert store.visible_objects().count("full.pt") == 1
    assert store.fs.cat_file(store.path("full.pt")) == local.read_bytes()
    loaded = Fabric().load(remote, storage_options=store.storage_options)  # CRCs check out
    assert_states_equal(loaded, checkpoint)


def test_convert_writes_safetensors_the_package_loads(store: Store) -> None:
    from safetensors.torch import load as load_safetensors

    model = _model()
    url = _save_file(store, "a.ckpt", model, step=3)
    target = store.url("a.safetensors")
    result = _cli(store, "convert", url, target)
    assert result.returncode == 0, result.stderr
    assert f"wrote {target} (4 tensors" in result.stdout

    tensors = load_safetensors(store.fs.cat_file(store.path("a.safetensors")))
    expected = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert_states_equal(tensors, expected)

    back = store.url("b.ckpt")
    assert _cli(store, "convert", target, back).returncode == 0
    loaded = Fabric().load(back, storage_options=store.storage_options)
    assert_states_equal(loaded["model"], model.state_dict())
    assert loaded["step"] == 3


def test_diff_exit_codes(store: Store) -> None:
    model = _model()
    a = _save_file(store, "a.ckpt", model, step=3)
    same = _save_file(store, "same.ckpt", model, step=3)
    changed = _model()
    with torch.no_grad():
        changed[2].bias[1] += 0.5
    assert_states_differ(changed, model)
    b = _save_file(store, "b.ckpt", changed, step=3)

    equal = _cli(store, "diff", a, same)
    assert equal.returncode == 0, equal.stderr
    assert "equal" in equal.stdout
    different = _cli(store, "diff", a, b)
    assert different.returncode == 1, different.stderr
    assert "model.2.bias: 1 elements differ, max abs diff 0.5" in different.stdout
    missing = _cli(store, "diff", a, store.url("nothing.ckpt"))
    assert missing.returncode == 2
    assert store.url("nothing.ckpt") in missing.stderr


def test_gc_lists_and_deletes_a_stale_version(store: Store) -> None:
    sharded = _save_sharded(store, "run/sharded", {"w": torch.ones(4)})
    stale = f"{sharded}/{dcp_dir.new_version()}"
    store.fs.pipe_file(f"{stale}/__0_0.distcp".split("://", 1)[1], b"x" * 7)
    store.fs.invalidate_cache()
    run = store.url("run")

    listed = _cli(store, "gc", run, "--older-than", "0")
    assert listed.returncode == 0, listed.stderr
    assert f"would remove stale version {stale}" in listed.stdout
    assert f"{run}: 1 leftovers of killed saves; pass --delete" in listed.stdout

    deleted = _cli(store, "gc", run, "--older-than", "0", "--delete", "--json")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["removed"] == [stale]
    assert not any(key.startswith(stale.split("/", 3)[3]) for key in store.objects())
    assert_states_equal(
        Fabric().load(sharded, storage_options=store.storage_options), {"w": torch.ones(4)}
    )


def _leave_an_upload(store: Store, key: str) -> None:
    """What a killed save leaves: an S3 multipart upload, or a GCS save's component object."""
    if store.protocol == "s3":
        store.fs.call_s3("create_multipart_upload", Bucket=store.bucket, Key=key)
    else:
        folder, _, name = key.rpartition("/")
        store.fs.pipe_file(store.path(folder, f".{name}.part-0123456789ab-00001"), b"x" * 10)
    store.fs.invalidate_cache()


def test_clean_uploads_lists_and_aborts_what_a_killed_save_left(store: Store) -> None:
    _leave_an_upload(store, "run/last.ckpt")
    assert len(store.incomplete_uploads()) == 1
    prefix = store.url("run")
    what = "multipart uploads" if store.protocol == "s3" else "uploads (components)"

    listed = _cli(store, "clean-uploads", prefix, "--older-than", "0")
    assert listed.returncode == 0, listed.stderr
    assert f"incomplete {store.url('run', 'last.ckpt')}" in listed.stdout
    assert f"{prefix}: 1 incomplete {what}; pass --abort" in listed.stdout
    assert len(store.incomplete_uploads()) == 1  # only listed

    aborted = _cli(store, "clean-uploads", prefix, "--older-than", "0", "--abort")
    assert aborted.returncode == 0, aborted.stderr
    assert f"aborted {store.url('run', 'last.ckpt')}" in aborted.stdout
    assert store.incomplete_uploads() == []


def test_a_store_failure_is_one_error_line(store: Store) -> None:
    """A bucket that does not exist: ``error: ...`` naming the URL, exit 1, no traceback."""
    url = f"{store.protocol}://{store.bucket}-missing/a.ckpt"
    result = _cli(store, "verify", url)
    assert result.returncode == 1
    assert result.stderr.startswith("error: "), result.stderr
    assert url in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
