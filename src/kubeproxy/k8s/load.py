"""Reading manifests: YAML (multi-document) or JSON files, single objects or Lists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from kubeproxy.errors import ManifestError


def load_manifests(paths: Iterable[Path]) -> list[Mapping[str, Any]]:
    objects: list[Mapping[str, Any]] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError as err:
            raise ManifestError(f"{path}: {err.strerror or err}") from err
        objects.extend(parse_manifest_text(text, str(path)))
    return objects


def parse_manifest_text(text: str, source: str = "<input>") -> list[Mapping[str, Any]]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise ManifestError(f"{source}: not valid YAML or JSON: {err}") from err
    return list(_flatten(docs))


def _flatten(docs: Iterable[object]) -> Iterator[Mapping[str, Any]]:
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue  # empty documents between '---'
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
            yield from _flatten(doc["items"])
        else:
            yield doc
