"""Classification heads on frozen sentence embeddings: the part of the model a team fine-tunes."""

from __future__ import annotations

from torch import nn


def head(dim: int = 384, classes: int = 2, hidden: int = 0) -> nn.Sequential:
    """A linear head (``hidden=0``) or a one-hidden-layer ReLU MLP head on ``dim``-d embeddings.

    Args:
        dim: the embedding size (all-MiniLM-L6-v2: 384).
        classes: the number of outputs (negative / non-negative: 2).
        hidden: width of the hidden layer; 0 for a linear head (``dim·classes + classes`` parameters,
            770 for MiniLM and two classes).

    Returns:
        ``Linear`` or ``Linear``–``ReLU``–``Linear``, certifiable as it is.
    """
    if hidden < 0 or dim < 1 or classes < 2:
        raise ValueError(f"head: expected dim ≥ 1, classes ≥ 2 and hidden ≥ 0, got dim={dim}, classes={classes}, "
                         f"hidden={hidden}")
    if hidden == 0:
        return nn.Sequential(nn.Linear(dim, classes))
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))
