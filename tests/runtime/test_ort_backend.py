from onetrans_trt.runtime.ort_backend import OrtSplitBackend


def test_split_sessions_stop_spinning_between_runs(tiny_build):
    """Both graphs of a split request share the cores: a session whose idle threads kept
    spinning after its run slowed the next graph down (1.35x on 2 cores, see the module)."""
    be = OrtSplitBackend(tiny_build, threads=2)
    for sess in (be.user, be.scorer):
        opts = sess.get_session_options()
        assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
        assert opts.intra_op_num_threads == 2


def test_device_bound_kv_path_matches_the_host_path_and_never_copies_the_kv(tiny_build, movielens):
    """The io_binding path (the one ORT's CUDA provider uses, run here on the CPU device):
    the encoder's K/V stay OrtValues and go to the scorer as such; scores are identical."""
    import numpy as np
    import onnxruntime as ort

    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.kv import state_arrays
    from onetrans_trt.models.config import read_config

    schema = read_config(tiny_build).schema
    host, bound = OrtSplitBackend(tiny_build), OrtSplitBackend(tiny_build, device="cpu")
    assert host.device is None and bound.device == "cpu" and bound.bind_state
    for req, _ in movielens.requests(6, n_candidates=5, seed=11):
        hist, ns = encode_request(schema, req)
        kv = bound.encode_user(hist)
        state = state_arrays(kv)
        assert state and all(isinstance(v, ort.OrtValue) for v in state.values())
        assert kv.nbytes() == host.encode_user(hist).nbytes() > 0
        ref = host.score(host.encode_user(hist), ns)
        got = bound.score(kv, ns)
        assert got.shape == ref.shape and np.array_equal(got, ref)


def test_device_bound_path_rejects_an_unknown_device(tiny_build):
    import pytest

    from onetrans_trt.errors import InputError

    with pytest.raises(InputError, match="device 'tpu'"):
        OrtSplitBackend(tiny_build, device="tpu")
