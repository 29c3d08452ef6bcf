"""``onetrans-trt schema NAME``: the JSON Schema of what the toolkit reads, and the toolkit
agreeing with it.

The schema printed is checked as a JSON Schema (with ``jsonschema`` where it is installed;
always with the small validator below, which knows every keyword the schemas use and fails on
any other), a real request validates against it, malformed ones do not, and for requests,
limits and policies mutated at random the schema and the toolkit give the same verdict. A real
checkpoint's config.json validates against the ``config`` schema; what the toolkit reads from a
mutated one the schema accepts, and what the schema refuses the toolkit refuses (the config's
rules across fields, such as d_model divisible by n_heads, are beyond JSON Schema).
"""

from __future__ import annotations

import copy
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli
from onetrans_trt.contracts import SCHEMAS
from onetrans_trt.data.requests import Request, RequestLimits
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.errors import OneTransError

DIALECT = "https://json-schema.org/draft/2020-12/schema"
TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
ANNOTATIONS = {"$schema", "$defs", "title", "description", "default"}
KEYWORDS = ANNOTATIONS | {"$ref", "type", "properties", "required", "additionalProperties", "items", "anyOf",
                          "oneOf", "enum", "const", "minimum", "exclusiveMinimum", "maximum", "pattern",
                          "minProperties", "minItems", "minLength"}


def _schema(name: str) -> dict:
    r = CliRunner().invoke(cli, ["schema", name])
    assert r.exit_code == 0 and r.stderr == "", r.output
    return json.loads(r.stdout)


def _subschemas(s: dict):
    yield s
    for key in ("properties", "$defs"):
        for sub in s.get(key, {}).values():
            yield from _subschemas(sub)
    for sub in s.get("anyOf", []) + s.get("oneOf", []):
        yield from _subschemas(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            yield from _subschemas(s[key])


def _ref(root: dict, ref: str) -> dict:
    assert ref.startswith("#/$defs/"), ref
    return root["$defs"][ref[len("#/$defs/"):]]


def _is(t: str, v) -> bool:
    return {"object": isinstance(v, dict), "array": isinstance(v, list), "string": isinstance(v, str),
            "boolean": isinstance(v, bool), "null": v is None,
            "integer": isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool)}[t]


