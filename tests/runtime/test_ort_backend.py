from onetrans_trt.runtime.ort_backend import OrtSplitBackend


def test_split_sessions_stop_spinning_between_runs(tiny_build):
    """Both graphs of a split request share the cores: a session whose idle threads kept
    spinning after its run slowed the next graph down (1.35x on 2 cores, see the module)."""
    be = OrtSplitBackend(tiny_build, threads=2)
    for sess in (be.user, be.scorer):
        opts = sess.get_session_options()
        assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
        assert opts.intra_op_num_threads == 2
