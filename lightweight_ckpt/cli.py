"""Command line: ``python -m lightweight_ckpt COMMAND`` (also installed as ``lightweight-ckpt``).

``inspect PATH``: the tree of keys with shapes, dtypes and sizes, and totals, without reading
tensor data (single-file and sharded checkpoints and safetensors files, local or URL).

``verify PATH``: check every record's CRC32 of a single-file checkpoint (exit 1 if any is
damaged); for a sharded checkpoint, that ``.metadata`` reads, every piece it names exists and is
long enough, and every stored item matches the CRC32 in its piece's checksum record.

``consolidate SRC DST``: turn a sharded (DCP) checkpoint into one ``torch.load``-able file in
one process, with no process group. Tensors are read one at a time right before they are
written and freed after, so memory stays near the largest tensor, not the checkpoint. SRC and
DST may be local paths or fsspec URLs; DST is written atomically.

``convert SRC DST.safetensors`` (and ``convert SRC.safetensors DST``): tensors to safetensors,
tied tensors stored once, plain values and structure in its metadata; streamed and atomic (see
``lightweight_ckpt.convert``).

``diff A B``: the entries added, removed, or with another type, dtype, shape or value (count and
largest absolute difference), compared tensor by tensor (see ``lightweight_ckpt.diff``).
Exit codes as ``diff(1)``: 0 equal, 1 different, 2 an error.

``gc DIR``: list the leftovers of killed saves under DIR older than ``--older-than`` seconds
(temp files, unreferenced sharded versions; ``lightweight_ckpt.manager.orphans``); ``--delete``
removes them.

Every command takes ``--storage-option KEY=VALUE`` (repeatable; VALUE is read as JSON when it
parses, so ``anon=false``, ``retries=3`` and ``client_kwargs={"region_name": "eu-west-1"}`` are a
bool, a number and a dict, and anything else stays a string) and prints JSON with ``--json``.
Long operations (consolidate, convert, verify, diff) show a progress bar on stderr when it is a
terminal and tqdm is installed (``lightweight-ckpt[progress]``); ``--quiet`` turns it off.
Exit codes: 0 done, 1 a checkpoint error, a storage failure, a missing extra or damage found
(one ``error: ...`` line on stderr, no traceback), 2 bad usage. Our own log lines (INFO) go to
stderr; the storage clients' loggers stay quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from lightweight_ckpt import config
from lightweight_ckpt.convert import convert
from lightweight_ckpt.diff import DiffReport, diff_checkpoints
from lightweight_ckpt.entries import read_skeleton, verify_file
from lightweight_ckpt.errors import CheckpointError
from lightweight_ckpt.formats import dcp_dir, torch_writer, xla_shards
from lightweight_ckpt.manager.orphans import DEFAULT_OLDER_THAN_S, find_orphans, remove_orphans
from lightweight_ckpt.progress import progress_bar, wants_progress
from lightweight_ckpt.storage import (
    abort_incomplete_uploads,
    classify_failure,
    incomplete_uploads,
    open_source,
    resolve,
    staged_write,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger("lightweight_ckpt")


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to fsspec options: VALUE as JSON where it parses, else the string.

    Raises:
        ValueError: a pair without ``=`` or with an empty key.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option needs KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:  # an endpoint URL, a bucket name, a path: a plain string
            options[key] = text
    return options


def consolidate(
    src: str,
    dst: str,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    weights_only: bool = True,
    *,
    progress: bool = False,
) -> int:
    """Write the sharded checkpoint at ``src`` as one file at ``dst``; return the bytes written.

    ``progress`` shows a bar on stderr (needs tqdm).

    Raises:
        CheckpointError: ``src`` is not a committed sharded checkpoint, or writing ``dst`` failed.
    """
    source = resolve(src, src_options)
    if xla_shards.is_xla_sharded(source):  # XLA-FSDP shards, joined through their metadata
        target = resolve(dst, dst_options)
        nbytes, dropped = xla_shards.consolidate_dir(source, target, weights_only)
        if dropped:
            log.warning("%s: XLA FSDP optimizer state %s left out (flattened shards)", src, dropped)
        return nbytes
    metadata = dcp_dir.read_metadata(source)
    tree = dcp_dir.skeleton(metadata)
    tensors = dcp_dir.tensors_of(tree, metadata)
    dcp_dir.read_values(source, metadata, tree, weights_only=weights_only)
    by_storage = {t.untyped_storage().data_ptr(): n for n, t in tensors.items() if t.numel()}

    total = sum(tensors[n].untyped_storage().nbytes() for n in by_storage.values())
    start = time.perf_counter()
    with progress_bar(total, "consolidate", progress) as advance:

        def fill(storage: torch.UntypedStorage) -> None:
            name = by_storage.get(storage.data_ptr())
            if name is not None:
                dcp_dir.read_items(source, {name: tensors[name]}, weights_only, metadata=metadata)
                advance(storage.nbytes())

        with staged_write(resolve(dst, dst_options)) as sink:
            torch_writer.write_streamed(tree, fill, sink)
            nbytes = sink.tell()
    log.info(
        "consolidated %s -> %s: %d bytes in %.2f s", src, dst, nbytes, time.perf_counter() - start
    )
    return nbytes


_KIB = 1024
_SHOWN_CHARS = 60


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < _KIB or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= _KIB
    return f"{size:.1f} TiB"


def _leaves(tree: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Flatten a checkpoint tree into rows: name, kind, dtype, shape, bytes / value."""
    if isinstance(tree, torch.Tensor):
        return [
            {
                "name": prefix,
                "kind": "tensor",
                "dtype": str(tree.dtype).removeprefix("torch."),
                "shape": list(tree.shape),
                "bytes": tree.numel() * tree.element_size(),
            }
        ]
    if isinstance(tree, dict) and tree:
        rows = []
        for key, value in tree.items():
            rows += _leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if (
        isinstance(tree, list | tuple)
        and tree
        and any(isinstance(v, dict | list | tuple | torch.Tensor) for v in tree)
    ):
        rows = []
        for index, value in enumerate(tree):
            rows += _leaves(value, f"{prefix}.{index}" if prefix else str(index))
        return rows
    text = repr(tree)
    shown = text[:_SHOWN_CHARS] + "..." * (len(text) > _SHOWN_CHARS)
    return [{"name": prefix, "kind": type(tree).__name__, "value": shown}]


