"""The recipe switches (docs/RECIPE.md): each profile sets them, and each has the effect it claims.

References are written here (naive loops or plain formulas); the code under test only builds the models.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.config import PROFILES, LossCfg, SaspCfg, from_dict, load_config
from siclip.losses.total import build_loss
from siclip.models.build import build_student
from siclip.models.presets import build_preset, build_tokenizer
from siclip.models.sasp import SASPBlock
from siclip.task import SiclipTask
from siclip.train.loop import build_optimizer, build_scheduler, train_step

torch.set_num_threads(1)

LAST = "visual.trunk.stages.2.blocks"
REPO = Path(__file__).resolve().parents[2]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _student(profile: str, source: Path, **model: Any) -> nn.Module:
    cfg = from_dict({"profile": profile, "model": {"name": "tiny-student", "source": str(source), **model}})
    student, _ = build_student(cfg.model)
    return student


# ---- profiles ----------------------------------------------------------------------------------------------
def test_profiles_set_every_switch_and_explicit_keys_win() -> None:
    siclip, paper = from_dict({}), from_dict({"profile": "paper"})
    assert siclip.profile == "siclip" and siclip == from_dict({"profile": "siclip"})
    for dotted, value in PROFILES["paper"].items():
        assert _get(paper, dotted) == value, dotted
        assert _get(siclip, dotted) != value, f"{dotted}: the siclip profile should keep today's choice"
    mixed = from_dict({"profile": "paper", "optim": {"grad_clip": 2.0}, "model": {"sasp": {"share": "qk"}}})
    assert (mixed.optim.grad_clip, mixed.model.sasp.share, mixed.model.sasp.qk_init) == (2.0, "qk", "zero")
    assert from_dict({"profile": "paper", "model": {"sasp": {"inherit_mlp": True}}}).model.sasp.inherit_mlp


def test_paper_config_file_uses_the_paper_profile() -> None:
    cfg = load_config(REPO / "configs" / "siclip_s0_cc12m.yaml", check_files=False)
    assert cfg.profile == "paper"
    for dotted, value in PROFILES["paper"].items():
        assert _get(cfg, dotted) == value, dotted


# ---- SAS-P initialisation, layer scale, sharing ------------------------------------------------------------
def test_paper_sasp_blocks_are_fresh_with_zero_query(teacher_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, sd = teacher_file
    paper, ours = _student("paper", path), _student("siclip", path)
    for i in (0, 1):
        blk: Any = paper.get_submodule(f"{LAST}.{i}")
        rows = blk.attn.num_heads * blk.attn.head_dim
        src_qkv = sd[f"{LAST}.{i}.token_mixer.qkv.weight"]
        assert torch.count_nonzero(blk.attn.qk.weight[:rows]) == 0  # W_Q = 0
        assert not torch.allclose(
            blk.attn.qk.weight[rows:], src_qkv[rows : 2 * rows]
        )  # K random, not inherited
        assert torch.equal(blk.norm.running_mean, torch.zeros_like(blk.norm.running_mean))  # fresh norm
        assert not torch.allclose(blk.mlp.fc1.weight, sd[f"{LAST}.{i}.mlp.fc1.weight"])  # fresh MLP
        mine: Any = ours.get_submodule(f"{LAST}.{i}")
        assert torch.equal(mine.mlp.fc1.weight, sd[f"{LAST}.{i}.mlp.fc1.weight"])
    first: Any = ours.get_submodule(f"{LAST}.0")
    assert torch.equal(
        first.attn.qk.weight, sd[f"{LAST}.0.token_mixer.qkv.weight"][: first.attn.qk.out_features]
    )


def test_layer_scale_is_per_channel_on_both_branches() -> None:
    torch.manual_seed(0)
    dim = 8
    mlp = nn.Sequential(nn.Conv2d(dim, 16, 1), nn.GELU(), nn.Conv2d(16, dim, 1))
    block = SASPBlock(dim, num_heads=2, norm=nn.BatchNorm2d(dim), mlp=mlp, layout="conv", layer_scale=1e-5)
    assert block.attn_gain.shape == block.mlp_gain.shape == (dim, 1, 1)
    assert torch.all(block.attn_gain == 1e-5) and torch.all(block.mlp_gain == 1e-5)
    with torch.no_grad():
        block.attn_gain.copy_(torch.rand(dim, 1, 1))
        block.mlp_gain.copy_(torch.rand(dim, 1, 1))
    block.eval()
    x = torch.randn(2, dim, 3, 3)
    h = block.norm(x)
    tokens = h.flatten(2).transpose(1, 2)
    attn = block.attn(tokens).transpose(1, 2).reshape_as(h)
    want = torch.stack(
        [block.attn_gain[c, 0, 0] * attn[:, c] + block.mlp_gain[c, 0, 0] * mlp(h)[:, c] for c in range(dim)],
        1,
    )
    torch.testing.assert_close(block(x), want)
    paper = build_preset("tiny-student", sasp=from_dict({"profile": "paper"}).model.sasp)
    gains: Any = paper.get_submodule(f"{LAST}.0").attn_gain
    assert gains.shape[0] > 1 and torch.all(gains == 1e-5)


def test_mixer_sharing_shares_alpha_beta_gamma_and_qk_only() -> None:
    model = build_preset("tiny-student", sasp=SaspCfg(share="mixer"))
    a: Any = model.get_submodule(f"{LAST}.0")
    b: Any = model.get_submodule(f"{LAST}.1")
    assert a.attn is b.attn and a.attn.alpha is b.attn.alpha and a.attn.qk is b.attn.qk
    assert a.norm is not b.norm and a.mlp is not b.mlp and a.attn_gain is not b.attn_gain
    qk_only = build_preset("tiny-student", sasp=SaspCfg(share="qk"))
    c: Any = qk_only.get_submodule(f"{LAST}.0")
    d: Any = qk_only.get_submodule(f"{LAST}.1")
    assert c.attn.qk is d.attn.qk and c.attn.alpha is not d.attn.alpha
    n_mixer = sum(p.numel() for p in model.parameters())
    n_qk = sum(p.numel() for p in qk_only.parameters())
    assert n_qk - n_mixer == 3 * c.attn.num_heads  # one alpha, beta, gamma per head fewer
    with torch.no_grad():
        a.attn.alpha.fill_(0.5)
    assert torch.all(b.attn.alpha == 0.5)


# ---- CRD and ICL scales ------------------------------------------------------------------------------------
def _unit(n: int, d: int, seed: int) -> Tensor:
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1
    )


def _ref_kl_rows(s_logits: Tensor, t_logits: Tensor) -> float:
    total = 0.0
    for i in range(s_logits.shape[0]):
        p = torch.softmax(t_logits[i], 0)
        q = torch.softmax(s_logits[i], 0)
        total += float(sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(len(p))))
    return total / s_logits.shape[0]


def _ref_crd(si: Tensor, st: Tensor, ti: Tensor, tt: Tensor, s_scale: float, t_scale: float) -> float:
    s, t = s_scale * si @ st.T, t_scale * ti @ tt.T
    return 0.5 * (_ref_kl_rows(s, t) + _ref_kl_rows(s.T, t.T))


CRD_ONLY = {"clip_weight": 0.0, "fd_weight": 0.0, "icl_weight": 0.0, "pm_weight": 0.0}


@pytest.mark.parametrize(("teacher_scale", "student_scale"), [("teacher", "clip"), ("fixed", "own")])
def test_crd_scales(teacher_scale: str, student_scale: str) -> None:
    cfg = LossCfg(
        **CRD_ONLY,
        crd_teacher_scale=teacher_scale,  # type: ignore[arg-type]
        crd_student_scale=student_scale,  # type: ignore[arg-type]
        crd_teacher_temperature=0.05,
        crd_student_temperature=0.1,
    )
    loss = build_loss(cfg, student_dim=6, teacher_dim=6).double()
    si, st, ti, tt = (_unit(5, 6, s) for s in range(4))
    clip_log, teacher_log = torch.tensor(math.log(30.0)), torch.tensor(math.log(70.0))
    out = loss(si, st, clip_log, ti, tt, t_logit_scale=teacher_log)
    t_want = 70.0 if teacher_scale == "teacher" else 1 / 0.05
    s_want = 30.0 if student_scale == "clip" else 1 / 0.1
    assert float(out["crd_loss"]) == pytest.approx(_ref_crd(si, st, ti, tt, s_want, t_want), rel=1e-6)
    assert float(out["temp/crd_student"]) == pytest.approx(1 / s_want)  # the scale in use is the one logged
    trainable = [n for n, p in loss.named_parameters() if p.requires_grad]
    assert trainable == ([] if student_scale == "clip" else ["crd.student_log_scale"])
    if teacher_scale == "teacher":
        with pytest.raises(
            ValueError, match=r"^loss\.crd_teacher_scale is 'teacher' but no teacher logit scale was passed$"
        ):
            loss(si, st, clip_log, ti, tt)


def _crd_of_twins(loss_cfg: LossCfg) -> tuple[float, float]:
    """CRD and the norm of its gradient on the student when the student's embeddings ARE the teacher's, at
    the paper profile's student scale (reset to 1/0.07, frozen) and a teacher whose own scale is 100."""
    loss = build_loss(loss_cfg, student_dim=8, teacher_dim=8).double()
    ti, tt = _unit(16, 8, 1), _unit(16, 8, 2)
    si, st = ti.clone().requires_grad_(True), tt.clone().requires_grad_(True)
    clip_log = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    out = loss(si, st, clip_log, ti, tt, t_logit_scale=torch.tensor(math.log(100.0)))
    out["loss"].backward()
    assert si.grad is not None and st.grad is not None
    return float(out["crd_loss"]), float(torch.cat([si.grad, st.grad]).norm())


