"""Export / load of pruned encoders (issue 13): kept weights only, exact outputs, no dense model at load time,
and every other documented way of loading the folder is exact or refused (never random weights)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from skrr import ExportError, PlanError, Slot, apply_plan, count_params, export_pruned, identity_plan, load_pruned
from skrr.export import MANIFEST_NAME, WEIGHTS_NAME, load_pruned_from_dense
from skrr.tensorfile import TensorFiles, read_header
from skrr.tiny import tiny_clip_text, tiny_t5, tiny_t5_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def t5_plan(enc):
    # Unit 0 (attention of block 0, which owns the relative bias) skipped, a re-used FFN, a whole block gone.
    return identity_plan(enc).with_slots({0: None, 3: None, 5: Slot(1, "ffn"), 6: None, 7: None})


def clip_plan(enc):
    return identity_plan(enc).with_slots({2: None, 4: Slot(0, "attn"), 5: None})


def minilm():
    from skrr.pipelines import tiny_text_encoder

    return tiny_text_encoder("minilm")


def minilm_plan(enc):
    return identity_plan(enc).with_slots({1: None, 3: Slot(2, "block"), 4: None})


def ids_for(enc):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(90, enc.config.vocab_size - 1), (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def outputs(enc, ids, mask):
    with torch.no_grad():
        return enc(input_ids=ids, attention_mask=mask).last_hidden_state


CASES = {
    "t5": (lambda: (tiny_t5(num_layers=4), tiny_t5_tokenizer()), t5_plan),
    "clip": (lambda: (tiny_clip_text(num_layers=3), None), clip_plan),
    "minilm": (minilm, minilm_plan),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_then_load_is_bit_identical_with_kept_weights_only(case, tmp_path):
    make, make_plan = CASES[case]
    dense, tokenizer = make()
    plan = make_plan(dense)
    reference = apply_plan(dense, plan)
    out = export_pruned(dense, plan, tmp_path / "enc", tokenizer=tokenizer)
    ids, mask = ids_for(dense)
    want = outputs(reference, ids, mask)
    del dense  # nothing below may read the dense encoder
    loaded = load_pruned(out)
    assert type(loaded) is type(reference) and loaded.pruning_plan == plan
    assert torch.equal(outputs(loaded, ids, mask), want)
    # parameters and bytes: exactly the kept ones, a re-used unit once
    kept = count_params(reference)
    assert count_params(loaded) == kept
    entries, _ = read_header(out / WEIGHTS_NAME)
    stored = sum(e.nbytes for e in entries.values())
    assert stored == 4 * kept  # fp32, every kept parameter stored once
    header = 8 + int.from_bytes((out / WEIGHTS_NAME).read_bytes()[:8], "little")
    assert (out / WEIGHTS_NAME).stat().st_size == header + stored
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["params"] == kept and manifest["bytes"] == stored
    # the re-used unit is one module again after loading (re-tied, not a copy): the same sharing as apply_plan's
    reused_pos, source = next(iter(plan.reused.items()))
    assert (len(list(loaded.named_parameters(remove_duplicate=False)))
            == len(list(reference.named_parameters(remove_duplicate=False))))
    assert len(list(loaded.parameters())) == len(list(reference.parameters()))
    card = (out / "README.md").read_text()
    assert f"{reused_pos} <- {source}" in card and plan.encoder.model_id in card
    if tokenizer is not None:
        assert (out / "tokenizer_config.json").exists()


def test_load_casts_each_tensor_and_matches_a_cast_dense(tmp_path):
    dense = tiny_t5(num_layers=4)
    plan = t5_plan(dense)
    out = export_pruned(dense, plan, tmp_path / "enc")
    loaded = load_pruned(out, torch_dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids, mask = ids_for(dense)
    assert torch.equal(outputs(loaded, ids, mask), outputs(apply_plan(dense.to(torch.bfloat16), plan), ids, mask))


def test_plain_from_pretrained_is_refused_never_random(tmp_path):
    from transformers import AutoModel, T5EncoderModel

    dense = tiny_t5(num_layers=4)
    out = export_pruned(dense, t5_plan(dense), tmp_path / "enc")
    for cls in (T5EncoderModel, AutoModel):
        with pytest.raises(OSError, match="model.safetensors"):
            cls.from_pretrained(out)


def test_a_diffusers_pipeline_takes_the_folder_as_its_text_encoder(tmp_path):
    from diffusers import PixArtSigmaPipeline

    from skrr.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("t5")
    pipe.save_pretrained(tmp_path / "pipe")
    dense = pipe.text_encoder
    plan = identity_plan(dense).with_slots({2: None, 7: Slot(5, "ffn"), 9: None})
    shutil.rmtree(tmp_path / "pipe" / "text_encoder")
    export_pruned(dense, plan, tmp_path / "pipe" / "text_encoder")
    call = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=16, use_resolution_binning=False,
                output_type="np")
    pipe.text_encoder = apply_plan(dense, plan)
    want = pipe(["a red bicycle"], generator=torch.Generator().manual_seed(0), **call).images
    with pytest.raises(OSError, match="model.safetensors"):  # the component alone: refused, not random
        PixArtSigmaPipeline.from_pretrained(tmp_path / "pipe")
    loaded = PixArtSigmaPipeline.from_pretrained(tmp_path / "pipe",
                                                 text_encoder=load_pruned(tmp_path / "pipe" / "text_encoder"))
    loaded.set_progress_bar_config(disable=True)
    got = loaded(["a red bicycle"], generator=torch.Generator().manual_seed(0), **call).images
    assert np.array_equal(got, want)


@pytest.fixture
def dense_folder(tmp_path):
    """A dense T5 saved sharded (several safetensors files + index), as hub checkpoints of T5-XXL are."""
    dense = tiny_t5(num_layers=4, name="")
    dense.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    assert (tmp_path / "dense" / "model.safetensors.index.json").exists()
    return tmp_path / "dense", dense


def test_lean_load_reads_only_kept_tensors_of_a_sharded_checkpoint(dense_folder, monkeypatch):
    from transformers import T5EncoderModel

    folder, dense = dense_folder
    plan = t5_plan(dense)
    read: list[str] = []
    original = TensorFiles.read

    def spy(self, name, *args, **kwargs):
        read.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(TensorFiles, "read", spy)
    ids, mask = ids_for(dense)
    for dtype in (torch.float32, torch.float16):
        reference = apply_plan(T5EncoderModel.from_pretrained(folder, dtype=dtype), plan)
        read.clear()
        lean = load_pruned_from_dense(folder, plan, dtype)
        # same dtypes as transformers (T5 keeps `wo` in fp32 under fp16) and the very same outputs
        assert [p.dtype for p in lean.parameters()] == [p.dtype for p in reference.parameters()]
        assert torch.equal(outputs(lean, ids, mask), outputs(reference, ids, mask))
    dropped = {"encoder.block.3.layer.0.SelfAttention.q.weight", "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    assert read and not dropped & set(read)
    assert len(read) == len(set(read))  # the re-used FFN and the tied embedding are read once


def test_only_shards_holding_kept_tensors_are_fetched(dense_folder):
    from skrr.export import checkpoint_files

    folder, _ = dense_folder
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2
    wanted = {k for k, f in weight_map.items() if f == shards[1]}
    assert [Path(p).name for p in checkpoint_files(folder, wanted)] == [shards[1]]


def test_export_from_a_dense_checkpoint_then_load_without_it(dense_folder, tmp_path):
    folder, dense = dense_folder
    plan = t5_plan(dense)
    out = export_pruned(load_pruned_from_dense(folder, plan), None, tmp_path / "enc")
    moved = shutil.move(str(folder), tmp_path / "gone")
    shutil.rmtree(moved)  # the dense checkpoint no longer exists anywhere
    ids, mask = ids_for(dense)
    assert torch.equal(outputs(load_pruned(out), ids, mask), outputs(apply_plan(dense, plan), ids, mask))


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    dense = tiny_t5(num_layers=4)
    plan = t5_plan(dense)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="overwrite"):
        export_pruned(dense, plan, tmp_path / "busy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary folder left
    laco = identity_plan(dense, "block")
    laco = laco.with_slots({1: Slot(1, "block", (1, 2)), 2: None})
    with pytest.raises(PlanError, match="LaCo"):
        export_pruned(dense, laco, tmp_path / "laco")
    other = tiny_t5(num_layers=2)
    with pytest.raises(PlanError, match="made for"):
        export_pruned(other, plan, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    with pytest.raises(ExportError, match="not a skrr export"):
        load_pruned(tmp_path / "busy")
    out = export_pruned(dense, plan, tmp_path / "enc")
    export_pruned(dense, identity_plan(dense).with_slots({6: None, 7: None}), tmp_path / "less")
    shutil.copy(out / "plan.json", tmp_path / "less" / "plan.json")  # a plan that uses fewer tensors
    with pytest.raises(ExportError, match="do not belong together"):
        load_pruned(tmp_path / "less")
    export_pruned(dense, identity_plan(dense).with_slots({6: None, 7: None}), tmp_path / "less", overwrite=True)
    shutil.copy(tmp_path / "less" / "plan.json", out / "plan.json")  # a plan that needs more tensors
    with pytest.raises(ExportError, match="has no tensor"):
        load_pruned(out)


def test_push_to_hub_offline_is_one_line(tmp_path, monkeypatch):
    from skrr.export import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense = tiny_t5(num_layers=4)
    out = export_pruned(dense, t5_plan(dense), tmp_path / "enc")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE") as err:
        push_to_hub(out, "someone/tiny-skrr")
    assert "\n" not in str(err.value)


def run_script(argv, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_script_from_a_plan_and_a_local_checkpoint(dense_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, dense = dense_folder
    tiny_t5_tokenizer().save_pretrained(folder)
    plan_path = tmp_path / "plan.json"
    t5_plan(dense).to_json(plan_path)
    code, out, err = run_script(["--plan", plan_path, "--model-id", folder, "--out", tmp_path / "enc", "--dtype",
                                 "bfloat16", "--push-to-hub", "someone/x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE" in err
    assert "text_encoder/ component" in out  # the export itself finished before the push
    loaded = load_pruned(tmp_path / "enc")
    assert loaded.dtype == torch.bfloat16 and "export.py" in (tmp_path / "enc" / "README.md").read_text()
    code, out, err = run_script(["--plan", plan_path, "--model-id", tmp_path / "nowhere", "--out", tmp_path / "enc2"],
                                capsys)
    assert code == 2 and err.count("\n") == 1 and "nowhere" in err and not (tmp_path / "enc2").exists()


def test_export_script_from_a_cell_folder(tmp_path, capsys):
    from skrr.pipelines import tiny_text_encoder

    cell = tmp_path / "cell"
    (cell / "metrics").mkdir(parents=True)
    enc, _ = tiny_text_encoder("t5")
    plan = identity_plan(enc).with_slots({3: None, 5: Slot(1, "ffn")}).with_meta(target_sparsity=0.2)
    plan.to_json(cell / "plan.json")
    (cell / "metrics" / "clip_score.json").write_text(json.dumps({"value": 0.3125}))
    (cell / "cell.json").write_text(json.dumps({
        "cell": {"pipeline": "tiny", "method": "skrr", "sparsity": 0.2, "seed": 0, "tag": "t5"},
        "signature": "abc", "experiment": "demo",
        "config": {"pipeline": {"name": "tiny", "kind": "tiny", "text_encoder": "t5", "seed": 0,
                                "dtype": "float32"}}}))
    code, out, err = run_script(["--cell", cell, "--out", tmp_path / "enc"], capsys)
    assert code == 0, err
    card = (tmp_path / "enc" / "README.md").read_text()
    assert "clip_score | 0.3125" in card and "pipeline=tiny method=skrr sparsity=0.2" in card
    assert "20.00 %" in card  # target sparsity
    ids, mask = ids_for(enc)
    assert torch.equal(outputs(load_pruned(tmp_path / "enc"), ids, mask), outputs(apply_plan(enc, plan), ids, mask))
    code, _, err = run_script(["--cell", tmp_path / "nocell", "--out", tmp_path / "enc3"], capsys)
    assert code == 2 and "not a finished cell folder" in err


def test_the_run_path_builds_the_pruned_pipeline_without_the_dense_encoder(tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    from skrr.experiments.stages import pruned_pipeline
    from skrr.pipelines import PipelineSpec, build_tiny_pipeline, load_text_encoder

    build_tiny_pipeline("t5").save_pretrained(tmp_path / "pipe")
    spec = PipelineSpec(name="p", kind="pixart_sigma", model_id=str(tmp_path / "pipe"), dtype="bfloat16")
    dense, _ = load_text_encoder(spec)
    plan = identity_plan(dense).with_slots({2: None, 7: Slot(5, "ffn"), 9: None})
    reference = apply_plan(dense, plan)

    def refuse(*args, **kwargs):
        raise AssertionError("the dense text encoder was loaded")

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(refuse))
    pipe, _ = pruned_pipeline(spec, plan, torch.device("cpu"))
    assert pipe.text_encoder.pruning_plan == plan
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    ids, mask = ids_for(dense)
    assert torch.equal(outputs(pipe.text_encoder, ids, mask), outputs(reference, ids, mask))
