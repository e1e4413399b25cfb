"""The native kernel's loader: what it refuses to load, how it builds, and how it falls back.

Every test runs with its own cache directory and forgets the loaded kernel before and after, so the
rest of the suite loads it afresh from the normal environment.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from nm_lightning import _native, nm_mask
from nm_lightning.masks import nm_masked

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler")


@pytest.fixture(autouse=True)
def fresh_loader(monkeypatch, tmp_path):
    for var in ("NM_LIGHTNING_NATIVE", "NM_LIGHTNING_CC_TIMEOUT", "CC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    _native.reset()
    yield
    monkeypatch.undo()
    _native.reset()


def _fallback_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    from nm_lightning.masks import _mask_generic, group_view

    return _mask_generic(w, n, m, group_view(w.shape, "input_channel"))


def _load(monkeypatch=None) -> tuple[bool, list[str]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ok = _native.available()
    return ok, [str(w.message) for w in rec]


def _plant(cache: Path, marker: Path) -> Path:
    """Put a library under the exact name the loader looks for: the real kernel plus a constructor that
    writes ``marker`` when the library is loaded (what an attacker's code would run), and a matching
    checksum file."""
    cache.mkdir(parents=True, exist_ok=True)
    source = _native._SOURCE.read_bytes()
    planted = cache / "planted.c"
    planted.write_bytes(
        source + b'\n#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
        b'    FILE *f = fopen(MARKER, "w"); if (f) fclose(f);\n}\n'
    )
    name = _native._library_name([CC], _native._FLAG_SETS[0], source)
    target = cache / name
    subprocess.run([CC, *_native._FLAG_SETS[0], f'-DMARKER="{marker}"', "-o", str(target), str(planted)], check=True)
    planted.unlink()
    import hashlib

    (cache / (name + ".sha256")).write_text(hashlib.sha256(target.read_bytes()).hexdigest())
    return target


def _assert_native_correct() -> None:
    w = torch.randn(8, 16)
    assert torch.equal(nm_mask(w, 2, 4), _fallback_mask(w, 2, 4))


@needs_cc
def test_planted_library_in_world_writable_dir_is_not_loaded(monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    marker = tmp_path / "planted-code-ran"
    _plant(shared, marker)
    os.chmod(shared, 0o777)
    monkeypatch.setenv("NM_LIGHTNING_CACHE", str(shared))
    monkeypatch.setenv("CC", CC)
    ok, messages = _load()
    assert not marker.exists(), "the planted library was loaded"
    assert ok, messages  # built privately instead
    assert any("writable by group or others (mode 0777)" in m and str(shared) in m for m in messages), messages
    _assert_native_correct()


@needs_cc
def test_planted_library_in_dir_of_another_user_is_not_loaded(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    marker = tmp_path / "planted-code-ran"
    _plant(cache, marker)
    os.chmod(cache, 0o700)
    monkeypatch.setenv("CC", CC)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)  # the directory now belongs to "someone else"
    ok, messages = _load()
    assert not marker.exists() and ok
    assert any(f"owned by uid {real}, not by the current user (uid {real + 1})" in m for m in messages), messages


@needs_cc
@pytest.mark.parametrize("attack", ["group-writable", "world-writable", "other-owner", "checksum", "symlink"])
def test_untrusted_library_in_private_dir_is_rebuilt(attack, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    marker = tmp_path / "planted-code-ran"
    target = _plant(cache, marker)
    os.chmod(cache, 0o700)
    if attack == "group-writable":
        os.chmod(target, 0o620)
    elif attack == "world-writable":
        os.chmod(target, 0o602)
    elif attack == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(target, 65534, -1)
    elif attack == "checksum":
        Path(str(target) + ".sha256").write_text("0" * 64)
    else:  # a symlink under the library's name, pointing at the planted file
        elsewhere = tmp_path / "elsewhere.so"
        target.rename(elsewhere)
        target.symlink_to(elsewhere)
    monkeypatch.setenv("CC", CC)
    ok, messages = _load()
    assert not marker.exists(), f"{attack}: the planted library was loaded"
    assert ok and any("not loading the cached native kernel" in m for m in messages), messages
    # rebuilt in place: a private regular file with a matching checksum, loaded quietly next time
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o022 == 0
    _native.reset()
    ok, messages = _load()
    assert ok and messages == [] and not marker.exists()


@needs_cc
def test_cache_dirs_are_created_private_under_umask_000(monkeypatch, tmp_path):
    cache = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("NM_LIGHTNING_CACHE", str(cache))
    old = os.umask(0)
    try:
        ok, messages = _load()
    finally:
        os.umask(old)
    assert ok and messages == []
    for d in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    for f in cache.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) & 0o077 == 0, f


@needs_cc
def test_second_process_loads_the_cached_library_quietly(tmp_path):
    ok, messages = _load()
    assert ok and messages == []
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[1] == files[0] + ".sha256"
    _native.reset()
    ok, messages = _load()
    assert ok and messages == []


@needs_cc
def test_library_without_the_expected_functions_falls_back_once(monkeypatch, tmp_path):
    tiny = tmp_path / "tiny.c"
    tiny.write_text("int nm_lightning_unrelated(void) { return 1; }\n")
    monkeypatch.setattr(_native, "_SOURCE", tiny)
    w = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = nm_mask(w, 2, 4)
    messages = [str(r.message) for r in rec]
    assert any("lacks an expected function" in m and "nm_mask_u" in m for m in messages), messages
    assert not _native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning (and no error) on later calls
        second = nm_mask(w, 2, 4)
        masked, mask = nm_masked(w, 2, 4)
    assert torch.equal(first, second) and torch.equal(first, _fallback_mask(w, 2, 4)) and torch.equal(mask, first)


@needs_cc
def test_cc_with_arguments_is_split_like_a_shell(monkeypatch, tmp_path):
    # a path with a space, quoted, plus flags: one argv entry per word
    spaced = tmp_path / "my compilers"
    spaced.mkdir()
    (spaced / "cc").symlink_to(CC)
    monkeypatch.setenv("CC", f"{shlex.quote(str(spaced / 'cc'))} -O1 -DNM_LIGHTNING_TEST=1")
    ok, messages = _load()
    assert ok and messages == []
    _assert_native_correct()


@needs_cc
def test_hung_compiler_is_killed_and_falls_back(monkeypatch, tmp_path):
    script = tmp_path / "slowcc"
    script.write_text("#!/bin/sh\nsleep 30\n")  # a child process, not exec: the whole group must die
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setenv("NM_LIGHTNING_CC_TIMEOUT", "0.5")
    t0 = time.monotonic()
    ok, messages = _load()
    assert time.monotonic() - t0 < 10
    assert not ok
    assert any("did not finish within 0.5 s (NM_LIGHTNING_CC_TIMEOUT)" in m for m in messages), messages
    _assert_native_correct()  # the PyTorch path


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_bad_compiler_timeout_is_named(monkeypatch, value):
    monkeypatch.setenv("NM_LIGHTNING_CC_TIMEOUT", value)
    with pytest.raises(ValueError, match=rf"NM_LIGHTNING_CC_TIMEOUT must be a positive.* got '{value}'"):
        _native.available()


@needs_cc
def test_with_a_compiler_the_native_path_is_used_and_agrees_with_the_fallback(monkeypatch):
    calls = []
    real = _native.nm_mask

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_native, "nm_mask", spy)
    w = torch.randn(32, 64, 3)
    for n, m in [(2, 4), (1, 8), (5, 16)]:
        native = nm_mask(w, n, m)
        assert calls and calls[-1] == w.shape
        monkeypatch.setenv("NM_LIGHTNING_NATIVE", "0")
        _native.reset()
        count = len(calls)
        fallback = nm_mask(w, n, m)
        assert len(calls) == count  # not native
        assert torch.equal(native, fallback)
        monkeypatch.delenv("NM_LIGHTNING_NATIVE")
        _native.reset()


@pytest.mark.parametrize("how", ["missing-binary", "empty-path"])
def test_without_a_compiler_it_warns_and_falls_back(how, monkeypatch, tmp_path):
    if how == "missing-binary":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        expected = "could not build the native N:M kernel"
    else:
        monkeypatch.setenv("PATH", "")
        expected = "no C compiler found"
    w = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mask = nm_mask(w, 2, 4)
    assert any(expected in str(r.message) for r in rec), [str(r.message) for r in rec]
    assert not _native.available()
    assert torch.equal(mask, _fallback_mask(w, 2, 4))


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_native_apply_mask_is_torch_where_bit_for_bit_with_its_gradient(dtype):
    """The one-pass native ``W ⊙ E`` (used by the fixed-mask forward and the backward rebuild) gives the bits of
    ``torch.where(mask, w, +0)``: kept -0.0 stays -0.0, pruned negatives become +0.0; its gradient is masked the
    same way."""
    from nm_lightning.masks import apply_mask

    assert _native.available()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    w = torch.randn(300, 40).to(dtype)
    w[0, :8] = -0.0
    mask = torch.rand(300, 40) > 0.5
    mask[0, :4] = True
    ref = torch.where(mask, w, torch.zeros((), dtype=dtype))
    out = apply_mask(w, mask)
    assert _native.supports_apply(w, mask) and out.is_contiguous()
    assert torch.equal(out.view(ints), ref.view(ints))
    assert torch.signbit(out[0, :4]).all() and not torch.signbit(out[~mask]).any()
    grad = torch.randn(300, 40).to(dtype)
    ours, theirs = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    apply_mask(ours, mask).backward(grad)
    torch.where(mask, theirs, torch.zeros((), dtype=dtype)).backward(grad)
    assert torch.equal(ours.grad.view(ints), theirs.grad.view(ints))
    # a non-contiguous weight takes torch.where, with the same bits
    t = w.t()
    assert not _native.supports_apply(t, mask.t())
    assert torch.equal(apply_mask(t, mask.t()).contiguous().view(ints), ref.t().contiguous().view(ints))


@needs_cc
@pytest.mark.parametrize("flags", ["native", "portable"])
def test_m4_kernels_agree_with_the_fallback_bit_for_bit(flags, monkeypatch):
    """m = 4 has a SIMD path (AVX-512 when the compiler targets it with -march=native) and the portable
    straight-line code (the other flag set): both give the fallback's masks and masked weights, bit for bit,
    for every n, with many ties and signed zeros, groups of consecutive values (inner == 1) and conv blocks
    (inner > 1), thread splits in the middle of a row, and NaN/Inf counted exactly."""
    from nm_lightning.masks import _mask_generic, group_view

    if flags == "portable":
        monkeypatch.setattr(_native, "_FLAG_SETS", (["-O3", "-fPIC", "-shared"],))
    _native.reset()
    assert _native.available()
    gen = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    shapes = [(64, 4 * 37), (3, 4 * 1234, 1), (8, 4 * 5, 3, 3), (777, 12, 9), (16, 8, 19), (4, 4, 5, 7)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for k, shape in enumerate(shapes):
            w = torch.randn(shape, generator=gen)
            if k % 2:  # ties everywhere, and both zeros
                w = torch.randint(-3, 4, shape, generator=gen).float()
                w[w == 0] = -0.0
                w.view(-1)[::7] = 0.0
            gv = group_view(w.shape, "input_channel")
            for n in (1, 2, 3):
                masked, mask = nm_masked(w, n, 4)
                ref = _mask_generic(w, n, 4, gv)
                assert torch.equal(mask, ref), (flags, shape, n, threads)
                expected = torch.where(ref, w, torch.zeros(()))
                assert torch.equal(masked.view(torch.int32), expected.view(torch.int32)), (flags, shape, n)
    torch.set_num_threads(before)
    w = torch.randn(64, 64, generator=gen)
    w[3, 5], w[10, 7], w[63, 63] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(ValueError, match="contains 3 NaN/Inf"):
        nm_mask(w, 2, 4)
