"""The configuration schema: the frozen ``*Cfg`` dataclasses, their fields' types, ranges and path kinds,
and the rules between fields.

Each field's ``metadata`` tells the other modules of :mod:`siclip.config` what it holds: ``min``, ``max``
and ``lo_open`` give its range (checked by :mod:`siclip.config.binding` when a config is built from a
mapping); ``path`` says it names a file, a directory, shard patterns, a weights ``source`` or a dataset
``root`` (:mod:`siclip.config.paths` makes those absolute and checks that they exist). The rules between
fields sit in the ``__post_init__`` of the dataclass that owns them (the section, or :class:`SiclipCfg`
for rules spanning sections), so every way of building a config checks them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

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
    "TeacherCfg",
    "TrainCfg",
    "TuneCfg",
    "replace",
    "walk_fields",
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


def walk_fields(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field[Any]]]:
    """Every leaf field of the config (or section) ``cfg``: its dotted key (``data.train_shards``), its value,
    and its ``dataclasses.Field`` (whose ``metadata`` gives the path kind and range), sections descended."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk_fields(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, value, f


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported so callers need not import dataclasses; the new config is checked
    by the ``__post_init__`` rules like any other."""
    return dataclasses.replace(cfg, **changes)
