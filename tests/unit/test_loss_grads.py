"""Per-term gradients: float64 finite differences of every loss term, and each term against a naive reference.

Three checks per term, all with explicit constructor arguments so they stay valid when defaults move:

- ``torch.autograd.gradcheck`` (central finite differences in float64) w.r.t. the student embeddings and every
  learnable temperature / head parameter of the module;
- the naive reference below (Python loops over rows, written with plain torch ops, never calling the code
  under test) has the same value *and* the same autograd gradient as the module;
- inside ``WIKDLoss`` each ``term/<name>`` equals ``weight * standalone module`` in value and in gradient
  w.r.t. the student embeddings and the CLIP logit scale (a term whose student side is detached, or PM drawing
  its hard negatives at the wrong scale, fails here).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from siclip.config import LossCfg
from siclip.losses.clip import ClipLoss
from siclip.losses.crd import CRDLoss
from siclip.losses.fd import EmbedProjector, FDLoss
from siclip.losses.icl import ICLLoss
from siclip.losses.pm import PMLoss, sample_negatives
from siclip.losses.total import WIKDLoss

torch.set_num_threads(1)
B, DS, DT = 5, 4, 6
MAX_SCALE = 100.0


def unit(*shape: int, seed: int, grad: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return x.requires_grad_(grad)


# ---- naive differentiable references: loops over rows, plain torch arithmetic -------------------------------


def ref_scale(log_scale: Tensor) -> Tensor:
    # no clamp in the loss: trained scales are clamped as parameters after the optimizer step
    return torch.exp(log_scale)


def ref_ce_rows(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """Mean over i of ``-log softmax_j(scale * a_i . b_j)[i]``."""
    n = a.shape[0]
    total = a.new_zeros(())
    for i in range(n):
        row = torch.stack([scale * (a[i] * b[j]).sum() for j in range(n)])
        total = total - row[i] + torch.log(torch.exp(row).sum())
    return total / n


def ref_clip(img: Tensor, txt: Tensor, log_scale: Tensor) -> Tensor:
    s = ref_scale(log_scale)
    return 0.5 * (ref_ce_rows(img, txt, s) + ref_ce_rows(txt, img, s))


def ref_fd(s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor) -> Tensor:
    return ((s_img - t_img) ** 2).sum() / s_img.numel() + ((s_txt - t_txt) ** 2).sum() / s_txt.numel()


def ref_kl_rows(
    s_a: Tensor, s_b: Tensor, t_a: Tensor, t_b: Tensor, s_scale: Tensor, t_scale: float
) -> Tensor:
    n = s_a.shape[0]
    total = s_a.new_zeros(())
    for i in range(n):
        t_row = torch.stack([t_scale * (t_a[i] * t_b[j]).sum() for j in range(n)]).detach()
        s_row = torch.stack([s_scale * (s_a[i] * s_b[j]).sum() for j in range(n)])
        p = torch.exp(t_row) / torch.exp(t_row).sum()
        log_q = s_row - torch.log(torch.exp(s_row).sum())
        total = total + (p * (torch.log(p) - log_q)).sum()
    return total / n


def ref_crd(s_img, s_txt, t_img, t_txt, s_log_scale: Tensor, t_temperature: float) -> Tensor:
    s = ref_scale(s_log_scale)
    t = 1.0 / t_temperature
    return 0.5 * (
        ref_kl_rows(s_img, s_txt, t_img, t_txt, s, t) + ref_kl_rows(s_txt, s_img, t_txt, t_img, s, t)
    )


def ref_icl(s_img, s_txt, t_img, t_txt, log_scale: Tensor) -> Tensor:
    s = ref_scale(log_scale)
    return 0.5 * (ref_ce_rows(s_img, t_txt.detach(), s) + ref_ce_rows(s_txt, t_img.detach(), s))


def ref_project(x: Tensor, weight: Tensor) -> Tensor:
    y = torch.stack(
        [torch.stack([(weight[o] * x[i]).sum() for o in range(weight.shape[0])]) for i in range(len(x))]
    )
    return y / torch.sqrt((y * y).sum(dim=1, keepdim=True))


def ref_pm(
    img: Tensor, txt: Tensor, weight: Tensor, bias: Tensor, pairs: list[tuple[int, int, float]]
) -> Tensor:
    """BCE of the linear head ``w . [v*t, |v-t|] + b`` over the given (image, text, label) pairs."""
    total = img.new_zeros(())
    for a, b, y in pairs:
        feat = torch.cat([img[a] * txt[b], torch.abs(img[a] - txt[b])])
        z = (weight * feat).sum() + bias
        p = 1.0 / (1.0 + torch.exp(-z))
        total = total - (y * torch.log(p) + (1.0 - y) * torch.log(1.0 - p))
    return total / len(pairs)


def pm_pairs(img: Tensor, txt: Tensor, *, k: int, scale: float, seed: int) -> list[tuple[int, int, float]]:
    """The pairs PMLoss scores: positives, then k hard negative texts per image, then k negative images per text
    (the same generator draws in the same order; ``sample_negatives`` is checked on its own in test_losses)."""
    g = torch.Generator().manual_seed(seed)
    sim = img.detach() @ txt.detach().T
    neg_txt = sample_negatives(sim, k=k, mode="hard", scale=scale, generator=g)
    neg_img = sample_negatives(sim.T, k=k, mode="hard", scale=scale, generator=g)
    n = img.shape[0]
    pairs = [(i, i, 1.0) for i in range(n)]
    pairs += [(i, int(j), 0.0) for i in range(n) for j in neg_txt[i]]
    pairs += [(int(j), i, 0.0) for i in range(n) for j in neg_img[i]]
    return pairs


def linear_pm(dim: int, *, per_anchor: int, negatives: str = "hard") -> PMLoss:
    """PM with the paper's linear hyperplane on ``[v*t, |v-t|]`` (the head the naive reference writes out)."""
    torch.manual_seed(0)
    pm = PMLoss(dim, fusion="prod_absdiff", negatives=negatives, per_anchor=per_anchor, hidden=0).double()  # type: ignore[arg-type]
    assert isinstance(pm.head, nn.Linear), "the reference below is the linear head"
    return pm


