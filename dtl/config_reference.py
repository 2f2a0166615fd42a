"""Every config key with its type, default and description, read from the schema (`dtl config`)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from dtl.run_config import Config


def _type_name(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _optional_submodel(annotation: Any) -> type[BaseModel] | None:
    """The model M of an `Optional[M]` field."""
    args = getattr(annotation, "__args__", ())
    if type(None) not in args:
        return None
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 and _submodel(rest[0]) is not None else None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf of the schema, in schema order."""
    rows = []
    for name, f in model.model_fields.items():
        key = prefix + name
        sub = _submodel(f.annotation)
        if sub is not None:
            rows += config_keys(sub, key + ".")
            continue
        optional = _optional_submodel(f.annotation)
        if optional is not None:  # a block that is off unless given: the block, then its keys
            rows.append((key, f"{optional.__name__} or None", "None", f.description or ""))
            rows += config_keys(optional, key + ".")
            continue
        if f.default is PydanticUndefined and f.default_factory is None:
            default = "(required)"
        else:
            value = f.default_factory() if f.default_factory is not None else f.default
            if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                value = [v.model_dump(exclude_defaults=True) for v in value]
            default = repr(value)
        rows.append((key, _type_name(f.annotation), default, f.description or ""))
    return rows


def format_reference() -> str:
    rows = config_keys()
    width = max(len(r[0]) for r in rows)
    lines = ["# every key of a dtl config (override any with KEY=VALUE): key, default, description [type]", ""]
    for key, kind, default, desc in rows:
        lines.append(f"{key:<{width}}  {default:<14} {desc}  [{kind}]")
    return "\n".join(lines)
