"""Read and write safetensors files one tensor at a time. Start at
:class:`ShardWriter` and :func:`read_tensor`.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` padded with spaces to a multiple of 8 bytes, then the raw
little-endian bytes of every tensor, back to back. A writer that knows every
tensor's dtype and shape up front can therefore write the header first and
then each tensor as it is produced, never holding more than one.

Reading goes through ``readinto`` into a fresh buffer rather than
``safetensors.safe_open(...).get_tensor``: the latter returns tensors backed
by a memory map of the file, whose touched pages count as resident memory
until the file is closed (a whole shard, several GB, by the end of it); a
buffer that is dropped after use keeps the resident set at one tensor.
Tensors that pass through unchanged are copied file to file by the kernel
(:func:`copy_range`), never entering user memory. Every tensor is written at
its own offset, so tensors can be written in any order and from several
threads (a copy by the kernel while another tensor is being sliced).

>>> import tempfile, os, torch
>>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
>>> entries = [Entry("a", "F32", (2, 3)), Entry("b", "BF16", (4,))]
>>> with ShardWriter(path, entries, {"format": "pt"}) as w:
...     w.write("a", torch.arange(6.0).reshape(2, 3))
...     w.write("b", torch.ones(4, dtype=torch.bfloat16))
>>> header = read_header(path)
>>> header.entries["a"].shape, header.metadata
((2, 3), {'format': 'pt'})
>>> read_tensor(path, header, "a")
tensor([[0., 1., 2.],
        [3., 4., 5.]])
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import ChannelcutError

__all__ = ["Entry", "Header", "SafetensorsError", "ShardWriter", "copy_range", "read_header", "read_tensor",
           "read_rows", "DTYPES", "dtype_name", "entries_of"]

PathLike = Union[str, "os.PathLike[str]"]


class SafetensorsError(ChannelcutError, ValueError):
    """A safetensors file that cannot be read, or a write that breaks the
    header announced up front."""


# safetensors dtype name -> torch dtype (those this torch has)
DTYPES: Dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ]
    if hasattr(torch, attr)
}
_NAMES = {dt: name for name, dt in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise SafetensorsError(f"safetensors has no dtype for {dtype}") from None


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: name, dtype name, shape, and (when
    read from a file) its byte range in the data section."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        n = _itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class Header:
    """The parsed header of a safetensors file: tensors in data order."""

    entries: Dict[str, Entry]
    metadata: Optional[Dict[str, str]]
    data_start: int  # file offset of the data section

    @property
    def data_size(self) -> int:
        return max((e.end for e in self.entries.values()), default=0)


def _itemsize(dtype: str) -> int:
    t = DTYPES.get(dtype)
    if t is None:
        raise SafetensorsError(f"unknown safetensors dtype {dtype!r} (known: {', '.join(DTYPES)})")
    return t.itemsize


def read_header(path: PathLike) -> Header:
    """Parse the header of a safetensors file (reads only the header)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise SafetensorsError(f"{path} is not a safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SafetensorsError(f"{path}: the safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    entries: List[Entry] = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            entry = Entry(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"{path}: malformed header entry for {name!r}: {info!r}") from exc
        if entry.end - entry.begin != entry.nbytes or entry.end > size - 8 - n:
            raise SafetensorsError(f"{path}: tensor {name!r} has a byte range that does not fit its shape or the file")
        entries.append(entry)
    entries.sort(key=lambda e: e.begin)
    return Header({e.name: e for e in entries}, metadata, 8 + n)


def read_tensor(path_or_file: Union[PathLike, "object"], header: Header, name: str,
                buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Read one tensor into CPU memory (not a memory map). ``path_or_file``:
    a path, or a binary file object opened on it (its position is not
    used). ``buffer``: a ``uint8`` tensor to read into when it is large
    enough (the result is then a view of it), saving a fresh allocation, and
    its page faults, per tensor; else a new tensor is allocated."""
    e = header.entries[name]
    if buffer is not None and buffer.dtype == torch.uint8 and buffer.numel() >= e.nbytes:
        buf = buffer[: e.nbytes]
    else:
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
    if hasattr(path_or_file, "fileno"):
        _pread_into(path_or_file.fileno(), buf, header.data_start + e.begin, name)  # type: ignore[attr-defined]
    else:
        fd = os.open(path_or_file, os.O_RDONLY)  # type: ignore[arg-type]
        try:
            _pread_into(fd, buf, header.data_start + e.begin, name)
        finally:
            os.close(fd)
    return _from_bytes(buf, e)


def read_rows(path: PathLike, header: Header, name: str, rows: Union[range, Sequence[int]]) -> torch.Tensor:
    """Read some rows (entries of the first dimension) of one tensor: a
    ``range`` is read in one piece, other rows one by one, in the order
    given. Only those bytes enter memory (an embedding's rows for the tokens
    of a batch, a weight in chunks of rows).

    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> with ShardWriter(path, [Entry("w", "F32", (4, 2))]) as w:
    ...     w.write("w", torch.arange(8.0).reshape(4, 2))
    >>> read_rows(path, read_header(path), "w", [3, 0]).tolist()
    [[6.0, 7.0], [0.0, 1.0]]
    """
    e = header.entries[name]
    if not e.shape:
        raise SafetensorsError(f"tensor {name!r} is a scalar: it has no rows")
    n = e.shape[0]
    row_bytes = e.nbytes // n if n else 0
    if isinstance(rows, range):
        if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
            raise IndexError(f"rows {rows} of {name!r}, which has {n} rows (a range with step 1 is read in one piece)")
        runs = [(rows.start, len(rows))]
    else:
        runs = [(int(r), 1) for r in rows]
        bad = [r for r, _ in runs if not 0 <= r < n]
        if bad:
            raise IndexError(f"row {bad[0]} of {name!r}, which has {n} rows")
    total = sum(k for _, k in runs)
    buf = torch.empty(total * row_bytes, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        for r, k in runs:
            _pread_into(fd, buf[done * row_bytes:(done + k) * row_bytes], header.data_start + e.begin + r * row_bytes, name)
            done += k
    finally:
        os.close(fd)
    return _from_bytes(buf, Entry(e.name, e.dtype, (total,) + tuple(e.shape[1:])))


def _pread_into(fd: int, buf: torch.Tensor, offset: int, name: str) -> None:
    view = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
    done = 0
    while done < len(view):  # one read returns at most ~2 GiB on Linux
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SafetensorsError(f"tensor {name!r}: read {done} of {len(view)} bytes (truncated file?)")
        done += n


def _from_bytes(buf: torch.Tensor, e: Entry) -> torch.Tensor:
    dtype = DTYPES[e.dtype]
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=dtype)
    if sys.byteorder != "little" and dtype.itemsize > 1:  # pragma: no cover - big-endian hosts
        raise SafetensorsError("reading safetensors on a big-endian machine is not supported")
    return buf.view(dtype).reshape(e.shape)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``src_fd`` from ``src_offset`` to ``dst_fd`` at
    ``dst_offset`` (file positions untouched), in the kernel where it can."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < count:
        n = 0
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count - done, src_offset + done, dst_offset + done)
            except OSError:  # e.g. across file systems on old kernels
                use_kernel = False
                continue
        else:
            chunk = os.pread(src_fd, min(count - done, 64 << 20), src_offset + done)
            n = len(chunk)
            view, at = memoryview(chunk), dst_offset + done
            while view:
                k = os.pwrite(dst_fd, view, at)
                view, at = view[k:], at + k
        if n == 0:
            raise SafetensorsError(f"unexpected end of the source file after {done} of {count} bytes")
        done += n


class ShardWriter:
    """Write one safetensors file whose tensors are all announced up front
    (``entries``: names, dtypes, shapes; the data is laid out in that
    order). The header is written at once; then :meth:`write` (or
    :meth:`copy_from`) each tensor, in any order and from any thread (every
    write goes to its own offset), exactly once; :meth:`close` checks that
    all were written. Memory holds at most the tensors being written."""

    def __init__(self, path: PathLike, entries: Sequence[Entry], metadata: Optional[Mapping[str, str]] = None) -> None:
        self.path = os.fspath(path)
        header: Dict[str, object] = {}
        if metadata is not None:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self.entries: Dict[str, Entry] = {}
        for e in entries:
            if e.name in header or e.name == "__metadata__":
                raise SafetensorsError(f"tensor name {e.name!r} appears twice in {self.path}")
            placed = Entry(e.name, e.dtype, tuple(int(d) for d in e.shape), offset, offset + e.nbytes)
            header[e.name] = {"dtype": e.dtype, "shape": list(placed.shape), "data_offsets": [placed.begin, placed.end]}
            self.entries[e.name] = placed
            offset = placed.end
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self.data_start = 8 + len(text)
        self.data_size = offset
        self._written: set = set()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._pwrite(struct.pack("<Q", len(text)) + text, 0)
            os.ftruncate(self._fd, self.data_start + self.data_size)
        except BaseException:
            os.close(self._fd)
            raise

    def _pwrite(self, data: Union[bytes, memoryview], offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def _claim(self, name: str) -> Entry:
        e = self.entries.get(name)
        if e is None:
            raise SafetensorsError(f"{self.path}: {name!r} written, but the header does not announce it")
        if name in self._written:
            raise SafetensorsError(f"{self.path}: {name!r} written twice")
        self._written.add(name)
        return e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one announced tensor (of the announced dtype and shape)."""
        e = self.entries.get(name)
        if e is not None and (dtype_name(tensor.dtype) != e.dtype or tuple(tensor.shape) != e.shape):
            raise SafetensorsError(
                f"{self.path}: {name!r} is {dtype_name(tensor.dtype)} {tuple(tensor.shape)}, the header announced "
                f"{e.dtype} {e.shape}")
        e = self._claim(name)
        if e.nbytes:
            t = tensor.detach().cpu().contiguous().reshape(-1)
            if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
                raise SafetensorsError("writing safetensors on a big-endian machine is not supported")
            self._pwrite(t.view(torch.uint8).numpy().data, self.data_start + e.begin)

    def copy_from(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Write one announced tensor as ``nbytes`` raw bytes of another file
        (copied by the kernel where it can: never in this process's memory)."""
        e = self.entries.get(name)
        if e is not None and nbytes != e.nbytes:
            raise SafetensorsError(f"{self.path}: {name!r} has {nbytes} bytes, the header announced {e.nbytes}")
        e = self._claim(name)
        copy_range(src_fd, src_offset, self._fd, self.data_start + e.begin, nbytes)

    def copy_runs(self, name: str, src_fd: int, runs: Sequence[Tuple[int, int]]) -> None:
        """Write one announced tensor as the concatenation of byte ranges
        ``(offset, nbytes)`` of another file (e.g. the kept rows of a source
        tensor), copied by the kernel where it can."""
        e = self.entries.get(name)
        total = sum(n for _, n in runs)
        if e is not None and total != e.nbytes:
            raise SafetensorsError(f"{self.path}: {name!r} has {total} bytes in its runs, the header announced {e.nbytes}")
        e = self._claim(name)
        at = self.data_start + e.begin
        for offset, n in runs:
            copy_range(src_fd, offset, self._fd, at, n)
            at += n

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)
        missing = [n for n in self.entries if n not in self._written]
        if missing:
            raise SafetensorsError(f"{self.path}: {len(missing)} announced tensor(s) never written, e.g. {missing[0]!r}")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def entries_of(tensors: Iterable[Tuple[str, torch.Tensor]]) -> List[Entry]:
    """Entries announcing ``(name, tensor)`` pairs (dtype and shape only)."""
    return [Entry(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors]
