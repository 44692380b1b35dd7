"""Full-size decoder LLM architectures: trace + analysis time, peak memory and the groups
found, and (with weights) the time to prune and build the compact model in module mode.

Every config is a transformers config of the named model (random weights: nothing is
downloaded), run in its own process so that its peak resident memory is its own.
Trace and analysis run on meta tensors (no weight is materialised: the recorder needs
only shapes), so a 7B architecture costs a few GiB at most; ``--weights`` names the
configs that are also built in bf16 with weights, pruned (``l2``, ``uniform=True``, a
fraction of the parameters) and rebuilt with ``construct_subnet(mode="module")``, whose
check against the zeroed model runs on the example input.  Memory with weights: the
``l2`` scoring gathers each group's slices into one matrix (``Group.norms``), and the
hidden-width group spans nearly every weight, so pruning Llama-3.2-1B peaked at 7.7 GiB
(the bf16 model is 2.5 GB).  Group verification on full-size activations (item 1 of
issue 21) and Torch-Pruning's times are not here yet.

    python benchmarks/llm.py --weights llama-3.2-1b --results benchmarks/results/llm.txt
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

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


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def run_one(name: str, weights: bool, params: float) -> dict:
    """One config in this process: the row's figures."""
    import torch
    import transformers

    import graphprune as gp

    cfg_cls, model_cls, fields = CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(**fields)
    torch.manual_seed(0)
    start = time.perf_counter()
    if weights:
        torch.set_default_dtype(torch.bfloat16)
        model = getattr(transformers, model_cls)(cfg).eval()
        torch.set_default_dtype(torch.float32)
    else:
        with torch.device("meta"):
            model = getattr(transformers, model_cls)(cfg).to(torch.bfloat16).eval()
    row = {"config": name, "weights": "bf16" if weights else "meta", "build_s": time.perf_counter() - start,
           "params_B": sum(p.numel() for p in model.parameters()) / 1e9}
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    g = gp.trace(model, example_kwargs={"input_ids": ids, "use_cache": False}, verify=False)
    row["trace_s"] = time.perf_counter() - start
    heads = [grp for grp in g.groups if grp.kind == "head"]
    mlp = [grp for grp in g.groups if ".mlp." in grp.name]
    row["groups"] = len(g.groups)
    row["kv_groups_per_layer"] = heads[0].size if heads else 0
    row["heads_per_kv_group"] = cfg.num_attention_heads // cfg.num_key_value_heads
    row["head_layers"] = len(heads)
    row["mlp_units_per_layer"] = mlp[0].size if mlp else 0
    row["hidden_groups"] = len(g.groups) - len(heads) - len(mlp)
    row["trace_peak_GiB"] = _peak_gib()
    if weights:
        start = time.perf_counter()
        report = gp.prune(g, "l2", gp.Target(params=params), uniform=True)
        row["prune_s"] = time.perf_counter() - start
        row["removed_params"] = report.achieved["params"]
        start = time.perf_counter()
        compact = g.construct_subnet(mode="auto")
        row["compact_s"] = time.perf_counter() - start
        row["compact_form"] = g.compact_form
        row["compact_params_B"] = sum(p.numel() for p in compact.parameters()) / 1e9
        row["peak_GiB"] = _peak_gib()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--weights", nargs="*", default=[], choices=list(CONFIGS),
                    help="configs also built with bf16 weights, pruned and rebuilt (memory: about 3x the weights)")
    ap.add_argument("--params", type=float, default=0.2, help="fraction of the parameters to prune")
    ap.add_argument("--results", help="write the table here (temp file, then rename)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.one in args.weights, args.params)))
        return
    import torch

    rows = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--one", name, "--params", str(args.params), "--weights", *args.weights]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            rows.append({"config": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "?"})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"python benchmarks/llm.py {' '.join(sys.argv[1:])}  (torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, input 1x16 tokens, one process per config)",
             f"{'config':14} {'weights':7} {'params B':>8} {'trace+analysis s':>16} {'peak GiB':>8} "
             f"{'KV groups x heads':>17} {'MLP units':>9} {'layers':>6}  with weights: prune s, compact s, peak GiB"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:14} error: {r['error']}")
            continue
        line = (f"{r['config']:14} {r['weights']:7} {r['params_B']:8.3f} {r['trace_s']:16.1f} {r['trace_peak_GiB']:8.2f} "
                f"{r['kv_groups_per_layer']:>9} x {r['heads_per_kv_group']:<5} {r['mlp_units_per_layer']:9} "
                f"{r['head_layers']:6}")
        if "prune_s" in r:
            line += (f"  {r['prune_s']:.1f}, {r['compact_s']:.1f}, {r['peak_GiB']:.2f} "
                     f"(removed {r['removed_params']:.1%} params; {r['compact_form'][:60]})")
        lines.append(line)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        from graphprune.atomic import atomic_write_text
        atomic_write_text(args.results, text)


if __name__ == "__main__":
    main()