def inspect_checkpoint(path: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without reading tensor data: rows per leaf and totals."""
    location = resolve(path, options)
    if dcp_dir.is_sharded(location):
        metadata = dcp_dir.read_metadata(location)
        tree = dcp_dir.skeleton(metadata)  # unread tensors: no data is loaded
        dcp_dir.read_values(location, metadata, tree, weights_only=True)
        layout = "sharded"
    else:
        source = open_source(location)
        try:
            tree, layout = read_skeleton(source)  # a torch file or safetensors
        finally:
            source.close()
    rows = _leaves(tree)
    tensors = [row for row in rows if row["kind"] == "tensor"]
    return {
        "path": path,
        "layout": layout,
        "entries": rows,
        "tensors": len(tensors),
        "tensor_bytes": sum(row["bytes"] for row in tensors),
    }


def verify_checkpoint(
    path: str, options: dict[str, Any] | None = None, progress: bool = False
) -> dict[str, Any]:
    """Check a checkpoint's integrity; return ``{"ok": bool, "checked": n, "problems": [...]}``.

    ``progress`` shows a bar on stderr while a single file's records are checked (needs tqdm).
    """
    location = resolve(path, options)
    if dcp_dir.is_sharded(location):
        problems, checked, what = dcp_dir.verify(location)
    else:
        source = open_source(location)
        try:
            with progress_bar(source.size, "verify", progress) as advance:
                problems, checked, what = verify_file(source, advance)
        finally:
            source.close()
    return {
        "path": path,
        "ok": not problems,
        "checked": checked,
        "what": what,
        "problems": problems,
    }


def _print_inspect(report: dict[str, Any]) -> None:
    print(f"{report['path']} ({report['layout']})")  # noqa: T201
    for row in report["entries"]:
        if row["kind"] == "tensor":
            shape = "x".join(map(str, row["shape"])) or "scalar"
            print(f"  {row['name']:<50} {row['dtype']:<9} {shape:<16} {_human(row['bytes'])}")  # noqa: T201
        else:
            print(f"  {row['name']:<50} {row['kind']:<9} {row['value']}")  # noqa: T201
    print(f"total: {report['tensors']} tensors, {_human(report['tensor_bytes'])}")  # noqa: T201


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
    for name, text in (
        ("inspect", "show keys, shapes, dtypes and sizes"),
        ("verify", "check integrity"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("path", help="checkpoint file or sharded directory (path or URL)")
        command.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
        command.add_argument("--json", action="store_true", help="print JSON for scripts")
    for command in (cons, commands.choices["verify"]):
        command.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_tool_commands(commands)
    _add_clean_uploads(commands)
    args = parser.parse_args(argv)
    try:
        options = parse_storage_options(args.storage_option)
    except ValueError as err:
        parser.error(str(err))  # exits with 2
    failed = 2 if args.command == "diff" else 1  # diff(1): 1 means "different"
    with _logging_to_stderr():
        try:
            # The commands draw their own bars; a second one per transfer would only repeat them.
            with config.override(progress="off"):
                return _run(args, options)
        except (CheckpointError, ImportError) as err:  # ImportError: a missing extra, its hint
            return _error(str(err), failed)
        except Exception as err:
            # a client's own failure that no layer translated (an OSError, a botocore error)
            if not isinstance(err, OSError) and classify_failure(err) is None:
                raise  # a bug: its traceback is the report
            return _error(f"{type(err).__name__}: {err}", failed)


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)  # noqa: T201 - the CLI talks to a person
    return code


@contextlib.contextmanager
def _logging_to_stderr() -> Iterator[None]:
    """Our logger at INFO on stderr; other loggers (gcsfs, botocore) silent, root untouched.

    A NullHandler on the root keeps Python's last-resort handler from printing the clients'
    warnings and tracebacks (gcsfs logs each request that ran out of retries) under our error.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    quiet = logging.NullHandler()
    root = logging.getLogger()
    previous = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    root.addHandler(quiet)
    try:
        yield
    finally:
        root.removeHandler(quiet)
        log.removeHandler(handler)
        log.setLevel(previous[0])
        log.propagate = previous[1]


def _run(args: argparse.Namespace, options: dict[str, Any]) -> int:
    if args.command in _TOOLS:
        return _TOOLS[args.command](args, options)
    if args.command == "consolidate":
        nbytes = consolidate(
            args.src,
            args.dst,
            options,
            options,
            weights_only=not args.unsafe_pickle,
            progress=wants_progress(args.quiet),
        )
        print(f"wrote {args.dst} ({nbytes:,} bytes)")  # noqa: T201
        return 0
    if args.command == "inspect":
        report = inspect_checkpoint(args.path, options)
        if args.json:
            print(json.dumps(report, indent=2))  # noqa: T201
        else:
            _print_inspect(report)
        return 0
    result = verify_checkpoint(args.path, options, progress=wants_progress(args.quiet))
    if args.json:
        print(json.dumps(result, indent=2))  # noqa: T201
    else:
        for problem in result["problems"]:
            print(f"DAMAGED {problem}", file=sys.stderr)  # noqa: T201
        verdict = "ok" if result["ok"] else f"{len(result['problems'])} damaged"
        print(f"{args.path}: {verdict} ({result['checked']} checked; {result['what']})")  # noqa: T201
    return 0 if result["ok"] else 1


# -- convert, diff, gc: the logic lives in their modules; here are arguments and printing ------


def _add_tool_commands(commands: Any) -> None:
    conv = commands.add_parser("convert", help="checkpoint -> .safetensors, or .safetensors back")
    conv.add_argument("src", help="checkpoint file, sharded directory or .safetensors file")
    conv.add_argument("dst", help="DST.safetensors, or a checkpoint file when SRC is safetensors")
    conv.add_argument("--select", metavar="KEY", help="convert only this entry (e.g. model)")
    conv.add_argument("--unsafe-pickle", action="store_true", help="weights_only=False for SRC")
    differ = commands.add_parser("diff", help="which entries of two checkpoints differ")
    differ.add_argument("a", help="checkpoint A (file, sharded directory or safetensors)")
    differ.add_argument("b", help="checkpoint B")
    differ.add_argument("--atol", type=float, default=0.0, help="ignore differences up to this")
    differ.add_argument("--unsafe-pickle", action="store_true", help="weights_only=False")
    gc = commands.add_parser("gc", help="list (or --delete) leftovers of killed saves")
    gc.add_argument("path", help="a run or checkpoint directory (path or URL)")
    gc.add_argument(
        "--older-than",
        type=float,
        default=DEFAULT_OLDER_THAN_S,
        metavar="SECONDS",
        help="only leftovers untouched this long (default 3600: a running save is younger)",
    )
    gc.add_argument("--delete", action="store_true", help="remove them (default: only list)")
    for command in (conv, differ, gc):
        command.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
        command.add_argument("--json", action="store_true", help="print JSON for scripts")
    for command in (conv, differ):
        command.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_convert(args: argparse.Namespace, options: dict[str, Any]) -> int:
    try:
        report = convert(
            args.src,
            args.dst,
            options,
            options,
            select_key=args.select,
            weights_only=not args.unsafe_pickle,
            progress=wants_progress(args.quiet),
        )
    except ValueError as err:
        if isinstance(err, CheckpointError):
            raise
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))  # noqa: T201
        return 0
    for name, why in report.dropped.items():
        print(f"left out {name}: {why}", file=sys.stderr)  # noqa: T201
    for alias, name in report.aliases.items():
        print(f"tied: {alias} -> {name} (stored once)")  # noqa: T201
    for view in report.copied_views:
        print(f"copied: {view}")  # noqa: T201
    print(f"wrote {args.dst} ({report.tensors} tensors, {report.nbytes:,} bytes)")  # noqa: T201
    return 0


