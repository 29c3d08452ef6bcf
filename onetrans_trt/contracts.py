"""JSON contracts: what comes in as JSON, declared once as pydantic models.

A model checks types, ranges, required and unknown keys and gives the JSON Schema that
``onetrans-trt schema NAME`` prints (``SCHEMAS``); :func:`refused` turns pydantic's first
error into our own one-line error naming the field (``request.candidates[2]: expected an object``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pydantic is imported where a model is (the CLI reads SCHEMAS without it)
    from pydantic import ValidationError

# the wording by pydantic's error type; any other type says pydantic's own words, "Input
# should be greater than 0" as "expected greater than 0, got 0"
SAY = {"missing": "missing", "model_type": "expected an object", "dict_type": "expected an object",
       "list_type": "expected a list", "string_type": "expected a string, got {type}",
       "float_type": "expected a finite number, got {value}", "finite_number": "expected a finite number, got {value}",
       "extra_forbidden": "unknown keys {keys}", "value_error": "{error}",
       "string_pattern_mismatch": "expected {pattern}, got {input}",
       "too_short": "expected at least {min_length} item(s), got {input}"}
SHA256, ONNX_NAME = r"^[0-9a-f]{64}$", r"^[^./\\][^/\\]*\.onnx$"  # patterns, and how they are said:
PATTERNS = {SHA256: "a sha256 (64 lowercase hex digits)", ONNX_NAME: "a plain .onnx file name in the build directory"}
SCHEMAS = {"request": "onetrans_trt.data.requests:RequestJSON", "limits": "onetrans_trt.data.requests:RequestLimits",
           "policy": "onetrans_trt.validate.policy:Policy", "manifest": "onetrans_trt.manifest:Manifest",
           "config": "onetrans_trt.models.config:ConfigJSON"}


def _show(v: Any, n: int = 80) -> str:
    try:
        return repr(v)[:n] if n == 80 else repr(str(v)[:n])
    except ValueError:  # an integer of thousands of digits
        return "an integer of thousands of digits"


def one_line(e: ValidationError, data: Any, root: str, say: dict[str, str] | None = None) -> str:
    """``e``'s first error as ``<root><path>: <what>``, the path walked through ``data`` (a
    union member's tag, ``str`` or ``int``, is no place in it); ``say`` rewords by
    ``"<path>:<type>"``, ``"<type>"`` or ``"*"`` (a wording with ``{where}`` places the path itself)."""
    errs = e.errors(include_url=False)
    err, kind, say = errs[0], errs[0]["type"], say or {}
    loc = err["loc"][:-1] if kind == "extra_forbidden" else err["loc"]  # unknown keys: said of their object
    where, node = root, data
    for i, p in enumerate(loc):
        if isinstance(node, dict) and p in node or isinstance(node, list) and isinstance(p, int) and p < len(node):
            node, where = node[p], where + (f"[{p}]" if isinstance(p, int) else f".{p}")
        elif kind == "missing" and i == len(loc) - 1:
            where += f".{p}"
        if node is err["input"] and kind != "missing":
            break
    where = where.lstrip(".")
    text = say.get(f"{where}:{kind}") or say.get(kind) or say.get("*") or SAY.get(kind) or \
        err["msg"].replace("Input should be", "expected", 1) + ", got {input}"
    keys = sorted(str(x["loc"][-1]) for x in errs if x["type"] == "extra_forbidden" and x["loc"][:-1] == loc)
    ctx = {k: PATTERNS.get(v, f"a string matching {v}") if k == "pattern" else v for k, v in err.get("ctx", {}).items()}
    line = text.format(**ctx, where=where, keys=keys,
                       type=type(err["input"]).__name__, input=_show(err["input"]), value=_show(err["input"], 40),
                       key=err["loc"][-1] if err["loc"] else None)
    return line if "{where}" in text or not where else f"{where}: {line}"


@contextlib.contextmanager
def refused(error: type[Exception], data: Any, root: str, say: dict[str, str] | None = None,
            prefix: str = "", suffix: str = "") -> Iterator[None]:
    """A validation in the block that fails raises ``error(prefix + one_line(...) + suffix)``."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as e:
        raise error(prefix + one_line(e, data, root, say) + suffix) from None


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``SCHEMAS[name]`` (a key that may be left out says no
    ``"default": null``: null is not what it takes)."""
    import importlib

    from pydantic import TypeAdapter
    from pydantic.json_schema import GenerateJsonSchema

    class Generate(GenerateJsonSchema):
        def default_schema(self, schema: Any) -> Any:
            out = super().default_schema(schema)
            return {k: v for k, v in out.items() if k != "default" or v is not None}

    module, _, attr = SCHEMAS[name].partition(":")
    schema = TypeAdapter(getattr(importlib.import_module(module), attr)).json_schema(schema_generator=Generate)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
