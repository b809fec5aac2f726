"""WIKD + PM losses against naive per-sample references written here with Python loops, plus their behaviour
and the errors a caller sees for bad arguments.

The references never call the code under test (PM reuses only the sampled indices, which are checked on
their own below).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from siclip.config import LossCfg
from siclip.losses.clip import ClipLoss
from siclip.losses.crd import CRDLoss
from siclip.losses.fd import EmbedProjector, FDLoss
from siclip.losses.icl import ICLLoss
from siclip.losses.pm import PMLoss, fuse_pairs, sample_negatives
from siclip.losses.total import build_loss

torch.set_num_threads(1)
B, DS, DT = 6, 8, 12


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


# ---- naive references (python loops over the batch) -------------------------------------------------------


def ref_ce_rows(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """Mean over i of -log softmax_j(scale * a_i . b_j)[i]."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        logits = [scale * dot(a[i], b[j]) for j in range(n)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / n


def ref_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    return 0.5 * (ref_ce_rows(img, txt, scale) + ref_ce_rows(txt, img, scale))


def ref_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        sum(
            (float(x) - float(y)) ** 2
            for ra, rb in zip(a, b, strict=True)
            for x, y in zip(ra, rb, strict=True)
        )
        / a.numel()
    )


def ref_softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def ref_kl_rows(s_a, s_b, t_a, t_b, s_scale: float, t_scale: float) -> float:
    n = s_a.shape[0]
    total = 0.0
    for i in range(n):
        p = ref_softmax([t_scale * dot(t_a[i], t_b[j]) for j in range(n)])
        q = ref_softmax([s_scale * dot(s_a[i], s_b[j]) for j in range(n)])
        total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
    return total / n


def ref_crd(s_img, s_txt, t_img, t_txt, s_scale: float, t_scale: float) -> float:
    return 0.5 * (
        ref_kl_rows(s_img, s_txt, t_img, t_txt, s_scale, t_scale)
        + ref_kl_rows(s_txt, s_img, t_txt, t_img, s_scale, t_scale)
    )


def ref_icl(s_img, s_txt, t_img, t_txt, scale: float) -> float:
    return 0.5 * (ref_ce_rows(s_img, t_txt, scale) + ref_ce_rows(s_txt, t_img, scale))


def ref_fuse(v: torch.Tensor, t: torch.Tensor, fusion: str) -> list[float]:
    prod = [float(a) * float(b) for a, b in zip(v, t, strict=True)]
    if fusion == "prod":
        return prod
    if fusion == "concat":
        return [float(a) for a in v] + [float(b) for b in t]
    return prod + [abs(float(a) - float(b)) for a, b in zip(v, t, strict=True)]


