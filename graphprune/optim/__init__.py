"""Optimizers (OTO family) and one-shot scorers (SPA) built on a traced graph's groups."""
