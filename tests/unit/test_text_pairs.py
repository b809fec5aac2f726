"""The authors' text-tower simplification: MCt's transformer layers become SAS-P blocks whose token mixers
(Q/K only, no value or output projection, alpha/beta/gamma per head) are shared in pairs, 1-2 and 3-4; the
text tower is chosen separately from the image tower (``text_share``, ``text_gains``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from siclip.config import SaspCfg
from siclip.models.info import param_counts, sasp_choice_counts
from siclip.models.mct import build_mct
from siclip.models.presets import build_preset, build_tokenizer
from siclip.models.sasp import SASPBlock
from siclip.models.simplify import shared_tensors, simplify, simplify_tower

torch.set_num_threads(1)
PAIRS = SaspCfg(replace="both", text_share="mixer_pairs", text_gains="unit")


def test_four_mct_layers_share_their_mixers_in_pairs() -> None:
    torch.manual_seed(0)
    tower: Any = build_mct(64, dim=64, context_length=16, num_layers=4, num_heads=4)
    names = simplify_tower(tower, SaspCfg(share="mixer_pairs", qk_init="zero", inherit_mlp=False))
    assert names == [f"transformer.{i}" for i in (1, 2, 3, 4)]  # RepMixer, 4 layers, RepMixer
    blocks = [tower.get_submodule(n) for n in names]
    assert all(isinstance(b, SASPBlock) for b in blocks)
    a, b, c, d = blocks
    assert a.attn is b.attn and c.attn is d.attn and a.attn is not c.attn
    assert a.attn.qk.weight.data_ptr() == b.attn.qk.weight.data_ptr() != c.attn.qk.weight.data_ptr()
    assert a.attn.alpha.data_ptr() == b.attn.alpha.data_ptr()
    for blk in blocks:  # norm and FFN per block; the mixer projects Q and K only
        assert blk.attn.value is None
        assert [m for m in blk.attn.modules() if isinstance(m, nn.Linear)] == [blk.attn.qk]
    assert a.norm is not b.norm and a.mlp is not b.mlp
    groups = {tuple(sorted(g)) for g in shared_tensors(tower)}
    assert ("transformer.1.attn.qk.weight", "transformer.2.attn.qk.weight") in groups
    assert ("transformer.3.attn.qk.weight", "transformer.4.attn.qk.weight") in groups
    with torch.no_grad():  # one tensor: a change through block 1 is seen by block 2, not by block 3
        a.attn.gamma.fill_(0.25)
    assert torch.all(b.attn.gamma == 0.25) and not torch.any(c.attn.gamma == 0.25)
    tokens = torch.randint(0, 1000, (2, 16))
    tower(tokens).sum().backward()
    assert a.attn.qk.weight.grad is not None and c.attn.qk.weight.grad is not None


def test_text_sharing_and_gains_are_chosen_apart_from_the_image_towers() -> None:
    torch.manual_seed(0)
    model: Any = build_preset("tiny-mct")
    simplify(model, dataclasses.replace(PAIRS, share="qk", layer_scale=0.0))
    image = [m for n, m in model.named_modules() if n.startswith("visual.") and isinstance(m, SASPBlock)]
    text = [m for n, m in model.named_modules() if n.startswith("text.") and isinstance(m, SASPBlock)]
    assert len(image) == len(text) == 2
    assert image[0].attn is not image[1].attn and image[0].attn.qk is image[1].attn.qk  # share: qk
    assert text[0].attn is text[1].attn  # text_share: mixer_pairs
    assert float(image[0].mlp_gain.detach()) == pytest.approx(0.1)  # the image tower's gains
    assert all(
        float(t.attn_gain.detach()) == 1.0 and float(t.mlp_gain.detach()) == 1.0 for t in text
    )  # unit: x_att + x_mlp


def test_info_counts_each_choice_and_pairs_save_one_mixer_per_pair(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from siclip.cli import main

    assert main(["info", "--model", "tiny-student", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    choices = out["sasp_choices"]
    assert choices == sasp_choice_counts("tiny-student")
    assert choices["image"]["total"] == out["total"]  # the default simplification is the image tower only
    # naive reference: the same model with a mixer per block, less one mixer (Q/K + 3 per head) per pair
    separate = build_preset("tiny-student", sasp=dataclasses.replace(PAIRS, text_share="none"))
    blocks = [m for n, m in separate.named_modules() if n.startswith("text.") and isinstance(m, SASPBlock)]
    assert len(blocks) == 2
    mixer = sum(p.numel() for p in blocks[0].attn.parameters())
    want = param_counts(separate)["text"] - (len(blocks) // 2) * mixer
    assert choices["image + text, text mixer in pairs"]["text"] == want
    assert choices["image + text, text mixer in pairs"]["image"] == choices["image"]["image"]
    assert choices["image + text, text mixer in pairs"]["text"] < choices["image"]["text"]


def test_pairs_survive_export_and_reload(tmp_path: Path) -> None:
    from siclip.models.export import export_open_clip, load_exported

    torch.manual_seed(0)
    model: Any = build_preset("tiny-student", sasp=PAIRS)
    model.eval()
    reloaded: Any
    reloaded, _ = load_exported(export_open_clip(model, "tiny-student", tmp_path / "export"))
    reloaded.eval()
    text = [m for n, m in reloaded.named_modules() if n.startswith("text.") and isinstance(m, SASPBlock)]
    assert text[0].attn is text[1].attn and float(text[0].mlp_gain.detach()) == 1.0
    tokens = build_tokenizer("tiny-student")(["a red circle", "two dots"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_text(tokens), model.encode_text(tokens))
