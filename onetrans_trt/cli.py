"""The ``onetrans-trt`` command line: one command per pipeline stage.

Exit codes: 0 success, 1 a check failed, 2 bad input, 3 a missing optional capability
(TensorRT, a GPU). Errors print one line, ``error: <what was wrong and what to do>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from onetrans_trt import __version__
from onetrans_trt.contracts import SCHEMAS
from onetrans_trt.errors import InputError, OneTransError
from onetrans_trt.trust import DEFAULT_OPSET, OPSETS


# ONNX Runtime comes from an extra: onnxruntime (CPU) and onnxruntime-gpu ship the same module
ORT_MISSING = ("ONNX Runtime is not installed: pip install 'onetrans-trt[cpu]', or on a CUDA host "
               "'onetrans-trt[gpu]' (onnxruntime-gpu; never both: they overwrite each other's files)")


def _usage_error(e: click.UsageError) -> click.exceptions.Exit:
    """click's own usage errors (a bad option value, an unknown option or command) as one
    line, like ours: ``error: <command>: <what>``, exit code 2."""
    where = e.ctx.command_path if e.ctx is not None else "onetrans-trt"
    msg = " ".join(e.format_message().split())
    click.echo(f"error: {where}: {msg} (see {where} --help)", err=True)
    return click.exceptions.Exit(e.exit_code)


class _Group(click.Group):
    """Map our errors to one-line messages and exit codes (never a traceback)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _usage_error(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _usage_error(e) from None
        except OneTransError as e:
            # one line whatever the message quotes (a path may hold a newline): escaped as repr would
            click.echo("error: " + str(e).replace("\r", "\\r").replace("\n", "\\n"), err=True)
            ctx.exit(e.exit_code)
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] != "onnxruntime":
                raise
            click.echo(f"error: {ORT_MISSING}", err=True)
            ctx.exit(3)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _emit(obj: Any, as_json: bool, human: str) -> None:
    """JSON when asked for (always printed); the human summary unless -q."""
    from onetrans_trt import log

    if as_json:
        click.echo(json.dumps(obj, indent=2))
    elif not log.quiet():
        click.echo(human)


def _progress():
    """A progress display on stderr: rich's bar on a terminal, else :class:`PlainProgress`
    (plain lines a CI log or `| tee` keeps); nothing under -q."""
    if _quiet() or not sys.stderr.isatty():
        return PlainProgress(enabled=not _quiet())
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                    transient=False, console=_stderr_console())


class PlainProgress:
    """rich.progress's ``add_task`` / ``update`` as plain stderr lines, for logs: once a task
    has run ``after_s`` seconds (work that ends sooner, a refused input included, prints
    nothing; a task without a total: ``5 * after_s``), a line when its status text changes, when it passes each tenth of its total (or
    ``every_s`` seconds after the last line), and when it completes, with the elapsed time and
    an estimate of what is left."""

    def __init__(self, enabled: bool = True, every_s: float = 30.0, after_s: float = 2.0, stream=None):
        self.enabled, self.every_s, self.after_s, self.stream = enabled, every_s, after_s, stream
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _say(self, t: dict, text: str) -> None:
        import time

        now = time.monotonic()
        if now - t["start"] < self.after_s:
            return
        t["last"] = now
        if self.enabled:
            click.echo(f"{t['description']}: {text}", err=True, file=self.stream)

    def add_task(self, description: str, total: float | None = None, status: str = "", **_: object) -> int:
        import time

        tid = len(self._tasks)
        now = time.monotonic()
        self._tasks[tid] = t = {"description": description, "total": total, "completed": 0, "status": status,
                                "start": now, "last": now, "tenth": 0, "done": False}
        return tid

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               status: str | None = None, advance: float | None = None, **_: object) -> None:
        import time

        t = self._tasks[task_id]
        if total is not None:
            t["total"] = total
        if advance is not None:
            t["completed"] += advance
        if completed is not None:
            t["completed"] = completed
        changed = status is not None and status != t["status"]
        if status is not None:
            t["status"] = status
        now, total_ = time.monotonic(), t["total"]
        elapsed = now - t["start"]
        if total_:
            frac = min(t["completed"] / total_, 1.0)
            tenth = int(frac * 10)
            if frac >= 1.0 and not t["done"]:
                t["done"] = True
                self._say(t, f"{t['completed']:g}/{total_:g} done in {elapsed:.0f} s"
                             + (f", {t['status']}" if t["status"] else ""))
            elif tenth > t["tenth"] or now - t["last"] >= self.every_s:
                t["tenth"] = max(t["tenth"], tenth)
                left = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
                self._say(t, f"{t['completed']:g}/{total_:g} ({frac:.0%}), {elapsed:.0f} s elapsed, ~{left:.0f} s "
                             f"left" + (f", {t['status']}" if t["status"] else ""))
        elif changed and elapsed >= 5 * self.after_s:  # stages of work with no count: only once it is long
            self._say(t, f"{t['status']} ({elapsed:.0f} s)")


def _human(text: str) -> None:
    """A command's human-readable result on stdout (not under -q; JSON and data always print)."""
    if not _quiet():
        click.echo(text)


def _note(msg: str) -> None:
    """A progress line on stderr (not under -q)."""
    if not _quiet():
        click.echo(msg, err=True)


def _quiet() -> bool:
    from onetrans_trt import log

    return log.quiet()


