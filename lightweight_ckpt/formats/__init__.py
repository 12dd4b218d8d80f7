"""Byte layouts of checkpoints. Each format writes into a sink and reads from a ``Source``.

- ``torch_file``: one ``torch.save`` zip archive, streamed on write, CRC-verified on read, read
  straight into the caller's tensors where it can.
- ``zip_records``: the record index and CRC32 checks of such an archive (shared with tools that
  verify checkpoints without loading them).

A new format (sharded DCP directory, safetensors) is a new module here; checksums and the
atomic commit stay where they are (``zip_records`` / ``storage``).
"""