def test_paper_crd_is_zero_with_no_gradient_when_the_student_is_the_teacher() -> None:
    paper = from_dict({"profile": "paper", "loss": CRD_ONLY}).loss
    value, grad = _crd_of_twins(paper)
    assert value == pytest.approx(0.0, abs=1e-6) and grad == pytest.approx(0.0, abs=1e-6)
    # the teacher's own scale (CLIP-KD's definition) against the student's 14.3: twins are pulled apart
    mixed_value, mixed_grad = _crd_of_twins(dataclasses.replace(paper, crd_teacher_scale="teacher"))
    assert mixed_value > 0.01 and mixed_grad > 1e-3
    # matched follows the student's side whatever it is: CRD's own learnable temperature too
    own = dataclasses.replace(paper, crd_student_scale="own", crd_student_temperature=0.2)
    assert _crd_of_twins(own) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_task_hands_crd_the_teachers_own_logit_scale() -> None:
    torch.manual_seed(0)
    student, teacher = build_preset("tiny-student"), build_preset("tiny-teacher")
    with torch.no_grad():
        teacher.logit_scale.fill_(math.log(42.0))  # type: ignore[operator]
    cfg = LossCfg(**CRD_ONLY, crd_teacher_scale="teacher")
    task = SiclipTask(student, build_loss(cfg, student_dim=64, teacher_dim=64), teacher).eval()
    batch = {
        "image": torch.randn(4, 3, 64, 64),
        "text": build_tokenizer("tiny-student")(["a red circle", "a blue square", "one star", "two dots"]),
    }
    with torch.no_grad():
        got = task(batch)["crd_loss"]
        s: Any = student
        t: Any = teacher
        si, st = s.encode_image(batch["image"], normalize=True), s.encode_text(batch["text"], normalize=True)
        ti, tt = t.encode_image(batch["image"], normalize=True), t.encode_text(batch["text"], normalize=True)
        want = _ref_crd(si.double(), st.double(), ti.double(), tt.double(), 1 / 0.07, 42.0)
    assert float(got) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("mode", ["raw", "exp"])
