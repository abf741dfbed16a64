"""skrr: Skip and Re-use text encoder layers (ICML 2025), with the baselines on one pruning interface."""
from skrr.plan import EncoderSignature, PlanError, PruningPlan, Slot
from skrr.surgery import (StackRunner, Unit, apply_plan, count_params, identity_plan, realized_sparsity,
                          signature, units)

__all__ = ["EncoderSignature", "PlanError", "PruningPlan", "Slot", "StackRunner", "Unit", "apply_plan",
           "count_params", "identity_plan", "realized_sparsity", "signature", "units"]
