"""Empty outputs (a request with no candidates) are compared without crashing the report."""

import numpy as np

from onetrans_trt.validate.compare import ErrorStats


def test_only_empty_pairs_summarise_as_exact():
    e = ErrorStats("logits")
    e.add(np.zeros((0, 2)), np.zeros((0, 2)))
    s = e.summary()  # raised IndexError from np.percentile on an empty array before
    assert s["count"] == 0 and s["max_abs"] == 0.0 and s["p99_abs"] == 0.0 and s["cosine"] == 1.0
    assert sum(e.histogram()["counts"]) == 1


def test_empty_pairs_do_not_hide_real_errors():
    e = ErrorStats("logits")
    e.add(np.zeros((0, 2)), np.zeros((0, 2)))
    e.add(np.array([[1.0, 2.0]]), np.array([[1.0, 2.5]]))
    s = e.summary()
    assert s["count"] == 2 and s["max_abs"] == 0.5 and s["p99_abs"] > 0.4
