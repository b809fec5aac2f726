"""The one configuration schema of siclip: frozen ``*Cfg`` dataclasses, YAML loading, dotted overrides.

Every stage (data build, training, evaluation, sweeps, Ray) reads one :class:`SiclipCfg`. An unknown key, a
wrong type, an out-of-range value, a rule between fields or a missing file each raise :class:`ConfigError`
naming the key, the bad value and what is allowed. Where each check runs:

- types and ranges: in :func:`from_dict` (the YAML binder), from each field's metadata;
- rules between fields (``data.batch_size`` a multiple of ``train.num_workers``, ``loss.local`` needs
  ``loss.gather``, ...): in the ``__post_init__`` of the dataclass that owns them (the section, or
  :class:`SiclipCfg` for rules spanning sections), so every way of building a config checks them:
  :func:`from_dict`, :func:`load_config`, :func:`replace` and direct construction alike;
- paths: in :func:`load_config` only (:func:`check_paths`), the one step that looks at the file system.

The typed config crosses into Ray as a plain dict (:func:`to_dict`) and is rebuilt, and so checked again, on
the far side (:func:`from_dict`); every sweep trial is built the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "BenchmarkName",
    "BenchmarkRootsCfg",
    "CaptionCfg",
    "ConfigError",
    "DataCfg",
    "EvalCfg",
    "LossCfg",
    "LossStageCfg",
    "ModelCfg",
    "OptimCfg",
    "RayCfg",
    "SaspCfg",
    "SiclipCfg",
    "SwitchReport",
    "SwitchValue",
    "TeacherCfg",
    "TrainCfg",
    "TuneCfg",
    "apply_overrides",
    "apply_profile",
    "config_yaml",
    "expand_shards",
    "from_dict",
    "load_config",
    "read_yaml_mapping",
    "redacted",
    "resolve_switches",
    "save_config",
    "switch_report",
    "to_dict",
    "typed_value",
]


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the key, the value and what is allowed."""


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"min": lo, "max": hi, "lo_open": lo_open}


def _path(kind: Literal["file", "dir", "shards", "source", "root"]) -> dict[str, Any]:
    # "root": a local folder made absolute for Ray workers but not checked: a missing one is reported absent
    return {"path": kind}


# --------------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class DataCfg:
    """Training and held-out data."""

    train_shards: tuple[str, ...] = field(default=(), metadata=_path("shards"))
    """WebDataset tars: paths, brace patterns (``shard-{000000..000099}.tar``), globs, or fsspec URIs."""
    batch_size: int = field(default=256, metadata=_rng(1))
    """Global batch size (summed over all Ray Train workers)."""
    loader_workers: int = field(default=2, metadata=_rng(0))
    shuffle_buffer: int = field(default=1000, metadata=_rng(0))
    synthetic: Literal["sum", "replace", "off"] = "sum"
    """How ``syn.json`` captions are used: loss on real + synthetic batches summed, replace, or ignore."""
    synthetic_p: float = field(default=0.5, metadata=_rng(0.0, 1.0))
    """Probability a synthetic caption replaces the real one when ``synthetic == 'replace'``."""
    augment: bool = False
    """Random resized crop (scale 0.9-1) on training images; off for the demo world."""


@dataclass(frozen=True)
class SaspCfg:
    """Which transformer blocks become SAS-P blocks, and how they share weights."""

    replace: Literal["image", "text", "both", "none"] = "image"
    share: Literal["qk", "block", "none", "mixer", "mixer_pairs"] = "qk"
    """qk: one Q/K projection for all replaced blocks of a tower; mixer: one whole token mixer (Q/K and the
    per-head alpha/beta/gamma, as the authors' ``ws_light_mobileclip_s0`` image tower); mixer_pairs: one token
    mixer per consecutive pair of replaced blocks, 1-2, 3-4, ... (the authors' text tower); block: one whole
    block; none."""
    text_share: Literal["", "qk", "block", "none", "mixer", "mixer_pairs"] = ""
    """The text tower's sharing when it is simplified (``replace: text|both``); empty: as ``share``. The
    authors' text tower: ``mixer_pairs``."""
    text_gains: Literal["same", "unit"] = "same"
    """The text tower's branch gains: same: as the image tower's (``attn_gain``/``mlp_gain`` or
    ``layer_scale``); unit: both branches at gain 1, no layer scale (the authors' ``ParallelTransformerEncoder``
    adds them unscaled; here the two gains are scalars that may train)."""
    qk_init: Literal["inherit", "zero"] = "inherit"
    """inherit Q/K from the replaced attention block's qkv weights, or W_Q = 0 (identity at init)."""
    first_value: bool = False
    """A trainable value matrix (init identity) in the first replaced block (He & Hofmann)."""
    attn_gain: float = 1.0
    mlp_gain: float = 0.1
    inherit_mlp: bool = True
    """Initialise the SAS-P MLP (and norm) from the replaced block's MLP."""
    mlp_init: Literal["torch", "trunc_normal"] = "torch"
    """A fresh SAS-P MLP (``inherit_mlp: false``): torch: each layer's ``reset_parameters`` (Kaiming uniform);
    trunc_normal: conv and linear weights truncated-normal with std 0.02 and zero biases (MobileCLIP's
    ConvFFN init, used by the authors' fresh blocks)."""
    layer_scale: float = field(default=0.0, metadata=_rng(0.0))
    """>0: per-channel gains on both branches, initialised to this (MCi0's layer-scale init 1e-5 in the
    authors' code) instead of the scalar ``attn_gain`` / ``mlp_gain``; 0: the scalar gains."""


