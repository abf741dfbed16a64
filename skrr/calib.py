"""Calibration prompts and the discrepancy every search method minimises.

Skrr's metric (SPEC §2, paper Eq. 3-4): D = MSE(proj(E(C)), proj(E'(C))) + MSE(proj(E(∅)), proj(E'(∅))),
with proj the denoiser's own caption projection, prompts padded as the pipeline pads, mean over every
element of [N, L, d] (padding included). The ablations of Table A13 are flags: cosine instead of MSE,
no projection, no null prompt, valid-token mask. Dense features are computed once and cached.

``discrepancy(plan)`` scores one plan with full forward passes. ``discrepancies(plans, bound)`` scores many
plans at once with the same arithmetic and far less work (Skrr's search, SPEC §2 "exact speed-ups"):

- shared prefixes: per prompt, the plans form a prefix tree; plans that agree on positions [0, p) share one
  hidden state there, so a candidate S ∪ {u} of beam S only runs positions > u (and the beam's own trunk
  runs once for all its candidates);
- candidate batching: at each position a module runs once on every tree node that needs it (and, when no
  bound is given, on several prompts at once);
- early abandon: ∅ first, then the prompts a few at a time (at most 1/BOUND_STEPS of them), those that gave
  the largest errors in the last call first (with candidate states kept across rounds, in the first call that
  scored them: one order, so that the kept states cover the prompts the next round visits first); a plan
  whose partial error already exceeds ``bound`` is dropped, since every remaining error term is >= 0 (D is a
  sum of non-negative terms). For a beam (``keep=k``) the bound comes from the plans themselves: after ∅, the
  2k lowest are finished and the k-th of their D bounds the rest, which then cannot enter the beam (Alg. 1)
  once past it; after each step, up to k plans whose D extrapolated from the prompts so far is below the
  bound are finished too, and the k-th lowest D of all finished plans tightens the bound (a threshold
  schedule: the plans that will enter the beam are found before the others have run most prompts);
- padding: with ``token_mask`` the padded tail is cut where the pipeline gives the encoder its mask (PixArt-Σ:
  valid tokens give the tail zero attention weight and it is not scored); without ``token_mask``, or for SD3
  and FLUX (T5 runs without a mask, so valid tokens attend to the padding), nothing is cut.

Prompts are tokenized and encoded as the pipeline's own ``encode_prompt`` does (``PromptEncoding``,
skrr/encoding.py): same text cleaning, padding, truncation and encoder mask, so D is measured on the features
the denoiser receives. Where those are more than the projected ``last_hidden_state`` (SD3's CLIP-L/G: the input
state of the last block and the pooled output, skrr/readout.py), a ``readout`` makes them from the final state
and the state at its ``tap`` position; every plan then starts at the tap at the latest, so that state is in the
tree.

Hidden states across calls (``PrefixStates``): a plan's hidden state at the input of every position, for
every prompt and ∅. A plan that agrees with such a base on positions [0, p) starts at p from the stored state
instead of from the embeddings: the Skip phase keeps one per beam (a candidate S ∪ {u} runs only the
positions after u; the new beam S ∪ {u} is derived from S's states by recomputing positions >= u once), the
Re-use phase one for the current plan. The price is memory: (positions + 1) x (prompts + 1) x tokens x d per
base, ~10 MB for the tiny benchmark but ~120 GB per beam for T5-XXL on 1k prompts x 300 tokens, so callers
keep bases only within a byte budget (``state_bytes`` tells the size) and otherwise fall back to the tree,
which then recomputes each beam's trunk per prompt and round.

Candidate states across rounds (``RestartStates``, the Skip phase's, within the same budget): a next-round
candidate F ∪ {u} of a new beam F that skips u before F's own last skip v agrees, up to v, with this round's
candidate (F \ {v}) ∪ {u}, so it restarts at v from that candidate's kept state instead of at u; a new beam's
states are assembled from those kept while it was scored (∅ runs, and each prompt only at the positions it
restarted past, which the beam's next candidates start from). On the 48-unit benchmark this cuts
the work left after prefix sharing and early abandon by about a third; its memory is that of every possible
beam's candidates, prompt by prompt as they are scored (257 MiB there; for T5-XXL on 1k prompts
~2 TB by the same count), so only a budget's worth of it is kept.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from skrr.encoding import PromptEncoding
from skrr.families import StackContext
from skrr.plan import PruningPlan, Slot
from skrr.surgery import StackRunner, default_granularity

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "calib_prompts.txt"
METRICS = ("mse", "cosine")
# Token budget of one module call in ``discrepancies`` (rows x tokens): T5-XXL at 300 tokens keeps
# activations of one call to a few GiB in bf16; the tiny encoders are far below it.
MAX_TOKENS = 2 ** 16
# Elements of one piece of ``row_errors``: its float32 errors (and the float64 copy torch makes to sum them)
# stay at 48 MiB however many candidates are stacked (one T5-XXL prompt after PixArt-Σ's projection is
# 300 x 1152 = 345,600 elements).
ERROR_PIECE = 2 ** 22
# With a bound, ``discrepancies`` scores at most 1/BOUND_STEPS of the prompts per step before it drops the plans
# proven worse: finer steps drop them sooner (less work), coarser ones stack more prompts per module call. On
# the 48-unit benchmark 64 steps do 4 % less work than 32 (scripts/bench_search.py).
BOUND_STEPS = 64


class CalibrationError(ValueError):
    """A calibration prompt file that is missing, empty or unreadable."""


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a file: one per line (.txt), JSON lines (.jsonl) or a CSV column (.csv)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration prompt file {path} does not exist; set calib.prompts=<file> "
                               f"(one prompt per line, .jsonl or .csv)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{path}:{n} is not valid JSON ({err.msg})") from err
            prompts.append(_field(row, column, f"{path}:{n}"))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            prompts = [_field(row, column, f"{path}:{n}") for n, row in enumerate(csv.DictReader(f), start=2)]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise CalibrationError(f"calibration prompt file {path} holds no prompts")
    return prompts


def _field(row: Any, column: str | None, where: str) -> str:
    if isinstance(row, str):
        return row.strip()
    for key in ([column] if column else ["prompt", "caption", "text"]):
        if isinstance(row, dict) and key in row:
            return str(row[key]).strip()
    raise CalibrationError(f"{where} has no column {column or 'prompt/caption/text'!r}; set calib.column")


def sample_prompts(prompts: Sequence[str], num: int | None, seed: int) -> list[str]:
    """A seeded sample of ``num`` prompts (all of them, in file order, when num is None or larger)."""
    if num is None or num >= len(prompts):
        return list(prompts)
    if num <= 0:
        raise CalibrationError(f"num_calib_prompts must be positive, got {num}")
    idx = sorted(random.Random(seed).sample(range(len(prompts)), num))
    return [prompts[i] for i in idx]


def prompt_hash(prompts: Sequence[str]) -> str:
    """Short hash of a prompt set, recorded in every plan calibrated on it."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:12]


