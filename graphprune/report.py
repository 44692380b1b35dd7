"""What a compile run did, in forms people and programs read: Markdown, JSON and PNG plots.

:class:`Report` is plain data (numbers, names, lists), filled in by
:func:`graphprune.compile` and never holding a model, so it serialises as is and can be
compared between runs.  Plots are plain matplotlib figures (:mod:`graphprune.figures`: headless,
no pyplot state); every
file is written atomically (:mod:`graphprune.atomic`), so a report folder never holds a
half-written file.

>>> result = gp.compile(model, (x,), method="obspa", target=0.5)
>>> print(result.report.to_markdown())
>>> result.report.write("out/")        # report.md, report.json, widths.png, ...
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from graphprune.atomic import atomic_write_bytes, atomic_write_text
from graphprune.figures import figure, png_bytes
from graphprune.optim.plots import plot_history

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class LayerWidth:
    """One group's width (units: channels, heads, features) before and after pruning, with the
    fewest units the target allowed it (``floor``) and the unit count its width had to be a
    multiple of (``multiple``): a cut group outside them is flagged (:attr:`flags`), since a
    group under its floor is what collapses a network and an odd width wastes vector lanes."""

    group: str
    kind: str
    before: int
    after: int
    floor: int = 1
    multiple: int = 1

    @property
    def flags(self) -> list[str]:
        """What is wrong with this width: "below floor N", "off multiple M" (empty when nothing)."""
        if self.after == self.before:
            return []
        return ([f"below floor {self.floor}"] if self.after < self.floor else []) + \
            ([f"off multiple {self.multiple}"] if self.after % self.multiple else [])


@dataclass
class Report:
    """The facts of one compile run; ``None`` marks what this run did not measure.

    ``flops`` are multiply-accumulates at the example input's shape.  ``verify_error``
    is the largest relative difference between the compact model and the zeroed full
    model on the example input (the zero-invariance check), ``codegen_error`` the same
    between the compiled library and the compact model.  ``latency`` is the
    codegen runtime's ``benchmark()`` of the compact model, ``reference`` onnxruntime's
    latency on the same compact ONNX at the same thread count; ``tuning`` the tuning run's
    summary, with its ``curve`` of trials.
    """

    source: str
    frontend: str
    method: str
    target: str
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    widths: list[LayerWidth] = field(default_factory=list)
    barriers: list[dict[str, str]] = field(default_factory=list)
    withdrawn: list[dict[str, str]] = field(default_factory=list)
    unchanged: str | None = None  # why the compact model is the input model, when it is
    verify_error: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    accuracy_on: str | None = None
    codegen: str | None = None
    codegen_inputs: dict[str, list[int]] | None = None  # the input shapes the library is built for (static)
    codegen_from: str | None = None  # what TVM imported, when not the compact model as given, and why
    #: how the built functions were scheduled: "tuned" (a record at their shape), "carried" (a
    #: record of a function of other extents, graphprune.codegen.transfer), "default"
    schedules: dict[str, int] | None = None
    latency: dict[str, Any] | None = None
    codegen_error: float | None = None  # the compiled library against the compact model, on the example
    reference: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None
    latency_target: dict[str, Any] | None = None  # a latency budget's measurements (graphprune.latency.LatencyRun)
    history: list[dict[str, Any]] = field(default_factory=list)
    accuracy_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    criterion: str | None = None         # the one-shot criterion run, and why (asked for, or the default's reason)
    criterion_reason: str | None = None
    calibration: str | None = None       # what the calibration data measured, when some was given
    recovery: dict[str, Any] | None = None  # label-free distillation after pruning: steps and loss before/after

    # ---- derived ----------------------------------------------------------------------
    @property
    def flagged(self) -> list[LayerWidth]:
        """The groups cut below their floor or off their multiple."""
        return [w for w in self.widths if w.flags]

    @property
    def params_removed(self) -> float:
        """Fraction of the parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    @property
    def flops_removed(self) -> float:
        """Fraction of the FLOPs (MACs) removed."""
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def latency_ratio(self) -> float | None:
        """TVM's latency over onnxruntime's on the same compact ONNX (above 1: TVM is slower)."""
        if self.latency is None or self.reference is None:
            return None
        return self.latency["median_ms"] / self.reference["median_ms"]

    @property
    def versus_reference(self) -> str | None:
        """One sentence setting the compiled latency beside onnxruntime's, plain when it lost."""
        ratio = self.latency_ratio
        if ratio is None:
            return None
        line = (f"onnxruntime on the same compact ONNX: {self.reference['median_ms']:.3f} ms, "
                f"{self.reference['threads']} threads")
        if ratio > 1:
            return (f"{line}: the TVM build is {ratio:.2f}x SLOWER; tune it longer (--tune-minutes, tune_minutes=) "
                    f"or deploy the compact ONNX with onnxruntime")
        return f"{line}: the TVM build is {1 / ratio:.2f}x faster"

    # ---- machine-readable ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, with the derived fractions added."""
        out = _jsonable(asdict(self))
        for w, row in zip(self.widths, out["widths"]):
            row["flags"] = w.flags
        out["params_removed"] = self.params_removed
        out["flops_removed"] = self.flops_removed
        out["latency_ratio"] = self.latency_ratio
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """The report back from :meth:`to_dict` (or a ``report.json``), to compare runs."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in fields}
        kept["widths"] = [LayerWidth(**{k: v for k, v in w.items() if k != "flags"}) for w in kept.get("widths", [])]
        kept["accuracy_curve"] = [tuple(p) for p in kept.get("accuracy_curve", [])]
        return cls(**kept)

    # ---- human-readable ------------------------------------------------------------------
    def _recovery_text(self) -> str:
        r = self.recovery
        more = (f" and {r['augmented_batches']} of the dense model's continuations of them"
                if r.get("augmented_batches") else "")
        return (f"{r['steps']} steps of {r['loss']} distillation at lr {r['lr']:.3g} on {r['batches']} calibration "
                f"batches{more}, loss {r['loss_before']:.4g} -> {r['loss_after']:.4g}"
                + ("" if r["improved"] else " (no gain: weights kept as pruned)"))

    def summary(self) -> str:
        """A few lines for a terminal: reductions, accuracy, latency."""
        lines = [f"{self.method} on {self.source} ({self.frontend}), target {self.target}",
                 f"  params {self.params_before:,} -> {self.params_after:,} (-{self.params_removed:.1%})",
                 f"  MACs   {macs(self.flops_before)} -> {macs(self.flops_after)} (-{self.flops_removed:.1%})"]
        if self.unchanged:
            lines.append(f"  {self.unchanged}")
        if self.criterion:
            lines.append(f"  criterion {self.criterion}: {self.criterion_reason}")
        if self.recovery:
            lines.append(f"  recovery: {self._recovery_text()}")
        if self.flagged:
            lines.append(f"  {len(self.flagged)} groups cut below their floor or off their multiple: "
                         + "; ".join(f"{w.group} {w.before} -> {w.after} ({', '.join(w.flags)})"
                                     for w in self.flagged[:3]))
        if self.withdrawn:
            lines.append(f"  {len(self.withdrawn)} groups withdrawn (failed the zero-invariance check): "
                         + "; ".join(f"{w['group']}: {w['reason']}" for w in self.withdrawn[:3]))
        if self.accuracy_after is not None:
            lines.append(f"  accuracy {self.accuracy_before:.4f} -> {self.accuracy_after:.4f} (on {self.accuracy_on})")
        if self.codegen_inputs:
            lines.append(f"  built ({self.codegen}) for inputs " +
                         ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in self.codegen_inputs.items()))
        if self.codegen_from:
            lines.append(f"  built from {self.codegen_from}")
        if self.schedules:
            lines.append(f"  {self.schedules_line}")
        if self.latency is not None:
            lines.append(f"  latency ({self.codegen}, TVM) {self.latency['median_ms']:.3f} ms median, "
                         f"{self.latency.get('threads', '?')} threads")
        if self.versus_reference:
            lines.append(f"  {self.versus_reference}")
        if self.codegen_error is not None:
            lines.append(f"  compiled ({self.codegen}) == compact model: max rel. error {self.codegen_error:.1e}")
        if self.latency_target:
            lines.append(f"  {self.latency_budget_line}")
        if self.verify_error is not None:
            lines.append(f"  compact == zeroed model: max rel. error {self.verify_error:.1e}")
        return "\n".join(lines)

    @property
    def schedules_line(self) -> str:
        """How many built functions were tuned at their shape, carried over, or default."""
        n = self.schedules or {}
        line = (f"schedules: {n.get('tuned', 0)} tuned, {n.get('carried', 0)} carried over from tuned functions of "
                f"other extents (not measured at theirs), {n.get('default', 0)} default")
        return line + (" (tune for more: --tune-minutes)" if n.get("default") or n.get("carried") else "")

    @property
    def latency_budget_line(self) -> str:
        """The latency budget against what the compiled compact model measured."""
        t = self.latency_target or {}
        kept = t["rounds"][t["chosen"]] if t.get("chosen") is not None else None
        achieved = kept["measured_ms"] / kept["dense_ms"] * t["dense_ms"] if kept else t["dense_ms"]
        return (f"latency budget {t['budget_ms']:.3f} ms ({t['codegen']}): measured {achieved:.3f} ms "
                f"({achieved / t['budget_ms'] - 1:+.1%}), dense {t['dense_ms']:.3f} ms; {len(t.get('rounds', []))} "
                f"compile-and-measure rounds, {t['layers_measured']} layer timings measured"
                + (f" ({t['layers_refreshed']} re-timed: the database has faster schedules now)"
                   if t.get("layers_refreshed") else "")
                + f", {t['layers_cached']} from the table cache" + _order_note(t))

    def to_markdown(self) -> str:
        """The full report: totals, per-group widths, barriers, measurements, timings."""
        rows = [("parameters", f"{self.params_before:,}", f"{self.params_after:,}", f"{self.params_removed:.1%}"),
                ("MACs", macs(self.flops_before), macs(self.flops_after), f"{self.flops_removed:.1%}")]
        if self.accuracy_after is not None:
            rows.append((f"accuracy ({self.accuracy_on})", f"{self.accuracy_before:.4f}", f"{self.accuracy_after:.4f}",
                         f"{self.accuracy_after - self.accuracy_before:+.4f}"))
        out = [f"# graphprune report: {self.source}", "",
               f"- frontend: {self.frontend}", f"- method: {self.method}", f"- target: {self.target}"]
        if self.criterion:
            out.append(f"- criterion: {self.criterion} ({self.criterion_reason})")
        if self.calibration:
            out.append(f"- calibration: {self.calibration}")
        if self.recovery:
            out.append(f"- recovery: {self._recovery_text()}")
        if self.unchanged:
            out.append(f"- **{self.unchanged}**")
        if self.verify_error is not None:
            out.append(f"- compact model reproduces the zeroed model: max relative error {self.verify_error:.1e}")
        if self.latency_target:
            out.append(f"- {self.latency_budget_line}")
            chosen = self.latency_target.get("chosen")
            out += [f"  - round {i + 1}: layers predicted {r['predicted_layers_ms']:.3f} ms, whole model measured "
                    f"{r['measured_ms']:.3f} ms (dense {r['dense_ms']:.3f} ms)" + (" (kept)" if i == chosen else "")
                    for i, r in enumerate(self.latency_target["rounds"])]
        out += ["", _md_table(("", "before", "after", "change"), rows), "", "## Widths per group", ""]
        if self.flagged:
            out += [f"**{len(self.flagged)} groups cut below their floor or off their multiple** (flagged below).", ""]
        out += [_md_table(("group", "kind", "before", "after", "floor", "multiple", "flag"),
                          [(w.group, w.kind, str(w.before), str(w.after), str(w.floor), str(w.multiple),
                            ", ".join(f"**{f}**" for f in w.flags)) for w in self.widths])]
        out += ["", "## Barriers (channels kept)", ""]
        out += [f"- `{b['node']}` [{b['op']}] {b['module']}: {b['reason']}" for b in self.barriers] or ["none"]
        if self.withdrawn:
            out += ["", "## Withdrawn groups (failed the zero-invariance check)", ""]
            out += [f"- `{w['group']}`: {w['reason']}" for w in self.withdrawn]
        if self.codegen is not None:
            out += ["", f"## Code generation ({self.codegen})", ""]
            if self.latency is not None:
                out.append(f"- latency: {self.latency['median_ms']:.3f} ms median over {self.latency['repeat']} "
                           f"repeats, {self.latency.get('threads', '?')} threads")
            else:
                out.append("- latency: not measured (the target does not run on this machine)")
            if self.codegen_from:
                out.append(f"- built from {self.codegen_from}")
            if self.codegen_error is not None:
                out.append(f"- the compiled library reproduces the compact model: max relative error "
                           f"{self.codegen_error:.1e}")
            if self.versus_reference:
                out.append(f"- {self.versus_reference}")
            if self.schedules:
                out.append(f"- {self.schedules_line}")
            if self.tuning is not None:
                t = self.tuning
                out.append(f"- tuning: {t['tasks_total']} tasks, {len(t['tasks_tuned'])} tuned now, "
                           f"{len(t['tasks_reused'])} reused from {t['work_dir']}, {t['trials_run']} trials"
                           + (f", {t['trials_failed']} failed (first error: {t['failures'][0]})"
                              if t.get("trials_failed") else ""))
        if self.seconds:
            out += ["", "## Time per stage", "",
                    _md_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in self.seconds.items()])]
        return "\n".join(out) + "\n"

    # ---- files ---------------------------------------------------------------------------
    def plots(self) -> dict[str, bytes]:
        """PNG files by name: widths always; training and accuracy curves, tuning curve when measured."""
        figures = {"widths.png": plot_widths(self.widths)}
        if self.history:
            figures["training.png"] = plot_history(self.history, title=f"{self.method}: reductions over training")
        if self.accuracy_curve:
            figures["accuracy.png"] = _plot_xy(self.accuracy_curve, "step", f"accuracy ({self.accuracy_on})",
                                               f"{self.method}: accuracy over training")
        if self.tuning and self.tuning.get("curve"):
            figures["tuning.png"] = plot_tuning(self.tuning["curve"], f"tuning for {self.codegen}")
        return {name: png_bytes(fig) for name, fig in figures.items()}

    def write(self, folder: str | Path) -> list[Path]:
        """Write report.md, report.json and the plots into ``folder`` (which must exist)."""
        folder = Path(folder)
        paths = [atomic_write_text(folder / "report.md", self.to_markdown()),
                 atomic_write_text(folder / "report.json", self.to_json())]
        paths += [atomic_write_bytes(folder / name, data) for name, data in self.plots().items()]
        return paths


def macs(n: float) -> str:
    """Multiply-accumulates with a unit that keeps 3 significant digits: ``37.0M``, ``1.82G``."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    """Tensors, numpy scalars and tuples as plain JSON values; NaN/inf as None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # torch tensors, numpy arrays and scalars
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def plot_widths(widths: Sequence[LayerWidth]) -> "Figure":
    """Horizontal bars: each group's width before (light) and after (dark) pruning."""
    height = max(2.5, 0.28 * len(widths) + 1.2)
    fig, ax = figure(7, height)
    ys = range(len(widths))
    ax.barh(ys, [w.before for w in widths], color="#c6dbef", label="before")
    ax.barh(ys, [w.after for w in widths], color="#2171b5", label="after")
    ax.set_yticks(list(ys), [w.group[:40] for w in widths], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("units (channels, heads, features)")
    ax.set_title("width per group")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_tuning(curve: Sequence[dict[str, Any]], title: str) -> "Figure":
    """The tuning curve: the model's estimated latency once every tuned task has a measurement,
    and each trial's own time (a task that never ran leaves the estimate undefined)."""
    fig, ax = figure(6, 3.5)
    trials = [(r["trial"], r["run_ms"]) for r in curve if r.get("run_ms") is not None]
    if trials:
        ax.plot(*zip(*trials), "o", markersize=3, alpha=0.5, label="trial")
    estimate = [(r["trial"], r["model_estimate_ms"]) for r in curve if r.get("model_estimate_ms") is not None]
    if estimate:
        ax.plot(*zip(*estimate), drawstyle="steps-post", label="estimated model latency")
    ax.set_xlabel("trial")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title(title)
    if trials or estimate:
        ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def _plot_xy(points: Sequence[tuple[float, float]], xlabel: str, ylabel: str, title: str) -> "Figure":
    fig, ax = figure(6, 3.5)
    ax.plot(*zip(*points), marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _order_note(run: dict[str, Any]) -> str:
    """Which selection a latency budget kept, and why, where orders were compared."""
    judged = run.get("judged") or {}
    if len(judged) < 2:
        return ""
    others = ", ".join(f"{k} {v:.3g}" for k, v in judged.items() if k != run["order"])
    return (f"; kept the {run['order']} selection (output drift on the calibration data "
            f"{judged[run['order']]:.3g}, against {others}; {run.get('compiled', 0)} models compiled)")
