"""The VMMs' own API specifications ($NTNG_SPECS, see tests/thirdparty.py: Firecracker's Swagger 2.0, Cloud
Hypervisor's OpenAPI 3.0) as strict JSON Schema validators.

Shared by the contract tests of nixlib's plans (tests/nix/test_nixlib_vmm_specs.py) and by the
fake VMMs in this folder, which answer every request body that does not validate with the
error the VMM documents.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from jsonschema import Draft4Validator

Json = Any


class SpecError(AssertionError):
    """A request the spec has no place for (an assertion to the contract tests)."""


class Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only).  PyYAML implements YAML 1.1, where an
    unquoted Off is false: Firecracker's Logger.level enum `[Error, Warning, Info, Debug, Trace,
    Off]` would otherwise hold the boolean False instead of the string "Off"."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

# Integer formats of OpenAPI/Swagger (and the Rust types behind them) as JSON Schema bounds.
INT_FORMATS = {
    f"{sign}int{bits}": (0, 2**bits - 1) if sign else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    for sign in ("", "u") for bits in (8, 16, 32, 64)
}


def adapt(schema: Json) -> Json:
    """One OpenAPI 3.0 / Swagger 2.0 schema object as strict JSON Schema draft 4.

    - `nullable: true` (OpenAPI 3.0; draft 4 has no such keyword) becomes a "null" alternative.
    - An integer `format` (int8 ... uint64) becomes minimum/maximum: in JSON Schema a format is
      only an annotation, and a value that overflows the VMM's integer must fail here.
    - An object schema that declares `properties` and says nothing of `additionalProperties` gets
      `additionalProperties: false`.  Firecracker rejects unknown fields (serde
      deny_unknown_fields) while Cloud Hypervisor's VmConfig silently ignores them, so either way
      a key the spec does not declare (a typo) is a bug in our bodies.  An explicit
      `additionalProperties` (Firecracker's Metrics.properties map) is kept.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: adapt(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = adapt(out["additionalProperties"])
    if "items" in out:
        out["items"] = adapt(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [adapt(s) for s in out[key]]
    if "not" in out:
        out["not"] = adapt(out["not"])
    if out.get("type") == "integer" and out.get("format") in INT_FORMATS:
        lo, hi = INT_FORMATS[out["format"]]
        out["minimum"] = max(lo, out.get("minimum", lo))
        out["maximum"] = min(hi, out.get("maximum", hi))
    if out.pop("nullable", False):
        if "$ref" in out:  # draft 4 ignores siblings of $ref
            return {"anyOf": [out, {"type": "null"}]}
        if "type" in out:
            t = out["type"]
            out["type"] = [t, "null"] if isinstance(t, str) else [*t, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


class Api:
    """One VMM's API specification: its schemas (adapted, see `adapt`) and request bodies."""

    def __init__(self, path: Path) -> None:
        self.doc: dict[str, Any] = yaml.load(path.read_text(), Loader=Yaml12Loader)  # a SafeLoader
        if "swagger" in self.doc:  # Swagger 2.0 (Firecracker)
            self.prefix = "#/definitions/"
            schemas = self.doc["definitions"]
            self.container: dict[str, Any] = {"definitions": {k: adapt(v) for k, v in schemas.items()}}
            self.base = self.doc.get("basePath", "/").rstrip("/")
        else:  # OpenAPI 3 (Cloud Hypervisor)
            self.prefix = "#/components/schemas/"
            schemas = self.doc["components"]["schemas"]
            self.container = {"components": {"schemas": {k: adapt(v) for k, v in schemas.items()}}}
            self.base = urlparse(self.doc["servers"][0]["url"]).path.rstrip("/")
        self.schemas: dict[str, Any] = {k: adapt(v) for k, v in schemas.items()}

    def validator(self, schema: Json) -> Draft4Validator:
        """A validator for `schema` (typically {"$ref": "#/definitions/X"}): the spec's adapted
        schemas are embedded beside it, so its "#/..." references resolve in the same document."""
        return Draft4Validator({**self.container, **adapt(schema)})

    def named(self, name: str) -> Draft4Validator:
        if name not in self.schemas:
            raise SpecError(f"{name} is not a schema of the spec")
        return self.validator({"$ref": self.prefix + name})

    def resolve(self, schema: Json) -> Json:
        while "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith(self.prefix):
                raise SpecError(ref)
            schema = self.schemas[ref[len(self.prefix):]]
        return schema

    def find(self, path: str, method: str) -> tuple[str, dict[str, str], dict[str, Any]] | None:
        """(path template, path parameters, operation object) of a request, or None."""
        if not path.startswith(self.base + "/"):
            return None
        rel = path[len(self.base):]
        for template, ops in self.doc["paths"].items():
            parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, ...
            rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
            m = re.fullmatch(rx, rel)
            if m and method.lower() in ops:
                return template, m.groupdict(), ops[method.lower()]
        return None

    def operation(self, path: str, method: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        if not path.startswith(self.base + "/"):
            raise SpecError(f"{path} is not under the API's base {self.base!r}")
        found = self.find(path, method)
        if found is None:
            raise SpecError(f"{method} {path}: no such operation in the spec")
        return found

    def body_schema(self, op: dict[str, Any]) -> tuple[Json | None, bool]:
        """(schema, required) of an operation's request body; (None, False) if it takes none."""
        if "requestBody" in op:  # OpenAPI 3
            rb = op["requestBody"]
            return rb["content"]["application/json"]["schema"], bool(rb.get("required"))
        for p in op.get("parameters", []):  # Swagger 2: the one `in: body` parameter
            if p.get("in") == "body":
                return p["schema"], bool(p.get("required"))
        return None, False

    def body_errors(self, method: str, path: str, body: Json, has_body: bool) -> list[str]:
        """Why the spec rejects this request's body (empty: it is fine).  The operation must
        exist (see `find`); a path parameter the body repeats must agree with the path."""
        _template, params, op = self.operation(path, method)
        schema, required = self.body_schema(op)
        if schema is None:
            return [f"{method} {path} takes no body"] if has_body else []
        if not has_body:
            return [f"{method} {path} needs a body"] if required else []
        errors = describe(self.validator(schema), body)
        if not errors and isinstance(body, dict):
            errors = [f"{name}: {body[name]!r} differs from the path's {value!r}"
                      for name, value in params.items() if name in body and body[name] != value]
        return errors

    def check_call(self, call: dict[str, Any]) -> str:
        """Validate one planned API call; return its path template."""
        if not set(call) <= {"method", "path", "body"}:
            raise SpecError(call)
        template = self.operation(call["path"], call["method"])[0]
        errors = self.body_errors(call["method"], call["path"], call.get("body"), "body" in call)
        if errors:
            raise SpecError(f"{call['method']} {call['path']}: " + "; ".join(errors))
        return template


def describe(validator: Draft4Validator, instance: Json) -> list[str]:
    """The validation errors, one line each, path first."""
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors]