@dataclass
class Batch:
    """Token ids and valid-token mask of one batch of prompts, padded as the pipeline pads; ``masks_encoder``:
    whether the pipeline passes that mask to the encoder (PixArt-Σ yes, SD3/FLUX no: skrr/encoding.py)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    masks_encoder: bool = True

    @property
    def encoder_mask(self) -> torch.Tensor | None:
        """What the encoder gets as ``attention_mask``, exactly as the pipeline calls it."""
        return self.attention_mask if self.masks_encoder else None


@dataclass
class _Chunk:
    """Prompts (or ∅) scored together in ``discrepancies``: ids, mask, dense features (None: recompute them
    on the trimmed input)."""

    indices: list[int]  # prompt indices, [-1] for ∅
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    dense: torch.Tensor | None

    @property
    def null(self) -> bool:
        return self.indices[0] < 0


@dataclass
class _Step:
    """One position of the plan tree: which modules run on which node rows, and the rows that skip it.

    Rows are nodes (distinct prefixes). After the step the new rows are the outputs of ``runs`` in order,
    then the ``keep`` rows unchanged; ``slice(None)`` means every row in order (no gather).
    """

    runs: list[tuple[nn.Module, slice | torch.Tensor]]
    keep: slice | torch.Tensor | None


@dataclass
class _Schedule:
    """The plan tree of a set of plans, the same for every prompt: the starting state of each initial row
    (None: the embeddings; (base, p): ``bases[base].states[p]``), steps, and each plan's final row."""

    inits: list[tuple[int, ...] | None]
    steps: list[_Step]
    leaves: list[int]
    # With a readout that reads a state inside the stack (SD3's CLIP: the input of the last block): the step
    # before which that state is complete, and each plan's row there.
    tap_step: int | None = None
    tap_nodes: list[int] | None = None
    # Restart states to capture: before step j (j = len(steps): at the end), the node at row ``node``.
    grabs: dict[int, list[tuple[int, "_Restart"]]] = field(default_factory=dict)


@dataclass
class ScoreStats:
    """Work done by ``discrepancies`` / ``discrepancy`` (for logs and the search benchmark)."""

    plans: int = 0  # plans asked for
    abandoned: int = 0  # plans given up once their partial error passed the bound
    token_evals: int = 0  # sum over module calls of rows x tokens (the FLOP proxy)
    restart_peak: int = 0  # most bytes of RestartStates held at once


@dataclass
class PrefixStates:
    """One plan's hidden states at the input of every position (``states[p]``, p = 0..positions; the last is
    the stack's output before the final norm), for every calibration prompt in order and then ∅.

    A plan equal to ``keys`` on positions [0, p) has exactly the state ``states[p]`` there. Positions that
    the plan skips share the tensor of the position before (no copy); derived bases share their parent's
    tensors up to where they differ.
    """

    keys: list[Any]
    states: list[torch.Tensor]

    def start(self, keys: Sequence[Any]) -> int:
        """First position where a plan (by its slot keys) differs from this base: it may start there."""
        for pos, (a, b) in enumerate(zip(self.keys, keys)):
            if a != b:
                return pos
        return len(self.keys)