@dataclass(frozen=True)
class ModelCfg:
    """The student."""

    name: str = "siclip-s0"
    """A preset name (``siclip info --model``): siclip-s0, mobileclip-s0, mobileclip2-s0, tiny-student, ..."""
    source: str = field(default="", metadata=_path("source"))
    """Weights to inherit: open_clip tag ``MODEL:TAG``, a .pt/.safetensors file, or ``local-dir:PATH``."""
    inherit: bool = True
    freeze_inherited: bool = True
    freeze_bn_stats: bool = True
    """Frozen (inherited) modules stay in eval mode, so their BatchNorm statistics never move; false: they
    follow the run's train/eval mode and only ``requires_grad`` is off (the authors' code)."""
    freeze_logit_scale: bool = False
    """Keep the student's CLIP logit scale fixed (the authors' code trains only the new blocks)."""
    reset_logit_scale: bool = False
    """Start the logit scale at ``1 / loss.init_temperature`` even when it is inherited."""
    sasp: SaspCfg = SaspCfg()
    image_size: int = field(default=0, metadata=_rng(0))
    """0 keeps the preset's image size."""


@dataclass(frozen=True)
class TeacherCfg:
    """The frozen teacher for distillation."""

    name: str = "mobileclip-s0"
    source: str = field(default="", metadata=_path("source"))
    enabled: bool = True
    use_shard_embeddings: bool = True
    """Read teacher embeddings from the shards' ``npz`` when every sample has them."""


@dataclass(frozen=True)
class LossStageCfg:
    """One stage of ``loss.schedule``: from this optimizer step on, these weights replace the ``*_weight``s."""

    from_step: int = field(default=0, metadata=_rng(0))
    weights: dict[str, Any] = field(default_factory=dict)
    """Term name (clip, fd, crd, icl, pm) -> weight >= 0; terms not named keep their ``*_weight``."""


def _check_schedule(stages: tuple[LossStageCfg, ...]) -> None:
    # the terms are the ``<name>_weight`` fields of LossCfg (the table of terms, siclip/losses/terms.py,
    # names the same fields; this module stays free of torch, so it reads its own schema)
    terms = [
        f.name.removesuffix("_weight") for f in dataclasses.fields(LossCfg) if f.name.endswith("_weight")
    ]
    previous = -1
    for i, stage in enumerate(stages):
        key = f"loss.schedule[{i}]"
        if stage.from_step <= previous:
            raise ConfigError(
                f"{key}.from_step: got {stage.from_step}; allowed: an integer > {previous} (stages ascend)"
            )
        previous = stage.from_step
        for name, w in stage.weights.items():
            if name not in terms:
                raise ConfigError(f"{key}.weights.{name}: unknown term; allowed: {', '.join(terms)}")
            if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
                raise ConfigError(f"{key}.weights.{name}: got {w!r}; allowed: a number >= 0")


@dataclass(frozen=True)
class LossCfg:
    """WIKD + PM: ``L = clip + fd_weight*FD + crd_weight*CRD + icl_weight*ICL + pm_weight*PM``."""

    clip_weight: float = field(default=1.0, metadata=_rng(0.0))
    fd_weight: float = field(default=4000.0, metadata=_rng(0.0))
    fd_reference_dim: int = field(default=0, metadata=_rng(0))
    """The width at which ``fd_weight`` is stated. FD is a mean over the batch and the embedding's D dimensions
    (the teacher's width, where FD is computed), so for unit embeddings at a given cosine its pull on each
    sample falls as 1/D. >0: FD is multiplied by ``D / fd_reference_dim`` (a sum over dimensions divided by
    this width), so ``fd_weight`` pulls each sample as hard at any D as it does at this one: 512 states the
    paper's 4000 at MobileCLIP-S0's width (at D = 64 the effective weight is 500). 0: no rescaling."""
    crd_weight: float = field(default=1.0, metadata=_rng(0.0))
    icl_weight: float = field(default=1.0, metadata=_rng(0.0))
    pm_weight: float = field(default=0.1, metadata=_rng(0.0))
    init_temperature: float = field(default=0.07, metadata=_rng(0.0, 1.0, lo_open=True))
    """Initial temperature of the student's CLIP logit scale (when the model has none inherited)."""
    crd_student_temperature: float = field(default=0.07, metadata=_rng(0.0, 10.0, lo_open=True))
    crd_teacher_temperature: float = field(default=0.07, metadata=_rng(0.0, 10.0, lo_open=True))
    icl_temperature: float = field(default=0.07, metadata=_rng(0.0, 1.0, lo_open=True))
    """Initial value of ICL's learnable temperature."""
    learn_temperatures: bool = True
    """The CRD student temperature (``crd_student_scale: own``) and ICL's scale are trained."""
    crd_teacher_scale: Literal["fixed", "teacher", "matched"] = "fixed"
    """fixed: teacher logits at ``1 / crd_teacher_temperature``; teacher: at the teacher's own
    ``logit_scale.exp()`` (clamped at ``max_logit_scale``; CLIP-KD's definition); matched: at the scale the
    student's side uses (``crd_student_scale``, detached), so a student equal to the teacher has CRD = 0 and
    no CRD gradient (the authors' run: both sides at the wrappers' fresh 14.3)."""
    crd_student_scale: Literal["own", "clip"] = "own"
    """own: CRD's own student temperature; clip: the student's CLIP logit scale (the authors' code)."""
    icl_scale: Literal["exp", "raw"] = "exp"
    """exp: ICL logits at ``exp(log_scale)``; raw: at the stored value itself, no exp (CLIP-KD's and
    the authors' code: about 2.66 at init)."""
    max_logit_scale: float = field(default=100.0, metadata=_rng(1.0))
    """Cap of every trained scale (the student's CLIP logit scale, CRD's and ICL's own): each is clamped as a
    parameter after every optimizer step (open_clip's convention), never in the loss, so it keeps its
    gradient at the cap; the teacher's scale (``crd_teacher_scale: teacher``) is clamped where it is read."""
    pm_head: Literal["cosine", "linear"] = "cosine"
    """cosine: the pair's cosine similarity times the (detached) CLIP logit scale plus a learnable bias, so PM
    acts on the embeddings; linear: a head on the fused pair feature (``pm_fusion``, ``pm_hidden``)."""
    pm_fusion: Literal["prod_absdiff", "concat", "prod"] = "prod_absdiff"
    pm_negatives: Literal["hard", "random"] = "hard"
    pm_negatives_per_anchor: int = field(default=1, metadata=_rng(1))
    pm_hidden: int = field(default=0, metadata=_rng(0))
    """0: a linear head (the paper's hyperplane); >0: one hidden layer of this width."""
    gather: bool = True
    """Contrastive, relational and matching terms see the global batch across workers."""
    caption_sets: Literal["sum", "mean"] = "sum"
    """How the losses of the real-caption and synthetic-caption batches combine."""
    schedule: tuple[LossStageCfg, ...] = ()
    """Loss weights by step range: each stage ``{from_step: N, weights: {fd: .., crd: .., icl: .., pm: ..,
    clip: ..}}`` overrides the ``*_weight`` keys from optimizer step N (0-based) until the next stage."""
    gather_with_grad: bool = True
    """Gradients flow through every rank's gathered features, so N workers match 1 worker exactly after DDP's
    averaging (false: only the local slice, as open_clip's default; gradients then scale by 1/N)."""
    local: bool = False
    """Each rank computes only its own rows of the gathered similarity matrices (its images against every
    text, its texts against every image; open_clip's ``local_loss``): memory ``B/N x B`` instead of ``B x B``
    per rank, the same gradients as the global form (after DDP's averaging) for either ``gather_with_grad``.
    Logged loss values are then averaged over ranks. Needs ``gather``."""

    def __post_init__(self) -> None:
        _check_schedule(self.schedule)
        if self.local and not self.gather:
            raise ConfigError(
                "loss.local: got true; allowed: false when loss.gather is false (nothing is gathered)"
            )