def _stderr_console():
    from rich.console import Console

    from onetrans_trt import log

    return Console(stderr=True, quiet=log.quiet())


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def _out_dir(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A directory to write: checked before any work (not a file, not under a file)."""
    if value is None:
        return value
    base = _nearest_existing(value)
    if not base.is_dir():
        raise click.BadParameter(f"{base} exists and is not a directory", ctx, param)
    return value


def _out_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A file to write: checked before any work (not a directory, not under a file)."""
    if value is None:
        return value
    if value.is_dir():
        raise click.BadParameter(f"{value} is a directory; give a file path", ctx, param)
    base = _nearest_existing(value.parent)
    if not base.is_dir():
        raise click.BadParameter(f"{base} exists and is not a directory", ctx, param)
    return value


def _opset(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """An opset export can write here (trust.export_opsets: the toolkit's range, capped by the
    installed onnx and ONNX Runtime), refused before any work rather than after the trace."""
    from onetrans_trt.trust import check_opset

    try:
        return check_opset(value)
    except InputError as e:
        raise click.BadParameter(str(e).removeprefix("--opset "), ctx, param) from None


def _goldens_out(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """--save-goldens replaces its directory: only a goldens directory, an empty one or a new one."""
    value = _out_dir(ctx, param, value)
    if value is not None and value.is_dir() and any(value.iterdir()) and not (value / "meta.json").is_file():
        raise click.BadParameter(f"{value} holds files and is not a goldens directory (no meta.json); "
                                 "refusing to replace it", ctx, param)
    return value


def _given(*names: str) -> list[str]:
    """Of the current command's parameters ``names``, those given on the command line, spelt
    as given (``--no-fuse-attention``, not ``fuse_attention``)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    params = {p.name: p for p in ctx.command.params}
    out = []
    for name in names:
        if ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        p = params[name]
        off = getattr(p, "secondary_opts", None) and ctx.params.get(name) is False
        out.append(p.secondary_opts[0] if off else p.opts[0])
    return out


def _refuse(names: tuple[str, ...] | list[str], where: str, instead: str) -> None:
    """Options that would be silently ignored ``where`` are refused (exit 2), in one line that
    says what applies instead; never accepted and dropped."""
    given = _given(*names)
    if given:
        raise InputError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {where}: {instead}")


DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        callback=_out_dir,
                        help="Where datasets are cached (default: $ONETRANS_TRT_DATA or ~/.cache/onetrans-trt).")
JSON_OUT = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _log_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is None:
        return None
    if value.is_dir():
        raise click.BadParameter(f"{value} is a directory; give a file path", ctx=ctx, param=param)
    if not _nearest_existing(value.parent).is_dir() or not value.parent.is_dir():
        raise click.BadParameter(f"{value.parent} does not exist", ctx=ctx, param=param)
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onetrans-trt")
@click.option("-v", "--verbose", count=True,
              help="More to the console: -v our progress notes and what the libraries we drive said "
                   "(exporter, ONNX Runtime, ModelOpt, TensorRT, Python warnings); -vv debug.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors (and JSON asked for with --json, and rank's result).")
@click.option("--log-file", type=click.Path(dir_okay=True, path_type=Path), default=None, callback=_log_file,
              help="Also write everything (debug level, ours and the libraries') to this file.")
def cli(verbose: int, quiet: bool, log_file: Path | None) -> None:
    """Take trained OneTrans / HyFormer rankers to fast, numerically trusted inference.

    \b
    The pipeline, one command per stage:
      fetch-data  get MovieLens-100K into the data cache
      train       train a model on it; writes a checkpoint directory
      info        summarize a checkpoint
      rank        score a serving request with a checkpoint or a build
      export      checkpoint -> user encoder + candidate scorer ONNX graphs (a build)
      graphs      re-run the graph passes on a build
      inspect     a build in words: graphs, ops, sizes, FLOPs per request
      convert     FP16 variants of a build's graphs (+ quality report)
      calibrate   INT8 Q/DQ variants from real calibration data (+ quality report)
      build       TensorRT engines (profiles, command lines; exit 3 without TensorRT)
      validate    every backend vs PyTorch: numbers, ranking, first divergence, reports
      serve-repo  a Triton Inference Server model repository for a build
      plugins     our custom attention ops and which backends work here
      bench       side-by-side measurements (ratios from interleaved runs)

    Every command takes --help. Exit codes: 0 ok, 1 check failed, 2 bad input,
    3 missing optional capability (TensorRT/GPU).
    """
    from onetrans_trt import log

    if verbose and quiet:
        raise click.UsageError("-v and -q exclude each other")
    log.configure(-1 if quiet else verbose, log_file)


@cli.command("fetch-data")
@DATA_DIR
def fetch_data(data_dir: Path | None) -> None:
    """Download MovieLens-100K (from the recbole==1.2.1 wheel) into the data cache.

    The data is never redistributed with this toolkit: its licence forbids it.
    """
    from onetrans_trt.data.movielens import fetch_movielens

    click.echo(str(fetch_movielens(data_dir)))


# train: the options a model family does not read -> (parameters, where, what applies instead)
TRAIN_NOT_FOR: dict[str, tuple[tuple[str, ...], str, str]] = {
    "onetrans": (("seq_encoder", "hy_form", "seq_attention", "seq_max_len"), "to --model onetrans",
                 "--seq-encoder, --hy-form, --seq-attention and --seq-max-len are HyFormer's; OneTrans's S-token "
                 "queries are set with --pyramid"),
    "hyformer": (("pyramid",), "to --model hyformer",
                 "--pyramid is OneTrans's; HyFormer's sequence encoder is set with --seq-encoder"),
    "baseline": (("pyramid", "seq_encoder", "ns_tokenizer", "hy_form", "seq_attention", "seq_max_len"),
                 "to --model baseline",
                 "the DIN-style baseline has no pyramid, sequence encoder or NS-tokenizer; --preset sets "
                 "its width"),
}


def _seq_caps_syntax(ctx: click.Context, param: click.Parameter, value: str | None) -> str | list[int] | None:
    """``--seq-max-len`` parsed before any work: "auto", "off" or the counts (their number is
    checked against the schema's sequences in :func:`_seq_caps`)."""
    if value is None or value.strip() in ("auto", "off"):
        return value and value.strip()
    if not all(p.strip().isdigit() and int(p) >= 1 for p in value.split(",")):
        raise click.BadParameter(f"{value!r}: expected auto, off or positive counts, one per sequence "
                                 f"(e.g. 48,24,16)")
    return [int(p) for p in value.split(",")]


def _seq_caps(value: str | list[int] | None, ml) -> list[int] | None:
    """``train --seq-max-len``: per-sequence caps, or None (no cap)."""
    if value == "off":
        return None
    if value in (None, "auto"):
        return ml.sequence_caps(ml.train)
    names = [q.name for q in ml.schema.sequences]
    if len(value) != len(names):
        raise InputError(f"--seq-max-len {','.join(map(str, value))}: expected {len(names)} counts, one per "
                         f"sequence ({', '.join(names)}), e.g. {','.join(['32'] * len(names))}")
    return value


@cli.command()
@click.option("--model", "family", type=click.Choice(["onetrans", "hyformer", "baseline"]), default="onetrans",
              show_default=True, help="Model family: OneTrans, HyFormer (each rating-bucket history its own "
                                      "sequence with its own global queries) or the DIN-style baseline.")
@click.option("--preset", type=click.Choice(["tiny", "small", "onetrans-s", "onetrans-l", "hyformer-paper"]),
              default="small", show_default=True,
              help="Architecture size (onetrans-s/-l: OneTrans only; hyformer-paper: HyFormer only).")
@click.option("--data", type=click.Choice(["ml-100k"]), default="ml-100k", show_default=True,
              help="Training data.")
@click.option("--out", type=click.Path(path_type=Path), required=True, callback=_out_dir,
              help="Checkpoint directory to write.")
@click.option("--epochs", type=click.IntRange(1), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True,
              help="Train this many seeds (seed, seed+1, ...); metrics.json reports each and the "
                   "mean; the first seed's weights are saved.")
@click.option("--max-history", type=click.IntRange(1), default=50, show_default=True,
              help="Most behaviour events kept per user (newest).")
@click.option("--merge", type=click.Choice(["timestamp_aware", "timestamp_agnostic"]),
              default="timestamp_aware", show_default=True, help="How behaviour sequences are merged.")
@click.option("--ns-tokenizer", type=click.Choice(["auto_split", "group"]), default="auto_split",
              show_default=True, help="OneTrans, HyFormer: how the non-sequential features become tokens "
                                      "(refused for the baseline, which has none).")
@click.option("--pyramid", type=click.Choice(["linear", "off"]), default="linear", show_default=True,
              help="OneTrans only: S-token queries shrink layer by layer (linear) or not (off).")
@click.option("--seq-encoder", type=click.Choice(["transformer", "longer", "swiglu"]), default=None,
              help="HyFormer only: the per-layer sequence encoder (default: the preset's: longer for small and "
                   "hyformer-paper, as the paper; transformer for tiny).")
@click.option("--hy-form", type=click.Choice(["paper", "wave1"]), default=None,
              help="HyFormer only: 'paper' (default) builds the model as the paper writes it: no sink in query "
                   "decoding, no norm before the K/V projections, full (bidirectional) self-attention in the "
                   "transformer encoder, N query FFNs over the NS tokens and every sequence's pool, heads over "
                   "queries and NS tokens. 'wave1': the first release's form (sink, K/V norm, causal, one query "
                   "FFN over the own pool, heads over the queries).")
@click.option("--seq-attention", type=click.Choice(["bidirectional", "causal"]), default=None,
              help="HyFormer only: self-attention of the transformer/longer sequence encoders (default: the "
                   "form's, except the LONGER presets small and hyformer-paper: causal, as LONGER). Only causal "
                   "states append (`export --append`, `rank --append`).")
@click.option("--seq-max-len", "seq_max_len", default=None, metavar="auto|off|N,N,...", callback=_seq_caps_syntax,
              help="HyFormer only: the most events kept per sequence (the newest; each sequence is laid out at "
                   "its cap, so a cap is also less work). 'auto' (default): from the training data, per sequence "
                   "the fewest events (a multiple of 8) that hold the whole sequence in 97% of the samples; 'off': "
                   "no cap; or one count per sequence, in the schema's order.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N training samples (quick runs, tests).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@DATA_DIR
@JSON_OUT
def train(family, preset, data, out, epochs, batch_size, lr, seed, seeds, max_history, merge,
          ns_tokenizer, pyramid, seq_encoder, hy_form, seq_attention, seq_max_len, limit, force, data_dir,
          as_json) -> None:
    """Train a model on MovieLens-100K and write a checkpoint directory.

    \b
    OUT/config.json        architecture + feature schema + vocabularies
    OUT/model.safetensors  weights (no pickle)
    OUT/metrics.json       test AUC and logloss per task (each seed and the mean)

    \b
    Example:
      onetrans-trt train --model onetrans --preset small --out runs/small --epochs 2
    """
    from onetrans_trt.data.movielens import TASKS, MovieLens, Split
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.training import train_model

    _refuse(*TRAIN_NOT_FOR[family])
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    ml = MovieLens(data_dir, max_history=max_history, merge_mode=merge)
    if limit is not None:
        ml.train = Split(ml.train.users[:limit], ml.train.positions[:limit], ml.train.labels[:limit])
    extra: dict = {"pyramid": pyramid}
    if family == "hyformer":
        from onetrans_trt.models.config import HYFORMER_WAVE1

        # paper: the presets as they are (the paper's form; the LONGER presets causal, as LONGER)
        extra = {**(HYFORMER_WAVE1 if hy_form == "wave1" else {}), **({"seq_encoder": seq_encoder} if seq_encoder else {})}
        if seq_attention:
            if (seq_encoder or "transformer") == "swiglu":
                raise InputError("--seq-attention does not apply to --seq-encoder swiglu: the SwiGLU encoder has "
                                 "no self-attention; drop --seq-attention, or pick --seq-encoder transformer or "
                                 "longer")
            extra["seq_attention"] = seq_attention
        caps = _seq_caps(seq_max_len, ml)
        if caps is not None:
            extra["seq_max_len"] = caps
    cfg = ModelConfig.from_preset(preset, ml.schema, family=family, tasks=list(TASKS),
                                  ns_tokenizer=ns_tokenizer, **extra)
    runs, first = [], None
    with _progress() as prog:
        for s in range(seed, seed + seeds):
            task = prog.add_task(f"train {family}/{preset} seed {s}", total=None, status="")

            def report(step: int, total: int, loss: float, task=task) -> None:
                prog.update(task, completed=step, total=total, status=f"loss {loss:.4f}")

            model, metrics = train_model(cfg, ml, epochs=epochs, batch_size=batch_size, lr=lr,
                                         seed=s, progress=report)
            runs.append(metrics)
            first = first or model
    mean = {t: {m: sum(r["test"][t][m] for r in runs) / len(runs) for m in ("auc", "logloss")}
            for t in cfg.tasks}
    summary = {"model": family, "preset": preset, "data": data, "seeds": [r["seed"] for r in runs],
               "test_mean": mean, "runs": runs}
    save_checkpoint(first, out, metrics=summary, force=force)
    human = "\n".join(
        [f"wrote {out}"] + [f"  {t}: test AUC {v['auc']:.4f}  logloss {v['logloss']:.4f}"
                            f"  (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''})"
                            for t, v in mean.items()])
    _emit({"out": str(out), **summary}, as_json, human)


def dense_parameters(model) -> int:
    """Parameters outside embedding tables (the papers' "dense parameters")."""
    import torch

    sparse = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return int(sum(p.numel() for p in model.parameters() if id(p) not in sparse))


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@JSON_OUT
def info(ckpt: Path, as_json: bool) -> None:
    """Summarize a checkpoint: architecture, schema, pyramid, parameters, metrics."""
    from onetrans_trt.models.checkpoint import checkpoint_hash, load_checkpoint, read_metrics
    from onetrans_trt.models.config import PAPER_FIGURES

    model = load_checkpoint(ckpt)
    cfg = model.cfg
    s = cfg.schema
    d = {
        "path": str(ckpt), "sha256": checkpoint_hash(ckpt), "family": cfg.family, "preset": cfg.preset,
        "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
        "ns_tokenizer": cfg.ns_tokenizer, "ns_tokens": cfg.num_ns_tokens, "tasks": cfg.tasks,
        "pyramid_schedule": cfg.query_schedule() if cfg.family == "onetrans" else None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dense_parameters": dense_parameters(model),
        "paper": PAPER_FIGURES.get(cfg.preset or ""),
        "schema": {
            "max_history": s.max_history, "merge_mode": s.merge_mode,
            "features": {g: [f.name for f in s.features_in(g)] for g in ("user", "item", "context")},
            "sequences": {q.name: list(q.fields) for q in s.sequences},
            "tables": {t.name: t.size for t in s.tables.values()},
        },
        "metrics": read_metrics(ckpt),
    }
    lines = [f"{ckpt}: {cfg.family} ({cfg.preset or 'custom'}), {d['parameters']:,} parameters",
             f"  d_model {cfg.d_model}, {cfg.n_heads} heads, {cfg.n_layers} layers, "
             f"{cfg.num_ns_tokens} NS-tokens ({cfg.ns_tokenizer}), tasks {', '.join(cfg.tasks)}",
             f"  history: up to {s.max_history} events, {len(s.sequences)} sequences, {s.merge_mode}"]
    dense = f"  dense parameters (embedding tables excluded, as the papers count): {d['dense_parameters']:,}"
    if d["paper"]:
        dense += f"; the paper's {cfg.preset}: {d['paper']['dense_parameters']:,} ({d['paper']['source']})"
    lines.append(dense)
    if cfg.family == "hyformer":
        from onetrans_trt.models.config import HYFORMER_FORMS

        opts = {k: getattr(cfg, k) for k in HYFORMER_FORMS["paper"]}
        form = next((name for name, f in HYFORMER_FORMS.items() if {**f, "seq_attention": None} ==
                     {**opts, "seq_attention": None}), "custom")
        per = {q.name: cfg.hy_seq(j) for j, q in enumerate(s.sequences)}
        d["hyformer"] = {"seq_encoder": cfg.seq_encoder, "queries_per_sequence": cfg.hy_queries,
                         "longer_window": cfg.longer_window, "form": form, **opts, "per_sequence": per}
        shape = {n: {k: v for k, v in p.items() if k != "max_len"} for n, p in per.items()}
        caps = "" if not cfg.seq_max_len else "; newest events kept: " + ", ".join(
            f"{n} {p['max_len']}" for n, p in per.items())
        if len({json.dumps(v, sort_keys=True) for v in shape.values()}) == 1:
            lines.append(f"  HyFormer: {len(s.sequences)} sequences x {cfg.hy_queries} global "
                         f"quer{'y' if cfg.hy_queries == 1 else 'ies'}, {cfg.seq_encoder} sequence encoder"
                         + (f" (window {cfg.longer_window})" if cfg.seq_encoder == "longer" else "")
                         + f", {cfg.seq_attention} attention, mixer tokens "
                         f"{cfg.hy_total_queries + cfg.num_ns_tokens}" + caps)
        else:
            lines.append(f"  HyFormer: {len(s.sequences)} sequences, {cfg.seq_attention} attention, mixer tokens "
                         f"{cfg.hy_total_queries + cfg.num_ns_tokens}; per sequence: " + "; ".join(
                             f"{name} {v['queries']} quer{'y' if v['queries'] == 1 else 'ies'}, {v['encoder']}"
                             + (f" window {v['window']}" if v["encoder"] == "longer" else "")
                             + (f", newest {v['max_len']}" if v["max_len"] else "") for name, v in per.items()))
        lines.append(f"  form: {form} (sink {'yes' if cfg.hy_sink else 'no'}, K/V norm "
                     f"{'yes' if cfg.hy_kv_norm else 'no'}, queries from {cfg.hy_query_gen.replace('_', ' ')}, "
                     f"heads read {cfg.hy_head_input.replace('_ns', ' and NS tokens')})")
    if d["pyramid_schedule"] is not None:
        per_layer = ", ".join("all" if q is None else str(q) for q in d["pyramid_schedule"])
        lines.append(f"  pyramid ({cfg.pyramid if isinstance(cfg.pyramid, str) else 'custom'}): S-tokens kept as "
                     f"queries per layer: {per_layer} (of {s.s_max_len}; the last layer only gives K/V)")
    m = d["metrics"]
    if m and "test_mean" in m:
        for t, v in m["test_mean"].items():
            lines.append(f"  test {t}: AUC {v['auc']:.4f}, logloss {v['logloss']:.4f}")
    lines.append(f"  sha256 {d['sha256']} (config.json + model.safetensors)")
    _emit(d, as_json, "\n".join(lines))


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--request", "request_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A request JSON file (one object, a list, or JSON lines).")
@click.option("--backend", type=click.Choice(["torch-split", "torch-unified", "torch-compile", "torch-compile-static",
                                              "ort", "ort-fp16", "ort-int8", "ort-int8-qdq", "ort-int8-cpu",
                                              "ort-unified", "trt", "trt-fp16", "trt-int8"]),
              default=None, help="For a checkpoint: torch-split (default; encodes the user once), "
                                 "torch-compile / torch-compile-static (the same split through torch.compile, "
                                 "dynamic or per-shape; compiles on the first request) or "
                                 "torch-unified (the full model per candidate, the naive path). For a "
                                 "build: ort (default), ort-unified (needs export --unified), ort-fp16, "
                                 "ort-int8 (on CPU: int8-cpu/ when the build has it, else int8/), ort-int8-qdq "
                                 "(int8/, TensorRT's graphs), ort-int8-cpu (int8-cpu/), trt*.")
@click.option("--limits", "limits_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file of request limits (max_history, max_candidates, max_request_bytes, "
                   "over_limit refuse|truncate); defaults apply without it.")
@click.option("--store", "store_url", default=None, metavar="URL",
              help="Keep users' states across requests and processes: redis://host:port/db"
                   "[?ttl_s=3600&max_mb=64&timeout_s=0.25] (shared; a store that is down only costs "
                   "local encodes) or memory://[?max_mb=256]. Split backends only. With -v the "
                   "store's hits, misses and errors are logged.")
@click.option("--append", "append", is_flag=True, default=False,
              help="With --store: a user whose history grew since the stored one has only the new events "
                   "encoded against the stored state, where that equals a full encode (else the whole "
                   "history is encoded); each result's user_state says which and why. torch-split, or "
                   "ort on a build exported with --append.")
def rank(ckpt: Path, request_path: Path, backend: str | None, limits_path: Path | None,
         store_url: str | None, append: bool) -> None:
    """Score a request's candidates; prints JSON (per-task probabilities, logits, order).

    CKPT is a checkpoint directory or a build directory (from `export`).

    \b
    Request format (see README):
      {"user": {...}, "context": {...}, "history": [{"sequence": ..., "timestamp": ...,
       <fields>}], "candidates": [{<item features>}]}
    Limits (--limits FILE, defaults shown): {"max_history": 10000, "max_candidates": 10000,
      "max_request_bytes": 16777216, "over_limit": "refuse" | "truncate"}
    """
    from onetrans_trt.data.requests import RequestLimits, load_requests
    from onetrans_trt.runtime.ranker import Ranker

    if append and store_url is None:
        raise InputError("--append needs --store URL (the stored states are what new events are appended to)")
    if store_url is not None:
        from onetrans_trt.runtime.store import parse_store_url

        parse_store_url(store_url)  # a bad URL is refused before any model loads
    limits = RequestLimits.load(limits_path) if limits_path else RequestLimits()
    ranker = Ranker.load(ckpt, backend=backend, limits=limits, store=store_url, append=append)
    reqs = load_requests(request_path, limits)
    try:
        results = [ranker.rank(r).to_json() for r in reqs]
    finally:
        if ranker.store is not None:
            from onetrans_trt.log import get_logger

            s = ranker.store.stats()
            get_logger("onetrans_trt.cli").info(
                f"store: {s['hits']} hits, {s['misses']} misses, {ranker.encoder_runs} encoder runs, "
                f"{s.get('store_errors', 0)} store errors, {s.get('corrupt', 0)} corrupt entries dropped, "
                f"{ranker.append_runs} appends")
            ranker.store.close()
    click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))


@cli.command("schema")
@click.argument("name", metavar="NAME", type=click.Choice(list(SCHEMAS)))
@click.option("--out", type=click.Path(path_type=Path), default=None, callback=_out_file,
              help="Write the schema to this file (atomically: whole or not at all) instead of stdout.")
def schema_cmd(name: str, out: Path | None) -> None:
    """Print the JSON Schema (draft 2020-12) of a JSON document the toolkit reads.

    \b
    NAME:
      request   one serving request (a request file holds one, a list of them, or JSON
                lines): rank --request, validate --requests, Ranker.rank
      limits    request limits: rank --limits, Ranker(limits=...)
      policy    tolerances per precision: validate --policy
      manifest  a build's manifest.json (export writes it; every command that reads a
                build checks it)

    The schema is the one the toolkit checks with: a document it refuses fails the schema,
    except for what JSON Schema cannot say (a request's integers beyond 64 bits or values
    nested deeper than 16 levels; a manifest's rules per model family) and what depends on
    a model (feature names and values, checked when a request is encoded).

    \b
    onetrans-trt schema request                          # to stdout
    onetrans-trt schema request --out request.schema.json
    """
    from onetrans_trt.contracts import json_schema
    from onetrans_trt.io import atomic_write_json

    schema = json_schema(name)
    if out is None:
        click.echo(json.dumps(schema, indent=2))
        return
    atomic_write_json(out, schema)
    _human(f"wrote {out}")


@cli.command("export")
@click.argument("ckpt", type=click.Path(path_type=Path), required=False)
@click.option("--module", "module_ref", default=None,
              help="Your own ranker instead of a checkpoint: FILE.py:FACTORY or package.module:FACTORY "
                   "(the factory returns an nn.Module following the split protocol). Runs your code.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --module: a state dict (.safetensors, or a PyTorch file read with "
                   "torch.load(weights_only=True)); bf16/fp16/fp32.")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --module: the split spec JSON (default: the factory module's SPEC).")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --module: example inputs (.npz holding every spec input by name) for the checks.")
@click.option("--check-only", is_flag=True, help="With --module: run the protocol checks and stop.")
@click.option("--out", type=click.Path(path_type=Path), default=None, callback=_out_dir,
              help="Build directory to write (required unless --check-only).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, callback=_opset,
              help=f"ONNX opset: {OPSETS[0]}..{OPSETS[1]} (the range every stage loads), capped by what the "
                   "installed onnx and ONNX Runtime support.")
@click.option("--no-passes", is_flag=True, help="Keep the raw split graphs (debugging): no pyramid, "
                                                 "no-broadcast check or cleanup.")
@click.option("--fuse-attention/--no-fuse-attention", default=True, show_default=True,
              help="Replace the attention subgraphs with our SharedPrefixAttention / "
                   "TailCausalAttention nodes (ORT runs their ONNX function bodies; TensorRT "
                   "resolves them to our plugins).")
@click.option("--unified", is_flag=True, help="Also write unified.onnx, the naive model (full "
                                              "sequence per candidate), for the ort-unified backend.")
@click.option("--samples", "n_samples", type=click.IntRange(1, 100), default=4, show_default=True,
              help="Real requests saved with their PyTorch outputs under samples/.")
@click.option("--append", "append_graph", is_flag=True,
              help="Also write user_encoder_append.onnx: a cached user's K/V extended by its k newest events "
                   "(OneTrans with timestamp_aware streams, HyFormer). `rank --store URL --append` (the Ranker's "
                   "append=True) uses it.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@DATA_DIR
@JSON_OUT
def export_cmd(ckpt, module_ref, weights, spec_path, inputs_path, check_only, out, opset, no_passes, fuse_attention,
               unified, n_samples, append_graph, force, data_dir, as_json) -> None:
    """Export a OneTrans/HyFormer checkpoint, or your own ranker (--module), to a build
    directory of ONNX graphs.

    \b
    BUILD/user_encoder.onnx      history -> each layer's S-token K/V (batched over users)
    BUILD/candidate_scorer.onnx  C candidates + one user's K/V -> per-task logits and probs
    BUILD/serving.onnx           the traced serving graph both are cut from
    BUILD/manifest.json          checkpoint hash, versions, inputs/outputs, dynamic dims,
                                 pyramid schedule, passes applied
    BUILD/samples/               real requests, inputs (npz + polygraphy JSON), PyTorch outputs
    BUILD/user_encoder_append.onnx  with --append: cached K/V + k new events -> the K/V
                                 of the longer history (exact where can_append says so)

    \b
    Try the saved samples with polygraphy:
      polygraphy run BUILD/candidate_scorer.onnx --onnxrt \\
          --load-inputs BUILD/samples/candidate_scorer_inputs.json
    """
    if module_ref is not None:
        _refuse(("no_passes", "fuse_attention", "n_samples", "data_dir"), "to --module",
                "a module build runs the passes its protocol needs (shared-prefix, no-broadcast, cleanup) and "
                "saves one sample from --inputs or its spec")
        _refuse(("append_graph",), "to --module", "the append graph extends a OneTrans or HyFormer checkpoint's "
                                                "cached user state; a module build has none")
        if check_only:
            _refuse(("out", "opset", "unified", "force"), "with --check-only",
                    "it runs the protocol checks and writes nothing; drop --check-only to export")
    elif no_passes:
        _refuse(("fuse_attention",), "with --no-passes", "no graph pass runs, fuse-attention included")
    if append_graph and module_ref is None and ckpt is not None:
        from onetrans_trt.models.append import can_append
        from onetrans_trt.models.config import read_config

        cfg = read_config(ckpt)
        if cfg.family not in ("onetrans", "hyformer"):
            _refuse(("append_graph",), f"to a {cfg.family} checkpoint",
                    "appending new events to a cached user state covers OneTrans and HyFormer")
        elif cfg.family == "hyformer":
            from onetrans_trt.models.append_hyformer import appendable

            if not appendable(cfg)[0]:
                _refuse(("append_graph",), "to this HyFormer checkpoint", appendable(cfg)[1])
        elif cfg.family == "onetrans" and not can_append(cfg, 0, 1)[0]:
            _refuse(("append_graph",), f"to a {cfg.schema.merge_mode} checkpoint", can_append(cfg, 0, 1)[1]
                    + "; only timestamp_aware streams append")
    if out is None and not check_only:
        raise InputError("--out BUILD is required (the build directory to write)")
    if module_ref is not None:
        return _export_module(ckpt, module_ref, weights, spec_path, inputs_path, check_only, out, opset, unified,
                              force, as_json)
    if ckpt is None:
        raise InputError("give a checkpoint directory (CKPT) or --module FILE.py:FACTORY")
    extra = [n for n, v in (("--weights", weights), ("--spec", spec_path), ("--inputs", inputs_path),
                            ("--check-only", check_only)) if v]
    if extra:
        raise InputError(f"{', '.join(extra)} go with --module (a checkpoint carries its own weights and schema)")
    from onetrans_trt.export.api import export_build

    with _progress() as prog:
        task = prog.add_task("export", total=None, status="")
        manifest = export_build(ckpt, out, opset=opset, passes=not no_passes, fuse_attention=fuse_attention,
                                force=force, unified=unified,
                                n_samples=n_samples, data_dir=data_dir,
                                progress=lambda msg: prog.update(task, status=msg))
        if append_graph:
            from onetrans_trt.export.api import read_manifest
            from onetrans_trt.export.append import export_append

            prog.update(task, status="append graph")
            export_append(ckpt, out)
            manifest = read_manifest(out)
    nodes = {k: v for k, v in ((r["graph"], r["nodes_after"]) for r in manifest["passes"])}
    human = (f"wrote {out}\n  user_encoder.onnx, candidate_scorer.onnx"
             f"{', unified.onnx' if unified else ''}{', user_encoder_append.onnx' if append_graph else ''}; passes: "
             f"{', '.join(r['pass'] for r in manifest['passes'])}; nodes {nodes}")
    _emit({"out": str(out), "manifest": manifest}, as_json, human)


def _export_module(ckpt, module_ref, weights, spec_path, inputs_path, check_only, out, opset, unified, force,
                   as_json) -> None:
    """``export --module``: the user's ranker through the protocol checks, then to a build."""
    from onetrans_trt.export.module import check_only as run_checks
    from onetrans_trt.export.module import export_module, load_inputs, load_user_module

    if ckpt is not None:
        raise InputError(f"give either a checkpoint ({ckpt}) or --module, not both")
    module, spec, source = load_user_module(module_ref, weights, spec_path)
    # the manifest records where the code and weights are for later stages run from anywhere
    file_part, sep, factory_name = module_ref.rpartition(":")
    if sep and file_part.endswith(".py"):
        source["module"] = f"{Path(file_part).resolve()}:{factory_name}"
    if isinstance(source.get("weights"), dict) and source["weights"].get("path"):
        source["weights"]["path"] = str(Path(source["weights"]["path"]).resolve())
    example = load_inputs(inputs_path, spec) if inputs_path is not None else None
    with _progress() as prog:
        task = prog.add_task("export", total=None, status="")

        def say(msg: str) -> None:
            prog.update(task, status=msg)
            if not sys.stderr.isatty() and not _quiet():
                click.echo(msg, err=True)

        if check_only:
            report = run_checks(module, spec, example, progress=say)
        else:
            manifest = export_module(module, spec, example, out, opset=opset, unified=unified, force=force,
                                     source=source, progress=say)
            report = manifest["protocol"]["checks"]
    lines = [f"protocol checks passed on {len(report['cases'])} cases: split == unified (max abs "
             f"{report['max_abs']:.2e}, tolerance {report['tolerance']:g}); user state: {report['state_checked']}; "
             f"candidates independent (max abs {report['independence_max_abs']:.2e})"]
    if check_only:
        _emit({"checks": report}, as_json, "\n".join(lines))
        return
    lines.append(f"wrote {out}: user_encoder.onnx, candidate_scorer.onnx{', unified.onnx' if unified else ''}; "
                 f"passes: {', '.join(r['pass'] for r in manifest['passes'])}")
    _emit({"out": str(out), "manifest": manifest}, as_json, "\n".join(lines))


@cli.command("graphs")
@click.argument("build", type=click.Path(path_type=Path), required=False)
@click.option("--passes", default=None, help="Comma-separated passes for both graphs, in order "
                                             "(default: pyramid,cleanup for the user encoder and "
                                             "no-broadcast,cleanup for the scorer).")
@click.option("--no-passes", is_flag=True, help="Only split; apply no pass.")
@click.option("--list", "list_passes", is_flag=True, help="List the available passes and exit.")
@JSON_OUT
def graphs_cmd(build, passes, no_passes, list_passes, as_json) -> None:
    """Re-run the graph passes on a build (re-split from BUILD/serving.onnx)."""
    from onetrans_trt.export.api import rerun_passes
    from onetrans_trt.graphs import describe_passes

    if list_passes:
        desc = describe_passes()
        _emit([{"pass": n, "description": t} for n, t in desc.items()], as_json,
              "\n".join(f"{n:15s} {t}" for n, t in desc.items()))
        return
    if build is None:
        raise InputError("give a BUILD directory (or --list to list the passes)")
    if no_passes and passes:
        raise InputError("give --passes or --no-passes, not both")
    chosen = [] if no_passes else ([p.strip() for p in passes.split(",") if p.strip()] if passes else None)
    manifest = rerun_passes(build, chosen, chosen)
    from onetrans_trt.lineage import survey

    derived = survey(build, manifest)  # variants/engines made from the graphs just replaced: stale
    human = "\n".join([f"{r['pass']:14s} {r['graph']:18s} nodes {r['nodes_before']} -> {r['nodes_after']}"
                       for r in manifest["passes"]] + [f"{k}: {msg}" for k, v in derived.items() for msg in v.values()])
    _emit({"passes": manifest["passes"], **derived}, as_json, human)


@cli.command("inspect")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--candidates", type=click.IntRange(1), default=128, show_default=True,
              help="Candidates per request for the FLOP count.")
@click.option("--history", type=click.IntRange(1), default=None,
              help="S-tokens in the history for the FLOP count (default and most: the model's maximum; "
                   "a larger value is clamped to it, with a note).")
@JSON_OUT
def inspect_cmd(build, candidates, history, as_json) -> None:
    """Describe a build: manifest, node counts by op, sizes, theoretical FLOPs per request
    (user encoder once + C candidates) against the unified model (C full sequences)."""
    from onetrans_trt.export.inspect import describe, inspect_build

    info = inspect_build(build, candidates=candidates, history=history)
    for note in info["notes"]:  # a clamped --history is said, as bench says it
        click.echo(f"note: {note}", err=True)
    _emit(info, as_json, describe(info))


@cli.command("doctor")
@JSON_OUT
def doctor_cmd(as_json: bool) -> None:
    """What this machine can do, and what to install for what it cannot.

    \b
    Versions of Python, numpy, torch, Triton, TensorRT, ONNX Runtime (and its execution
    providers), ModelOpt, Polygraphy; the GPU, its driver and the highest PTX ISA the
    driver loads (our kernels' PTX is capped to it). Then each capability (ORT on CPU or
    GPU, INT8 calibration, Triton kernels, TensorRT engines, gpu-check) with yes/no and
    the install line for each missing piece. `build` and `make gpu-check` print the same.
    """
    from onetrans_trt import doctor

    rep = doctor.report()
    _emit(rep, as_json, "\n".join(doctor.lines(rep)))


@cli.command("plugins")
@JSON_OUT
def plugins_cmd(as_json: bool) -> None:
    """List our custom attention ops, their backends, and what is available here.

    \b
    Backends of each op:
      reference       the PyTorch definition (the ground truth of every test)
      onnx_function   ONNX function body of standard ops: ONNX Runtime runs fused graphs
      triton          flash-style Triton kernel: CPU interpreter in tests, AOT PTX/cubin
      tensorrt_plugin tensorrt.plugin (QDP) with an ahead-of-time implementation
    """
    from onetrans_trt.plugins import OPS, backend_status

    status = backend_status()
    data = {name: {"summary": OPS[name].summary, "backends": b} for name, b in status.items()}
    lines = []
    for name, d in data.items():
        lines.append(f"{name}: {d['summary']}")
        lines += [f"  {k:16s} {v}" for k, v in d["backends"].items()]
    _emit(data, as_json, "\n".join(lines))


def _quality(build: Path, variant: str, n: int, data_dir, prog) -> dict:
    from onetrans_trt.calibrate.quality import write_quality

    task = prog.add_task(f"quality {variant}", total=n, status="")
    return write_quality(build, variant, n_requests=n, data_dir=data_dir,
                         progress=lambda i, k: prog.update(task, completed=i, total=k))


def _quality_lines(rep: dict) -> list[str]:
    lines = [f"  {t}: AUC {m['auc']:.4f} (PyTorch {m['torch_auc']:.4f}, delta {m['delta_auc']:+.5f}), "
             f"logloss delta {m['delta_logloss']:+.5f}" for t, m in rep["metrics"].items()]
    r = rep["ranking"]
    lines.append(f"  ranking vs PyTorch: top-10 overlap {r['top10_overlap_mean']:.3f} (min {r['top10_overlap_min']:.2f}), "
                 f"Kendall tau {r['kendall_tau_mean']:.3f}; max |logit error| {rep['max_abs_logit_error']:.2e}")
    if rep.get("note"):
        lines.append(f"  note: {rep['note']}")
    return lines


MODULE_OPT = click.option("--module", "module_ref", default=None,
                          help="A build from `export --module`: the module the quality report compares with "
                               "(default: the one the manifest names). Runs your code.")
WEIGHTS_OPT = click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help="With --module: its weights (default: the ones the manifest names).")
SYNTHETIC_QUALITY = click.option("--synthetic", is_flag=True,
                                 help="A module build: the quality report (and calibration) on random inputs drawn "
                                      "from the spec; only when asked, never a silent fallback.")


def _module_build(build: Path) -> bool:
    from onetrans_trt.export.api import read_manifest

    return "protocol" in read_manifest(build)


def _module_quality_plan(build: Path, n: int, inputs_path, synthetic: bool, module_ref, weights):
    """Before any work: the module and the requests of a module build's quality report
    (None when n == 0); a missing source of data is an InputError here, not after converting."""
    if not n:
        return None
    from onetrans_trt.calibrate.module import load_module_for, quality_requests
    from onetrans_trt.validate.module import read_spec

    reqs, data = quality_requests(read_spec(build), inputs=inputs_path, synthetic=synthetic, count=n)
    return load_module_for(build, module_ref, weights), reqs, data


def _module_quality(build: Path, variant: str, plan, prog) -> dict:
    from onetrans_trt.calibrate.module import write_module_quality

    module, reqs, data = plan
    task = prog.add_task(f"quality {variant}", total=len(reqs), status="")
    return write_module_quality(build, variant, module, reqs, data,
                                progress=lambda i, k: prog.update(task, completed=i, total=k))


def _checkpoint_only(build: Path, **given: Any) -> None:
    """Options that only a module build takes, refused on a checkpoint build."""
    named = [k for k, v in given.items() if v not in (None, False)]
    if named:
        raise InputError(f"{build} was exported from a checkpoint: {', '.join(named)} "
                         f"{'is' if len(named) == 1 else 'are'} for builds from `export --module`")


def _unread_quality_options(module_build: bool, n: int, inputs_path, reads_data: bool, *,
                            data_only_for_quality: tuple[str, ...] = (),
                            no_data: str = "with --quality-requests 0") -> None:
    """convert/calibrate: refuse the options nothing would read (exit 2, one line)."""
    if module_build:
        _refuse(("data_dir",), "to a build from `export --module`",
                "it has no dataset here; give --inputs FILE or --synthetic")
        if n == 0:
            _refuse((*data_only_for_quality, "module_ref", "weights"), "with --quality-requests 0",
                    "only the quality report reads them; drop them or ask for the report")
        elif inputs_path is not None:
            _refuse(("quality_requests",), "with --inputs on a module build",
                    "the quality report uses every request of the file (--quality-requests 0 skips it)")
    elif not reads_data:
        _refuse(("data_dir",), no_data, "nothing reads MovieLens, so no data directory is used")


@cli.command("convert")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp16"]), default="fp16", show_default=True,
              help="fp16 (INT8 is `calibrate`: --target tensorrt for GPUs, --target cpu for ONNX Runtime on CPU).")
@click.option("--kv-fp16", is_flag=True, help="Pass the K/V between the graphs in FP16 (halves the user cache).")
@click.option("--keep-fp32", default="", help="Comma-separated op types or node names to keep in FP32 "
                                              "(norms, softmax paths and the final logits always are).")
@click.option("--quality-requests", type=click.IntRange(0), default=200, show_default=True,
              help="MovieLens test requests for the quality report (0: skip it); on a module build: how many "
                   "random cases --synthetic draws.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A module build: the quality report on exactly these requests (.npz of every spec input, "
                   "'<i>/<input>' keys or bare names; or Polygraphy JSON).")
@SYNTHETIC_QUALITY
@MODULE_OPT
@WEIGHTS_OPT
@DATA_DIR
@JSON_OUT
def convert_cmd(build, precision, kv_fp16, keep_fp32, quality_requests, inputs_path, synthetic, module_ref, weights,
                data_dir, as_json) -> None:
    """Write FP16 variants of both graphs to BUILD/fp16/ and report their ranking quality
    against the float32 PyTorch model (BUILD/fp16/quality.json).

    \b
    A build from `export --module` has no dataset: its quality report compares the FP16
    split (ONNX Runtime) with the module's own unified forward (PyTorch, float32) on
    --inputs FILE or, asked for, --synthetic random inputs from the spec; this runs the
    module's code (--module/--weights, default: the manifest's). Without either, give
    --quality-requests 0.
      onetrans-trt convert BUILD --inputs requests.npz
      onetrans-trt convert BUILD --synthetic --quality-requests 50
    """
    from onetrans_trt.calibrate.fp16 import convert_build

    module_build = _module_build(build)
    _unread_quality_options(module_build, quality_requests, inputs_path, quality_requests > 0,
                            data_only_for_quality=("inputs_path", "synthetic"))
    plan = None
    if module_build:
        plan = _module_quality_plan(build, quality_requests, inputs_path, synthetic, module_ref, weights)
    else:
        _checkpoint_only(build, **{"--inputs": inputs_path, "--synthetic": synthetic, "--module": module_ref,
                                   "--weights": weights})
    info = convert_build(build, keep_fp32=[k.strip() for k in keep_fp32.split(",") if k.strip()], kv_fp16=kv_fp16)
    lines = [f"wrote {build}/fp16/ (K/V {info['kv_dtype']})"]
    rep = None
    if plan is not None:
        from onetrans_trt.calibrate.module import quality_lines

        with _progress() as prog:
            rep = _module_quality(build, "fp16", plan, prog)
        lines += quality_lines(rep)
    elif quality_requests and not module_build:
        with _progress() as prog:
            rep = _quality(build, "fp16", quality_requests, data_dir, prog)
        lines += _quality_lines(rep)
    _emit({"fp16": info, "quality": rep}, as_json, "\n".join(lines))


@cli.command("calibrate")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--data", type=click.Choice(["ml-100k"]), default=None,
              help="Where calibration requests come from: training-period MovieLens requests [default for a "
                   "checkpoint build: ml-100k; a module build takes --inputs or --synthetic].")
@click.option("--samples", type=click.IntRange(1), default=128, show_default=True,
              help="Calibration requests (each one user's history and 16 candidates); with --inputs every "
                   "request of the file is used.")
@click.option("--target", type=click.Choice(["tensorrt", "cpu"]), default="tensorrt", show_default=True,
              help="tensorrt: both graphs with explicit Q/DQ, per-channel weights (BUILD/int8/, what TensorRT "
                   "builds; `ort-int8-qdq`). cpu: the candidate scorer for ONNX Runtime's CPU integer kernels "
                   "(BUILD/int8-cpu/: per-tensor scales, 7-bit weights, exact on every x86-64 CPU; the user encoder "
                   "stays the build's float32 one; `ort-int8-cpu`, and `ort-int8` on CPU).")
@click.option("--keep-float", default="", help="Comma-separated op types or node names to leave unquantized "
                                               "(attention scores/softmax and norms always are).")
@click.option("--quality-requests", type=click.IntRange(0), default=200, show_default=True,
              help="Requests for the quality report (0: skip it); on a module build: how many random cases "
                   "--synthetic draws (with --inputs: the file's requests).")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibrate on exactly these requests instead of --data: request JSON (object, list or JSON "
                   "lines); for a module build an .npz of every spec input ('<i>/<input>' keys or bare names) or "
                   "Polygraphy JSON.")
@click.option("--synthetic", is_flag=True,
              help="Calibrate on synthetic requests (a module build: random inputs from its spec, histories empty "
                   "to over-long); only when asked: never a silent fallback.")
@MODULE_OPT
@WEIGHTS_OPT
@DATA_DIR
@JSON_OUT
def calibrate_cmd(build, data, samples, target, keep_float, quality_requests, inputs_path, synthetic, module_ref,
                  weights, data_dir, as_json) -> None:
    """INT8: calibrate on real requests (max), quantize both graphs with NVIDIA ModelOpt
    (explicit Q/DQ, per-channel weights), fuse attention, write BUILD/int8/ with the
    calibration set (calibration.npz) and the quality report (quality.json).

    \b
    A build from `export --module`: calibration on exactly --inputs FILE or on --synthetic
    random inputs from its spec (the scorer sees each user's state from the float32 user
    encoder); the quality report compares with the module's unified forward on the same
    source, which runs the module's code (--module/--weights; or --quality-requests 0).
      onetrans-trt calibrate BUILD --inputs requests.npz
      onetrans-trt calibrate BUILD --synthetic --samples 64 --quality-requests 50

    \b
    --target cpu: INT8 for ONNX Runtime on CPU (BUILD/int8-cpu/), same data options:
      onetrans-trt calibrate BUILD --target cpu
    """
    from onetrans_trt.calibrate.int8 import calibrate_build

    if inputs_path is not None and synthetic:
        raise InputError("--inputs and --synthetic exclude each other: calibrate on one source")
    if inputs_path is not None or synthetic:
        _refuse(("data",), f"with {'--inputs' if inputs_path is not None else '--synthetic'}",
                "calibrate on one source of requests")
    if inputs_path is not None:
        if not inputs_path.is_file():  # the file first: it is what the user has to fix
            raise InputError(f"--inputs {inputs_path}: missing or not a file")
        _refuse(("samples",), "with --inputs", "every request of the file is used")
    module_build = _module_build(build)
    _unread_quality_options(module_build, quality_requests, inputs_path,
                            (inputs_path is None and not synthetic) or quality_requests > 0,
                            no_data=f"with {'--inputs' if inputs_path is not None else '--synthetic'} and "
                                    "--quality-requests 0")
    plan = None
    if module_build:
        if data is not None:
            raise InputError(f"--data {data}: a module build has no dataset here; calibrate on --inputs FILE or "
                             "--synthetic")
        if inputs_path is None and not synthetic:
            raise InputError("a module build has no dataset of its own: calibrate it on your inputs (--inputs "
                             "FILE.npz) or on random inputs drawn from its spec (--synthetic)")
        plan = _module_quality_plan(build, quality_requests, inputs_path, synthetic, module_ref, weights)
    else:
        _checkpoint_only(build, **{"--module": module_ref, "--weights": weights})
    if target == "cpu":
        _refuse(("keep_float",), "with --target cpu", "the CPU INT8 variant quantizes every MatMul with a constant "
                                                      "weight and nothing else")
    variant = "int8" if target == "tensorrt" else "int8-cpu"
    with _progress() as prog:
        task = prog.add_task("calibrate", total=None, status="")
        say = lambda stage, i, n: prog.update(task, completed=i, total=n, status=stage)  # noqa: E731
        if target == "cpu":
            from onetrans_trt.calibrate.int8_cpu import calibrate_int8_cpu

            info = calibrate_int8_cpu(build, n_samples=samples, data_dir=data_dir, inputs=inputs_path,
                                      synthetic=synthetic, progress=say)
        else:
            info = calibrate_build(build, n_samples=samples, data_dir=data_dir, inputs=inputs_path,
                                   synthetic=synthetic, keep_float=[k.strip() for k in keep_float.split(",") if k.strip()],
                                   progress=say)
        if plan is not None:
            rep = _module_quality(build, variant, plan, prog)
        else:
            rep = _quality(build, variant, quality_requests, data_dir, prog) \
                if quality_requests and not module_build else None
    head = f"wrote {build}/{variant}/ ({info['calibration']['requests']} calibration requests from " \
           f"{info['calibration']['source']}; "
    if target == "cpu":
        lines = [head + f"{info['quantized_matmuls']} MatMuls in INT8, {info['weight_bits']}-bit weights, per-tensor "
                        "scales; user encoder: the build's float32 one)"]
        ql = (__import__("onetrans_trt.calibrate.module", fromlist=["quality_lines"]).quality_lines
              if plan is not None else _quality_lines)
        _emit({variant: info, "quality": rep}, as_json, "\n".join(lines + (ql(rep) if rep else [])))
        return
    q = {k: v["qdq"]["QuantizeLinear"] for k, v in info["graphs"].items()}
    lines = [head + f"Q nodes {q})"]
    if plan is not None:
        from onetrans_trt.calibrate.module import quality_lines

        fused = {k: v["fused"] for k, v in info["graphs"].items() if v.get("fused")}
        if fused:
            lines.append(f"  fused nodes kept: {fused}")
        _emit({"int8": info, "quality": rep}, as_json, "\n".join(lines + (quality_lines(rep) if rep else [])))
        return
    _emit({"int8": info, "quality": rep}, as_json, "\n".join(lines + (_quality_lines(rep) if rep else [])))


@cli.command("build")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which ONNX variant to build (TensorRT 11 is strongly typed: the graph decides).")
@click.option("--profile", "profile_specs", multiple=True,
              help="Override a dynamic dimension's range: NAME=MIN,OPT,MAX (e.g. candidates=1,256,2048). "
                   "Defaults come from the manifest.")
@click.option("--workspace-mb", type=click.IntRange(64), default=2048, show_default=True)
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="Allow TF32 for FP32 matmuls (faster, ~1e-3 relative error; off: fp32 means fp32).")
@JSON_OUT
def build_cmd(build, precision, profile_specs, workspace_mb, tf32, as_json) -> None:
    """Build TensorRT engines for both graphs into BUILD/engines/<precision>/.

    \b
    Written first, also without TensorRT: profiles.json (min/opt/max shape per input),
    commands.sh (trtexec / polygraphy equivalents), build_log.txt. Then, with TensorRT
    and a GPU: user_encoder.engine, candidate_scorer.engine (written atomically) and a
    timing cache. Without TensorRT or a GPU: exit code 3.
    """
    from onetrans_trt import doctor
    from onetrans_trt.engines.build import build_engines, parse_overrides

    def facts() -> None:  # once the inputs are valid: the machine a TensorRT build is read against
        for line in doctor.lines():
            if not _quiet():
                click.echo(line, err=True)

    plan = build_engines(build, precision, overrides=parse_overrides(list(profile_specs)),
                         workspace_mb=workspace_mb, tf32=tf32, before_tensorrt=facts)
    _emit(plan, as_json, f"built engines in {build}/engines/{precision}/")


