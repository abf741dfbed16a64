"""Evaluation: prompts x seeds -> images on disk -> FID, CLIP score, DreamSim, GenEval and the cost table (SPEC §5).

Import submodules explicitly (``from eval import fid``); never ``import eval`` on its own, which reads like
the builtin. This file stays light: no torch, no model code. ``eval`` may import the pruning library
(``skrr``: atomic writes, parameter counts) but never ``baselines`` or ``skrr.experiments``.
"""
from __future__ import annotations


class EvalError(RuntimeError):
    """An evaluation problem the user can fix; the message names the problem and the fix in one line."""


class MissingAssetError(EvalError, FileNotFoundError):
    """A file the user must provide (COCO captions, GenEval metadata, metric weights) is not where it was looked for."""


__all__ = ["EvalError", "MissingAssetError"]
