"""Carrying a tuned schedule over to a function of other extents: tile sizes refactored,
structure matched, the result a valid schedule of the new function."""
import math
import random

import pytest
import torch
from tvm.s_tir import meta_schedule as ms

import graphprune.codegen as codegen
from graphprune.codegen.pipeline import fuse
from graphprune.codegen.targets import resolve_target
from graphprune.codegen.transfer import Donors, carried_over, rescaled, signature
from graphprune.codegen.tuning import _space_generator, extract_tasks, open_database

from .models import mlp, rel_err

X = torch.randn(1, 16)


@pytest.mark.parametrize("seed", range(20))
def test_rescaled_tiles_multiply_to_the_new_extent(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    old = [rng.choice([1, 2, 3, 4, 7, 8, 16, 32]) for _ in range(n)]
    extent = rng.randint(1, 600)
    new = rescaled(old, extent)
    assert len(new) == n and math.prod(new) == extent and all(f >= 1 for f in new)
    if extent % old[-1] == 0:
        assert new[-1] == old[-1]  # the innermost (vector) tile kept where it divides


def test_rescaled_keeps_a_decision_that_already_fits():
    assert rescaled([4, 2, 8], 64) == [4, 2, 8]
    assert rescaled([1, 4, 16], 48) == [1, 3, 16]
    assert rescaled([1, 4, 2, 32], 176)[-1] == 16  # a multiple of the vector width, not the nearer 44


def test_rescaled_never_grows_an_inner_tile_on_a_tie():
    """A tuned 32-lane tile on 48 channels: 16 and 48 share 16 with it; 48 lanes is a
    larger register block than was tuned (ResNet-18's pruned stem ran 17x slower)."""
    assert rescaled([1, 2, 1, 32], 48) == [3, 1, 1, 16]
    assert rescaled([1, 1, 64], 48)[-1] == 48  # a smaller tile than the tuned one is kept nearest


def _tasks(model):
    target = resolve_target("x86").target
    return target, extract_tasks(fuse(codegen.import_model(model, (X,)).bound(), target), target)


def test_signature_ignores_extents_only():
    """Every function of the pruned MLP has a dense function of the same structure; the
    ones pruning changed differ from it in extents alone."""
    _, dense = _tasks(mlp(32))
    _, pruned = _tasks(mlp(20))
    dense_sigs = [signature(t.dispatched[0]) for t in dense]
    changed = 0
    for task in pruned:
        structure, extents = signature(task.dispatched[0])
        same = [e for s, e in dense_sigs if s == structure]
        assert same, task.task_name
        changed += extents not in same
    assert changed >= 2


@pytest.fixture(scope="module")
def dense_db(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("transfer") / "db"
    codegen.tune(mlp(32), (X,), "x86", work_dir, trials_per_task=2)
    return work_dir


def test_donors_are_functions_of_the_same_structure_and_others_do_not_apply(dense_db):
    """Each pruned function's donors share its structure (never itself); their records replay
    on it, and a record of another structure does not (None, not a broken schedule)."""
    target, pruned = _tasks(mlp(20))
    database = open_database(dense_db)
    donors = Donors(database)
    postprocs = ms.TuneContext(mod=pruned[0].dispatched[0], target=target,
                               space_generator=_space_generator(target)).space_generator.postprocs
    carried = refused = 0
    everything = database.get_all_tuning_records()
    for task in pruned:
        mod = task.dispatched[0]
        for record in donors.nearest(mod):
            assert signature(record.workload.mod)[0] == signature(mod)[0]
            carried += carried_over(mod, record.trace, postprocs) is not None
        for record in everything:
            if signature(record.workload.mod)[0] != signature(mod)[0]:
                refused += carried_over(mod, record.trace, postprocs) is None
    assert carried >= 2 and refused >= 1


def test_a_build_gives_unrecorded_functions_the_nearest_tuned_schedule(dense_db, tmp_path):
    """Without tuning the pruned form, its build takes the dense form's schedules for the
    functions pruning changed (the rest have records), and computes the same."""
    pruned = mlp(20)
    compiled = codegen.build(pruned, (X,), "x86", tuning_db=dense_db)
    assert compiled.carried_functions >= 2
    assert compiled.tuned_functions + compiled.carried_functions == compiled.total_functions
    assert f"not measured at these): {compiled.carried_functions}" in compiled.summary()
    assert rel_err(compiled.run(X), pruned(X)) < 1e-4
    assert codegen.build(pruned, (X,), "x86", tuning_db=tmp_path / "empty").carried_functions == 0  # no donor


def test_a_carried_padding_is_the_new_functions_own(tmp_path):
    """A matmul over 37 tokens is tuned padded (to 40 rows, :mod:`.padding`); its record
    carried to a narrower layer pads to that layer's widths, not the tuned one's (which
    would copy the weights to the old size on every call)."""
    from torch import nn

    tokens = torch.randn(37, 32)
    torch.manual_seed(0)
    wide, narrow = nn.Linear(32, 64).eval(), nn.Linear(32, 48).eval()
    codegen.tune(wide, (tokens,), "x86", tmp_path / "db", trials_per_task=2)
    target = resolve_target("x86").target
    (task,) = [t for t in extract_tasks(fuse(codegen.import_model(narrow, (tokens,)).bound(), target), target)
               if signature(t.dispatched[0])[1][:3] == (37, 48, 32)]
    postprocs = ms.TuneContext(mod=task.dispatched[0], target=target,
                               space_generator=_space_generator(target)).space_generator.postprocs
    records = Donors(open_database(tmp_path / "db")).nearest(task.dispatched[0])
    assert any("padding=[40, 64, 32]" in str(r.trace) for r in records)  # the tuned function's own
    carried = [carried_over(task.dispatched[0], r.trace, postprocs) for r in records]
    texts = [str(s.trace) for s in carried if s is not None]
    assert texts and all("padding=[40, 48, 32]" in t for t in texts if "pad_einsum" in t)
    assert any("pad_einsum" in t for t in texts)
