"""Progress bars and throughput logs of remote saves and loads (``LWCKPT_PROGRESS``).

``on`` draws a tqdm bar on stderr for each upload and download, ``off`` never does, and
``auto`` (the default) only when stderr is a terminal, which it is not under pytest. Bars
appear after ``progress.TRANSFER_DELAY_S``, set to 0 here so that short transfers show one.
Every save and load logs its size and throughput at INFO, remote ones included.
"""

from __future__ import annotations

import logging

import pytest

from lightweight_ckpt import Fabric, progress
from lightweight_ckpt.config import override
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.models import fresh_like, make_state
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, Store

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]


def _round_trip(store: Store, mode: str) -> None:
    url = store.url("last.ckpt")
    state = make_state(width=64)
    with override(progress=mode):
        Fabric().save(url, state, storage_options=store.storage_options)
        target = fresh_like(state, width=64)
        assert_states_differ(target, state)
        Fabric().load(url, target, storage_options=store.storage_options)
    assert_states_equal(target, state)


def test_on_draws_a_bar_for_the_upload_and_the_download(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm", reason="bars need tqdm (the progress extra)")
    monkeypatch.setattr(progress, "TRANSFER_DELAY_S", 0.0)
    _round_trip(store, "on")
    err = capsys.readouterr().err
    url = store.url("last.ckpt")
    assert f"saving {url}" in err
    assert f"loading {url}" in err
    assert "B/s" in err  # the bar's rate


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_off_and_auto_without_a_terminal_draw_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    monkeypatch.setattr(progress, "TRANSFER_DELAY_S", 0.0)
    _round_trip(store, mode)
    assert capsys.readouterr().err == ""


def test_remote_saves_and_loads_log_their_throughput(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lightweight_ckpt")
    _round_trip(store, "off")
    url = store.url("last.ckpt")
    messages = [r.getMessage() for r in caplog.records]
    for verb in ("saved", "loaded"):
        lines = [m for m in messages if m.startswith(f"{verb} {url}: ")]
        assert len(lines) == 1, messages
        assert "MiB/s" in lines[0]
