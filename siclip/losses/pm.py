"""Pair matching (PM): a binary task that tells matching image-text pairs from sampled non-matching ones.

The paper: "a binary matching task predicts whether an image-text pair matches, using logits derived from
positive and sampled negative pairs". Its head and negative sampling are unknown (METHOD.md section 4). The
default ``cosine`` head makes the logit the pair's scaled cosine similarity plus a learnable bias, so the BCE
acts on the embeddings themselves (a linear head on fused features barely reached them: 0.005 % of the
student's gradient at weight 0.1). ``linear`` keeps that head, with its fusion and optional hidden layer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.losses.gather import broadcast_from_rank0

Fusion = Literal["prod_absdiff", "concat", "prod"]
Negatives = Literal["hard", "random"]
Head = Literal["cosine", "linear"]


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
    """BCE of a matching logit on the B positive pairs and on sampled negative pairs.

    Each image gets ``per_anchor`` negative texts and each text ``per_anchor`` negative images from the same
    (global) batch. ``head="cosine"``: logit ``scale * cos(v, t) + bias`` with the call's ``scale`` (the
    detached CLIP logit scale) and a learnable scalar bias, set on the first batch so that positives and
    negatives start centred on 0 (its right value depends on the scale and on how well the student already
    matches pairs, which no constant fits). ``head="linear"``: a linear head on the fused pair feature (the
    paper's hyperplane) or, with ``hidden > 0``, one GELU hidden layer. The BCE is the plain mean over all
    ``B * (1 + 2 * per_anchor)`` pairs.
    """

    bias_set: Tensor

    def __init__(
        self,
        dim: int,
        *,
        head: Head = "linear",
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
        if head not in ("cosine", "linear"):
            raise ValueError(f"unknown PM head {head!r}; allowed: cosine, linear")
        self.kind: Head = head
        self.fusion: Fusion = fusion
        self.negatives: Negatives = negatives
        self.per_anchor = per_anchor
        self.head: nn.Module | None = None
        if head == "linear":
            self.head = (
                nn.Linear(in_dim, 1)
                if hidden == 0
                else nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
            )
        else:
            self.bias = nn.Parameter(torch.zeros(()))
            # saved with the checkpoint, so a resumed run keeps its learnt bias instead of re-centring it
            self.register_buffer("bias_set", torch.zeros((), dtype=torch.bool))

    def _scores(self, img: Tensor, txt: Tensor, scale: float | Tensor) -> Tensor:
        """The linear head's logit, or the cosine head's logit without its bias."""
        if self.head is not None:
            return self.head(fuse_pairs(img, txt, self.fusion)).squeeze(-1)
        return scale * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)

    def pair_logits(self, img: Tensor, txt: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """Matching logit of each row pair ``(img[i], txt[i])`` (``scale`` is used by the cosine head)."""
        scores = self._scores(img, txt, scale)
        return scores if self.head is not None else scores + self.bias

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
        if k < 1:  # a batch of one has no negatives
            pos = self.pair_logits(img, txt, scale)
            return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
        sim = img.detach() @ txt.detach().T
        neg_txt = sample_negatives(sim, k=k, mode=self.negatives, scale=scale, generator=generator)
        neg_img = sample_negatives(sim.T, k=k, mode=self.negatives, scale=scale, generator=generator)
        idx = broadcast_from_rank0(torch.stack([neg_txt, neg_img]), world_size=world_size)
        neg_txt, neg_img = idx[0].reshape(-1), idx[1].reshape(-1)
        anchors = torch.arange(n, device=img.device).repeat_interleave(k)
        pos = self._scores(img, txt, scale)
        neg = torch.cat(
            [self._scores(img[anchors], txt[neg_txt], scale), self._scores(img[neg_img], txt[anchors], scale)]
        )
        if self.head is None:
            if not bool(self.bias_set):  # first batch: centre positives and negatives on 0
                with torch.no_grad():
                    self.bias.fill_(-0.5 * float(pos.mean() + neg.mean()))
                    self.bias_set.fill_(True)
            pos, neg = pos + self.bias, neg + self.bias
        logits = torch.cat([pos, neg])
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
        return F.binary_cross_entropy_with_logits(logits, labels)
