"""XLAFSDPStrategy with real XlaFullyShardedDataParallel modules (PJRT_DEVICE=CPU).

World size 1 runs for real (train step, save, load). World sizes 2 and 4 are emulated: real
XLA FSDP modules built as rank k of N (``sharding_rank``/``sharding_world_size``, which is how
XLA FSDP cuts its shards), driven by threads through the strategy's coordinator seam
(``tests/xla/emulation.py``), since cross-replica collectives cannot run on the CPU runtime.
The shard files, consolidation (torch_xla's ``consolidate_sharded_state_dicts``) and loads are
real.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

SKIP_REASON = "torch_xla is not installed (it needs torch==2.9.0): run bash scripts/xla-tests"
torch_xla = pytest.importorskip("torch_xla", reason=SKIP_REASON)
from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as XlaFsdp  # noqa: E402

from lightweight_ckpt import Fabric, StateMismatchError  # noqa: E402
from lightweight_ckpt.cli import main as cli_main  # noqa: E402
from lightweight_ckpt.collectives import RankFailedError  # noqa: E402
from lightweight_ckpt.strategies import SingleDeviceStrategy, XLAFSDPStrategy  # noqa: E402
from tests.helpers.asserts import assert_states_differ, assert_states_equal  # noqa: E402
from tests.xla.emulation import run_replicas, unwrap  # noqa: E402

pytestmark = pytest.mark.xla


def _plain(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # 32x32 = 1024 weights: with 128-element shard padding every rank of 4 holds real data
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3), nn.BatchNorm1d(3))


def _sharded(seed: int, rank: int, world_size: int, **kwargs) -> XlaFsdp:
    if world_size == 1:
        return XlaFsdp(_plain(seed).to(torch_xla.device()), **kwargs)
    return XlaFsdp(
        _plain(seed),
        sharding_groups=[list(range(world_size))],
        sharding_rank=rank,
        sharding_world_size=world_size,
        **kwargs,
    )


def _cpu(state_dict):
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def test_world_size_one_train_save_load(tmp_path) -> None:
    """Real XLA FSDP at world size 1: a train step, then a sharded save and load."""
    model = _sharded(0, 0, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 32, device=torch_xla.device())).sum().backward()
        optimizer.step()
        torch_xla.sync()
    fabric = Fabric()  # auto: an XLA FSDP module in the state picks XLAFSDPStrategy
    state = {"model": model, "optimizer": optimizer, "epoch": 3}
    saved_model = _cpu(model.state_dict())
    saved_opt = optimizer.state_dict()["state"][0]["exp_avg"].cpu()
    path = str(tmp_path / "ckpt")
    fabric.save(path, state)
    assert isinstance(fabric.strategy, XLAFSDPStrategy)
    names = sorted(os.listdir(path))
    assert names[0] == ".xla_fsdp.json"
    assert len(names) == 2
    assert os.listdir(os.path.join(path, names[1])) == ["rank-00000-of-00001.ckpt"]
    optimizer.zero_grad()
    model(torch.randn(4, 32, device=torch_xla.device())).sum().backward()
    optimizer.step()
    torch_xla.sync()
    state["epoch"] = 9
    assert_states_differ(_cpu(model.state_dict()), saved_model)
    assert fabric.load(path, state) == {}
    assert state["epoch"] == 3
    assert_states_equal(_cpu(model.state_dict()), saved_model)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"].cpu(), saved_opt)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("flatten", [False, True])
def test_sharded_save_consolidate_and_load(tmp_path, world_size, flatten) -> None:
    kwargs = {"flatten_parameters": flatten}
    models = [_sharded(1, r, world_size, **kwargs) for r in range(world_size)]
    originals = [_cpu(m.state_dict()) for m in models]
    path = str(tmp_path / "ckpt")

    def save(rank, coordinator):
        fabric = Fabric(strategy=XLAFSDPStrategy(coordinator=coordinator))
        fabric.save(path, {"model": models[rank], "epoch": 5})

    unwrap(run_replicas(world_size, save))
    (version,) = [n for n in os.listdir(path) if n.startswith("shards-")]
    expected = [f"rank-{r:05d}-of-{world_size:05d}.ckpt" for r in range(world_size)]
    assert sorted(os.listdir(os.path.join(path, version))) == expected

    # same world size: fresh (different) modules get their own shard back
    fresh = [_sharded(2, r, world_size, **kwargs) for r in range(world_size)]
    assert_states_differ(_cpu(fresh[1].state_dict()), originals[1])

    def load(rank, coordinator):
        fabric = Fabric(strategy=XLAFSDPStrategy(coordinator=coordinator))
        state = {"model": fresh[rank], "epoch": 0}
        remainder = fabric.load(path, state)
        return remainder, state["epoch"]

    results = unwrap(run_replicas(world_size, load))
    assert results == [({}, 5)] * world_size
    for rank in range(world_size):
        assert_states_equal(_cpu(fresh[rank].state_dict()), originals[rank])

    # consolidate (the CLI) into one full file: it is the plain model's state dict
    full = str(tmp_path / "full.ckpt")
    assert cli_main(["consolidate", path, full]) == 0
    plain = _plain(1)
    loaded = torch.load(full, weights_only=True)
    assert loaded["epoch"] == 5
    assert_states_equal(loaded["model"], plain.state_dict())

    # the full file loads into a plain model ...
    target = _plain(3)
    assert_states_differ(target.state_dict(), plain.state_dict())
    Fabric(strategy=SingleDeviceStrategy()).load(full, {"model": target}, strict=False)
    assert_states_equal(target.state_dict(), plain.state_dict())

    # ... and into XLA FSDP modules: each replica cuts its own shard
    again = [_sharded(4, r, world_size, **kwargs) for r in range(world_size)]

    def load_full(rank, coordinator):
        fabric = Fabric(strategy=XLAFSDPStrategy(coordinator=coordinator))
        fabric.load(full, {"model": again[rank]}, strict=False)

    unwrap(run_replicas(world_size, load_full))
    for rank in range(world_size):
        assert_states_equal(_cpu(again[rank].state_dict()), originals[rank])


def test_state_dict_type_full_writes_the_consolidated_file(tmp_path) -> None:
    models = [_sharded(5, r, 2) for r in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    path = str(tmp_path / "full.ckpt")

    def save(rank, coordinator):
        strategy = XLAFSDPStrategy(state_dict_type="full", coordinator=coordinator)
        Fabric(strategy=strategy).save(path, {"model": models[rank], "opt": optimizers[rank]})

    unwrap(run_replicas(2, save))
    assert os.listdir(tmp_path) == ["full.ckpt"]  # the temporary shards are gone
    loaded = torch.load(path, weights_only=True)
    assert "opt" not in loaded  # XLA FSDP optimizer state is not consolidated (logged)
    assert_states_equal(loaded["model"], _plain(5).state_dict())


def test_world_size_mismatch_is_refused_on_every_replica(tmp_path) -> None:
    models = [_sharded(1, r, 2) for r in range(2)]
    path = str(tmp_path / "ckpt")

    def save(rank, coordinator):
        Fabric(strategy=XLAFSDPStrategy(coordinator=coordinator)).save(path, {"m": models[rank]})

    unwrap(run_replicas(2, save))
    four = [_sharded(1, r, 4) for r in range(4)]

    def load(rank, coordinator):
        Fabric(strategy=XLAFSDPStrategy(coordinator=coordinator)).load(path, {"m": four[rank]})

    results = run_replicas(4, load)
    assert all(isinstance(r, StateMismatchError) for r in results)
    assert "saved by 2 XLA FSDP replicas, loading on 4" in str(results[0])
    assert path in str(results[0])


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path) -> None:
    models = [_sharded(1, r, 2) for r in range(2)]
    originals = [_cpu(m.state_dict()) for m in models]
    path = str(tmp_path / "ckpt")

    def save(rank, coordinator, state):
        Fabric(strategy=XLAFSDPStrategy(coordinator=coordinator)).save(path, state)

    unwrap(run_replicas(2, lambda r, c: save(r, c, {"m": models[r]})))
    bad = [{"m": models[0]}, {"m": models[1], "oops": lambda: None}]  # replica 1 cannot pickle
    results = run_replicas(2, lambda r, c: save(r, c, bad[r]))
    assert isinstance(results[0], RankFailedError)
    assert isinstance(results[1], Exception)
    assert not isinstance(results[1], RankFailedError)
    fresh = [_sharded(2, r, 2) for r in range(2)]

    def load(rank, coordinator):
        Fabric(strategy=XLAFSDPStrategy(coordinator=coordinator)).load(path, {"m": fresh[rank]})

    unwrap(run_replicas(2, load))
    for rank in range(2):
        assert_states_equal(_cpu(fresh[rank].state_dict()), originals[rank])