def _validate_module(build, module_ref, weights, inputs_path, count, json_path, as_json=False) -> None:
    """``validate`` on a build from ``export --module``: ORT split vs the module's unified forward."""
    from onetrans_trt.calibrate.module import load_module_for
    from onetrans_trt.io import atomic_write_json
    from onetrans_trt.validate.module import read_spec, validate_module_build

    module = load_module_for(build, module_ref, weights)
    spec = read_spec(build)
    if inputs_path is None:
        report = validate_module_build(build, module, count=count, progress=_note)
    else:  # exactly the user's requests, each validated as given
        from onetrans_trt.protocol.checks import inputs_from_file

        requests, source = inputs_from_file(inputs_path, spec)
        parts = []
        for k, (user, cand) in enumerate(requests[:count]):
            parts.append(validate_module_build(build, module, inputs=(user, cand)))
            if (k + 1) % 10 == 0:
                _note(f"{k + 1}/{min(count, len(requests))} requests")
        rows = [dict(r, request=k) for k, p in enumerate(parts) for r in p["rows"]]
        report = {**parts[0], "data": source, "cases": len(rows), "rows": rows,
                  "max_abs": max(p["max_abs"] for p in parts)}
    if json_path:
        atomic_write_json(json_path, report)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=float))
        return
    _human(f"verdict: PASS ({report['cases']} cases, data: {report['data']}; ORT split vs the module's unified "
               f"forward: max abs {report['max_abs']:.2e} <= {report['tolerance']:g})")


