"""examples/text/block.py: MiniLM's last block as a certifiable model (equal to the encoder, traced,
sound by sampling over its feed-forward and attention weights, in float64)."""

from __future__ import annotations

import torch

import lid_engine as le
from examples.text import data as td
from examples.text.block import from_encoder, prefix_states
from lid_engine.bounds import ibp
from lid_engine.model_graph import ModelGraph

TEXTS = ["A man is eating food.", "The stock market fell sharply today.", "an utterly charming and hilarious film",
         "flat, lifeless and far too long"]


def block_model():
    _, encoder = td._load_encoder()
    torch.manual_seed(0)
    return from_encoder(encoder, torch.nn.Linear(384, 2)), torch.from_numpy(prefix_states(TEXTS, 16))


def test_the_block_reproduces_the_encoders_sentence_embeddings(tmp_path):
    model, x = block_model()
    with torch.no_grad():
        mine = model.embed(x)
    theirs = torch.from_numpy(td.embed(TEXTS, cache_dir=tmp_path, progress=False))
    assert float((mine - theirs).abs().max()) < 1e-5
    assert isinstance(ibp.check_supported(model), ModelGraph)


def test_domains_over_the_blocks_weights_are_sound_by_sampling():
    model, x = block_model()
    model = model.double()
    x = x.double()
    for parts, radius in ((["ffn_in", "ffn_out", "head"], 1e-4), (["query", "key", "value", "attn_out"], 1e-6)):
        mask = le.width_mask(model, parts)
        box = le.Box({n: p.detach() - radius * (~mask[n]).double() for n, p in model.named_parameters()},
                     {n: p.detach() + radius * (~mask[n]).double() for n, p in model.named_parameters()})
        report = le.testing.check_soundness(model, box, x, samples=30, dtypes=(torch.float64,))
        assert report.violations == 0 and report.nominal_enclosed, (parts, report)
