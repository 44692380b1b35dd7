"""Full-size decoder LLM architectures: trace + analysis time, peak memory and the groups
found, and (with weights) the time to prune and build the compact model in module mode;
Torch-Pruning's time on the same configs in the same run.

Every config is a transformers config of the named model (random weights: nothing is
downloaded), run in its own process, one at a time, so that its peak resident memory is
its own (each phase's peak is reported: Linux's ``clear_refs`` resets it).
Trace and analysis run on meta tensors (no weight is materialised: the recorder needs
only shapes), so a 7B architecture costs about a GiB; ``--weights`` names the configs
that are built in bf16 with weights instead, their groups verified at full size (the
default check, :meth:`PrunableGraph.verify`: half of every group's units zeroed in the
weights themselves and put back after, all groups in one forward of the full model
against one of the compact model; memory: the model, a saved copy of each weight it
touches (past 1 GiB in a temporary folder) and the compact model), pruned (``l2``, ``uniform=True``, a fraction
of the parameters) and rebuilt with ``construct_subnet(mode="auto")``, whose check
against the zeroed model runs on the example input.  A config without weights (meta
tensors) has nothing to run at full depth: its groups are verified on a sample, the
same config at :data:`SAMPLED_LAYERS` layers with bf16 weights, and checked
structurally against it (every full-depth group has the kind, size and slices, layer
numbers aside, of a verified one).  Memory with weights: the scores and zero masks are
per-row reductions (no slice is gathered), so the peak is the model plus its compact
copy (the user's model stays untouched) plus about 1 GiB.

Torch-Pruning runs in its own process per config under ``--tp-timeout`` (its dependency
graph build was over 300 s on small GQA configs, issue 21): the build and one step of
its LLM example's local magnitude pruning, with weights for the configs in
``--weights``, else the build alone under a fake-tensor mode (see
:func:`run_torch_pruning`).  Any process above ``--max-gib`` resident is killed.

    nice python benchmarks/llm.py --weights llama-3.2-1b qwen2.5-1.5b phi-3-mini --results benchmarks/results/llm.txt
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

TOKENS = 16  # example input length: the analysis needs shapes, the checks a forward

CONFIGS = {  # the named models' published configs, the fields that set the shapes
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "qwen2.5-1.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "phi-3-mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096)),
    "mistral-7b": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, sliding_window=4096)),
}


def _rss_gib(status: str = "/proc/self/status", field: str = "VmHWM") -> float:
    """A process's peak (``VmHWM``) or current (``VmRSS``) resident memory in GiB."""
    with open(status) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    raise RuntimeError(f"{status} has no {field}")


