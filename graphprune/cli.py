"""The ``graphprune`` command: inspect, prune, compile and tune ONNX models from the shell.

Each subcommand is a thin layer over the Python API (``gp.trace``, ``gp.compile``,
``graphprune.codegen.tune``); what the CLI adds is what a shell user needs: checked
paths before any long work, atomic outputs (never a half-written model), one exit code
per kind of failure, progress bars on a terminal, and ``--json`` for scripts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from graphprune.errors import (BadOnnxError, GraphPruneError, ShapeMismatchError, TuningError,
                               UnprunableTargetError, UnsupportedModelError, ZeroInvarianceError)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_UNPRUNABLE, EXIT_CODEGEN, EXIT_MISMATCH, EXIT_OUTPUT = range(8)
#: The exit code of each error type (first match wins; other graphprune errors exit with 1).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (BadOnnxError, EXIT_BAD_INPUT), (UnsupportedModelError, EXIT_BAD_INPUT), (ShapeMismatchError, EXIT_BAD_INPUT),
    (UnprunableTargetError, EXIT_UNPRUNABLE), (TuningError, EXIT_CODEGEN), (ZeroInvarianceError, EXIT_MISMATCH),
    (OSError, EXIT_OUTPUT))

EPILOG = """\
examples:
  graphprune inspect model.onnx                        groups, barriers, params and MACs
  graphprune inspect model.onnx --html graph.html      ... and a page with the graph drawn
  graphprune prune model.onnx -o model.small.onnx --flops 0.5 --criterion obspa
  graphprune prune det.onnx --input-shape images=1x3x640x640   (dynamic height/width need a shape)
  graphprune prune model.onnx --calibration calib.npz --recover-steps 200   (unlabeled inputs: calibrated
                                                       criterion, then distillation from the input model)
  graphprune compile model.onnx --codegen x86 --tune-trials 200 -o out/   (tunes into the shared database)
  graphprune compile model.onnx --codegen x86 --tune-minutes 10 -o out/  (a time budget, where the latency is)
  graphprune tune model.onnx --codegen x86 --trials 64 --db runs/db   (a private database; run again to resume)

exit codes:
  0 ok   1 internal error   2 usage   3 bad input file or shapes   4 target cannot be met (or nothing to prune)
  5 code generation or tuning failed   6 compact model failed its check   7 cannot write output
"""


class _Parser(argparse.ArgumentParser):
    """argparse with our usage exit code and a pointer to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n  (see {self.prog} --help)\n")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1 (1: no rounding)")
    return value