class RestartStates:
    """Hidden states of one round's candidates that the next round's candidates restart from (Skip phase).

    A next-round candidate T = F + {u} (F a new beam, u skipped) has the hidden state, up to the second
    position p where they differ, of any candidate Q of this round that skips u where F runs it and agrees
    with F elsewhere before p: e.g. Q = S' + {u} and F = S' + {v}, u < v, agree with T on [0, v). So T
    restarts at p from Q's state instead of at u from F's beam state (``restart_positions``). Exact: the state
    at the input of position p depends only on what runs before p.

    The new beams are not known while a round runs, so ``discrepancies`` captures for every possible beam (the
    race's finished plans and every plan that survives the first bound) and releases what served a plan once
    it is abandoned; it captures each prompt a plan with that prefix is scored on (∅ from the race's first
    chunk), and a possible beam's own states at every position it ran, from which its ``PrefixStates`` are
    then assembled instead of recomputed (``prefix_states``). ``advance(beams)`` keeps what serves the new
    beams for the next round. Everything stays within ``limit`` bytes (beyond it, candidates start from their
    beam: same plan, more work).
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.previous: dict[tuple[Any, ...], _Restart] = {}  # read this round (captured in the last one)
        self.current: dict[tuple[Any, ...], _Restart] = {}  # captured this round
        self._by_beam: dict[tuple[Any, ...], list[_Restart]] = {}
        self.bytes = 0
        self.full = False  # logged once

    def lookups(self, keys: Sequence[Any], after: int, upto: int | None = None) -> list[tuple[int, "_Restart"]]:
        """Kept states a plan (by slot keys) may restart from past position ``after`` (and not past ``upto``:
        a readout's tap), latest position first."""
        out = []
        for p in sorted({len(k) for k in self.previous}, reverse=True):
            if after < p <= (len(keys) if upto is None else upto) and \
                    (entry := self.previous.get(tuple(keys[:p]))) is not None:
                out.append((p, entry))
        return out

    def want(self, prefix: tuple[Any, ...], serves: tuple[Any, ...]) -> "_Restart":
        """The entry that captures the state of plans with this prefix (for the possible beam ``serves``)."""
        entry = self.current.setdefault(prefix, _Restart())
        if serves not in entry.serves:
            entry.serves.add(serves)
            self._by_beam.setdefault(serves, []).append(entry)
        return entry

    def put(self, entry: "_Restart", indices: Sequence[int], block: torch.Tensor) -> None:
        """Keep the states [prompts, tokens, d] of some prompts (a copy, so the search's big tensors are
        freed) while within the limit."""
        if len(indices) == 1:  # the common case (bounded steps of one prompt): no per-row bookkeeping
            new = [] if indices[0] in entry.rows else [0]
        else:
            new = [j for j, k in enumerate(indices) if k not in entry.rows]
        if not new:
            return
        size = len(new) * (block.numel() // block.shape[0]) * block.element_size()
        if self.bytes + size > self.limit:
            if not self.full:
                log.info("skrr: kept candidate states reached their budget (%.2f GiB); later candidates start "
                         "from their beam (same plan, more work)", self.limit / 2 ** 30)
            self.full = True
            return
        copy = block[new] if len(new) < len(indices) else block.clone()  # indexing copies already
        if len(new) == 1:
            entry.rows[indices[new[0]]] = (copy, 0)
        else:
            entry.rows.update((indices[j], (copy, c)) for c, j in enumerate(new))
        entry.nbytes += size
        self.bytes += size

    def drop(self, entry: "_Restart") -> None:
        """Free an entry's states."""
        self.bytes -= entry.nbytes
        entry.rows.clear()
        entry.nbytes = 0

    def release(self, beam: tuple[Any, ...]) -> None:
        """``beam`` (slot keys) was proven not to be a beam: free what was kept only for it."""
        for entry in self._by_beam.pop(beam, ()):
            entry.serves.discard(beam)
            if not entry.serves:
                self.drop(entry)

    def advance(self, beams: Sequence[Sequence[Any]]) -> None:
        """End of a round: keep the states that serve the new ``beams`` (slot keys), readable next round."""
        wanted = {tuple(b) for b in beams}
        self.previous = {k: e for k, e in self.current.items() if e.serves & wanted and e.rows}
        self.current, self._by_beam = {}, {}
        self.bytes = sum(e.nbytes for e in self.previous.values())
        self.full = False


@dataclass(eq=False)  # hashed by identity: it names a tree's starting state
class _Restart:
    """One kept state: per prompt index (∅: -1), its hidden state [tokens, d] (tokens: its chunk's length) as
    (block, row) of a copied block of prompts."""

    rows: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    serves: set[tuple[Any, ...]] = field(default_factory=set)
    nbytes: int = 0

    def covers(self, indices: Sequence[int], length: int) -> bool:
        return all(k in self.rows and self.rows[k][0].shape[1] >= length for k in indices)

    def state(self, index: int, length: int) -> torch.Tensor:
        block, row = self.rows[index]
        return block[row, :length]


def restart_positions(candidates: np.ndarray, beam: np.ndarray) -> np.ndarray:
    """Where a next-round candidate T = ``beam`` with one more position skipped can restart from each of
    ``candidates``' states (RestartStates): the second position where candidate and beam differ, if at the
    first the candidate skips what the beam runs; else -1. Rows of slot codes (0 = skipped), [plans, positions].
    """
    differs = candidates != beam
    rows = np.arange(candidates.shape[0])
    first = differs.argmax(axis=1)
    differs[rows, first] = False
    second = np.where(differs.any(axis=1), differs.argmax(axis=1), -1)
    ok = (second > 0) & (candidates[rows, first] == 0) & (beam[first] != 0)
    return np.where(ok, second, -1)


class CalibrationSet:
    """Tokenized calibration prompts + ∅, cached dense features, and ``discrepancy(plan)``."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, prompts: Sequence[str],
                 projection: nn.Module | None = None, *, encoding: PromptEncoding | None = None,
                 max_length: int | None = None, metric: str = "mse", use_projection: bool = True,
                 null_prompt: bool = True, token_mask: bool = False, batch_size: int = 16,
                 granularity: str | None = None, device: str | torch.device = "cpu",
                 readout: nn.Module | None = None):
        # How the pipeline runs its encoder (PipelineSpec.encoding); without one, the encoder on its own with
        # its mask, padded to max_length.
        if encoding is None:
            encoding = PromptEncoding("plain", 300 if max_length is None else max_length)
        elif max_length is not None and max_length != encoding.max_length:
            raise ValueError(f"max_length={max_length} contradicts the encoding's {encoding.max_length}; "
                             f"give one of them")
        if metric not in METRICS:
            raise ValueError(f"calib.metric must be one of {METRICS}, got {metric!r}")
        if use_projection and projection is None and readout is None:
            raise ValueError("use_projection=True needs the denoiser's caption projection (SPEC §2)")
        if readout is not None and (metric != "mse" or token_mask):
            raise ValueError("SD3's CLIP features (context rows + pooled projection) are scored with calib.metric=mse "
                             "and calib.token_mask=false only; set those")
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.encoding = encoding
        self.max_length = encoding.max_length
        self.metric = metric
        self.use_projection = use_projection
        self.null_prompt = null_prompt
        self.token_mask = token_mask
        # Cut the padded tail (token_mask only) where valid tokens never attend to it: the encoder gets the mask.
        self._cut = token_mask and encoding.masks_encoder
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = next(encoder.parameters()).dtype
        self.projection = projection.to(self.device, self.dtype).eval() if (use_projection and projection) else None
        self.runner = StackRunner(encoder, granularity or default_granularity(encoder))
        # What the denoiser receives when it is more than the projected last_hidden_state (SD3's CLIP:
        # skrr/readout.py): it also reads the input state of position ``_tap``.
        self.readout = readout.to(self.device).eval() if readout is not None else None
        self._tap = readout.tap(self.runner.granularity) if readout is not None else None
        if readout is not None and readout.other_hidden.shape[0] != len(self.prompts) + 1:
            raise ValueError(f"the readout holds {readout.other_hidden.shape[0]} rows; it needs one per calibration "
                             f"prompt ({len(self.prompts)}) and one for ∅")
        self.batches = [self._tokenize(self.prompts[i:i + batch_size])
                        for i in range(0, len(self.prompts), batch_size)]
        self.null_batch = self._tokenize([""]) if null_prompt else None
        self.dense = self.encode(self.identity)
        self.dense_null = self._forward_features(self.identity, self.null_batch, [-1]) if null_prompt else None
        # Every prompt in order, then ∅: the rows of a PrefixStates.
        every = self.batches + ([self.null_batch] if null_prompt else [])
        self._row_ids = torch.cat([b.input_ids for b in every])
        self._row_mask = torch.cat([b.attention_mask for b in every]) if encoding.masks_encoder else None
        self._row_contexts: dict[int, list[tuple[slice, StackContext]]] = {}
        # Slot keys as small integers for the plan tree (0 = skipped), and the module of each code.
        self._codes: dict[Any, int] = {None: 0}
        self._code_modules: list[nn.Module | None] = [None]
        self.stats = ScoreStats()
        # Mean error each prompt gave the plans of the last ``discrepancies`` call (those of the first chunk that
        # scored it: in a beam race, the finished plans): the next call visits the prompts with the largest
        # errors first, so hopeless plans pass the bound sooner (work only, not D).
        # With kept candidate states (RestartStates) the first error of each prompt stays: a candidate
        # abandoned after the first x prompts holds kept states for those x only, and the next round's
        # candidates restart from them only if they visit the same prompts first (48-unit benchmark, 256
        # prompts: 4 % less work than re-ranking; with nothing kept, re-ranking does 10 % less on 64 prompts).
        self._prompt_error: list[float | None] = [None] * len(self.prompts)

    # ----------------------------------------------------------------- set-up
    def _tokenize(self, texts: Sequence[str]) -> Batch:
        # As the pipeline tokenizes: padded to max length (PixArt-Σ 300, SD3 256, FLUX 512; SPEC §1 trap 3).
        ids, mask = self.encoding.tokenize(self.tokenizer, texts)
        return Batch(ids.to(self.device), mask.to(self.device), self.encoding.masks_encoder)

    @property
    def identity(self) -> PruningPlan:
        return PruningPlan.identity(self.runner.signature, self.runner.granularity)

    @property
    def granularity(self) -> str:
        return self.runner.granularity

    @property
    def hash(self) -> str:
        return prompt_hash(self.prompts)

    def settings(self) -> dict[str, Any]:
        """What changes the discrepancy (part of the plan cache key)."""
        out = {"prompt_hash": self.hash, "num_prompts": len(self.prompts), "max_length": self.max_length,
               "encoding": self.encoding.describe(),
               "metric": self.metric, "use_projection": self.use_projection, "null_prompt": self.null_prompt,
               "token_mask": self.token_mask, "dtype": str(self.dtype).replace("torch.", "")}
        if self.readout is not None:
            out.update(self.readout.settings())
        return out

    @property
    def protected(self) -> tuple[int, ...]:
        """Positions a search must not skip (the readout's choice; none for T5)."""
        return self.readout.protected(self.granularity) if self.readout is not None else ()

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def features(self, last_hidden_state: torch.Tensor, tap_state: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """f = proj(E(c)) (or E(c) itself without projection); with a readout (SD3's CLIP), what it makes of the
        final state, the state at its tap, the ids and the prompt rows (-1 = ∅) of the sequences."""
        if self.readout is not None:
            index = torch.as_tensor(rows, device=self.device)
            return self.readout(last_hidden_state, tap_state, input_ids, torch.where(index < 0, len(self.prompts), index))
        return self.projection(last_hidden_state) if self.projection is not None else last_hidden_state

    @torch.no_grad()
    def _forward_features(self, plan: PruningPlan, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        """Features of one batch under ``plan`` by a full forward (rows: its prompt indices, [-1] for ∅)."""
        self.runner.check(plan)
        h, ctx = self.runner.prepare(batch.input_ids, batch.encoder_mask)
        if self._tap is None:
            return self.features(self.runner.finish(self.runner.run(plan, h, ctx)))
        tap = self.runner.run(plan, h, ctx, 0, self._tap)
        out = self.runner.run(plan, tap, ctx, self._tap)
        return self.features(self.runner.finish(out), tap, batch.input_ids, rows)

    def _batch_rows(self, b: int) -> list[int]:
        start = b * self.batch_size
        return list(range(start, start + self.batches[b].input_ids.shape[0]))

    def row_errors(self, dense: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per-prompt sums of element errors (float64, shape pruned.shape[:-2]) and elements per dense set.

        ``pruned`` may carry extra leading dims (several plans against one dense batch). Summing each prompt
        on its own and then the prompts exactly (``math.fsum``) makes D independent of how prompts are batched.
        Features stay in their dtype (the dense reference is the cached one, never copied); the float32 errors
        and their float64 sums are made ``ERROR_PIECE`` elements at a time, so scoring never copies a whole
        [plans, prompts, L, d] tensor to float32/float64 (T5-XXL: over 1 GiB per module call of bf16 features),
        and every prompt's sum is bit-identical to the one over the whole tensor.
        """
        flat = pruned.reshape(-1, *pruned.shape[-3:])  # [plans, N, L, d]: a view of the stacked features
        plans, prompts = flat.shape[:2]
        per_prompt = math.prod(flat.shape[2:])
        out = torch.empty(plans, prompts, dtype=torch.float64, device=pruned.device)
        if prompts * per_prompt <= ERROR_PIECE:  # whole plans per piece
            step = ERROR_PIECE // (prompts * per_prompt)
            for a in range(0, plans, step):
                out[a:a + step] = self._piece_errors(dense, flat[a:a + step], mask)
        else:  # prompts of one plan per piece
            step = max(1, ERROR_PIECE // per_prompt)
            for p in range(plans):
                for a in range(0, prompts, step):
                    out[p, a:a + step] = self._piece_errors(dense[a:a + step], flat[p, a:a + step], mask[a:a + step])
        if self.metric == "mse":
            count = int(mask.sum()) * dense.shape[-1] if self.token_mask else math.prod(dense.shape)
        else:
            count = int(mask.sum()) if self.token_mask else math.prod(dense.shape[:-1])
        return out.view(*pruned.shape[:-2]), count

    def _piece_errors(self, dense: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-prompt error sums (float64, shape pruned.shape[:-2]) of one piece: errors in float32, summed in
        float64 with ``sum(dtype=...)`` (torch casts the piece to sum it: the piece size bounds that copy)."""
        if self.metric == "mse":
            err = dense.float() - pruned.float()  # [..., N, L, d]; no copy of float32 features
            err.pow_(2)
            if self.token_mask:
                err.mul_(mask.unsqueeze(-1).to(err.dtype))
            return err.sum(dim=(-2, -1), dtype=torch.float64)
        # cosine distance per token (Table A13 ablation), as 1 - cos = |a/|a| - b/|b||^2 / 2: the same number,
        # but exactly 0 for identical features and never negative (which the early-abandon bound relies on).
        dense, pruned = dense.float(), pruned.float()
        unit_d = dense / dense.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        unit_p = pruned / pruned.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        err = 0.5 * (unit_d - unit_p).pow_(2).sum(dim=-1)  # [..., N, L]
        if self.token_mask:
            err.mul_(mask.to(err.dtype))
        return err.sum(dim=-1, dtype=torch.float64)

    def _mean_distance(self, outputs: Sequence[torch.Tensor], dense: Sequence[torch.Tensor],
                       batches: Sequence[Batch]) -> float:
        rows: list[float] = []
        count = 0
        for out, ref, b in zip(outputs, dense, batches):
            sums, n = self.row_errors(ref, out, b.attention_mask)
            rows += sums.tolist()
            count += n
        return _mean(rows, count)

    @torch.no_grad()
    def encode(self, plan: PruningPlan) -> list[torch.Tensor]:
        """Features of every calibration batch under ``plan``."""
        return [self._forward_features(plan, b, self._batch_rows(i)) for i, b in enumerate(self.batches)]

    @torch.no_grad()
    def discrepancy(self, plan: PruningPlan) -> float:
        """D(plan): distance to the dense features over the prompts, plus the same for ∅ (paper Eq. 4)."""
        self.stats.plans += 1
        runs = sum(s is not None for s in plan.slots)
        self.stats.token_evals += runs * sum(b.input_ids.numel() for b in self.batches)
        d = self._mean_distance(self.encode(plan), self.dense, self.batches)
        if self.null_prompt:
            self.stats.token_evals += runs * self.null_batch.input_ids.numel()
            null = self._forward_features(plan, self.null_batch, [-1])
            d += self._mean_distance([null], [self.dense_null], [self.null_batch])
        return d

    # ----------------------------------------------------------------- hidden states kept across calls
    def state_bytes(self) -> int:
        """Memory of one stored hidden state over every prompt and ∅ (a PrefixStates holds up to
        positions + 1 of them)."""
        width = self.encoder.get_input_embeddings().embedding_dim
        return self._row_ids.numel() * width * torch.finfo(self.dtype).bits // 8

    @torch.no_grad()
    def prefix_states(self, plan: PruningPlan, parent: PrefixStates | None = None, *,
                      max_tokens: int = MAX_TOKENS, restarts: RestartStates | None = None) -> PrefixStates:
        """``plan``'s hidden state at the input of every position, for every prompt and ∅.

        With ``parent`` (a base sharing a prefix with ``plan``) the states before the first differing
        position are the parent's tensors and only the positions from there on are computed; there, each
        prompt's state is taken from ``restarts`` where it was kept while the plan was scored (a new beam: it
        was scored on every prompt, from the position it restarted at on that prompt), so in the end mostly ∅
        runs.
        """
        self.runner.check(plan)
        keys = plan_keys(plan)
        start = parent.start(keys) if parent is not None else 0
        max_rows = max(1, max_tokens // self.max_length)
        if parent is not None:
            states = parent.states[:start + 1]
        else:
            states = [torch.cat([self.runner.prepare(self._row_ids[rows], self._rows_mask(rows))[0]
                                 for rows, _ in self._contexts(max_rows)])]
        total = self._row_ids.shape[0]
        for pos in range(start, len(keys)):
            h = states[-1]
            if keys[pos] is None:  # skipped: the same tensor (no copy)
                states.append(h)
                continue
            module = self._code_modules[self._code(keys[pos])]
            have, kept = self._kept_rows(keys, pos + 1, restarts)
            if not have:  # every row runs
                self.stats.token_evals += h.shape[0] * h.shape[1]
                states.append(torch.cat([module(h[rows], ctx) for rows, ctx in self._contexts(max_rows)]))
                continue
            # Rows whose state at the input of pos + 1 was kept while the plan was scored are copied; the
            # others (∅, and prompts the plan restarted past this position on) run.
            out = torch.empty_like(h)
            out[have] = kept
            need = torch.tensor(sorted(set(range(total)) - set(have)), dtype=torch.long, device=h.device)
            self.stats.token_evals += need.numel() * h.shape[1]
            for rows in need.split(max_rows):
                out[rows] = module(h[rows], self.runner.prepare(self._row_ids[rows], self._rows_mask(rows))[1])
            states.append(out)
        return PrefixStates(keys, states)

    def _kept_rows(self, keys: Sequence[Any], pos: int, restarts: RestartStates | None
                   ) -> tuple[list[int], torch.Tensor | None]:
        """The prompts whose state at the input of ``pos`` (of the plan with slot keys ``keys``) ``restarts``
        kept at full length (not with a cut input), and those states stacked."""
        entry = None if restarts is None or self._cut else restarts.previous.get(tuple(keys[:pos]))
        if entry is None:
            return [], None
        rows = [k for k in range(len(self.prompts)) if entry.covers([k], self.max_length)]
        return rows, torch.stack([entry.state(k, self.max_length) for k in rows]) if rows else None

    def _rows_mask(self, rows: slice) -> torch.Tensor | None:
        return None if self._row_mask is None else self._row_mask[rows]

    def _contexts(self, max_rows: int) -> list[tuple[slice, StackContext]]:
        """Row slices of at most ``max_rows`` prompts (∅ last) and their masks, built once per size."""
        if max_rows not in self._row_contexts:
            total = self._row_ids.shape[0]
            self._row_contexts[max_rows] = [
                (rows, self.runner.prepare(self._row_ids[rows], self._rows_mask(rows))[1])
                for rows in (slice(a, min(a + max_rows, total)) for a in range(0, total, max_rows))]
        return self._row_contexts[max_rows]

    # ----------------------------------------------------------------- many plans at once (search)
    @torch.no_grad()
    def discrepancies(self, plans: Sequence[PruningPlan], bound: float = math.inf, *, keep: int | None = None,
                      bases: Sequence[PrefixStates] = (), max_tokens: int = MAX_TOKENS,
                      progress: Callable[[int], None] | None = None,
                      restarts: RestartStates | None = None) -> list[float | None]:
        """D of every plan, as ``discrepancy`` computes it, or None for a plan whose D is proven > ``bound``
        or, with ``keep``, proven to exceed the D of ``keep`` other plans (it cannot be among the ``keep``
        lowest: Alg. 1's beam).

        The exact speed-ups of the module docstring. Errors are summed per prompt and then exactly
        (``math.fsum``), as in ``discrepancy``, so the numbers agree to the last bit whenever a prompt's
        features do; BLAS may round a row differently when it is stacked with other rows (and with
        ``token_mask`` the input is shorter), so in general they agree up to float rounding.
        Each plan starts from the base in ``bases`` it shares the longest prefix with (from the embeddings
        when none shares any). With ``keep``, every plan is first scored on ∅, the 2 x ``keep`` lowest there
        are finished, and the ``keep``-th of their D bounds the others. ``progress(n)`` is called as plans
        finish; ``max_tokens`` caps rows x tokens per module call. ``restarts`` (the beam search's): a plan
        also restarts, prompt by prompt, from a state kept there in the last round when that is later than
        its base, and with ``keep`` the states the next round can restart from are captured into it.
        """
        for p in plans:
            if p.encoder != self.runner.signature or p.granularity != self.granularity:
                self.runner.check(p)  # raises the one-line reason
        self.stats.plans += len(plans)
        n = len(plans)
        codes, inits, starts, keys = [], [], [], []
        # With a cut input (token_mask, masked encoder) the dense reference is recomputed on it: the identity, last.
        for p in list(plans) + ([self.identity] if self._cut else []):
            own = plan_keys(p)
            start, base = max(((b.start(own), -i) for i, b in enumerate(bases)), default=(0, 0))
            if self._tap is not None:  # the readout reads the state at the tap: start no later (exact, 2 units)
                start = min(start, self._tap)
            # Positions before the start are already in the base's state: nothing runs there.
            codes.append([self._code(k) for k in own])
            inits.append((-base, start) if start else None)
            starts.append(start)
            keys.append(own)
        code_matrix = np.array(codes, dtype=np.int64)
        # Later starts kept from the last round (per prompt: a kept state holds the prompts it was scored on).
        later = [restarts.lookups(own, start, self._tap) if restarts else [] for own, start in zip(keys, starts)]
        grabs: dict[int, list[tuple[int, _Restart]]] = {}  # plan -> (position, entry) to capture
        null_kept: dict[tuple[Any, ...], _Restart] = {}  # the race's ∅ states, by prefix
        sums_p: list[list[float]] = [[] for _ in range(n)]
        sums_n: list[list[float]] = [[] for _ in range(n)]
        count_p = self._total_count(self.batches)
        count_n = self._total_count([self.null_batch]) if self.null_prompt else 0
        done = [False] * n
        max_rows = max(1, max_tokens // self.max_length)
        seen: dict[int, float] = {}
        schedules: dict[tuple[int, ...], _Schedule] = {}
        race = keep is not None and n > 2 * keep

        def partial(i: int) -> float:
            # Every error term is >= 0, so the partial sums bound the final D from below.
            return _mean(sums_p[i], count_p) + _mean(sums_n[i], count_n)

        def run(chunk: _Chunk, members: list[int]) -> None:
            rows = members + ([n] if self._cut else [])
            length = chunk.input_ids.shape[1]
            begin, init = {}, {}
            for i in rows:  # each plan's latest start for this chunk's prompts
                begin[i], init[i] = starts[i], inits[i]
                for p, entry in later[i]:
                    if entry.covers(chunk.indices, length):
                        begin[i], init[i] = p, (entry, p)
                        break
            # States to keep (RestartStates), each from one plan that holds it: from its start on, the tree
            # holds a plan's state at every position.
            supplied: dict[int, tuple[int, int, Any]] = {}  # one plan per entry: the first that holds it
            if chunk.null and race and restarts is not None:
                # ∅ runs before the possible beams are known: keep every state of its tree for now (aim()
                # hands the wanted ones over, the rest is freed after the race).
                for r, i in enumerate(members):
                    for p in range(begin[i], len(keys[i]) + 1):
                        entry = null_kept.setdefault(tuple(keys[i][:p]), _Restart())
                        supplied.setdefault(id(entry), (r, p, entry))
            for r, i in enumerate(rows):
                for p, e in (grabs.get(i, ()) if not chunk.null else ()):
                    if p >= begin[i] and e.serves and id(e) not in supplied:
                        supplied[id(e)] = (r, p, e)
            wanted = tuple(supplied.values())
            key = (tuple(members), tuple(init[i] for i in rows), tuple((r, p, id(e)) for r, p, e in wanted))
            if key not in schedules:  # the tree depends on the plans and their starts: rebuild on a change
                matrix = code_matrix[rows].copy()
                for r, i in enumerate(rows):
                    matrix[r, :begin[i]] = 0  # already in the starting state: nothing runs there
                schedules[key] = self._schedule(matrix, [init[i] for i in rows], wanted)
            sums = self._run_tree(chunk, schedules[key], max_rows, bases, restarts)  # [members, prompts], float64
            if restarts is not None:
                self.stats.restart_peak = max(self.stats.restart_peak, restarts.bytes)
            target = sums_n if chunk.null else sums_p
            for i, row in zip(members, sums.tolist()):  # one device sync per chunk
                target[i] += row
            if not chunk.null:
                for k, err in zip(chunk.indices, sums.mean(dim=0).tolist()):
                    seen.setdefault(k, err)

        def prune(members: list[int]) -> list[int]:
            kept = [i for i in members if partial(i) <= bound]
            if progress and len(kept) < len(members):
                progress(len(members) - len(kept))
            self.stats.abandoned += len(members) - len(kept)
            for i in set(members) - set(kept):
                done[i] = True
                if restarts is not None:  # no longer a possible beam: nothing to keep for its candidates
                    restarts.release(tuple(keys[i]))
            return kept

        def aim(targets: list[int]) -> None:
            # Capture the states that the next-round candidates of these possible beams restart from
            # (restart_positions), from whichever plan with that prefix is scored on a prompt.
            if restarts is None:
                return
            for f in targets:
                for pos in range(starts[f] + 1, len(keys[f]) + 1):  # its own states: a new beam's, ready
                    restarts.want(tuple(keys[f][:pos]), tuple(keys[f]))
                where = restart_positions(code_matrix[:n], code_matrix[f])
                for i in np.flatnonzero(where > 0).tolist():
                    restarts.want(tuple(keys[i][:where[i]]), tuple(keys[f]))
            for prefix, entry in restarts.current.items():
                if -1 not in entry.rows and (null := null_kept.get(prefix)) is not None and -1 in null.rows:
                    restarts.put(entry, [-1], null.state(-1, null.rows[-1][0].shape[1])[None])
            grabs.clear()
            wants = restarts.current
            for pos in sorted({len(w) for w in wants}):
                for i in range(n):
                    if (entry := wants.get(tuple(keys[i][:pos]))) is not None:
                        grabs.setdefault(i, []).append((pos, entry))

        def rank() -> None:
            # The prompt order from here on (see __init__): each prompt's mean error over the plans of the
            # first chunk that scored it in this call (the race's finished plans, when there is a race).
            for k, err in seen.items():
                if restarts is None or self._prompt_error[k] is None:
                    self._prompt_error[k] = err

        def per_chunk(members: list[int], bounded: bool) -> Callable[[], int]:
            # Prompts share module calls up to max_tokens; with a bound, at most 1/BOUND_STEPS of them at a
            # time so that hopeless plans are still dropped early (one at a time below 2 x BOUND_STEPS prompts).
            cap = len(self.prompts) // BOUND_STEPS if bounded else len(self.prompts)
            return lambda: max(1, min(max_rows // (len(members) + 1), cap))

        alive = list(range(n))
        chunks = self._chunks(per_chunk(alive, bound < math.inf or race))
        if race:
            first = next(chunks)  # ∅ (or the first prompts without it): its error ranks the plans
            run(first, alive)
            ranked = sorted(alive, key=lambda i: (partial(i), i))
            finish, alive[:] = ranked[:2 * keep], sorted(ranked[2 * keep:])
            aim(finish)
            for chunk in self._chunks(per_chunk(finish, False), skip=first.indices):
                run(chunk, finish)
            bound = min(bound, sorted(partial(i) for i in finish)[keep - 1])
            alive[:] = prune(alive)
            aim(alive)  # every plan still alive may become a beam
            rank()  # the rest of this call already visits the prompts in the finished plans' order
            if restarts is not None:
                for entry in null_kept.values():
                    restarts.drop(entry)
                null_kept.clear()
        scored = [k for k in first.indices if k >= 0] if race else []
        complete = list(finish) if race else []
        for chunk in chunks:
            if not alive:
                break
            run(chunk, alive)
            scored += chunk.indices
            if bound < math.inf:
                alive[:] = prune(alive)
            if race and alive:
                scale = len(self.prompts) / len(scored)
                est = {i: _mean(sums_n[i], count_n) + scale * _mean(sums_p[i], count_p) for i in alive}
                extra = sorted((i for i in alive if est[i] < bound), key=lambda i: (est[i], i))[:keep]
                if extra:
                    for c in self._chunks(per_chunk(extra, False), skip=scored + [-1]):
                        run(c, extra)
                    complete += extra
                    alive[:] = [i for i in alive if i not in extra]
                    bound = min(bound, sorted(partial(i) for i in complete)[keep - 1])
                    alive[:] = prune(alive)
        rank()
        finished = [i for i in range(n) if not done[i]]
        if progress and finished:
            progress(len(finished))
        # The same arithmetic as discrepancy(): exact sums of per-prompt sums, over all elements.
        return [None if done[i] else partial(i) for i in range(n)]

    def _total_count(self, batches: Sequence[Batch]) -> int:
        """Number of error elements over some batches (what the mean divides by)."""
        width = self.dense[0].shape[-1] if self.metric == "mse" else 1
        if self.token_mask:
            return sum(int(b.attention_mask.sum()) for b in batches) * width
        # Feature rows per prompt: the token positions (a readout may add rows: SD3's CLIP, skrr/readout.py).
        return sum(b.input_ids.shape[0] for b in batches) * self.dense[0].shape[1] * width

    def _chunks(self, size: Callable[[], int], skip: Sequence[int] = ()) -> Iterator[_Chunk]:
        """∅ first (its one term weighs as much as all prompts together), then the prompts, ``size()`` at a
        time, those with the largest errors first (``_prompt_error``: so hopeless plans pass the bound sooner;
        never-scored ones last, in order).

        A chunk of one prompt keeps every mask at batch size 1, so it broadcasts over the stacked tree nodes;
        with several prompts the mask is repeated per node. ``skip``: prompt indices already scored (-1: ∅).
        """
        if self.null_prompt and -1 not in skip:
            yield self._chunk([-1], self.null_batch.input_ids, self.null_batch.attention_mask, self.dense_null)
        where = [(b, i) for b, batch in enumerate(self.batches) for i in range(batch.input_ids.shape[0])]
        order = sorted((k for k in range(len(where)) if k not in skip),
                       key=lambda k: (-(self._prompt_error[k] or 0.0), k))
        start = 0
        while start < len(order):
            picked = order[start:start + size()]
            start += len(picked)
            parts = [(self.batches[b], self.dense[b], i) for b, i in (where[k] for k in picked)]
            yield self._chunk(picked, torch.cat([batch.input_ids[i:i + 1] for batch, _, i in parts]),
                              torch.cat([batch.attention_mask[i:i + 1] for batch, _, i in parts]),
                              torch.cat([dense[i:i + 1] for _, dense, i in parts]))

    def _chunk(self, indices: list[int], ids: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor) -> _Chunk:
        if not self._cut:  # SD3/FLUX: valid tokens attend to the padding, which then is part of the input
            return _Chunk(indices, ids, mask, dense)
        # Valid tokens never attend to the padded tail and the tail is not scored: cut it off (exact up to
        # rounding; the dense side is recomputed on the same cut input by the tree).
        valid = mask.any(dim=0).nonzero()
        length = int(valid.max()) + 1 if valid.numel() else 1
        return _Chunk(indices, ids[:, :length], mask[:, :length], None)

    def _schedule(self, codes: np.ndarray, inits: list[Any], grabs: Sequence[tuple[int, int, Any]] = ()) -> _Schedule:
        """The prefix tree of some plans (slot codes [plans, positions] and starting states): a node is a set of
        plans that start from the same state and agree on every position so far, and so share one hidden
        state (SPEC §2: reuse the hidden state of the shared prefix); at each position a node splits by what
        its plans run there, a skip keeps the state as is, and each module runs once on all nodes that need
        it (candidate batching). ``grabs``: (plan row, position, entry): the state of that plan at the input
        of that position is captured into the entry (RestartStates).
        """
        starts = list(dict.fromkeys(inits))
        node = np.array([starts.index(init) for init in inits], dtype=np.int64)  # each plan's node
        nodes = len(starts)
        skip = len(self._code_modules)  # sorts after every module
        steps: list[_Step] = []
        tap_step, tap_nodes = None, None
        at: dict[int, list[tuple[int, Any]]] = {}
        for row, pos, entry in grabs:
            at.setdefault(pos, []).append((row, entry))
        taken: dict[int, list[tuple[int, Any]]] = {}
        for pos, column in enumerate(codes.T):
            if pos == self._tap:  # every plan has started by now (discrepancies caps the starts at the tap)
                tap_step, tap_nodes = len(steps), node.tolist()
            for row, entry in at.get(pos, ()):  # the node holds the state at the input of pos
                taken.setdefault(len(steps), []).append((int(node[row]), entry))
            if not column.any():  # every plan skips here (or has not started yet): nothing to do
                continue
            column = np.where(column == 0, skip, column)
            # New nodes = distinct (what runs here, old node), ordered by module then old node, skips last:
            # the order in which _run_tree concatenates the outputs of the step.
            pairs, node = np.unique(column * nodes + node, return_inverse=True)
            code, old = np.divmod(pairs, nodes)
            runs, keep = [], None
            for segment in np.split(np.arange(len(pairs)), np.flatnonzero(np.diff(code)) + 1):
                rows = _rows(old[segment].tolist(), nodes, self.device)
                if code[segment[0]] == skip:
                    keep = rows
                else:
                    runs.append((self._code_modules[code[segment[0]]], rows))
            steps.append(_Step(runs, keep))
            nodes = len(pairs)
        if self._tap is not None and tap_step is None:  # the tap is the stack's output (no later position)
            tap_step, tap_nodes = len(steps), node.tolist()
        for row, entry in at.get(codes.shape[1], ()):
            taken.setdefault(len(steps), []).append((int(node[row]), entry))
        return _Schedule(starts, steps, node.tolist(), tap_step, tap_nodes, taken)

    def _code(self, key: Any) -> int:
        if key not in self._codes:
            self._codes[key] = len(self._code_modules)
            self._code_modules.append(self.runner.module_for(Slot(key[0], key[1], key[2])))
        return self._codes[key]

    def _run_tree(self, chunk: _Chunk, schedule: _Schedule, max_rows: int, bases: Sequence[PrefixStates],
                  restarts: RestartStates | None = None) -> torch.Tensor:
        """Error sums [plans, prompts] (float64) of the scheduled plans on one chunk.

        The hidden state holds one block of the chunk's prompts per tree node, node-major. A starting state is
        the embeddings (None), a base's state ((base, position)) or a kept restart state ((entry, position)).
        """
        runner = self.runner
        h, ctx = runner.prepare(chunk.input_ids, chunk.attention_mask if self.encoding.masks_encoder else None)
        prompts, length = h.shape[0], h.shape[1]
        if schedule.inits != [None]:
            # The chunk's rows of each stored state (∅ is the last row; token_mask: the cut length).
            rows = torch.tensor([self._row_ids.shape[0] - 1 if k < 0 else k for k in chunk.indices],
                                device=h.device)
            h = torch.cat([h if init is None else
                           torch.stack([init[0].state(k, length) for k in chunk.indices])
                           if isinstance(init[0], _Restart) else
                           bases[init[0]].states[init[1]].index_select(0, rows)[:, :length]
                           for init in schedule.inits])
        per_call = max(1, max_rows // prompts)  # nodes per module call
        contexts: dict[int, StackContext] = {}

        def context(nodes: int) -> StackContext:
            # A [1, ...] mask broadcasts over the nodes; a per-prompt mask is repeated for each node.
            if ctx.mask is None or ctx.mask.shape[0] == 1 or nodes == 1:
                return ctx
            if nodes not in contexts:
                contexts[nodes] = StackContext(ctx.mask.repeat(nodes, *([1] * (ctx.mask.dim() - 1))), ctx.bias,
                                               ctx.kwargs)
            return contexts[nodes]

        def capture(j: int) -> None:
            if grabs := schedule.grabs.get(j):
                nodes = h.view(-1, prompts, *h.shape[1:])
                for node, entry in grabs:
                    restarts.put(entry, chunk.indices, nodes[node])

        tapped = None
        for number, step in enumerate(schedule.steps):
            capture(number)
            if number == schedule.tap_step:
                tapped = h
            nodes = h.view(-1, prompts, *h.shape[1:])
            outs = []
            for module, rows in step.runs:
                x = _take(nodes, rows)
                for start in range(0, x.shape[0], per_call):
                    part = x[start:start + per_call].flatten(0, 1)
                    self.stats.token_evals += part.shape[0] * length
                    outs.append(module(part, context(part.shape[0] // prompts)))
            if step.keep is not None:
                outs.append(_take(nodes, step.keep).flatten(0, 1))
            h = outs[0] if len(outs) == 1 else torch.cat(outs)
        capture(len(schedule.steps))
        if schedule.tap_step is not None and tapped is None:
            tapped = h
        nodes = h.view(-1, prompts, *h.shape[1:])
        leaves = schedule.leaves
        ref = chunk.dense
        if ref is None:  # token_mask: the dense reference on the same trimmed input is the last scheduled plan
            ref = self.features(runner.finish(nodes[leaves[-1]]))
            leaves = leaves[:-1]
        index = torch.tensor(leaves, device=h.device)
        taps = None
        if tapped is not None:
            taps = tapped.view(-1, prompts, *tapped.shape[1:])
            tap_index = torch.tensor(schedule.tap_nodes[:len(leaves)], device=h.device)
        sums = []
        for start in range(0, len(leaves), per_call):
            x = nodes.index_select(0, index[start:start + per_call])
            if taps is None:
                feats = self.features(runner.finish(x.flatten(0, 1)))
            else:
                tap = taps.index_select(0, tap_index[start:start + per_call]).flatten(0, 1)
                feats = self.features(runner.finish(x.flatten(0, 1)), tap, chunk.input_ids, chunk.indices)
            sums.append(self.row_errors(ref, feats.view(x.shape[0], prompts, *feats.shape[1:]),
                                        chunk.attention_mask)[0])
        return torch.cat(sums)


def _mean(sums: list[float], count: int) -> float:
    """Exact sum of per-prompt error sums / element count (0 for an absent term, e.g. no ∅)."""
    return math.fsum(sums) / count if count else 0.0


def plan_keys(plan: PruningPlan) -> list[Any]:
    """What runs at each position of a plan, hashable (None = skipped): plans agree where their keys do."""
    return [_slot_key(s) for s in plan.slots]


def _rows(rows: list[int], total: int, device: torch.device) -> slice | torch.Tensor:
    """A row selection: a slice when the rows are consecutive (no gather needed), else an index tensor."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows)) if len(rows) < total else slice(None)
    return torch.tensor(rows, device=device)


def _take(h: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return h[rows] if isinstance(rows, slice) else h.index_select(0, rows)


def _slot_key(slot: Slot | None) -> Any:
    """Hashable identity of what runs at a position (None = skipped)."""
    return None if slot is None else (slot.source, slot.part, slot.merged_from)
