"""Side-by-side measurements. Ratios come from runs interleaved in one process (machines
are noisy); peak memory comes from fresh subprocesses. Never timed unit tests."""
