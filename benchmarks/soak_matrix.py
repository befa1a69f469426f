"""The architecture matrix of the soundness soak (``benchmarks/soak.py``): small models that together
use every layer and op the bound engine supports, each with its input, labels and the parameters
that get width.

Chains (``nn.Sequential``) run on the chain engine, everything else is traced (``model_graph``). The
models are random, not trained: soundness does not depend on the weights, but every parameter is
moved off its default (LayerNorm weights ≠ 1, biases ≠ 0, BatchNorm statistics seeded) so a relative
radius gives every coordinate width and no layer is an identity.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lid_engine as le

N_EXAMPLES = 8  # examples per input batch: the bounds are per example, so a few suffice


@dataclass(frozen=True)
class Architecture:
    """One model family of the matrix. ``width``: the parameter names (or module paths) that get width
    (``None``: all of them), for the partial domains."""

    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], Tensor]
    covers: str  # the layers and ops it exercises, for the report
    width: Callable[[nn.Module], list[str]] | None = None

    def instance(self) -> tuple[nn.Module, Tensor, Tensor, list[str] | None]:
        """The seeded model (eval mode), input ``x``, labels ``y`` and the names with width."""
        seed = zlib.crc32(self.name.encode()) % 2**31  # str hash() differs per process
        torch.manual_seed(seed)
        model = self.build()
        _perturb(model, torch.Generator().manual_seed(seed + 1))
        model.eval()
        x = self.make_input(torch.Generator().manual_seed(seed + 2))
        with torch.no_grad():
            y = model(x).argmax(1)
        y[::4] = (y[::4] + 1) % model(x[:1]).shape[1]  # some examples misclassified: negative margins too
        names = None if self.width is None else _parameter_names(model, self.width(model))
        return model, x, y, names


def _perturb(model: nn.Module, gen: torch.Generator) -> None:
    """Every parameter moved by seeded noise; BatchNorm running statistics seeded."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _parameter_names(model: nn.Module, only: list[str]) -> list[str]:
    mask = le.width_mask(model, only)  # True = kept at zero width
    return [n for n, keep in mask.items() if not bool(keep.all())]


def _normal(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn((N_EXAMPLES, *shape), generator=g)


def _ids(vocab: int, tokens: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(0, vocab, (N_EXAMPLES, tokens), generator=g)


# ------------------------------------------------------------------------------------ graph models
class ResidualMLP(nn.Module):
    """LayerNorm, GELU, SiLU, tanh, sigmoid, a gate parameter, a mean, concatenation, a residual add."""

    def __init__(self, d: int = 8, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.ln = nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gate = nn.Parameter(torch.full((d,), 0.5))
        self.head = nn.Linear(2 * d, classes)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.ff2(F.gelu(self.ff1(self.ln(h)))) * self.gate
        pooled = torch.sigmoid(h).mean(-1, keepdim=True)
        return self.head(torch.cat([F.silu(h), torch.tanh(h) - pooled], dim=1))


class ResidualCNN(nn.Module):
    """Convolutions, BatchNorm2d, F.relu, a residual add, average pooling, flatten."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.c2(F.relu(self.c1(h))))
        return self.fc(torch.flatten(self.pool(h), 1))


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock style: an in-place ReLU module and ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        identity = x
        out = self.relu(self.c1(x))
        out = self.c2(out)
        out += identity
        out = self.relu(out)
        return self.head(torch.flatten(out, 1))


class TokenMixer(nn.Module):
    """(N, L, d) tokens: a parameter matrix through matmul, view/transpose/permute, LayerNorm, a token mean."""

    def __init__(self, tokens: int = 4, d: int = 6, classes: int = 2):
        super().__init__()
        self.tokens, self.d = tokens, d
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.mix = nn.Linear(tokens, tokens)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = x.view(x.shape[0], self.tokens, self.d)
        t = self.ln(t + F.gelu(t @ self.w))
        t = t + self.mix(t.transpose(1, 2)).permute(0, 2, 1) / 2
        return self.head(t.mean(1))


class TinyEncoder(nn.Module):
    """A transformer encoder block on token ids: embedding + positions, two-head self-attention (scores
    a product of two interval matrices, softmax; or ``F.scaled_dot_product_attention``), residuals,
    LayerNorm, a GELU feed-forward, masked mean pooling, a head."""

    def __init__(self, vocab: int = 20, tokens: int = 5, d: int = 8, heads: int = 2, classes: int = 3,
                 sdpa: bool = False):
        super().__init__()
        self.tokens, self.d, self.heads, self.sdpa = tokens, d, heads, sdpa
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(tokens, d) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)
        self.register_buffer("keep", torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))  # the last token is padding

    def split(self, t):
        return t.view(t.shape[0], self.tokens, self.heads, self.d // self.heads).transpose(1, 2)

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / (self.d // self.heads) ** 0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(ids.shape[0], self.tokens, self.d)
        h = self.ln1(h + self.o(a))
        h = self.ln2(h + self.ff2(F.gelu(self.ff1(h))))
        pooled = (h * self.keep[:, None]).sum(1) / self.keep.sum()
        return self.head(pooled)


class FunctionalOps(nn.Module):
    """The ops no other row uses: activation modules (Tanh, Sigmoid, SiLU, GELU, Softmax),
    functional forms (F.linear, F.layer_norm, F.embedding, F.normalize, F.dropout in eval), division
    by a varying positive interval, negation, subtraction, sums, squeeze/unsqueeze, contiguous, size, concat."""

    def __init__(self, d: int = 6, classes: int = 3):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d, 5) * 0.4), nn.Parameter(torch.randn(d) * 0.1)
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.table = nn.Parameter(torch.randn(4, d) * 0.3)
        self.act = nn.Sequential(nn.Tanh(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.SiLU())
        self.sig = nn.Sigmoid()
        self.soft = nn.Softmax(dim=-1)
        self.den = nn.Linear(d, d)
        self.head = nn.Linear(2 * d + 1, classes)

    def forward(self, x):
        h = F.layer_norm(F.linear(x, self.w1, self.b1), (self.w1.shape[0],), self.ln_w, self.ln_b)
        h = h + F.embedding(torch.zeros(1, dtype=torch.long), self.table).squeeze(0)  # a learnt offset row
        a = self.act(F.dropout(h, p=0.2, training=False))
        q = a / (2.0 + torch.tanh(self.den(h)))  # the divisor varies with the parameters, stays in [1, 3]
        s = self.soft(-q).unsqueeze(1).squeeze(1)
        n = F.normalize(q - self.sig(h), dim=1).contiguous().view(x.size(0), -1)
        total = (s * h).sum(dim=1, keepdim=True)
        return self.head(torch.concat([s, n, total], dim=1))


def _lora_mlp() -> nn.Module:
    """A GELU MLP with LoRA adapters on all three linear layers, non-zero B (as after adapter training)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return le.add_lora(model, ["0", "2", "4"], rank=3)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(18, 4),
    )


def _bn_pool_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 5),
    )