def valid(root: dict, v, s: dict | None = None) -> bool:
    """``v`` against ``s`` (default: ``root``): the keywords in KEYWORDS, as draft 2020-12 reads them."""
    s = root if s is None else s
    if "$ref" in s and not valid(root, v, _ref(root, s["$ref"])):
        return False
    if "type" in s and not _is(s["type"], v):
        return False
    if "anyOf" in s and not any(valid(root, v, sub) for sub in s["anyOf"]):
        return False
    if "oneOf" in s and sum(valid(root, v, sub) for sub in s["oneOf"]) != 1:
        return False
    if "enum" in s and v not in s["enum"] or "const" in s and v != s["const"]:
        return False
    if _is("number", v) and ("minimum" in s and v < s["minimum"] or "maximum" in s and v > s["maximum"]
                             or "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]):
        return False
    if isinstance(v, str) and ("pattern" in s and not re.search(s["pattern"], v) or len(v) < s.get("minLength", 0)):
        return False
    if isinstance(v, dict):
        if len(v) < s.get("minProperties", 0):
            return False
        props = s.get("properties", {})
        if any(k not in v for k in s.get("required", [])):
            return False
        for k, x in v.items():
            sub = props.get(k, s.get("additionalProperties", True))
            if sub is False or isinstance(sub, dict) and not valid(root, x, sub):
                return False
    if isinstance(v, list) and ("items" in s and not all(valid(root, x, s["items"]) for x in v)
                                or len(v) < s.get("minItems", 0)):
        return False
    return True


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_the_printed_schema_is_a_json_schema(name):
    root = _schema(name)
    assert root["$schema"] == DIALECT and root["type"] == "object" and root["title"]
    for s in _subschemas(root):
        assert set(s) <= KEYWORDS, sorted(set(s) - KEYWORDS)
        assert s.get("type", "object") in TYPES, s
        assert set(s.get("required", [])) <= set(s.get("properties", {})), s
        if "$ref" in s:
            _ref(root, s["$ref"])  # resolves
        for key in ("description", "title"):
            assert isinstance(s.get(key, ""), str)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator.check_schema(root)


def _real_requests(movielens) -> list[dict]:
    reqs = [r.to_json() for r, _ in movielens.requests(3, n_candidates=4, seed=1)]
    s = synthetic_schema()
    reqs += [synthetic_request(s, np.random.default_rng(i), n_history=5, n_candidates=2).to_json() for i in range(3)]
    return json.loads(json.dumps(reqs))  # as a client sends them


BAD_REQUESTS = [
    [],
    {},
    {"candidates": {}},
    {"candidates": [1]},
    {"candidates": [], "user": []},
    {"candidates": [], "context": "x"},
    {"candidates": [], "history": [{"sequence": "s"}]},
    {"candidates": [], "history": [{"sequence": "s", "timestamp": "yesterday"}]},
    {"candidates": [], "history": [{"sequence": 1, "timestamp": 1}]},
    {"candidates": [], "history": [{"sequence": "s", "timestamp": True}]},
    {"candidates": [], "user_key": True},
    {"candidates": [], "user_key": [1]},
]


def test_real_requests_validate_and_malformed_ones_do_not(movielens):
    root = _schema("request")
    for req in _real_requests(movielens):
        assert valid(root, req), req
        Request.from_json(req)
    for bad in BAD_REQUESTS:
        assert not valid(root, bad), bad
        with pytest.raises(OneTransError):
            Request.from_json(bad)
    try:
        import jsonschema
    except ImportError:
        return
    v = jsonschema.Draft202012Validator(root)
    assert all(v.is_valid(r) for r in _real_requests(movielens))
    assert not any(v.is_valid(b) for b in BAD_REQUESTS)


# JSON values only: no NaN, no integer beyond 64 bits, no float that JSON Schema would count
# as an integer (1.0 is an integer to JSON Schema, a float to the toolkit)
WEIRD = [None, True, False, 0, -1, 7, 1.5, -2.5, 0.1, "", "x", "seq0", [], [1], [None, "a"], {}, {"a": 1},
         {"sequence": "seq0"}, {"sequence": "seq0", "timestamp": 3}, [[[]]]]


def _mutate(obj, rng: random.Random):
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        obj, k = dict(obj), rng.choice(sorted(obj))
        r = rng.random()
        if r < 0.2:
            del obj[k]
        elif r < 0.3:
            obj[rng.choice(["extra", "timestamp", "sequence", "user_key"])] = rng.choice(WEIRD)
        elif r < 0.6:
            obj[k] = rng.choice(WEIRD)
        else:
            obj[k] = _mutate(obj[k], rng)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        obj, i = list(obj), rng.randrange(len(obj))
        obj[i] = rng.choice(WEIRD) if rng.random() < 0.5 else _mutate(obj[i], rng)
        return obj
    return copy.deepcopy(rng.choice(WEIRD))


def _accepts(fn, doc) -> bool:
    try:
        fn(doc)
        return True
    except OneTransError as e:
        assert str(e) and "\n" not in str(e)
        return False


def _policy(doc, tmp_path):
    from onetrans_trt.validate.policy import load_policy

    p = tmp_path / "policy.json"
    p.write_text(json.dumps(doc))
    return load_policy(p)


def test_the_toolkit_and_its_schema_agree_on_mutated_documents(movielens, tmp_path):
    """Whatever the schema accepts the toolkit reads, and whatever it refuses is refused."""
    cases = {"request": (_real_requests(movielens), Request.from_json),
             "limits": ([{"max_history": 5, "max_candidates": 2, "max_request_bytes": 9, "over_limit": "truncate"},
                         {}], RequestLimits.from_json),
             "policy": ([{"fp32": {"atol": 1e-3, "min_kendall_tau": 0.5}, "int8": {}}],
                        lambda d: _policy(d, tmp_path))}
    rng = random.Random(0)
    for name, (docs, read) in cases.items():
        root = _schema(name)
        seen = {True: 0, False: 0}
        for i in range(300):
            doc = docs[i % len(docs)]
            for _ in range(rng.choice([1, 1, 2])):
                doc = _mutate(doc, rng)
            verdict = valid(root, doc)
            assert _accepts(read, doc) == verdict, (name, verdict, doc)
            seen[verdict] += 1
        assert seen[True] > 10 and seen[False] > 10, (name, seen)


def test_manifests_validate_against_the_manifest_schema(tmp_path):
    """The manifest schema holds what a build's manifest holds; the rules that depend on the
    model family (a OneTrans pyramid schedule, HyFormer's sizes) and the two graphs every build
    has are checked on top of it."""
    from onetrans_trt.trust import check_manifest
    from tests.mutation_kills.test_trust import _manifest

    root = _schema("manifest")
    for fam in ("onetrans", "hyformer", "baseline"):
        m = _manifest(fam)
        m["precisions"] = {"fp16": {"lineage": {"graphs": {"user_encoder": "ab" * 32}, "command": ["convert"]}}}
        m["graphs"]["user_encoder"]["data"] = {"file": "user_encoder.onnx.data", "sha256": "0" * 64, "bytes": 3}
        assert valid(root, m) and check_manifest(m, tmp_path / "manifest.json") is m
    for key, bad in (("opset", "23"), ("model", {"family": "onetrans"}), ("zzz", 1), ("format", "x"),
                     ("graphs", {"user_encoder": {"file": "../u.onnx"}}),
                     ("precisions", {"fp16": {"lineage": {"graphs": {}}}})):
        m = _manifest()
        m[key] = bad
        assert not valid(root, m), key
        with pytest.raises(OneTransError):
            check_manifest(m, tmp_path / "manifest.json")


def _real_configs(tmp_path) -> list[dict]:
    """config.json of real checkpoints: the golden tiny preset on MovieLens and one checkpoint of
    each family, as save_checkpoint writes them."""
    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.models.baseline import Baseline
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.hyformer import HyFormer
    from onetrans_trt.models.onetrans import OneTrans

    s = synthetic_schema(max_history=8)
    docs = [json.loads((Path(__file__).parent / "data" / "golden_tiny_movielens_config.json").read_text())]
    for i, model in enumerate([OneTrans(ModelConfig.from_preset("tiny", s, pyramid=[5], ns_tokenizer="group")),
                               HyFormer(ModelConfig.from_preset("tiny", s, family="hyformer", seq_encoder="longer")),
                               Baseline(ModelConfig.from_preset("tiny", s, family="baseline", tasks=["a", "b"]))]):
        docs.append(json.loads((save_checkpoint(model, tmp_path / f"ck{i}") / "config.json").read_text()))
    return docs


# each refused by the schema and by the toolkit
BAD_CONFIGS = [
    lambda d: d.pop("schema"),
    lambda d: d.update(d_model="16"),
    lambda d: d.update(d_model=0),
    lambda d: d.update(n_heads=True),
    lambda d: d.update(family="gpt"),
    lambda d: d.update(pyramid="triangle"),
    lambda d: d.update(pyramid=[4, 0]),
    lambda d: d.update(tasks=[]),
    lambda d: d.update(tasks=[""]),
    lambda d: d.update(ns_groups=[[1]]),
    lambda d: d.update(d_modle=16),
    lambda d: d["schema"].update(max_history=0),
    lambda d: d["schema"].pop("tables"),
    lambda d: d["schema"].update(features=[]),
    lambda d: d["schema"]["tables"][0].update(size=(1 << 30) + 1),
    lambda d: d["schema"]["tables"][0].update(tokens=[1]),
    lambda d: d["schema"]["features"][0].update(kind="image"),
    lambda d: d["schema"]["features"][0].update(extra=1),
    lambda d: d["schema"]["sequences"][0].update(fields={}),
]


def test_real_configs_validate_against_the_config_schema_and_malformed_ones_do_not(tmp_path):
    from onetrans_trt.models.config import HYFORMER_ONLY, ModelConfig

    root = _schema("config")
    assert root["title"] == "ModelConfig" and root["required"] == ["schema"]
    assert set(root["$defs"]) == {"FeatureSchemaJSON", "TableJSON", "FeatureJSON", "SequenceJSON"}
    assert root["$defs"]["FeatureSchemaJSON"]["required"] == ["max_history", "tables", "features", "sequences"]
    docs = _real_configs(tmp_path)
    for doc in docs:
        form = set() if doc.get("family") == "hyformer" else set(HYFORMER_ONLY)  # HyFormer's form: its own keys
        assert set(doc) | form == set(root["properties"]) and set(doc["schema"]) == set(
            root["$defs"]["FeatureSchemaJSON"]["properties"])  # every key a checkpoint writes, and nothing else
        assert valid(root, doc), doc
        assert ModelConfig.from_dict(doc).to_dict() == doc
    bad = []
    for mutate in BAD_CONFIGS:
        doc = copy.deepcopy(docs[1])
        mutate(doc)
        assert not valid(root, doc), doc
        with pytest.raises(OneTransError):
            ModelConfig.from_dict(doc)
        bad.append(doc)
    try:
        import jsonschema
    except ImportError:
        return
    v = jsonschema.Draft202012Validator(root)
    assert all(v.is_valid(d) for d in docs) and not any(v.is_valid(d) for d in bad)


def test_what_the_toolkit_reads_the_config_schema_accepts(tmp_path):
    """Mutated config.json documents: the schema accepts all the toolkit reads and refuses only what
    the toolkit refuses (a config the schema accepts may still break a rule across fields)."""
    from onetrans_trt.models.config import ModelConfig

    root, docs = _schema("config"), _real_configs(tmp_path)[1:]
    rng = random.Random(3)
    seen = {"both": 0, "neither": 0, "schema only": 0}
    for i in range(600):
        doc = docs[i % len(docs)]
        for _ in range(rng.choice([1, 1, 2])):
            doc = _mutate(doc, rng)
        ours, theirs = _accepts(ModelConfig.from_dict, doc), valid(root, doc)
        assert theirs or not ours, doc
        seen["both" if ours else "schema only" if theirs else "neither"] += 1
    assert seen["both"] > 10 and seen["neither"] > 100, seen


def test_schema_out_writes_the_same_schema_atomically(tmp_path):
    out = tmp_path / "sub" / "request.schema.json"
    r = CliRunner().invoke(cli, ["schema", "request", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {out}\n"
    assert json.loads(out.read_text()) == _schema("request")
    assert [p.name for p in out.parent.iterdir()] == ["request.schema.json"]  # no temporary left
    r = CliRunner().invoke(cli, ["-q", "schema", "limits", "--out", str(out)])  # replaced whole
    assert r.exit_code == 0 and r.stdout == "" and json.loads(out.read_text())["title"] == "Limits"


def test_schema_help_teaches():
    r = CliRunner().invoke(cli, ["schema", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for words in ("JSON Schema", "request", "limits", "policy", "manifest", "--out", "rank --request",
                  "validate --policy", "onetrans-trt schema request --out request.schema.json", "64 bits"):
        assert words in text, words


@pytest.mark.parametrize("args, words", [
    (["schema", "requests"], "Invalid value for 'NAME': 'requests' is not one of 'request', 'limits', 'policy', "
                             "'manifest', 'config'"),
    (["schema"], "Missing argument 'NAME'"),
    (["schema", "request", "extra"], "unexpected extra argument"),
])
def test_a_bad_schema_name_is_one_line_exit_2(args, words, tmp_path):
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *args], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: onetrans-trt schema: ") and words in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []
