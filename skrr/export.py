"""Ship a pruned encoder: export it to a self-contained folder, and load it (or a dense checkpoint) lean.

The folder (``export_pruned``) holds only the kept tensors, under the names they have in the dense checkpoint:

    skrr_pruned.safetensors   kept weights; a re-used unit is stored once (its own name), the plan re-ties it
    skrr_pruned.json          manifest: encoder class, constructor arguments, sizes, how to load
    plan.json                 the PruningPlan (which unit runs where: skips and the re-use map)
    config.json               the dense encoder's config (the skeleton the plan is applied to)
    tokenizer files, README.md (model card)

Loading (``load_pruned``, and ``load_pruned_from_dense`` for the run path) never builds the dense encoder:
the skeleton is built on the meta device, the plan is applied to it (so re-used units are the same module
again), and only the tensors the pruned skeleton still references are read, cast one at a time and put
straight on the device. Because the tensors keep their dense names, the same reader serves the export folder
and the dense checkpoint itself (hub cache or local folder, sharded or not).

The weights file is deliberately not called ``model.safetensors``: transformers' ``from_pretrained`` (and a
diffusers pipeline that finds this folder as its text-encoder component) would otherwise build all dense
blocks and fill the missing ones with random weights, with no error (transformers 5.23 only logs missing
keys). Without that file name they stop with "no file named model.safetensors ... found"; the model card
says to pass ``text_encoder=skrr.load_pruned(folder)`` instead.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skrr.plan import PlanError, PruningPlan
from skrr.surgery import apply_plan, count_params
from skrr.tensorfile import TensorFileError, TensorFiles

log = logging.getLogger(__name__)

FORMAT = "skrr-pruned/1"
WEIGHTS_NAME = "skrr_pruned.safetensors"
MANIFEST_NAME = "skrr_pruned.json"
PLAN_NAME = "plan.json"
# Encoder classes skrr prunes (skrr.families); a manifest naming anything else is refused, not imported.
ENCODER_CLASSES = ("T5EncoderModel", "CLIPTextModel", "CLIPTextModelWithProjection", "BertModel")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# diffusers pipeline folder: the subfolder each pipeline reads its T5 from (skrr.pipelines.KINDS).
COMPONENT_FOLDERS = {"pixart_sigma": "text_encoder", "sd3": "text_encoder_3", "flux": "text_encoder_2"}


class ExportError(ValueError):
    """An export or load that cannot be done as asked (bad folder, missing tensor, offline hub, ...)."""


# ----------------------------------------------------------------------------------------------- skeleton
def encoder_class(name: str) -> type:
    """The transformers class of a supported encoder, by name."""
    if name not in ENCODER_CLASSES:
        raise ExportError(f"encoder class {name!r} is not one skrr prunes ({', '.join(ENCODER_CLASSES)})")
    import transformers

    return getattr(transformers, name)


def init_kwargs_of(encoder: nn.Module) -> dict[str, Any]:
    """Constructor arguments that the config does not hold (BertModel's pooler)."""
    if type(encoder).__name__ == "BertModel":
        return {"add_pooling_layer": getattr(encoder, "pooler", None) is not None}
    return {}


def _check_plan(plan: PruningPlan) -> None:
    if plan.merged:
        raise PlanError("a LaCo plan merges blocks into new weights, which are not tensors of the dense "
                        "checkpoint; load the dense encoder and use skrr.apply_plan for it")
    if "magnitude" in plan.meta:
        raise PlanError("a magnitude plan zeroes weights inside dense tensors and saves no bytes; "
                        "save the zeroed dense encoder with save_pretrained instead")


def pruned_skeleton(cls_name: str, config: Any, plan: PruningPlan,
                    init_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, list[str]], int]:
    """The plan applied to a dense skeleton on the meta device.

    Returns (pruned skeleton, pruned state-dict name -> the dense checkpoint names of that tensor, dense
    parameter count). Tied tensors (T5's ``shared`` / ``encoder.embed_tokens``) have several dense names;
    a re-used unit has several pruned names mapping to one dense name.
    """
    from accelerate import init_empty_weights

    _check_plan(plan)
    cls = encoder_class(cls_name)
    # Parameters on meta, buffers real: non-persistent buffers (BERT/CLIP position_ids) are computed in
    # __init__ and are not in checkpoints.
    with init_empty_weights(include_buffers=False):
        dense = cls(config, **(init_kwargs or {}))
    dense.tie_weights()  # accelerate's hook re-wraps parameters on registration, which unties them
    dense.eval()
    dense_params = count_params(dense)
    names: dict[int, list[str]] = {}
    keep_alive = []
    for name, t in dense.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
        keep_alive.append(t)
    pruned = apply_plan(dense, plan, inplace=True)
    mapping = {}
    for name, t in pruned.state_dict(keep_vars=True).items():
        if id(t) not in names:
            raise ExportError(f"pruned tensor {name} is not a tensor of the dense checkpoint")
        mapping[name] = names[id(t)]
    return pruned, mapping, dense_params