@dataclass(frozen=True)
class OptimCfg:
    lr: float = field(default=1e-3, metadata=_rng(0.0, lo_open=True))
    weight_decay: float = field(default=0.1, metadata=_rng(0.0))
    beta1: float = field(default=0.9, metadata=_rng(0.0, 1.0))
    beta2: float = field(default=0.98, metadata=_rng(0.0, 1.0))
    """0.98 (open_clip's CLIP recipe); the authors' code keeps AdamW's default 0.999 (``profile: paper``)."""
    eps: float = field(default=1e-6, metadata=_rng(0.0, lo_open=True))
    """1e-6 (open_clip's CLIP recipe); the authors' code keeps AdamW's default 1e-8 (``profile: paper``)."""
    loss_group: Literal["by_shape", "one"] = "by_shape"
    """The loss's own trainable parameters (ICL/CRD temperatures, PM head, FD/ICL projector): by_shape: grouped
    like the student's (matrices decayed at ``weight_decay``, scalars and vectors not); one: all in one group
    at ``loss_weight_decay`` (the authors' ``loss.parameters()`` group, scalars included)."""
    loss_weight_decay: float = field(default=0.01, metadata=_rng(0.0))
    """Weight decay of the loss's group with ``loss_group: one`` (AdamW's default 0.01, as in the authors' code)."""
    warmup_steps: int = field(default=10_000, metadata=_rng(0))
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = field(default=0.0, metadata=_rng(0.0, 1.0))
    grad_clip: float = field(default=1.0, metadata=_rng(0.0))
    """Max global gradient norm; 0 disables clipping."""


