"""The one name for a decoded JSON object (a Kubernetes object, an API body, lab state).

Deliberately loose: the code that reads such a dict validates the fields it uses (k8s/,
lab/manifest.py); this alias only says "a JSON object, as json.loads returns it".
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]