def _run_diff(args: argparse.Namespace, options: dict[str, Any]) -> int:
    try:
        report = diff_checkpoints(
            args.a,
            args.b,
            options,
            options,
            atol=args.atol,
            weights_only=not args.unsafe_pickle,
            progress=wants_progress(args.quiet),
        )
    except (CheckpointError, ValueError) as err:  # diff(1): trouble is 2, "different" is 1
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))  # noqa: T201
    else:
        _print_diff(report)
    return 0 if report.equal else 1


def _print_diff(report: DiffReport) -> None:
    marks = {"removed": "-", "added": "+"}
    for d in report.differences:
        if d.kind == "removed":
            detail = d.a
        elif d.kind == "added":
            detail = d.b
        elif d.changed is not None:
            detail = f"{d.changed} elements differ, max abs diff {d.max_abs_diff:g} ({d.a})"
        else:
            detail = f"{d.a} -> {d.b}"
        print(f"{marks.get(d.kind, '~')} {d.kind:<8} {d.name}: {detail}")  # noqa: T201
    verdict = "equal" if report.equal else f"{len(report.differences)} differ"
    print(f"{report.a} vs {report.b}: {report.compared} entries, {verdict}")  # noqa: T201


def _run_gc(args: argparse.Namespace, options: dict[str, Any]) -> int:
    try:
        orphans = find_orphans(args.path, options, older_than_s=args.older_than)
    except ValueError as err:
        if isinstance(err, CheckpointError):
            raise
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    removed = remove_orphans(orphans, options) if args.delete else []
    if args.json:
        rows = [o.to_json() for o in orphans]
        print(json.dumps({"path": args.path, "orphans": rows, "removed": removed}, indent=2))  # noqa: T201
        return 0
    for orphan in orphans:
        action = "removed" if args.delete else "would remove"
        age = f"{orphan.age_s / 3600:.1f} h old"
        print(f"{action} {orphan.kind} {orphan.path} ({_human(orphan.nbytes)}, {age})")  # noqa: T201
    hint = "" if args.delete or not orphans else "; pass --delete to remove them"
    print(f"{args.path}: {len(orphans)} leftovers of killed saves{hint}")  # noqa: T201
    return 0


