"""Communicators: the collective operations data-parallel training needs, behind one small interface.

A training loop written against :class:`Communicator` has one code path for one process and for N:

    rank, size             this process's index and the number of processes
    allgather(x)           x: (n,) on every rank -> (size, n), row r = rank r's x
    alltoall(x)            x: (size, n) on every rank -> (size, n), row j = rank j's x[this rank]
    gather(x, root)        x: (n,) -> (size, n) on ``root``, None elsewhere
    broadcast(x, root)     x: any shape, overwritten in place with ``root``'s values; returns x
    any(flag)              True on every rank when ``flag`` is True on some rank
    broadcast_text(text)   a string from ``root`` (a checkpoint's path)
    barrier()
    abort(code)            end every process of the job now (MPI_Abort): one failing rank must not
                           leave the others waiting in a collective forever

There is no all-reduce: MPI_Allreduce and NCCL's add in an order of their own choosing, which may
change with the number of ranks, so a sum that must not depend on it is made from ``alltoall`` or
``allgather`` and additions in a fixed order by the caller (ref_bert/pretrain/data_parallel.py).

Arrays are those of the model's backend: NumPy arrays for :class:`SingleProcess` and :class:`Mpi`,
CuPy arrays for :class:`Nccl`. No operation pickles anything: everything sent is an array buffer.

Implementations:

* :class:`SingleProcess`: rank 0 of 1; every operation is the identity (no copies beyond what the
  shapes require).
* :class:`Mpi`: MPI through mpi4py (``pip install "ref-bert[mpi]"``, which brings MPICH and its
  ``mpiexec``), on host arrays.
* :class:`Nccl`: NCCL through CuPy (``cupy.cuda.nccl``), on device arrays, one GPU per rank. MPI
  (mpi4py) starts the processes, hands NCCL its unique id, and carries the host-side operations
  (``any``, ``broadcast_text``, ``barrier``, ``abort``). cupy is imported only when it is created.

:func:`communicator` chooses one: ``"auto"`` is :class:`SingleProcess` unless the process was started
by an MPI launcher with more than one process (:func:`launched_size`), then :class:`Mpi` for the NumPy
backend and :class:`Nccl` for CuPy.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

__all__ = ["Communicator", "SingleProcess", "Mpi", "Nccl", "communicator", "launched_size", "KINDS",
           "LAUNCHER_SIZE_VARS"]

KINDS = ("auto", "single", "mpi", "nccl")
# Variables MPI launchers set in each process they start: MPICH's and Intel MPI's hydra and Slurm's PMI
# (PMI_SIZE), Open MPI (OMPI_COMM_WORLD_SIZE), MVAPICH (MV2_COMM_WORLD_SIZE). Read to tell "started by
# mpiexec -n N" from a plain start, before (and without) importing mpi4py.
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
MPI_EXTRA_HINT = 'pip install "ref-bert[mpi]" (mpi4py and MPICH, whose mpiexec then launches the job)'


def launched_size(environ=None) -> int:
    """The process count an MPI launcher announced in the environment; 1 when none did."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARS:
        value = environ.get(name)
        if value is not None and value.strip().isdigit() and int(value) >= 1:
            return int(value)
    return 1


class Communicator:
    """The interface (module docstring). Subclasses implement the array operations."""

    name = "communicator"
    rank = 0
    size = 1

    def allgather(self, x):
        raise NotImplementedError

    def alltoall(self, x):
        raise NotImplementedError

    def gather(self, x, root: int = 0):
        raise NotImplementedError

    def broadcast(self, x, root: int = 0):
        raise NotImplementedError

    def any(self, flag: bool) -> bool:
        raise NotImplementedError

    def broadcast_text(self, text: Optional[str], root: int = 0) -> str:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, code: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """One process: rank 0 of 1, every collective the identity."""

    name = "single"

    def allgather(self, x):
        return x.reshape(1, -1)

    def alltoall(self, x):
        _check_rows(x, 1)
        return x

    def gather(self, x, root: int = 0):
        return x.reshape(1, -1)

    def broadcast(self, x, root: int = 0):
        return x

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast_text(self, text: Optional[str], root: int = 0) -> str:
        return "" if text is None else text

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        raise SystemExit(code)


