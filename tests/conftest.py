"""Shared fixtures: tiny random encoders built from configs (T5 v1.1 gated-GELU, CLIP text, BERT), offline."""
from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from skrr.tiny import tiny_bert, tiny_clip_text, tiny_t5  # noqa: E402

# Tiny tensors: one thread is faster than two fighting over the CI machine's two cores.
torch.set_num_threads(1)


@pytest.fixture
def t5():
    """A 4-block T5 v1.1-style encoder (gated-GELU, relative bias in block 0), eval mode, fp32."""
    return tiny_t5(num_layers=4, seed=0)


@pytest.fixture
def clip_text():
    return tiny_clip_text(num_layers=3, seed=0)


@pytest.fixture
def bert():
    return tiny_bert(num_layers=3, seed=0)


@pytest.fixture
def tokens():
    """A padded batch of token ids with its mask (second row shorter)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    return ids, mask


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo the logging set-up of entry points run in-process (Hydra's job logging, a script's basicConfig):
    a handler left on a logger would write to this test's captured stream after pytest has closed it."""
    def loggers() -> list[logging.Logger]:
        named = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
        return [logging.getLogger(), *named]

    before = {id(lg): (lg, list(lg.handlers)) for lg in loggers()}
    yield
    for lg, handlers in before.values():
        lg.handlers[:] = handlers
