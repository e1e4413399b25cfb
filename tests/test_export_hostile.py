"""Hostile and broken export files, and exports on a full or read-only disk.

Every loader of ``nm_lightning.export`` (``load_packed`` / ``unpack_state_dict``, ``load_semi_structured``)
is fed: a pickle that would run code, a truncated file, tensors with wrong strides, offsets, storages and
sizes, duplicate and missing keys, a changed byte anywhere in the payload, huge size claims, old versions.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import zipfile

import pytest
import torch
from torch import nn

from nm_lightning import attach, nm_mask, plan_layers
from nm_lightning.export import artifacts as artifacts_mod
from nm_lightning.export import (
    load_packed,
    load_semi_structured,
    pack_state_dict,
    save_packed,
    save_semi_structured,
    unpack_state_dict,
    write_artifacts,
)
from nm_lightning.export._util import payload_digest, sha256_file
from nm_lightning.export.artifacts import check_export_destination

# ---------------------------------------------------------------------------------------------- fixtures


def _nm(shape, n=2, m=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    return torch.where(nm_mask(w, n, m), w, torch.zeros((), dtype=dtype))


def _state():
    return {"fc.weight": _nm((64, 128)), "fc.bias": torch.ones(64), "step": torch.tensor(3)}


def packed_payload() -> dict:
    return pack_state_dict(_state(), {"fc": (2, 4)})


def semi_payload(tmp_path) -> dict:
    sd = {"fc.weight": _nm((64, 128), dtype=torch.float16), "fc.bias": torch.ones(64)}
    save_semi_structured(sd, tmp_path / "semi_src.pt")
    return torch.load(tmp_path / "semi_src.pt", weights_only=True)


LOADERS = {
    "packed": (load_packed, lambda tmp: packed_payload(), "fc.weight", "values"),
    "semi": (load_semi_structured, semi_payload, "fc.weight", "packed"),
}


@pytest.fixture(params=list(LOADERS))
def kind(request):
    return request.param


def reseal(payload: dict) -> dict:
    """What an attacker who knows the format does: recompute the digest after editing."""
    payload = dict(payload)
    payload["sha256"] = payload_digest(payload)
    return payload


def write(tmp_path, obj, name="bad.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def copy_layers(payload: dict) -> dict:
    out = dict(payload)
    out["layers"] = {k: dict(v) for k, v in payload["layers"].items()}
    out["tensors"] = dict(payload["tensors"])
    out["order"] = list(payload["order"])
    return out


# ---------------------------------------------------------------------------------------------- code, truncation


class _RunsCode:
    """Unpickling this with weights_only=False creates ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_does_not_run(tmp_path, kind):
    load, make, *_ = LOADERS[kind]
    marker = tmp_path / "pwned"
    payload = dict(make(tmp_path))
    payload["tensors"] = {**payload["tensors"], "evil": _RunsCode(marker)}
    path = write(tmp_path, payload, "evil.pt")
    with pytest.raises(ValueError, match=rf"{path}: not a readable") as err:
        load(path)
    assert "weights_only" in str(err.value) or "Unsupported global" in str(err.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really runs code when unpickled without weights_only
    assert marker.exists()


def test_truncated_and_missing_files(tmp_path, kind):
    load, make, *_ = LOADERS[kind]
    path = write(tmp_path, make(tmp_path), "full.pt")
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        trunc = tmp_path / f"trunc{cut}.pt"
        trunc.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{trunc}: not a readable"):
            load(trunc)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load(tmp_path / "missing.pt")


def _claim_huge_storage(data: bytes) -> bytes:
    """Rewrite the first storage's element count in a torch.save pickle to 1e12."""
    i = data.index(b"X\x03\x00\x00\x00cpu") + 8
    i += {ord("q"): 2, ord("r"): 5}.get(data[i], 0)  # the memo put after the location string
    size = {ord("K"): 2, ord("M"): 3, ord("J"): 5}.get(data[i]) or 2 + data[i + 1]  # BININT1/2/4 or LONG1
    return data[:i] + b"\x8a\x06" + (10**12).to_bytes(6, "little") + data[i + size :]


def test_huge_storage_claim_in_the_pickle(tmp_path, kind):
    """A storage record claiming 1e12 elements: refused with the path, no allocation."""
    load, make, *_ = LOADERS[kind]
    src = write(tmp_path, make(tmp_path), "src.pt")
    dst = tmp_path / "claim.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, _claim_huge_storage(data) if info.filename.endswith("data.pkl") else data)
    with pytest.raises(ValueError, match=rf"{dst}: not a readable.*(record size|size)"):
        load(dst)


# ---------------------------------------------------------------------------------------------- strides, sizes
def test_zero_stride_values_cannot_claim_a_large_layer(tmp_path):
    """The old decoder turned a 2.3 KB file into a 16384x16384 layer (zero-stride values/codes, matching sha)."""
    rows = cols = 16384
    groups = rows * cols // 4
    payload = copy_layers(packed_payload())
    entry = payload["layers"]["fc.weight"]
    entry.update(
        shape=[rows, cols],
        groups=groups,
        values=torch.zeros(1).expand(groups * 2),
        codes=torch.zeros(1, dtype=torch.uint8).expand((groups * 3 + 7) // 8),
    )
    path = write(tmp_path, payload, "zero_stride.pt")
    assert path.stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"zero_stride.pt.*'values'\].*strides \[0\]"):
        load_packed(path)


@pytest.mark.parametrize(
    "make_bad, pattern",
    [
        (lambda t: torch.cat([t, t], dim=-1)[..., ::2], r"strides \[(\d+, )?2\]"),  # a strided view
        (lambda t: torch.cat([t.flatten(), t.flatten()])[: t.numel()].view(t.shape), r"storage holds"),  # larger
        (lambda t: torch.cat([t.flatten()[:1], t.flatten()])[1:].view(t.shape), r"offset 1"),  # an offset
        (lambda t: t.flatten()[:1].expand(t.numel()).view(t.shape), r"strides \[0(, 0)?\]"),  # one value, many
    ],
    ids=["strided", "larger-storage", "offset", "expanded"],
)
def test_views_are_refused_everywhere(tmp_path, kind, make_bad, pattern):
    load, make, key, field_name = LOADERS[kind]
    for where in ("layer", "tensors"):
        payload = copy_layers(make(tmp_path))
        if where == "layer":
            payload["layers"][key][field_name] = make_bad(payload["layers"][key][field_name])
        else:
            payload["tensors"]["fc.bias"] = make_bad(payload["tensors"]["fc.bias"])
        path = write(tmp_path, payload, f"{where}.pt")
        with pytest.raises(ValueError, match=pattern):
            load(path)


def test_shared_storage_and_deep_nesting_are_refused(tmp_path, kind):
    load, make, *_ = LOADERS[kind]
    payload = copy_layers(make(tmp_path))
    payload["tensors"]["alias"] = payload["tensors"]["fc.bias"]
    payload["order"].append("alias")
    with pytest.raises(ValueError, match="shares its storage"):
        load(write(tmp_path, reseal(payload), "alias.pt"))
    payload = copy_layers(make(tmp_path))
    deep: list = []
    for _ in range(60):
        deep = [deep]
    payload["tensors"]["deep"] = deep
    payload["order"].append("deep")
    with pytest.raises(ValueError, match="nested deeper"):
        load(write(tmp_path, payload, "deep.pt"))


def test_sizes_dtypes_and_shapes_against_the_header(tmp_path, kind):
    """A resealed file (digest recomputed) with fields that disagree: every one a clear error."""
    load, make, key, field_name = LOADERS[kind]
    base = make(tmp_path)
    cases = [
        ("shape", [10**6, 10**6], r"shape|groups"),  # a huge claim with the original small tensors
        # a rewritten shape: for the 2:4 file it disagrees with the stored tensors (for the packed file an
        # equal-sized shape is a different, valid layer: the digest below is what catches the edit)
        *([("shape", [128, 64], r"field 'packed' must be")] if kind == "semi" else []),
        (field_name, base["layers"][key][field_name][:-1].clone(), r"field '(values|packed)' must be"),
        (field_name, base["layers"][key][field_name].double(), r"field '(values|packed)' must be"),
        ("dtype", "complex64", r"field 'dtype'.*complex64"),
        ("dtype", 3, r"field 'dtype'"),
    ]
    for name, value, pattern in cases:
        payload = copy_layers(base)
        payload["layers"][key][name] = value
        with pytest.raises(ValueError, match=rf"bad.pt.*'{key}'.*{pattern}|bad.pt.*{pattern}"):
            load(write(tmp_path, reseal(payload)))


def test_packed_header_fields(tmp_path):
    base = packed_payload()
    for name, value, pattern in [
        ("groups", 10**12, r"groups=1000000000000"),
        ("bits", 64, r"bits=64"),
        ("n", 0, r"n must satisfy"),
        ("m", 2**20, r"does not fit|not divisible"),
        ("coding", "zip", r"field 'coding'"),
        ("extra", 1, r"unknown field"),
    ]:
        payload = copy_layers(base)
        payload["layers"]["fc.weight"][name] = value
        with pytest.raises(ValueError, match=pattern):
            unpack_state_dict(reseal(payload), where="hdr")


# ---------------------------------------------------------------------------------------------- keys, digest
def test_duplicate_missing_and_extra_keys(tmp_path, kind):
    load, make, key, _ = LOADERS[kind]
    base = make(tmp_path)
    payload = copy_layers(base)
    payload["tensors"][key] = torch.zeros(3)  # both in tensors and layers
    with pytest.raises(ValueError, match=rf"\['{key}'\] stored both in 'tensors' and 'layers'"):
        load(write(tmp_path, reseal(payload)))
    payload = copy_layers(base)
    payload["order"].append(key)
    with pytest.raises(ValueError, match=rf"key '{key}' is listed twice in 'order'"):
        load(write(tmp_path, reseal(payload)))
    payload = copy_layers(base)
    payload["order"].remove(key)  # the old 2:4 loader silently dropped this layer
    with pytest.raises(ValueError, match=rf"stored but not listed \['{key}'\]"):
        load(write(tmp_path, reseal(payload)))
    payload = copy_layers(base)
    payload["order"].append("ghost")
    with pytest.raises(ValueError, match=r"listed but not stored \['ghost'\]"):
        load(write(tmp_path, reseal(payload)))
    payload = copy_layers(base)
    payload["order"].append(7)
    with pytest.raises(ValueError, match="entry 7 is not a string"):
        load(write(tmp_path, reseal(payload)))


def test_the_digest_covers_the_whole_payload(tmp_path, kind):
    """One changed bias value, header field, key order or dense tensor: checksum mismatch (not resealed)."""
    load, make, key, field_name = LOADERS[kind]
    base = make(tmp_path)
    edits = {
        "bias": lambda p: p["tensors"].__setitem__("fc.bias", p["tensors"]["fc.bias"] + 1),
        "order": lambda p: p["order"].reverse(),
        "shape": lambda p: p["layers"][key].__setitem__("shape", list(reversed(p["layers"][key]["shape"]))),
        "values": lambda p: p["layers"][key].__setitem__(field_name, p["layers"][key][field_name] * 2),
        "dtype": lambda p: p["layers"][key].__setitem__("dtype", "bfloat16"),
        "new tensor": lambda p: (p["tensors"].__setitem__("x", torch.ones(1)), p["order"].append("x")),
    }
    for _name, edit in edits.items():
        payload = copy_layers(base)
        edit(payload)
        with pytest.raises(ValueError, match=r"bad.pt: checksum mismatch"):
            load(write(tmp_path, payload))
    payload = dict(base)
    del payload["sha256"]
    with pytest.raises(ValueError, match="checksum mismatch"):
        load(write(tmp_path, payload))
    load(write(tmp_path, base, "good.pt"))  # the unedited payload loads


def test_old_and_unknown_versions_are_refused(tmp_path, kind):
    load, make, *_ = LOADERS[kind]
    for version in (1, 3, "2"):
        payload = {**make(tmp_path), "version": version}
        with pytest.raises(ValueError, match=rf"version {version!r}; this reader reads version 2 only"):
            load(write(tmp_path, payload))
    with pytest.raises(ValueError, match="not an nm_lightning"):
        load(write(tmp_path, {"fc.weight": torch.ones(2)}))


def test_semi_decoded_weight_must_be_2to4(tmp_path):
    payload = copy_layers(semi_payload(tmp_path))
    payload["layers"]["fc.weight"]["meta"] = torch.zeros_like(payload["layers"]["fc.weight"]["meta"])
    sd = load_semi_structured(write(tmp_path, reseal(payload)))  # meta 0: both kept at position 0 of a group
    assert set(sd) == {"fc.weight", "fc.bias"}  # decodes to a 2:4 weight (a valid, if different, file)
    payload["layers"]["fc.weight"]["meta"] = torch.full_like(payload["layers"]["fc.weight"]["meta"], -1)
    load_semi_structured(write(tmp_path, reseal(payload)))  # every code valid in 2 bits: still 2:4


# ---------------------------------------------------------------------------------------------- atomic exports
def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    attach(model, plan_layers(model, 2, 4))
    return model


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_export_replaces_the_previous_one_as_a_unit(tmp_path, monkeypatch):
    out = tmp_path / "export"
    meta = write_artifacts(_model(), out, extra_files={"summary.json": {"acc": 0.5}})
    assert json.loads((out / "summary.json").read_text()) == {"acc": 0.5} and meta["extra_files"] == ["summary.json"]
    first = _snapshot(out)
    model2 = _model()
    with torch.no_grad():
        model2[0].parametrizations.weight.original.mul_(2)
    write_artifacts(model2, out, ("packed",))
    assert set(_snapshot(out)) == {"model_packed.pt", "scheme.json"}  # a whole new export, no leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    (out / ".model_dense.pt.0a1b2c.tmp").write_bytes(b"")  # left by an interrupted write: not foreign
    monkeypatch.setattr(artifacts_mod, "_exchange", lambda a, b: False)  # an OS without atomic exchange
    write_artifacts(_model(), out, extra_files={"summary.json": {"acc": 0.5}})
    assert _snapshot(out).keys() == first.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("failing", ["save_dense", "save_packed", "save_semi_structured", "atomic_write"])
def test_a_failure_midway_leaves_the_old_export_untouched(tmp_path, monkeypatch, failing):
    out = tmp_path / "export"
    write_artifacts(_model(), out)
    before = _snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts_mod, failing, full_disk)
    with pytest.raises(OSError, match=rf"cannot write the export {out}: writing \S+: No space left") as err:
        write_artifacts(_model(), out)
    assert err.value.errno == errno.ENOSPC and str(out) in str(err.value.filename)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial new export, no temporary dir
    # a first export that fails leaves nothing at all
    with pytest.raises(OSError):
        write_artifacts(_model(), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_torch_save_failing_on_a_full_disk_names_the_path(tmp_path, monkeypatch):
    def zip_error(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1664 vs 1552")

    monkeypatch.setattr(torch, "save", zip_error)
    with pytest.raises(OSError, match=r"cannot write the export .*export: writing model_dense.pt: RuntimeError"):
        write_artifacts(_model(), tmp_path / "export")
    with pytest.raises(OSError, match=r"cannot write .*p.pt: RuntimeError: .*unexpected pos"):
        save_packed(_model(), tmp_path / "p.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (simulated in the next test)")
def test_read_only_directory(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(OSError, match=rf"cannot create a temporary directory next to the export {parent}/export"):
            write_artifacts(_model(), parent / "export")
        with pytest.raises(OSError, match=rf"{parent}/p.pt"):
            save_packed(_model(), parent / "p.pt")
    finally:
        parent.chmod(0o700)
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_read_only_or_full_disk_simulated(tmp_path, monkeypatch, code):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OSError, match=rf"{tmp_path}/export: {os.strerror(code)}") as err:
        write_artifacts(_model(), tmp_path / "export")
    assert err.value.errno == code
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path}/p.pt: {os.strerror(code)}"):
        save_packed(_model(), tmp_path / "p.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "export"
        write_artifacts(_model(), out, extra_files={"summary.json": {}})
        single = save_packed(_model(), tmp_path / "single.pt")
        torch.save({}, tmp_path / "ref.pt")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == dir_mode
    for p in out.iterdir():
        assert (p.stat().st_mode & 0o777) == file_mode, p
    assert (single.stat().st_mode & 0o777) == file_mode == ((tmp_path / "ref.pt").stat().st_mode & 0o777)


def test_destination_that_is_not_an_export_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds entries that are not part of an nm_lightning export: \['notes.txt'\]"):
        write_artifacts(_model(), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and len(list(tmp_path.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        write_artifacts(_model(), tmp_path / "file")
    with pytest.raises(ValueError, match=r"\['notes.txt'\]"):
        check_export_destination(out)  # what a callback can check at setup, before training
    check_export_destination(tmp_path / "new" / "export")
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match="is the working directory or one of its parents"):
        write_artifacts(_model(), ".")
    with pytest.raises(ValueError, match="extra_files names must be plain file names"):
        write_artifacts(_model(), tmp_path / "e", extra_files={"../x": "y"})
