"""Mutation check of the metric tests (issue 16): plant each bug below in a scratch copy, see a test fail.

    python scripts/mutants.py                 # every mutant; prints killed / SURVIVED per mutant, exit 1 if any survives
    python scripts/mutants.py --only fid      # the mutants whose id starts with "fid"
    python scripts/mutants.py --list          # the list, without running anything

Each mutant is one textual replacement in one file (``old`` must occur exactly once, else the mutant is
reported STALE: the code moved and the list needs updating) and the test files that should catch it. The
repository itself is never modified: the code is copied to a temporary folder and each mutant is planted
there, tested with ``pytest -x`` (default markers, offline) and removed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("eval", "skrr", "baselines", "tests", "configs", "scripts", "run.py", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``old`` -> ``new`` in ``path``; ``tests`` should fail."""

    id: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


def m(id: str, path: str, old: str, new: str, tests: str, why: str) -> Mutant:
    return Mutant(id, path, old, new, tuple(f"tests/{t}.py" for t in tests.split()), why)


MUTANTS = [
    # ------------------------------------------------------------------ CLIP score
    m("clip-truncation-off", "eval/clip_score.py", "truncation=True, max_length=77", "truncation=False",
      "test_eval_clip", "CLIP's 77-token truncation switched off"),
    m("clip-truncate-78", "eval/clip_score.py", "max_length=77", "max_length=76", "test_eval_clip",
      "truncation at the wrong length"),
    m("clip-x100", "eval/clip_score.py", "backbone.encode_texts(prompts)).sum(dim=-1)",
      "backbone.encode_texts(prompts)).sum(dim=-1) * 100", "test_eval_clip", "x100 convention"),
    m("clip-clamp", "eval/clip_score.py", "backbone.encode_texts(prompts)).sum(dim=-1)",
      "backbone.encode_texts(prompts)).sum(dim=-1).clamp_min(0)", "test_eval_clip", "clamped at 0"),
    m("clip-unnormalised-image", "eval/clip_score.py",
      "F.normalize(self.model.visual_projection(pooled).float(), dim=-1)",
      "self.model.visual_projection(pooled).float()", "test_eval_clip", "image embedding not unit norm"),
    m("clip-first-prompt", "eval/clip_score.py", "backbone.encode_texts(prompts)).sum(dim=-1)",
      "backbone.encode_texts(prompts[:1])).sum(dim=-1)", "test_eval_clip", "every image scored on prompt 0"),
    m("clip-dir-median", "eval/clip_score.py", "ClipScoreResult(float(s.mean())", "ClipScoreResult(float(s.median())",
      "test_eval_clip", "median instead of mean"),
    # ------------------------------------------------------------------ FID
    m("fid-legacy-mode-in-features", "eval/fid.py", "batch_size=batch_size, device=torch.device(device), mode=mode,",
      "batch_size=batch_size, device=torch.device(device), mode=\"legacy_pytorch\",", "test_eval_fid",
      "clean-fid's mode switched to legacy"),
    m("fid-legacy-default", "eval/fid.py", 'MODE = "clean"', 'MODE = "legacy_tensorflow"', "test_eval_fid",
      "default mode legacy"),
    m("fid-accept-legacy", "eval/fid.py", "    if mode != MODE:", "    if mode not in (MODE, \"legacy_pytorch\"):",
      "test_eval_fid", "legacy mode accepted again (fails on the 299 assert)"),
    m("fid-biased-cov", "eval/fid.py", "np.cov(f, rowvar=False)", "np.cov(f, rowvar=False, bias=True)",
      "test_eval_fid", "biased covariance"),
    m("fid-no-factor-2", "eval/fid.py", "- 2.0 * tr_covmean", "- tr_covmean", "test_eval_fid", "trace term"),
    m("fid-l1-mean", "eval/fid.py", "return float(diff @ diff +", "return float(np.abs(diff).sum() +",
      "test_eval_fid", "mean term not squared"),
    m("fid-sqrt-of-s2", "eval/fid.py", "inner = root1 @ s2 @ root1", "inner = s1 @ s2", "test_eval_fid",
      "Tr sqrt of a non-symmetric product taken as symmetric"),
    m("fid-against-itself", "eval/fid.py", "value = frechet_distance(mu_g, sigma_g, mu_r, sigma_r)",
      "value = frechet_distance(mu_g, sigma_g, mu_g, sigma_g)", "test_eval_fid", "reference ignored"),
    m("fid-cache-key-no-backbone", "eval/fid.py", "json.dumps([backbone, mode, listing])",
      "json.dumps([mode, listing])", "test_eval_fid", "two backbones with one file-name slug share statistics"),
    m("fid-cache-key-no-listing", "eval/fid.py", "json.dumps([backbone, mode, listing])",
      "json.dumps([backbone, mode])", "test_eval_fid", "stale statistics after the reference folder changed"),
    m("score-no-mode-check", "eval/score.py", "            check_mode(spec.get(\"mode\", MODE), key=f\"eval.{key}.mode\")",
      "            pass", "test_eval_fid", "legacy mode found only after generation"),
    # ------------------------------------------------------------------ DreamSim
    m("dreamsim-distance-as-similarity", "eval/dreamsim.py", "sims[todo] = 1.0 - d.double().numpy()",
      "sims[todo] = d.double().numpy()", "test_eval_dreamsim", "distance reported as similarity"),
    m("dreamsim-last-batch-dropped", "eval/dreamsim.py", "    if todo:\n        flush()", "    pass",
      "test_eval_dreamsim", "last partial batch never scored"),
    m("dreamsim-hub-dir-leak", "eval/dreamsim.py", "    with restored_hub_dir():\n        model, preprocess",
      "    if True:\n        model, preprocess", "test_eval_dreamsim", "torch.hub dir left at the cache"),
    m("dreamsim-no-identical-shortcut", "eval/dreamsim.py",
      "if ia.size == ib.size and np.array_equal(np.asarray(ia), np.asarray(ib)):", "if False:",
      "test_eval_dreamsim", "dense copy not exactly 1"),
    m("dreamsim-seed-not-checked", "eval/dreamsim.py", "d is None or d[\"seed\"] != r[\"seed\"] or d[\"prompt\"] != r[\"prompt\"]",
      "d is None", "test_eval_dreamsim", "unpaired runs compared"),
    m("dreamsim-offline-download", "eval/dreamsim.py",
      "if missing and (not allow_download or os.environ.get(\"HF_HUB_OFFLINE\") == \"1\"):",
      "if missing and not allow_download:", "test_eval_dreamsim", "downloads attempted offline"),
    # ------------------------------------------------------------------ GenEval rules
    m("geneval-first-target-only", "eval/geneval.py", "bad = [t for t in targets if",
      "bad = [t for t in targets[:1] if", "test_eval_geneval", "position checks only the first target object"),
    m("geneval-first-object-only", "eval/geneval.py", "                for obj in found:",
      "                for obj in found[:1]:", "test_eval_geneval", "position checks only the first object"),
    m("geneval-threshold-ge", "eval/geneval.py", "if d.score > threshold", "if d.score >= threshold",
      "test_eval_geneval", "score > 0.3 becomes >="),
    m("geneval-counting-threshold", "eval/geneval.py", "COUNTING_THRESHOLD = 0.9", "COUNTING_THRESHOLD = 0.8",
      "test_eval_geneval", "counting threshold"),
    m("geneval-max-objects", "eval/geneval.py", "MAX_OBJECTS = 16", "MAX_OBJECTS = 17", "test_eval_geneval",
      "cap per class"),
    m("geneval-no-shrink", "eval/geneval.py", "POSITION_SHRINK = 0.1", "POSITION_SHRINK = 0.0",
      "test_eval_geneval", "no 0.1 shrink"),
    m("geneval-above-below-swapped", "eval/geneval.py", '        relations.add("above")', '        relations.add("below")',
      "test_eval_geneval", "image y taken as pointing up"),
    m("geneval-half-rule", "eval/geneval.py", "    if dx < -0.5:", "    if dx < -0.4:", "test_eval_geneval",
      "the 0.5 rule"),
    m("geneval-half-rule-below", "eval/geneval.py", "    if dy > 0.5:", "    if dy > 0.4:", "test_eval_geneval",
      "the 0.5 rule, vertical"),
    m("geneval-exclude-gt", "eval/geneval.py", "        if len(detections.get(name, [])) >= count:",
      "        if len(detections.get(name, [])) > count:", "test_eval_geneval", "exclude clause off by one"),
    m("geneval-colour-all-objects", "eval/geneval.py", "found = list(detections.get(name, []))[:count]",
      "found = list(detections.get(name, []))", "test_eval_geneval", "colour of every object, not the top count"),
    m("geneval-ascending", "eval/geneval.py", "key=lambda d: -d.score)", "key=lambda d: d.score)",
      "test_eval_geneval", "least confident first"),
    m("geneval-overall-per-image", "eval/geneval.py",
      "return ordered, float(np.mean(list(ordered.values()))) if ordered else float(\"nan\")",
      "return ordered, float(np.mean([bool(r['correct']) for r in results]))", "test_eval_geneval",
      "overall averaged over images"),
    # ------------------------------------------------------------------ GenEval detector input / output
    m("mmdet-antialias", "eval/geneval.py", "antialias=False)", "antialias=True)", "test_eval_geneval",
      "PIL-style antialiased downscale"),
    m("mmdet-bicubic", "eval/geneval.py", 'mode="bilinear", align_corners=False, antialias=False)',
      'mode="bicubic", align_corners=False, antialias=False)', "test_eval_geneval", "bicubic"),
    m("mmdet-no-uint8", "eval/geneval.py", "        x = x.round().clamp(0, 255)", "        x = x.clamp(0, 255)",
      "test_eval_geneval", "not quantised as cv2's uint8 output"),
    m("mmdet-stretch", "eval/geneval.py", "        h, w = self.resized_hw(arr.shape[0], arr.shape[1])",
      "        h, w = (-(-self.resized_hw(arr.shape[0], arr.shape[1])[0] // 32) * 32,"
      " -(-self.resized_hw(arr.shape[0], arr.shape[1])[1] // 32) * 32)", "test_eval_geneval",
      "stretched to the padded size (transformers 5)"),
    m("mmdet-floor", "eval/geneval.py", "return int(height * scale + 0.5), int(width * scale + 0.5)",
      "return int(height * scale), int(width * scale)", "test_eval_geneval", "sizes truncated, not rounded"),
    m("mmdet-scale-max", "eval/geneval.py", "scale = min(self.long_edge", "scale = max(self.long_edge",
      "test_eval_geneval", "long edge not capped"),
    m("mmdet-pad-before-normalise", "eval/geneval.py", "        x = F.pad(x, (0, -w % d, 0, -h % d))",
      "        x = F.pad(x, (0, -w % d, 0, -h % d), value=-2.0)", "test_eval_geneval", "padding not 0 after Normalize"),
    m("mmdet-no-crop", "eval/geneval.py", "    masks = masks[..., :valid_hw[0], :valid_hw[1]]\n", "",
      "test_eval_geneval", "padding not cropped before resizing masks"),
    m("mmdet-box-exclusive", "eval/geneval.py", "float(xs.max() + 1), float(ys.max() + 1)",
      "float(xs.max()), float(ys.max())", "test_eval_geneval", "mask2bbox end"),
    m("geneval-crop-no-mask", "eval/geneval.py", "    if det.mask is not None:\n", "    if False:\n",
      "test_eval_geneval", "colour judged on the unmasked crop"),
    # ------------------------------------------------------------------ prompt sets and pairing
    m("prompts-subset-tail", "eval/prompts.py", "return PromptSet(name or f\"{self.name}_{n}\", self.prompts[:n], self.metadata[:n]",
      "return PromptSet(name or f\"{self.name}_{n}\", self.prompts[-n:], self.metadata[-n:]",
      "test_eval_generate test_eval_score test_eval_prepare_refs", "COCO-1k not the head of COCO-30k"),
    m("prompts-coco-unsorted", "eval/prompts.py", "    ids = sorted(caps)", "    ids = list(caps)[::-1]",
      "test_eval_generate test_eval_score test_eval_prepare_refs", "draw depends on the file's order"),
    m("generate-seed-per-sample-only", "eval/generate.py", 'f"skrr-image:{seed}:{prompt_idx}:{sample_idx}"',
      'f"skrr-image:{seed}:{sample_idx}"', "test_eval_generate", "every prompt starts from the same noise"),
    # ------------------------------------------------------------------ cost
    m("cost-no-cpu-attention", "eval/efficiency.py",
      "return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)", "return FlopCounterMode(display=False)",
      "test_eval_efficiency", "fused CPU attention counted 0"),
    m("cost-attention-halved", "eval/efficiency.py", "    return sdpa_flop_count(query_shape, key_shape, value_shape)",
      "    return sdpa_flop_count(query_shape, key_shape, value_shape) // 2", "test_eval_efficiency",
      "attention multiply-adds counted once"),
    m("cost-one-call-per-step", "eval/efficiency.py", "calls_per_step = tally[\"denoiser_calls\"] / steps",
      "calls_per_step = 1", "test_eval_efficiency", "CFG batch ignored"),
    m("cost-probe-steps", "eval/efficiency.py", "denoise_total = per_call * calls_per_step * settings.num_inference_steps",
      "denoise_total = per_call * calls_per_step * steps", "test_eval_efficiency", "not extrapolated to all steps"),
    m("cost-mem-stored-dtype", "eval/efficiency.py", "bf16 = weight_bytes(pipeline, bytes_per_element=2) / GIB",
      "bf16 = weight_bytes(pipeline) / GIB", "test_eval_efficiency", "Mem in the stored dtype, not bf16"),
    m("cost-shared-twice", "eval/efficiency.py", "        if key not in seen:", "        if True:",
      "test_eval_efficiency", "shared tensors counted twice"),
    m("cost-vae-encoder", "eval/efficiency.py",
      "return [m for m in (getattr(vae, \"post_quant_conv\", None), vae.decoder) if isinstance(m, nn.Module)]",
      "return [m for m in (vae.encoder, getattr(vae, \"post_quant_conv\", None), vae.decoder) "
      "if isinstance(m, nn.Module)]", "test_eval_efficiency", "VAE image encoder counted"),
    # ------------------------------------------------------------------ skrr/calib.py (discrepancy D)
    m("calib-no-null", "skrr/calib.py",
      "            d += self._mean_distance([null], [self.dense_null], [self.null_batch])",
      "            d += 0.0", "test_calib", "∅ term dropped (paper Eq. 4)"),
    m("calib-sum-not-mean", "skrr/calib.py", "    return math.fsum(sums) / count if count else 0.0",
      "    return math.fsum(sums) if count else 0.0", "test_calib", "sum instead of mean"),
    m("calib-abs-not-square", "skrr/calib.py", "            err.pow_(2)\n",
      "            err.abs_()\n", "test_calib", "MAE instead of MSE"),
    m("calib-no-projection", "skrr/calib.py",
      "return self.projection(last_hidden_state) if self.projection is not None else last_hidden_state",
      "return last_hidden_state", "test_calib", "caption projection skipped"),
    m("calib-cosine-scale", "skrr/calib.py", "err = 0.5 * (unit_d - unit_p).pow_(2).sum(dim=-1)",
      "err = (unit_d - unit_p).pow_(2).sum(dim=-1)", "test_calib", "cosine distance doubled"),
    m("calib-mask-count", "skrr/calib.py", "count = int(mask.sum()) * dense.shape[-1] if self.token_mask",
      "count = int(mask.sum()) if self.token_mask", "test_calib", "token-mask MSE divides by tokens, not elements"),
    m("calib-mask-ignored", "skrr/calib.py", "                err.mul_(mask.unsqueeze(-1).to(err.dtype))\n", "                pass\n",
      "test_calib", "token_mask scores padding anyway"),
    m("calib-no-padding", "skrr/encoding.py", 'padding="max_length", max_length=self.max_length',
      "padding=True, max_length=self.max_length", "test_calib", "prompts not padded as the pipeline pads"),
    m("calib-sample-unsorted", "skrr/calib.py", "idx = sorted(random.Random(seed).sample(range(len(prompts)), num))",
      "idx = random.Random(seed).sample(range(len(prompts)), num)", "test_calib", "file order lost"),
    m("calib-bound-strict", "skrr/calib.py", "kept = [i for i in members if partial(i) <= bound]",
      "kept = [i for i in members if partial(i) < bound]", "test_calib", "ties with the bound abandoned"),
    m("calib-beam-bound", "skrr/calib.py", "bound = min(bound, sorted(partial(i) for i in finish)[keep - 1])",
      "bound = min(bound, sorted(partial(i) for i in finish)[0])", "test_calib",
      "beam bound from the best, not the k-th, plan"),
    m("calib-null-count", "skrr/calib.py",
      "count_n = self._total_count([self.null_batch]) if self.null_prompt else 0",
      "count_n = self._total_count(self.batches) if self.null_prompt else 0", "test_calib",
      "fast path divides ∅ by the prompts' count"),
    m("calib-order-reranked", "skrr/calib.py", "            if restarts is None or self._prompt_error[k] is None:\n",
      "            if True:\n", "test_calib", "prompt order re-ranked with kept states (they miss their prompts)"),
    m("calib-order-frozen", "skrr/calib.py", "            if restarts is None or self._prompt_error[k] is None:\n",
      "            if self._prompt_error[k] is None:\n", "test_calib",
      "prompt order never re-ranked when nothing is kept across rounds (10 % more work there)"),
    m("calib-order-last-chunk", "skrr/calib.py",
      "                for k, err in zip(chunk.indices, sums.mean(dim=0).tolist()):\n"
      "                    seen.setdefault(k, err)\n",
      "                seen.update(zip(chunk.indices, sums.mean(dim=0).tolist()))\n", "test_calib",
      "prompt errors from the plans alive in the last chunk (ranks prompts by when they were visited)"),
    m("calib-kept-all-or-none", "skrr/calib.py",
      "        rows = [k for k in range(len(self.prompts)) if entry.covers([k], self.max_length)]\n",
      "        rows = list(range(len(self.prompts))) if entry.covers(range(len(self.prompts)), self.max_length) "
      "else []\n", "test_skrr", "a new beam's kept prompt states used only when every prompt was kept"),
]

