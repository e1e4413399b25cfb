"""Per-layer N:M schemes: a mapping ``layer name -> (n, m)`` read from JSON, YAML or the DominoSearch text format.

Accepted files (chosen by content, not by extension):

* a mapping ``{"fc1": [2, 4], ...}`` or ``{"fc1": {"n": 2, "m": 4, ...}, ...}`` in JSON or YAML (other keys
  of an entry are ignored, so the ``scheme.json`` written by ``nm-train`` is accepted);
* the export metadata ``scheme.json`` written by :func:`nm_lightning.export.write_artifacts`
  (``{"format": "nm_lightning.export", "version": 1, "layers": {name: {"n": .., "m": .., ...}}, ...}``):
  its layers' ``(n, m)``; every other field is ignored;
* the DominoSearch text format, one Python dict literal
  ``{'SparseConv0_3-64-(7, 7)': [16, 16], ..., 'Linear0_2048-1000': [4, 16]}``: convs and linears are
  numbered separately in module registration order, and each key repeats the layer's shape. It is mapped
  onto a model by that order, with every shape checked. It is read by a strict parser of exactly that form
  (quoted keys, ``[n, m]`` or ``(n, m)`` int pairs; pretty-printed over several lines is fine); nothing in a
  file is ever evaluated.

A layer with ``n == m`` is dense. Limits, so that a hostile or broken file gives a clear error instead of a
crash or an exhausted machine: a file is at most :data:`MAX_SCHEME_BYTES` (16 MiB; the export metadata of
a model of 10,000 layers is about 3 MB), a YAML file at most :data:`MAX_YAML_BYTES` (1 MiB: PyYAML is pure
Python), nesting is at most :data:`MAX_SCHEME_DEPTH` levels, and a layer name at most
:data:`MAX_LAYER_NAME` characters. Every problem with a file's content is a ``ValueError`` that names the
file, what was found (values echoed in a message are shortened to a few dozen characters) and what is
allowed; a key given twice is an error in every format, never "last one wins".
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
import os
import re
import reprlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from nm_lightning.layers import module_type
from nm_lightning.masks import validate_nm

__all__ = ["NMScheme", "MAX_SCHEME_BYTES", "MAX_YAML_BYTES", "MAX_SCHEME_DEPTH", "MAX_LAYER_NAME", "EXPORT_FORMAT"]

MAX_SCHEME_BYTES = 16 * 1024 * 1024
"""Largest scheme file :meth:`NMScheme.load` reads, in bytes (16 MiB)."""
MAX_SCHEME_DEPTH = 32
"""Deepest nesting of lists/mappings in a JSON or YAML scheme file (the export metadata uses 4)."""
MAX_YAML_BYTES = 1024 * 1024
"""Largest YAML scheme file, in bytes (1 MiB): PyYAML parses about 0.1 MB/s; write larger schemes as JSON."""
MAX_LAYER_NAME = 1024
"""Longest layer name (characters) a scheme may hold."""
EXPORT_FORMAT = "nm_lightning.export"
"""The ``format`` field of the export metadata ``scheme.json`` (version 1)."""

_ALLOWED = (
    "a scheme file is UTF-8 JSON or YAML mapping layer name to [n, m] (or to {n: .., m: ..}), the export "
    f"metadata scheme.json ({EXPORT_FORMAT!r} version 1), or a DominoSearch dict literal"
)
_MAX_INT = 2**31 - 1
_DOMINO_KEY = re.compile(r"^(SparseConv|Linear)(\d+)_(.+)$")

# --------------------------------------------------------------------------- bounded messages
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _clip(text: str, limit: int = 240) -> str:
    """``text`` shortened to about ``limit`` characters (head and tail kept)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...<{len(text):,} characters>...{text[-half:]}"


def _show(value: object) -> str:
    """A repr of ``value`` bounded in length and work (huge strings, containers or cycles included)."""
    try:
        return _clip(_REPR.repr(value))
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the real error
        return f"<{type(value).__name__}>"


def _show_list(items: Iterable[str], limit: int = 10) -> str:
    items = list(items)
    shown = "[" + ", ".join(_show(x) for x in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)]" if len(items) > limit else "]")


class _Error(ValueError):
    """A content error found while parsing: reported as is (no fall-back to another format)."""


