"""The experiment layer: run.py's stages, the results store, the plan cache, W&B tracking and the tables.

It is the one place that imports ``eval`` and ``baselines``; the pruning library (``skrr`` without this
subpackage) never imports it.
"""
