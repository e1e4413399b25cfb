"""Scheme files: every accepted form, the export metadata round trip, and hostile or broken files (issue 13)."""

from __future__ import annotations

import json
import os
import pprint
from pathlib import Path

import pytest
import torch
from conftest import TinyNet
from torch import nn

from nm_lightning import NMScheme, attach, plan_layers
from nm_lightning.export import write_artifacts
from nm_lightning.scheme import MAX_LAYER_NAME, MAX_SCHEME_BYTES, MAX_SCHEME_DEPTH, MAX_YAML_BYTES

# TinyNet in the DominoSearch text format, and the same scheme by layer name
TINY_DOMINO = {"SparseConv0_4-8-(3,)": [4, 4], "SparseConv1_8-16-(3,)": [2, 4], "Linear0_256-32": [1, 4]}
TINY_DOMINO["Linear1_32-4"] = [4, 4]
TINY_SCHEME = {"conv1": (4, 4), "conv2": (2, 4), "fc1": (1, 4), "fc2": (4, 4)}


def _write(tmp_path: Path, content: str | bytes, name: str = "scheme.txt") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _error(tmp_path: Path, content: str | bytes, match: str) -> str:
    """Load ``content`` and return the ValueError's message: it names the file and stays short."""
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=match) as info:
        NMScheme.load(path, model=TinyNet())
    message = str(info.value)
    assert message.startswith(f"{path}: ") and len(message) < 1000, message[:2000]
    return message


def _laughs(levels: int) -> str:
    """YAML whose value is two references to a list of 9**levels leaves (tiny file, huge repr)."""
    node = "[x, x, x, x, x, x, x, x, x]"
    for i in range(levels):
        node = f"[&a{i} {node}, " + ", ".join([f"*a{i}"] * 8) + "]"
    return f"fc1: [&top {node}, *top]\n"


