"""Error statistics between a backend's tensors and the reference's, accumulated over
requests: max/mean abs and rel error, p99 abs error, cosine similarity, NaN/Inf counts."""

from __future__ import annotations

from typing import Any

import numpy as np

SAMPLE = 200_000


class ErrorStats:
    def __init__(self, name: str):
        self.name = name
        self.max_abs = self.sum_abs = self.max_rel = self.ref_max_abs = 0.0
        self.count = self.nan = self.inf = 0
        self.dot = self.na = self.nb = 0.0
        self.errors: list[np.ndarray] = []
        self.shape_mismatch: str | None = None
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, a: np.ndarray, ref: np.ndarray, keep_pairs: bool = False) -> None:
        a = np.asarray(a, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if a.shape != ref.shape:
            self.shape_mismatch = f"{list(a.shape)} vs reference {list(ref.shape)}"
            return
        self.nan += int(np.isnan(a).sum())
        self.inf += int(np.isinf(a).sum())
        finite = np.isfinite(a)
        err = np.abs(np.where(finite, a, 0.0) - ref)
        if a.size:
            self.max_abs = max(self.max_abs, float(err.max()))
            self.max_rel = max(self.max_rel, float((err / np.maximum(np.abs(ref), 1e-6)).max()))
            self.ref_max_abs = max(self.ref_max_abs, float(np.abs(ref).max()))
        self.sum_abs += float(err.sum())
        self.count += int(a.size)
        a0 = np.where(finite, a, 0.0)
        self.dot += float((a0 * ref).sum())
        self.na += float((a0 * a0).sum())
        self.nb += float((ref * ref).sum())
        if sum(e.size for e in self.errors) < SAMPLE:
            self.errors.append(err.reshape(-1)[: SAMPLE])
        if keep_pairs:
            self.pairs.append((a.reshape(-1), ref.reshape(-1)))

    def _errors(self) -> np.ndarray:
        """The sampled errors; one zero when nothing was compared (only empty outputs added)."""
        errs = np.concatenate(self.errors) if self.errors else np.zeros(0)
        return errs if errs.size else np.zeros(1)

    def summary(self) -> dict[str, Any]:
        errs = self._errors()
        cos = self.dot / np.sqrt(self.na * self.nb) if self.na > 0 and self.nb > 0 else (1.0 if self.na == self.nb else 0.0)
        return {
            "name": self.name, "count": self.count, "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / max(self.count, 1), "max_rel": self.max_rel,
            "p99_abs": float(np.percentile(errs, 99)), "cosine": float(cos), "nan": self.nan, "inf": self.inf,
            "ref_max_abs": self.ref_max_abs, "shape_mismatch": self.shape_mismatch,
        }

    def histogram(self, bins: int = 30) -> dict[str, list[float]]:
        errs = self._errors()
        logs = np.log10(np.maximum(errs, 1e-12))
        counts, edges = np.histogram(logs, bins=bins, range=(-12, 2))
        return {"log10_edges": edges.tolist(), "counts": counts.tolist()}
