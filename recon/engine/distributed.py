"""Data-parallel context: single process by default, ``torch.distributed`` when launched as ranks.

The engine asks this module which rank it is, which training slices are its own, and to
average gradients. Gradients are all-reduced explicitly after each step's backward pass instead of
through a ``DistributedDataParallel`` wrapper, because in the 4-expert mixture only the routed
expert runs: DDP would need ``find_unused_parameters=True`` (an autograd-graph walk every step)
and would still hand AdamW zero gradients for experts nobody used, so their moments and weight
decay would move where one process leaves them alone. Here, parameters that no rank used in a
step keep ``grad=None`` (AdamW skips them, exactly as in one process), and parameters that some
rank used are averaged over all ranks (zeros where a rank did not use them). With ``world_size``
ranks at batch size b this reproduces one process at batch size ``world_size * b`` on the same
global order.

Two launchers are supported:

* ``torchrun`` (``python -m torch.distributed.run``): the default ``env://`` initialisation with the
  elastic agent's store. That store listens on every network interface (a torch behaviour).
* :func:`launch_local` (used by ``smartify train --nproc N``): N processes on this machine whose
  rendezvous store and gloo/NCCL bootstrap sockets listen on 127.0.0.1 only; the launcher binds
  the store's socket itself and hands it to rank 0, so no port can be taken in between.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Sequence

import torch
from torch import nn

from recon.errors import InputError

log = logging.getLogger(__name__)

#: Set by :func:`launch_local` in every rank (the explicit-store initialisation).
LAUNCHER_ENV = "SMARTIFY_LAUNCHER"
#: File descriptor of the bound, listening store socket; rank 0 of :func:`launch_local` only.
STORE_FD_ENV = "SMARTIFY_STORE_FD"
#: How long ranks wait for each other at initialisation and in collectives.
TIMEOUT = timedelta(minutes=30)


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when launched as one of several ranks."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs and writes checkpoints."""
        return self.rank == 0

    def shard(self, order: list[int]) -> list[int]:
        """This rank's share of the epoch's global order; every rank gets the same count.

        The order is padded by repeating its head to a multiple of ``world_size`` (so no rank
        waits in a collective for a step another rank never takes); rank r takes positions
        ``r, r + world_size, ...``, so step t of all ranks together covers the same slices as
        step t of a single process at ``world_size`` times the batch size.

        Args:
            order: the epoch's global order of dataset indices (the same list on every rank).

        Returns:
            This rank's indices, ``ceil(len(order) / world_size)`` of them.
        """
        if not self.enabled or not order:
            return order
        pad = (-len(order)) % self.world_size
        padded = order + order[:pad]
        return padded[self.rank::self.world_size]

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (what DDP does at construction).

        Every rank builds the same seeded initialisation or loads the same checkpoint, so this is
        a safety net against a rank that started from different weights.

        Args:
            model: the model, already on this rank's device.
        """
        if not self.enabled:
            return
        import torch.distributed as tdist

        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                groups.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for dtype, tensors in groups.items():
                wire = torch.uint8 if dtype == torch.bool else dtype  # bool travels as bytes
                flat = torch.cat([t.detach().reshape(-1).to(wire) for t in tensors])
                tdist.broadcast(flat, src=0)
                offset = 0
                for t in tensors:
                    n = t.numel()
                    t.copy_(flat[offset:offset + n].view_as(t).to(dtype))
                    offset += n

    def sync_gradients(self, model: nn.Module) -> None:
        """Average gradients over ranks, leaving parameters no rank used at ``grad=None``.

        Args:
            model: the model after this rank's backward pass(es) of the step.
        """
        if not self.enabled:
            return
        import torch.distributed as tdist

        params = [p for p in model.parameters() if p.requires_grad]
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        tdist.all_reduce(used)
        active = [p for p, u in zip(params, used.tolist()) if u > 0]
        if not active:
            return
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in active
        ])
        tdist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in active:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over ranks (identity in one process), in float64.

        Args:
            values: this rank's values (the same length on every rank).

        Returns:
            The element-wise sums.
        """
        if not self.enabled:
            return list(values)
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()


_CONTEXT: DistContext | None = None


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """Join the process group: explicit loopback store under :func:`launch_local`, else ``env://``."""
    import torch.distributed as tdist

    if os.environ.get(LAUNCHER_ENV) != "1":
        tdist.init_process_group(backend=backend, timeout=TIMEOUT)
        return
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    fd = os.environ.pop(STORE_FD_ENV, None)  # children of this rank must not inherit it
    if rank == 0:
        if fd is None:
            raise RuntimeError(f"rank 0 of a smartify launch without ${STORE_FD_ENV}")
        store = tdist.TCPStore(addr, port, world, True, TIMEOUT, master_listen_fd=int(fd))
    else:
        store = tdist.TCPStore(addr, port, world, False, TIMEOUT)
    tdist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)


