"""``manifest.json``, the record of a build, as a pydantic model: what
:func:`onetrans_trt.trust.check_manifest` checks every build's manifest against (other keys
inside its objects are allowed and left alone; unknown top-level keys are refused) and what
``onetrans-trt schema manifest`` prints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from onetrans_trt.contracts import ONNX_NAME, SHA256

FORMAT = "onetrans-trt/build/1"
Sha256 = Annotated[str, Field(pattern=SHA256)]
Size = Annotated[int, Field(ge=1, le=1 << 20)]


class _Open(BaseModel):
    model_config = ConfigDict(strict=True)


class GraphData(_Open):
    file: str = Field(description="<graph file>.data, beside the graph")
    sha256: Sha256
    bytes: int = Field(ge=0)


class Graph(_Open):
    file: str = Field(pattern=ONNX_NAME, description="a plain .onnx file name in the build directory")
    data: GraphData = Field(None, description="the graph's external data (a model over the 2 GiB threshold)")

    @model_validator(mode="after")
    def _beside(self) -> "Graph":
        if self.data is not None and self.data.file != self.file + ".data":
            raise ValueError(f"data.file {self.data.file!r} is not {self.file + '.data'!r}")
        return self


class ModelInfo(_Open):
    family: str
    d_model: Size
    n_heads: Size
    n_layers: Size
    s_max_len: Size
    tasks: list


class Lineage(_Open):
    graphs: dict[str, Sha256] = Field(min_length=1, description="graph name -> the sha256 it was made from")
    command: list[str] = Field([], description="the command that made it")


class Variant(_Open):
    lineage: Lineage | None = None


class Manifest(BaseModel):
    """What a build holds and how it was made (``onetrans-trt export`` writes it)."""

    model_config = ConfigDict(strict=True, extra="forbid", title="Manifest")
    format: Literal["onetrans-trt/build/1"]
    created: str
    checkpoint: dict
    versions: dict
    opset: int
    model: ModelInfo
    pyramid: dict
    graphs: dict[str, Graph] = Field(description="user_encoder and candidate_scorer at least")
    dynamic_dims: dict
    passes: list
    samples: dict
    hyformer: dict = Field(None, description="HyFormer: sequences, state_slots, longer_window (positive), "
                                                 "per_sequence (each sequence's queries/encoder/window/max_len)")
    precisions: dict[str, Variant] = Field(None, description="fp16/int8 variants and their lineage")
    engines: dict = None
    protocol: dict = None
    provenance: dict = None

    @model_validator(mode="after")
    def _whole(self) -> "Manifest":
        missing = sorted({"user_encoder", "candidate_scorer"} - set(self.graphs))
        sched, hy = self.pyramid.get("schedule"), self.hyformer or {}
        if missing:
            raise ValueError(f"graphs {missing} are not listed")
        if self.model.family == "onetrans" and not (
                isinstance(sched, list) and all(x is None or type(x) is int and x >= 0 for x in sched)):
            raise ValueError("pyramid.schedule must be a list of non-negative counts")
        if self.model.family == "hyformer" and not all(
                type(hy.get(k)) is int and hy[k] > 0 for k in ("sequences", "state_slots", "longer_window")):
            raise ValueError("a HyFormer manifest needs hyformer.sequences/state_slots/longer_window")
        per = hy.get("per_sequence")
        if self.model.family == "hyformer" and per is not None and not (
                isinstance(per, list) and len(per) == hy["sequences"] and hy["state_slots"] % len(per) == 0
                and all(isinstance(p, dict) and p.get("encoder") in ("transformer", "longer", "swiglu")
                        and all(type(p.get(k)) is int and p[k] > 0 for k in ("queries", "window"))
                        and (p.get("max_len") is None or type(p["max_len"]) is int and p["max_len"] > 0)
                        for p in per)):
            raise ValueError("hyformer.per_sequence must list each sequence's queries, encoder, window and "
                             "max_len (positive counts; max_len may be null)")
        return self
