"""Pipelines: the tiny offline pipelines generate with a pruned encoder; real loaders read local folders and
fail in one line when weights are missing offline."""
import numpy as np
import pytest
import torch

from skrr import apply_plan, identity_plan
from skrr.pipelines import (ModelUnavailableError, PipelineSpec, build_tiny_pipeline, caption_projection_of,
                            load_caption_projection, load_text_encoder)
from skrr.tiny import tiny_pixart_transformer, tiny_t5, tiny_t5_tokenizer

CALL = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=16, use_resolution_binning=False,
            output_type="np")


def generate(pipe, seed=0):
    return pipe(["a red bicycle", "two cats"], generator=torch.Generator().manual_seed(seed), **CALL).images


@pytest.mark.parametrize("encoder", ["t5", "minilm"])
def test_pruned_encoder_plugs_into_the_tiny_pipeline(encoder):
    pipe = build_tiny_pipeline(encoder)
    dense = generate(pipe)
    assert dense.shape == (2, 64, 64, 3) and np.isfinite(dense).all()
    te = pipe.text_encoder
    pipe.text_encoder = apply_plan(te, identity_plan(te))
    assert np.array_equal(generate(pipe), dense)  # identity plan: the very same images
    pipe.text_encoder = apply_plan(te, identity_plan(te).with_slots({0: None, 1: None}))
    pruned = generate(pipe)
    assert pruned.shape == dense.shape and not np.array_equal(pruned, dense)


def test_minilm_is_the_real_pretrained_model():
    encoder, tokenizer = load_text_encoder(PipelineSpec(name="m", kind="tiny", text_encoder="minilm"))
    ids = tokenizer(["a dog runs in the park", "a puppy plays on the grass", "stock market report"],
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        h = encoder(**ids).last_hidden_state
    m = ids.attention_mask.unsqueeze(-1)
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # pretrained semantics, which random weights would not show


@pytest.fixture
def local_pixart(tmp_path):
    """A local folder laid out like a hub PixArt-Σ repo (text_encoder/, tokenizer/, transformer/)."""
    t5 = tiny_t5(num_layers=2, name="")
    t5.save_pretrained(tmp_path / "text_encoder")
    tiny_t5_tokenizer().save_pretrained(tmp_path / "tokenizer")
    dit = tiny_pixart_transformer(caption_channels=32)
    dit.save_pretrained(tmp_path / "transformer")
    return tmp_path, t5, dit


def test_loaders_read_a_local_folder(local_pixart):
    path, t5, dit = local_pixart
    spec = PipelineSpec(name="p", kind="pixart_sigma", model_id=str(path), dtype="float32")
    encoder, tokenizer = load_text_encoder(spec)
    assert torch.equal(encoder.encoder.block[1].layer[1].DenseReluDense.wo.weight,
                       t5.encoder.block[1].layer[1].DenseReluDense.wo.weight)
    assert tokenizer("a cat").input_ids[-1] == 1  # T5 eos
    proj = load_caption_projection(spec)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), caption_projection_of(type("P", (), {"transformer": dit})())(x))


def test_missing_weights_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    spec = PipelineSpec(name="p", kind="pixart_sigma", model_id="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    with pytest.raises(ModelUnavailableError, match="PixArt-Sigma-XL-2-1024-MS") as err:
        load_text_encoder(spec)
    assert "\n" not in str(err.value) and "local" in str(err.value)
    with pytest.raises(ModelUnavailableError):
        load_caption_projection(spec)


def test_unknown_kind_and_dtype_are_refused():
    with pytest.raises(ValueError, match="unknown pipeline kind"):
        PipelineSpec.from_config({"name": "x", "kind": "sdxl"})
    with pytest.raises(ValueError, match="unknown dtype"):
        PipelineSpec.from_config({"name": "x", "kind": "tiny", "dtype": "int3"})