@cli.command("validate")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--data", type=click.Choice(["ml-100k"]), default=None,
              help="Validate on real MovieLens test requests (labelled: AUC deltas too).")
@click.option("--requests", "requests_file", type=click.Path(path_type=Path), default=None,
              help="Validate on these requests (JSON object, list, or JSON lines).")
@click.option("--count", type=click.IntRange(1), default=100, show_default=True, help="Requests to use.")
@click.option("--backends", default=None, help="Comma-separated backends (default: every one available: "
                                               "torch-split, ort, ort-fp16, ort-int8, trt-* with TensorRT).")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              help="JSON file overriding tolerances per precision (fp32/fp16/int8: atol, rtol, min_cosine, "
                   "max_delta_auc, min_top10_overlap, min_kendall_tau).")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="The source checkpoint (default: the one the manifest names).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout instead of the summary.")
@click.option("--json-out", "json_path", type=click.Path(path_type=Path), default=None, callback=_out_file,
              help="Write the JSON report to this file.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None, callback=_out_file,
              help="Write the HTML report here.")
@click.option("--save-goldens", type=click.Path(path_type=Path), default=None, callback=_goldens_out,
              help="Also write the requests' inputs and PyTorch outputs here (polygraphy JSON).")
@click.option("--goldens", type=click.Path(path_type=Path), default=None,
              help="Validate ORT backends against saved goldens instead (no PyTorch needed).")
