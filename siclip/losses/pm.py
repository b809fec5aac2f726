"""Pair matching (PM): a binary task that tells matching image-text pairs from sampled non-matching ones.

The paper: "a binary matching task predicts whether an image-text pair matches, using logits derived from
positive and sampled negative pairs". Its head and negative sampling are unknown (docs/method.md section 4). The
default ``cosine`` head makes the logit the pair's scaled cosine similarity plus a learnable bias, so the BCE
acts on the embeddings themselves (a linear head on fused features barely reached them: 0.005 % of the
student's gradient at weight 0.1). ``linear`` keeps that head, with its fusion and optional hidden layer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
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
    offset: int = 0,
) -> Tensor:
    """For each row i of the similarity ``sim`` ``[n, m]``, ``k`` distinct column indices other than
    ``offset + i`` (the row's own item: ``sim`` is square with ``offset=0``, or one rank's rows of the global
    matrix under the local loss).

    "hard": drawn without replacement with probability ``softmax(scale * sim[i])`` renormalised over the
    other columns (more similar wrong items are likelier); "random": uniform over them. Rows are drawn
    independently, so drawing a rank's rows on that rank gives the same distribution as drawing all rows at
    once. Draws come from ``generator`` (on any device) or, when None, torch's global RNG, so a seed
    reproduces them. Returns ``[n, k]`` int64 on ``sim``'s device.
    """
    n, m = sim.shape[0], sim.shape[-1]
    if sim.dim() != 2 or not 0 <= offset <= m - n:
        raise ValueError(f"sim must be [n, m] with offset + n <= m, got {tuple(sim.shape)}, offset {offset}")
    if not 1 <= k <= m - 1:
        raise ValueError(f"need 1 <= k <= m - 1 negatives per anchor (k={k}, m={m})")
    rows = torch.arange(offset, offset + n, device=sim.device)
    eye = rows[:, None] == torch.arange(m, device=sim.device)[None, :]  # each row's own column
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
        rows: slice | None = None,
    ) -> Tensor:
        """``scale`` sharpens the hard-negative softmax (the CLIP logit scale is the natural choice).

        With ``world_size > 1`` the inputs must be the gathered global batch; rank 0's draw is broadcast so
        every rank computes the same loss. With ``rows`` (the local loss) only those anchors get their
        positive and negatives, drawn from every column with this rank's generator (no broadcast): the same
        per-row distribution, and the mean over ranks is the mean over all pairs (equal pairs per rank).
        """
        n = img.shape[0]
        k = min(self.per_anchor, n - 1)
        own = rows if rows is not None else slice(0, n)
        if k < 1:  # a batch of one has no negatives
            pos = self.pair_logits(img[own], txt[own], scale)
            return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
        sim = img[own].detach() @ txt.detach().T
        sim_t = sim.T if rows is None else txt[own].detach() @ img.detach().T
        neg_txt, neg_img = (
            sample_negatives(m, k=k, mode=self.negatives, scale=scale, generator=generator, offset=own.start)
            for m in (sim, sim_t)
        )
        idx = torch.stack([neg_txt, neg_img])
        if rows is None:
            idx = broadcast_from_rank0(idx, world_size=world_size)
        neg_txt, neg_img = idx[0].reshape(-1), idx[1].reshape(-1)
        anchors = torch.arange(own.start, own.stop, device=img.device).repeat_interleave(k)
        pos = self._scores(img[own], txt[own], scale)
        neg = torch.cat(
            [self._scores(img[anchors], txt[neg_txt], scale), self._scores(img[neg_img], txt[anchors], scale)]
        )
        if self.head is None:
            # first batch: centre positives and negatives on 0; done on the device with no branch, so no
            # step pays a host sync for the check
            with torch.no_grad():
                centre = -0.5 * (pos.mean() + neg.mean())
                if rows is not None and world_size > 1 and dist.is_available() and dist.is_initialized():
                    dist.all_reduce(centre)  # local rows differ per rank: one bias for all ranks
                    centre /= world_size
                self.bias.copy_(torch.where(self.bias_set, self.bias, centre.to(self.bias.dtype)))
                self.bias_set.fill_(True)
            pos, neg = pos + self.bias, neg + self.bias
        logits = torch.cat([pos, neg])
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
        return F.binary_cross_entropy_with_logits(logits, labels)