def _phase(row: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; put its seconds in ``row[key + "_s"]`` and this process's peak resident
    memory during it in ``row[key + "_GiB"]`` (the peak is reset first, Linux's
    ``clear_refs``, so each phase reports its own)."""
    print(f"phase {key}", file=sys.stderr, flush=True)  # a killed child's last phase (see _child)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    out = fn()
    row[key + "_s"] = time.perf_counter() - start
    row[key + "_GiB"] = _rss_gib()
    print(json.dumps(row), flush=True)  # the row so far: a killed child's finished phases still count
    return out


def _model(name: str, weights: bool, layers: int | None = None) -> tuple[Any, Any]:
    """The config's model in eval mode: random bf16 weights (seed 0), or on meta tensors;
    ``layers`` overrides its depth."""
    import torch
    import transformers

    cfg_cls, model_cls, fields = CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(**{**fields, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    if weights:
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy of a 7 GB model first
        try:
            return cfg, getattr(transformers, model_cls)(cfg).eval()
        finally:
            torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        return cfg, getattr(transformers, model_cls)(cfg).to(torch.bfloat16).eval()


def _example(cfg: Any) -> Any:
    import torch

    return torch.randint(0, cfg.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))


#: the depth at which a config without weights is verified (see :func:`_sampled_check`)
SAMPLED_LAYERS = 2


def _layer_free(group: Any) -> tuple:
    """A group's structure with the layer numbers taken out of its parameter names: a
    group of a deep model has the signature of its counterpart in a shallow one of the
    same widths (the hidden-column group, which spans every layer, too)."""
    return (group.kind, group.size, frozenset((re.sub(r"\.\d+\.", ".#.", s.param), s.dim, s.index.shape[1], s.role)
                                              for s in group.slices))


def _sampled_check(name: str, full: Any) -> dict:
    """Verify ``name`` at :data:`SAMPLED_LAYERS` layers with bf16 weights, then match
    every group of ``full`` (the full-depth graph, on meta tensors) to a verified group of
    the sample by :func:`_layer_free` signature: the groups found, not sampled."""
    import graphprune as gp

    cfg, model = _model(name, True, SAMPLED_LAYERS)
    g = gp.trace(model, example_kwargs={"input_ids": _example(cfg), "use_cache": False}, verify=False)
    withdrawn = g.verify()
    verified = {_layer_free(grp) for grp in g.groups}
    return {"sampled_layers": SAMPLED_LAYERS, "withdrawn": len(withdrawn),
            "structural": f"{sum(_layer_free(grp) in verified for grp in full.groups)}/{len(full.groups)}"}


def run_one(name: str, weights: bool, params: float) -> dict:
    """One config in this process: the row's figures (seconds and peak GiB per phase)."""
    import graphprune as gp

    row: dict[str, Any] = {"config": name, "weights": "bf16" if weights else "meta"}
    cfg, model = _phase(row, "build", lambda: _model(name, weights))
    row["params_B"] = sum(p.numel() for p in model.parameters()) / 1e9
    ids = _example(cfg)
    g = _phase(row, "trace", lambda: gp.trace(model, example_kwargs={"input_ids": ids, "use_cache": False},
                                              verify=False))
    heads = [grp for grp in g.groups if grp.kind == "head"]
    mlp = [grp for grp in g.groups if ".mlp." in grp.name]
    row["groups"] = len(g.groups)
    row["kv_groups_per_layer"] = heads[0].size if heads else 0
    row["heads_per_kv_group"] = cfg.num_attention_heads // cfg.num_key_value_heads
    row["head_layers"] = len(heads)
    row["mlp_units_per_layer"] = mlp[0].size if mlp else 0
    row["hidden_groups"] = len(g.groups) - len(heads) - len(mlp)
    if weights:
        row["withdrawn"] = len(_phase(row, "verify", g.verify))
        report = _phase(row, "prune", lambda: gp.prune(g, "l2", gp.Target(params=params), uniform=True))
        row["removed_params"] = report.achieved["params"]
        compact = _phase(row, "compact", lambda: g.construct_subnet(mode="auto"))
        row["compact_form"] = g.compact_form
        row["compact_params_B"] = sum(p.numel() for p in compact.parameters()) / 1e9
    else:
        row.update(_phase(row, "verify", lambda: _sampled_check(name, g)))
    row["peak_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return row


# ---------------------------------------------------------------------------- Torch-Pruning
def _tp_settings(model: Any, cfg: Any) -> tuple[dict, dict]:
    """Torch-Pruning's ``num_heads`` and ``out_channel_groups`` as its LLM example sets
    them: the query projection has the attention heads, key and value projections the
    KV heads (GQA); a fused qkv projection the attention heads, a fused gate/up
    projection two output groups."""
    heads: dict = {}
    groups: dict = {}
    for _, mod in model.named_modules():
        if hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
            heads[mod.q_proj] = cfg.num_attention_heads
            heads[mod.k_proj] = heads[mod.v_proj] = cfg.num_key_value_heads
        elif hasattr(mod, "qkv_proj"):
            heads[mod.qkv_proj] = cfg.num_attention_heads
        if hasattr(mod, "gate_up_proj"):
            groups[mod.gate_up_proj] = 2
    return heads, groups


def _tp_forward(model: Any, cfg: Any, ids: Any) -> str:
    """Whether the pruned model runs: its attention modules' and config's head counts set
    from the pruned projections first (widths Torch-Pruning does not touch)."""
    import torch

    attn = next(m for m in model.modules() if hasattr(m, "head_dim") and hasattr(m, "o_proj"))
    d = attn.head_dim
    if hasattr(attn, "q_proj"):
        q, kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    else:  # fused qkv: equal thirds when the config has as many KV heads as heads
        q = kv = attn.qkv_proj.out_features // 3 // d
    cfg.num_attention_heads, cfg.num_key_value_heads = q, kv
    cfg.hidden_size = model.get_input_embeddings().embedding_dim
    for m in model.modules():
        if hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = q // max(kv, 1)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception as exc:  # noqa: BLE001  (reported in the table: the pruned model does not run)
        return f"forward raises {type(exc).__name__}: {str(exc)[:80]}"
    return "runs"


def _tp_pruner(model: Any, cfg: Any, ids: Any, ratio: float) -> Any:
    """Torch-Pruning's pruner as its LLM example sets it up: local magnitude pruning of
    widths and whole heads at ``ratio`` (hidden width, MLP units, heads), the LM head's
    outputs (the vocabulary) kept, widths rounded to multiples of 4.  Constructing it
    builds the dependency graph."""
    import torch_pruning as tp

    heads, groups = _tp_settings(model, cfg)
    return tp.pruner.BasePruner(
        model, {"input_ids": ids, "use_cache": False}, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, head_pruning_ratio=ratio, num_heads=heads, prune_num_heads=True,
        prune_head_dims=False, out_channel_groups=groups, ignored_layers=[model.lm_head],
        output_transform=lambda out: out.logits, round_to=4)


def _layer_split(model: Any) -> tuple[int, int]:
    """Parameters inside the decoder layers, and the rest (embeddings, LM head, final norm)."""
    inside = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    return inside, sum(p.numel() for p in model.parameters()) - inside


def _tp_ratio(name: str, params: float, ids: Any, layers: int = 2, steps: int = 7) -> tuple[float, float]:
    """The ratio at which Torch-Pruning removes ``params`` of the full model's parameters,
    and the fraction it predicts: bisection on a ``layers``-deep model of the same
    widths (every layer is pruned alike, so the full model's removal is the shallow
    one's per-layer removal times its depth, plus what goes outside the layers).  A
    step on the full model would cost a copy of it per trial.  The full run's removal
    is measured, not assumed."""
    import copy

    cfg, shallow = _model(name, True, layers)
    depth = CONFIGS[name][2]["num_hidden_layers"]
    inside, outside = _layer_split(shallow)
    full = outside + inside / layers * depth

    def removed(ratio: float) -> float:
        model = copy.deepcopy(shallow)
        _tp_pruner(model, cfg, ids, ratio).step()
        now_in, now_out = _layer_split(model)
        return ((outside - now_out) + (inside - now_in) / layers * depth) / full

    lo, hi, best = 0.0, 0.6, (float("inf"), 0.0, 0.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = removed(mid)
        best = min(best, (abs(got - params), mid, got))
        lo, hi = (mid, hi) if got < params else (lo, mid)
    return best[1], best[2]


def run_tp_ratio(name: str, params: float) -> dict:
    """:func:`_tp_ratio` in a process of its own (its trial pruners keep their models
    alive, 8 GiB on Llama-3.2-1B's: that is not Torch-Pruning's memory on the full model)."""
    import transformers

    cfg_cls, _, fields = CONFIGS[name]
    row: dict[str, Any] = {"config": name}
    try:
        row["tp_ratio"], row["tp_predicted"] = _phase(row, "tp_search", lambda: _tp_ratio(
            name, params, _example(getattr(transformers, cfg_cls)(**fields))))
    except Exception as exc:  # noqa: BLE001  (reported; the build and step are still timed)
        row["tp_error"] = f"ratio search raises {type(exc).__name__}: {str(exc)[:90]}"
    return row


def run_torch_pruning(name: str, weights: bool, ratio: float) -> dict:
    """Torch-Pruning on one config in this process: its dependency-graph build (the
    pruner's construction) and one step at ``ratio`` (:func:`_tp_ratio`'s).  Without
    weights the model is built under a fake-tensor mode (meta storage; transformers'
    mask code reads values on plain meta tensors, which fails) and only the build runs:
    the step ranks real weights.  An exception is reported with the phase that raised it."""
    import contextlib

    import torch_pruning as tp
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    row: dict[str, Any] = {"config": name, "tp_version": tp.__version__, "tp_weights": "bf16" if weights else "fake"}
    cfg_cls, _, fields = CONFIGS[name]
    ids = _example(getattr(transformers, cfg_cls)(**fields))  # real: made before the fake mode
    phase = "model"
    try:
        with contextlib.nullcontext() if weights else FakeTensorMode(allow_non_fake_inputs=True):
            cfg, model = _phase(row, "tp_model", lambda: _model(name, True))
            before = sum(p.numel() for p in model.parameters())
            phase = "build"
            pruner = _phase(row, "tp_build", lambda: _tp_pruner(model, cfg, ids, ratio))
            if not weights:
                row["tp_step"] = (f"not run: it ranks weight values, and the config runs without weights "
                                  f"(bf16: {before * 2 / 2 ** 30:.1f} GiB)")
            else:
                phase = f"step (r={ratio:.2f})"
                _phase(row, "tp_step", pruner.step)
                row["tp_removed_params"] = 1 - sum(p.numel() for p in model.parameters()) / before
                row["tp_forward"] = _tp_forward(model, cfg, ids)
    except Exception as exc:  # noqa: BLE001  (the table says which phase raised what)
        row["tp_error"] = f"{phase} raises {type(exc).__name__}: {str(exc)[:90]}"
    return row


# ---------------------------------------------------------------------------- driver
def _child(cmd: list[str], timeout: float, max_gib: float) -> dict:
    """Run ``cmd`` (prints its row so far after each phase, the whole row last) and return
    its row; a timeout, a resident size over ``max_gib`` (killed: the machine is shared)
    or a crash is the row's ``error``, naming the phase it was in, and the phases done
    before it keep their figures.  Output goes to files: a pipe nobody reads would block
    a chatty child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        start, peak, why = time.monotonic(), 0.0, None
        while proc.poll() is None:
            try:
                peak = max(peak, _rss_gib(f"/proc/{proc.pid}/status", "VmRSS"))
            except (OSError, RuntimeError):
                pass  # exited between poll() and the read
            if time.monotonic() - start > timeout:
                why = f"timeout after {timeout:.0f} s"
            elif peak > max_gib:
                why = f"killed at {peak:.1f} GiB resident (limit {max_gib:g} GiB)"
            if why:
                proc.kill()
                break
            time.sleep(0.5)
        proc.wait()
        out.seek(0)
        err.seek(0)
        rows = [line for line in out.read().splitlines() if line.startswith("{")]
        row = json.loads(rows[-1]) if rows else {}
        if why is None and proc.returncode == 0 and rows:
            return row
        tail = err.read().strip().splitlines()
        phases = [line.split()[1] for line in tail if line.startswith("phase ")]
        if why is None:
            why = ("killed by signal 9 (the kernel's OOM killer? see dmesg)" if proc.returncode == -9 else
                   f"exit {proc.returncode}: {tail[-1] if tail else '?'}")
        return {**row, "error": why + (f" in phase {phases[-1]}" if phases else "")}


def _table(rows: list[dict], tp_rows: list[dict], argv: list[str], tp_timeout: float, max_gib: float) -> str:
    import torch

    lines = [f"python benchmarks/llm.py {' '.join(argv)}  (torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads, input 1x{TOKENS} tokens, one process per config and tool, run one at a time, each killed "
             f"above {max_gib:g} GiB resident)",
             "",
             "graphprune: trace + analysis (meta tensors, or the bf16 weights), groups found; with weights: "
             "verify (every group, full size, one forward; without weights: at "
             f"{SAMPLED_LAYERS} layers with weights, the full-depth groups matched to verified ones), prune (l2, uniform) and construct_subnet(mode='auto'); "
             "seconds / peak GiB resident per phase",
             f"{'config':14} {'tensors':7} {'params B':>8} {'trace+analysis':>16} {'KV groups x heads':>17} "
             f"{'MLP units':>9} {'layers':>6} {'verify (withdrawn)':>22} {'prune':>14} {'compact':>14} {'removed':>7}  form"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:14} error: {r['error']}")
            continue
        line = (f"{r['config']:14} {r['weights']:7} {r['params_B']:8.3f} "
                f"{r['trace_s']:7.1f} s {r['trace_GiB']:4.1f} G "
                f"{r['kv_groups_per_layer']:>9} x {r['heads_per_kv_group']:<5} {r['mlp_units_per_layer']:9} "
                f"{r['head_layers']:6}")
        if "verify_s" in r:
            line += f" {r['verify_s']:6.1f} s {r['verify_GiB']:4.1f} G ({r['withdrawn']:>3})"
        if "structural" in r:
            line += f"  sampled: {r['sampled_layers']} layers with weights; groups matched {r['structural']}"
        if "prune_s" in r:
            line += (f" {r['prune_s']:5.1f} s {r['prune_GiB']:4.1f} G {r['compact_s']:5.1f} s {r['compact_GiB']:4.1f} G "
                     f"{r['removed_params']:7.1%}  {r['compact_form'][:70]}")
        lines.append(line)
    version = next((r["tp_version"] for r in tp_rows if "tp_version" in r), "?")
    lines += ["",
              f"Torch-Pruning {version}: BasePruner as its LLM example sets it up (GroupMagnitudeImportance, local, "
              f"heads per q/k/v projection, head and width ratio r, LM head outputs kept, round_to=4); r by "
              f"bisection on a 2-layer model of the same widths (predicted: its removal scaled to the full depth); "
              f"the search in a process of its own; timeout {tp_timeout:.0f} s per process; without weights under a fake-tensor "
              f"mode (meta storage), build only; 'pruned model': a forward after setting the head counts",
              f"{'config':14} {'tensors':7} {'r':>5} {'predict':>7} {'build (graph)':>14} {'step':>14} "
              f"{'removed':>7}  pruned model"]
    for r in tp_rows:
        line = f"{r['config']:14} {r['tp_weights']:7} "
        line += f"{r['tp_ratio']:5.3f} {r['tp_predicted']:7.1%}" if "tp_ratio" in r else f"{'':13}"
        if "tp_build_s" in r:
            line += f" {r['tp_build_s']:7.1f} s {r['tp_build_GiB']:4.1f} G"
        if "tp_step_s" in r:
            line += (f" {r['tp_step_s']:5.1f} s {r['tp_step_GiB']:4.1f} G {r['tp_removed_params']:7.1%}  "
                     f"{r['tp_forward']}")
        elif "tp_step" in r:
            line += f"  step: {r['tp_step']}"
        if "tp_error" in r:
            line += f"  {r['tp_error']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--weights", nargs="*", default=[], choices=list(CONFIGS),
                    help="configs also built with bf16 weights, pruned and rebuilt (memory: about 2x the weights)")
    ap.add_argument("--params", type=float, default=0.2, help="fraction of the parameters to prune")
    ap.add_argument("--tp-timeout", type=float, default=600.0, help="seconds Torch-Pruning gets per config")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--max-gib", type=float, default=14.5,
                    help="kill a process above this resident size (the machine is shared)")
    ap.add_argument("--results", help="write the table here (temp file, then rename)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tp-one", help=argparse.SUPPRESS)
    ap.add_argument("--tp-search", help=argparse.SUPPRESS)
    ap.add_argument("--tp-ratio", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.one in args.weights, args.params)))
        return
    if args.tp_search:
        print(json.dumps(run_tp_ratio(args.tp_search, args.params)))
        return
    if args.tp_one:
        print(json.dumps(run_torch_pruning(args.tp_one, args.tp_one in args.weights, args.tp_ratio)))
        return
    rows, tp_rows = [], []
    child = [sys.executable, __file__, "--params", str(args.params), "--weights", *args.weights]
    for name in args.configs:  # one process at a time: a 4B model with weights takes half the machine
        rows.append({"config": name, **_child([*child, "--one", name], float("inf"), args.max_gib)})
        print(rows[-1], flush=True)
        if not args.no_tp:
            row = {"config": name, "tp_weights": "bf16" if name in args.weights else "fake"}
            if name in args.weights:  # the ratio only matters to the step
                row.update(_child([*child, "--tp-search", name], args.tp_timeout, args.max_gib))
            ratio = row.get("tp_ratio", args.params)  # without a search, the build's time hardly depends on it
            done = _child([*child, "--tp-one", name, "--tp-ratio", str(ratio)], args.tp_timeout, args.max_gib)
            errors = [e for e in (row.pop("tp_error", None) or row.pop("error", None),
                                  done.pop("tp_error", None) or done.pop("error", None)) if e]
            tp_rows.append({**row, **done, **({"tp_error": "; ".join(errors)} if errors else {})})
            print(tp_rows[-1], flush=True)
    text = _table(rows, tp_rows, sys.argv[1:], args.tp_timeout, args.max_gib)
    print(text)
    if args.results:
        from graphprune.atomic import atomic_write_text
        atomic_write_text(args.results, text)


if __name__ == "__main__":
    main()
