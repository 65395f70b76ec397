"""Files, written so that nothing is ever half there: atomic writes, JSON, safetensors, directories.

Every file is written atomically: to a temporary file in the same directory, flushed and fsynced,
then ``os.replace``-d over the target, so a crash leaves either the old file or the new one, never half
of one. Whole directories (a training checkpoint: several files that only make sense together) are
written the same way one level up: :func:`publish_directory` fills a hidden temporary directory next to
the target and renames it into place when every file is complete; :func:`write_pointer` /
:func:`read_pointer` keep a small file naming the newest complete one.

Tensors are stored as safetensors: raw arrays and a JSON header, nothing executable, so reading a file
from anywhere cannot run code (unlike pickle). Every reader here turns a missing or damaged file into
a ``ValueError`` naming the file. The header is checked whole (types, dtypes, shapes against byte
counts, offsets against the file's length) before any tensor is read, so a hostile header cannot make
a reader allocate more than the file holds; :func:`read_safetensors_header` gives the shapes alone, for
checking a config against them before a model is built.

Written files are ordinary and reproducible: the same tensors and metadata give the same bytes (tensors
and header keys sorted; the safetensors writer here is ours for that reason: the library's header order
varies from process to process), and files and directories get the permissions the umask allows, as
``open`` would give them (``tempfile`` alone makes them private).

A run directory has one writer at a time: :func:`claim_run_directory` takes an exclusive lock on it
(``filelock``: ``flock``, released by the operating system when the process dies, ``kill -9`` included).

This module knows nothing of models: ``checkpoint`` (model directories) and ``hf`` (Hugging Face
directories) are built on it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path_or_fd, directory: bool = False) -> None:
    """Give a ``tempfile`` file (0600) or directory (0700) the mode ``open``/``mkdir`` would have given."""
    mode = (0o777 if directory else 0o666) & ~current_umask()
    try:
        if isinstance(path_or_fd, int):
            os.fchmod(path_or_fd, mode)
        else:
            os.chmod(path_or_fd, mode)
    except (OSError, AttributeError):   # no fchmod (Windows) or a file system without modes
        pass


def atomic_write_bytes(path, data) -> None:
    """Write ``data`` (bytes, or an iterable of bytes chunks) to ``path`` atomically (temporary file +
    fsync + rename). The file's mode follows the umask. ``path`` naming a directory is a ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _follow_umask(fd)
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_copy(source, target) -> None:
    """Copy file ``source`` to ``target`` atomically (read in 1 MiB chunks)."""
    def chunks():
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    atomic_write_bytes(target, chunks())


def fsync_directory(path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path, obj) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def parse_json(text, where: str):
    """Parse JSON ``text`` (str or bytes); invalid JSON is a ValueError naming ``where``."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e


def read_json(path, what: str = "JSON file"):
    """Parse a JSON file; a missing or unparsable file is a ValueError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e
    return parse_json(text, f"{what} {path}")


STAGING_SUFFIXES = (".tmp", ".old", ".del")


def _fault_point(name: str) -> None:
    """Test hook: ``REF_BERT_FAULT_POINT=name`` kills the process here with SIGKILL (the fault tests set it in
    a child process to stop it at the worst moments of publishing and pruning: "publish-between-renames",
    "remove-after-rename", and rundir's "checkpoint-before-pointer"). Unset: nothing."""
    if os.environ.get("REF_BERT_FAULT_POINT") == name:
        import signal

        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def publish_directory(final, write) -> Path:
    """Create directory ``final`` atomically: ``write(tmp)`` fills a hidden sibling ``.NAME.*.tmp``,
    which is fsynced and renamed to ``final`` only when ``write`` returns. Until then ``final`` is
    untouched; if ``write`` raises (KeyboardInterrupt included) the temporary directory is removed.

    An existing ``final`` is first moved aside (to ``.NAME.*.old/NAME``) and deleted after the new one
    is in place, so ``final`` names a complete directory at every moment except between those two
    renames; a process killed there leaves the old directory under the ``.old`` name, and
    :func:`remove_staging` moves it back to ``final`` (it deletes ``.old`` leftovers only when ``final``
    exists). Other leftovers of a killed process are hidden names that :func:`remove_staging` deletes.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    try:
        _follow_umask(tmp, directory=True)
        write(tmp)
        for entry in tmp.iterdir():  # atomic_write_bytes already fsynced each file's data
            if entry.is_dir():
                fsync_directory(entry)
        fsync_directory(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=parent))
            os.replace(final, old / final.name)
            _fault_point("publish-between-renames")
        os.replace(tmp, final)
        fsync_directory(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_staging(parent) -> list:
    """Clean up after a process killed while publishing or removing directories in ``parent``: a
    directory :func:`publish_directory` moved aside (``.NAME.*.old/NAME``) whose ``NAME`` is missing is
    moved back (it was killed between its two renames); every other hidden ``.*.tmp``, ``.*.old`` and
    ``.*.del`` directory is deleted. Returns the paths removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        if not (entry.name.startswith(".") and entry.name.endswith(STAGING_SUFFIXES) and entry.is_dir()):
            continue
        if entry.name.endswith(".old"):
            for kept in list(entry.iterdir()):
                if kept.is_dir() and not (parent / kept.name).exists():
                    os.replace(kept, parent / kept.name)
                    fsync_directory(parent)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def remove_directory(path) -> None:
    """Delete directory ``path`` so that it is never seen half-deleted under its name: it is first
    renamed to a hidden ``.NAME.*.del`` sibling (one atomic rename), then deleted; a process killed in
    between leaves the hidden name, which :func:`remove_staging` deletes."""
    path = Path(path)
    if not path.exists():
        return
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".del", dir=path.parent))
    os.replace(path, doomed / path.name)
    fsync_directory(path.parent)
    _fault_point("remove-after-rename")
    shutil.rmtree(doomed, ignore_errors=True)


