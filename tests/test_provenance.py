"""Provenance: every JSON artifact says which tools made it, with which command, on what host,
about which graphs."""

from __future__ import annotations

import json
import sys
from importlib import metadata

import pytest

from onetrans_trt import provenance as pv

REWRITERS = ("onnxscript", "onnxslim", "onnx_graphsurgeon", "modelopt", "onnxconverter_common", "polygraphy")


def test_versions_name_every_installed_tool_from_its_metadata():
    v = pv.versions()
    for dist, key in pv.TOOLS.items():
        try:
            want = metadata.version(dist)
        except metadata.PackageNotFoundError:
            assert key not in v
            continue
        assert v[key].startswith(want.split("+")[0]), (key, v[key], want)
    for key in REWRITERS:  # the tools that rewrite graphs are installed here: all must be named
        assert key in v, key
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))


def test_host_and_command():
    h = pv.host()
    assert h["cores"] >= 1 and h["cpu"] and h["platform"] and isinstance(h["gpus"], list)
    pv.set_command(["onetrans-trt", "validate", "b uild", "--count", "5"])
    try:
        assert pv.command_line() == "onetrans-trt validate 'b uild' --count 5"  # shell-quoted: re-runnable
    finally:
        pv.set_command([])


def test_graph_hashes_take_the_graphs_and_their_external_data():
    m = {"graphs": {"a": {"sha256": "1" * 64}, "b": {"sha256": "2" * 64, "data": {"sha256": "3" * 64}},
                    "junk": "x"}}
    assert pv.graph_hashes(m) == {"a": "1" * 64, "b": "2" * 64, "b.data": "3" * 64}


@pytest.mark.slow
def test_the_validation_report_carries_provenance_and_the_graph_hashes(tiny_build, tmp_path):
    from onetrans_trt.validate.api import validate_build

    rep = validate_build(tiny_build, backends=["ort"], data="ml-100k", n_requests=2)
    man = json.loads((tiny_build / "manifest.json").read_text())
    assert rep["provenance"]["graphs"]["candidate_scorer"] == man["graphs"]["candidate_scorer"]["sha256"]
    assert rep["provenance"]["graphs"]["user_encoder"] == man["graphs"]["user_encoder"]["sha256"]
    assert set(REWRITERS) <= set(rep["provenance"]["versions"]) and rep["provenance"]["host"]["cpu"]
