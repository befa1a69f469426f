"""all-MiniLM-L6-v2's last encoder block + pooling + a head, as one certifiable model.

A LID over the encoder itself needs the encoder in the model. Certifying all six blocks over their
parameters would be slow and loose; the usual fine-tuning target is the last block. So the first
five blocks (and the embeddings) stay frozen and run once per text (:func:`prefix_states`, what
``transformers`` computes); :class:`BlockHead` re-implements the sixth block — BERT's self-attention
(12 heads), its output projection + LayerNorm, the GELU feed-forward + LayerNorm — followed by the
sentence-transformers pooling (mean over the attention mask, L2 normalisation) and a classification
head, in plain torch that lidgate traces. Loaded from the Hugging Face weights it reproduces the
encoder's sentence embeddings (tested).

The model's one input packs the frozen prefix's hidden states and the attention mask:
``x[..., :384]`` the states entering block 6, ``x[..., 384]`` the mask (1 = token, 0 = padding), shape
``(N, L, 385)``. Masked keys get a score of −10⁴ (BERT's original additive mask: e^−10⁴ is 0 in
float32, as Hugging Face's most negative float is; a finite constant keeps the bounds finite).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIDDEN, HEADS, FFN = 384, 12, 1536
MASK_SCORE = -1e4


class BlockHead(nn.Module):
    """Block 6 of all-MiniLM-L6-v2 + mean pooling + L2 normalisation + a linear head."""

    def __init__(self, classes: int = 2, eps: float = 1e-12):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.attn_out = nn.Linear(HIDDEN, HIDDEN)
        self.ln1 = nn.LayerNorm(HIDDEN, eps=eps)
        self.ffn_in = nn.Linear(HIDDEN, FFN)
        self.ffn_out = nn.Linear(FFN, HIDDEN)
        self.ln2 = nn.LayerNorm(HIDDEN, eps=eps)
        self.head = nn.Linear(HIDDEN, classes)

    def heads(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], HEADS, HIDDEN // HEADS).transpose(1, 2)

    def embed(self, x: Tensor) -> Tensor:
        """The sentence embedding (N, 384) after block 6, pooling and normalisation."""
        h, mask = x[:, :, :HIDDEN], x[:, :, HIDDEN]
        q, k, v = self.heads(self.query(h)), self.heads(self.key(h)), self.heads(self.value(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(HIDDEN // HEADS)
        scores = scores + ((1 - mask) * MASK_SCORE)[:, None, None, :]
        ctx = torch.softmax(scores, dim=-1) @ v
        ctx = ctx.transpose(1, 2).reshape(h.shape[0], h.shape[1], HIDDEN)
        h = self.ln1(h + self.attn_out(ctx))
        h = self.ln2(h + self.ffn_out(F.gelu(self.ffn_in(h))))
        pooled = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(pooled, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def from_encoder(encoder, head: nn.Linear) -> BlockHead:
    """A :class:`BlockHead` holding the last block of a loaded ``transformers`` BertModel and ``head``."""
    layer = encoder.encoder.layer[-1]
    out = BlockHead(head.out_features, eps=layer.output.LayerNorm.eps)
    pairs = [(out.query, layer.attention.self.query), (out.key, layer.attention.self.key),
             (out.value, layer.attention.self.value), (out.attn_out, layer.attention.output.dense),
             (out.ln1, layer.attention.output.LayerNorm), (out.ffn_in, layer.intermediate.dense),
             (out.ffn_out, layer.output.dense), (out.ln2, layer.output.LayerNorm), (out.head, head)]
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    return out.eval()


def prefix_states(texts: list[str], max_tokens: int, batch_size: int = 64) -> np.ndarray:
    """The hidden states entering the last block, with the attention mask packed as the last channel:
    float32 ``(n, max_tokens, 385)`` (texts truncated / padded to ``max_tokens`` tokens). Runs the
    bundled encoder (offline); a progress bar shows the work."""
    from tqdm.auto import tqdm

    from examples.text.data import _load_encoder

    tokenizer, model = _load_encoder()
    out = np.zeros((len(texts), max_tokens, HIDDEN + 1), dtype=np.float32)
    with torch.no_grad():
        for s in tqdm(range(0, len(texts), batch_size), desc="prefix states (blocks 1-5)", unit="batch"):
            enc = tokenizer(texts[s:s + batch_size], padding="max_length", truncation=True, max_length=max_tokens,
                            return_tensors="pt")
            hidden = model(**enc, output_hidden_states=True).hidden_states[-2]  # the input of the last block
            out[s:s + len(hidden), :, :HIDDEN] = hidden.numpy()
            out[s:s + len(hidden), :, HIDDEN] = enc["attention_mask"].numpy()
    return out
