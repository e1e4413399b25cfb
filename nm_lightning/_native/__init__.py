"""Native CPU kernel for N:M masks, compiled on first use and loaded with ctypes.

Why: PyTorch has no fused "top-n of every small group" op; the sort/topk route costs 10-60x a copy of
the weight, which would dominate an SR-STE training step on CPU. The kernel is plain C (no Python or
torch headers), so it compiles in well under a second with the system C compiler and is cached per
source hash under ``$NM_LIGHTNING_CACHE`` (default ``~/.cache/nm_lightning``). Without a compiler, or
with ``NM_LIGHTNING_NATIVE=0``, :func:`nm_lightning.nm_mask` falls back to its PyTorch path, which gives
the same masks bit for bit (tested).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = ["available", "supports", "nm_mask", "supports_decay", "add_decay_"]

_SOURCE = Path(__file__).with_name("nm_kernel.c")
# dtype -> (ctypes function name, unsigned view dtype, ctypes scalar, |x| bit mask, exponent bit mask)
_DTYPES: dict[torch.dtype, tuple[str, type, int, int]] = {
    torch.float16: ("nm_mask_u16", ctypes.c_uint16, 0x7FFF, 0x7C00),
    torch.bfloat16: ("nm_mask_u16", ctypes.c_uint16, 0x7FFF, 0x7F80),
    torch.float32: ("nm_mask_u32", ctypes.c_uint32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: ("nm_mask_u64", ctypes.c_uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
_DECAY: dict[torch.dtype, tuple[str, type]] = {
    torch.float32: ("nm_decay_f32", ctypes.c_float),
    torch.float64: ("nm_decay_f64", ctypes.c_double),
}
_MAX_M = 256  # NM_MAX_M in the C source
_MIN_LANES_PER_THREAD = 4096

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    root = os.environ.get("NM_LIGHTNING_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nm_lightning"


_FLAG_SETS = (["-O3", "-march=native", "-fPIC", "-shared"], ["-O3", "-fPIC", "-shared"])


def _build(cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent ranks never load a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile() -> ctypes.CDLL | None:
    if os.environ.get("NM_LIGHTNING_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        warnings.warn("nm_lightning: no C compiler found; using the slower PyTorch path for N:M masks", stacklevel=3)
        return None
    errors = []
    for flags in _FLAG_SETS:  # -march=native first; some compilers/CPUs only take the portable set
        # a -march=native library is tuned to this CPU, so the CPU is part of the cache key
        fingerprint = "|".join([platform.machine(), sys.platform, cc, " ".join(flags), _cpu_model()])
        tag = hashlib.sha256(_SOURCE.read_bytes() + fingerprint.encode()).hexdigest()[:16]
        target = _cache_dir() / f"nm_kernel-{tag}{'.dll' if sys.platform == 'win32' else '.so'}"
        try:
            if not target.exists():
                _build(cc, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            errors.append(f"{err} {detail.decode(errors='replace')[:200]}")
    else:
        warnings.warn(
            f"nm_lightning: could not build the native N:M kernel ({'; '.join(errors)}); using the slower PyTorch path",
            stacklevel=3,
        )
        return None
    for name, ctype, _, _ in _DTYPES.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctype, ctype]
    for name, ctype in _DECAY.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctype]
    return lib


def _get_lib() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _compile()
                _tried = True
    return _lib


def available() -> bool:
    """Whether the native kernel is built and loaded (builds it on the first call)."""
    return _get_lib() is not None


def supports(weight: torch.Tensor, m: int) -> bool:
    """Whether :func:`nm_mask` can take ``weight`` (a CPU tensor of a supported dtype, ``m <= 256``)."""
    return weight.device.type == "cpu" and weight.dtype in _DTYPES and m <= _MAX_M and available()


def _run(fn: Any, total: int, min_per_thread: int, args_for: Any) -> list[Any]:
    """Run ``fn(*args_for(begin, end))`` over ``[0, total)`` split across up to torch's thread count.

    ctypes releases the GIL during the call, so the chunks run in parallel.
    """
    global _pool
    threads = max(1, min(torch.get_num_threads(), total // min_per_thread))
    if threads == 1:
        return [fn(*args_for(0, total))]
    if _pool is None or _pool._max_workers < threads:  # noqa: SLF001 - resize on demand
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nm_lightning")
    bounds = [total * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(fn, *args_for(bounds[i], bounds[i + 1])) for i in range(threads)]
    return [f.result() for f in futures]


def nm_mask(
    weight: torch.Tensor,
    n: int,
    m: int,
    outer: int,
    length: int,
    inner: int,
    check_finite: bool = True,
    with_masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Native mask of a CPU weight viewed as ``[outer, length, inner]`` with groups of ``m`` along ``length``.

    Returns ``(mask, masked weight or None)``; with ``with_masked`` the masked weight is written in the
    same pass. With ``check_finite`` raises ``ValueError`` on NaN/Inf, found in that pass too.
    """
    lib = _get_lib()
    assert lib is not None
    name, ctype, absmask, expmask = _DTYPES[weight.dtype]
    fn = getattr(lib, name)
    w = weight.detach().contiguous()
    out = torch.empty(w.shape, dtype=torch.bool)
    masked = torch.empty_like(w) if with_masked else None
    ptrs = (w.data_ptr(), out.data_ptr(), masked.data_ptr() if masked is not None else None)
    lanes = outer * (length // m) * inner
    bad = sum(
        _run(fn, lanes, _MIN_LANES_PER_THREAD, lambda b, e: (*ptrs, b, e, inner, n, m, ctype(absmask), ctype(expmask)))
    )
    if bad and check_finite:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} contains {bad} NaN/Inf value(s); N:M masks need finite weights"
        )
    return out, masked


def supports_decay(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether :func:`add_decay_` can run natively (contiguous fp32/fp64 CPU tensors of one shape)."""
    return (
        grad.device.type == "cpu"
        and grad.dtype in _DECAY
        and weight.dtype == grad.dtype
        and mask.dtype == torch.bool
        and grad.shape == weight.shape == mask.shape
        and grad.is_contiguous()
        and weight.is_contiguous()
        and mask.is_contiguous()
        and available()
    )


def add_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> None:
    """``grad += decay * weight`` where ``mask`` is False, in place, in one pass."""
    lib = _get_lib()
    assert lib is not None
    name, ctype = _DECAY[grad.dtype]
    fn = getattr(lib, name)
    ptrs = (grad.data_ptr(), weight.data_ptr(), mask.data_ptr())
    _run(fn, grad.numel(), 1 << 18, lambda b, e: (*ptrs, b, e, ctype(decay)))
