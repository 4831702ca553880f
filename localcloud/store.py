"""A small persistent resource store: one JSON document per resource, grouped by kind.

localcloud keeps every resource here so that state survives a restart of the process, as
it does in the cloud. Writes go to a temporary file and are renamed into place, so a
crash never leaves a half-written resource.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from pathlib import Path
from typing import Any


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self._cache: dict[str, dict[str, dict[str, Any]]] = {}

    def _dir(self, kind: str) -> Path:
        return self.root / kind

    def _load(self, kind: str) -> dict[str, dict[str, Any]]:
        if kind not in self._cache:
            items: dict[str, dict[str, Any]] = {}
            directory = self._dir(kind)
            if directory.is_dir():
                for path in sorted(directory.glob("*.json")):
                    name = urllib.parse.unquote(path.stem)
                    items[name] = json.loads(path.read_text())
            self._cache[kind] = items
        return self._cache[kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            item = self._load(kind).get(name)
            return json.loads(json.dumps(item)) if item is not None else None

    def put(self, kind: str, name: str, value: dict[str, Any]) -> None:
        with self.lock:
            directory = self._dir(kind)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / (urllib.parse.quote(name, safe="") + ".json")
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
            os.replace(tmp, path)
            self._load(kind)[name] = json.loads(json.dumps(value))

    def delete(self, kind: str, name: str) -> bool:
        with self.lock:
            items = self._load(kind)
            if name not in items:
                return False
            del items[name]
            path = self._dir(kind) / (urllib.parse.quote(name, safe="") + ".json")
            path.unlink(missing_ok=True)
            return True

    def list(self, kind: str, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return [
                (name, json.loads(json.dumps(value)))
                for name, value in sorted(self._load(kind).items())
                if name.startswith(prefix)
            ]