def write_pointer(path, target) -> None:
    """Atomically write a one-line file naming ``target`` relative to the pointer's own directory."""
    path = Path(path)
    relative = os.path.relpath(Path(target), path.parent)
    atomic_write_bytes(path, (Path(relative).as_posix() + "\n").encode())


def read_pointer(path) -> Path:
    """The directory a :func:`write_pointer` file names; ValueError if the file or the directory is missing."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; expected a file naming a checkpoint directory")
    try:
        name = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file naming a checkpoint directory: {e}") from e
    if not name:
        raise ValueError(f"{path} is empty; expected the name of a checkpoint directory")
    target = path.parent / name
    if not target.is_dir():
        raise ValueError(f"{path} names {name!r}, but {target} is not a directory")
    return target


# --- safetensors -----------------------------------------------------------------------------------
# The safetensors dtype names, and NumPy's (little-endian) types for them. BF16 has no NumPy type: it is
# widened exactly to float32 on reading (every bfloat16 is the top half of a float32).
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                      "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
                      "BF16": "<u2"}
_NUMPY_TO_SAFETENSORS = {np.dtype(v).newbyteorder("<") if np.dtype(v).itemsize > 1 else np.dtype(v): k
                         for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit


def safetensors_chunks(tensors: dict, metadata: dict | None = None) -> list:
    """The bytes of a safetensors file, as a list of chunks: the 8-byte header length, the JSON header
    (keys sorted, padded with spaces to a multiple of 8 bytes, as the format recommends), then each
    tensor's little-endian bytes in name order. The same tensors and metadata always give the same bytes."""
    header: dict = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise ValueError(f"safetensors metadata must map strings to strings, got {bad!r:.200}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in sorted(tensors):
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is invalid: expected a string other than '__metadata__'")
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        if dtype not in _NUMPY_TO_SAFETENSORS:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {"dtype": _NUMPY_TO_SAFETENSORS[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little"), text, *chunks]


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Host NumPy arrays -> one safetensors file, atomically and reproducibly. Metadata values must be strings."""
    atomic_write_bytes(path, safetensors_chunks(tensors, metadata))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path) -> tuple[dict, dict, int]:
    """Read and check the header of a safetensors file without reading any tensor.

    Returns ``(entries, metadata, data_start)``: ``entries[name] = (dtype name, shape, (begin, end))``
    with offsets relative to ``data_start``. ValueError naming the file and the field unless the header
    is a JSON object whose entries each have a known dtype, a shape of non-negative integers, and data
    offsets whose length is exactly what the shape and dtype need, and the entries' bytes tile the rest of
    the file exactly (no gap, no overlap, nothing beyond the end): so every shape read here is backed by
    bytes that exist."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tensor file {path} " + ("is a directory; expected a safetensors file" if path.is_dir()
                                                   else "does not exist"))
    size = path.stat().st_size
    bad = f"{path} is corrupt or not a safetensors file"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(raw, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{bad}: header length {n} exceeds "
                             f"{'the file' if n <= MAX_HEADER_BYTES else 'the limit of ' + str(MAX_HEADER_BYTES)}")
        header = parse_json(f.read(n), f"{bad}: its header")
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{bad}: __metadata__ is {metadata!r:.120}, expected an object of strings")
    entries = {}
    for name, info in header.items():
        where = f"{bad}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: header entry is {info!r:.80}, expected an object with dtype, shape, data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where}: dtype {dtype!r:.40} is not supported; expected one of {sorted(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(f"{where}: shape {shape!r:.80} is invalid; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise ValueError(f"{where}: data_offsets {offsets!r:.80} are invalid; expected [begin, end] with "
                             f"0 <= begin <= end")
        need = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape "
                             f"{shape} of {dtype} needs {need}")
        entries[name] = (dtype, tuple(shape), (offsets[0], offsets[1]))
    data_bytes = size - 8 - n
    position = 0
    for name, (_, _, (begin, end)) in sorted(entries.items(), key=lambda item: item[1][2]):
        if begin != position:
            raise ValueError(f"{bad}: tensor {name!r} starts at byte {begin} of the data, expected {position} "
                             f"(tensors must tile the data with no gap or overlap)")
        position = end
    if position != data_bytes:
        raise ValueError(f"{bad}: the tensors cover {position} bytes of data, but the file holds {data_bytes} "
                         f"after its header (truncated or padded)")
    return entries, {str(k): v for k, v in metadata.items()}, 8 + n


def load_tensors(path, names=None) -> tuple[dict, dict]:
    """Read a safetensors file into host NumPy arrays (native byte order; BF16 widened exactly to
    float32) and its metadata; only ``names`` if given. The header is checked whole first
    (:func:`read_safetensors_header`); a damaged file is a ValueError naming it."""
    path = Path(path)
    entries, metadata, start = read_safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, (begin, end)) in entries.items():
            if names is not None and name not in names:
                continue
            f.seek(start + begin)
            data = f.read(end - begin)
            if len(data) != end - begin:
                raise ValueError(f"{path}: tensor {name!r} is cut short (the file changed while being read)")
            array = np.frombuffer(data, dtype=SAFETENSORS_DTYPES[dtype])
            if dtype == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = array.astype(array.dtype.newbyteorder("="), copy=True).reshape(shape)
    return tensors, metadata


