"""Where a configuration comes from: settings a manifest or checkpoint recorded, a TOML or YAML
file, then ``--set section.field=value`` overrides, validated once (``load_config``), with errors
that name the field and its allowed range."""


from __future__ import annotations

import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from wds_ocr.errors import ConfigError

from wds_ocr.config.sections import Config


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        kind = "TOML"
    elif suffix in (".yaml", ".yml"):
        kind = "YAML"
    else:
        raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = tomllib.loads(text) if kind == "TOML" else yaml.load(text, Loader=_StrictYamlLoader)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if data is None:  # an empty (or all-comment) YAML file
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping at the top level")
    return data


def _field_annotation(parts: list[str]) -> Any:
    """Annotation of the Config field at ``parts``, or None where no such field exists."""
    model: Any = Config
    annotation: Any = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation
    return annotation


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_text(annotation: Any) -> bool:
    """str, a Literal of strings, or either of them or None."""
    members = [m for m in _union_members(annotation) if m is not type(None)]
    if not members:
        return False
    for member in members:
        if member is str:
            continue
        if typing.get_origin(member) is Literal and all(isinstance(v, str) for v in typing.get_args(member)):
            continue
        return False
    return True


def _is_text_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (tuple, list) and all(a is str or a is Ellipsis for a in typing.get_args(annotation))


def _parse_override_value(raw: str, annotation: Any) -> Any:
    text = raw.strip()
    if annotation is not None and _is_text(annotation):
        if text in ("null", "~") and type(None) in _union_members(annotation):
            return None
        return text
    if annotation is not None and _is_text_list(annotation):
        if text.startswith("[") and text.endswith("]"):
            try:
                items = yaml.safe_load(text)
            except yaml.YAMLError:
                items = text[1:-1].split(",")
        else:
            items = text.split(",")
        if not isinstance(items, list):
            return items
        stripped = [item.strip() if isinstance(item, str) else item for item in items]
        return [item for item in stripped if item != ""]
    if not text:
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    parts = [p.strip() for p in dotted.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r}: name a section and a field, e.g. transform.size=512")
    for depth in range(1, len(parts)):
        annotation = _field_annotation(parts[:depth])
        if annotation is not None and not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth])} is a setting, not a section")
    value = _parse_override_value(raw, _field_annotation(parts))
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _section_of(loc: tuple[Any, ...]) -> Any:
    """The model that holds the field at ``loc`` (Config itself for a 1-part loc), or None."""
    model: Any = Config
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return None
        model = fields[part].annotation
    return model


def _known_names(loc: tuple[Any, ...]) -> list[str]:
    return sorted(getattr(_section_of(loc), "model_fields", {}))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_NUMBER_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"})


def _allowed_range(loc: tuple[Any, ...]) -> str | None:
    """The whole numeric rule of the field at ``loc``, e.g. ``32 <= size <= 4096, a multiple of 32``."""
    fields = getattr(_section_of(loc), "model_fields", {})
    if not loc or loc[-1] not in fields:
        return None
    name = str(loc[-1])
    low = high = step = None
    for rule in fields[loc[-1]].metadata:
        if getattr(rule, "ge", None) is not None:
            low = f"{_number(rule.ge)} <= "
        elif getattr(rule, "gt", None) is not None:
            low = f"{_number(rule.gt)} < "
        elif getattr(rule, "le", None) is not None:
            high = f" <= {_number(rule.le)}"
        elif getattr(rule, "lt", None) is not None:
            high = f" < {_number(rule.lt)}"
        elif getattr(rule, "multiple_of", None) is not None:
            step = f", a multiple of {_number(rule.multiple_of)}"
    if low is None and high is None and step is None:
        return None
    return f"{low or ''}{name}{high or ''}{step or ''}"


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted field, what is allowed, and the value given."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        given = err.get("input")
        message = err["msg"]
        if err["type"] == "out_of_order":  # a cross-field check: name the field it is about
            loc = (*loc, ctx["field"])
            given = ctx["value"]
        elif err["type"] == "extra_forbidden":
            kind = "section" if len(loc) == 1 else "setting"
            message = f"unknown {kind}; known: {', '.join(_known_names(loc))}"
            given = None if isinstance(given, dict) else given
        where = ".".join(str(p) for p in loc) or "config"
        shown = "" if given is None or isinstance(given, dict) else f" (got {given!r})"
        allowed = _allowed_range(loc) if err["type"] in _NUMBER_ERRORS else None
        lines.append(f"{where}: {message}{shown}" + (f"; allowed: {allowed}" if allowed else ""))
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for name, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _merge(into[name], value)
        else:
            into[name] = value
    return into


def load_config(
    path: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Validate ``base`` (settings a manifest or checkpoint recorded), then an optional TOML/YAML
    file on top of it, then ``section.field=value`` overrides."""
    data: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        _merge(data, _read_file(Path(path)))
    for override in overrides:
        _apply_override(data, override)
    return build_config(data)