@click.option("--module", "module_ref", default=None,
              help="A build from `export --module`: the module to compare with (default: the one the manifest "
                   "names). Runs your code.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --module: its weights (default: the ones the manifest names).")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Validate on exactly these requests: an .npz ('<i>/<input>' keys, or bare input names for one "
                   "request) or Polygraphy JSON (a list of feed dicts) holding every graph input; for our own "
                   "checkpoints also request JSON/JSONL (like --requests). A module build without it uses "
                   "--count random cases drawn from the spec.")
@DATA_DIR
def validate_cmd(build, data, requests_file, count, backends, policy_path, ckpt, as_json, json_path, html_path,
                 save_goldens, goldens, module_ref, weights, inputs_path, data_dir) -> None:
    """Compare every backend against the float32 PyTorch model; exit 0 when all pass,
    1 when any fails (each failed check named with its value and limit; the first diverging
    layer and node when a graph is out of tolerance), 2 on bad input, 3 when a backend asked
    for with --backends cannot run here (TensorRT or a GPU missing). Backends not asked for
    and not available are listed as skipped, with the reason. delta AUC is judged only on
    enough labels (P positives x N negatives >= 10 / max_delta_auc) and says so otherwise.

    \b
    Examples:
      onetrans-trt validate BUILD --data ml-100k --json-out report.json --html report.html
      onetrans-trt validate BUILD --data ml-100k --save-goldens goldens/
      onetrans-trt validate BUILD --goldens goldens/        # on a host without torch
    """
    from onetrans_trt.errors import ValidationFailed
    from onetrans_trt.validate.policy import load_policy
    from onetrans_trt.validate.report import write_html, write_json

    from onetrans_trt.export.api import read_manifest

    if "protocol" in read_manifest(build):
        return _validate_module(build, module_ref, weights, inputs_path, count, json_path, as_json)
    if module_ref or weights:
        raise InputError(f"{build} was exported from a checkpoint: --module/--weights are for builds "
                         "from `export --module`")
    for flag, path in (("--goldens", goldens), ("--requests", requests_file), ("--inputs", inputs_path)):
        if path is not None and not path.exists():
            raise InputError(f"{flag} {path}: missing")
    given = [n for n, v in (("--data", data), ("--requests", requests_file), ("--inputs", inputs_path),
                            ("--goldens", goldens)) if v is not None]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} exclude each other: validate on one source of requests")
    policy = load_policy(policy_path)
    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    if goldens is not None:
        from onetrans_trt.validate.api import validate_goldens

        report = validate_goldens(build, goldens, backends=chosen, policy=policy)
    else:
        from onetrans_trt.validate.api import validate_build

        if data is None and requests_file is None and inputs_path is None:
            raise InputError("give --data ml-100k, --requests FILE or --inputs FILE (or --goldens DIR): validation "
                             "never picks its data for you")
        with _progress() as prog:
            task = prog.add_task("validate", total=None, status="")
            report = validate_build(build, backends=chosen, data=data, requests_file=requests_file,
                                    inputs=inputs_path, n_requests=count,
                                    policy=policy, ckpt=ckpt, data_dir=data_dir, save_goldens=save_goldens,
                                    progress=lambda st, i, n: prog.update(task, completed=i, total=n, status=st))
    if json_path:
        write_json(report, json_path)
    if html_path:
        write_html(report, html_path)
    from onetrans_trt.validate.summary import failure_message, summary_lines

    if as_json:
        click.echo(json.dumps(report, indent=2, default=float))
    else:
        _human("\n".join(summary_lines(report, [json_path, html_path])))
    if report["verdict"] != "pass":
        raise ValidationFailed(failure_message(report))