@dataclass(frozen=True)
class TrainCfg:
    run_name: str = "siclip"
    runs_dir: str = "runs"
    """Local folder or shared URI (``storage_path`` of Ray Train); each run gets ``runs_dir/run_name``."""
    max_steps: int = field(default=0, metadata=_rng(0))
    """Optimizer steps; 0 derives them from ``epochs`` and the shards' manifest sample count."""
    epochs: float = field(default=0.0, metadata=_rng(0.0))
    num_workers: int = field(default=1, metadata=_rng(1))
    """Ray Train workers (data-parallel; ``data.batch_size`` is split evenly across them)."""
    cpus_per_worker: float = field(default=1.0, metadata=_rng(0.0, lo_open=True))
    """CPUs Ray reserves per worker; on CPU the worker also uses that many torch threads (at least 1)."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """yes: every worker asks Ray for a GPU and waits (an autoscaler launches GPU nodes); auto: yes when the
    cluster has GPUs, no without an autoscaler, an error asking for yes/no where an autoscaler runs whose GPU
    node types Ray does not publish (siclip/ray_compat.py); no: CPU only."""
    worker_start_timeout_s: int = field(default=900, metadata=_rng(1))
    """How long the workers may wait for their resources (a GPU node's boot and image pull) before the run
    fails; Ray Train's own default is 60 s."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, fp16 with a grad scaler on older ones, fp32 on CPU."""
    seed: int = 0
    log_every: int = field(default=10, metadata=_rng(1))
    ckpt_every: int = field(default=500, metadata=_rng(1))
    keep_checkpoints: int = field(default=2, metadata=_rng(1))
    eval_every: int = field(default=0, metadata=_rng(0))
    """0: evaluate only at the end."""
    max_bad_steps: int = field(default=20, metadata=_rng(0))
    """Steps with a NaN/inf loss are skipped and counted; the run stops when the count passes this."""
    max_failures: int = field(default=0, metadata=_rng(-1))
    """Ray Train worker-failure retries (-1: unlimited); each retry resumes from the last checkpoint."""
    grad_share_every: int = field(default=0, metadata=_rng(0))
    """Every N steps log each loss term's gradient norm and share on the student (0: off; costs one forward
    and one backward per term on rank 0)."""
    find_unused_parameters: Literal["auto", "yes", "no"] = "auto"
    """DDP's ``find_unused_parameters`` (a graph walk every step). auto: on only when a probe forward of the
    first batch leaves a trainable parameter without gradient on some rank (e.g. the logit scale with
    ``loss.clip_weight: 0``)."""
    progress: bool = True


BenchmarkName = Literal["imagenet1k", "imagenetv2", "imagenet_r", "imagenet_sketch", "mscoco", "flickr30k"]
"""The paper's evaluation datasets (``siclip eval --suite paper`` runs all of them)."""


@dataclass(frozen=True)
class BenchmarkRootsCfg:
    """Local roots of the paper's datasets, each in CLIP_benchmark's ``--dataset_root`` layout or its
    WebDataset export (``ROOT/test/nshards.txt``); see ``siclip/eval/benchmarks.py``. Nothing is downloaded:
    an empty or missing root, or one in no known layout, marks the dataset absent."""

    imagenet1k: str = field(default="", metadata=_path("root"))
    """``ROOT/val/<wnid>/*.JPEG``"""
    imagenetv2: str = field(default="", metadata=_path("root"))
    """``ROOT/ImageNetV2-matched-frequency/<class index>/*.jpeg``"""
    imagenet_r: str = field(default="", metadata=_path("root"))
    """``ROOT/<wnid>/*.jpg`` (200 wnids)"""
    imagenet_sketch: str = field(default="", metadata=_path("root"))
    """``ROOT/<wnid>/*.JPEG``"""
    mscoco: str = field(default="", metadata=_path("root"))
    """``ROOT/val2014`` + ``ROOT/coco_test_karpathy.json`` (Karpathy 5k test), or ``ROOT/val2017`` +
    ``ROOT/annotations/captions_val2017.json`` (COCO 2017 val, 5k)"""
    flickr30k: str = field(default="", metadata=_path("root"))
    """``ROOT/*.jpg`` + ``ROOT/flickr30k_test_karpathy.txt`` (Karpathy 1k test)"""


@dataclass(frozen=True)
class EvalCfg:
    """Held-out evaluation, run during training (``train.eval_every``, and at the end) and by ``siclip eval``."""

    zeroshot_dir: str = field(default="", metadata=_path("dir"))
    """ImageFolder-layout directory for zero-shot classification."""
    classnames_file: str = field(default="", metadata=_path("file"))
    """Optional: one class name per line, in sorted folder order; otherwise folder names are used."""
    retrieval_shards: tuple[str, ...] = field(default=(), metadata=_path("shards"))
    """Image-text shards with one or more captions per image (``json["captions"]``, else ``txt``)."""
    templates: tuple[str, ...] = ("a photo of a {}.", "a {}.")
    batch_size: int = field(default=128, metadata=_rng(1))
    recall_at: tuple[int, ...] = (1, 5, 10)
    benchmarks: tuple[BenchmarkName, ...] = ()
    """The paper's datasets to evaluate too (metrics ``<name>/top1``, ``<name>/i2t_r@1``, ...), from ``roots``."""
    roots: BenchmarkRootsCfg = BenchmarkRootsCfg()
    benchmark_templates: Literal["openai", "simple"] = "openai"
    """Zero-shot prompts for the benchmarks: open_clip's 80 OpenAI templates (the papers'), or its 7 simple ones."""
    loader_workers: int = field(default=2, metadata=_rng(0))
    """Data-loader processes reading the benchmarks' images."""

    def __post_init__(self) -> None:
        for i, t in enumerate(self.templates):
            if "{}" not in t:
                raise ConfigError(f"eval.templates[{i}]: got {t!r}; allowed: a string containing '{{}}'")


@dataclass(frozen=True)
class CaptionCfg:
    """``siclip data build``: CC12M (img2dataset layout) -> CC12M-SYN.

    Each input shard becomes one output shard of the same name (img2dataset decides the shard size), so a
    rerun skips the shards it already finished.
    """

    input_shards: tuple[str, ...] = field(default=(), metadata=_path("shards"))
    output_dir: str = "data/cc12m_syn"
    model: str = "coca_ViT-L-14"
    """An open_clip CoCa model name, or the demo's ``siclip-tiny-coca``."""
    source: str = field(default="mscoco_finetuned_laion2B-s13B-b90k", metadata=_path("source"))
    """open_clip pretrained tag, a .pt/.safetensors file, or ``local-dir:PATH``; empty for random init."""
    num_captions: int = field(default=5, metadata=_rng(0))
    method: Literal["top_p", "beam"] = "top_p"
    decoder: Literal["cached", "open_clip"] = "cached"
    """top-p sampling through siclip's cached CoCa decoder (each image encoded once, keys/values cached,
    finished captions dropped, bf16 on GPU; on CPU the same captions as open_clip's) or open_clip's
    ``generate``. Beam search always uses open_clip's."""
    sync_every: int = field(default=0, metadata=_rng(0))
    """Cached decoder: drop finished captions from the batch every this many tokens (a host sync); 0: every
    token on CPU (same random stream as open_clip), every 8 on GPU (captions then differ from open_clip's)."""
    top_p: float = field(default=0.9, metadata=_rng(0.0, 1.0, lo_open=True))
    max_length: int = field(default=30, metadata=_rng(2))
    batch_size: int = field(default=16, metadata=_rng(1))
    num_actors: int = field(default=1, metadata=_rng(1))
    num_gpus_per_actor: float = field(default=0.0, metadata=_rng(0.0))
    num_cpus_per_actor: float = field(default=1.0, metadata=_rng(0.0))
    image_size: int = field(default=256, metadata=_rng(8))
    """Images are resized (shorter side) and re-encoded to this size."""
    min_image_size: int = field(default=32, metadata=_rng(0))
    """Images whose shorter side is below this are skipped as ``too_small`` (img2dataset's option)."""
    max_aspect_ratio: float = field(default=10.0, metadata=_rng(1.0))
    """Images whose longer / shorter side is above this are skipped as ``bad_aspect`` (img2dataset's)."""
    min_actors: int = field(default=1, metadata=_rng(1))
    """Each actor pool is elastic, from this many actors up to ``num_actors``."""
    max_retries: int = field(default=3, metadata=_rng(0))
    """How often a shard's read (a Ray task retry) or write (in the actor) is retried after an I/O error."""
    retry_delay_s: float = field(default=10.0, metadata=_rng(0.0))
    """Wait before a retry (doubling per write retry), so a throttling or restarting store can recover."""
    worker_start_timeout_s: int = field(default=900, metadata=_rng(1))
    """On a cluster whose autoscaler can launch the GPUs (or CPUs) the actor pools need but has not yet (GPU
    workers scaled to zero): how long the build asks for them and waits before it fails."""
    stop_after_failed_writes: int = field(default=3, metadata=_rng(0))
    """Stop the build when this many shards have failed to write (retries spent) before any was written: the
    output is unusable and every further shard would be captioned for nothing. 0: never stop."""
    teacher_embeddings: bool = False
    """Also store the teacher's image/text embeddings per sample (``npz``)."""
    teacher_gpus_per_actor: float = field(default=-1.0, metadata=_rng(-1.0))
    """GPUs per teacher-embedding actor: a fraction (e.g. 0.25) packs the light teacher forward beside the
    captioners instead of holding a GPU of its own; -1: the same as ``caption.num_gpus_per_actor``."""
    seed: int = 0

    @property
    def teacher_gpus(self) -> float:
        """The teacher pool's GPUs per actor, resolved."""
        return self.num_gpus_per_actor if self.teacher_gpus_per_actor < 0 else self.teacher_gpus_per_actor

    def __post_init__(self) -> None:
        if -1.0 < self.teacher_gpus_per_actor < 0.0:
            raise ConfigError(
                f"caption.teacher_gpus_per_actor: got {self.teacher_gpus_per_actor:g}; allowed: -1 (as "
                "caption.num_gpus_per_actor) or a number >= 0"
            )
        if self.min_actors > self.num_actors:
            raise ConfigError(
                f"caption.min_actors: got {self.min_actors}; allowed: at most caption.num_actors "
                f"({self.num_actors})"
            )


@dataclass(frozen=True)
class TuneCfg:
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {randint: [lo, hi]} (both ends
    included) | {choice: [...]} | {grid: [...]}."""
    space_file: str = field(default="", metadata=_path("file"))
    """A YAML file with ``space:`` (and optionally other tune keys); merged under ``space``."""
    metric: str = "val/zeroshot_top1"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo", "median"] = "asha"
    grace_period: int = field(default=1, metadata=_rng(1))
    """ASHA/median: reports a trial gets before it may be stopped."""
    reduction_factor: float = field(default=2.0, metadata=_rng(1.0, lo_open=True))
    num_samples: int = field(default=8, metadata=_rng(1))
    max_concurrent_trials: int = field(default=1, metadata=_rng(1))
    cpus_per_trial: float = field(default=0.01, metadata=_rng(0.0, lo_open=True))
    """CPUs for each trial's driver, which only waits on its Train workers (they reserve their own)."""
    gpus_per_trial: float = field(default=0.0, metadata=_rng(0.0))
    experiment_name: str = "siclip-tune"
    seed: int = 0


@dataclass(frozen=True)
class RayCfg:
    address: str = ""
    """Empty: connect to a running cluster if ``RAY_ADDRESS`` is set, else start a local one."""
    num_cpus: int = field(default=0, metadata=_rng(0))
    """0: Ray decides (local clusters only)."""
    object_store_memory_mb: int = field(default=0, metadata=_rng(0))
    include_dashboard: bool = False
    node_ip_address: str = "127.0.0.1"
    """A local Ray started by siclip binds its processes (GCS, raylet, agents, metrics) to this address and
    advertises it: ``127.0.0.1`` keeps them off the network; ``""`` lets Ray pick this machine's address (as
    ``ray.init()`` does), or name one of its addresses. Not used when joining a cluster (``address``)."""
    data_timeout_s: int = field(default=600, metadata=_rng(1))
    """Ray Data gives up when it makes no progress for this long (e.g. waiting for a GPU never there)."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Environment for the data build's Ray tasks and actors, e.g. ``{AWS_ENDPOINT_URL: http://minio:9000}``
    for an S3-compatible store (credentials are better left to the nodes' own environment or roles)."""


@dataclass(frozen=True)
class SiclipCfg:
    profile: Literal["siclip", "paper"] = "siclip"
    """Sets the defaults of the recipe switches (docs/RECIPE.md); keys given explicitly still win."""
    data: DataCfg = DataCfg()
    caption: CaptionCfg = CaptionCfg()
    model: ModelCfg = ModelCfg()
    teacher: TeacherCfg = TeacherCfg()
    loss: LossCfg = LossCfg()
    optim: OptimCfg = OptimCfg()
    train: TrainCfg = TrainCfg()
    eval: EvalCfg = EvalCfg()
    tune: TuneCfg = TuneCfg()
    ray: RayCfg = RayCfg()

    def __post_init__(self) -> None:
        # The checks that span sections; each section checks its own fields when it is built.
        if self.data.batch_size % max(self.train.num_workers, 1):
            raise ConfigError(
                f"data.batch_size: got {self.data.batch_size}; allowed: a multiple of "
                f"train.num_workers ({self.train.num_workers}), since it is the global batch"
            )


# ------------------------------------------------------------------------------------ building
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
        return _build(typing.cast(type, tp), value, prefix=key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in allowed:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        elif isinstance(value, bool) and ("no" if not value else "yes") in allowed:
            value = "yes" if value else "no"  # ... and a bare yes/no (train.use_gpu: yes)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a schema bug, not a user error


def _check_range(key: str, value: Any, meta: Any) -> None:
    lo, hi, lo_open = meta.get("min"), meta.get("max"), meta.get("lo_open", False)
    if lo is None and hi is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        too_high = hi is not None and v > hi
        if too_low or too_high:
            lo_txt = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
            hi_txt = "" if hi is None else f"<= {hi}"
            allowed = " and ".join(t for t in (lo_txt, hi_txt) if t)
            raise ConfigError(f"{key}: got {v!r}; allowed: {allowed}")


def _build(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"{key}: unknown key; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        coerced = _coerce(key, value, hints[name])
        _check_range(key, coerced, names[name].metadata)
        kwargs[name] = coerced
    return cls(**kwargs)


PROFILES: dict[str, dict[str, Any]] = {
    # today's choices: each equals the schema's default, so `profile: siclip` changes nothing
    "siclip": {
        "model.sasp.qk_init": "inherit",
        "model.sasp.inherit_mlp": True,
        "model.sasp.mlp_init": "torch",
        "model.sasp.layer_scale": 0.0,
        "model.sasp.share": "qk",
        "model.freeze_bn_stats": True,
        "model.freeze_logit_scale": False,
        "model.reset_logit_scale": False,
        "loss.crd_teacher_scale": "fixed",
        "loss.crd_student_scale": "own",
        "loss.icl_scale": "exp",
        "optim.grad_clip": 1.0,
        "optim.beta2": 0.98,
        "optim.eps": 1e-6,
        "optim.loss_group": "by_shape",
    },
    # the authors' code (Alexios-hub/LightClip, ws_light_mobileclip_s0) where the paper's text is silent;
    # docs/RECIPE.md gives each switch's source file and why
    "paper": {
        "model.sasp.qk_init": "zero",
        "model.sasp.inherit_mlp": False,
        "model.sasp.mlp_init": "trunc_normal",
        "model.sasp.layer_scale": 1e-5,
        "model.sasp.share": "mixer",
        "model.freeze_bn_stats": False,
        "model.freeze_logit_scale": True,
        "model.reset_logit_scale": True,
        "loss.crd_teacher_scale": "matched",
        "loss.crd_student_scale": "clip",
        "loss.icl_scale": "raw",
        "optim.grad_clip": 0.0,
        "optim.beta2": 0.999,
        "optim.eps": 1e-8,
        "optim.loss_group": "one",
    },
}
"""Per profile, the dotted keys it sets (every profile sets the same keys: the profile *switches*); a key
the config or the command line gives explicitly is left alone, and :func:`resolve_switches` says so."""

SWITCHES: tuple[str, ...] = tuple(PROFILES["paper"])
"""The profile switches: the keys whose value depends on ``profile``."""


def _has_dotted(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_profile(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its profile's switch values filled in wherever ``data`` does not set the key itself."""
    data = dict(data or {})
    profile = _coerce("profile", data.get("profile", "siclip"), typing.get_type_hints(SiclipCfg)["profile"])
    out = apply_overrides(data, [])
    for dotted, value in PROFILES[profile].items():
        if not _has_dotted(data, dotted):
            _set_dotted(out, dotted, value)
    return out


def typed_value(dotted: str, value: Any) -> Any:
    """``value`` as the config holds it at ``dotted`` (type and range checked, as :func:`from_dict` does).

    Only that field is checked; the rules between fields run when the value goes into a config (e.g. with
    :func:`replace`). Raises :class:`ConfigError` naming the key.
    """
    cls: Any = SiclipCfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"{path}: unknown key; valid keys here: {', '.join(sorted(fields))}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            coerced = _coerce(path, value, tp)
            _check_range(path, coerced, fields[part].metadata)
            return coerced
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{path}: is a value ({_type_name(tp)}), not a section")
        cls = tp
    raise ConfigError(f"{dotted}: got an empty key")  # pragma: no cover - split() gives one part at least


def from_dict(data: dict[str, Any]) -> SiclipCfg:
    """Build (and type-check) a config from a nested dict, its profile applied; does not touch the file system."""
    return _build(SiclipCfg, apply_profile(data or {}))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe nested dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    cls: Any = SiclipCfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        is_dc = dataclasses.is_dataclass(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)} if is_dc else {}
        if is_dc and part not in fields:
            raise ConfigError(f"{path}: unknown key; valid keys here: {', '.join(sorted(fields))}")
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(cls)[part] if is_dc else None
        if is_dc and not (dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict):
            raise ConfigError(f"{path}: is a value ({_type_name(tp)}), not a section")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: got {child!r}; expected a mapping")
        node = child
        cls = tp if is_dc else None


def _split_top_level(text: str) -> list[str]:
    """Split ``a, b{1,2}, c`` on commas outside braces (brace patterns are not YAML)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def _parse_value(raw: str) -> Any:
    """A YAML value; shard patterns such as ``[dir/s-{000..009}.tar]`` that YAML rejects stay strings."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            return _split_top_level(text[1:-1])
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
    out = yaml.safe_load(yaml.safe_dump(data or {})) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_dotted(out, key, _parse_value(raw))
    return out


# ------------------------------------------------------------------------------------ paths
def is_uri(path: str) -> bool:
    """Not a path on this machine: a storage URI (:func:`siclip.storage.is_remote`), a WebDataset ``pipe:``
    or an open_clip ``local-dir:`` source."""
    from siclip.storage import is_remote

    return is_remote(path) or path.startswith(("pipe:", "local-dir:"))


def expand_shards(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Expand brace patterns and globs into a sorted-within-pattern list of shard URLs.

    Local globs use the local filesystem; a URI glob (``s3://bucket/cc12m/*.tar``, ``gs://...``, any fsspec
    filesystem) is listed through fsspec. ``pipe:`` commands and ``local-dir:`` sources are never globbed.
    """
    from braceexpand import braceexpand

    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand(pattern):
            if not any(c in item for c in "*?[") or item.startswith(("pipe:", "local-dir:")):
                urls.append(item)
            elif is_uri(item):
                urls.extend(_glob_uri(item))
            else:
                urls.extend(sorted(glob.glob(item)))
    return urls


def _glob_uri(pattern: str) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern)
    fs.invalidate_cache()  # the shards may have been written since this process last listed
    found = fs.glob(path, detail=True)  # one listing, with each entry's type: no request per object
    return sorted(fs.unstrip_protocol(p) for p, info in found.items() if info.get("type") == "file")


def _walk(cfg: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, dataclasses.Field[Any]]]:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, value, f


def _is_weights_file(value: str) -> bool:
    return value.endswith((".pt", ".pth", ".bin", ".safetensors")) and not is_uri(value)


def _is_local_path_field(f: dataclasses.Field[Any], value: Any) -> bool:
    kind = f.metadata.get("path")
    if kind == "source":
        return _is_weights_file(value)
    return kind in ("file", "dir", "root") or f.name in ("runs_dir", "output_dir")


def absolutize(cfg: SiclipCfg, base: str | os.PathLike[str] | None = None) -> SiclipCfg:
    """Make every local path absolute (Ray workers may run in another working directory)."""
    root = Path(base or Path.cwd())

    def fix(value: str) -> str:
        if not value or is_uri(value) or os.path.isabs(value):
            return value
        return str(root / value)

    def walk(node: Any) -> Any:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                changes[f.name] = walk(value)
            elif f.metadata.get("path") == "shards":
                changes[f.name] = tuple(fix(v) for v in value)
            elif _is_local_path_field(f, value):
                changes[f.name] = fix(value)
        return dataclasses.replace(node, **changes)

    result: SiclipCfg = walk(cfg)
    return result


def _check_source(key: str, value: str, base: Path) -> None:
    if value.startswith("local-dir:"):
        local = Path(value[len("local-dir:") :])
        if not local.is_dir():
            raise ConfigError(f"{key}: got {value!r}; no such directory {str(local)!r}")
        return
    if _is_weights_file(value) and not (base / value).is_file() and not Path(value).is_file():
        raise ConfigError(f"{key}: got {value!r}; no such checkpoint file")


TRAIN_SECTIONS = ("data", "model", "teacher", "eval")
"""The sections whose paths a training run reads (``siclip train``, the demo's and the ablation's stages)."""


def check_paths(cfg: SiclipCfg, *, sections: tuple[str, ...] | None = None) -> None:
    """Check that every configured local file, directory and shard pattern exists.

    ``sections`` limits the check to the stages a command uses (e.g. ``("data", "model")``).
    URIs (``s3://``, ``gs://``, ``pipe:``) are not checked.
    """
    base = Path.cwd()
    for key, value, f in _walk(cfg):
        kind = f.metadata.get("path")
        if not kind or not value or (sections and key.split(".")[0] not in sections):
            continue
        if kind == "shards":
            for pattern in value:
                if is_uri(pattern):
                    continue
                found = expand_shards([pattern])
                missing = [u for u in found if not os.path.isfile(u)]
                if not found or missing:
                    bad = missing[0] if missing else pattern
                    raise ConfigError(f"{key}: got {pattern!r}; no such shard file {bad!r}")
        elif kind == "source":
            _check_source(key, value, base)
        elif is_uri(value):
            continue
        elif kind == "file" and not os.path.isfile(value):
            raise ConfigError(f"{key}: got {value!r}; no such file")
        elif kind == "dir" and not os.path.isdir(value):
            raise ConfigError(f"{key}: got {value!r}; no such directory")


def _yaml_problem(path: str, exc: yaml.YAMLError) -> str:
    """``file:line:column: not valid YAML: problem`` on one line (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{where}: not valid YAML: {problem}"


def read_yaml_mapping(path: str | os.PathLike[str], *, key: str) -> dict[str, Any]:
    """A YAML file (a path or a URI such as ``s3://``) holding a mapping; errors name ``key`` (the option or
    config key that gave the path)."""
    from siclip import storage

    try:
        text = storage.read_text(path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ConfigError(f"{key}: got {str(path)!r}; no such file") from exc
    except (ValueError, OSError) as exc:  # an unknown scheme, no access, ... : one line with the cause
        raise ConfigError(f"{key}: got {str(path)!r}; cannot read it ({' '.join(str(exc).split())})") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {_yaml_problem(str(path), exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check_files: bool | tuple[str, ...] = True,
) -> SiclipCfg:
    """Load a YAML config, apply dotted overrides, validate types, ranges and (optionally) paths.

    ``check_files`` may be a tuple of section names to check only those stages' paths.
    """
    data = read_yaml_mapping(path, key="--config") if path is not None else {}
    data = apply_overrides(data, list(overrides))
    cfg = from_dict(data)
    if check_files:
        check_paths(cfg, sections=check_files if isinstance(check_files, tuple) else None)
    return cfg


def redacted(cfg: SiclipCfg) -> SiclipCfg:
    """``cfg`` without the values of ``ray.env_vars`` (they may hold credentials): what every saved copy holds."""
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, env_vars={}))


def config_yaml(cfg: SiclipCfg) -> str:
    """The config as YAML for every saved copy (a run's ``config.yaml``, its TensorBoard text, a sweep's
    ``best_config.yaml``): ``load_config`` reads it back unchanged except ``ray.env_vars``, whose values are
    never written; a comment names the variables that were set, to pass again (``ray.env_vars.NAME=...``)."""
    text = yaml.safe_dump(to_dict(redacted(cfg)), sort_keys=False)
    if cfg.ray.env_vars:
        names = ", ".join(sorted(str(k) for k in cfg.ray.env_vars))
        text = (
            f"# ray.env_vars had values for {names}; not saved (they may hold credentials): pass them again "
            "as ray.env_vars.NAME=value where needed\n" + text
        )
    return text


@dataclass(frozen=True)
class SwitchValue:
    """One profile switch as a run resolved it: its value, where the value came from, the profile's value."""

    key: str
    value: Any
    source: str
    """``profile``, ``config file``, ``command line`` or ``tune.space`` (varied per trial)."""
    profile_value: Any

    @property
    def overrides_profile(self) -> bool:
        """The run does not use its profile's value for this switch."""
        return self.source != "profile" and self.value != self.profile_value


@dataclass(frozen=True)
class SwitchReport:
    """Every profile switch of a run, resolved, with its source: printed at the start of ``siclip train``,
    ``ablate`` and ``tune`` and written into their tables, so a profile cannot lose to a config silently."""

    profile: str
    profile_source: str
    """``default``, ``config file`` or ``command line``."""
    config_file: str
    switches: tuple[SwitchValue, ...]

    def _where(self, source: str) -> str:
        return f"config file {self.config_file}" if source == "config file" and self.config_file else source

    @property
    def overridden(self) -> tuple[SwitchValue, ...]:
        return tuple(s for s in self.switches if s.overrides_profile)

    def lines(self) -> list[str]:
        """Plain text: the profile, then one line per switch (value, source, and what it overrides)."""
        width = max(len(s.key) for s in self.switches)
        out = [f"profile {self.profile} ({self._where(self.profile_source)}); its switches as resolved:"]
        for s in self.switches:
            note = f"; OVERRIDES profile {self.profile}'s {s.profile_value!r}" if s.overrides_profile else ""
            out.append(f"  {s.key:<{width}} = {s.value!r:<10} ({self._where(s.source)}{note})")
        return out

    def markdown(self) -> str:
        """A Markdown paragraph and table for a results file's header."""
        n = len(self.overridden)
        head = f"Profile `{self.profile}` ({self._where(self.profile_source)}); " + (
            f"**{n} switch(es) override it** (marked)." if n else "every switch has the profile's value."
        )
        rows = [
            f"| `{s.key}` | `{s.value!r}` | {self._where(s.source)}"
            + (f" (**overrides** `{s.profile_value!r}`)" if s.overrides_profile else "")
            + " |"
            for s in self.switches
        ]
        return "\n".join([head, "", "| switch | value | from |", "|---|---|---|", *rows])


def switch_report(
    data: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_file: str = "",
    searched: tuple[str, ...] | list[str] = (),
) -> SwitchReport:
    """The resolved profile switches of the config ``data`` (a config file's mapping) with ``overrides``
    (the command line's ``key=value``); ``searched``: keys a sweep varies per trial."""
    data = data or {}
    cli = apply_overrides({}, list(overrides))
    cfg = from_dict(apply_overrides(data, list(overrides)))
    profile_source = "command line" if "profile" in cli else "config file" if "profile" in data else "default"
    rows = []
    for key in SWITCHES:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if key in searched:
            source = "tune.space"
        elif _has_dotted(cli, key):
            source = "command line"
        elif _has_dotted(data, key):
            source = "config file"
        else:
            source = "profile"
        rows.append(SwitchValue(key, value, source, PROFILES[cfg.profile][key]))
    return SwitchReport(cfg.profile, profile_source, config_file, tuple(rows))


def resolve_switches(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    searched: tuple[str, ...] | list[str] = (),
) -> SwitchReport:
    """:func:`switch_report` of a config file (``None``: no file) and command-line overrides."""
    data = read_yaml_mapping(path, key="--config") if path is not None else {}
    return switch_report(data, overrides, config_file=str(path or ""), searched=searched)


def save_config(cfg: SiclipCfg, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (a path or a URI) as :func:`config_yaml`: what ``load_config`` reads back
    unchanged, ``ray.env_vars`` values left out."""
    from siclip.storage import write_text

    write_text(path, config_yaml(cfg))


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)
