"""``python -m lightweight_ckpt consolidate``: sharded → one torch.load file, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightweight_ckpt import Fabric
from lightweight_ckpt.io import TorchCheckpointIO
from tests.helpers.asserts import assert_states_equal
from tests.helpers.processes import run_cli as _cli

TENSORS = 8
TENSOR_MB = 24


def _sharded_checkpoint(path: Path) -> dict[str, object]:
    torch.manual_seed(0)
    numel = TENSOR_MB * 2**20 // 4
    checkpoint = {
        "model": {f"layer{i}.weight": torch.randn(numel) for i in range(TENSORS)},
        "step": 7,
        "hparams": {"lr": 0.1, "sizes": [1, 2]},
    }
    io = TorchCheckpointIO()
    io.prepare_sharded(str(path), "v-test")
    io.save_sharded(checkpoint, str(path), "v-test")
    return checkpoint


def test_consolidate_writes_a_torch_load_file(tmp_path: Path) -> None:
    expected = _sharded_checkpoint(tmp_path / "sharded")
    out = tmp_path / "full.pt"
    result = _cli("consolidate", str(tmp_path / "sharded"), str(out))
    assert result.returncode == 0, result.stderr
    assert_states_equal(torch.load(out, weights_only=True), expected)
    assert_states_equal(Fabric().load(out), expected)  # and it passes our CRC checks


def test_consolidate_memory_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    _sharded_checkpoint(tmp_path / "sharded")
    script = textwrap.dedent(
        f"""
        import resource
        import torch
        from lightweight_ckpt.cli import consolidate
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        torch.ones(1)
        before = peak_mb()
        consolidate({str(tmp_path / "sharded")!r}, {str(tmp_path / "full.pt")!r})
        print(peak_mb() - before)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    checkpoint_mb = TENSORS * TENSOR_MB
    # the whole checkpoint is 192 MiB; one tensor is 24 MiB (DCP reads it through a buffer too)
    assert growth_mb < checkpoint_mb / 2, f"peak grew {growth_mb:.0f} MiB for {checkpoint_mb} MiB"


def test_consolidate_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _cli("consolidate", str(tmp_path / "empty"), str(tmp_path / "x.pt"))
    assert result.returncode == 1
    assert "not a sharded checkpoint" in result.stderr
    assert str(tmp_path / "empty") in result.stderr
    assert not (tmp_path / "x.pt").exists()


