"""PruningPlan: structure checks, views, summary, JSON round-trip, refusal of another encoder's plan."""
import json

import pytest

from skrr import PlanError, PruningPlan, Slot, identity_plan, signature
from skrr.plan import block_plan_to_units
from skrr.tiny import tiny_t5


def test_json_round_trip_keeps_slots_and_meta(t5, tmp_path):
    plan = identity_plan(t5).with_slots({3: None, 5: None, 7: Slot(5 - 4, "ffn")}, order=[5, 3, 7], score=0.25)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    back = PruningPlan.from_json(path)
    assert back == plan
    assert back.meta == {"order": [5, 3, 7], "score": 0.25}
    assert PruningPlan.from_json(plan.to_json()) == plan  # from text too
    assert back.reused == {7: 1} and back.skipped == (3, 5, 7) and back.dropped == (3, 5, 7)


def test_views_and_summary(t5):
    plan = identity_plan(t5).with_slots({5: None, 6: None, 2: None, 4: Slot(0, "attn")})
    assert plan.skipped == (2, 4, 5, 6)
    assert plan.reused == {4: 0}
    assert plan.dropped == (2, 4, 5, 6)
    assert plan.summary() == "dense: 8 units; skip 2,4,5,6; reuse 4->0"


def test_identity_and_block_views(t5):
    sig = signature(t5)
    assert identity_plan(t5).is_identity
    blocks = PruningPlan.from_skips(sig, [1], "block")
    as_units = block_plan_to_units(blocks)
    assert as_units.skipped == (2, 3) and as_units.granularity == "unit"


def test_merge_plan_summary(t5):
    sig = signature(t5)
    plan = PruningPlan(sig, "block", (Slot(0, "block"), Slot(1, "block", (1, 2)), None, Slot(3, "block")), "laco")
    assert plan.merged == {1: (1, 2)}
    assert plan.dropped == (2,)
    assert plan.summary() == "laco: 4 blocks; skip none; merge 1+2"


@pytest.mark.parametrize("slots, message", [
    ({0: Slot(1, "ffn")}, "attn position"),            # re-use across types
    ({2: None, 4: Slot(2, "attn")}, "not kept"),      # re-use of a skipped unit
    ({0: Slot(99, "attn")}, "does not exist"),
])
def test_malformed_plans_are_refused(t5, slots, message):
    with pytest.raises(PlanError, match=message):
        identity_plan(t5).with_slots(slots)


def test_plan_for_another_encoder_is_refused(t5):
    other = tiny_t5(num_layers=6)
    with pytest.raises(PlanError, match="made for"):
        identity_plan(other).validate(signature(t5))
    wider = tiny_t5(num_layers=4, d_model=48, d_ff=64, num_heads=4)
    with pytest.raises(PlanError, match="made for"):
        identity_plan(wider).validate(signature(t5))
    renamed = tiny_t5(num_layers=4, name="someone/else")
    with pytest.raises(PlanError, match="someone/else"):
        identity_plan(renamed).validate(signature(t5))
    identity_plan(tiny_t5(num_layers=4, seed=5)).validate(signature(t5))  # same architecture and id: accepted


def test_corrupt_plan_file_gives_one_line_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": "skrr-plan/1", "slots": [')
    with pytest.raises(PlanError, match="corrupt") as err:
        PruningPlan.from_json(path)
    assert "\n" not in str(err.value)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(PlanError, match="not a skrr plan"):
        PruningPlan.from_json(path)
    with pytest.raises(PlanError, match="cannot read"):
        PruningPlan.from_json(tmp_path / "missing.json")
