"""The experiment layer: run.py's stages, the results store, the plan cache, W&B tracking and the tables.

It may import the library (``skrr``), ``baselines``, ``eval``, Hydra/OmegaConf and W&B, and is the one place
that imports ``eval`` and ``baselines``; nothing below it (the library, ``baselines``, ``eval``) imports it.
"""
