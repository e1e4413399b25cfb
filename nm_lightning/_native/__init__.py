"""Native CPU kernel for N:M masks, compiled on first use and loaded with ctypes.

Why: PyTorch has no fused "top-n of every small group" op; the sort/topk route costs 10-60x a copy of
the weight, which would dominate an SR-STE training step on CPU. The kernel is plain C (no Python or
torch headers), so it compiles in well under a second with the system C compiler. Without a compiler,
or with ``NM_LIGHTNING_NATIVE=0``, :func:`nm_lightning.nm_mask` falls back to its PyTorch path, which
gives the same masks bit for bit (tested).

Environment:

* ``NM_LIGHTNING_NATIVE=0``: never build or load the kernel.
* ``CC``: the compiler command, split like a shell would (``CC="ccache gcc -m64"`` works); default
  ``cc``, ``gcc`` or ``clang`` from ``PATH``.
* ``NM_LIGHTNING_CC_TIMEOUT``: seconds the compiler may run (default 60). A compiler that exceeds it
  is killed with its whole process group and the PyTorch path is used, with a warning.
* ``NM_LIGHTNING_CACHE``: the cache directory (default ``$XDG_CACHE_HOME/nm_lightning`` or
  ``~/.cache/nm_lightning``).

How a cached library is trusted (a library is code: loading a planted one runs it). The cache file
name is computed from public inputs, so anyone who can write into the cache directory could plant one.
Therefore:

1. The cache directory (missing components created with mode 0700, whatever the umask) is opened once
   and checked through that open descriptor (``fstat``): it must be owned by the current user and not
   writable by group or others. All later file operations are relative to that descriptor
   (``dir_fd``), so renaming or replacing a directory on the path after the check changes nothing.
   A directory that fails the check is not used at all: the kernel is built in a private temporary
   directory for this process only (and a warning says why).
2. A cached library is opened with ``O_NOFOLLOW`` and checked on its descriptor: a regular file owned
   by the current user, not group/world-writable. Its bytes are read through that descriptor and
   their sha256 must equal the one recorded (``<name>.sha256``, checked the same way) when this
   project built it. Anything else is rebuilt and replaced, with a warning.
3. The bytes that were hashed (or that the compiler just produced, in a private ``mkdtemp`` directory)
   are what gets loaded: they are written to an anonymous, sealed ``memfd`` and ``dlopen``-ed through
   ``/proc/<pid>/fd/N`` (via a uniquely named link in a private 0700 directory, because ``dlopen`` treats
   a name it has loaded before as the same library). The checked file is never opened a second time,
   so there is no window between check and load (no TOCTOU). Where ``memfd_create`` is missing, the
   bytes go to a fresh private (0700) temporary directory, are loaded from there and deleted.
4. A library that lacks one of the expected functions is not used: a warning, then the PyTorch path
   (once per process, not an error on every call).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = ["available", "supports", "nm_mask", "supports_decay", "add_decay_", "supports_apply", "apply_mask", "reset"]

_SOURCE = Path(__file__).with_name("nm_kernel.c")
_ENV_NATIVE = "NM_LIGHTNING_NATIVE"
_ENV_TIMEOUT = "NM_LIGHTNING_CC_TIMEOUT"
_DEFAULT_TIMEOUT = 60.0
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
_APPLY: dict[torch.dtype, str] = {
    torch.float16: "nm_apply_u16",
    torch.bfloat16: "nm_apply_u16",
    torch.float32: "nm_apply_u32",
    torch.float64: "nm_apply_u64",
}
_MAX_M = 256  # NM_MAX_M in the C source
_MIN_LANES_PER_THREAD = 4096

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None


def _symbols() -> dict[str, tuple[Any, list[Any]]]:
    """Every function the library must export: name -> (restype, argtypes)."""
    out: dict[str, tuple[Any, list[Any]]] = {}
    for name, ctype, _, _ in _DTYPES.values():
        out[name] = (ctypes.c_int64, [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctype, ctype])
    for name, ctype in _DECAY.values():
        out[name] = (None, [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctype])
    for name in set(_APPLY.values()):
        out[name] = (None, [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2)
    return out


# ---------------------------------------------------------------------------------------------- settings
def _cache_dir() -> Path:
    root = os.environ.get("NM_LIGHTNING_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nm_lightning"


def _compiler() -> list[str] | None:
    """The compiler command as an argv list (``CC`` split with :func:`shlex.split`), or None."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        argv = shlex.split(cc)
        return argv or None
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _timeout() -> float:
    raw = os.environ.get(_ENV_TIMEOUT)
    if raw is None or raw.strip() == "":
        return _DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{_ENV_TIMEOUT} must be a positive, finite number of seconds, got {raw!r}")
    return value


