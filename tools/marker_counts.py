"""A pytest plugin for ``tools/readme_figures.py``: one collection, the three counts the README
states. After collection it writes one line,
``marker-counts: {"test": N, "heavy": M, "serve_full": K}``: the tests ``make test`` runs (-m "not
heavy and not serve_full"), ``make test-heavy`` (-m heavy), and those only ``make serve-test``
runs (serve_full, not heavy). Use: ``pytest --collect-only -q -p tools.marker_counts``."""

from __future__ import annotations

import json


def pytest_collection_finish(session) -> None:
    def has(item, name: str) -> bool:
        return item.get_closest_marker(name) is not None

    items = session.items
    counts = {"test": sum(not has(i, "heavy") and not has(i, "serve_full") for i in items),
              "heavy": sum(has(i, "heavy") for i in items),
              "serve_full": sum(has(i, "serve_full") and not has(i, "heavy") for i in items)}
    session.config.pluginmanager.get_plugin("terminalreporter").write_line("marker-counts: " + json.dumps(counts))
