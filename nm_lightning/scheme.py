"""Per-layer N:M schemes: a mapping ``layer name -> (n, m)``, read from and written to JSON or YAML."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nm_lightning.masks import validate_nm

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
    def load(cls, path: str | Path) -> NMScheme:
        """Read a JSON or YAML scheme file (``{"layer": [n, m], ...}``); the format is chosen by content."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: neither JSON nor YAML: {err}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a scheme must be a mapping of layer name to [n, m], got {type(data).__name__}")
        try:
            return cls(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None), encoding="utf-8")
        else:
            raise ValueError(f"unknown scheme file extension {path.suffix!r} for {path}: use .json, .yaml or .yml")
        return path
