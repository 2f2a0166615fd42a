"""Bench results without this machine's paths: the JSONs under bench/results/ are committed, so the
commands they record name the repository's files relative to its root and the interpreter as
`python`, and read the same on any clone."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _root_pattern(root: str) -> re.Pattern:
    """A whole path that starts at `root` (not a suffix of a longer path, not a longer name)."""
    return re.compile(r"(?<![\w./:-])" + re.escape(root.rstrip("/")) + r"(?=/|$|[\s\"'=,;)\]])(/?)")


def portable(obj: Any, root: Path = REPO) -> Any:
    """`obj` with the interpreter's path -> `python` and paths under the repository -> relative ones
    (the root itself -> `.`), in every string it holds; other absolute paths stay as they are."""
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, root) for v in obj]
    if not isinstance(obj, str):
        return obj
    if sys.executable:
        obj = re.sub(r"(?<![\w./-])" + re.escape(sys.executable) + r"(?![\w./-])", "python", obj)
    if str(root) != "/":
        obj = _root_pattern(str(root)).sub(lambda m: "" if m.group(1) else ".", obj)
    return obj


def portable_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps of `portable(obj)`."""
    return json.dumps(portable(obj), **kwargs)