def _bn1d_nested() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8),
        nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Sequential(nn.Linear(8, 8))),
        nn.Identity(), nn.ReLU(), nn.Linear(8, 4),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _taskmask() -> nn.Module:
    mask = le.TaskMask(6, [[0, 1], [2, 3], [4, 5]]).set_task(1)
    return nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 6), mask)


ARCHITECTURES: list[Architecture] = [
    Architecture("mlp", _mlp, _normal(6), "chain: Linear, ReLU"),
    Architecture("cnn", _cnn, _normal(1, 8, 8), "chain: Conv2d (stride, padding, no bias), ReLU, Flatten, Linear"),
    Architecture("bn-pool-cnn", _bn_pool_cnn, _normal(2, 8, 8),
                 "chain: Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d"),
    Architecture("bn1d-nested", _bn1d_nested, _normal(5),
                 "chain: Linear, BatchNorm1d, nested Sequential, Dropout (eval), Identity"),
    Architecture("taskmask", _taskmask, _normal(4), "chain: Linear, ReLU, TaskMask"),
    Architecture("residual-mlp", ResidualMLP, _normal(6),
                 "graph: LayerNorm, GELU, SiLU, tanh, sigmoid, mean, cat, parameter gate, residual add"),
    Architecture("residual-cnn", ResidualCNN, _normal(1, 8, 8),
                 "graph: Conv2d, BatchNorm2d, F.relu, residual add, AvgPool2d, flatten"),
    Architecture("torchvision-block", TorchvisionBlock, _normal(2, 6, 6),
                 "graph: in-place ReLU module, out += identity"),
    Architecture("token-mixer", TokenMixer, _normal(24),
                 "graph: parameter matmul, view/transpose/permute, LayerNorm, token mean"),
    Architecture("encoder", TinyEncoder, _ids(20, 5),
                 "graph: Embedding, positions, 2-head attention (softmax), LayerNorm, GELU, masked mean pooling"),
    Architecture("encoder-sdpa", lambda: TinyEncoder(sdpa=True), _ids(20, 5),
                 "graph: the encoder with F.scaled_dot_product_attention"),
    Architecture("functional-ops", FunctionalOps, _normal(5),
                 "graph: Tanh/Sigmoid/SiLU/GELU/Softmax modules, F.linear, F.layer_norm, F.embedding, "
                 "F.normalize, F.dropout, division, neg, sub, sum, squeeze/unsqueeze, contiguous, size, concat"),
    Architecture("lora-mlp", _lora_mlp, _normal(6), "LoRA adapters (rank 3) on a GELU MLP, width on the factors only",
                 width=lambda m: [n for n, _ in m.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]),
    Architecture("partial-encoder", TinyEncoder, _ids(20, 5),
                 "partial domain: the encoder with width on its feed-forward, ln2 and head only",
                 width=lambda m: ["ff1", "ff2", "ln2", "head"]),
    Architecture("partial-cnn", ResidualCNN, _normal(1, 8, 8),
                 "partial domain: the residual CNN with width on its head only", width=lambda m: ["fc"]),
]