def _check_rows(x, size: int) -> None:
    if x.ndim != 2 or x.shape[0] != size:
        raise ValueError(f"alltoall takes a (size, n) = ({size}, n) array, got shape {tuple(x.shape)}")


def _import_mpi():
    """mpi4py's MPI module (importing it initialises MPI), or a ValueError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"data-parallel training needs mpi4py, which is not importable ({e}); "
                         f"install it: {MPI_EXTRA_HINT}") from e
    return MPI


class _MpiHostOps:
    """The host-side operations :class:`Mpi` and :class:`Nccl` share (any, text, barrier, abort)."""

    def _init_mpi(self):
        self.MPI = _import_mpi()
        self.world = self.MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()

    def any(self, flag: bool) -> bool:
        send = np.array([1 if flag else 0], dtype=np.int64)
        received = np.empty(self.size, dtype=np.int64)
        self.world.Allgather(send, received)
        return bool(received.any())

    def broadcast_text(self, text: Optional[str], root: int = 0) -> str:
        data = np.frombuffer((text or "").encode("utf-8"), dtype=np.uint8) if self.rank == root else None
        length = np.array([0 if data is None else data.size], dtype=np.int64)
        self.world.Bcast(length, root=root)
        buffer = data.copy() if data is not None else np.empty(int(length[0]), dtype=np.uint8)
        self.world.Bcast(buffer, root=root)
        return buffer.tobytes().decode("utf-8")

    def barrier(self) -> None:
        self.world.Barrier()

    def abort(self, code: int) -> None:
        """MPI_Abort: the launcher ends every rank; mpiexec exits with ``code``."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.world.Abort(int(code))


class Mpi(_MpiHostOps, Communicator):
    """MPI_COMM_WORLD through mpi4py, on NumPy arrays (buffer methods: Allgather, Alltoall, Gather,
    Bcast; no pickling)."""

    name = "mpi"

    def __init__(self):
        self._init_mpi()

    @staticmethod
    def _host(x, what: str):
        if not isinstance(x, np.ndarray):
            raise ValueError(f"the mpi communicator moves NumPy arrays, got a {type(x).__module__}."
                             f"{type(x).__name__} for {what}; on GPUs use the nccl communicator")
        return np.ascontiguousarray(x)

    def allgather(self, x):
        x = self._host(x, "allgather").reshape(-1)
        out = np.empty((self.size, x.size), dtype=x.dtype)
        self.world.Allgather(x, out)
        return out

    def alltoall(self, x):
        x = self._host(x, "alltoall")
        _check_rows(x, self.size)
        out = np.empty_like(x)
        self.world.Alltoall(x, out)
        return out

    def gather(self, x, root: int = 0):
        x = self._host(x, "gather").reshape(-1)
        out = np.empty((self.size, x.size), dtype=x.dtype) if self.rank == root else None
        self.world.Gather(x, out, root=root)
        return out

    def broadcast(self, x, root: int = 0):
        if not isinstance(x, np.ndarray) or not x.flags.c_contiguous:
            raise ValueError("broadcast overwrites its array in place: expected a C-contiguous NumPy array")
        self.world.Bcast(x, root=root)
        return x


