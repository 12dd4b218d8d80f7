"""A save SIGKILLed part-way leaves the previous checkpoint, intact, or the new one; never a mix.

A real process writes a 320 MiB checkpoint over an existing small one at the same path and is
killed with SIGKILL (no cleanup can run) at several points: right when it says it starts saving,
after short delays, once its temp file exists, once the temp file holds half / nearly all of the
data, and after the save returned. The file at the path must then load with Fabric and with plain
``torch.load(weights_only=True)`` and equal the old state or the new one bitwise, and the only
strays in the directory may be hidden ``.<name>.tmp-*`` files.

Importing torch takes seconds on a small machine, so one helper process (started once for the
module) imports it and forks a fresh saver per case; the saver is the process that gets killed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from lightweight_ckpt import Fabric
from tests.helpers.asserts import states_equal

pytestmark = pytest.mark.slow

N_TENSORS = 5
NUMEL = 16 * 2**20  # int32: 64 MiB per tensor, 320 MiB in all
NEW_BYTES = N_TENSORS * NUMEL * 4
HANG_GUARD_S = 120.0  # only to turn a hang into a failure; nothing is asserted about time


def big_state() -> dict[str, Any]:
    """The NEW state: large, deterministic, different in every tensor and every element."""
    return {
        "tag": "new",
        "step": 2,
        "tensors": {
            f"t{i}": torch.arange(NUMEL, dtype=torch.int32).add_(7919 * i) for i in range(N_TENSORS)
        },
    }


def old_state() -> dict[str, Any]:
    """The OLD state already at the path: same keys, small tensors."""
    return {
        "tag": "old",
        "step": 1,
        "tensors": {
            f"t{i}": torch.arange(1000, dtype=torch.int32).mul_(-3).sub_(i)
            for i in range(N_TENSORS)
        },
    }


SERVER = f"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

import torch

torch.set_num_threads(1)
from lightweight_ckpt import Fabric

N_TENSORS = {N_TENSORS}
NUMEL = {NUMEL}

{inspect.getsource(big_state)}

for line in sys.stdin:
    path = line.strip()
    pid = os.fork()
    if pid == 0:  # the saver: tell the test when it starts and ends, then wait to be killed
        try:
            state = big_state()
            print(f"saving {{os.getpid()}}", flush=True)
            Fabric().save(path, state)
            print(f"saved {{os.getpid()}}", flush=True)
            while True:
                time.sleep(60)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    print(f"reaped {{pid}} {{status}}", flush=True)
"""


class Lines:
    """Read whole lines from a pipe, with a guard against hangs."""

    def __init__(self, pipe: IO[bytes], log: Path) -> None:
        self._fd = pipe.fileno()
        self._log = log
        self._buffer = b""
        self.seen: list[str] = []

    def _pop(self) -> str | None:
        if b"\n" not in self._buffer:
            return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        self.seen.append(line.decode())
        return self.seen[-1]

    def _fill(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self._fd, 65536)
        if not chunk:
            pytest.fail(f"the helper process exited; its stderr:\n{self._log.read_text()}")
        self._buffer += chunk
        return True

    def poll(self) -> str | None:
        """Return a complete line if one is there, without waiting."""
        line = self._pop()
        if line is None and self._fill(0):
            line = self._pop()
        return line

    def expect(self, prefix: str) -> str:
        """Wait for the next line starting with ``prefix`` (earlier lines are kept in ``seen``)."""
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            line = self._pop()
            if line is not None and line.startswith(prefix):
                return line
            if line is None and not self._fill(max(0.0, deadline - time.monotonic())):
                pytest.fail(
                    f"no {prefix!r} line from the helper; seen {self.seen}; "
                    f"stderr:\n{self._log.read_text()}"
                )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IO[bytes], Lines]]:
    log = tmp_path_factory.mktemp("crash-server") / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            bufsize=0,
            env=env,
            start_new_session=True,  # its own process group: the helper and its savers
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        yield proc.stdin, Lines(proc.stdout, log)
    finally:
        proc.stdin.close()  # the helper exits at end of input once its saver is reaped
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a failed test left a saver running: end the group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            proc.stdout.close()


def temp_files(directory: Path, name: str) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(name)}\.tmp-[0-9a-f]+$")
    return [directory / n for n in os.listdir(directory) if pattern.match(n)]


def wait_for_temp(directory: Path, path: Path, min_bytes: int, lines: Lines) -> None:
    """Return once a temp file holds ``min_bytes``, or the target was already replaced."""
    old_inode = path.stat().st_ino
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        for temp in temp_files(directory, path.name):
            with contextlib.suppress(FileNotFoundError):  # renamed onto the target just now
                if temp.stat().st_size >= min_bytes:
                    return
        if path.stat().st_ino != old_inode:
            return  # committed before we saw the threshold: still a valid (late) kill point
        line = lines.poll()
        if line is not None and line.startswith("reaped"):
            pytest.fail(f"the saver died by itself: {lines.seen}")
        time.sleep(0.0005)
    pytest.fail(f"the temp file never reached {min_bytes} bytes; seen {lines.seen}")


KILL_POINTS = {
    "at-start-signal": ("delay", 0.0),
    "start+20ms": ("delay", 0.02),
    "start+200ms": ("delay", 0.2),
    "temp-file-exists": ("temp", 0),
    "temp-file-half": ("temp", NEW_BYTES // 2),
    "temp-file-nearly-full": ("temp", NEW_BYTES - NEW_BYTES // 50),
    "after-save-returned": ("saved", 0),
}


@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_sigkill_during_save_leaves_old_or_new_never_a_mix(
    server: tuple[IO[bytes], Lines], tmp_path: Path, kill_point: str
) -> None:
    stdin, lines = server
    directory = tmp_path / "run"
    directory.mkdir()
    path = directory / "last.ckpt"
    old = old_state()
    Fabric().save(path, old)
    assert states_equal(Fabric().load(path), old)

    lines.seen.clear()
    stdin.write(f"{path}\n".encode())
    pid = int(lines.expect("saving ").split()[1])
    try:
        how, amount = KILL_POINTS[kill_point]
        if how == "delay":
            time.sleep(amount)
        elif how == "temp":
            wait_for_temp(directory, path, amount, lines)
        else:
            lines.expect(f"saved {pid}")
    finally:
        os.kill(pid, signal.SIGKILL)
    status = int(lines.expect(f"reaped {pid} ").split()[2])
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL  # it never got to clean up
    said_saved = f"saved {pid}" in lines.seen

    # only the checkpoint and hidden temp files of this name are in the directory
    temps = temp_files(directory, path.name)
    strays = set(os.listdir(directory)) - {path.name} - {t.name for t in temps}
    assert not strays, f"unexpected files after the crash: {sorted(strays)}"
    assert path.name in os.listdir(directory)

    loaded = Fabric().load(path)
    is_old = states_equal(loaded, old)
    new = None if is_old else big_state()
    is_new = new is not None and states_equal(loaded, new)
    assert is_old or is_new, f"the checkpoint is neither the old nor the new state ({kill_point})"
    del loaded
    plain = torch.load(path, weights_only=True)
    assert states_equal(plain, old if is_old else new)
    del plain, new

    if temps:  # a temp file left behind means the rename never happened
        assert is_old
    if said_saved:
        assert is_new
        assert not temps
    if kill_point == "after-save-returned":
        assert said_saved

    # the path is still usable: a later save replaces whatever is there
    after = old_state()
    after["tag"] = "after"
    Fabric().save(path, after)
    assert states_equal(Fabric().load(path), after)
    assert sorted(os.listdir(directory)) == sorted([path.name, *(t.name for t in temps)])
