"""Seeds and random-number streams: derived, local and restorable.

Library code never draws from global RNGs. Randomness per training sample comes from
:func:`sample_rng`, a generator derived from ``(base seed, stream, epoch, sample index)``, so a
sample's mask and augmentation do not depend on the number of DataLoader workers, on the order in
which samples are drawn or on the rank (fixes the coupled streams of docs/pipeline.md 6.10). Seeds are
derived with a cryptographic hash (:func:`derive_seed`), stable across processes and Python
versions, unlike ``hash()``.

Global state is touched in two places only, both for the entry point / engine:

- :func:`seed_everything` seeds torch, CUDA, NumPy and ``random`` once at start-up and sets the
  determinism flags; :func:`determinism_flags` reports them for logging.
- :func:`capture_rng_state` / :func:`restore_rng_state` save and restore every global generator
  with a checkpoint, as plain tensors, ints, floats, strings, lists and dicts, so the result
  loads with ``torch.load(weights_only=True)``.

:func:`worker_init_fn` and :class:`WorkerSeeder` seed the global generators inside each DataLoader
worker (per worker, epoch and rank) for third-party code that still uses them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "SEED_BITS",
    "derive_seed",
    "sample_rng",
    "torch_generator",
    "worker_init_fn",
    "WorkerSeeder",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
    "determinism_flags",
]

log = logging.getLogger(__name__)

SEED_BITS = 63  # fits numpy, torch.manual_seed and a signed int64 tensor
_RNG_STATE_VERSION = 1
# cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2); must be set before cuBLAS starts.
_CUBLAS_WORKSPACE = ":4096:8"


def _encode_key(key: int | str) -> bytes:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"seed keys must be int or str, got {type(key).__name__} {key!r}")
    if isinstance(key, int):
        return b"i" + str(key).encode("ascii")
    return b"s" + key.encode("utf-8")


def derive_seed(base: int, *keys: int | str) -> int:
    """Derive a seed from a base seed and any number of keys, stably across processes.

    ``derive_seed(430, "mask", 3, 17)`` is the same on every machine and run; different keys (or
    key types: ``1`` vs ``"1"``) give unrelated seeds.

    Args:
        base: the experiment seed.
        *keys: ints or strings naming the stream (e.g. ``"mask"``, epoch, sample index).

    Returns:
        A non-negative int below ``2**63``.

    Raises:
        TypeError: a key (or ``base``) is not an int/str (bools are refused).
    """
    if isinstance(base, bool) or not isinstance(base, int):
        raise TypeError(f"base seed must be an int, got {type(base).__name__} {base!r}")
    h = hashlib.blake2b(digest_size=8, person=b"smartify-seed")
    for part in (base, *keys):
        enc = _encode_key(part)
        # Length prefix so that ("ab", "c") and ("a", "bc") differ.
        h.update(len(enc).to_bytes(4, "little"))
        h.update(enc)
    return int.from_bytes(h.digest(), "little") >> (64 - SEED_BITS)


def sample_rng(base_seed: int, epoch: int, index: int, stream: str) -> np.random.Generator:
    """A fresh NumPy generator for one sample in one epoch and one named stream.

    The same arguments always give the same sequence, whatever else was drawn before, in whatever
    process; global RNG state is neither used nor changed.

    Args:
        base_seed: the experiment seed.
        epoch: the epoch (so a sample gets new randomness every epoch).
        index: the sample's index in its dataset.
        stream: what the randomness is for (``"mask"``, ``"mraugment"``...), so that streams are
            independent of each other.

    Returns:
        A ``numpy.random.Generator`` (PCG64).
    """
    return np.random.default_rng(derive_seed(base_seed, stream, epoch, index))


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` (for torch ops that take ``generator=``), leaving globals alone.

    Args:
        seed: e.g. from :func:`derive_seed`.
        device: the generator's device.

    Returns:
        The generator.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _seed_worker_globals(base: int, rank: int, worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    torch_seed = int(info.seed) if info is not None else 0
    seed = derive_seed(base, "worker", rank, worker_id, torch_seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0"))


def worker_init_fn(worker_id: int) -> None:
    """Plain ``worker_init_fn``: seeds the worker's global RNGs per worker, epoch and rank.

    The seed mixes torch's ``worker_info.seed`` (drawn from the DataLoader's ``generator``, so pass
    a seeded one for reproducibility) with the worker id and the rank (from an initialised
    ``torch.distributed`` group, else the ``RANK`` environment variable, else 0). Use
    :class:`WorkerSeeder` to give the experiment seed and rank explicitly.

    Args:
        worker_id: the id torch passes to ``worker_init_fn``.
    """
    _seed_worker_globals(0, _current_rank(), worker_id)


@dataclass(frozen=True)
class WorkerSeeder:
    """``worker_init_fn`` for a DataLoader: seeds the worker's global RNGs per worker and per rank.

    Torch gives each worker ``worker_info.seed`` = (a base drawn from the loader's generator) +
    worker id, which differs per worker and per epoch but is the same on every rank when the
    ranks share a seed; the rank is mixed in here, together with the experiment seed. The
    pipeline's own randomness comes from :func:`sample_rng` and does not depend on this; it only
    protects code that still uses global RNGs. A picklable class, so it works with ``spawn``.

    Attributes:
        base_seed: the experiment seed.
        rank: the distributed rank of the process that owns the loader.
    """

    base_seed: int
    rank: int = 0

    def __call__(self, worker_id: int) -> None:
        """Seed torch, NumPy and ``random`` in the current worker process.

        Args:
            worker_id: the id torch passes to ``worker_init_fn``.
        """
        _seed_worker_globals(self.base_seed, self.rank, worker_id)


# --------------------------------------------------------------------------------------------
# Global RNG state for checkpoints
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every global generator (torch CPU, CUDA when available, NumPy, ``random``).

    Returns:
        ``{"version", "torch", "cuda", "numpy", "python"}`` made of tensors, ints, floats, strings,
        None, lists and dicts only, so it survives ``torch.save`` + ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state(legacy=False)
    if np_state["bit_generator"] != "MT19937":  # np.random.seed always uses MT19937
        raise RuntimeError(f"unexpected NumPy global bit generator {np_state['bit_generator']}")
    py_version, py_internal, py_gauss = random.getstate()
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "version": _RNG_STATE_VERSION,
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {
            "bit_generator": "MT19937",
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`capture_rng_state`.

    CUDA states are restored when CUDA is available with the same number of devices; otherwise
    they are skipped with a warning (a checkpoint moved to another machine). An empty dict (a
    checkpoint saved without RNG state) restores nothing.

    Args:
        state: the dict from :func:`capture_rng_state` (possibly through save/load), or ``{}``.

    Raises:
        ValueError: the dict is not a state of this format.
    """
    if isinstance(state, dict) and not state:
        log.info("no RNG state to restore")
        return
    try:
        version = state["version"]
        torch_state, cuda, np_state, py_state = state["torch"], state["cuda"], state["numpy"], state["python"]
    except (KeyError, TypeError):
        raise ValueError("not an RNG state from capture_rng_state (missing keys)") from None
    if version != _RNG_STATE_VERSION:
        raise ValueError(f"unsupported RNG state version {version!r} (expected {_RNG_STATE_VERSION})")
    torch.set_rng_state(torch_state.to(dtype=torch.uint8, device="cpu"))
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.to(dtype=torch.uint8, device="cpu") for s in cuda])
        else:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            log.warning("CUDA RNG state for %d device(s) not restored: %d available", len(cuda), have)
    key = np_state["key"]
    key_np = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": key_np.astype(np.uint32), "pos": int(np_state["pos"])},
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    )
    internal = py_state["internal"]
    internal_list = internal.tolist() if isinstance(internal, torch.Tensor) else list(internal)
    random.setstate((int(py_state["version"]), tuple(int(v) for v in internal_list), py_state["gauss_next"]))


