"""Command line: ``python -m lightweight_ckpt COMMAND`` (also installed as ``lightweight-ckpt``).

``consolidate SRC DST``: turn a sharded (DCP) checkpoint into one ``torch.load``-able file in
one process, with no process group. Tensors are read one at a time right before they are
written and freed after, so memory stays near the largest tensor, not the checkpoint. SRC and
DST may be local paths or fsspec URLs; DST is written atomically.

Exit codes: 0 done, 1 a checkpoint error (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from lightweight_ckpt.errors import CheckpointError
from lightweight_ckpt.formats import dcp_dir, torch_file
from lightweight_ckpt.storage import resolve, staged_write

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lightweight_ckpt")


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option needs KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def consolidate(
    src: str,
    dst: str,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    weights_only: bool = True,
) -> int:
    """Write the sharded checkpoint at ``src`` as one file at ``dst``; return the bytes written.

    Raises:
        CheckpointError: ``src`` is not a committed sharded checkpoint, or writing ``dst`` failed.
    """
    source = resolve(src, src_options)
    metadata = dcp_dir.read_metadata(source, src_options)
    tree, tensors, value_names = dcp_dir.skeleton(metadata)
    dcp_dir.read_values(source, src_options, metadata, tree, value_names, weights_only=weights_only)
    by_storage = {t.untyped_storage().data_ptr(): n for n, t in tensors.items() if t.numel()}

    def fill(storage: torch.UntypedStorage) -> None:
        name = by_storage.get(storage.data_ptr())
        if name is not None:
            dcp_dir.read_items(source, src_options, {name: tensors[name]}, weights_only)

    start = time.perf_counter()
    with staged_write(resolve(dst, dst_options)) as sink:
        torch_file.write_streamed(tree, fill, sink)
        nbytes = sink.tell()
    log.info(
        "consolidated %s -> %s: %d bytes in %.2f s", src, dst, nbytes, time.perf_counter() - start
    )
    return nbytes


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = argparse.ArgumentParser(prog="lightweight-ckpt", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cons = commands.add_parser(
        "consolidate", help="turn a sharded checkpoint into one torch.load-able file"
    )
    cons.add_argument("src", help="sharded checkpoint directory (path or URL)")
    cons.add_argument("dst", help="output file (path or URL)")
    cons.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for both SRC and DST (repeatable)",
    )
    cons.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow arbitrary pickled objects in SRC (weights_only=False); trusted files only",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = _options(args.storage_option)
    try:
        nbytes = consolidate(
            args.src, args.dst, options, options, weights_only=not args.unsafe_pickle
        )
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - the CLI talks to a person
        return 1
    print(f"wrote {args.dst} ({nbytes:,} bytes)")  # noqa: T201
    return 0