def _floor_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    from graphprune.frontends.onnx_inputs import parse_input_shape

    try:
        return parse_input_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _preprocess(text: str) -> Any:
    from graphprune.frontends.calibration_files import Preprocess

    try:
        return Preprocess.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from graphprune import __version__
    from graphprune.compile import METHODS, ONESHOT

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout (errors too)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show the traceback of any error")
    common.add_argument("--input-shape", action="append", default=[], type=_input_shape,
                        metavar="[NAME=]1x3x640x640",
                        help="shape of input NAME (repeatable; no NAME for a model with one input); needed for "
                             "every dynamic dim but the batch, which is 1 by default")
    common.add_argument("--inputs", metavar="FILE.npz", help="example inputs by name (numpy.savez(FILE, NAME=array))")
    target = argparse.ArgumentParser(add_help=False)
    what = target.add_mutually_exclusive_group()
    what.add_argument("--flops", type=_fraction, help="fraction of the MACs to remove (default 0.5)")
    what.add_argument("--params", type=_fraction, help="fraction of the parameters to remove")
    what.add_argument("--units", type=_fraction, help="fraction of all group units (channels, heads) to remove")
    what.add_argument("--latency-ms", type=_positive_float, help="latency budget in ms for the compiled compact "
                      "model on the codegen target (x86 for prune), met with the compiler in the loop")
    what.add_argument("--latency", type=_fraction, help="fraction of the dense model's latency on the codegen "
                      "target to remove (0.4: 60%% of its time), timed in turn with the dense model")
    target.add_argument("--min-units", type=_positive, default=1, help="fewest units any group keeps (default 1)")
    target.add_argument("--multiple", type=_positive_int, default=None,
                        help="round kept widths (channels) to a multiple of this (default: the --codegen target's "
                             "vector lanes, else 8; 1 for no rounding)")
    target.add_argument("--min-fraction", type=_floor_fraction, default=0.25,
                        help="fewest channels any group keeps, as a fraction of its width (default 0.25; 0: no floor)")
    target.add_argument("--calibration", metavar="PATH", help="unlabeled model inputs (.npz by input name, .npy for "
                        "one input, or a folder of them): calibrated criteria, and recovery after pruning; they "
                        "are also the example inputs (so not with --inputs/--input-shape)")
    target.add_argument("--preprocess", type=_preprocess, metavar="size=HxW,mean=..,std=..",
                        help="read a --calibration folder of images: resize, scale to [0, 1], subtract mean and "
                             "divide by std per channel (e.g. size=224x224,mean=0.485,0.456,0.406,"
                             "std=0.229,0.224,0.225)")
    target.add_argument("--recover-steps", type=_positive, metavar="N", help="steps of label-free distillation "
                        "from the input model on the calibration inputs after pruning (default 200 with "
                        "--calibration; 0: none)")

    parser = _Parser(prog="graphprune", description="Structured pruning of ONNX models: find the zero-invariant "
                     "groups, remove the least important units, and write a smaller ONNX model that computes "
                     "what the zeroed model computed.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"graphprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", parents=[common], help="show the prunable groups, barriers, params and MACs",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX file")
    p.add_argument("--html", metavar="PATH", help="also write an HTML page with the graph drawn, groups coloured")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("prune", parents=[common, target], help="ONNX in, smaller ONNX out (one-shot, data-free)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX file")
    p.add_argument("-o", "--output", help="output ONNX file (default: MODEL.pruned.onnx next to the input)")
    p.add_argument("--criterion", choices=[m for m in ONESHOT if m not in ("taylor", "hessian")],
                   help="unit scores: obspa (default: with compensation, measured on --calibration when given), "
                        "wanda, reconstruction (need --calibration), magnitude (L2), l1, l2, bn_scale")
    p.add_argument("--report", metavar="DIR", help="also write report.md, report.json and plots into DIR")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("compile", parents=[common, target], help="prune, then build (and tune) with TVM",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX file")
    p.add_argument("-o", "--output", default="graphprune-out", help="output folder (default: graphprune-out)")
    p.add_argument("--method", choices=[m for m in METHODS if m in ONESHOT and m not in ("taylor", "hessian")],
                   help="one-shot method (default: obspa, calibrated with --calibration; training methods need "
                        "the PyTorch model: use gp.compile)")
    p.add_argument("--codegen", choices=["x86", "arm", "cuda"], help="build the compact model with TVM for this target")
    p.add_argument("--tune-trials", type=_positive, default=0, help="tuning trials per task before building (0: none)")
    p.add_argument("--tune-minutes", type=_positive_float, help="tune for this many minutes before building, on the "
                   "tasks with the largest share of the latency (with --tune-trials: at most that many per task)")
    p.add_argument("--tuning-db", metavar="DIR", help="tuning database folder, reused and extended (default: this "
                   "machine's shared database for the target, in ~/.cache/graphprune/tuning)")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("tune", parents=[common], help="autotune a model with TVM into a resumable database",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX file")
    p.add_argument("--codegen", default="x86", choices=["x86", "arm", "cuda"], help="TVM target (default x86)")
    p.add_argument("--trials", type=_positive, help="trials per tuning task (default 16; with --minutes, a cap)")
    p.add_argument("--minutes", type=_positive_float, help="a time budget instead, spent on the tasks with the "
                   "largest share of the latency; stops on time, and a rerun resumes")
    p.add_argument("--db", "--tuning-db", metavar="DIR", dest="db",
                   help="database folder (default: this machine's shared database for the target, "
                        "in ~/.cache/graphprune/tuning; $GRAPHPRUNE_TUNING_DB overrides it)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on remote boards through a TVM RPC tracker")
    p.add_argument("--rpc-key", help="device key registered with the RPC tracker")
    p.set_defaults(run=cmd_tune)
    return parser


# ---- checks before long work -----------------------------------------------------------------

def _check_model_path(path: str) -> None:
    if not os.path.isfile(path):
        raise BadOnnxError(f"no such file: {path}", source=path, hint="check the path to the .onnx file")


def _check_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any long work."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".graphprune-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def _calibration(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The ``--calibration`` batches (checked against the model's inputs), or None."""
    if not getattr(args, "calibration", None):
        if getattr(args, "recover_steps", None):
            raise ShapeMismatchError("--recover-steps distils on calibration inputs: give them with --calibration",
                                     hint="--calibration calib.npz (unlabeled model inputs)")
        return None
    if args.input_shape or args.inputs:
        raise ShapeMismatchError("--calibration inputs are the example inputs too: leave out --inputs/--input-shape",
                                 hint="give the shapes you want through the calibration arrays")
    from graphprune.frontends.calibration_files import load_calibration

    return load_calibration(args.calibration, _interface(args.model), source=args.model, preprocess=args.preprocess)


def _example(args: argparse.Namespace, calibration: list[dict[str, Any]] | None = None) -> tuple:
    """The example inputs given by ``--input-shape`` and ``--inputs`` (or the first calibration
    batch), in graph-input order (``()`` when none is given: the importer then makes them, or
    says which is missing)."""
    from graphprune.frontends.onnx_inputs import graph_inputs, input_feeds, load_npz

    if calibration:
        return tuple(calibration[0].values())
    if not args.input_shape and not args.inputs:
        return ()
    shapes: dict[str | None, tuple[int, ...]] = {}
    for name, dims in args.input_shape:
        if name in shapes:
            raise ShapeMismatchError(f"--input-shape gives input {name or '(unnamed)'!r} twice",
                                     hint="give each input once")
        shapes[name] = dims
    arrays = load_npz(args.inputs) if args.inputs else {}
    proto = _interface(args.model)
    feeds = input_feeds(proto, shapes=shapes, arrays=arrays, source=args.model)
    return tuple(feeds[vi.name] for vi in graph_inputs(proto))


def _interface(path: str) -> Any:
    """The model's graph (its weights memory-mapped, not read) for its input declarations."""
    from graphprune.frontends.onnx_import import read_model
    from graphprune.frontends.onnx_mapped import read_structure
    from graphprune.frontends.onnx_skeleton import is_fed

    try:
        return read_structure(path, is_fed)[0]
    except Exception:  # a file the wire reader cannot walk: read_model reads it or says what is wrong
        return read_model(path)[0]


def _target(args: argparse.Namespace) -> Any:
    from graphprune.target import Target

    if args.latency_ms is not None or args.latency is not None:
        return Target(latency_ms=args.latency_ms, latency=args.latency, min_units=args.min_units,
                      multiple=args.multiple, min_fraction=args.min_fraction)
    kind = "params" if args.params is not None else "groups" if args.units is not None else "flops"
    value = {"params": args.params, "groups": args.units, "flops": args.flops}[kind]
    return Target(**{kind: 0.5 if value is None else value}, min_units=args.min_units, multiple=args.multiple,
                  min_fraction=args.min_fraction)


# ---- subcommands: each returns (JSON-ready result, text for a human) ----------------------------

def cmd_inspect(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from graphprune.atomic import atomic_write_text
    from graphprune.inspection import inspect_data, inspect_html
    from graphprune.trace import trace

    _check_model_path(args.model)
    if args.html:
        _check_writable_folder(Path(args.html).parent)
    g = trace(args.model, _example(args))
    data = inspect_data(g)
    text = g.summary()
    if args.html:
        atomic_write_text(args.html, inspect_html(g))
        data["html"] = args.html
        text += f"\nwrote {args.html}"
    return data, text


def cmd_prune(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from graphprune.compile import compile, save_onnx

    _check_model_path(args.model)
    model = Path(args.model)
    output = Path(args.output) if args.output else model.with_name(f"{model.stem}.pruned.onnx")
    if output.resolve() == model.resolve():
        raise BadOnnxError(f"the output would overwrite the input {model}", source=str(model),
                           hint="pass another path with -o")
    _check_writable_folder(output.parent)
    if args.report:
        _check_writable_folder(Path(args.report))
    calibration = _calibration(args)
    result = compile(args.model, _example(args, calibration), method=args.criterion, target=_target(args),
                     progress=_progress(args), calibration=calibration, recover_steps=args.recover_steps)
    save_onnx(result.model, output)
    written = [str(output)] + ([str(p) for p in result.report.write(args.report)] if args.report else [])
    data = {"output": str(output), "written": written, "report": result.report.to_dict()}
    return data, f"{result.report.summary()}\nwrote {', '.join(written)}"


def cmd_compile(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from graphprune.compile import compile

    _check_model_path(args.model)
    _check_writable_folder(Path(args.output))
    calibration = _calibration(args)
    result = compile(args.model, _example(args, calibration), method=args.method, target=_target(args),
                     codegen=args.codegen, tune_trials=args.tune_trials, tune_minutes=args.tune_minutes,
                     tuning_db=args.tuning_db, progress=_progress(args), calibration=calibration,
                     recover_steps=args.recover_steps)
    written = [str(p) for p in result.save(args.output)]
    data = {"output": args.output, "written": written, "report": result.report.to_dict()}
    return data, f"{result.report.summary()}\nwrote {len(written)} files into {args.output}"


def cmd_tune(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    import dataclasses

    import numpy as np
    import torch

    from graphprune.compile import codegen_api
    from graphprune.frontends.onnx_import import example_feeds, read_model

    _check_model_path(args.model)
    proto, _ = read_model(args.model)  # a bad file is exit 3 here, not a TVM failure later
    if args.db:
        _check_writable_folder(Path(args.db))
    tune = codegen_api("tune")
    # the given shapes, else the batch 1 and an error for any other dynamic dim, as in prune
    example = [torch.from_numpy(np.asarray(a)) for a in (_example(args) or example_feeds(proto, (), args.model).values())]
    try:
        report = tune(proto, example, args.codegen, work_dir=args.db, trials_per_task=args.trials,
                      minutes=args.minutes, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key)
    except GraphPruneError:
        raise
    except Exception as exc:  # TVM raises many internal error types
        raise TuningError(f"tuning failed: {type(exc).__name__}: {str(exc)[:400]}",
                          source=args.model, hint="run with --debug for the traceback") from exc
    data = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(vars(report))
    return data, report.summary() if hasattr(report, "summary") else str(report)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ---- entry point ---------------------------------------------------------------------------------

def exit_code(exc: BaseException) -> int:
    """The documented exit code for an error (see EPILOG)."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), EXIT_INTERNAL)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, GraphPruneError):
        where = exc.filename or ""
        return f"cannot write {where}: {exc.strerror or exc}\n  hint: choose an output path in a folder you can write"
    if isinstance(exc, GraphPruneError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}\n  hint: run with --debug and report the traceback"


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (TVM's C++ tuning tables included) to stderr, so that
    with ``--json`` stdout holds nothing but the JSON object."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor behind stdout (an embedding host): Python-level only
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``python -m graphprune`` exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compile" and (args.tune_trials or args.tune_minutes) and not args.codegen:
        parser.error("tuning needs --codegen TARGET (e.g. --codegen x86 --tune-minutes 10)")
    run: Callable[[argparse.Namespace], tuple[dict[str, Any], str]] = args.run
    try:
        with _stdout_to_stderr() if args.json else contextlib.nullcontext():
            data, text = run(args)
    except KeyboardInterrupt:
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = exit_code(exc)
        if args.debug:
            traceback.print_exc()
        print(f"graphprune {args.command}: error: {_message(exc)}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "exit_code": code, "error": type(exc).__name__,
                              "message": str(exc), "hint": getattr(exc, "hint", None)}))
        return code
    print(json.dumps({"ok": True, **data}, default=str) if args.json else text)
    return EXIT_OK