def _destroy() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def context() -> DistContext:
    """The process's context: initialises the process group once when ``WORLD_SIZE > 1``.

    ``gloo`` on CPU, ``nccl`` when CUDA is available; each rank uses ``cuda:LOCAL_RANK``. The group
    is destroyed at interpreter exit.

    Returns:
        The (cached) context of this process.

    Raises:
        InputError: more ranks on this machine than CUDA devices.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    import torch.distributed as tdist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK={local}: rank {rank} needs cuda:{local} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); start at most that many ranks per machine")
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        _init_process_group(backend, rank, world)
        atexit.register(_destroy)
        log.info("rank %d of %d joined the %s process group", rank, world, backend)
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local, device=device)
    return _CONTEXT


# ------------------------------------------------------------------------------------- launcher


def _loopback_interface() -> str | None:
    """Name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), if found."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo0")), None)


def rank_environment(base: Mapping[str, str], nproc: int, addr: str, port: int) -> dict[str, str]:
    """Environment shared by the ranks of :func:`launch_local` (rank variables added per process).

    Sets the ``torchrun`` variables, keeps gloo's and NCCL's bootstrap sockets on the loopback
    interface unless the user chose one, and gives each rank ``cpu_count // nproc`` intra-op
    threads unless ``OMP_NUM_THREADS`` is set.

    Args:
        base: the launcher's environment.
        nproc: number of ranks.
        addr: the store's address (127.0.0.1).
        port: the store's port.

    Returns:
        The environment without ``RANK``/``LOCAL_RANK``.
    """
    env = dict(base)
    env.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", LAUNCHER_ENV: "1"})
    lo = _loopback_interface()
    if lo is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", lo)
        env.setdefault("NCCL_SOCKET_IFNAME", lo)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.pop(STORE_FD_ENV, None)
    return env


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the ranks still running, then SIGKILL whatever is left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(
    command: Sequence[str],
    nproc: int,
    env: Mapping[str, str] | None = None,
    addr: str = "127.0.0.1",
    grace_s: float = 10.0,
    poll_s: float = 0.2,
) -> int:
    """Run ``command`` as ``nproc`` data-parallel ranks on this machine and wait for them.

    The launcher binds the rendezvous store's socket on ``addr`` (loopback) and passes it to rank
    0, which serves the store on it (no port race, nothing listens beyond ``addr``). When a rank
    fails, the others are stopped (SIGTERM, SIGKILL after ``grace_s``) instead of waiting in a
    collective until the timeout. Ctrl-C reaches the ranks directly (same process group); on Ctrl-C,
    or a ``KeyboardInterrupt`` subclass the caller raises for SIGTERM (``tracking.cli.Terminated``), the
    launcher stops any rank left and re-raises, so the caller's exit code says which signal it was.

    Args:
        command: the program of every rank, e.g. ``[python, -m, tracking.cli, train, ...]``.
        nproc: number of ranks (>= 1).
        env: base environment (default: this process's).
        addr: loopback address for the store and the rank sockets.
        grace_s: seconds between SIGTERM and SIGKILL when stopping ranks.
        poll_s: seconds between checks of the ranks.

    Returns:
        0 when every rank succeeded, else the exit code of the first rank that failed (a negative code is
        the signal that killed it).

    Raises:
        ValueError: ``nproc < 1`` or an empty command.
        KeyboardInterrupt: interrupted while waiting, after every rank was stopped.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not command:
        raise ValueError("launch_local needs a command")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    procs: list[subprocess.Popen] = []
    try:
        listener.bind((addr, 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        shared = rank_environment(os.environ if env is None else env, nproc, addr, port)
        for rank in range(nproc):
            rank_env = {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            fds: tuple[int, ...] = ()
            if rank == 0:
                rank_env[STORE_FD_ENV] = str(listener.fileno())
                fds = (listener.fileno(),)
            procs.append(subprocess.Popen(list(command), env=rank_env, pass_fds=fds))
        log.info("launched %d ranks (pids %s), store on %s:%d", nproc, [p.pid for p in procs], addr, port)
    except BaseException:
        _stop(procs, grace_s)
        raise
    finally:
        listener.close()  # rank 0 holds its own copy
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                log.error("rank %d exited with %d; stopping the other ranks", rank, code)
                _stop(procs, grace_s)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        raise