def ref_bce(logit: float, label: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


# ---- single terms -----------------------------------------------------------------------------------------


def test_clip_matches_reference_at_the_scale_it_is_given() -> None:
    img, txt = unit(B, DS, seed=0), unit(B, DS, seed=1)
    loss = ClipLoss(max_logit_scale=100.0)
    got = loss(img, txt, torch.tensor(math.log(20.0), dtype=torch.float64))
    assert float(got.detach()) == pytest.approx(ref_clip(img, txt, 20.0), rel=1e-9)
    # no clamp in the forward pass: the parameter is clamped after the optimizer step (SiclipTask)
    above = loss(img, txt, torch.tensor(math.log(500.0), dtype=torch.float64))
    assert float(above.detach()) == pytest.approx(ref_clip(img, txt, 500.0), rel=1e-9)


def test_fd_matches_reference_and_is_zero_for_equal_embeddings() -> None:
    s_img, s_txt, t_img, t_txt = (unit(B, DT, seed=i) for i in range(4))
    got = FDLoss()(s_img, s_txt, t_img, t_txt)
    assert float(got.detach()) == pytest.approx(ref_mse(s_img, t_img) + ref_mse(s_txt, t_txt), rel=1e-9)
    assert abs(float(FDLoss()(t_img, t_txt, t_img, t_txt))) < 1e-6
    with pytest.raises(ValueError, match="equal dims"):
        FDLoss()(unit(B, DS, seed=5), s_txt, t_img, t_txt)


def test_fd_compares_the_last_dimension_of_any_rank() -> None:
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # per-token embeddings: dim 1 is not the width
    torch.testing.assert_close(FDLoss()(s, s, t, t), 2 * ((s - t) ** 2).mean())
    with pytest.raises(ValueError, match="equal dims") as info:
        FDLoss()(s, s, torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert "5" in str(info.value) and "4" in str(info.value)  # both widths


def test_crd_matches_reference_with_separate_temperatures() -> None:
    s_img, s_txt = unit(B, DS, seed=0), unit(B, DS, seed=1)
    t_img, t_txt = unit(B, DT, seed=2), unit(B, DT, seed=3)
    crd = CRDLoss(student_temperature=0.1, teacher_temperature=0.05).double()
    got = crd(s_img, s_txt, t_img, t_txt)
    assert float(got.detach()) == pytest.approx(ref_crd(s_img, s_txt, t_img, t_txt, 10.0, 20.0), rel=1e-6)


def test_crd_is_zero_when_student_equals_teacher() -> None:
    img, txt = unit(B, DT, seed=4), unit(B, DT, seed=5)
    crd = CRDLoss(student_temperature=0.07, teacher_temperature=0.07, learnable=False)
    assert abs(float(crd(img.float(), txt.float(), img.float(), txt.float()))) < 1e-6


def test_icl_matches_reference_with_exponentiated_scale() -> None:
    s_img, s_txt, t_img, t_txt = (unit(B, DS, seed=i) for i in range(4))
    icl = ICLLoss(temperature=0.05).double()
    got = icl(s_img, s_txt, t_img, t_txt)
    assert float(got.detach()) == pytest.approx(ref_icl(s_img, s_txt, t_img, t_txt, 20.0), rel=1e-6)
    # CLIP-KD's bug would use log(20) ~ 3.0 as the scale; make sure we are far from it.
    assert float(got.detach()) != pytest.approx(ref_icl(s_img, s_txt, t_img, t_txt, math.log(20.0)), rel=1e-3)


def test_icl_temperature_starts_at_the_cap_and_keeps_learning_there() -> None:
    s_img, s_txt, t_img, t_txt = (unit(B, DS, seed=i).float() for i in range(4))
    icl = ICLLoss(temperature=0.001, max_logit_scale=100.0)
    assert float(icl.scale().detach()) == pytest.approx(100.0)
    got = icl(s_img, s_txt, t_img, t_txt)
    assert float(got.detach()) == pytest.approx(ref_icl(s_img, s_txt, t_img, t_txt, 100.0), rel=1e-5)
    got.backward()
    assert icl.log_scale.grad is not None and float(icl.log_scale.grad) != 0.0
    out = build_loss(LossCfg(icl_temperature=0.001), student_dim=DS, teacher_dim=DS)(
        s_img, s_txt, torch.tensor(math.log(1 / 0.07)), t_img, t_txt
    )
    assert float(out["temp/icl"]) == pytest.approx(0.01)


# ---- PM ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fusion", "hidden", "per_anchor"), [("prod_absdiff", 0, 1), ("concat", 0, 2), ("prod", 5, 3)]
)
def test_pm_matches_reference_bce(fusion: str, hidden: int, per_anchor: int) -> None:
    torch.manual_seed(0)
    img, txt = unit(B, DS, seed=0), unit(B, DS, seed=1)
    pm = PMLoss(DS, fusion=fusion, per_anchor=per_anchor, hidden=hidden).double()  # type: ignore[arg-type]
    got = pm(img, txt, scale=10.0, generator=torch.Generator().manual_seed(7))
    # the same draws, in the same order as PMLoss makes them
    g = torch.Generator().manual_seed(7)
    sim = img @ txt.T
    neg_txt = sample_negatives(sim, k=per_anchor, mode="hard", scale=10.0, generator=g)
    neg_img = sample_negatives(sim.T, k=per_anchor, mode="hard", scale=10.0, generator=g)

    def head(v: torch.Tensor, t: torch.Tensor) -> float:
        feat = torch.tensor(ref_fuse(v, t, fusion), dtype=torch.float64)
        with torch.no_grad():
            return float(pm.head(feat))

    pairs = [(i, i, 1.0) for i in range(B)]
    pairs += [(i, int(j), 0.0) for i in range(B) for j in neg_txt[i]]
    pairs += [(int(j), i, 0.0) for i in range(B) for j in neg_img[i]]
    want = sum(ref_bce(head(img[a], txt[b]), y) for a, b, y in pairs) / len(pairs)
    assert len(pairs) == B * (1 + 2 * per_anchor)
    assert float(got.detach()) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("mode", ["hard", "random"])
def test_negatives_are_never_the_positive_and_are_distinct(mode: str) -> None:
    sim = unit(B, DS, seed=0) @ unit(B, DS, seed=1).T
    sim.fill_diagonal_(1.0)  # the positive is the most similar item: it must still never be drawn
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = sample_negatives(sim, k=3, mode=mode, scale=50.0, generator=g)  # type: ignore[arg-type]
        assert idx.shape == (B, 3)
        for i in range(B):
            assert i not in idx[i].tolist()
            assert len(set(idx[i].tolist())) == 3


def test_hard_negatives_pick_the_most_similar_wrong_item_when_peaked() -> None:
    n = 8
    sim = torch.zeros(n, n)
    hardest = [(i + 3) % n for i in range(n)]
    for i in range(n):
        sim[i, i] = 1.0
        sim[i, hardest[i]] = 0.9
    idx = sample_negatives(sim, k=1, mode="hard", scale=1000.0, generator=torch.Generator().manual_seed(1))
    assert idx[:, 0].tolist() == hardest
    # with k=2 the second draw still has mass (no exact-zero underflow crash)
    idx2 = sample_negatives(sim, k=2, mode="hard", scale=1000.0, generator=torch.Generator().manual_seed(1))
    assert idx2[:, 0].tolist() == hardest


@pytest.mark.parametrize("lo", [0, 2], ids=["all_rows", "local_rows"])
def test_hard_negative_frequencies_follow_the_softmax_similarity(lo: int) -> None:
    """Also for one rank's rows of the global matrix (``loss.local``, offset ``lo``): same distribution per row."""
    sim = torch.tensor(
        [[1.0, 0.5, 0.0, -0.5], [0.2, 1.0, 0.0, 0.4], [0.0, 0.3, 1.0, -0.3], [0.1, 0.0, 0.2, 1.0]]
    )
    scale = 3.0
    g = torch.Generator().manual_seed(0)
    draws = 4000
    counts = torch.zeros(4, 4)
    for _ in range(draws):
        idx = sample_negatives(sim[lo:], k=1, mode="hard", scale=scale, generator=g, offset=lo)
        counts[torch.arange(lo, 4), idx[:, 0]] += 1
    for i in range(lo, 4):
        others = [j for j in range(4) if j != i]
        expected = ref_softmax([scale * float(sim[i, j]) for j in others])
        for j, p in zip(others, expected, strict=True):
            assert float(counts[i, j]) / draws == pytest.approx(p, abs=0.03)
        assert counts[i, i] == 0


def test_sampling_is_reproducible_from_a_generator_or_the_global_seed() -> None:
    sim = unit(B, DS, seed=0) @ unit(B, DS, seed=1).T
    a = sample_negatives(sim, k=2, mode="hard", generator=torch.Generator().manual_seed(3))
    b = sample_negatives(sim, k=2, mode="hard", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = sample_negatives(sim, k=2, mode="random")
    torch.manual_seed(11)
    d = sample_negatives(sim, k=2, mode="random")
    assert torch.equal(c, d)


def test_all_but_the_positive_can_be_drawn_even_when_the_softmax_underflows() -> None:
    n = 6
    peaked = torch.eye(n) + 0.9 * torch.roll(torch.eye(n), 2, dims=1)  # one hard negative per row
    idx = sample_negatives(
        peaked, k=n - 1, mode="hard", scale=1000.0, generator=torch.Generator().manual_seed(0)
    )
    for i, row in enumerate(idx.tolist()):
        assert row[0] == (i + 2) % n and sorted(row) == [j for j in range(n) if j != i]


def test_pm_asked_for_more_negatives_than_the_batch_has_uses_every_other_item() -> None:
    torch.manual_seed(0)
    big = PMLoss(DS, negatives="random", per_anchor=5, hidden=0)
    small = PMLoss(DS, negatives="random", per_anchor=2, hidden=0)
    small.load_state_dict(big.state_dict())
    img, txt = unit(3, DS, seed=0).float(), unit(3, DS, seed=1).float()
    # a batch of 3 has 2 negatives per anchor: asking for 5 is the same as asking for 2
    got = big(img, txt, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, small(img, txt, generator=torch.Generator().manual_seed(1)))


def test_pm_and_sampling_errors_name_the_problem() -> None:
    def raises(call: object, *names: str) -> None:
        with pytest.raises(ValueError) as info:
            call()  # type: ignore[operator]
        assert all(name in str(info.value) for name in names) and "\n" not in str(info.value), info.value

    raises(lambda: sample_negatives(torch.zeros(3, 4), k=1, mode="hard", offset=2), "(3, 4)", "offset 2")
    for shape in ((4,), (2, 4, 4)):  # not a matrix: the same one-line error, not an IndexError
        raises(lambda shape=shape: sample_negatives(torch.zeros(shape), k=1, mode="hard"), str(shape))
    for k in (0, 4):
        raises(lambda k=k: sample_negatives(torch.zeros(4, 4), k=k, mode="hard"), f"k={k}", "m=4")
    raises(lambda: sample_negatives(torch.zeros(4, 4), k=1, mode="soft"), "'soft'", "hard", "random")
    raises(lambda: PMLoss(4, negatives="soft"), "'soft'", "hard", "random")
    raises(lambda: fuse_pairs(torch.zeros(1, 2), torch.zeros(1, 2), "sum"), "'sum'", "prod_absdiff", "concat")


def test_pm_learns_to_separate_matching_pairs() -> None:
    torch.manual_seed(0)
    n, d = 32, 16
    img = F.normalize(torch.randn(n, d), dim=-1)
    txt = F.normalize(img + 0.1 * torch.randn(n, d), dim=-1)  # matching pairs are near each other
    pm = PMLoss(d, negatives="hard", per_anchor=2)
    opt = torch.optim.Adam(pm.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = pm(img, txt, scale=10.0, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 0.2


# ---- the total --------------------------------------------------------------------------------------------


def batch(student_dim: int = DS, teacher_dim: int = DS) -> tuple[torch.Tensor, ...]:
    s_img, s_txt = unit(B, student_dim, seed=10).float(), unit(B, student_dim, seed=11).float()
    t_img, t_txt = unit(B, teacher_dim, seed=12).float(), unit(B, teacher_dim, seed=13).float()
    return s_img.requires_grad_(), s_txt.requires_grad_(), t_img.requires_grad_(), t_txt.requires_grad_()


def test_total_is_the_weighted_sum_of_reference_terms() -> None:
    torch.manual_seed(0)
    cfg = LossCfg(crd_student_temperature=0.1, crd_teacher_temperature=0.05, icl_temperature=0.08)
    loss = build_loss(cfg, student_dim=DS, teacher_dim=DS)
    s_img, s_txt, t_img, t_txt = batch()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = loss(s_img, s_txt, log_scale, t_img, t_txt, generator=torch.Generator().manual_seed(0))
    assert set(out) == {
        "loss",
        *(f"{k}_loss" for k in ("clip", "fd", "crd", "icl", "pm")),
        "temp/clip",
        "temp/icl",
        "temp/crd_student",
    }
    d = {k: v.double().detach() for k, v in (("si", s_img), ("st", s_txt), ("ti", t_img), ("tt", t_txt))}
    want = {
        "clip_loss": ref_clip(d["si"], d["st"], 1 / 0.07),
        "fd_loss": ref_mse(d["si"], d["ti"]) + ref_mse(d["st"], d["tt"]),
        "crd_loss": ref_crd(d["si"], d["st"], d["ti"], d["tt"], 10.0, 20.0),
        "icl_loss": ref_icl(d["si"], d["st"], d["ti"], d["tt"], 1 / 0.08),
    }
    for key, value in want.items():
        assert float(out[key]) == pytest.approx(value, rel=1e-4), key
    total = sum(getattr(cfg, f"{k[:-5]}_weight") * float(out[k]) for k in (*want, "pm_loss"))
    assert float(out["loss"].detach()) == pytest.approx(total, rel=1e-5)
    assert (cfg.clip_weight, cfg.fd_weight, cfg.crd_weight, cfg.icl_weight, cfg.pm_weight) == (
        1,
        4000,
        1,
        1,
        0.1,
    )
    for key, temp in (("temp/clip", 0.07), ("temp/icl", 0.08), ("temp/crd_student", 0.1)):
        assert out[key].dim() == 0 and float(out[key]) == pytest.approx(temp, rel=1e-5)


def test_gradients_reach_student_and_loss_parameters_never_the_teacher() -> None:
    torch.manual_seed(0)
    loss = build_loss(LossCfg(pm_head="linear", pm_hidden=4), student_dim=DS, teacher_dim=DT)
    s_img, s_txt, t_img, t_txt = batch(DS, DT)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = loss(s_img, s_txt, log_scale, t_img, t_txt)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert t_img.grad is None and t_txt.grad is None
    for x in (s_img, s_txt, log_scale):
        assert x.grad is not None and x.grad.abs().sum() > 0
    names = {n for n, _ in loss.named_parameters()}
    assert {
        "crd.student_log_scale",
        "icl.log_scale",
        "projector.image.weight",
        "projector.text.weight",
        "pm.head.0.weight",
        "pm.head.2.weight",
    } <= names
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fixed_temperatures_are_buffers_not_parameters() -> None:
    loss = build_loss(LossCfg(learn_temperatures=False, pm_weight=0.0), student_dim=DS, teacher_dim=DS)
    assert list(loss.parameters()) == []
    assert {"crd.student_log_scale", "icl.log_scale"} <= {n for n, _ in loss.named_buffers()}


def test_projector_maps_student_to_teacher_dim_and_renormalises() -> None:
    torch.manual_seed(0)
    loss = build_loss(LossCfg(crd_weight=0.0, icl_weight=0.0, pm_weight=0.0), student_dim=DS, teacher_dim=DT)
    s_img, s_txt, t_img, t_txt = batch(DS, DT)
    out = loss(s_img, s_txt, torch.tensor(2.0), t_img, t_txt)
    assert loss.projector is not None
    p_img = F.normalize(s_img @ loss.projector.image.weight.T, dim=-1).detach().double()
    p_txt = F.normalize(s_txt @ loss.projector.text.weight.T, dim=-1).detach().double()
    want = ref_mse(p_img, t_img.detach().double()) + ref_mse(p_txt, t_txt.detach().double())
    assert float(out["fd_loss"]) == pytest.approx(want, rel=1e-5)
    assert build_loss(LossCfg(), student_dim=DS, teacher_dim=DS).projector is None


def test_zero_weights_and_missing_teacher_skip_terms() -> None:
    s_img, s_txt, t_img, t_txt = batch()
    scale = torch.tensor(2.0)
    no_kd = build_loss(LossCfg(), student_dim=DS, teacher_dim=None)
    assert no_kd.fd is None and no_kd.crd is None and no_kd.icl is None
    out = no_kd(s_img, s_txt, scale)
    assert {k for k in out if k.endswith("_loss")} == {"clip_loss", "pm_loss"}
    with pytest.raises(ValueError, match="teacher_dim=None"):
        no_kd(s_img, s_txt, scale, t_img, t_txt)
    with_kd = build_loss(LossCfg(crd_weight=0.0, pm_weight=0.0), student_dim=DS, teacher_dim=DS)
    assert with_kd.crd is None and with_kd.pm is None
    out = with_kd(s_img, s_txt, scale, t_img, t_txt)
    assert {k for k in out if k.endswith("_loss")} == {"clip_loss", "fd_loss", "icl_loss"}
    out = with_kd(s_img, s_txt, scale)  # a step without teacher embeddings: KD terms are skipped
    assert {k for k in out if k.endswith("_loss")} == {"clip_loss"}
    assert float(out["loss"].detach()) == pytest.approx(float(out["clip_loss"]))
    with pytest.raises(ValueError, match="no loss term"):
        build_loss(LossCfg(clip_weight=0.0, pm_weight=0.0), student_dim=DS, teacher_dim=DS)(
            s_img, s_txt, scale
        )


def test_total_loss_argument_errors_name_the_problem() -> None:
    loss = build_loss(LossCfg(), student_dim=DS, teacher_dim=DT)
    s_img, s_txt, t_img, t_txt = batch(DS, DT)
    scale = torch.tensor(math.log(10.0))
    for one in ((t_img, None), (None, t_txt)):
        with pytest.raises(ValueError, match="both teacher embeddings or neither"):
            loss(s_img, s_txt, scale, *one)
    wrong = unit(B, 7, seed=3).float()
    with pytest.raises(ValueError, match="teacher dim") as info:
        loss(s_img, s_txt, scale, wrong, wrong)
    assert "7" in str(info.value) and str(DT) in str(info.value)


def test_the_total_builds_the_terms_and_projector_the_config_asks_for() -> None:
    def params(cfg: LossCfg) -> set[str]:
        return {
            n.split(".")[0] for n, _ in build_loss(cfg, student_dim=DS, teacher_dim=DT).named_parameters()
        }

    # the student is projected into the teacher's dimension for FD and ICL, and only for them
    assert "projector" in params(LossCfg(fd_weight=0.0)) and "projector" in params(LossCfg(icl_weight=0.0))
    assert "projector" not in params(LossCfg(icl_weight=0.0, fd_weight=0.0))
    assert build_loss(LossCfg(fd_weight=0.5), student_dim=DS, teacher_dim=DT).fd is not None  # any weight > 0


def test_the_terms_respect_max_logit_scale() -> None:
    s_img, s_txt, t_img, t_txt = batch()
    hot = LossCfg(max_logit_scale=50.0, crd_student_temperature=1e-3, icl_temperature=1e-3)
    out = build_loss(hot, student_dim=DS, teacher_dim=DS)(
        s_img, s_txt, torch.tensor(math.log(20.0)), t_img, t_txt
    )
    assert float(out["temp/icl"]) == pytest.approx(1 / 50) and float(
        out["temp/crd_student"]
    ) == pytest.approx(1 / 50)


def test_projector_normalises_the_last_dimension_of_any_rank() -> None:
    proj = EmbedProjector(DS, DT)
    x = torch.randn(2, 3, DS)
    img, txt = proj(x, x)
    for out in (img, txt):
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 3))
    neg_img, _ = proj(-x, -x)  # a linear map (no bias): the opposite input points the opposite way
    torch.testing.assert_close(neg_img, -img)


def test_loss_runs_in_fp32_inside_autocast() -> None:
    torch.manual_seed(0)
    loss = build_loss(LossCfg(), student_dim=DS, teacher_dim=DT)
    s_img, s_txt, t_img, t_txt = batch(DS, DT)
    scale = torch.tensor(math.log(1 / 0.07))
    plain = loss(s_img, s_txt, scale, t_img, t_txt, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(s_img, s_txt, scale, t_img, t_txt, generator=torch.Generator().manual_seed(0))
    for key, value in plain.items():
        assert mixed[key].dtype == torch.float32
        torch.testing.assert_close(mixed[key].detach(), value.detach(), rtol=1e-6, atol=1e-6, msg=key)
