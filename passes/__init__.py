"""Rewrite passes: pure IR -> IR functions (installed as ``graphprune.passes``)."""