@cli.command("serve-repo")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, callback=_out_dir,
              help="Model repository to write.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "python"]), default="onnxruntime",
              show_default=True,
              help="onnxruntime: the ONNX graphs; tensorrt: the engines from `onetrans-trt build`; python: Python-"
                   "backend models running the ONNX graphs with ONNX Runtime (any Triton, CPU included), plus the "
                   "`preprocess` model and `rank` ensemble that take the raw request JSON.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int8-cpu"]), default="fp32",
              show_default=True, help="Which variant the models run: int8 is int8/ (TensorRT's Q/DQ graphs); "
                                      "int8-cpu is int8-cpu/ (`calibrate --target cpu`: ONNX Runtime on CPU, "
                                      "not --backend tensorrt).")
@click.option("--limits", "limits_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --backend python: JSON file of request limits for raw requests (as `rank --limits`).")
@click.option("--threads", type=click.IntRange(0), default=None,
              help="With --backend python: ONNX Runtime intra-op threads per model [0: its default].")
@click.option("--user-cache-mb", type=click.FloatRange(0), default=None,
              help="With --backend python: memory for users' K/V in the `rank_cached` model, per instance "
                   "[256; 0: no caching]. A repeated user (same user_key and history) skips user_encoder.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances of user_encoder and candidate_scorer (Triton's instance_group count).")
