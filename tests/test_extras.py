"""The install extras, read from pyproject.toml (never from what happens to be installed):
no set of extras a user is told to install resolves to both ONNX Runtime wheels.

onnxruntime and onnxruntime-gpu ship the same ``onnxruntime`` module and overwrite each
other's files, so neither is a base dependency: ``[cpu]`` brings onnxruntime, ``[gpu]``
onnxruntime-gpu, and without either the CLI says what to install (exit 3).
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
ORT_WHEELS = {"onnxruntime", "onnxruntime-gpu"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME = canonicalize_name(PROJECT["name"])
EXTRAS = PROJECT.get("optional-dependencies", {})


def resolved(extras: tuple[str, ...] | set[str]) -> set[str]:
    """The distributions our own requirements name for ``pip install .[extras]`` (markers
    evaluated here, extras of this project followed); third-party dependencies not expanded."""
    seen, todo, names = set(), list(extras), set()
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        assert e in EXTRAS, f"unknown extra {e!r}"
        reqs += [Requirement(r) for r in EXTRAS[e]]
    for r in reqs:
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(r.name) == NAME:  # an extra naming others: onetrans-trt[a,b]
            names |= resolved(tuple(r.extras))
        else:
            names.add(canonicalize_name(r.name))
    return names


def test_the_base_install_has_no_onnx_runtime_wheel():
    assert not resolved(()) & ORT_WHEELS


def test_cpu_and_gpu_extras_each_bring_exactly_one_wheel():
    assert resolved(("cpu",)) & ORT_WHEELS == {"onnxruntime"}
    assert resolved(("gpu",)) & ORT_WHEELS == {"onnxruntime-gpu"}


def test_no_set_of_extras_without_both_cpu_and_gpu_resolves_to_both_wheels():
    names = sorted(EXTRAS)
    for k in range(len(names) + 1):
        for combo in itertools.combinations(names, k):
            if {"cpu", "gpu"} <= set(combo):
                continue  # asking for both is the one way to get both; the docs say never
            assert len(resolved(combo) & ORT_WHEELS) <= 1, combo


def test_the_makefile_installs_exactly_one_runtime():
    lines = [m.group(1) for m in re.finditer(r"pip install[^\n]*-e '\.\[([^\]]*)\]'", (ROOT / "Makefile").read_text())]
    assert lines, "the Makefile's venv target installs the project with extras"
    for extras in lines:
        got = resolved(tuple(x.strip() for x in extras.split(",")))
        assert got & ORT_WHEELS == {"onnxruntime"}, extras


def test_base_dependencies_do_not_pull_a_runtime_in_themselves():
    """Installed base dependencies (where present) require no ONNX Runtime wheel without extras."""
    from importlib.metadata import PackageNotFoundError, requires

    for dep in PROJECT["dependencies"]:
        name = Requirement(dep).name
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        pulled = {canonicalize_name(Requirement(r).name) for r in reqs
                  if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})}
        assert not pulled & ORT_WHEELS, (name, pulled & ORT_WHEELS)


NO_ORT = """
import sys
sys.modules["onnxruntime"] = None  # as if neither wheel were installed
from onetrans_trt.cli import main
sys.argv = ["onetrans-trt", *sys.argv[1:]]
main()
"""


def test_without_onnx_runtime_the_cli_says_what_to_install(tiny_build):
    p = subprocess.run([sys.executable, "-c", NO_ORT, "inspect", str(tiny_build)], capture_output=True, text=True,
                       timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 3, p.stderr[-1500:]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-1500:]
    assert "onetrans-trt[cpu]" in lines[0] and "onetrans-trt[gpu]" in lines[0]


def test_the_license_file_is_the_license_pyproject_names():
    """pyproject says Apache-2.0; the LICENSE file beside it must be that license's text."""
    assert PROJECT["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 The onetrans-trt authors" in text