# --------------------------------------------------------------------------- the mapping
class NMScheme(Mapping[str, tuple[int, int]]):
    """An immutable mapping from layer name to ``(n, m)``; every entry is validated on construction.

    ``entries`` maps layer names (non-empty strings of at most :data:`MAX_LAYER_NAME` characters) to
    ``(n, m)``, ``[n, m]`` or a mapping with ``"n"`` and ``"m"`` (other keys ignored). Raises ``ValueError``
    naming the entry for anything else (``n``, ``m`` must be ints with ``1 <= n <= m``).
    """

    def __init__(self, entries: Mapping[str, Any] | None = None) -> None:
        if entries is None:
            entries = {}
        if not isinstance(entries, Mapping):
            raise ValueError(
                f"a scheme must be a mapping of layer name to (n, m), got {type(entries).__name__} {_show(entries)}"
            )
        self._entries: dict[str, tuple[int, int]] = {}
        for name, value in entries.items():
            if not isinstance(name, str) or not name:
                hint = " (quote names such as yes/no/on/off/null/1 in YAML)" if not isinstance(name, str) else ""
                raise ValueError(
                    f"scheme layer names must be non-empty strings, got {_show(name)} ({type(name).__name__}){hint}"
                )
            if len(name) > MAX_LAYER_NAME:
                raise ValueError(
                    f"scheme layer name {_show(name)} has {len(name):,} characters; at most {MAX_LAYER_NAME} allowed"
                )
            self._entries[name] = _nm_entry(name, value)

    def __getitem__(self, name: str) -> tuple[int, int]:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"NMScheme({self._entries!r})"

    def to_dict(self) -> dict[str, list[int]]:
        return {k: [n, m] for k, (n, m) in self._entries.items()}

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module | None = None) -> NMScheme:
        """Read a scheme file: JSON, YAML, the export metadata or DominoSearch text, chosen by content.

        The DominoSearch format names layers by position, so it needs ``model`` to map them to names.
        Raises ``ValueError`` naming ``path`` for any problem with the content (see the module docstring for
        the formats and limits); ``OSError`` (e.g. ``FileNotFoundError``) if the file cannot be read.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"a scheme path must be a str or os.PathLike, got {type(path).__name__} {_show(path)}")
        text = _read_text(Path(path))
        try:
            if _DOMINO_START.match(text):
                if model is None:
                    raise ValueError("a DominoSearch scheme names layers by position; pass model=")
                return cls.from_domino(_parse_domino(text), model)
            return cls._from_data(_parse_json_or_yaml(text))
        except RecursionError:  # a safety net: the depth checks above are meant to make this unreachable
            raise ValueError(f"{path}: nested too deeply; {_ALLOWED}") from None
        except ValueError as err:
            raise ValueError(f"{path}: {_clip(str(err), 4000)}") from None

    @classmethod
    def _from_data(cls, data: object) -> NMScheme:
        """A parsed JSON/YAML document -> scheme (plain mapping, or the export metadata's layers)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a scheme must be a mapping of layer name to [n, m], got {type(data).__name__}")
        fmt = data.get("format")
        if not isinstance(fmt, str):
            return cls(data)
        if fmt != EXPORT_FORMAT:
            raise ValueError(f"unknown scheme file format {_show(fmt)}; the only 'format' read is {EXPORT_FORMAT!r}")
        version = data.get("version")
        if isinstance(version, bool) or version != 1:
            raise ValueError(f"{EXPORT_FORMAT} metadata version {_show(version)} is not supported; expected 1")
        layers = data.get("layers")
        if not isinstance(layers, Mapping):
            raise ValueError(
                f"{EXPORT_FORMAT} metadata must have a 'layers' mapping of layer name to {{'n': .., 'm': ..}}, "
                f"got {type(layers).__name__}"
            )
        try:
            return cls(layers)
        except ValueError as err:
            raise ValueError(f"{EXPORT_FORMAT} metadata 'layers': {err}") from None

    def save(self, path: str | Path, model: nn.Module | None = None) -> Path:
        """Write by extension: ``.json``, ``.yaml``/``.yml``, or ``.txt`` (DominoSearch format; needs ``model``).

        The file is written to a temporary sibling and renamed into place, so a reader never sees half a file.
        """
        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        elif path.suffix == ".txt":
            if model is None:
                raise ValueError(f"{path}: the DominoSearch text format names layers by position; pass model=")
            text = repr(self.to_domino(model)) + "\n"
        else:
            raise ValueError(f"unknown scheme file extension {path.suffix!r} for {path}: use .json, .yaml/.yml or .txt")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def to_domino(self, model: nn.Module) -> dict[str, list[int]]:
        """The DominoSearch dict for ``model``: every conv and linear, in order; layers not in the scheme are
        written dense (``[m, m]`` with the scheme's most common ``m``)."""
        ms = [m for _, m in self._entries.values()]
        default_m = max(set(ms), key=ms.count) if ms else 1
        named = _domino_names(model)
        unknown = sorted(set(self._entries) - {name for name, _ in named.values()})
        if unknown:
            raise ValueError(f"the DominoSearch format has only convs and linears; cannot write {_show_list(unknown)}")
        out = {}
        for key, (name, _) in named.items():
            n, m = self._entries.get(name, (default_m, default_m))
            out[key] = [n, m]
        return out

    @classmethod
    def from_domino(cls, data: Mapping[str, Any], model: nn.Module) -> NMScheme:
        """Map a DominoSearch dict onto ``model`` by conv/linear order, checking every shape."""
        named = _domino_names(model)
        by_index = {_DOMINO_KEY.match(k).group(1, 2): (k, v) for k, v in named.items()}  # type: ignore[union-attr]
        entries: dict[str, Any] = {}
        errors = []
        seen = set()
        for key, value in data.items():
            match = _DOMINO_KEY.match(key) if isinstance(key, str) else None
            if match is None:
                errors.append(
                    f"entry {_show(key)} is not a DominoSearch layer key (SparseConv<i>_... or Linear<i>_...)"
                )
                continue
            found = by_index.get(match.group(1, 2))
            if found is None:
                kind = "conv" if match.group(1) == "SparseConv" else "linear"
                errors.append(f"entry {_show(key)}: the model has no {kind} number {_clip(match.group(2), 40)}")
                continue
            model_key, (name, _) = found
            if model_key != key:
                errors.append(f"entry {_show(key)} does not match the model's layer {name!r} ({model_key!r})")
                continue
            seen.add(model_key)
            entries[name] = value
        missing = [f"{k} ({name})" for k, (name, _) in named.items() if k not in seen]
        if missing:
            errors.append(f"the scheme has no entry for {_show_list(missing)}")
        if errors:
            shown = errors[:10] + ([f"... ({len(errors) - 10} more problems)"] if len(errors) > 10 else [])
            raise ValueError("DominoSearch scheme does not fit the model: " + "; ".join(shown))
        return cls(entries)


def _nm_entry(name: str, value: object) -> tuple[int, int]:
    """One entry's ``(n, m)``, validated; messages echo bounded values only."""
    if isinstance(value, Mapping):
        if "n" not in value or "m" not in value:
            keys = _show_list(map(str, value))
            raise ValueError(f"scheme entry {_show(name)} must give 'n' and 'm', got keys {keys}")
        value = (value["n"], value["m"])
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"scheme entry {_show(name)} must be (n, m), got {_show(value)}")
    for label, v in zip("nm", value, strict=True):
        if isinstance(v, bool) or not isinstance(v, int):
            got = f"{_show(v)} ({type(v).__name__})"
            raise ValueError(f"scheme entry {_show(name)}: N:M {label} must be an int, got {got}")
        if not -_MAX_INT <= v <= _MAX_INT:
            raise ValueError(f"scheme entry {_show(name)}: N:M {label}={_show(v)} is out of range")
    try:
        n, m, _ = validate_nm(value[0], value[1])
    except (TypeError, ValueError) as err:
        raise ValueError(f"scheme entry {_show(name)}: {err}") from None
    return n, m