def _fp32_patterns(model: nn.Module, dtype: torch.dtype | None) -> list[re.Pattern]:
    # transformers keeps some modules in fp32 when loading in half precision (T5: `wo` for fp16,
    # PreTrainedModel._get_dtype_plan); do the same so a lean load equals from_pretrained(dtype=...).
    if dtype is None or not hasattr(model, "_get_dtype_plan"):
        return []
    return [re.compile(rf"(^|\.){re.escape(p)}(\.|$)") for p in model._get_dtype_plan(dtype)]


def materialize(model: nn.Module, mapping: dict[str, list[str]], files: TensorFiles,
                torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                strict: bool = False, where: str = "the checkpoint") -> nn.Module:
    """Replace every meta tensor of ``model`` by the tensor of that dense name read from ``files``.

    Each tensor is read alone, cast (floating tensors, to ``torch_dtype``; None keeps the stored dtype) and
    put on ``device``. With ``strict`` the files must hold exactly these tensors (an export folder).
    """
    from tqdm.auto import tqdm

    current = model.state_dict(keep_vars=True)
    fp32 = _fp32_patterns(model, torch_dtype)
    new: dict[int, torch.Tensor] = {}
    used: set[str] = set()
    for name in tqdm(mapping, desc="load kept tensors", unit="tensor", disable=len(mapping) < 200):
        old = current[name]
        if id(old) in new:
            continue  # a re-used unit or a tied tensor: read once, referenced again below
        dense_names = mapping[name]
        key = next((n for n in dense_names if n in files), None)
        if key is None:
            raise ExportError(f"{where} has no tensor {dense_names[0]!r}; it does not hold the weights of this "
                              f"encoder (export again, or check the model id and revision)")
        entry = files.entries[key]
        if entry.shape != tuple(old.shape):
            raise ExportError(f"{where}: tensor {key!r} has shape {list(entry.shape)} but the encoder expects "
                              f"{list(old.shape)}; config and weights do not belong together")
        dtype = None
        if torch_dtype is not None and entry.dtype.is_floating_point:
            dtype = torch.float32 if any(p.search(key) for p in fp32) else torch_dtype
        t = files.read(key, dtype, device)
        new[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
        used.add(key)
    if strict and set(files.entries) != used:
        extra = sorted(set(files.entries) - used)[:3]
        raise ExportError(f"{where} holds tensors the plan does not use ({', '.join(extra)}, ...); the folder's "
                          f"{PLAN_NAME} and weights do not belong together: export it again")
    for module in model.modules():
        for k, v in module._parameters.items():
            if v is not None:
                module._parameters[k] = new.get(id(v), v)
        for k, v in module._buffers.items():
            if v is not None:
                module._buffers[k] = new[id(v)] if id(v) in new else v.to(device)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ExportError(f"parameters {left[:3]} were not loaded from {where}")
    if torch_dtype is not None:
        model.config.dtype = torch_dtype
    return model.eval()


def _dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype not in DTYPES:
        raise ExportError(f"unknown dtype {torch_dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[torch_dtype]


def _set_identity(config: Any, plan: PruningPlan) -> None:
    # The skeleton is the plan's encoder: same hub id and revision, so plan.validate accepts it.
    config._name_or_path = plan.encoder.model_id
    config._commit_hash = plan.encoder.revision


# ----------------------------------------------------------------------------------------------- export
def export_pruned(encoder: nn.Module, plan: PruningPlan | None, out_dir: str | Path, tokenizer: Any = None,
                  info: dict[str, Any] | None = None, overwrite: bool = False, quantize: str | None = None) -> Path:
    """Write the pruned encoder as a self-contained folder (kept weights only); returns the folder.

    ``encoder`` is the dense encoder (the plan is applied here) or one that ``apply_plan`` returned
    (``plan`` may then be None). ``info`` adds to the model card: ``metrics`` (name -> value), ``command``,
    ``component`` (the pipeline folder it replaces, e.g. ``text_encoder_3`` for SD3). ``quantize``
    (int8|fp8|nf4, skrr.quantize) is recorded and applied by ``load_pruned`` on the loading device; the file
    keeps the unquantized kept weights, so one export serves every device and library version.
    Nothing is left behind on failure: the folder is written under a temporary name and renamed.
    """
    from skrr.quantize import check_mode

    quantize = check_mode(quantize, "cuda")  # nf4 is checked against the device when loading
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) or choose another "
                          f"folder")
    if getattr(encoder, "skrr_quantize", "none") != "none":
        raise ExportError("the encoder is already quantized; export the unquantized one with quantize=... "
                          "(the folder keeps full weights, load_pruned quantizes them on the device)")
    own = getattr(encoder, "pruning_plan", None)
    if own is not None:
        if plan is not None and plan != own:
            raise PlanError("the encoder is already pruned by another plan; pass plan=None or the dense encoder")
        plan, pruned = own, encoder
    else:
        if plan is None:
            raise PlanError("the encoder is dense and no plan was given; pass the plan to export")
        _check_plan(plan)
        pruned = apply_plan(encoder, plan)  # validates the plan against this encoder
        plan = pruned.pruning_plan  # with its realized sparsity
    _check_plan(plan)
    cls_name = type(pruned).__name__
    init_kwargs = init_kwargs_of(pruned)
    config = copy.deepcopy(pruned.config)
    config.architectures = [cls_name]
    _, mapping, dense_params = pruned_skeleton(cls_name, copy.deepcopy(config), plan, init_kwargs)
    state = pruned.state_dict()
    if set(state) != set(mapping):
        raise ExportError("the pruned encoder's tensors differ from the plan's skeleton; was it changed after "
                          "apply_plan?")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        tensors.setdefault(mapping[name][0], t.detach().contiguous().cpu())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    params = count_params(pruned)
    manifest = {
        "format": FORMAT, "class": cls_name, "init_kwargs": init_kwargs, "weights": WEIGHTS_NAME,
        "plan": PLAN_NAME, "plan_fingerprint": plan.fingerprint(), "summary": plan.summary(),
        "params": params, "dense_params": dense_params, "bytes": nbytes, "tensors": len(tensors),
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "quantize": quantize, "load": "skrr.load_pruned(<this folder or hub id>)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "skrr": FORMAT})
        config.save_pretrained(tmp)
        plan.to_json(tmp / PLAN_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(plan, manifest, info or {}))
        _share(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s: %d params, %.1f MB in %s", plan.summary(), params, nbytes / 1e6, out)
    return out


def _share(folder: Path) -> None:
    """Usual permissions (umask) instead of the private ones of temporary files: the folder is for sharing."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def model_card(plan: PruningPlan, manifest: dict[str, Any], info: dict[str, Any]) -> str:
    """README.md of an export: base model, method, calibration, units, sparsity, sizes, metrics, command."""
    meta = plan.meta
    base = plan.encoder.model_id or "<unnamed>"
    calib = meta.get("calib", {}) if isinstance(meta.get("calib"), dict) else {}
    settings = meta.get("settings", {})
    noun = "units" if plan.granularity == "unit" else "blocks"
    skipped = [i for i in plan.skipped if i not in plan.reused]

    def pct(x: Any) -> str:
        return "n/a" if x is None else f"{100 * float(x):.2f} %"

    lines = [
        "---", "library_name: skrr", f"base_model: {base}", "tags: [skrr, pruning, text-encoder]", "---", "",
        f"# {base} pruned by {plan.method} (skrr)", "",
        f"A {manifest['class']} with {plan.summary()}. Only the kept weights are stored "
        f"({manifest['tensors']} tensors); a re-used unit is stored once and re-tied by the plan at load.", "",
        "## Load", "",
        "```python", "import skrr", "encoder = skrr.load_pruned(\"<this folder or hub id>\", torch_dtype=\"bfloat16\", "
        "device=\"cuda\")",
        "# in a diffusers pipeline: pass it as the text-encoder component",
        f"pipe = DiffusionPipeline.from_pretrained(\"{base if '/' in base else '<pipeline id>'}\", "
        f"{info.get('component', 'text_encoder')}=encoder)", "```", "",
        f"`{manifest['class']}.from_pretrained` on this folder stops with \"no file "
        f"named model.safetensors\" on purpose: it would build the dense encoder and fill the dropped "
        f"{noun} with random weights.", "",
        "## What was pruned", "",
        "| | |", "|---|---|",
        f"| base model | `{base}` |",
        f"| revision | `{plan.encoder.revision or 'not recorded'}` |",
        f"| encoder | {plan.encoder.family}, {plan.encoder.num_blocks} blocks, arch `{plan.encoder.arch}` |",
        f"| method | {plan.method} |",
        f"| settings | `{json.dumps(settings, sort_keys=True) if settings else 'n/a'}` |",
        f"| calibration set | {_calib_text(calib)} |",
        f"| granularity | {plan.granularity} |",
        f"| skipped {noun} | {', '.join(map(str, skipped)) or 'none'} |",
        f"| re-used {noun} (position <- unit) | "
        f"{', '.join(f'{i} <- {j}' for i, j in sorted(plan.reused.items())) or 'none'} |",
        f"| target sparsity | {pct(meta.get('target_sparsity'))} |",
        f"| realized sparsity | {pct(meta.get('realized_sparsity'))} |",
        f"| parameters | {manifest['params']:,} (dense {manifest['dense_params']:,}) |",
        f"| bytes of weights | {manifest['bytes']:,} ({_human(manifest['bytes'])}, {manifest['dtype']}) |",
        f"| quantization at load | {manifest.get('quantize', 'none')} (skrr.quantize; weights stored unquantized) |",
        f"| plan fingerprint | `{manifest['plan_fingerprint']}` |", "",
    ]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["## Metrics of the cell", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in sorted(metrics.items())]
        lines.append("")
    command = info.get("command") or " ".join(["python", *sys.argv])
    lines += ["## Produced by", "", "```", command, "```", ""]
    return "\n".join(lines)


def _calib_text(calib: dict[str, Any]) -> str:
    if not calib:
        return "n/a"
    parts = [f"hash `{calib['prompt_hash']}`" if "prompt_hash" in calib else None,
             f"{calib['num_prompts']} prompts" if "num_prompts" in calib else None,
             f"max length {calib['max_length']}" if "max_length" in calib else None,
             f"metric {calib['metric']}" if "metric" in calib else None]
    return ", ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------- load
def _unobtainable(model_id: str | Path, err: BaseException) -> ExportError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ExportError(f"cannot load {str(model_id)!r}: it is no local folder and "
                       f"{'HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache' if offline else 'the hub did not give it'}"
                       f"; run once with a hub connection or pass a local folder [{type(err).__name__}]")


def _resolve_export(path_or_hub_id: str | Path, revision: str | None) -> Path:
    local = Path(path_or_hub_id)
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision))
    except Exception as err:  # noqa: BLE001 - hub errors have many classes; all mean "not obtainable here"
        raise _unobtainable(path_or_hub_id, err) from err


def load_pruned(path_or_hub_id: str | Path, torch_dtype: torch.dtype | str | None = None,
                device: str | torch.device = "cpu", revision: str | None = None,
                quantize: str | None = None) -> nn.Module:
    """The encoder of an export folder (local or hub), never building the dense one.

    Returns the class ``apply_plan`` returns, with ``.pruning_plan``. ``torch_dtype`` None keeps the stored
    dtype; each tensor is cast on its own and put straight on ``device``. ``quantize`` (none|int8|fp8|nf4)
    overrides the export's setting.
    """
    folder = _resolve_export(path_or_hub_id, revision)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.exists():
        raise ExportError(f"{folder} is not a skrr export (no {MANIFEST_NAME}); write one with skrr.export_pruned "
                          f"or scripts/export.py")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{manifest_path} is corrupt ({err}); export the encoder again") from err
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{manifest_path} has format {manifest.get('format')!r}; this skrr reads {FORMAT!r}")
    plan = PruningPlan.from_json(folder / manifest.get("plan", PLAN_NAME))
    cls = encoder_class(manifest["class"])
    config = cls.config_class.from_pretrained(folder)
    _set_identity(config, plan)
    model, mapping, _ = pruned_skeleton(manifest["class"], config, plan, manifest.get("init_kwargs"))
    files = TensorFiles([folder / manifest.get("weights", WEIGHTS_NAME)])
    model = materialize(model, mapping, files, _dtype(torch_dtype), device, strict=True, where=str(folder))
    from skrr.quantize import quantize_encoder

    return quantize_encoder(model, quantize or manifest.get("quantize", "none"), device)


def checkpoint_files(model_id: str | Path, needed: set[str], subfolder: str = "", revision: str | None = None,
                     prefix: str = "model") -> list[str]:
    """The safetensors files of a (possibly sharded) dense checkpoint that hold any of ``needed``.

    A local folder is read in place; a hub id is resolved through the cache (HF_HOME/HF_HUB_CACHE), downloading
    only the shards that hold kept tensors.
    """
    local = Path(model_id) / subfolder
    index_name, single = f"{prefix}.safetensors.index.json", f"{prefix}.safetensors"
    if Path(model_id).exists():
        if not local.is_dir():
            raise ExportError(f"{local} is not a folder; point to the pipeline folder holding {subfolder!r}")

        def fetch(name: str) -> str | None:
            return str(local / name) if (local / name).exists() else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        def fetch(name: str) -> str | None:
            try:
                return hf_hub_download(str(model_id), name, subfolder=subfolder or None, revision=revision)
            except EntryNotFoundError:
                return None
            except Exception as err:  # noqa: BLE001 - offline, not cached, gated: not obtainable here
                raise _unobtainable(model_id, err) from err
    index = fetch(index_name)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k in needed})
        return [p for p in (fetch(s) for s in shards) if p is not None]
    path = fetch(single)
    if path is None:
        raise ExportError(f"{model_id}/{subfolder} has no {single} or {index_name}; skrr loads safetensors "
                          f"checkpoints lean (convert a .bin checkpoint with save_pretrained once)")
    return [path]


def load_pruned_from_dense(model_id: str | Path, plan: PruningPlan, torch_dtype: torch.dtype | str | None = None,
                           device: str | torch.device = "cpu", subfolder: str = "", revision: str | None = None,
                           cls_name: str = "T5EncoderModel", init_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``apply_plan(from_pretrained(model_id), plan)`` without the dense encoder: read only the kept tensors.

    The dense checkpoint may be a local folder or a hub id (cache), one file or sharded; each kept tensor is
    read alone, cast to ``torch_dtype`` and put on ``device``.
    """
    cls = encoder_class(cls_name)
    try:
        config = cls.config_class.from_pretrained(str(model_id), subfolder=subfolder, revision=revision)
    except OSError as err:
        raise _unobtainable(model_id, err) if not Path(model_id).exists() else ExportError(
            f"{model_id}/{subfolder} has no readable config.json ({str(err).splitlines()[0]})") from err
    config._name_or_path = str(model_id)
    model, mapping, _ = pruned_skeleton(cls_name, config, plan, init_kwargs)  # apply_plan validates the plan
    needed = {n for names in mapping.values() for n in names}
    try:
        files = TensorFiles(checkpoint_files(model_id, needed, subfolder, revision))
    except TensorFileError as err:
        raise ExportError(str(err)) from err
    return materialize(model, mapping, files, _dtype(torch_dtype), device, where=f"{model_id}/{subfolder}")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to the hub (a model repo); returns its URL. Offline: one-line ExportError."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).exists():
        raise ExportError(f"{folder} is not a skrr export (no {MANIFEST_NAME})")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ExportError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1; unset it (and `hf auth login`) and push "
                          f"again, the folder {folder} is complete")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message="skrr: pruned text encoder")
    except Exception as err:  # noqa: BLE001 - network, auth and permission errors all stop here the same way
        raise ExportError(f"cannot push to {repo_id}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                          f" (check the connection and `hf auth login`); the folder {folder} is complete") from err
    return str(getattr(info, "commit_url", info))