# ---- helpers ------------------------------------------------------------------------------------------------


def check_module(module: nn.Module, call: Callable[..., Tensor], inputs: tuple[Tensor, ...]) -> None:
    """gradcheck of ``call(module, *inputs)`` w.r.t. the inputs and every parameter of ``module``."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in module.named_parameters())

    def fn(*args: Tensor) -> Tensor:
        xs, ps = args[: len(inputs)], args[len(inputs) :]
        state = dict(zip(names, ps, strict=True))
        return call(lambda *a, **kw: functional_call(module, state, a, kw), *xs)

    assert torch.autograd.gradcheck(fn, (*inputs, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def grads(value: Tensor, wrt: list[Tensor]) -> list[Tensor]:
    out = torch.autograd.grad(value, wrt, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(out, wrt, strict=True)]


def assert_same_value_and_grad(got: Tensor, want: Tensor, wrt: list[Tensor], *, rtol: float = 1e-9) -> None:
    torch.testing.assert_close(got.detach(), want.detach(), rtol=rtol, atol=rtol)
    for i, (g, w) in enumerate(zip(grads(got, wrt), grads(want, wrt), strict=True)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol, msg=lambda m, i=i: f"input {i}: {m}")
        assert w.abs().sum() > 0, f"input {i}: the reference gradient is zero, the check is vacuous"


# ---- one term at a time -------------------------------------------------------------------------------------


def test_clip_gradcheck_and_reference_gradient() -> None:
    img, txt = unit(B, DS, seed=0, grad=True), unit(B, DS, seed=1, grad=True)
    log_scale = torch.tensor(math.log(12.0), dtype=torch.float64, requires_grad=True)
    clip = ClipLoss(max_logit_scale=MAX_SCALE)
    check_module(clip, lambda m, a, b, s: m(a, b, s), (img, txt, log_scale))
    assert_same_value_and_grad(
        clip(img, txt, log_scale), ref_clip(img, txt, log_scale), [img, txt, log_scale]
    )


def test_fd_gradcheck_and_reference_gradient() -> None:
    s_img, s_txt = unit(B, DT, seed=0, grad=True), unit(B, DT, seed=1, grad=True)
    t_img, t_txt = unit(B, DT, seed=2, grad=True), unit(B, DT, seed=3, grad=True)
    fd = FDLoss()
    check_module(fd, lambda m, a, b: m(a, b, t_img, t_txt), (s_img, s_txt))
    got = fd(s_img, s_txt, t_img, t_txt)
    assert_same_value_and_grad(got, ref_fd(s_img, s_txt, t_img.detach(), t_txt.detach()), [s_img, s_txt])
    assert grads(got, [t_img, t_txt])[0].abs().sum() == 0  # the teacher is a constant


def test_projector_gradcheck_and_reference_gradient() -> None:
    torch.manual_seed(0)
    proj = EmbedProjector(DS, DT).double()
    s_img, s_txt = unit(B, DS, seed=0, grad=True), unit(B, DS, seed=1, grad=True)
    check_module(proj, lambda m, a, b: sum(o.sin().sum() for o in m(a, b)), (s_img, s_txt))
    p_img, p_txt = proj(s_img, s_txt)
    wrt = [s_img, s_txt, proj.image.weight, proj.text.weight]
    want = (
        ref_project(s_img, proj.image.weight).sin().sum() + ref_project(s_txt, proj.text.weight).sin().sum()
    )
    assert_same_value_and_grad(p_img.sin().sum() + p_txt.sin().sum(), want, wrt)


@pytest.mark.parametrize("learnable", [True, False])
def test_crd_gradcheck_and_reference_gradient(learnable: bool) -> None:
    s_img, s_txt = unit(B, DS, seed=0, grad=True), unit(B, DS, seed=1, grad=True)
    t_img, t_txt = unit(B, DT, seed=2, grad=True), unit(B, DT, seed=3, grad=True)
    crd = CRDLoss(
        student_temperature=0.2, teacher_temperature=0.1, learnable=learnable, max_logit_scale=MAX_SCALE
    ).double()
    check_module(crd, lambda m, a, b: m(a, b, t_img, t_txt), (s_img, s_txt))
    got = crd(s_img, s_txt, t_img, t_txt)
    log_scale = crd.student_log_scale
    want = ref_crd(s_img, s_txt, t_img, t_txt, log_scale, 0.1)
    assert_same_value_and_grad(got, want, [s_img, s_txt, *([log_scale] if learnable else [])])
    assert grads(got, [t_img, t_txt])[0].abs().sum() == 0
    assert [n for n, _ in crd.named_parameters()] == (["student_log_scale"] if learnable else [])


@pytest.mark.parametrize("learnable", [True, False])
def test_icl_gradcheck_and_reference_gradient(learnable: bool) -> None:
    s_img, s_txt = unit(B, DT, seed=0, grad=True), unit(B, DT, seed=1, grad=True)
    t_img, t_txt = unit(B, DT, seed=2, grad=True), unit(B, DT, seed=3, grad=True)
    icl = ICLLoss(temperature=0.1, learnable=learnable, max_logit_scale=MAX_SCALE).double()
    check_module(icl, lambda m, a, b: m(a, b, t_img, t_txt), (s_img, s_txt))
    got = icl(s_img, s_txt, t_img, t_txt)
    want = ref_icl(s_img, s_txt, t_img, t_txt, icl.log_scale)
    assert_same_value_and_grad(got, want, [s_img, s_txt, *([icl.log_scale] if learnable else [])])
    assert grads(got, [t_img, t_txt])[0].abs().sum() == 0
    assert [n for n, _ in icl.named_parameters()] == (["log_scale"] if learnable else [])


def test_scales_at_the_cap_keep_the_reference_gradient() -> None:
    s_img, s_txt, t_img, t_txt = (unit(B, DT, seed=i, grad=True) for i in range(4))
    icl = ICLLoss(temperature=1e-3, learnable=True, max_logit_scale=MAX_SCALE).double()
    assert float(icl.scale().detach()) == pytest.approx(MAX_SCALE)  # started at the cap, not above it
    got = icl(s_img, s_txt, t_img, t_txt)
    (g,) = grads(got, [icl.log_scale])
    assert float(g) != 0.0
    assert_same_value_and_grad(got, ref_icl(s_img, s_txt, t_img, t_txt, icl.log_scale), [icl.log_scale])


def test_pm_gradcheck_with_respect_to_embeddings_and_head() -> None:
    img, txt = unit(B, DS, seed=0, grad=True), unit(B, DS, seed=1, grad=True)
    torch.manual_seed(0)
    pm = PMLoss(DS, fusion="prod_absdiff", negatives="random", per_anchor=2, hidden=3).double()
    # the draws depend only on the seed (random negatives), so every finite-difference probe scores the same pairs
    check_module(
        pm, lambda m, a, b: m(a, b, scale=5.0, generator=torch.Generator().manual_seed(3)), (img, txt)
    )


@pytest.mark.parametrize("per_anchor", [1, 2])
def test_pm_reference_value_and_gradient(per_anchor: int) -> None:
    img, txt = unit(B, DS, seed=0, grad=True), unit(B, DS, seed=1, grad=True)
    pm = linear_pm(DS, per_anchor=per_anchor)
    check_module(
        pm, lambda m, a, b: m(a, b, scale=7.0, generator=torch.Generator().manual_seed(5)), (img, txt)
    )
    got = pm(img, txt, scale=7.0, generator=torch.Generator().manual_seed(5))
    pairs = pm_pairs(img, txt, k=per_anchor, scale=7.0, seed=5)
    assert len(pairs) == B * (1 + 2 * per_anchor)
    assert isinstance(pm.head, nn.Linear)
    want = ref_pm(img, txt, pm.head.weight[0], pm.head.bias[0], pairs)
    assert_same_value_and_grad(got, want, [img, txt, pm.head.weight, pm.head.bias])


# ---- each term inside the total equals its standalone module -----------------------------------------------

CFG = LossCfg(
    clip_weight=1.0,
    fd_weight=30.0,
    crd_weight=0.7,
    icl_weight=1.3,
    pm_weight=0.5,
    crd_student_temperature=0.2,
    crd_teacher_temperature=0.1,
    icl_temperature=0.15,
    learn_temperatures=True,
    max_logit_scale=MAX_SCALE,
    pm_fusion="prod_absdiff",
    pm_negatives="hard",
    pm_negatives_per_anchor=2,
    pm_hidden=0,
    gather=True,
    gather_with_grad=False,
)


def standalone_terms(
    total: WIKDLoss, s_img: Tensor, s_txt: Tensor, log_scale: Tensor, t_img: Tensor, t_txt: Tensor, seed: int
) -> tuple[dict[str, Tensor], dict[str, nn.Module]]:
    """Each term from its own module (built here with explicit arguments, weights copied from ``total``)."""
    assert total.projector is not None and total.crd is not None and total.icl is not None
    assert total.pm is not None
    crd = CRDLoss(
        student_temperature=CFG.crd_student_temperature,
        teacher_temperature=CFG.crd_teacher_temperature,
        learnable=True,
        max_logit_scale=MAX_SCALE,
    )
    crd.load_state_dict(total.crd.state_dict())
    icl = ICLLoss(temperature=CFG.icl_temperature, learnable=True, max_logit_scale=MAX_SCALE)
    icl.load_state_dict(total.icl.state_dict())
    pm = PMLoss(
        DS,
        fusion=CFG.pm_fusion,
        negatives=CFG.pm_negatives,
        per_anchor=2,
        hidden=CFG.pm_hidden,
        head=total.pm.kind,
    )
    pm.load_state_dict(total.pm.state_dict())
    proj = EmbedProjector(DS, DT)
    proj.load_state_dict(total.projector.state_dict())
    p_img, p_txt = proj(s_img, s_txt)
    clip_scale = ref_scale(log_scale)
    values = {
        "clip": ClipLoss(max_logit_scale=MAX_SCALE)(s_img, s_txt, log_scale),
        "fd": FDLoss()(p_img, p_txt, t_img, t_txt),
        "crd": crd(s_img, s_txt, t_img, t_txt),
        "icl": icl(p_img, p_txt, t_img, t_txt),
        # hard negatives are drawn at the (detached) CLIP scale
        "pm": pm(s_img, s_txt, scale=clip_scale.detach(), generator=torch.Generator().manual_seed(seed)),
    }
    return values, {"crd": crd, "icl": icl, "pm": pm, "projector": proj}


def total_and_inputs(seed: int) -> tuple[WIKDLoss, Tensor, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    total = WIKDLoss(CFG, student_dim=DS, teacher_dim=DT)
    s_img = unit(B, DS, seed=seed).float().requires_grad_()
    s_txt = unit(B, DS, seed=seed + 1).float().requires_grad_()
    t_img, t_txt = unit(B, DT, seed=seed + 2).float(), unit(B, DT, seed=seed + 3).float()
    log_scale = torch.tensor(math.log(14.0), requires_grad=True)
    return total, s_img, s_txt, log_scale, t_img, t_txt


def test_every_term_of_the_total_equals_its_standalone_module_in_value_and_gradient() -> None:
    total, s_img, s_txt, log_scale, t_img, t_txt = total_and_inputs(0)
    out = total(
        s_img, s_txt, log_scale, t_img, t_txt, generator=torch.Generator().manual_seed(9), keep_terms=True
    )
    alone, _ = standalone_terms(total, s_img, s_txt, log_scale, t_img, t_txt, seed=9)
    assert {k for k in out if k.startswith("term/")} == {f"term/{k}" for k in alone}
    for name, value in alone.items():
        got, want = out[f"term/{name}"], total.weights[name] * value
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6, msg=name)
        wrt = [s_img, s_txt] + ([log_scale] if name == "clip" else [])
        for i, (g, w) in enumerate(zip(grads(got, wrt), grads(want, wrt), strict=True)):
            assert w.abs().sum() > 0, f"{name}: standalone gradient w.r.t. input {i} is zero"
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, n=name, i=i: f"{n}/{i}: {m}")
    torch.testing.assert_close(out["loss"].detach(), sum(out[f"term/{k}"] for k in alone).detach())
    # the PM comparison discriminates the hard-negative scale: drawing at scale 1 scores other pairs
    assert total.pm is not None
    at_one = total.pm(s_img, s_txt, scale=1.0, generator=torch.Generator().manual_seed(9))
    assert abs(float(at_one.detach()) - float(alone["pm"].detach())) > 1e-4


def test_loss_parameters_get_their_standalone_gradients_inside_the_total() -> None:
    total, s_img, s_txt, log_scale, t_img, t_txt = total_and_inputs(4)
    out = total(
        s_img, s_txt, log_scale, t_img, t_txt, generator=torch.Generator().manual_seed(2), keep_terms=True
    )
    alone, copies = standalone_terms(total, s_img, s_txt, log_scale, t_img, t_txt, seed=2)
    uses = {"crd": ["crd"], "icl": ["icl", "projector"], "pm": ["pm"], "fd": ["projector"]}
    for term, owners in uses.items():
        for owner in owners:
            mine = list(getattr(total, owner).parameters())
            theirs = list(copies[owner].parameters())
            assert mine, owner
            got = grads(out[f"term/{term}"], mine)
            want = grads(total.weights[term] * alone[term], theirs)
            for g, w in zip(got, want, strict=True):
                assert w.abs().sum() > 0, f"{term} -> {owner}"
                torch.testing.assert_close(
                    g, w, rtol=1e-4, atol=1e-7, msg=lambda m, t=term, o=owner: f"{t}->{o}: {m}"
                )
