"""Memory-mapped members of an uncompressed .npz (what ``np.savez`` writes): the arrays stay in the file and only
the rows a step or an evaluation touches are read, so a data set larger than memory can train (``data.memory_map``).
``np.load`` cannot map an .npz; an uncompressed member is a plain .npy at an offset of the zip file, which can."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


def mapped_members(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """``{name: read-only-in-the-file memmap}`` for the members present, or None when one of them is compressed
    (or not a plain numeric .npy), so the caller loads the file as usual."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for name in names:
            try:
                info = z.getinfo(f"{name}.npy")
            except KeyError:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if dtype.hasobject or dtype.kind not in "biuf":
                return None
            # copy-on-write: writable for torch.from_numpy, and nothing is ever written back to the file
            out[name] = np.memmap(path, dtype=dtype, mode="c", offset=f.tell(), shape=shape,
                                  order="F" if fortran else "C")
    return out