def check_finite(tensors: dict, where: str) -> None:
    """Every floating-point tensor finite; else a ValueError naming the first that is not."""
    for name, array in tensors.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ValueError(f"{where}: tensor {name!r} has {bad} non-finite values (NaN or inf); expected finite "
                             f"weights (pass allow_nonfinite=True to load them anyway, for debugging)")


def check_float_tensors(tensors: dict, where: str) -> None:
    """Every tensor stored as floating point: a model's weights are never integers or booleans (an I32
    header on float bytes would otherwise be read as integers and silently converted)."""
    for name, array in tensors.items():
        if array.dtype.kind != "f":
            raise ValueError(f"{where}: tensor {name!r} has dtype {array.dtype}; expected a floating-point "
                             f"weight (F16, BF16, F32 or F64)")


def check_state(expected_shapes: dict, tensors: dict, where: str) -> None:
    """Every expected name present with the expected shape, and nothing else."""
    missing = [k for k in expected_shapes if k not in tensors]
    unexpected = [k for k in tensors if k not in expected_shapes]
    if missing or unexpected:
        raise ValueError(f"{where}: parameter names do not match the config "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    for k, shape in expected_shapes.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}")


def check_shapes(expected_shapes: dict, shapes: dict, where: str) -> None:
    """:func:`check_state` on shapes alone (e.g. from :func:`read_safetensors_header`), before anything is read."""
    check_state(expected_shapes, {k: _Shape(v) for k, v in shapes.items()}, where)


class _Shape:
    """Stands in for an array in :func:`check_state` when only the shape is known."""

    def __init__(self, shape):
        self.shape = tuple(shape)


# --- one writer per run directory ------------------------------------------------------------------
LOCK_NAME = ".lock"
HOLDER_NAME = ".lock-holder"


class RunDirectoryBusy(ValueError):
    """Another process holds a run directory (:func:`claim_run_directory`); the message names it."""


def claim_run_directory(directory):
    """Take the exclusive writer's lock of a run directory for as long as the returned object is held
    (use it as a context manager, or call ``.release()``); a second writer gets :class:`RunDirectoryBusy`
    (a ValueError) naming the holder's pid, host and command.

    The lock is ``filelock.FileLock`` on ``DIR/.lock``: an ``flock``, which the operating system releases
    when the holding process ends in any way (``kill -9`` included), so a stale lock never blocks a
    resume. The holder is written to ``DIR/.lock-holder`` (for the message only; the lock itself is the
    ``flock``). Reusable by every command that writes a run directory: ``pretrain`` and
    ``finetune`` hold it from before they write anything into ``--out`` until the run ends."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = (directory / HOLDER_NAME).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            holder = "unknown"
        raise RunDirectoryBusy(f"{directory} is in use by another run ({holder or 'holder unknown'}); one writer "
                               f"per run directory: wait for it to finish, stop it, or choose another --out") from None
    held = RunDirectoryLock(lock, directory / HOLDER_NAME)
    try:
        atomic_write_bytes(held.holder_file,
                           f"pid {os.getpid()} on host {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n".encode())
    except BaseException:
        held.release()
        raise
    return held


class RunDirectoryLock:
    """A held run-directory lock (:func:`claim_run_directory`): ``release()`` or leave the ``with`` block.
    The ``.lock`` file itself stays (deleting a lock file races with a process about to lock it)."""

    def __init__(self, lock, holder_file: Path):
        self.lock, self.holder_file = lock, holder_file

    def release(self) -> None:
        if self.lock.is_locked:
            self.holder_file.unlink(missing_ok=True)
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
