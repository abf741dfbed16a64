"""Baseline pruning methods on the shared interface (SPEC §4): each returns a skrr.PruningPlan."""
