"""skrr: Skip and Re-use text encoder layers (ICML 2025), with the baselines on one pruning interface."""
from skrr.calib import CalibrationSet
from skrr.export import ExportError, export_pruned, load_pruned, load_pruned_from_dense
from skrr.interface import PruningMethod
from skrr.method import Skrr, reuse_phase
from skrr.plan import EncoderSignature, PlanError, PruningPlan, Slot
from skrr.surgery import (StackRunner, Unit, apply_plan, count_params, identity_plan, realized_sparsity,
                          signature, units)

__all__ = ["CalibrationSet", "EncoderSignature", "ExportError", "PlanError", "PruningMethod", "PruningPlan", "Skrr",
           "Slot", "StackRunner", "Unit", "apply_plan", "count_params", "export_pruned", "identity_plan",
           "load_pruned", "load_pruned_from_dense", "realized_sparsity", "reuse_phase", "signature", "units"]
