"""GPU checks (`make test-gpu`): a pruned encoder moves to CUDA whole, in bf16, and matches the fast path."""
import pytest
import torch

from skrr import StackRunner, apply_plan, identity_plan
from skrr.tiny import tiny_t5

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_pruned_t5_without_unit_0_runs_on_cuda_in_bf16():
    dense = tiny_t5(num_layers=4).to(torch.bfloat16)
    plan = identity_plan(dense).with_slots({0: None, 1: None})
    pruned = apply_plan(dense, plan).to("cuda")  # the relative bias must travel although unit 0 is gone
    assert all(p.device.type == "cuda" for p in pruned.parameters())
    ids = torch.randint(3, 100, (2, 16), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = pruned(ids, attention_mask=mask).last_hidden_state
        fast = StackRunner(dense.to("cuda")).forward(plan, ids, mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, fast)