def _add_clean_uploads(commands: Any) -> None:
    clean = commands.add_parser(
        "clean-uploads",
        help="list (or --abort) S3 multipart uploads (GCS: components) left by killed saves",
    )
    clean.add_argument(
        "url", help="s3://bucket/prefix or gs://bucket/prefix: uploads whose key starts with it"
    )
    clean.add_argument(
        "--older-than",
        type=float,
        default=DEFAULT_OLDER_THAN_S,
        metavar="SECONDS",
        help="only uploads started this long ago (default 3600: a running save is younger)",
    )
    clean.add_argument("--abort", action="store_true", help="abort them (default: only list)")
    clean.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    clean.add_argument("--json", action="store_true", help="print JSON for scripts")


def _run_clean_uploads(args: argparse.Namespace, options: dict[str, Any]) -> int:
    location = resolve(args.url, options)
    find = abort_incomplete_uploads if args.abort else incomplete_uploads
    uploads = find(location, args.older_than)
    if args.json:
        rows = [
            {"url": u.url, "upload_id": u.upload_id, "initiated": str(u.initiated)} for u in uploads
        ]
        print(json.dumps({"url": args.url, "aborted": args.abort, "uploads": rows}, indent=2))  # noqa: T201
        return 0
    for upload in uploads:
        action = "aborted" if args.abort else "incomplete"
        print(f"{action} {upload.url} (upload {upload.upload_id}, started {upload.initiated})")  # noqa: T201
    hint = "" if args.abort or not uploads else "; pass --abort to abort them"
    what = "multipart uploads" if location.protocol in ("s3", "s3a") else "uploads (components)"
    print(f"{args.url}: {len(uploads)} incomplete {what}{hint}")  # noqa: T201
    return 0


_TOOLS = {
    "convert": _run_convert,
    "diff": _run_diff,
    "gc": _run_gc,
    "clean-uploads": _run_clean_uploads,
}
