"""Structural-schema handling for custom resources, as the apiextensions server does it:
defaults applied, unknown fields pruned (or reported, with fieldValidation=Strict), then
validation (type, enum, bounds, lengths, pattern, required, items) and CEL rules.

CEL (`x-kubernetes-validations`) runs through the pure-Python `cel-python` package (celpy) when it
is installed. Rules that use Kubernetes' own CEL extension functions (isURL, quantity, ...), which
celpy lacks, are skipped rather than rejected.
"""
from __future__ import annotations

import copy
import logging
import re

log = logging.getLogger(__name__)

try:  # optional: the rules are skipped without it
    import celpy
    _CEL_ENV = celpy.Environment()
except Exception:  # pragma: no cover - depends on the environment
    celpy = None
    _CEL_ENV = None

_cel_cache: dict[str, object] = {}

TYPE_NAMES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _json_type_ok(kind: str, value) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    py = TYPE_NAMES.get(kind)
    return py is None or isinstance(value, py)


def _jtype(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _fmt(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class SchemaResult:
    def __init__(self):
        self.errors: list[tuple[str, str]] = []  # (field path, message)
        self.unknown: list[str] = []  # pruned field paths


def apply_defaults(schema: dict, value):
    """Fill `default`s of missing properties, recursively (defaults of defaults included)."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict):
            for k in list(value):
                if k not in (schema.get("properties") or {}):
                    value[k] = apply_defaults(addl, value[k])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def prune(schema: dict, value, path: str, result: SchemaResult, root: bool = False):
    """Drop fields the schema does not declare, unless x-kubernetes-preserve-unknown-fields."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
            return value
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        embedded = schema.get("x-kubernetes-embedded-resource")
        for k in list(value):
            sub_path = f"{path}.{k}" if path else k
            if root and k in ("apiVersion", "kind", "metadata"):
                continue
            if embedded and k in ("apiVersion", "kind", "metadata"):
                continue
            if k in props:
                value[k] = prune(props[k], value[k], sub_path, result)
            elif isinstance(addl, dict):
                value[k] = prune(addl, value[k], sub_path, result)
            elif addl is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                result.unknown.append(sub_path)
                del value[k]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], v, f"{path}[{i}]", result) for i, v in enumerate(value)]
    return value


def validate(schema: dict, value, path: str, result: SchemaResult, old=None, root: bool = False) -> None:
    if not isinstance(schema, dict) or not schema:
        return
    err = result.errors.append
    if value is None:
        if not schema.get("nullable"):
            err((path, f'Invalid value: "null": {path} in body must be of type {schema.get("type", "object")}: "null"'))
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            err((path, f"Invalid value: {_fmt(value)}: {path} in body must be of type integer-or-string"))
            return
    elif "type" in schema and not _json_type_ok(schema["type"], value):
        err((path, f'Invalid value: "{_jtype(value)}": {path} in body must be of type {schema["type"]}: '
                   f'"{_jtype(value)}"'))
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_fmt(v) for v in schema["enum"])
        err((path, f"Unsupported value: {_fmt(value)}: supported values: {allowed}"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            lo, excl = schema["minimum"], schema.get("exclusiveMinimum") is True
            if value < lo or (excl and value == lo):
                op = "greater than" if excl else "greater than or equal to"
                err((path, f"Invalid value: {value}: {path} in body should be {op} {lo}"))
        if "maximum" in schema:
            hi, excl = schema["maximum"], schema.get("exclusiveMaximum") is True
            if value > hi or (excl and value == hi):
                op = "less than" if excl else "less than or equal to"
                err((path, f"Invalid value: {value}: {path} in body should be {op} {hi}"))
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            err((path, f'Invalid value: "{value}": {path} in body should be at least {schema["minLength"]} chars long'))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            err((path, f"Too long: may not be more than {schema['maxLength']} bytes"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            err((path, f'Invalid value: "{value}": {path} in body should match \'{schema["pattern"]}\''))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            err((path, f"Invalid value: {len(value)}: {path} in body should have at least {schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            err((path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
        items = schema.get("items")
        if isinstance(items, dict):
            for i, v in enumerate(value):
                validate(items, v, f"{path}[{i}]", result)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                sub = f"{path}.{name}" if path else name
                err((sub, "Required value"))
        for k, v in value.items():
            if root and k == "metadata":
                continue
            sub = f"{path}.{k}" if path else k
            old_v = old.get(k) if isinstance(old, dict) else None
            if k in props:
                validate(props[k], v, sub, result, old_v)
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(schema["additionalProperties"], v, sub, result, old_v)
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            err((path, f"Invalid value: {len(value)}: {path} in body should have at least "
                       f"{schema['minProperties']} properties"))
    for sub_schema in schema.get("allOf") or []:
        validate(sub_schema, value, path, result, old)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options:
            matches = 0
            for sub_schema in options:
                probe = SchemaResult()
                validate(sub_schema, value, path, probe, old)
                matches += not probe.errors
            if matches == 0 or (key == "oneOf" and matches > 1):
                err((path, f"Invalid value: {_fmt(value) if not isinstance(value, (dict, list)) else 'object'}: "
                           f"{path} in body must match {'exactly one' if key == 'oneOf' else 'at least one'} schema"))
    _run_cel(schema, value, path, result, old)


def _run_cel(schema, value, path, result, old) -> None:
    rules = schema.get("x-kubernetes-validations")
    if not rules or _CEL_ENV is None:
        return
    for rule in rules:
        text = rule.get("rule", "")
        uses_old = "oldSelf" in text
        if uses_old and old is None:
            continue  # transition rules only run on updates of an existing value
        try:
            program = _cel_cache.get(text)
            if program is None:
                program = _CEL_ENV.program(_CEL_ENV.compile(text))
                _cel_cache[text] = program
            activation = {"self": celpy.json_to_cel(value)}
            if uses_old:
                activation["oldSelf"] = celpy.json_to_cel(old)
            outcome = program.evaluate(activation)
        except Exception as exc:  # compile error or unsupported function: skip, like a missing library
            log.debug("CEL rule %r skipped: %s", text, exc)
            continue
        if isinstance(outcome, celpy.CELEvalError):
            if "undeclared reference" in str(outcome):
                log.debug("CEL rule %r skipped (unsupported function): %s", text, outcome)
                continue
            result.errors.append((path, f"Invalid value: {rule.get('message') or text}: evaluation error: "
                                        f"{outcome.args[0] if outcome.args else outcome}"))
        elif not bool(outcome):
            message = rule.get("message") or f"failed rule: {text}"
            field = rule.get("fieldPath")
            where = f"{path}{field}" if field else path
            reason = rule.get("reason", "FieldValueInvalid")
            if reason == "FieldValueForbidden":
                result.errors.append((where, f"Forbidden: {message}"))
            elif reason == "FieldValueRequired":
                result.errors.append((where, f"Required value: {message}"))
            else:
                result.errors.append((where, f"Invalid value: \"object\": {message}"))


def process(schema: dict, obj: dict, old: dict | None = None) -> SchemaResult:
    """Default, prune and validate a custom object in place (the whole object, metadata excluded)."""
    result = SchemaResult()
    if not schema:
        return result
    apply_defaults(schema, obj)
    prune(schema, obj, "", result, root=True)
    validate(schema, obj, "", result, old, root=True)
    return result
