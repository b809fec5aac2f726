"""Pure-torch losses: CLIP, FD, CRD, ICL, PM and their weighted total (no Ray here)."""

from siclip.losses.clip import ClipLoss
from siclip.losses.crd import CRDLoss
from siclip.losses.fd import EmbedProjector, FDLoss
from siclip.losses.gather import gather_features
from siclip.losses.icl import ICLLoss
from siclip.losses.pm import PMLoss, sample_negatives
from siclip.losses.total import WIKDLoss, build_loss

__all__ = [
    "CRDLoss",
    "ClipLoss",
    "EmbedProjector",
    "FDLoss",
    "ICLLoss",
    "PMLoss",
    "WIKDLoss",
    "build_loss",
    "gather_features",
    "sample_negatives",
]