class Nccl(_MpiHostOps, Communicator):
    """NCCL through CuPy (``cupy.cuda.nccl``), on CuPy arrays; one GPU per rank.

    Start-up: MPI gives rank and size; each rank selects GPU ``local rank % device count`` (the
    launcher's local rank: MPI_LOCALRANKID, OMPI_COMM_WORLD_LOCAL_RANK, else the global rank) before
    any array is made; rank 0 draws NCCL's unique id and MPI broadcasts it; every rank then joins the
    NCCL communicator. Every collective runs on the current stream; ``alltoall`` and ``gather`` are
    NCCL point-to-point sends and receives inside one group (NCCL has no all-to-all or gather
    collective of its own).
    """

    name = "nccl"

    def __init__(self):
        self._init_mpi()
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        local = next((int(os.environ[v]) for v in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
                      if os.environ.get(v, "").isdigit()), self.rank)
        devices = cupy.cuda.runtime.getDeviceCount()
        if devices < 1:
            raise ValueError("the nccl communicator needs a GPU per rank; none is visible")
        cupy.cuda.Device(local % devices).use()
        # The unique id is a tuple of 128 C chars (ints in -128..127).
        unique_id = np.array(nccl.get_unique_id() if self.rank == 0 else (0,) * 128, dtype=np.int8)
        self.world.Bcast(unique_id, root=0)
        self.comm = nccl.NcclCommunicator(self.size, tuple(int(b) for b in unique_id), self.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.int64): nccl.NCCL_INT64, np.dtype(np.uint8): nccl.NCCL_UINT8}

    def _device(self, x, what: str):
        if not isinstance(x, self.cupy.ndarray):
            raise ValueError(f"the nccl communicator moves CuPy arrays, got a {type(x).__name__} for {what}")
        if np.dtype(x.dtype) not in self._types:
            raise ValueError(f"the nccl communicator moves {sorted(str(t) for t in self._types)}, got {x.dtype}")
        return self.cupy.ascontiguousarray(x)

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def allgather(self, x):
        x = self._device(x, "allgather").reshape(-1)
        out = self.cupy.empty((self.size, x.size), dtype=x.dtype)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, self._types[np.dtype(x.dtype)], self._stream())
        return out

    def alltoall(self, x):
        x = self._device(x, "alltoall")
        _check_rows(x, self.size)
        out = self.cupy.empty_like(x)
        kind, n, stream = self._types[np.dtype(x.dtype)], x.shape[1], self._stream()
        self.nccl.groupStart()
        for peer in range(self.size):
            self.comm.send(x[peer].data.ptr, n, kind, peer, stream)
            self.comm.recv(out[peer].data.ptr, n, kind, peer, stream)
        self.nccl.groupEnd()
        return out

    def gather(self, x, root: int = 0):
        x = self._device(x, "gather").reshape(-1)
        kind, stream = self._types[np.dtype(x.dtype)], self._stream()
        out = self.cupy.empty((self.size, x.size), dtype=x.dtype) if self.rank == root else None
        self.nccl.groupStart()
        if self.rank == root:
            for peer in range(self.size):
                self.comm.recv(out[peer].data.ptr, x.size, kind, peer, stream)
        self.comm.send(x.data.ptr, x.size, kind, root, stream)
        self.nccl.groupEnd()
        return out

    def broadcast(self, x, root: int = 0):
        if not isinstance(x, self.cupy.ndarray) or not x.flags.c_contiguous:
            raise ValueError("broadcast overwrites its array in place: expected a C-contiguous CuPy array")
        self.comm.bcast(x.data.ptr, x.size, self._types[np.dtype(x.dtype)], root, self._stream())
        return x

    def barrier(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        self.world.Barrier()


def communicator(kind: str = "auto", backend=None) -> Communicator:
    """The communicator ``kind`` (one of :data:`KINDS`) for a model on ``backend`` (a
    :class:`backends.Backend`, a name, or None for $REF_BERT_BACKEND).

    ``"auto"``: :class:`SingleProcess` when no MPI launcher started this process with more than one
    process, else :class:`Mpi` (NumPy backend) or :class:`Nccl` (CuPy backend). Started by ``mpiexec
    -n N`` (N > 1) without mpi4py installed is a ValueError (each process would otherwise train the
    whole job on its own and write the same directory). ``"mpi"`` on the CuPy backend is refused:
    mpi4py here moves host arrays.
    """
    if kind not in KINDS:
        raise ValueError(f"comm={kind!r} is invalid: expected one of {KINDS}")
    if kind == "single" or (kind == "auto" and launched_size() == 1):
        return SingleProcess()
    # The backend's name without making it: the NCCL communicator chooses this rank's GPU before
    # anything touches a device.
    from . import ENV_VAR

    backend_name = getattr(backend, "name", None) or str(backend or os.environ.get(ENV_VAR, "numpy")).strip().lower()
    if kind == "auto":
        launched = launched_size()
        try:
            _import_mpi()
        except ValueError as e:
            raise ValueError(f"this process was started by an MPI launcher with {launched} processes, but "
                             f"{e}") from e
        kind = "nccl" if backend_name == "cupy" else "mpi"
    if kind == "mpi":
        if backend_name == "cupy":
            raise ValueError("comm='mpi' moves host (NumPy) arrays; with the cupy backend use comm='nccl'")
        return Mpi()
    if backend_name != "cupy":
        raise ValueError(f"comm='nccl' needs the cupy backend (NCCL moves GPU arrays), got backend "
                         f"{backend_name!r}; on CPUs use comm='mpi'")
    return Nccl()