_FLAG_SETS = (["-O3", "-march=native", "-fPIC", "-shared"], ["-O3", "-fPIC", "-shared"])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


# ---------------------------------------------------------------------------------------------- trust checks
def _uid() -> int | None:
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else None


def _untrusted(st: os.stat_result, what: str) -> str | None:
    """Why a file or directory with status ``st`` must not be trusted, or None."""
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        return f"{what} is owned by uid {st.st_uid}, not by the current user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (``mkdir``'s mode is only ever narrowed by the
    umask, so this holds under ``umask 000`` too). Existing directories are left as they are."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


class _Cache:
    """The cache directory, opened once and used only through its descriptor."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def open(cls) -> _Cache | None:
        path = _cache_dir()
        try:
            _make_private_dirs(path)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            warnings.warn(f"nm_lightning: cannot use the native kernel cache {path} ({err}); not caching", stacklevel=4)
            return None
        reason = _untrusted(os.fstat(fd), f"the native kernel cache directory {path}")
        if reason is not None:
            os.close(fd)
            warnings.warn(
                f"nm_lightning: {reason}; a library in it could have been planted by someone else, so it is not "
                "used: the kernel is built in a private temporary directory for this process only. Point "
                "NM_LIGHTNING_CACHE at a directory owned by you with mode 0700 to cache it.",
                stacklevel=4,
            )
            return None
        return cls(path, fd)

    def close(self) -> None:
        os.close(self.fd)

    def _read_checked(self, name: str, limit: int) -> bytes | None:
        """The bytes of ``name`` if it is a trusted regular file (raises ``_Untrusted``); None if missing."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(name, flags, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as err:  # e.g. ELOOP: a symlink planted under that name
            raise _Untrusted(f"{self.path / name} cannot be opened safely ({err})") from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Untrusted(f"{self.path / name} is not a regular file")
            reason = _untrusted(st, str(self.path / name))
            if reason is not None:
                raise _Untrusted(reason)
            if st.st_size > limit:
                raise _Untrusted(f"{self.path / name} is {st.st_size} bytes, more than a kernel can be")
            chunks, size = [], 0
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise _Untrusted(f"{self.path / name} grew past {limit} bytes while being read")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def load(self, name: str) -> bytes | None:
        """The cached library's bytes when they are ours and match the recorded sha256; else None."""
        try:
            data = self._read_checked(name, 64 << 20)
            if data is None:
                return None
            digest = self._read_checked(name + ".sha256", 1024)
            if digest is None:  # no record (e.g. written by an older version): rebuild quietly
                return None
            if digest.decode("ascii", "replace").strip() != hashlib.sha256(data).hexdigest():
                raise _Untrusted(f"{self.path / name} does not match the checksum recorded when it was built")
        except _Untrusted as err:
            warnings.warn(f"nm_lightning: not loading the cached native kernel: {err}; rebuilding it", stacklevel=5)
            return None
        return data

    def store(self, name: str, data: bytes) -> None:
        """Write ``name`` and its ``.sha256`` atomically (temp file + rename inside the directory)."""
        for target, payload in ((name, data), (name + ".sha256", hashlib.sha256(data).hexdigest().encode())):
            tmp = f".{target}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600,
                             dir_fd=self.fd)
                try:
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.replace(tmp, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except OSError as err:
                warnings.warn(f"nm_lightning: could not cache the native kernel in {self.path} ({err})", stacklevel=5)
                try:
                    os.unlink(tmp, dir_fd=self.fd)
                except OSError:
                    pass
                return


class _Untrusted(Exception):
    pass


class _CompilerTimeout(Exception):
    pass


# ---------------------------------------------------------------------------------------------- build and load
def _build(cc: list[str], flags: list[str], source: bytes, timeout: float) -> bytes:
    """Compile ``source`` in a private temporary directory and return the library's bytes."""
    work = tempfile.mkdtemp(prefix="nm_lightning-build-")  # mode 0700, ours
    try:
        src, out = os.path.join(work, "nm_kernel.c"), os.path.join(work, "nm_kernel.so")
        with open(src, "wb") as f:
            f.write(source)
        # a new session, so that a compiler wrapper's children are killed with it on timeout
        proc = subprocess.Popen(
            [*cc, *flags, "-o", out, src], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.communicate()
            raise _CompilerTimeout(
                f"the C compiler {shlex.join(cc)!r} did not finish within {timeout:g} s ({_ENV_TIMEOUT})"
            ) from None
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cc, stderr=err)
        with open(out, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dlopen(data: bytes) -> ctypes.CDLL:
    """Load exactly ``data`` as a shared library (see the module docstring, point 3)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        import fcntl

        fd = memfd_create("nm_kernel", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            seals = getattr(fcntl, "F_ADD_SEALS", None)
            if seals is not None:
                try:
                    all_seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
                    fcntl.fcntl(fd, seals, all_seals)
                except OSError:
                    pass
            # dlopen returns an already loaded library when the *name* matches, and fd numbers are reused;
            # a uniquely named link (in a private 0700 directory) to the descriptor keeps every load apart
            work = tempfile.mkdtemp(prefix="nm_lightning-load-")
            try:
                link = os.path.join(work, "nm_kernel.so")
                os.symlink(f"/proc/{os.getpid()}/fd/{fd}", link)
                return ctypes.CDLL(link)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            os.close(fd)
    work = tempfile.mkdtemp(prefix="nm_lightning-load-")
    path = os.path.join(work, "nm_kernel" + (".dll" if sys.platform == "win32" else ".so"))
    try:
        with open(path, "wb") as f:
            f.write(data)
        return ctypes.CDLL(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (restype, argtypes) in _symbols().items():
        fn = getattr(lib, name)  # AttributeError when missing
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def _library_name(cc: list[str], flags: list[str], source: bytes) -> str:
    """The cache file name: a hash of the source, the compiler command, the flags and the CPU."""
    # a -march=native library is tuned to this CPU, so the CPU is part of the cache key
    fingerprint = "|".join([platform.machine(), sys.platform, shlex.join(cc), " ".join(flags), _cpu_model()])
    tag = hashlib.sha256(source + fingerprint.encode()).hexdigest()[:16]
    return f"nm_kernel-{tag}{'.dll' if sys.platform == 'win32' else '.so'}"


def _compile() -> ctypes.CDLL | None:
    if os.environ.get(_ENV_NATIVE, "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("nm_lightning: no C compiler found; using the slower PyTorch path for N:M masks", stacklevel=3)
        return None
    timeout = _timeout()
    source = _SOURCE.read_bytes()
    cache = _Cache.open()
    errors = []
    lib = None
    try:
        for flags in _FLAG_SETS:  # -march=native first; some compilers/CPUs only take the portable set
            name = _library_name(cc, flags, source)
            data = cache.load(name) if cache is not None else None
            if data is None:
                try:
                    data = _build(cc, flags, source, timeout)
                except _CompilerTimeout as err:  # another flag set would hang the same way
                    warnings.warn(f"nm_lightning: {err}; using the slower PyTorch path for N:M masks", stacklevel=3)
                    return None
                except (OSError, subprocess.SubprocessError) as err:
                    detail = getattr(err, "stderr", b"") or b""
                    errors.append(f"{err} {detail.decode(errors='replace')[:200]}")
                    continue
                if cache is not None:
                    cache.store(name, data)
            try:
                lib = _dlopen(data)
                break
            except OSError as err:
                errors.append(str(err))
    finally:
        if cache is not None:
            cache.close()
    if lib is None:
        warnings.warn(
            f"nm_lightning: could not build the native N:M kernel ({'; '.join(errors)}); using the slower PyTorch path",
            stacklevel=3,
        )
        return None
    try:
        return _bind(lib)
    except AttributeError as err:
        warnings.warn(
            f"nm_lightning: the native N:M kernel lacks an expected function ({err}); using the slower PyTorch path",
            stacklevel=3,
        )
        return None


def _get_lib() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _compile()
                _tried = True
    return _lib


def reset() -> None:
    """Forget the loaded kernel, so that the next call builds or loads it again (reads the environment anew)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False


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


def supports_apply(weight: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether :func:`apply_mask` can run natively (a contiguous CPU float tensor and a bool mask of its shape)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _APPLY
        and mask.device.type == "cpu"
        and mask.dtype == torch.bool
        and weight.shape == mask.shape
        and weight.is_contiguous()
        and mask.is_contiguous()
        and available()
    )


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``weight`` where ``mask``, ``+0.0`` elsewhere (kept bits exact), in one pass (no autograd)."""
    lib = _get_lib()
    assert lib is not None
    fn = getattr(lib, _APPLY[weight.dtype])
    w = weight.detach()
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    ptrs = (w.data_ptr(), mask.data_ptr(), out.data_ptr())
    _run(fn, w.numel(), 1 << 18, lambda b, e: (*ptrs, b, e))
    return out
