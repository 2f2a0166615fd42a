"""Bench results without this machine's paths: the JSONs under bench/results/ are committed, so the
commands they record name the repository's files relative to its root and the interpreter as
`python`, and read the same on any clone."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def portable(obj: Any, roots: tuple[str, ...] = ()) -> Any:
    """`obj` with the interpreter's path -> `python` and paths under the repository (or `roots`,
    e.g. the clone a bench ran from) -> relative ones, in every string it holds."""
    if isinstance(obj, dict):
        return {k: portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, roots) for v in obj]
    if not isinstance(obj, str):
        return obj
    obj = obj.replace(sys.executable, "python")
    for root in (*roots, str(REPO), str(Path.cwd())):
        obj = obj.replace(root.rstrip("/") + "/", "")
    return obj


def portable_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps of `portable(obj)`."""
    return json.dumps(portable(obj), **kwargs)