def test_icl_scale_raw_uses_the_stored_value(mode: str) -> None:
    cfg = LossCfg(clip_weight=0.0, fd_weight=0.0, crd_weight=0.0, pm_weight=0.0, icl_scale=mode)  # type: ignore[arg-type]
    loss = build_loss(cfg, student_dim=6, teacher_dim=6).double()
    si, st, ti, tt = (_unit(5, 6, s) for s in range(4))
    got = float(loss(si, st, torch.tensor(0.0), ti, tt)["icl_loss"])
    scale = math.log(1 / 0.07) if mode == "raw" else 1 / 0.07  # 2.66 vs 14.3
    labels = torch.arange(5)
    want = 0.5 * (
        float(F.cross_entropy(scale * si @ tt.T, labels)) + float(F.cross_entropy(scale * st @ ti.T, labels))
    )
    assert got == pytest.approx(want, rel=1e-6)  # the loss runs in fp32


# ---- freezing: logit scale, BatchNorm statistics; gradient clipping ------------------------------------------
def _clip_loss_backward(student: Any) -> None:
    images = torch.randn(4, 3, 64, 64)
    texts = build_tokenizer("tiny-student")(["a red circle", "a blue square", "one star", "two dots"])
    loss = build_loss(LossCfg(pm_weight=0.0), student_dim=64, teacher_dim=None)  # CLIP alone
    out = loss(
        student.encode_image(images, normalize=True),
        student.encode_text(texts, normalize=True),
        student.logit_scale,
    )
    out["loss"].backward()