# --------------------------------------------------------------------------- reading and parsing
def _read_text(path: Path) -> str:
    """The file's text: at most :data:`MAX_SCHEME_BYTES`, strict UTF-8 (a leading BOM is dropped)."""
    size = path.stat().st_size
    if size > MAX_SCHEME_BYTES:
        raise ValueError(f"{path}: the file has {size:,} bytes; a scheme file may have at most {MAX_SCHEME_BYTES:,}")
    with path.open("rb") as f:  # read at most the limit: a pipe or device may claim size 0
        data = f.read(MAX_SCHEME_BYTES + 1)
    if len(data) > MAX_SCHEME_BYTES:
        raise ValueError(f"{path}: the file has more than {MAX_SCHEME_BYTES:,} bytes, the limit for a scheme file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} (line {line}) is invalid; "
            f"{_ALLOWED}"
        ) from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; {_ALLOWED}")
    return text


# JSON strings (also unterminated ones, to the end of the text: never fails, so matching is linear)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _json_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside strings, without recursion (linear time)."""
    skeleton = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, skeleton)), default=0)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Error(f"duplicate key {_show(key)}: each key may appear once in a mapping")
        out[key] = value
    return out


def _parse_json_or_yaml(text: str) -> object:
    if _json_depth(text) > MAX_SCHEME_DEPTH:
        json_error = f"nested deeper than {MAX_SCHEME_DEPTH} levels"
    else:
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as err:
            json_error = f"{err.msg}: line {err.lineno}, column {err.colno}"
    size = len(text.encode("utf-8"))
    if size > MAX_YAML_BYTES:
        raise ValueError(
            f"not JSON ({_clip(json_error)}), and with {size:,} bytes too large to be read as YAML "
            f"(at most {MAX_YAML_BYTES:,} bytes; write large schemes as JSON)"
        )
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(
            f"neither JSON ({_clip(json_error)}) nor YAML ({_clip(str(err), 400)}) nor a DominoSearch dict; {_ALLOWED}"
        ) from None


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    """``yaml.SafeLoader`` that bounds the nesting depth and refuses duplicate mapping keys."""
    import yaml

    class SchemeLoader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            # the composer is PyYAML's only recursion: count levels and stop before Python's limit
            self._depth += 1
            try:
                if self._depth > MAX_SCHEME_DEPTH:
                    mark = self.peek_event().start_mark
                    raise _Error(
                        f"nested deeper than {MAX_SCHEME_DEPTH} levels (line {mark.line + 1}, column {mark.column + 1})"
                    )
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # merged keys are overridden by explicit ones by definition: not duplicates
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: SafeLoader reports it
                if duplicate:
                    raise _Error(
                        f"duplicate key {_show(key)} (line {key_node.start_mark.line + 1}): each key may appear once "
                        "in a mapping"
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return SchemeLoader


# DominoSearch text: a dict literal whose first key is a DominoSearch layer key
_DOMINO_START = re.compile(r"""\s*\{\s*['"](?:SparseConv|Linear)\d+_""")
_WS = re.compile(r"\s*")
_KEY = re.compile(r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'" r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"')
_COLON = re.compile(r"\s*:\s*")
_VALUE = re.compile(r"""(?P<open>[\[(])(?P<body>[^\[\](){}'"]*)(?P<close>[\])])\s*""")
_INT = re.compile(r"[+-]?\d{1,12}")
_DOMINO_FORM = "{'<layer key>': [n, m], ...}"


def _parse_domino(text: str) -> dict[str, list[int]]:
    """The DominoSearch dict literal -> ``{key: [n, m]}``: a strict, linear-time parser of exactly that form
    (quoted string keys; ``[n, m]`` or ``(n, m)`` of ints; whitespace and newlines anywhere between tokens)."""

    def fail(pos: int, what: str, found: bool = True) -> ValueError:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        shown = ""
        if found:
            shown = f", found {_show(text[pos : pos + 60])}" if pos < len(text) else ", found the end of the file"
        return _Error(
            f"the text is not a Python dict literal of the DominoSearch form {_DOMINO_FORM}: at line {line}, "
            f"column {col}: {what}{shown}"
        )

    pos = _WS.match(text).end() + 1  # after "{" (checked by _DOMINO_START)
    pos = _WS.match(text, pos).end()
    entries: dict[str, list[int]] = {}
    while not text.startswith("}", pos):
        key_match = _KEY.match(text, pos)
        if key_match is None:
            raise fail(pos, "expected a quoted layer key")
        key = key_match.group()[1:-1]
        if "\\" in key:  # escapes: let Python decode the one string literal (nothing else is ever evaluated)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an invalid escape only warns; the key then matches no layer
                    key = ast.literal_eval(key_match.group())
            except (ValueError, SyntaxError) as err:
                raise fail(pos, f"the key is not a valid string literal ({_clip(str(err), 80)})") from None
        if key in entries:
            raise fail(pos, f"duplicate key {_show(key)}: each key may appear once", found=False)
        colon = _COLON.match(text, key_match.end())
        if colon is None:
            raise fail(key_match.end(), f"expected ':' after the key {_show(key)}")
        value = _VALUE.match(text, colon.end())
        if value is None:
            raise fail(colon.end(), f"expected [n, m] after the key {_show(key)}")
        if value["open"] + value["close"] not in ("[]", "()"):
            raise fail(value.start(), f"mismatched brackets in the value of {_show(key)}")
        items = [s.strip() for s in value["body"].split(",")]
        if len(items) > 1 and not items[-1]:
            items.pop()  # a trailing comma, as in (2, 4,)
        for item in items:
            if not _INT.fullmatch(item):
                what = f"the value of {_show(key)}: n and m must be ints of at most 12 digits, got {_show(item)}"
                raise fail(value.start("body"), what, found=False)
        entries[key] = [int(item) for item in items]
        pos = value.end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif not text.startswith("}", pos):
            raise fail(pos, "expected ',' or '}' after an entry")
    pos = _WS.match(text, pos + 1).end()
    if pos != len(text):
        raise fail(pos, "unexpected text after the closing '}'")
    return entries


def _domino_names(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """DominoSearch key -> (our layer name, module), convs and linears counted separately in module order."""
    out: dict[str, tuple[str, nn.Module]] = {}
    convs = linears = 0
    for name, module in model.named_modules():
        cls = module_type(module)
        if issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            key = f"SparseConv{convs}_{module.in_channels}-{module.out_channels}-{tuple(module.kernel_size)}"
            convs += 1
        elif issubclass(cls, nn.Linear):
            key = f"Linear{linears}_{module.in_features}-{module.out_features}"
            linears += 1
        else:
            continue
        out[key] = (name, module)
    return out