DEPTH = MAX_SCHEME_DEPTH
HOSTILE = {
    # deep nesting: RecursionError before
    "deep_json": ("[" * 100_000 + "]" * 100_000, rf"nested deeper than {DEPTH} levels"),
    "deep_json_value": ('{"fc1": ' + "[" * 5_000 + "]" * 5_000 + "}", rf"nested deeper than {DEPTH} levels"),
    "deep_yaml_flow": ("fc1: " + "[" * 5_000 + "]" * 5_000, rf"nested deeper than {DEPTH} levels"),
    "deep_yaml_block": ("- " * 3_000 + "1\n", rf"nested deeper than {DEPTH} levels"),
    # 0.1 MB of unary minus in a DominoSearch line: MemoryError in ast before
    "unary_minus": (
        "{'SparseConv0_4-8-(3,)': [" + "-" * 100_000 + "1, 4]}",
        r"the value of 'SparseConv0_4-8-\(3,\)': n and m must be ints of at most 12 digits, got '-----",
    ),
    # invalid UTF-8: UnicodeDecodeError without the path before
    "invalid_utf8": (b'{"fc1": [2, 4], "\xff": [1, 4]}', r"not UTF-8 text: byte 0xff at offset 17 \(line 1\)"),
    # a non-string key: TypeError before
    "int_key": ("{1: [2, 4], 'fc1': [1, 4]}", r"layer names must be non-empty strings, got 1 \(int\)"),
    "int_key_domino": ("{'SparseConv0_4-8-(3,)': [4, 4], 5: [1, 4]}", r"expected a quoted layer key, found '5: "),
    "yaml_bool_key": ("on: [2, 4]\n", r"got True \(bool\) \(quote names such as yes/no/on/off"),
    # duplicate keys: the last one won silently before
    "duplicate_json": ('{"fc1": [2, 4], "fc1": [1, 4]}', r"duplicate key 'fc1': each key may appear once"),
    "duplicate_json_nested": (
        '{"format": "nm_lightning.export", "version": 1, "layers": {"fc1": {"n": 2, "m": 4, "n": 1}}}',
        r"duplicate key 'n'",
    ),
    "duplicate_yaml": ("fc1: [2, 4]\nfc2: [1, 4]\nfc1: [1, 4]\n", r"duplicate key 'fc1' \(line 3\)"),
    "duplicate_domino": (
        "{'SparseConv0_4-8-(3,)': [4, 4], " + repr(TINY_DOMINO)[1:],
        r"line 1, column 34: duplicate key 'SparseConv0_4-8-\(3,\)'",
    ),
    # a DominoSearch dict followed by more text: the rest was ignored before
    "domino_trailing_text": (repr(TINY_DOMINO) + "\n{'Linear1_32-4': [1, 4]}\n", r"line 2, column 1: unexpected text"),
    # code is never run, and the error points at it
    "domino_code": (
        "{'SparseConv0_4-8-(3,)': __import__('os').system('echo hacked')}",
        r"not a Python dict literal .* column 26: expected \[n, m\] after the key 'SparseConv0_4-8-\(3,\)', found "
        r"\"__import__",
    ),
    "empty": (" \n\n", r"the file is empty; a scheme file is UTF-8 JSON or YAML"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_broken_and_hostile_files_give_a_short_value_error_naming_the_file(tmp_path, case):
    content, match = HOSTILE[case]
    _error(tmp_path, content, match)


def test_huge_values_are_not_echoed_in_full(tmp_path):
    # a 13 MB layer name with a bad value made a 13 MB message (and a 13 MB name was accepted)
    _error(tmp_path, '{"' + "x" * 13_000_000 + '": [2, 4, 1]}', rf"has 13,000,000 characters; at most {MAX_LAYER_NAME}")
    _error(tmp_path, '{"fc1": [' + "1, " * 4_000_000 + "1]}", r"scheme entry 'fc1' must be \(n, m\), got \[1, 1, ")
    _error(tmp_path, '{"fc1": [' + "9" * 4_000 + ", 4]}", r"scheme entry 'fc1': N:M n=9999.*9999 is out of range")
    # a 1 KB YAML file whose value repr has a million elements
    _error(tmp_path, _laughs(5), r"scheme entry 'fc1': N:M n must be an int, got \[\[\[")
    _error(tmp_path, "fc1: &a [*a, *a]\n", r"N:M n must be an int, got \[\[\[")  # a cycle


def test_size_limits(tmp_path):
    padded = '{"fc1": [2, 4]}'.ljust(MAX_SCHEME_BYTES + 1)
    _error(tmp_path, padded, rf"the file has {MAX_SCHEME_BYTES + 1:,} bytes; a scheme file may have at most")
    # JSON may be large; YAML is pure Python and stops at MAX_YAML_BYTES
    entries = {f"layer{i}": [1, 4] for i in range(MAX_YAML_BYTES // 15)}
    assert len(NMScheme.load(_write(tmp_path, json.dumps(entries), "big.json"))) == len(entries)
    yaml_text = "".join(f"layer{i}: [1, 4]\n" for i in range(len(entries)))
    assert len(yaml_text) > MAX_YAML_BYTES
    _error(tmp_path, yaml_text, rf"too large to be read as YAML \(at most {MAX_YAML_BYTES:,} bytes")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_endless_device_is_not_read_to_the_end():
    with pytest.raises(ValueError, match=rf"/dev/zero: the file has more than {MAX_SCHEME_BYTES:,} bytes"):
        NMScheme.load("/dev/zero")


def test_multi_line_forms_are_read(tmp_path):
    # a YAML flow mapping over several lines with quoted keys was refused (only line 1 was looked at)
    flow = "{'fc1': [2, 4],\n 'fc2': [1, 4]}\n"
    assert NMScheme.load(_write(tmp_path, flow)) == {"fc1": (2, 4), "fc2": (1, 4)}
    # and so was a pretty-printed DominoSearch dict
    pretty = pprint.pformat(TINY_DOMINO, width=40)
    assert pretty.count("\n") >= 3
    assert NMScheme.load(_write(tmp_path, pretty), model=TinyNet()) == TINY_SCHEME
    # DominoSearch values may be tuples, keys double-quoted, with a trailing comma
    text = '{"SparseConv0_4-8-(3,)": (4, 4), "SparseConv1_8-16-(3,)": [2, 4,], "Linear0_256-32": [1, 4], ' + (
        "'Linear1_32-4': [4, 4],}"
    )
    assert NMScheme.load(_write(tmp_path, text), model=TinyNet()) == TINY_SCHEME


def test_entry_forms_and_constructor_errors(tmp_path):
    # the nm-train scheme.json form: extra fields per entry are ignored
    text = json.dumps({"fc1": {"type": "Linear", "n": 2, "m": 4, "layout": "flat", "shape": [32, 256]}})
    assert NMScheme.load(_write(tmp_path, text, "s.json")) == {"fc1": (2, 4)}
    with pytest.raises(ValueError, match=r"a scheme must be a mapping of layer name to \(n, m\), got int 123"):
        NMScheme(123)  # AttributeError before
    with pytest.raises(ValueError, match=r"scheme entry 'fc1' must give 'n' and 'm', got keys \['n', 'type'\]"):
        NMScheme({"fc1": {"n": 2, "type": "Linear"}})
    with pytest.raises(ValueError, match=r"scheme entry 'fc1': N:M m must be an int, got '4' \(str\)"):
        NMScheme({"fc1": (2, "4")})
    with pytest.raises(ValueError, match=r"a scheme path must be a str or os.PathLike, got int"):
        NMScheme.load(123)


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.fc(h)))


def test_export_metadata_round_trip(tmp_path):
    scheme = {"conv": (2, 4), "attn.in_proj_weight": (1, 4), "attn.out_proj": (2, 8), "fc": (1, 16), "head": (8, 8)}
    model = AttnNet()
    plans = plan_layers(model, scheme=scheme)
    attached = {p.name: (p.n, p.m) for p in plans if p.status == "covered"}
    assert attached == {k: v for k, v in scheme.items() if k != "head"}  # 8:8 is dense: not attached
    attach(model, plans)
    write_artifacts(model, tmp_path / "export")
    path = tmp_path / "export" / "scheme.json"
    meta = json.loads(path.read_text())
    assert meta["format"] == "nm_lightning.export" and "files" in meta  # the real metadata, not a plain scheme
    loaded = NMScheme.load(path)  # "scheme entry 'format' must be (n, m)" before
    assert dict(loaded) == attached
    # and it drives a fresh model to the same per-layer N:M
    fresh = AttnNet()
    assert {p.name: (p.n, p.m) for p in plan_layers(fresh, scheme=loaded) if p.status == "covered"} == attached


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"format": "nm_lightning.export", "version": 2, "layers": {}}, r"metadata version 2 is not supported"),
        ({"format": "nm_lightning.export", "version": True, "layers": {}}, r"metadata version True is not supported"),
        ({"format": "other.tool", "layers": {}}, r"unknown scheme file format 'other.tool'"),
        ({"format": "nm_lightning.export", "version": 1}, r"must have a 'layers' mapping .* got NoneType"),
        (
            {"format": "nm_lightning.export", "version": 1, "layers": {"fc1": {"n": 5, "m": 4}}},
            r"metadata 'layers': scheme entry 'fc1': N:M n must satisfy 1 <= n <= m, got n=5, m=4",
        ),
    ],
)
def test_export_metadata_errors(tmp_path, meta, match):
    _error(tmp_path, json.dumps(meta), match)


def test_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "s.json"
    NMScheme({"fc1": (2, 4)}).save(path)
    NMScheme(TINY_SCHEME).save(path)
    assert NMScheme.load(path) == TINY_SCHEME
    assert sorted(os.listdir(tmp_path)) == ["s.json"]  # no temporary file left behind


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_depth_limit_is_exact(tmp_path, fmt):
    def text(depth: int) -> str:  # the outer mapping and the entry are 2 levels; the rest are lists
        inner = "[" * (depth - 2) + "]" * (depth - 2)
        return f'{{"fc1": {{"n": 2, "m": 4, "x": {inner}}}}}' if fmt == "json" else f"fc1: {{n: 2, m: 4, x: {inner}}}\n"

    assert NMScheme.load(_write(tmp_path, text(MAX_SCHEME_DEPTH))) == {"fc1": (2, 4)}
    _error(tmp_path, text(MAX_SCHEME_DEPTH + 1), rf"nested deeper than {MAX_SCHEME_DEPTH} levels")
