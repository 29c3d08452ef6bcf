"""Fixtures of the Triton server tests: the installed server (from the nvidia-pytriton wheel,
downloaded with pip on first use) and Python-backend repositories of tiny builds.

Without the wheel (no network, no ONETRANS_TRT_PYTRITON_WHEEL) the server tests skip with the
reason, unless ONETRANS_TRT_REQUIRE_TRITON=1 (`make serve-test` sets it): then they fail.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def triton():
    """The installed server and the Python environment its stubs run in."""
    from onetrans_trt.errors import MissingCapabilityError
    from onetrans_trt.serving.server import install, serving_python

    try:
        inst = install()
        inst.backend_directory()
        serving_python()
    except MissingCapabilityError as e:
        if os.environ.get("ONETRANS_TRT_REQUIRE_TRITON") == "1":
            raise
        pytest.skip(f"no Triton server here: {e}")
    return inst


@pytest.fixture(scope="session")
def tiny_repo(tiny_build, tmp_path_factory):
    """``serve-repo --backend python`` of the tiny OneTrans build."""
    from onetrans_trt.serving.repository import write_python_repository

    out = tmp_path_factory.mktemp("pyrepo") / "repo"
    write_python_repository(tiny_build, out)
    return out
