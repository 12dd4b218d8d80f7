"""The tunables read from the environment (lightweight_ckpt.config)."""

from __future__ import annotations

import pytest

from lightweight_ckpt import config


@pytest.mark.parametrize(
    ("local_world_size", "parts"),
    [(None, 4), ("1", 4), ("2", 2), ("4", 2), ("8", 2), ("not-a-number", 4)],
)
def test_sharded_pieces_share_parts_among_a_nodes_ranks_and_get_a_huge_page_each(
    monkeypatch: pytest.MonkeyPatch, local_world_size: str | None, parts: int
) -> None:
    monkeypatch.delenv("LWCKPT_PARTS_IN_FLIGHT", raising=False)
    monkeypatch.delenv("LWCKPT_DIRECT_BUFFER_BYTES", raising=False)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    tunables = config._from_env()
    # upload parts are shared among the node's ranks; each piece's direct buffers are 2 MiB,
    # one huge page: a write is one request to the disk however many ranks write at once
    assert (tunables.piece_parts_in_flight, tunables.piece_buffer_bytes) == (parts, 2 << 20)
    # one rank writing one file (DDP, XLA) keeps all the parts and the single file's buffers
    assert (tunables.parts_in_flight, tunables.direct_buffer_bytes) == (4, 4 << 20)


def test_parts_in_flight_set_explicitly_is_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LWCKPT_PARTS_IN_FLIGHT", "6")
    tunables = config._from_env()
    assert (tunables.parts_in_flight, tunables.piece_parts_in_flight) == (6, 6)
    monkeypatch.setenv("LWCKPT_PARTS_IN_FLIGHT", "0")
    assert config._from_env().parts_in_flight == 1


def test_a_bad_choice_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LWCKPT_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match=r"LWCKPT_PROGRESS='sometimes'.*auto, on, off"):
        config._from_env()


def test_override_applies_inside_the_block_only() -> None:
    before = config.settings().part_bytes
    with config.override(part_bytes=before * 2) as inside:
        assert inside.part_bytes == before * 2
        assert config.settings().part_bytes == before * 2
    assert config.settings().part_bytes == before
