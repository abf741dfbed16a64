"""skrr: Skip and Re-use text encoder layers (ICML 2025) — the pruning library.

What you import to prune an encoder: ``PruningPlan`` (the one contract every method produces), ``apply_plan``
(exact surgery into a smaller encoder of the same class), ``CalibrationSet`` (the discrepancy D of SPEC §2),
``Skrr`` (Alg. 1 + 2) and the method registry. It may import torch, transformers, diffusers and numpy; never
``eval``, ``baselines`` or ``skrr.experiments`` (the experiment layer built on top of it), nor Hydra or W&B.
"""
from skrr.calib import CalibrationSet
from skrr.export import ExportError, export_pruned, load_pruned, load_pruned_from_dense
from skrr.interface import METHODS, MethodError, PruningMethod, build_method, register_method
from skrr.method import Skrr, reuse_phase
from skrr.plan import EncoderSignature, PlanError, PruningPlan, Slot
from skrr.surgery import (StackRunner, Unit, apply_plan, count_params, identity_plan, realized_sparsity,
                          signature, units)

__all__ = ["METHODS", "CalibrationSet", "EncoderSignature", "ExportError", "MethodError", "PlanError", "PruningMethod",
           "PruningPlan", "Skrr", "Slot", "StackRunner", "Unit", "apply_plan", "build_method", "count_params",
           "export_pruned", "identity_plan", "load_pruned", "load_pruned_from_dense", "realized_sparsity",
           "register_method", "reuse_phase", "signature", "units"]