# Tried and found equivalent (no test can tell them apart from the code, because the behaviour is the same):
EQUIVALENT = {
    "clip-no-text-mask": "dropping the text attention mask: CLIP's text tower is causal and pools at the first end "
                         "token, and the padding comes after it, so no pooled feature ever sees the padding",
    "fid-no-identical-shortcut": "removing frechet_distance's array_equal shortcut: the formula then gives round-off "
                                 "of ~1e-13 instead of exactly 0 (the tests accept |FID| < 1e-6 there)",
}


def run(mutants: list[Mutant], timeout: int) -> int:
    """Plant each mutant in a scratch copy and run its tests; returns the number that survived or were stale."""
    bad = 0
    with tempfile.TemporaryDirectory(prefix="skrr-mutants-") as tmp:
        work = Path(tmp)
        for name in COPY:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, work / name)
        env = {**os.environ, "PYTHONPATH": str(work), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled"}
        for mu in mutants:
            path = work / mu.path
            original = path.read_text()
            if original.count(mu.old) != 1:
                print(f"STALE     {mu.id}: the text to mutate occurs {original.count(mu.old)} times in {mu.path}")
                bad += 1
                continue
            path.write_text(original.replace(mu.old, mu.new))
            start = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                       *mu.tests], cwd=work, env=env, capture_output=True, text=True,
                                      timeout=timeout)
                rc = proc.returncode
                tail = (proc.stdout.strip().splitlines() or [""])[-1]
            except subprocess.TimeoutExpired:
                rc, tail = -1, f"timed out after {timeout}s (counted as killed)"
            finally:
                path.write_text(original)
            killed = rc != 0
            bad += not killed
            print(f"{'killed  ' if killed else 'SURVIVED'}  {mu.id:34s} {time.perf_counter() - start:5.1f}s  "
                  f"{mu.why}  [{tail}]", flush=True)
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose id starts with this")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    args = parser.parse_args()
    chosen = [mu for mu in MUTANTS if mu.id.startswith(args.only)]
    if not chosen:
        parser.error(f"no mutant id starts with {args.only!r}; see --list")
    if args.list:
        for mu in chosen:
            print(f"{mu.id:34s} {mu.path:22s} {mu.why}")
        return 0
    bad = run(chosen, args.timeout)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
