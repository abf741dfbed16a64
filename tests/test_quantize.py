"""Weight-only quantization on top of Skrr (issue 13, part 4): real bytes, fidelity, export/load carry it."""
import pytest
import torch

from skrr import Slot, apply_plan, export_pruned, identity_plan, load_pruned
from skrr.quantize import QuantizeError, quantize_encoder, weight_bytes
from skrr.tiny import tiny_t5

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def minilm():
    from skrr.pipelines import tiny_text_encoder

    encoder, tokenizer = tiny_text_encoder("minilm")
    batch = tokenizer(["a red bicycle leaning on a wall", "two dogs playing in the snow"], padding=True,
                      return_tensors="pt")
    return encoder, batch


def features(enc, batch):
    with torch.no_grad():
        return enc(**batch).last_hidden_state


def linear_weight(enc):
    return enc.encoder.layer[0].attention.self.query.weight


@pytest.mark.parametrize("mode,ratio", [("int8", 0.35), ("fp8", 0.35)])
def test_quantized_minilm_is_smaller_and_close(minilm, mode, ratio):
    import copy

    dense, batch = minilm
    ref = features(dense, batch)
    q = quantize_encoder(copy.deepcopy(dense), mode)
    assert type(linear_weight(q)).__name__ != "Parameter"  # a torchao tensor, not a float weight
    assert weight_bytes(q) < weight_bytes(dense) * (1 - ratio)  # linears are ~80 % of MiniLM's fp32 bytes
    out = features(q, batch)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99 and not torch.equal(out, ref)


def test_skrr_plus_int8_is_smaller_than_either(minilm):
    import copy

    dense, batch = minilm
    plan = identity_plan(dense).with_slots({1: None, 3: None, 4: None})
    pruned = apply_plan(copy.deepcopy(dense), plan)
    both = quantize_encoder(apply_plan(copy.deepcopy(dense), plan), "int8")
    dense_int8 = quantize_encoder(copy.deepcopy(dense), "int8")
    assert weight_bytes(both) < min(weight_bytes(pruned), weight_bytes(dense_int8))


def test_a_reused_unit_is_quantized_once_and_stays_shared(tmp_path):
    import copy

    dense = tiny_t5(num_layers=4)
    plan = identity_plan(dense).with_slots({3: None, 5: Slot(1, "ffn")})
    q = quantize_encoder(apply_plan(copy.deepcopy(dense), plan), "int8")  # apply_plan shares dense's modules
    blocks = q.encoder.block
    assert blocks[2].units[1].layer is blocks[0].units[1].layer  # position 5 runs unit 1's very module
    out = export_pruned(dense, plan, tmp_path / "enc", quantize="int8")
    loaded = load_pruned(out)
    assert loaded.skrr_quantize == "int8" and type(loaded.encoder.block[0].units[1].layer.DenseReluDense.wo.weight
                                                    ).__name__ == "Int8Tensor"
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, q(input_ids=ids).last_hidden_state)
    assert weight_bytes(loaded) == weight_bytes(q)
    plain = load_pruned(out, quantize="none")
    assert type(plain.encoder.block[0].units[1].layer.DenseReluDense.wo.weight).__name__ == "Parameter"


def test_bad_modes_are_one_line():
    dense = tiny_t5(num_layers=2)
    with pytest.raises(QuantizeError, match="CUDA only"):
        quantize_encoder(dense, "nf4")
    with pytest.raises(QuantizeError, match="choose one of"):
        quantize_encoder(dense, "int4")
    with pytest.raises(Exception, match="already quantized"):
        export_pruned(quantize_encoder(tiny_t5(num_layers=2), "int8"), None, "/nonexistent/x")


@pytest.mark.slow
def test_demo_shipping_report_on_real_minilm(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import demo

    from skrr.pipelines import tiny_text_encoder

    enc, _ = tiny_text_encoder("minilm")
    cell = tmp_path / "cell"
    cell.mkdir()
    identity_plan(enc).with_slots({1: None, 4: None}).to_json(cell / "plan.json")
    lines = demo.shipping_report(cell, tmp_path / "exports" / "minilm")
    rows = {line.split()[0] if "+" not in line else "Skrr + int8": line.split()[-3:] for line in lines[2:]}
    mb = {k: float(v[0]) for k, v in rows.items()}
    fid = {k: float(v[2]) for k, v in rows.items()}
    assert mb["dense"] > mb["Skrr"] > mb["Skrr + int8"] and mb["dense"] > mb["int8"] > mb["Skrr + int8"]
    assert fid["dense"] == 1.0 and 0.99 < fid["int8"] < 1.0 and fid["Skrr"] < 1.0
    assert (tmp_path / "exports" / "minilm" / "skrr_pruned.safetensors").exists()