@click.option("--preferred-batch-sizes", default=None,
              help="user_encoder's dynamic batcher: comma-separated preferred batch sizes (users), e.g. 4,8.")
@click.option("--ort-accelerator", type=click.Choice(["none", "tensorrt", "tensorrt-fp16"]), default=None,
              help="With --backend onnxruntime: the ONNX Runtime backend's GPU execution accelerator (its TensorRT "
                   "execution provider, FP32 or FP16) [none].")
@click.option("--batch-users", type=click.IntRange(0, 1024), default=None,
              help="With --backend python: cross-user batching, the most users candidate_scorer_users scores in one "
                   "call (rank_cached calls it; Triton's dynamic batcher merges concurrent users) [8 when the "
                   "build's scorer packs, else off with the reason; 0 or 1: off].")
@click.option("--batch-delay-us", type=click.IntRange(0, 10_000_000), default=None,
              help="With --backend python: how long candidate_scorer_users' batcher waits for more users [200].")
@click.option("--store", "store_url", default=None, metavar="URL",
              help="With --backend python: rank_cached keeps users' K/V in this store instead of its own cache: "
                   "redis://host:port/db[?ttl_s=3600&max_mb=64] is shared by every instance and server (a store "
                   "that is down only costs encodes); memory://?max_mb=N is per instance.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@JSON_OUT
def serve_repo_cmd(build, out, backend, precision, limits_path, threads, user_cache_mb, instances,
                   preferred_batch_sizes, ort_accelerator, batch_users, batch_delay_us, store_url, force,
                   as_json) -> None:
    """Write a Triton Inference Server model repository: user_encoder (dynamic batching over
    users), candidate_scorer, and the `onetrans` ensemble (one user's history tensors [1, ...]
    + C candidates' tensors -> logits, probs). With --backend python also `preprocess` and the
    `rank` ensemble: the request JSON (one BYTES element) -> logits, probs; and `rank_cached`,
    the same with users' K/V cached in the server (a repeated user never reaches user_encoder)
    and concurrent users' candidates scored in one call (candidate_scorer_users, --batch-users).
    Every config.pbtxt is parsed with Triton's ModelConfig protobuf first.

    \b
    Serve it:  tritonserver --model-repository REPO
    (--backend python: the server's Python needs onetrans-trt, onnxruntime and numpy<2; see README)
    """
    sizes: tuple[int, ...] = ()
    if preferred_batch_sizes is not None:
        try:
            sizes = tuple(int(x) for x in preferred_batch_sizes.split(","))
        except ValueError:
            raise InputError(f"--preferred-batch-sizes {preferred_batch_sizes!r}: comma-separated integers, "
                             "e.g. 4,8") from None
    config_options = {"instances": instances, "preferred_batch_sizes": sizes}
    if backend != "onnxruntime":
        _refuse(("ort_accelerator",), f"to --backend {backend}", "it configures Triton's ONNX Runtime backend")
    if backend != "python":
        _refuse(("limits_path", "threads", "user_cache_mb", "batch_users", "batch_delay_us", "store_url"),
                f"to --backend {backend}",
                "they configure the python backend's models")
        from onetrans_trt.runtime.triton_repo import write_repository

        res = write_repository(build, out, backend=backend, precision=precision, force=force,
                               ort_accelerator=ort_accelerator or "none", **config_options)
    else:
        from onetrans_trt.data.requests import RequestLimits
        from onetrans_trt.serving.repository import write_python_repository

        for opt, given in (("--user-cache-mb", user_cache_mb), ("--store", store_url)):
            if given is not None and not (build / "config.json").is_file():
                raise InputError(f"{opt} does not apply to {build}: a module build has no feature schema to encode "
                                 "raw requests with, so its repository has no rank_cached model")
        if store_url is not None and user_cache_mb is not None:
            raise InputError("--store and --user-cache-mb: give one (rank_cached keeps users either in the store "
                             "or in its own cache)")
        limits = None
        if limits_path is not None:
            lim = RequestLimits.load(limits_path)
            limits = {k: getattr(lim, k) for k in ("max_history", "max_candidates", "max_request_bytes", "over_limit")}
        res = write_python_repository(build, out, precision=precision, force=force, limits=limits,
                                      threads=threads or 0,
                                      user_cache_mb=256 if user_cache_mb is None else user_cache_mb,
                                      batch_users=batch_users,
                                      batch_delay_us=200 if batch_delay_us is None else batch_delay_us,
                                      store=store_url,
                                      **config_options)
    line = f"wrote {out}: models {', '.join(res['models'])} ({backend}, {precision})"
    if backend == "python":
        b = res["cross_user_batching"]
        line += (f"\ncross-user batching: up to {b['users_per_call']} users per scorer call (proved on the build's "
                 f"samples: worst {b['checked_worst']:.2g})" if b["users_per_call"] > 1 else
                 f"\ncross-user batching: off ({b['why']})")
    _emit(res, as_json, line)


PEER_BACKENDS = ["torch-unified", "torch-split", "torch-compile", "torch-compile-static", "ort-unified", "ort",
                 "ort-kv-copy", "ort-fp16", "ort-int8", "ort-int8-qdq", "ort-int8-cpu"]


@cli.command("bench")
@click.argument("build", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--suite", type=click.Choice(["peers", "fused", "int8", "server", "cache"]), default="peers",
              show_default=True,
              help="peers: the split serving path against the naive peers (torch-unified, torch-split, "
                   "ort-unified), scorer GFLOP/s against this machine's MatMul, K/V cache hit vs miss, "
                   "pyramid on vs off. fused: fused vs unfused scorer (peak memory, latency). "
                   "int8: INT8 vs FP32 scorer latency. server: a real tritonserver on BUILD's python-backend "
                   "repository under load (rank vs rank_cached miss/hit per --concurrency). "
                   "cache: appending 1 event to a cached user (user_encoder_append.onnx) vs a full encode, "
                   "ORT CPU, with the model's pyramid and with it off.")
@click.option("--preset", type=click.Choice(["tiny", "small", "onetrans-s", "onetrans-l"]), default=None,
              help="Without BUILD: model size, random weights, synthetic schema "
                   "[peers: onetrans-s (small with --quick); fused/int8: small; cache: onetrans-s].")
@click.option("--quick", is_flag=True, help="peers: the one-minute version (smaller L, C and model, fewer rounds).")
@click.option("--candidates", type=click.IntRange(1), default=None,
              help="C per request [peers: 128 (64 quick); fused: 1024; int8: 256].")
@click.option("--history", type=click.IntRange(1), default=None,
              help="L history events [peers: 512 (256 quick); fused: 1024; int8: 512; cache: 1024].")
@click.option("--scorer-candidates", type=click.IntRange(1), default=None,
              help="peers: C for the scorer-alone GFLOP/s [1024 (512 quick)].")
@click.option("--cache-history", type=click.IntRange(1), default=None,
              help="peers: L for cache hit vs miss [1024 (512 quick)].")
@click.option("--cache-candidates", type=click.IntRange(1), default=None, help="peers: C for cache hit vs miss [64].")
@click.option("--backends", default=None,
              help="peers: comma-separated subset of torch-unified,torch-split,torch-compile,torch-compile-static,"
                   "ort-unified,ort,ort-kv-copy,ort-fp16,ort-int8 [all; --quick leaves out the torch.compile pair, "
                   "whose compiles take minutes]. ort-kv-copy: the split as a plain export runs it (the user's K/V "
                   "copied to every candidate; OneTrans builds with their checkpoint).")
@click.option("--no-pyramid", is_flag=True, help="peers: skip pyramid on vs off (it re-exports the model).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads for ORT and PyTorch [all cores].")
@click.option("--concurrency", default=None,
              help="server: comma-separated concurrent requests per level [1,4,16].")
@click.option("--requests", "n_requests", type=click.IntRange(1), default=None,
              help="server: requests per contender per round at each concurrency [32].")
@click.option("--store", "store_url", default=None, metavar="URL",
              help="server: rank_cached keeps users in this store (redis://host:port/db, memory://) instead of "
                   "its own cache.")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Interleaved rounds [peers 8 (12 quick, within a 6 s budget per section); else 10].")
@click.option("--out", type=click.Path(path_type=Path), default=None, callback=_out_file,
              help="Also write the JSON result here.")
@click.option("--module", "module_ref", default=None,
              help="A build from `export --module`: the module for the torch peers (default: the one the manifest "
                   "names). Runs your code.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --module: its weights (default: the ones the manifest names).")
@JSON_OUT
def bench_cmd(build, suite, preset, quick, candidates, history, scorer_candidates, cache_history, cache_candidates,
              backends, no_pyramid, threads, concurrency, n_requests, store_url, rounds, out, module_ref, weights,
              as_json) -> None:
    """Benchmarks, measured side by side in one run and reported as ratios.

    \b
    The default suite, on a build or on a random-weight model:
      onetrans-trt bench runs/build-small --quick
      onetrans-trt bench --preset onetrans-s --history 512 --candidates 128 --json --out bench.json
    BUILD needs `export --unified` for the ort-unified peer and its checkpoint for the
    torch peers; missing peers are listed as skipped with the reason.

    \b
    A build from `export --module`: one request (random inputs from its spec) through the
    module's own forward (torch-unified), its encode_user + score_candidates (torch-split),
    ort-unified, ort and ort-fp16/ort-int8 where the build has them; p50 latency and each
    peer's speed-up over torch-unified. The torch peers run the module's code (--module/
    --weights, default: the manifest's); if it cannot be loaded they are skipped.
      onetrans-trt bench BUILD --candidates 256 --history 512
    """
    from onetrans_trt.io import atomic_write_json

    if suite == "server":
        return _bench_server(build, preset, quick, candidates, history, scorer_candidates, cache_history,
                             cache_candidates, backends, no_pyramid, threads, concurrency, n_requests, rounds, out,
                             module_ref, weights, as_json, store_url)
    _refuse(("concurrency", "n_requests"), f"to --suite {suite}", "they size the server suite's load")
    _refuse(("store_url",), f"to --suite {suite}", "it is where the server suite's rank_cached keeps users")
    if suite == "cache":
        return _bench_cache(build, preset, quick, candidates, history, scorer_candidates, cache_history,
                            cache_candidates, backends, no_pyramid, threads, rounds, out, module_ref, weights,
                            as_json)
    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else None
    if build is not None and _module_build(build):
        return _bench_module(build, suite, preset, quick, candidates, history, scorer_candidates, cache_history,
                             cache_candidates, chosen, backends, no_pyramid, threads, rounds, out, module_ref,
                             weights, as_json)
    if module_ref is not None or weights is not None:
        raise InputError("--module/--weights are for a BUILD from `export --module`")
    if build is not None and suite == "peers":
        _refuse(("preset",), "with a BUILD", "the build's own model is measured; --preset picks a random-weight "
                                            "model when no BUILD is given")
    if suite != "peers":
        only = {"--quick": quick, "--scorer-candidates": scorer_candidates, "--cache-history": cache_history,
                "--cache-candidates": cache_candidates, "--backends": backends, "--no-pyramid": no_pyramid,
                "--threads": threads}
        given = [k for k, v in only.items() if v not in (None, False)]
        if given:
            raise InputError(f"{', '.join(given)}: only for --suite peers, not --suite {suite}")
    elif chosen is not None:
        unknown = [b for b in chosen if b not in PEER_BACKENDS]
        if unknown or not chosen:
            raise InputError(f"--backends: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                             f"choose from {','.join(PEER_BACKENDS)}")
    if suite == "peers":
        from onetrans_trt.bench.peers import bench_peers, table

        res = bench_peers(build, preset=preset, quick=quick, history=history, candidates=candidates,
                          scorer_candidates=scorer_candidates, cache_history=cache_history,
                          cache_candidates=cache_candidates, rounds=rounds, threads=threads,
                          backends=chosen,
                          pyramid=not no_pyramid, say=lambda msg: _stderr_console().print(f"[dim]{msg}[/dim]"))
        if out:
            atomic_write_json(out, res)
        _emit(res, as_json, table(res))
        return
    if build is not None:
        raise InputError(f"--suite {suite} runs on random-weight models (--preset); it takes no BUILD")
    from onetrans_trt.bench.fused import bench_fused, bench_int8

    preset = preset or "small"
    rounds = rounds or 10
    if suite == "int8":
        candidates, history = candidates or 256, history or 512
        res = bench_int8(preset=preset, candidates=candidates, history=history, rounds=rounds)
        if out:
            atomic_write_json(out, res)
        lat = res["latency"]
        _emit(res, as_json, "\n".join([
            f"INT8 vs FP32 candidate scorer, ORT CPU, {preset}, C={candidates}, L={history}",
            f"  latency p50  int8 {lat['int8']['p50_ms']:.1f} ms   fp32 {lat['fp32']['p50_ms']:.1f} ms"
            f"   ratio {res['int8_over_fp32_latency']:.2f}"] + ([f"  note: {res['int8_note']}"] if res["int8_note"] else [])))
        return
    candidates, history = candidates or 1024, history or 1024
    res = bench_fused(preset=preset, candidates=candidates, history=history, rounds=rounds)
    if out:
        atomic_write_json(out, res)
    lat = res["latency"]
    human = "\n".join([
        f"fused vs unfused candidate scorer, ORT CPU, {preset}, C={candidates}, L={history}",
        f"  peak memory  fused {res['fused_peak_mb']:.1f} MB   unfused {res['unfused_peak_mb']:.1f} MB"
        f"   ratio {res['fused_over_unfused_memory']:.2f}",
        f"  latency p50  fused {lat['fused']['p50_ms']:.1f} ms   unfused {lat['unfused']['p50_ms']:.1f} ms"
        f"   ratio {res['fused_over_unfused_latency']:.2f}",
    ])
    _emit(res, as_json, human)


def _bench_server(build, preset, quick, candidates, history, scorer_candidates, cache_history, cache_candidates,
                  backends, no_pyramid, threads, concurrency, n_requests, rounds, out, module_ref, weights,
                  as_json, store_url=None) -> None:
    from onetrans_trt.io import atomic_write_json

    _refuse(("preset", "quick", "history", "scorer_candidates", "cache_history", "cache_candidates", "backends",
             "no_pyramid", "threads", "module_ref", "weights"), "to --suite server",
            "it serves BUILD's own repository with MovieLens requests (--candidates, --concurrency, --requests, "
            "--rounds size it)")
    if build is None:
        raise InputError("--suite server needs a BUILD (it serves that build's python-backend repository)")
    levels = (1, 4, 16)
    if concurrency is not None:
        try:
            levels = tuple(int(x) for x in concurrency.split(",") if x.strip())
        except ValueError:
            levels = ()
        if not levels or min(levels) < 1 or max(levels) > 256:
            raise InputError(f"--concurrency {concurrency!r}: comma-separated integers from 1 to 256, e.g. 1,4,16")
    from onetrans_trt.serving.bench import bench_server, table

    if store_url is not None:
        from onetrans_trt.runtime.store import parse_store_url

        parse_store_url(store_url)  # refused before a server starts
    res = bench_server(build, candidates=candidates or 50, concurrency=levels, requests=n_requests or 32,
                       rounds=rounds or 2, say=_note, store=store_url)
    if out:
        atomic_write_json(out, res)
    _emit(res, as_json, table(res))
    if res["errors"] or res["leftover_processes"]:
        from onetrans_trt.errors import ValidationFailed

        raise ValidationFailed(f"the server answered {res['errors']} request(s) wrongly or with an error, "
                         f"{len(res['leftover_processes'])} server process(es) left")


def _bench_cache(build, preset, quick, candidates, history, scorer_candidates, cache_history, cache_candidates,
                 backends, no_pyramid, threads, rounds, out, module_ref, weights, as_json) -> None:
    """``bench --suite cache``: append 1 event to a cached user vs a full encode (bench/cache.py)."""
    from onetrans_trt.io import atomic_write_json

    _refuse(("candidates",), "to --suite cache", "it appends to and encodes one user's history; no candidate "
                                                "is scored (--history sizes it)")
    _refuse(("quick", "scorer_candidates", "cache_history", "cache_candidates", "backends", "no_pyramid",
             "threads"), "to --suite cache", "they size the peers suite; the cache suite times ORT CPU at "
                                             "--history, with the model's pyramid and with it off")
    _refuse(("module_ref", "weights"), "to --suite cache", "it runs a OneTrans build's append graph, not a build "
                                                          "from `export --module`")
    if build is not None:
        _refuse(("preset",), "with a BUILD", "the build's own model is measured; --preset picks a random-weight "
                                            "model when no BUILD is given")
        if _module_build(build):
            raise InputError(f"--suite cache: {build} is a build from `export --module`; it has no append graph")
        if not (build / "user_encoder_append.onnx").is_file():
            raise InputError(f"--suite cache: {build} has no user_encoder_append.onnx; export it again with "
                             f"`onetrans-trt export CKPT --out {build} --append --force`")
    from onetrans_trt.bench.cache import bench_cache, table

    res = bench_cache(build, preset=preset, history=history, rounds=rounds,
                      say=lambda msg: _stderr_console().print(f"[dim]{msg}[/dim]"))
    if out:
        atomic_write_json(out, res)
    _emit(res, as_json, table(res))


def _bench_module(build, suite, preset, quick, candidates, history, scorer_candidates, cache_history, cache_candidates,
                  chosen, backends, no_pyramid, threads, rounds, out, module_ref, weights, as_json) -> None:
    """``bench BUILD`` on a build from ``export --module`` (see ``bench --help``)."""
    from onetrans_trt.bench.module import PEERS, bench_module, table
    from onetrans_trt.calibrate.module import load_module_for
    from onetrans_trt.io import atomic_write_json

    if suite != "peers":
        raise InputError(f"--suite {suite} runs on random-weight models (--preset); a module build takes the "
                         "default suite")
    given = [k for k, v in {"--preset": preset, "--scorer-candidates": scorer_candidates,
                            "--cache-history": cache_history, "--cache-candidates": cache_candidates,
                            "--no-pyramid": no_pyramid}.items() if v not in (None, False)]
    if given:
        raise InputError(f"{', '.join(given)}: not for a build from `export --module` (its bench compares the "
                         "module's own paths with ours on one request)")
    if chosen is not None:
        unknown = [b for b in chosen if b not in PEERS]
        if unknown or not chosen:
            raise InputError(f"--backends: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                             f"choose from {','.join(PEERS)}")
    module, why = None, None
    if chosen is None or any(b.startswith("torch") for b in chosen):
        if module_ref is not None:
            module = load_module_for(build, module_ref, weights)  # asked for: its errors are the user's to see
        else:
            try:
                module = load_module_for(build, None, weights)
            except InputError as e:
                why = f"the module could not be loaded ({e}); pass --module FILE.py:FACTORY"
    res = bench_module(build, module, module_error=why, candidates=candidates, history=history, rounds=rounds,
                       threads=threads, backends=chosen, quick=quick,
                       say=lambda msg: _stderr_console().print(f"[dim]{msg}[/dim]"))
    if out:
        atomic_write_json(out, res)
    _emit(res, as_json, table(res))


# ---- the door: every command's artifacts go through trust before the command sees them ----
_DOOR_DIRS = ("build", "ckpt")  # a build (manifest + graphs) or a checkpoint directory
_DOOR_FILES = {"request_path": "--request", "requests_file": "--requests", "inputs_path": "--inputs",
               "policy_path": "--policy", "limits_path": "--limits", "spec_path": "--spec", "weights": "--weights"}


def _guarded(cmd: click.Command) -> click.Command:
    """Wrap ``cmd``'s callback so that every directory and file it is given is checked first
    (``trust.check_artifact_dir``, ``check_goldens_dir``, ``check_input_file``): one door for
    every command, whatever the command does next."""
    import functools

    inner = cmd.callback

    @functools.wraps(inner)
    def door(*args: Any, **kw: Any) -> Any:
        from onetrans_trt import trust

        for key in _DOOR_DIRS:
            if kw.get(key) is not None:
                trust.check_artifact_dir(kw[key])
        if kw.get("goldens") is not None:
            trust.check_goldens_dir(kw["goldens"])
        for key, flag in _DOOR_FILES.items():
            if kw.get(key) is not None:
                trust.check_input_file(kw[key], flag)
        return inner(*args, **kw)

    cmd.callback = door
    return cmd


for _cmd in cli.commands.values():
    _guarded(_cmd)


def main() -> None:
    from onetrans_trt import interrupts
    from onetrans_trt.provenance import set_command

    set_command(["onetrans-trt", *sys.argv[1:]])
    interrupts.install()  # Ctrl-C and SIGTERM unwind (every finally runs), with a watchdog behind them
    cli(prog_name="onetrans-trt")


if __name__ == "__main__":
    main()
