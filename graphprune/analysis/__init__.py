"""Dependency analysis: channel labels flow through the op registry into zero-invariant groups."""
