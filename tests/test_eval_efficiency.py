"""Cost columns: FLOPs counted per component and extrapolated to the step count; params with shared tensors once."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from eval.efficiency import measure_cost, pipeline_params, weight_bytes
from eval.generate import GenerationSettings

L = 10  # tokens


class FakeVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 1000)  # the image encoder never runs in text-to-image: not counted
        self.post_quant_conv = nn.Linear(32, 8)
        self.decoder = nn.Linear(8, 3)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class FakeDenoiser(nn.Module):
    def __init__(self, shared: nn.Module):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.shared = shared  # the same Linear as the text encoder's: counted once in the total

    def forward(self, x):
        return self.proj(x)


class FakePipeline:
    """Calls its parts the way PixArt-Σ does: prompt + negative prompt encoded, CFG batch of 2 per step, one decode."""

    def __init__(self):
        self.text_encoder = nn.Linear(16, 32)
        self.transformer = FakeDenoiser(self.text_encoder)
        self.vae = FakeVAE()

    def __call__(self, prompt, num_inference_steps, guidance_scale, **kwargs):
        tokens = torch.randn(len(prompt), L, 16)
        cond = self.text_encoder(tokens)
        if guidance_scale > 1:
            cond = torch.cat([self.text_encoder(tokens), cond])
        x = cond
        for _ in range(num_inference_steps):
            x = self.transformer(x)
        return SimpleNamespace(images=[self.vae.decode(x[-1:])])

    def to(self, device):
        return self


def test_flops_are_counted_per_component_and_extrapolated_to_all_steps():
    settings = GenerationSettings(num_inference_steps=20, guidance_scale=4.5)
    r = measure_cost(FakePipeline(), settings, probe_steps=2)
    encoder = 2 * (2 * L * 16 * 32)  # two encoder calls (prompt, negative prompt)
    denoiser = 20 * (2 * 2 * L * 32 * 32)  # 20 steps x batch 2 (CFG)
    decoder = 2 * L * 32 * 8 + 2 * L * 8 * 3
    assert r.tflops * 1e12 == pytest.approx(encoder + denoiser + decoder)
    assert r.flops_breakdown["encoder_calls"] == 2 and r.flops_breakdown["denoiser_calls_per_step"] == 1


def test_without_guidance_the_negative_prompt_and_cfg_batch_disappear():
    r = measure_cost(FakePipeline(), GenerationSettings(num_inference_steps=4, guidance_scale=1.0), probe_steps=2)
    assert r.tflops * 1e12 == pytest.approx(2 * L * 16 * 32 + 4 * 2 * L * 32 * 32 + 2 * L * 32 * 8 + 2 * L * 8 * 3)


class TwoCallPipeline(FakePipeline):
    """Runs guidance as two denoiser calls per step (conditional, then unconditional), as some pipelines do."""

    def __call__(self, prompt, num_inference_steps, guidance_scale, **kwargs):
        x = self.text_encoder(torch.randn(len(prompt), L, 16))
        for _ in range(num_inference_steps):
            x = self.transformer(x) + self.transformer(x)
        return SimpleNamespace(images=[self.vae.decode(x[-1:])])


def test_every_denoiser_call_of_a_step_is_counted_and_extrapolated():
    r = measure_cost(TwoCallPipeline(), GenerationSettings(num_inference_steps=10, guidance_scale=4.5), probe_steps=2)
    assert r.flops_breakdown["denoiser_calls_per_step"] == 2
    assert r.tflops * 1e12 == pytest.approx(2 * L * 16 * 32 + 10 * 2 * (2 * L * 32 * 32) + 2 * L * 32 * 8
                                            + 2 * L * 8 * 3)


def test_params_count_text_encoder_denoiser_and_vae_decoder_with_shared_tensors_once():
    pipe = FakePipeline()
    p = pipeline_params(pipe)
    enc, den, dec = 16 * 32 + 32, 32 * 32 + 32, (32 * 8 + 8) + (8 * 3 + 3)
    assert p["text_encoder"] == enc and p["denoiser"] == den + enc and p["vae_decoder"] == dec
    assert p["total"] == enc + den + dec  # the shared Linear once; the VAE's image encoder not at all
    assert weight_bytes(pipe, bytes_per_element=2) == 2 * (enc + den + dec)
    r = measure_cost(pipe, GenerationSettings(num_inference_steps=2))
    assert r.memory_kind.startswith("bf16_weight_bytes") and r.memory_gib == pytest.approx(2 * p["total"] / 1024**3)
    assert r.peak_gib is None and r.flops_device == "cpu"


def _tiny_settings(steps):
    return GenerationSettings(height=16, width=16, num_inference_steps=steps, guidance_scale=4.5,
                              call_kwargs={"use_resolution_binning": False, "max_sequence_length": 16})


def test_tiny_pixart_cpu_count_matches_the_math_kernel_count_of_the_whole_run():
    # Independent count: the whole pipeline call (all steps, no per-component wrapping, no extrapolation)
    # under the math SDPA backend, whose matmuls torch counts on every device; elementwise ops count 0.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from skrr.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("t5", seed=0)
    settings = _tiny_settings(3)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe(prompt=["a photo of a cat"], height=16, width=16, num_inference_steps=3, guidance_scale=4.5,
             generator=[torch.Generator("cpu").manual_seed(0)], output_type="pil", **dict(settings.call_kwargs))
    r = measure_cost(pipe, settings, probe_steps=2)  # counts 2 steps, extrapolates to 3
    assert r.tflops * 1e12 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert r.flops_device == "cpu" and "sdpa_flop_count" in r.flops_method
    assert "forward" not in vars(pipe.transformer) and "decode" not in vars(pipe.vae)  # wrappers removed
    assert r.params["total"] == r.params["text_encoder"] + r.params["denoiser"] + r.params["vae_decoder"]


def test_fused_cpu_attention_is_counted_as_torch_counts_the_cuda_kernels():
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from eval.efficiency import flop_counter

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    with flop_counter() as ours:
        F.scaled_dot_product_attention(q, k, v)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v)
    assert ours.get_total_flops() == 2 * (2 * 2 * 4 * 10 * 12 * 8)  # QK^T and AV, 2 FLOPs per multiply-add
    assert plain.get_total_flops() == 0  # the reason for the custom mapping; if torch fixes it, drop ours


def test_mem_is_the_papers_bf16_weights_for_pixart_sigma():
    # Meta-device PixArt-Σ (T5-XXL + DiT + SD VAE): 5.42 B params x 2 bytes + buffers = 10.11 GiB; paper: 10.18.
    from skrr.architectures import pixart_sigma_transformer, sd_vae, t5_xxl_encoder

    pipe = SimpleNamespace(text_encoder=t5_xxl_encoder(), transformer=pixart_sigma_transformer(), vae=sd_vae())
    assert pipeline_params(pipe)["total"] == 5_422_656_951
    gib = weight_bytes(pipe, bytes_per_element=2) / 1024**3
    assert gib == pytest.approx(10.11, abs=0.005) and abs(gib - 10.18) < 0.1


@pytest.mark.gpu
def test_cuda_peak_is_measured_in_its_own_field_and_mem_stays_bf16_weights():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from skrr.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("t5", seed=0)
    r = measure_cost(pipe, _tiny_settings(2), device="cuda")
    assert r.peak_kind.startswith("cuda_peak") and r.peak_gib >= weight_bytes(pipe) / 1024**3
    assert r.memory_gib == pytest.approx(weight_bytes(pipe, bytes_per_element=2) / 1024**3)
    assert r.flops_device.startswith("cuda")


@pytest.mark.gpu
def test_cuda_and_cpu_counts_agree_for_the_tiny_pipeline():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from skrr.pipelines import build_tiny_pipeline

    cpu = measure_cost(build_tiny_pipeline("t5", seed=0), _tiny_settings(2), device="cpu")
    cuda = measure_cost(build_tiny_pipeline("t5", seed=0), _tiny_settings(2), device="cuda")
    assert cuda.tflops == pytest.approx(cpu.tflops, rel=1e-9) and cuda.flops_device.startswith("cuda")