def _flip_tensor_byte(path: Path) -> None:
    from lightweight_ckpt.formats.zip_records import read_index
    from lightweight_ckpt.storage import open_source, resolve

    source = open_source(resolve(str(path)))
    record = next(r for name, r in read_index(source).items() if name.endswith("data/0"))
    source.close()
    raw = bytearray(path.read_bytes())
    raw[record.offset + record.size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def test_inspect_and_verify_a_file(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    Fabric().save(tmp_path / "a.ckpt", {"model": model, "step": 3})
    shown = _cli("inspect", str(tmp_path / "a.ckpt"))
    assert shown.returncode == 0, shown.stderr
    assert "model.weight" in shown.stdout
    assert "3x4" in shown.stdout
    assert "total: 2 tensors, 60 B" in shown.stdout
    as_json = json.loads(_cli("inspect", str(tmp_path / "a.ckpt"), "--json").stdout)
    assert as_json["tensor_bytes"] == 60
    assert {"name": "step", "kind": "int", "value": "3"} in as_json["entries"]
    assert _cli("verify", str(tmp_path / "a.ckpt")).returncode == 0
    _flip_tensor_byte(tmp_path / "a.ckpt")
    damaged = _cli("verify", str(tmp_path / "a.ckpt"))
    assert damaged.returncode == 1
    assert "archive/data/0: CRC32 mismatch" in damaged.stderr
    report = json.loads(_cli("verify", str(tmp_path / "a.ckpt"), "--json").stdout)
    assert report["ok"] is False


def test_inspect_and_verify_a_sharded_checkpoint(tmp_path: Path) -> None:
    _sharded_checkpoint(tmp_path / "sharded")
    shown = json.loads(_cli("inspect", str(tmp_path / "sharded"), "--json").stdout)
    assert shown["layout"] == "sharded"
    assert shown["tensors"] == TENSORS
    assert shown["tensor_bytes"] == TENSORS * TENSOR_MB * 2**20
    assert _cli("verify", str(tmp_path / "sharded")).returncode == 0
    piece = tmp_path / "sharded" / "v-test" / "__0_0.distcp"
    piece.write_bytes(piece.read_bytes()[:1000])  # a truncated piece
    truncated = _cli("verify", str(tmp_path / "sharded"))
    assert truncated.returncode == 1
    assert "__0_0.distcp: truncated" in truncated.stderr


def _on_a_terminal(*args: str) -> str:
    """Run the CLI with stderr on a pseudo-terminal; return what the terminal showed."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    main_fd, terminal_fd = pty.openpty()
    # a fresh pty is 0 columns wide, where tqdm draws nothing; a real terminal has a width
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    shown: list[bytes] = []

    def drain() -> None:  # read while it runs: a full pty buffer would block the command
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: the terminal side is closed
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "lightweight_ckpt", *args],
            stdout=subprocess.DEVNULL,
            stderr=terminal_fd,
            timeout=120,
            check=False,
        )
    finally:
        os.close(terminal_fd)
        reader.join(timeout=10)
        os.close(main_fd)
    assert result.returncode == 0
    return b"".join(shown).decode(errors="replace")


def test_progress_bars_on_a_terminal_only(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "a.ckpt", {"w": torch.randn(1000)})
    assert "verify:" in _on_a_terminal("verify", str(tmp_path / "a.ckpt"))
    assert "verify:" not in _on_a_terminal("verify", str(tmp_path / "a.ckpt"), "--quiet")
    assert "verify:" not in _cli("verify", str(tmp_path / "a.ckpt")).stderr  # not a terminal
    dst = str(tmp_path / "a.safetensors")
    assert "convert:" in _on_a_terminal("convert", str(tmp_path / "a.ckpt"), dst)
    _sharded_checkpoint(tmp_path / "sharded")
    shown = _on_a_terminal("consolidate", str(tmp_path / "sharded"), str(tmp_path / "f.pt"))
    assert "consolidate:" in shown


def test_inspect_and_verify_a_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.int64)}, tmp_path / "m.st")
    shown = json.loads(_cli("inspect", str(tmp_path / "m.st"), "--json").stdout)
    assert shown["layout"] == "safetensors"
    assert (shown["tensors"], shown["tensor_bytes"]) == (2, 64)
    assert {"name": "w", "kind": "tensor", "dtype": "float32", "shape": [3, 4], "bytes": 48} in (
        shown["entries"]
    )
    assert _cli("verify", str(tmp_path / "m.st")).returncode == 0
    (tmp_path / "m.st").write_bytes((tmp_path / "m.st").read_bytes()[:-8])
    damaged = _cli("verify", str(tmp_path / "m.st"))
    assert damaged.returncode == 1
    assert "truncated or padded" in damaged.stderr


# -- storage options, errors and logging -------------------------------------------------------


def test_storage_option_values_are_read_as_json_or_kept_as_strings() -> None:
    from lightweight_ckpt.cli import parse_storage_options

    options = parse_storage_options(
        [
            "anon=false",  # a bool: the string "false" would turn anonymous access on
            "use_ssl=true",
            "retries=3",
            "requests_timeout=2.5",
            'client_kwargs={"region_name": "eu-west-1"}',
            "endpoint_url=http://127.0.0.1:9000",
            "token=anon",
            'project="123"',  # quoted: stays a string
            "empty=",
            "expr=a=b",
        ]
    )
    assert options == {
        "anon": False,
        "use_ssl": True,
        "retries": 3,
        "requests_timeout": 2.5,
        "client_kwargs": {"region_name": "eu-west-1"},
        "endpoint_url": "http://127.0.0.1:9000",
        "token": "anon",
        "project": "123",
        "empty": "",
        "expr": "a=b",
    }


def test_a_storage_option_without_a_value_is_a_usage_error(tmp_path: Path) -> None:
    result = _cli("inspect", str(tmp_path / "a.ckpt"), "--storage-option", "anon")
    assert result.returncode == 2
    assert "--storage-option needs KEY=VALUE, got 'anon'" in result.stderr


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "LWCKPT_RETRY_ATTEMPTS": "1"},
    )


def test_a_missing_extra_is_one_error_line_with_the_install_hint() -> None:
    result = _run_python(
        """
        import sys
        sys.modules["s3fs"] = None  # as if the s3 extra were not installed
        from lightweight_ckpt.cli import main
        raise SystemExit(main(["inspect", "s3://bucket/a.ckpt"]))
        """
    )
    assert result.returncode == 1
    assert result.stderr == (
        "error: s3://bucket/a.ckpt: s3:// paths need an extra: pip install 'lightweight-ckpt[s3]'\n"
    )


def test_an_unreachable_store_is_one_error_line() -> None:
    """Nothing listens at the endpoint: the client's error, named, without a traceback."""
    pytest.importorskip("s3fs", reason="needs s3fs (pip install 'lightweight-ckpt[s3]')")
    from tests.helpers.servers import free_port

    options = [
        *("--storage-option", f"endpoint_url=http://127.0.0.1:{free_port()}"),
        *("--storage-option", "key=k", "--storage-option", "secret=s"),
        *("--storage-option", 'client_kwargs={"region_name": "eu-west-1"}'),
    ]
    url = "s3://bucket/a.ckpt"
    for command, code in ((["inspect", url], 1), (["diff", url, "s3://bucket/b.ckpt"], 2)):
        result = _cli_env(*command, *options)
        assert result.returncode == code, result.stderr
        assert result.stderr.startswith("error: "), result.stderr
        assert "EndpointConnectionError" in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr  # no traceback, no log noise
    assert url in _cli_env("verify", url, *options).stderr


def _cli_env(*args: str) -> subprocess.CompletedProcess[str]:
    return _cli(*args, env={"LWCKPT_RETRY_ATTEMPTS": "1"})


def test_only_our_log_lines_reach_stderr(tmp_path: Path) -> None:
    """Our INFO lines show; a client library's INFO and ERROR records (gcsfs logs a traceback
    for each request out of retries) do not, and the root logger is left as it was."""
    _sharded_checkpoint(tmp_path / "sharded")
    result = _run_python(
        f"""
        import logging
        from lightweight_ckpt import cli

        run = cli._run

        def noisy_run(args, options):  # what botocore and gcsfs log while a command runs
            logging.getLogger("botocore.credentials").info("third-party info")
            logging.getLogger("gcsfs").error("third-party error")
            return run(args, options)

        cli._run = noisy_run
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        code = cli.main(["consolidate", {str(tmp_path / "sharded")!r}, {str(tmp_path / "f.pt")!r}])
        assert (list(root.handlers), root.level) == before, (root.handlers, root.level)
        raise SystemExit(code)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "consolidated " in result.stderr  # ours, at INFO
    assert "third-party" not in result.stderr
