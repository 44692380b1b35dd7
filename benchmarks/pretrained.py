"""Pruning a *pretrained* model with no training set: every criterion against Torch-Pruning,
with HESSO's full training as the ceiling.

Not run in CI.  ``nice python benchmarks/pretrained.py [--models resnet20,vit,textlm]
[--ratios 0.1,0.2,0.3,0.5] [--jobs 2] [--out benchmarks/results/pretrained.txt]``; the results
file comes from ``--models textlm,resnet20,vit --ratios 0.3,0.5,0.1,0.2 --jobs 2 --threads 1
--recover-steps 200,textlm=4800 --hesso-steps textlm=600``: at 2400 steps textlm kept 0.423
of 0.433 at 30% (the bar is 98%, 0.424); 4800 steps reached 0.4244 (wanda) and 0.4237
(reconstruction), a warm-up with gradient clipping 0.4233 and twice the rate 0.4222 at 2400.
Each finished (model, ratio) sweep is kept under ``benchmarks/cache/units/``, keyed by its
options and a digest of the code, and so are the rows of each sweep still running, so
``--resume`` finishes an interrupted run of the same command on the same code, taking the
finished sweeps and rows as they are: with ``textlm=4800`` recovery steps (41 minutes each on
one core) the LM alone needs about five hours of both cores, more than one sitting.

Issue 19's user holds a trained model and at most some unlabeled inputs.  This script
first trains, here on CPU, models that are genuinely good at their task (cached under
``benchmarks/cache/``, so a rerun only prunes):

* ``resnet20``: the CIFAR ResNet-20 (16-32-64 channels, 3 basic blocks per stage) on
  sklearn's digits upsampled to 32x32;
* ``vit``: a ViT (4x4 patches of 16x16 digits = 16 tokens, width 96, 4 pre-norm blocks,
  4 heads of 24, MLP 192);

both trained with random affine augmentation (rotation, shift, scale) on the fixed
1297-image split of ``benchmarks/digits.py`` and scored by accuracy on its 500 held-out
digits; and

* ``textlm``: the small Llama (grouped-query attention) of ``benchmarks/textlm.py``,
  trained on docstrings of installed packages, scored by next-token accuracy on held-out
  documents (its perplexity is printed beside it).  graphprune offers every group it finds
  (KV-head groups, MLP units and the hidden width, which also narrows the tied LM head of
  a quarter of the MACs: at 50% of MACs removed, keeping the hidden width cost 0.02 of
  accuracy after recovery); Torch-Pruning keeps the hidden width, as its LLM settings do,
  and both are compared at the same measured MACs.  Torch-Pruning does not finish building the dependency graph of
  its grouped-query attention, so it prunes the same model with each KV head repeated for
  the query heads that read it (``textlm.as_mha``: the same outputs, as in
  ``llm_quality.py``); its measured MACs are counted against the grouped-query dense
  model's (the repeated KV projections add 6%, which its ratio search has to remove too).

Each model is a :class:`Task`: its metric, example input, calibration batches, labelled
batches, loss and training recipe; the sweep knows nothing else about it.

Then, for each model and each MACs reduction, every criterion that ``gp.prune`` lists at
run time (``graphprune.optim.scoring.CRITERIA``: criteria added later appear without an
edit here) and Torch-Pruning's importances prune a copy of the dense model to the same
*measured* MACs (PyTorch's ``FlopCounterMode``; each method's knob is searched as in
``benchmarks/one_shot.py``).  The score is the task metric (higher is better), not
agreement with the dense model.  Gradient criteria (ours and Torch-Pruning's Taylor) see
4 labelled batches, which is more than issue 19's user has; they are marked ``(labels)``.
For textlm, a generative LM, "no data" of the calibrated criteria is ``gp.prune``'s
default without data: calibration on sequences the model samples itself
(:mod:`graphprune.optim.generated`); the row "obspa (weights only)" is the estimate from
the weights alone that it replaces.
Column "calibration" is graphprune's calibrated criteria (``gp.prune(..., data=unlabeled)``
with the criteria that declare they read unlabeled inputs), "calib+recovery" the same
followed by ``gp.recover`` (distillation from the dense model on the same inputs).

The "HESSO (full training)" row is the ceiling: graphprune's HESSO starts from the dense
weights (the user's situation) and trains toward ``Target(flops=ratio)`` with every
label, for as many steps as the model's pretraining and with its recipe (optimizer,
schedule, augmentation, loss); then its compact model is measured like every other row.
A HESSO row whose measured MACs miss the target by more than 2 points says so.

Scores are printed to 4 decimals (the LM's bar at 30%, 98% of 0.433, was decided by two
tokens in 32768, which 3 decimals rounded away), and the table ends with the issue's bars,
read from its own rows (:func:`bar_lines`): the share of dense kept at each bar and, at each
reduction, graphprune's best against Torch-Pruning's best (a tie is printed as one).

``--alloc`` also prints, for the data-free criteria obspa, l1 and l2, the accuracy under
the allocation rules before issue 19 (no floor, no multiple), with the quarter floor, with
the floor and a multiple of 8 under each cross-group normalisation (mean, max, rank), and
with a half floor: the figures the defaults were chosen from.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import Attention, Block, attention_heads, batches, digits_split, head_layer  # noqa: E402
from one_shot import at_flops  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.atomic import atomic_path  # noqa: E402
from graphprune.errors import GraphPruneError  # noqa: E402
from graphprune.optim import HESSO  # noqa: E402
from graphprune.optim.recovery import default_augment  # noqa: E402
from graphprune.optim.generated import DEFAULT_LENGTH, DEFAULT_SEQUENCES, can_generate  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
BATCH = 64


# ---------------------------------------------------------------------------- models
class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 blocks, 16-32-64 channels), one input channel."""

    def __init__(self, classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(Block(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


class ViT(nn.Module):
    """Patch-4 ViT on 16x16 images: 16 tokens, pre-norm blocks, mean-pooled head."""

    def __init__(self, dim: int = 96, heads: int = 4, depth: int = 4, mlp: int = 192, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(dim), attn=Attention(dim, heads), norm2=nn.LayerNorm(dim),
            mlp=nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)))) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            h = h + blk["attn"](blk["norm1"](h))
            h = h + blk["mlp"](blk["norm2"](h))
        return self.head(self.norm(h).mean(dim=1))



