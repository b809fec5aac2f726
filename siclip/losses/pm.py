"""Pair matching (PM): a binary head that tells matching image-text pairs from sampled non-matching ones.

The paper only says "an auxiliary hyperplane separating positive from negative pairs"; the fusion, the head
and the negative sampling here are our reading (METHOD.md section 4) and all configurable.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.losses.gather import broadcast_from_rank0

Fusion = Literal["prod_absdiff", "concat", "prod"]
Negatives = Literal["hard", "random"]


def fuse_pairs(img: Tensor, txt: Tensor, fusion: Fusion) -> Tensor:
    """One feature per pair: ``[v*t, |v-t|]``, ``[v, t]`` or ``v*t``."""
    if fusion == "prod_absdiff":
        return torch.cat([img * txt, (img - txt).abs()], dim=-1)
    if fusion == "concat":
        return torch.cat([img, txt], dim=-1)
    if fusion == "prod":
        return img * txt
    raise ValueError(f"unknown PM fusion {fusion!r}; allowed: prod_absdiff, concat, prod")


def sample_negatives(
    sim: Tensor,
    *,
    k: int,
    mode: Negatives,
    scale: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """For each row i of the square similarity ``sim``, ``k`` distinct column indices other than i.

    "hard": drawn without replacement with probability ``softmax(scale * sim[i])`` renormalised over the
    columns j != i (more similar wrong items are likelier); "random": uniform over j != i. Draws come from
    ``generator`` (on any device) or, when None, torch's global RNG, so a seed reproduces them. Returns
    ``[n, k]`` int64 on ``sim``'s device.
    """
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"sim must be square, got {tuple(sim.shape)}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"need 1 <= k <= n - 1 negatives per anchor (k={k}, n={n})")
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    with torch.no_grad():
        if mode == "hard":
            logits = (scale * sim.detach().float()).masked_fill(eye, float("-inf"))
            probs = torch.softmax(logits, dim=1)
        elif mode == "random":
            probs = (~eye).float()
        else:
            raise ValueError(f"unknown PM negatives {mode!r}; allowed: hard, random")
        # multinomial wants positive mass on at least k columns: a softmax can underflow to exact zeros when
        # the similarity is very peaked, so keep a tiny uniform floor on the allowed columns.
        probs = probs + (~eye).float() * torch.finfo(torch.float32).tiny
        if generator is not None and generator.device != probs.device:
            # a CPU generator with GPU embeddings: draw where the generator lives, so the seed still decides
            return torch.multinomial(probs.to(generator.device), k, generator=generator).to(sim.device)
        return torch.multinomial(probs, k, replacement=False, generator=generator)


class PMLoss(nn.Module):
    """BCE of a matching head on the B positive pairs and on sampled negative pairs.

    Each image gets ``per_anchor`` negative texts and each text ``per_anchor`` negative images from the same
    (global) batch. The head is linear (the paper's hyperplane) or, with ``hidden > 0``, one GELU hidden layer.
    The BCE is the plain mean over all ``B * (1 + 2 * per_anchor)`` pairs.
    """

    def __init__(
        self,
        dim: int,
        *,
        fusion: Fusion = "prod_absdiff",
        negatives: Negatives = "hard",
        per_anchor: int = 1,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        in_dim = dim if fusion == "prod" else 2 * dim
        fuse_pairs(torch.zeros(1, dim), torch.zeros(1, dim), fusion)  # reject a bad name at build time
        if negatives not in ("hard", "random"):
            raise ValueError(f"unknown PM negatives {negatives!r}; allowed: hard, random")
        self.fusion: Fusion = fusion
        self.negatives: Negatives = negatives
        self.per_anchor = per_anchor
        self.head: nn.Module = (
            nn.Linear(in_dim, 1)
            if hidden == 0
            else nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        )

    def pair_logits(self, img: Tensor, txt: Tensor) -> Tensor:
        """Matching logit of each row pair ``(img[i], txt[i])``."""
        return self.head(fuse_pairs(img, txt, self.fusion)).squeeze(-1)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        *,
        scale: float | Tensor = 1.0,
        generator: torch.Generator | None = None,
        world_size: int = 1,
    ) -> Tensor:
        """``scale`` sharpens the hard-negative softmax (the CLIP logit scale is the natural choice).

        With ``world_size > 1`` the inputs must be the gathered global batch; rank 0's draw is broadcast so
        every rank computes the same loss.
        """
        n = img.shape[0]
        k = min(self.per_anchor, n - 1)
        pos = self.pair_logits(img, txt)
        if k < 1:  # a batch of one has no negatives
            return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
        sim = img.detach() @ txt.detach().T
        neg_txt = sample_negatives(sim, k=k, mode=self.negatives, scale=scale, generator=generator)
        neg_img = sample_negatives(sim.T, k=k, mode=self.negatives, scale=scale, generator=generator)
        idx = broadcast_from_rank0(torch.stack([neg_txt, neg_img]), world_size=world_size)
        neg_txt, neg_img = idx[0].reshape(-1), idx[1].reshape(-1)
        anchors = torch.arange(n, device=img.device).repeat_interleave(k)
        neg = torch.cat(
            [self.pair_logits(img[anchors], txt[neg_txt]), self.pair_logits(img[neg_img], txt[anchors])]
        )
        logits = torch.cat([pos, neg])
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
        return F.binary_cross_entropy_with_logits(logits, labels)
