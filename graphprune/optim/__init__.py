"""Optimizers (OTO family) and one-shot scorers (SPA) built on a traced graph's groups."""
from graphprune.optim.base import GroupOptimizer, output_depends_on_input
from graphprune.optim.cric import HESSO_CRIC, HESSOCRIC
from graphprune.optim.dhspg import DHSPG
from graphprune.optim.h2spg import H2SPG
from graphprune.optim.hesso import HESSO

__all__ = ["DHSPG", "GroupOptimizer", "H2SPG", "HESSO", "HESSOCRIC", "HESSO_CRIC", "output_depends_on_input"]