# name -> (factory, image side, training epochs, peak learning rate)
DIGIT_MODELS = {"resnet20": (ResNet20, 32, 8, 3e-3), "vit": (ViT, 16, 30, 2e-3)}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), scale (0.9-1.1) and shift (+-10%) of a batch of images."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * math.radians(24)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)]).eq(y).float().mean())


def digit_steps(name: str) -> int:
    """Optimizer steps of a digits model's pretraining (epochs of the 1297 training digits)."""
    return DIGIT_MODELS[name][2] * math.ceil(1297 / BATCH)


def digit_recipe(name: str, model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int
                 ) -> Iterator[torch.Tensor]:
    """The digits pretraining recipe on ``opt``: one-cycle schedule (set here), augmented
    batches, label-smoothed cross-entropy.  Yields each step's loss, backward already done;
    the caller steps the optimizer."""
    lr = DIGIT_MODELS[name][3]
    xtr, ytr = digits_split(DIGIT_MODELS[name][1])[:2]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for x, y in batches(xtr, ytr, steps, BATCH, seed):
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(augment(x, gen)), y, label_smoothing=0.1)
        loss.backward()
        yield loss
        sched.step()


def pretrained(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The trained dense digits model (from the cache, else trained now and cached) and its data split."""
    factory, side, epochs, lr = DIGIT_MODELS[name]
    data = digits_split(side)
    torch.manual_seed(seed)
    model = factory()
    path = CACHE / f"{name}-seed{seed}-e{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), data
    steps = digit_steps(name)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    t0 = time.perf_counter()
    for step, _ in enumerate(digit_recipe(name, model, opt, steps, seed)):
        opt.step()
        if (step + 1) % (steps // 10) == 0:
            print(f"  {name} step {step + 1}/{steps} test acc {accuracy(model, data[2], data[3]):.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, data


# ---------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One pretrained model and everything the sweep needs of it, so the sweep has no
    per-model branches.

    ``forward(model, x)`` is the model's task output (logits) for one input batch, used
    for counting MACs on ``macs_input``; ``metric`` is the task score (higher is better),
    ``detail`` an extra figure printed beside it; ``loss(output, y)`` reads what the
    model returns for the gradient criteria's ``labelled`` pairs; ``unlabeled`` are the
    calibration batches; ``train(model, opt, steps, seed)`` runs the pretraining recipe on
    ``opt`` (yielding each step's loss, gradients ready), and ``train_steps`` is the
    pretraining's length; ``tp_config(model)`` gives Torch-Pruning's keyword arguments, and
    ``tp_subprocess`` runs it in a subprocess under a time limit (its graph build may hang);
    ``tp_model(model)`` is the model Torch-Pruning is given: the dense one, or one computing
    the same function whose graph it can build (``tp_note`` says which, in the header)."""

    name: str
    dense: nn.Module
    trace: dict[str, Any]
    forward: Callable[[nn.Module, Any], torch.Tensor]
    macs_input: Any
    metric_name: str
    metric: Callable[[nn.Module], float]
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    labelled: list[tuple[Any, torch.Tensor]]
    unlabeled: list[Any]
    train: Callable[[nn.Module, torch.optim.Optimizer, int, int], Iterator[torch.Tensor]]
    train_steps: int
    train_recipe: str
    hesso_options: dict[str, Any]
    tp_config: Callable[[nn.Module], dict[str, Any]]
    tp_methods: list[str]
    detail: Callable[[nn.Module], str] = lambda model: ""
    compact_mode: str = "graph"
    tp_subprocess: bool = False
    tp_model: Callable[[nn.Module], nn.Module] = lambda model: model
    tp_note: str = ""
    recover_options: dict[str, Any] = field(default_factory=dict)
    calibration_note: str = ""


def digits_task(name: str) -> Task:
    """A digits classifier: test accuracy, 256 training digits as calibration and labelled data."""
    base, (xtr, ytr, xte, yte) = pretrained(name)
    side = DIGIT_MODELS[name][1]
    ex = torch.zeros(2, 1, side, side)
    gen = torch.Generator().manual_seed(100)
    pick = torch.randperm(len(ytr), generator=gen)[:256]
    labelled = [(xtr[pick[i:i + 64]], ytr[pick[i:i + 64]]) for i in range(0, 256, 64)]
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    epochs, lr = DIGIT_MODELS[name][2:]

    def tp_config(model: nn.Module) -> dict[str, Any]:
        return dict(ignored_layers=[head_layer(model)], num_heads=attention_heads(model), global_pruning=True)

    return Task(
        name=name, dense=base, trace=dict(example_inputs=(ex,)), forward=lambda m, x: m(x), macs_input=ex[:1],
        metric_name="test accuracy on 500 held-out digits", metric=lambda m: accuracy(m, xte, yte),
        loss=F.cross_entropy, labelled=labelled, unlabeled=[x for x, _ in labelled],
        train=lambda m, opt, steps, seed: digit_recipe(name, m, opt, steps, seed), train_steps=digit_steps(name),
        train_recipe=f"{epochs} epochs = {digit_steps(name)} steps of 64 augmented digits, AdamW (wd 0.05), "
                     f"one-cycle to lr {lr:g}, label smoothing 0.1",
        hesso_options=dict(lr=lr, variant="adamw", weight_decay=0.05),
        tp_config=tp_config, tp_methods=["tp-l1", "tp-l2", "tp-taylor"] + (["tp-bnscale"] if has_bn else []),
        calibration_note="256 unlabeled training digits (4 batches of 64)")


#: textlm's sizes here: 512 calibration windows (the most issue 19 allows: with 128, 600 recovery
#: steps fit the calibration text rather than the dense model); 256 held-out windows scored, spread
#: evenly over the held-out documents (32k tokens: a standard error of 0.003 on the accuracy)
LM_CALIBRATION, LM_HELDOUT = 512, 256


def textlm_task() -> Task:
    """textlm's Llama: held-out next-token accuracy; calibration windows of training text;
    its own text as the labels (next tokens) of the gradient criteria and of HESSO."""
    import textlm

    dense, data = textlm.load()
    dense.config.use_cache = False
    every = data.heldout_windows()
    held = every[::max(1, len(every) // LM_HELDOUT)][:LM_HELDOUT]
    calib = textlm.calibration(LM_CALIBRATION, textlm.SEQ)
    train_cfg = textlm.TRAIN

    def logits(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, use_cache=False).logits

    def lm_loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of a forward's output on the ids it read (labels are the ids)."""
        lg = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def recipe(m: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> Iterator[torch.Tensor]:
        """textlm's pretraining recipe: random windows of the training stream, linear warm-up
        then cosine to a tenth, gradient clipping."""
        gen = torch.Generator().manual_seed(seed)
        cfg = dict(train_cfg, steps=steps, warmup=max(1, train_cfg["warmup"] * steps // train_cfg["steps"]))
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = textlm._lr(step, cfg)
            start = torch.randint(0, len(data.train) - textlm.SEQ - 1, (cfg["batch"],), generator=gen)
            ids = torch.stack([data.train[s:s + textlm.SEQ] for s in start.tolist()])
            m.train()
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(logits(m, ids), ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg["clip"])
            yield loss

    def tp_config(model: nn.Module) -> dict[str, Any]:
        """Torch-Pruning's LLM settings: heads per q/k/v projection, whole heads removed at the
        same ratio as channels, per-layer (not global) ranking, the hidden width kept."""
        cfg = model.config
        num_heads, ignored = {}, [model.lm_head, model.model.embed_tokens]
        for layer in model.model.layers:
            attn = layer.self_attn
            num_heads[attn.q_proj] = cfg.num_attention_heads
            num_heads[attn.k_proj] = num_heads[attn.v_proj] = cfg.num_key_value_heads
            ignored += [attn.o_proj, layer.mlp.down_proj]
        return dict(ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                    head_pruning_ratio_same=True, global_pruning=False, output_transform=lambda out: out.logits)

    ids = textlm.example_input(textlm.SEQ)["input_ids"]
    return Task(
        name="textlm", dense=dense, trace=dict(example_kwargs=textlm.example_input(textlm.SEQ)), forward=logits,
        macs_input=ids, metric_name=f"next-token accuracy on {held.numel()} held-out tokens "
                                    f"({len(held)} windows of {textlm.SEQ})",
        metric=lambda m: textlm.next_token_accuracy(m, held), detail=lambda m: f"ppl {textlm.perplexity(m, held):.1f}",
        loss=lm_loss, labelled=[(b, b) for b in calib[:4]], unlabeled=calib,
        train=recipe, train_steps=train_cfg["steps"],
        train_recipe=f"{train_cfg['steps']} steps of {train_cfg['batch']} windows of {textlm.SEQ} tokens, AdamW "
                     f"(wd {train_cfg['weight_decay']}), warm-up then cosine from lr {train_cfg['lr']:g}, clip "
                     f"{train_cfg['clip']}",
        hesso_options=dict(lr=train_cfg["lr"], variant="adamw", weight_decay=train_cfg["weight_decay"],
                           betas=(0.9, 0.95)),
        tp_config=tp_config, tp_methods=["tp-l1", "tp-l2", "tp-taylor"], tp_model=textlm.as_mha,
        tp_note="Torch-Pruning prunes the same model with its KV heads repeated to one per query head (same "
                "outputs; its graph of the grouped-query one does not finish), its measured MACs counted "
                "against the grouped-query dense model's",
        compact_mode="module", tp_subprocess=True,
        recover_options=dict(loss="kl"),
        calibration_note=f"{LM_CALIBRATION} unlabeled training windows of {textlm.SEQ} tokens; no data: the "
                         f"calibrated criteria read {DEFAULT_SEQUENCES} sequences of {DEFAULT_LENGTH} tokens the "
                         f"model samples itself (gp.prune's default for a generative LM), 'obspa (weights only)' "
                         f"is the estimate from the weights alone (generate=False)")


TASKS: dict[str, Callable[[], Task]] = {"resnet20": lambda: digits_task("resnet20"),
                                        "vit": lambda: digits_task("vit"), "textlm": textlm_task}


def macs(task: Task, model: nn.Module) -> float:
    """Multiply-accumulates of the task's one-sample input by PyTorch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        task.forward(model, task.macs_input)
    return counter.get_total_flops() / 2


# ---------------------------------------------------------------------------- pruning
def calibrated_criteria() -> tuple[str, ...]:
    """Criteria that read unlabeled calibration inputs, as graphprune declares them."""
    from graphprune.optim.scoring import CALIBRATED

    return tuple(CALIBRATED)


def criteria() -> list[str]:
    """Every criterion ``gp.prune`` knows at run time."""
    from graphprune.optim.scoring import CRITERIA

    return list(CRITERIA)


RECOVER_LR = inspect.signature(gp.recover).parameters["lr"].default  # where a task sets none
LABELLED = ("taylor", "hessian")  # read labels through the loss: marked in the table


def traced(task: Task) -> tuple[nn.Module, Any]:
    """A copy of the dense model and its graph, every group offered."""
    model = copy.deepcopy(task.dense).eval()
    return model, gp.trace(model, verify=False, **task.trace)


class Ours:
    """graphprune on one traced copy of the dense model, its weights restored before each try;
    :attr:`report` is the last try's :class:`~graphprune.optim.oneshot.PruneReport`."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.model, self.g = traced(task)
        self.state = copy.deepcopy(self.model.state_dict())
        self.report: gp.PruneReport | None = None

    def __call__(self, criterion: str, target: gp.Target, data=None, **options) -> nn.Module:
        self.model.load_state_dict(self.state)
        self.g.added_biases.clear()  # calibrated compensation's biases live in the graph, not the weights
        self.report = gp.prune(self.g, criterion, target, data=data,
                               loss_fn=self.task.loss if data is not None else None, **options)
        return self.g.construct_subnet(mode=self.task.compact_mode).eval()


def hesso(task: Task, ratio: float, steps: int, seed: int = 0) -> nn.Module:
    """The ceiling: HESSO from the dense weights toward ``ratio`` of the MACs, trained with
    labels for ``steps`` (the pretraining's, unless a run cuts them) on the pretraining's
    recipe: warm-up a tenth, pruning over half, in 10 periods, then the rest as fine-tuning
    of the kept units."""
    model, g = traced(task)
    opt = HESSO(g, target=gp.Target(flops=ratio), warmup_steps=steps // 10, pruning_steps=steps // 2,
                pruning_periods=10, groups=g.groups, **task.hesso_options)
    for loss in task.train(model, opt, steps, seed):
        opt.record_loss(loss)
        opt.step()
    model.eval()
    return g.construct_subnet(mode=task.compact_mode).eval()


def theirs(method: str, task: Task, ratio: float) -> nn.Module:
    """Torch-Pruning with one of its importances at ``ratio``, configured by the task."""
    import torch_pruning as tp

    model = task.tp_model(copy.deepcopy(task.dense)).eval()
    imp = {"tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
           "tp-l2": lambda: tp.importance.MagnitudeImportance(p=2),
           "tp-taylor": tp.importance.TaylorImportance,
           "tp-bnscale": tp.importance.BNScaleImportance}[method]()
    config = task.tp_config(model)
    if config.pop("head_pruning_ratio_same", False):
        config["head_pruning_ratio"] = ratio
    pruner = tp.pruner.MetaPruner(model, task.macs_input, importance=imp, pruning_ratio=ratio, **config)
    if method == "tp-taylor":
        model.zero_grad()
        for x, y in task.labelled:
            task.loss(model(x), y).backward()
    pruner.step()
    if hasattr(model, "config") and hasattr(model.config, "num_key_value_heads"):
        for layer in model.model.layers:  # transformers' attention reads its head counts from these
            attn = layer.self_attn
            attn.num_heads = attn.q_proj.out_features // attn.head_dim
            attn.num_key_value_heads = attn.k_proj.out_features // attn.head_dim
            attn.num_key_value_groups = attn.num_heads // attn.num_key_value_heads
    return model.eval()


def theirs_at(method: str, task: Task, full: float, ratio: float) -> tuple[nn.Module, float]:
    """Torch-Pruning searched to ``ratio`` of the measured MACs."""
    return at_flops(lambda r: theirs(method, task, r), full, ratio, None, steps=6, tol=0.02,
                    measure=lambda m: 1 - macs(task, m) / full)


def _tp_child(method: str, task: Task, full: float, ratio: float, out: str) -> None:
    """In a forked process: :func:`theirs_at`, the pruned model saved to ``out``."""
    pruned, got = theirs_at(method, task, full, ratio)
    tmp = out + ".tmp"
    torch.save({"model": pruned, "got": got}, tmp)
    os.replace(tmp, out)


def theirs_limited(method: str, task: Task, full: float, ratio: float, timeout: float) -> tuple[nn.Module, float]:
    """:func:`theirs_at` in a forked process (it inherits the loaded task) under ``timeout``
    seconds, since Torch-Pruning's dependency graph can take very long on grouped-query
    attention; raises ``TimeoutError`` saying so."""
    import multiprocessing

    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"tp-{task.name}-{method}-{ratio}-{os.getpid()}.pt"
    child = multiprocessing.get_context("fork").Process(target=_tp_child, args=(method, task, full, ratio, str(out)))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.terminate()
        child.join()
        raise TimeoutError(f"no result in {timeout:.0f} s")
    if child.exitcode:
        raise RuntimeError(f"the Torch-Pruning process exited with {child.exitcode} (its traceback is above)")
    saved = torch.load(out, weights_only=False)
    out.unlink()
    return saved["model"], saved["got"]


def cell(task: Task, model: nn.Module) -> str:
    """The task metric of ``model`` and its detail, as a table cell."""
    extra = task.detail(model)
    return f"{task.metric(model):.4f}" + (f" ({extra})" if extra else "")


def table_row(name: str, ratio: float | None, method: str, got: float | None, cells: Sequence[str]) -> str:
    """One row of the table: the model, MACs reduction (None: the dense row), method, measured
    MACs removed and the score cells (no data, calibration, calibration and recovery)."""
    ratio_s = f"{ratio:>5.0%}" if ratio is not None else f"{'dense':>5s}"
    got_s = f"{got:>6.1%}" if got is not None else f"{'-' if ratio is not None else '':>6s}"
    return f"{name:9s} {ratio_s} {method:26s} {got_s} " + " ".join(f"{c:>20s}" for c in cells)


def dense_row(task: Task) -> str:
    return table_row(task.name, None, "dense", None, [cell(task, task.dense)])


def row_label(row: str) -> str:
    """The method a table row is for (its third column)."""
    return row[16:42].strip()


def sweep(task: Task, ratios: list[float], recover_steps: int, alloc: bool, tp_timeout: float,
          hesso_steps: int, emit: Callable[[list[str]], None], tp_broken: str | None = None,
          finished: Sequence[str] = ()) -> list[str]:
    """Table rows of one model, per MACs reduction every method; ``emit`` gets the rows so
    far after each one (a partial table survives an interrupted run).  ``tp_broken``: why
    Torch-Pruning is not tried (a failure every try would repeat).  ``finished``: rows an
    interrupted run of the same sweep wrote (one ratio), taken as they are instead of
    measured again (a textlm sweep recovers three models for an hour each)."""
    base = task.dense
    full = macs(task, base)
    name = task.name
    rows: list[str] = []
    mine = Ours(task)
    calibrated = calibrated_criteria()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules())
    methods = [c for c in criteria() if c != "bn_scale" or has_bn]

    def row(method: str, ratio: float, got: float | None, cells: list[str], note: str = "") -> None:
        rows.append(table_row(name, ratio, method, got, cells) + note)
        print(rows[-1], flush=True)
        emit(rows)

    earlier = {row_label(r): r for r in finished}

    def reused(label: str) -> bool:
        """Whether the interrupted run finished ``label``'s row (then it is taken as it is)."""
        if label not in earlier:
            return False
        rows.append(earlier[label])
        print(rows[-1] + "  (from the interrupted run)", flush=True)
        emit(rows)
        return True

    def criterion_row(c: str, label: str, ratio: float, target: gp.Target) -> None:
        """``c``'s row: no data, calibrated, calibrated and recovered (where ``c`` reads data)."""
        t0 = time.perf_counter()
        data = task.labelled if c in LABELLED else None
        try:
            pruned = mine(c, target, data)
        except Exception as exc:  # a criterion that cannot run here is a result too
            if c not in calibrated or not isinstance(exc, GraphPruneError):  # calibrated ones need data
                row(label, ratio, None, [f"n/a ({type(exc).__name__})"])
                return
            pruned = None
        cells = [cell(task, pruned) if pruned is not None else "- (needs data)"]
        if c in calibrated:
            calib = mine(c, target, task.unlabeled)
            if pruned is None:
                pruned = calib
            cells.append(cell(task, calib))
            gp.recover(calib, base, task.unlabeled, steps=recover_steps, **task.recover_options)  # in place
            cells.append(cell(task, calib))
        else:
            cells += ["-"] * 2
        row(label, ratio, 1 - macs(task, pruned) / full, cells)
        print(f"    ({time.perf_counter() - t0:.0f}s)", flush=True)

    for ratio in ratios:
        target = gp.Target(flops=ratio)
        for c in methods:
            label = c + (" (labels)" if c in LABELLED else "")
            if not reused(label):
                criterion_row(c, label, ratio, target)
            # the estimate a generative LM's default replaces
            if c == "obspa" and can_generate(base) and not reused("obspa (weights only)"):
                weights_only = mine(c, target, None, generate=False)
                row("obspa (weights only)", ratio, 1 - macs(task, weights_only) / full,
                    [cell(task, weights_only), "-", "-"])
        for method in task.tp_methods:
            label = method + (" (labels)" if method == "tp-taylor" else "")
            if reused(label):
                continue
            if tp_broken is not None:
                row(label, ratio, None, [tp_broken])
                continue
            t0 = time.perf_counter()
            try:
                pruned, got = (theirs_limited(method, task, full, ratio, tp_timeout) if task.tp_subprocess
                               else theirs_at(method, task, full, ratio))
            except TimeoutError as exc:
                tp_broken = f"timeout ({tp_timeout:.0f} s)"
                print(f"    Torch-Pruning on {name}: {exc}; not retried", flush=True)
                row(label, ratio, None, [tp_broken])
                continue
            except Exception as exc:
                row(label, ratio, None, [f"n/a ({type(exc).__name__})"])
                print(f"    {method}: {exc}", flush=True)
                continue
            row(label, ratio, got, [cell(task, pruned), "-", "-"])
            print(f"    ({time.perf_counter() - t0:.0f}s)", flush=True)
        if not reused("HESSO (full training)"):
            t0 = time.perf_counter()
            try:
                pruned = hesso(task, ratio, hesso_steps)
            except GraphPruneError as exc:
                row("HESSO (full training)", ratio, None, [f"n/a ({type(exc).__name__})"])
                print(f"    HESSO: {exc}", flush=True)
            else:
                got = 1 - macs(task, pruned) / full
                miss = f"  (missed the {ratio:.0%} target by {abs(got - ratio):.1%})" if abs(got - ratio) > 0.02 else ""
                row("HESSO (full training)", ratio, got, [cell(task, pruned), "-", "-"], note=miss)
                print(f"    ({time.perf_counter() - t0:.0f}s)", flush=True)
        if alloc:  # the allocation rules before issue 19 and the variants the defaults were chosen from
            for c in ("obspa", "l1", "l2"):
                for label, kw, norm in (("no floor, x1 (before)", dict(min_fraction=0.0, multiple=1), None),
                                        ("floor .25, x1", dict(multiple=1), None),
                                        ("floor .25, x8, mean", dict(multiple=8), "mean"),
                                        ("floor .25, x8, max", dict(multiple=8), "max"),
                                        ("floor .25, x8, rank", dict(multiple=8), "rank"),
                                        ("floor .5, x8", dict(min_fraction=0.5, multiple=8), None)):
                    try:
                        pruned = mine(c, gp.Target(flops=ratio, **kw), normalize=norm)
                    except Exception as exc:
                        row(f"{c} {label}", ratio, None, [f"n/a ({type(exc).__name__})"])
                        continue
                    row(f"{c} {label}", ratio, 1 - macs(task, pruned) / full, [cell(task, pruned)])
    return rows


#: The issue's bars: the share of the dense metric kept by the best calibrated and recovered
#: row at 30% and 50% MACs removed, and by the best data-free row at 20%.
BARS = (("calib+recovery", 0.3, 2, 0.98), ("calib+recovery", 0.5, 2, 0.95), ("no data at all", 0.2, 0, 0.90))
CELL0 = 50  # where :func:`table_row` starts the first score cell; each is 20 wide, one space between


def scores(row: str) -> tuple[str, float | None, list[float | None]]:
    """A table row's method, MACs reduction and the score of each cell (None: no score)."""
    def number(text: str) -> float | None:
        head = text.strip().split(" ")[0]
        try:
            return float(head)
        except ValueError:
            return None
    ratio = number(row[10:15].replace("%", ""))
    cells = [number(row[i:i + 20]) for i in range(CELL0, len(row), 21)]
    return row_label(row), None if ratio is None else ratio / 100, cells


def bar_lines(name: str, rows: Sequence[str]) -> list[str]:
    """The done-when bars for one model, from its rows (its dense row first): the share of the
    dense metric each bar asks for, and whether graphprune's best beats Torch-Pruning's best
    importance at each MACs reduction (a tie is said as one: the test set cannot tell them apart)."""
    def ours(method: str) -> bool:  # HESSO is the ceiling, not a contender
        return not method.startswith(("tp-", "HESSO"))

    dense = scores(rows[0])[2][0]
    parsed = [scores(r) for r in rows[1:]]
    lines = []
    for what, ratio, column, need in BARS:
        data_free = column == 0
        best = max((cells[column] for method, r, cells in parsed
                    if r == ratio and len(cells) > column and cells[column] is not None
                    and ours(method) and not (data_free and "(labels)" in method)),
                   default=None)
        share = "no row" if best is None else f"{best:.4f} = {best / dense:.2%} of dense"
        verdict = "met" if best is not None and best / dense >= need else "NOT met"
        lines.append(f"- {name} at {ratio:.0%}, {what}: {share} (bar {need:.0%}): {verdict}")
    for ratio in sorted({r for _, r, _ in parsed if r is not None}):
        at = [(m, [c for c in cells if c is not None]) for m, r, cells in parsed if r == ratio]
        mine = max((max(c) for m, c in at if c and ours(m)), default=None)
        theirs = max((max(c) for m, c in at if c and m.startswith("tp-")), default=None)
        if mine is None or theirs is None:
            continue
        verdict = "beats" if mine > theirs else "ties" if mine == theirs else "does NOT beat"
        lines.append(f"- {name} at {ratio:.0%}: graphprune's best {mine:.4f} {verdict} Torch-Pruning's best {theirs:.4f}")
    return lines


def per_model(spec: str, names: list[str], default: int | None) -> dict[str, int | None]:
    """``"200"`` or ``"200,textlm=50"`` (a value for all, then per-model ones) -> {model: value}."""
    out = dict.fromkeys(names, default)
    for part in filter(None, spec.split(",")):
        name, _, value = part.rpartition("=")
        for n in ([name] if name else names):
            if n not in out:
                raise SystemExit(f"unknown model {n!r} in {spec!r}")
            out[n] = int(value)
    return out


def model_line(task: Task, recover_steps: int, hesso_steps: int) -> str:
    """The header line that states what one model's rows measured."""
    short = (f" (the pretraining's {task.train_steps} cut to {hesso_steps} to fit the run)"
             if hesso_steps != task.train_steps else "")
    written = default_augment(recover_steps, len(task.unlabeled[0]), sum(map(len, task.unlabeled)))
    augment = (f", on the calibration and {written} sequences the dense model writes on from their openings "
               f"(gp.recover's default for a generative LM)" if can_generate(task.dense) and written else "")
    return (f"# {task.name}: {task.metric_name}; calibration: {task.calibration_note}; recovery: {recover_steps} "
            f"steps ({task.recover_options.get('loss', 'mse')} distillation, lr "
            f"{task.recover_options.get('lr', RECOVER_LR):g}{augment}); HESSO: {task.train_recipe}; "
            f"HESSO ran {hesso_steps} steps{short}" + (f"; {task.tp_note}" if task.tp_note else ""))


def probe_tp(task: Task, ratio: float, timeout: float) -> str | None:
    """For a task whose Torch-Pruning runs under a time limit: one try before the ratios are
    swept side by side, so a graph build that never finishes costs one timeout, not one per
    ratio.  Returns the cell every Torch-Pruning row then shows, or None (it ran)."""
    if not task.tp_subprocess:
        return None
    try:
        theirs_limited(task.tp_methods[0], task, macs(task, task.dense), ratio, timeout)
    except TimeoutError as exc:
        print(f"    Torch-Pruning on {task.name}: {exc}; not tried again", flush=True)
        return f"timeout ({timeout:.0f} s)"
    except Exception:  # noqa: BLE001  (the rows say n/a with the exception type, each on its own)
        return None
    return None


def _unit_to_file(out: str, task: Task, ratio: float, *args: Any, tp_broken: str | None = None,
                  finished: Sequence[str] = ()) -> None:
    """A worker: one model at one ratio, its rows saved to ``out`` as they grow."""
    def save(rows: list[str]) -> None:
        torch.save(list(rows), out + ".tmp")
        os.replace(out + ".tmp", out)

    sweep(task, [ratio], *args, save, tp_broken=tp_broken, finished=finished)


def code_digest() -> str:
    """A digest of the code a sweep's rows depend on: graphprune (with its passes and codegen)
    and the benchmark scripts beside this one; a unit saved under another digest is stale."""
    root = HERE.parent
    files = sorted([*root.glob("graphprune/**/*.py"), *root.glob("passes/**/*.py"), *root.glob("codegen/**/*.py"),
                    *HERE.glob("*.py")])
    h = hashlib.sha1()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def unit_path(folder: Path, label: str, *key: object, suffix: str) -> Path:
    """Where one finished unit of a resumable benchmark is kept: ``label`` names it for people,
    a hash of ``key`` (everything that changes its result, the code's digest included) makes a
    changed option or changed code miss it instead of reusing a stale one."""
    return folder / f"{label}-{hashlib.sha1(repr(key).encode()).hexdigest()[:16]}{suffix}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--recover-steps", default="200", help="distillation steps: '200', or '200,textlm=50'")
    ap.add_argument("--hesso-steps", default="", help="HESSO's steps where not the pretraining's: 'textlm=150'")
    ap.add_argument("--tp-timeout", type=float, default=300,
                    help="seconds for one Torch-Pruning MACs search (its graph build can hang on GQA)")
    ap.add_argument("--alloc", action="store_true",
                    help="also the allocation variants (floor, multiple, normalisation)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per model")
    ap.add_argument("--jobs", type=int, default=1,
                    help="(model, ratio) sweeps run at once, each in a forked process; in the order given")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--resume", action="store_true",
                    help="take the (model, ratio) sweeps an interrupted run of the same command on the same code "
                         "finished (every finished sweep is kept under benchmarks/cache/units/)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    names = a.models.split(",")
    if a.train_only:
        for name in names:
            task = TASKS[name]()
            print(f"{name}: dense {task.metric_name} {task.metric(task.dense):.3f}", flush=True)
        return
    recover, hesso_steps = per_model(a.recover_steps, names, 200), per_model(a.hesso_steps, names, None)
    ratios = [float(r) for r in a.ratios.split(",")]
    cmd = "python benchmarks/pretrained.py " + " ".join(sys.argv[1:])
    header = [f"# {cmd}",
              "# score = each model's task metric (higher is better), no fine-tuning unless stated; "
              "got = measured MACs removed (FlopCounterMode); (labels): 4 labelled batches",
              "# HESSO (full training): from the dense weights, toward the MACs target with all labels, on the "
              "pretraining's recipe; the ceiling"]
    table = [f"{'model':9s} {'MACs-':>5s} {'method':26s} {'got':>6s} {'no data':>20s} {'calibration':>20s} "
             f"{'calib+recovery':>20s}"]
    print("\n".join(header), flush=True)
    done: dict[str, tuple[str, list[str]]] = {}
    footer: list[str] = []  # the bars, once every sweep is in

    def write() -> None:  # partial tables survive an interrupted run
        if a.out:
            from graphprune.atomic import atomic_write_text

            got = [n for n in names if n in done]
            atomic_write_text(a.out, "\n".join(header + [done[n][0] for n in got] + table
                                               + [r for n in got for r in done[n][1]] + footer) + "\n")

    tasks: dict[str, Task] = {}
    parts: dict[tuple[str, float], list[str]] = {}  # rows of each model at each ratio

    def load(n: str) -> Task:
        if n not in tasks:
            t0 = time.perf_counter()
            tasks[n] = TASKS[n]()
            steps = hesso_steps[n] or tasks[n].train_steps
            done[n] = (model_line(tasks[n], recover[n], steps), [dense_row(tasks[n])])
            print(f"{done[n][0]}\n{done[n][1][0]}\n    ({time.perf_counter() - t0:.0f}s to load)", flush=True)
        return tasks[n]

    def update(n: str, ratio: float, rows: list[str]) -> None:
        parts[(n, ratio)] = list(rows)
        line, old = done[n]
        done[n] = (line, old[:1] + [r for q in sorted(ratios) for r in parts.get((n, q), [])])
        write()

    def options(n: str) -> tuple:
        return recover[n], a.alloc, a.tp_timeout, hesso_steps[n] or tasks[n].train_steps

    digest = code_digest()

    def kept(n: str, ratio: float) -> Path:
        return unit_path(CACHE / "units", f"{n}-{ratio}", n, ratio, options(n), a.threads, digest, suffix=".pt")

    def partial(n: str, ratio: float) -> Path:  # the rows of a sweep still running
        return kept(n, ratio).with_suffix(".partial.pt")

    def progress(n: str, ratio: float, rows: list[str]) -> None:  # one sweep's rows, run here
        update(n, ratio, rows)
        with atomic_path(partial(n, ratio)) as tmp:
            torch.save(list(rows), tmp)

    def finished(n: str, ratio: float) -> None:  # whole or not at all: an interrupted save is no unit
        with atomic_path(kept(n, ratio)) as tmp:
            torch.save(parts[(n, ratio)], tmp)
        partial(n, ratio).unlink(missing_ok=True)

    (CACHE / "units").mkdir(parents=True, exist_ok=True)
    units, resumed, earlier = [], [], {}
    for n in names:
        load(n)
        for ratio in ratios:
            path = kept(n, ratio)
            if a.resume and path.exists():
                update(n, ratio, torch.load(path))
                resumed.append(f"{n} {ratio:.0%}")
                continue
            units.append((n, ratio))
            if a.resume and partial(n, ratio).exists():
                earlier[(n, ratio)] = torch.load(partial(n, ratio))
                resumed.append(f"{n} {ratio:.0%} ({len(earlier[(n, ratio)])} rows)")
    if resumed:
        header.append(f"# resumed: {', '.join(resumed)} from an earlier run of this command on the same code "
                      f"(digest {digest})")
        write()
        print(header[-1], flush=True)

    broken: dict[str, str | None] = {}  # per model: why Torch-Pruning is not tried, after one probe
    if a.jobs <= 1:
        for n, ratio in units:
            task = load(n)
            if n not in broken:
                broken[n] = probe_tp(task, ratio, a.tp_timeout)
            sweep(task, [ratio], *options(n), lambda rows, n=n, ratio=ratio: progress(n, ratio, rows),
                  tp_broken=broken[n], finished=earlier.get((n, ratio), ()))
            finished(n, ratio)
    else:  # forked workers, one per model and ratio, which inherit the loaded task (not a Pool:
        import multiprocessing  # a worker forks again for Torch-Pruning's time limit)

        waiting = list(units)
        running: dict[tuple[str, float], tuple[Any, str]] = {}
        while waiting or running:
            while waiting and len(running) < a.jobs:
                n, ratio = unit = waiting.pop(0)
                task = load(n)
                if n not in broken:
                    broken[n] = probe_tp(task, ratio, a.tp_timeout)
                out = str(partial(n, ratio))  # the worker keeps its rows where --resume finds them
                proc = multiprocessing.get_context("fork").Process(
                    target=_unit_to_file, args=(out, task, ratio, *options(n)),
                    kwargs=dict(tp_broken=broken[n], finished=earlier.get(unit, ())))
                proc.start()
                running[unit] = (proc, out)
            time.sleep(5)
            for (n, ratio), (proc, out) in list(running.items()):
                alive = proc.is_alive()  # before reading: a finished worker's file is final
                rows = torch.load(out) if os.path.exists(out) else None
                if rows is not None and rows != parts.get((n, ratio)):
                    update(n, ratio, rows)
                if alive:
                    continue
                del running[(n, ratio)]
                if proc.exitcode:  # its rows stay in the partial file for --resume
                    update(n, ratio, parts.get((n, ratio), []) + [
                        f"{n:9s} {ratio:>5.0%} the sweep failed (exit {proc.exitcode}; traceback in the log)"])
                else:
                    finished(n, ratio)
    footer += ["", "Bars (the issue's done-when, from the rows above):"] + [
        line for n in names if n in done for line in bar_lines(n, done[n][1])]
    write()
    print("\n".join(header + [done[n][0] for n in names if n in done] + table
                    + [r for n in names if n in done for r in done[n][1]] + footer), flush=True)

if __name__ == "__main__":
    main()