def test_frozen_logit_scale_gets_no_gradient(teacher_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, _ = teacher_file
    frozen, free = _student("paper", path), _student("siclip", path)
    for student in (frozen, free):
        _clip_loss_backward(student)
    assert frozen.logit_scale.grad is None and not frozen.logit_scale.requires_grad  # type: ignore[union-attr]
    assert free.logit_scale.grad is not None and float(free.logit_scale.grad.abs()) > 0  # type: ignore[union-attr]
    opt = build_optimizer(frozen, from_dict({}).optim)
    assert all(p is not frozen.logit_scale for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("freeze_bn_stats", [True, False])
def test_bn_statistics_move_only_when_not_frozen(
    teacher_file: tuple[Path, dict[str, Tensor]], freeze_bn_stats: bool
) -> None:
    path, sd = teacher_file
    student: Any = _student("paper", path, freeze_bn_stats=freeze_bn_stats)
    task = SiclipTask(student, build_loss(LossCfg(), student_dim=64, teacher_dim=None)).train()
    stem_bn = next(n for n in sd if n.startswith("visual.trunk.stem") and n.endswith("running_mean"))
    assert torch.equal(student.state_dict()[stem_bn], sd[stem_bn])
    assert all(
        not p.requires_grad for n, p in student.named_parameters() if n.startswith("visual.trunk.stem")
    )
    with torch.no_grad():
        student.encode_image(torch.randn(8, 3, 64, 64) * 3 + 1)
    moved = not torch.equal(student.state_dict()[stem_bn], sd[stem_bn])
    assert moved is (not freeze_bn_stats)
    assert task.training


def test_grad_clip_zero_means_no_clipping() -> None:
    assert from_dict({"profile": "paper"}).optim.grad_clip == 0.0 and from_dict({}).optim.grad_clip == 1.0

    class Steep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(
            self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1
        ) -> dict[str, Tensor]:
            return {"loss": 100.0 * (self.w * batch["x"]).sum()}

    moves = {}
    for clip in (0.0, 1.0):
        task = Steep()
        cfg = from_dict(
            {"optim": {"lr": 0.1, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": clip}}
        ).optim
        opt = torch.optim.SGD(task.parameters(), lr=0.1)
        ok, metrics = train_step(
            task,
            {"x": torch.ones(3)},
            optimizer=opt,
            scheduler=build_scheduler(opt, cfg, 10),
            scaler=None,
            precision="fp32",
            device=torch.device("cpu"),
            grad_clip=cfg.grad_clip,
        )
        assert ok and metrics["optim/grad_norm"] == pytest.approx(100 * math.sqrt(3))
        moves[clip] = float(task.w.detach().norm())
    assert moves[0.0] == pytest.approx(0.1 * 100 * math.sqrt(3)) and moves[1.0] == pytest.approx(0.1)


def test_paper_blocks_survive_export_and_reload(tmp_path: Path) -> None:
    from siclip.models.export import export_open_clip, load_exported

    torch.manual_seed(0)
    model: Any = build_preset("tiny-student", sasp=from_dict({"profile": "paper"}).model.sasp)
    with torch.no_grad():  # as after training: gains and W_Q no longer at their init
        for name, p in model.named_parameters():
            if name.startswith(LAST):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    reloaded: Any
    reloaded, _ = load_exported(export_open_clip(model, "tiny-student", tmp_path / "export"))
    reloaded.eval()
    a: Any = reloaded.get_submodule(f"{LAST}.0")
    b: Any = reloaded.get_submodule(f"{LAST}.1")
    assert a.attn is b.attn and a.attn_gain.shape == model.get_submodule(f"{LAST}.0").attn_gain.shape
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("profile", ["paper", "siclip"])
def test_paper_restarts_the_logit_scale_at_the_init_temperature(
    teacher_file: tuple[Path, dict[str, Tensor]], profile: str
) -> None:
    from siclip.task import build_task

    path, sd = teacher_file
    cfg = from_dict(
        {
            "profile": profile,
            "model": {"name": "tiny-student", "source": str(path)},
            "teacher": {"enabled": False},
            "loss": {"init_temperature": 0.05},
        }
    )
    task, _ = build_task(cfg)
    scale: Any = task.student.logit_scale
    want = math.log(1 / 0.05) if profile == "paper" else float(sd["logit_scale"])
    assert float(scale.detach()) == pytest.approx(want) and scale.requires_grad is (profile == "siclip")


# ---- the authors' optimizer and fresh-MLP init ---------------------------------------------------------------
def test_paper_fresh_mlp_is_truncated_normal_std_0_02() -> None:
    torch.manual_seed(0)
    paper = build_preset("tiny-student", sasp=from_dict({"profile": "paper"}).model.sasp)
    torch_init = build_preset("tiny-student", sasp=SaspCfg(inherit_mlp=False, share="mixer"))
    for model, fresh in ((paper, True), (torch_init, False)):
        for i in (0, 1):
            mlp = model.get_submodule(f"{LAST}.{i}").mlp
            layers = [m for m in mlp.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
            assert layers
            for layer in layers:
                w = layer.weight.detach()
                if fresh:
                    assert float(w.std()) == pytest.approx(0.02, rel=0.1) and float(
                        w.mean()
                    ) == pytest.approx(0.0, abs=0.005)
                    assert layer.bias is None or torch.count_nonzero(layer.bias) == 0
                else:  # PyTorch's Kaiming-uniform reset: std 1/sqrt(3 fan_in), not 0.02
                    fan_in = w[0].numel()
                    assert float(w.std()) == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.15)


@pytest.mark.parametrize("profile", ["paper", "siclip"])
def test_paper_optimizer_is_adamw_defaults_with_the_loss_group_at_0_01(profile: str) -> None:
    cfg = from_dict({"profile": profile, "loss": {"icl_scale": "raw"}})
    torch.manual_seed(0)
    task = SiclipTask(build_preset("tiny-student"), build_loss(cfg.loss, student_dim=64, teacher_dim=64))
    opt = build_optimizer(task, cfg.optim)
    want_betas, want_eps = ((0.9, 0.999), 1e-8) if profile == "paper" else ((0.9, 0.98), 1e-6)
    assert all(tuple(g["betas"]) == want_betas and g["eps"] == want_eps for g in opt.param_groups)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    loss_params = [p for p in task.loss.parameters() if p.requires_grad]
    assert loss_params and any(p.ndim == 0 for p in loss_params)
    for p in loss_params:
        assert decay_of[id(p)] == (0.01 if profile == "paper" else (0.1 if p.ndim >= 2 else 0.0))
    for name, p in task.student.named_parameters():  # the student's grouping is the same in both
        if p.requires_grad:
            assert decay_of[id(p)] == (0.1 if p.ndim >= 2 else 0.0), name
    # one step with no gradient: AdamW's decoupled decay alone moves ICL's raw scale by lr * wd * value
    icl: Any = task.loss.icl
    before = float(icl.log_scale.detach())
    for p in task.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    lr = cfg.optim.lr
    want = before * (1 - lr * 0.01) if profile == "paper" else before
    assert float(icl.log_scale.detach()) == pytest.approx(want, rel=1e-6)  # the decay is 1e-5 relative
