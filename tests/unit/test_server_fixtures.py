"""The cloud fixtures' rule for a server or client library that is missing (helpers.servers)."""

from __future__ import annotations

import pytest

from tests.helpers.servers import require_module, unavailable


def test_a_missing_server_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no local S3 server: gone"):
        unavailable("no local S3 server: gone")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        unavailable("no local S3 server: gone")


@pytest.mark.parametrize("value", ["true", "1"])
def test_a_missing_server_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"no local GCS server: gone.*CI is set"):
        unavailable("no local GCS server: gone")
    with pytest.raises(pytest.fail.Exception, match="needs it"):
        require_module("no_such_module_here", "needs it")
    require_module("json", "present")  # nothing happens
