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

import torch

__all__ = ["available", "supports", "nm_mask"]

_SOURCE = Path(__file__).with_name("nm_kernel.c")
# dtype -> (ctypes function name, unsigned view dtype, ctypes scalar, |x| bit mask, exponent bit mask)
_DTYPES: dict[torch.dtype, tuple[str, type, int, int]] = {
    torch.float16: ("nm_mask_u16", ctypes.c_uint16, 0x7FFF, 0x7C00),
    torch.bfloat16: ("nm_mask_u16", ctypes.c_uint16, 0x7FFF, 0x7F80),
    torch.float32: ("nm_mask_u32", ctypes.c_uint32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: ("nm_mask_u64", ctypes.c_uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
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
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctype, ctype]
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


def nm_mask(
    weight: torch.Tensor, n: int, m: int, outer: int, length: int, inner: int, check_finite: bool = True
) -> torch.Tensor:
    """Native mask of a CPU weight viewed as ``[outer, length, inner]`` with groups of ``m`` along ``length``.

    With ``check_finite`` raises ``ValueError`` on NaN/Inf, found in the same pass over the weight.
    """
    lib = _get_lib()
    assert lib is not None
    name, ctype, absmask, expmask = _DTYPES[weight.dtype]
    fn = getattr(lib, name)
    w = weight.detach().contiguous()
    out = torch.empty(w.shape, dtype=torch.bool)
    lanes = outer * (length // m) * inner
    args = (w.data_ptr(), out.data_ptr())
    threads = max(1, min(torch.get_num_threads(), lanes // _MIN_LANES_PER_THREAD))
    if threads == 1:
        bad = fn(*args, 0, lanes, inner, n, m, ctype(absmask), ctype(expmask))
    else:
        global _pool
        if _pool is None or _pool._max_workers < threads:  # noqa: SLF001 - resize on demand
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nm_mask")
        bounds = [lanes * i // threads for i in range(threads + 1)]
        # ctypes releases the GIL during the call, so the chunks run in parallel
        futures = [
            _pool.submit(fn, *args, bounds[i], bounds[i + 1], inner, n, m, ctype(absmask), ctype(expmask))
            for i in range(threads)
        ]
        bad = sum(f.result() for f in futures)
    if bad and check_finite:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} contains {bad} NaN/Inf value(s); N:M masks need finite weights"
        )
    return out
