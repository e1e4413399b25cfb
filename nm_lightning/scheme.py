"""Per-layer N:M schemes: a mapping ``layer name -> (n, m)`` in JSON, YAML or the DominoSearch text format.

The DominoSearch format is one Python dict literal on the first line,
``{'SparseConv0_3-64-(7, 7)': [16, 16], ..., 'Linear0_2048-1000': [4, 16]}``: convs and linears are
numbered separately in module registration order, and each key repeats the layer's shape. It is read
with :func:`ast.literal_eval` (never ``eval``) and mapped onto a model by that order, with every shape
checked.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from nm_lightning.masks import validate_nm

_DOMINO_KEY = re.compile(r"^(SparseConv|Linear)(\d+)_(.+)$")

__all__ = ["NMScheme"]


class NMScheme(Mapping[str, tuple[int, int]]):
    """An immutable mapping from layer name to ``(n, m)``; every entry is validated on construction."""

    def __init__(self, entries: Mapping[str, Any] | None = None) -> None:
        self._entries: dict[str, tuple[int, int]] = {}
        for name, value in (entries or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"scheme layer names must be non-empty strings, got {name!r}")
            if isinstance(value, Mapping):
                value = (value.get("n"), value.get("m"))
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"scheme entry {name!r} must be (n, m), got {value!r}")
            try:
                n, m, _ = validate_nm(value[0], value[1])
            except (TypeError, ValueError) as err:
                raise ValueError(f"scheme entry {name!r}: {err}") from None
            self._entries[name] = (n, m)

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
    def load(cls, path: str | Path, model: nn.Module | None = None) -> NMScheme:
        """Read a scheme file; JSON, YAML or DominoSearch text, chosen by content.

        The DominoSearch format names layers by position, so it needs ``model`` to map them to names.
        """
        text = Path(path).read_text(encoding="utf-8")
        first = text.strip().splitlines()[0] if text.strip() else ""
        try:
            if first.startswith("{") and "'" in first and _DOMINO_KEY.match(next(iter(_literal(first)), "")):
                if model is None:
                    raise ValueError(f"{path}: a DominoSearch scheme names layers by position; pass model=")
                return cls.from_domino(_literal(first), model)
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                import yaml

                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as err:
                    raise ValueError(f"neither JSON, YAML nor a DominoSearch dict: {err}") from None
            if not isinstance(data, Mapping):
                raise ValueError(f"a scheme must be a mapping of layer name to [n, m], got {type(data).__name__}")
            return cls(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | Path, model: nn.Module | None = None) -> Path:
        """Write by extension: ``.json``, ``.yaml``/``.yml``, or ``.txt`` (DominoSearch format; needs ``model``)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None), encoding="utf-8")
        elif path.suffix == ".txt":
            if model is None:
                raise ValueError(f"{path}: the DominoSearch text format names layers by position; pass model=")
            path.write_text(repr(self.to_domino(model)) + "\n", encoding="utf-8")
        else:
            raise ValueError(f"unknown scheme file extension {path.suffix!r} for {path}: use .json, .yaml/.yml or .txt")
        return path

    def to_domino(self, model: nn.Module) -> dict[str, list[int]]:
        """The DominoSearch dict for ``model``: every conv and linear, in order; layers not in the scheme are
        written dense (``[m, m]`` with the scheme's most common ``m``)."""
        ms = [m for _, m in self._entries.values()]
        default_m = max(set(ms), key=ms.count) if ms else 1
        named = _domino_names(model)
        unknown = sorted(set(self._entries) - {name for name, _ in named.values()})
        if unknown:
            raise ValueError(f"the DominoSearch format has only convs and linears; cannot write {unknown}")
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
                errors.append(f"entry {key!r} is not a DominoSearch layer key (SparseConv<i>_... or Linear<i>_...)")
                continue
            found = by_index.get(match.group(1, 2))
            if found is None:
                kind = "conv" if match.group(1) == "SparseConv" else "linear"
                errors.append(f"entry {key!r}: the model has no {kind} number {match.group(2)}")
                continue
            model_key, (name, _) = found
            if model_key != key:
                errors.append(f"entry {key!r} does not match the model's layer {name!r} ({model_key!r})")
                continue
            seen.add(model_key)
            entries[name] = value
        missing = [f"{k} ({name})" for k, (name, _) in named.items() if k not in seen]
        if missing:
            errors.append(f"the scheme has no entry for {missing}")
        if errors:
            raise ValueError("DominoSearch scheme does not fit the model: " + "; ".join(errors))
        return cls(entries)


def _literal(line: str) -> dict[str, Any]:
    try:
        value = ast.literal_eval(line)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"the first line is not a Python dict literal: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the first line is a {type(value).__name__}, not a dict")
    return value


def _domino_names(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """DominoSearch key -> (our layer name, module), convs and linears counted separately in module order."""
    out: dict[str, tuple[str, nn.Module]] = {}
    convs = linears = 0
    for name, module in model.named_modules():
        cls = parametrize.type_before_parametrizations(module)
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