# --------------------------------------------------------------------------------------------
# Entry-point seeding and determinism
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool, *, benchmark: bool = False) -> dict[str, Any]:
    """Seed all global generators and set the determinism flags. For the entry point only.

    This changes process-wide state: ``random``, NumPy's global generator, torch (CPU and all
    CUDA devices), cuDNN flags, ``torch.use_deterministic_algorithms`` and, when deterministic,
    the ``CUBLAS_WORKSPACE_CONFIG`` environment variable (if not already set). The CLI / engine
    entry calls it once; library code never does.

    With ``deterministic=True``, ops without a deterministic implementation *warn* rather than
    fail (``warn_only=True``): PromptMR+'s bilinear upsampling backward on CUDA is one, and the
    team measured a ~1e-4 loss drift from it (docs/pipeline.md 4.5), which the repeat-run check documents.

    Args:
        seed: the experiment seed.
        deterministic: request deterministic algorithms and cuDNN.
        benchmark: cuDNN autotuning (off by default: it picks kernels by timing).

    Returns:
        :func:`determinism_flags` after the change, plus ``"seed"``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = benchmark
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    flags = determinism_flags()
    flags["seed"] = seed
    log.info("seeded everything with %d; determinism flags %s", seed, flags)
    return flags


def determinism_flags() -> dict[str, Any]:
    """The settings that decide run-to-run reproducibility, as flat loggable values.

    Returns:
        ``cudnn_deterministic``, ``cudnn_benchmark``, ``deterministic_algorithms``,
        ``deterministic_warn_only``, ``cublas_workspace_config`` ("" when unset),
        ``tf32_matmul``, ``tf32_cudnn``, ``float32_matmul_precision``, ``torch_version``,
        ``cuda_version`` ("" without CUDA build), ``cudnn_version`` (0 when unavailable).
    """
    cudnn_version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "cudnn_version": int(cudnn_version or 0),
    }
