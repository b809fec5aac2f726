"""Every config error reaches the user as ONE line, exit code 2, naming the key (or file:line:column) and problem.

Each case runs ``siclip train`` through ``siclip.cli.main`` with ``launch`` replaced by a stub that fails the
test, so a config that wrongly validates is caught instead of starting Ray.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from siclip.cli import main

GOOD = "train:\n  max_steps: 3\ndata:\n  batch_size: 8\n"

CASES = [
    # (YAML text or None for a missing file, overrides, the whole stderr line as a regex)
    (
        "train:\n  max_steps: 3\n  run_name: [oops\nloss: {}\n",
        [],
        r"--config: .*/cfg\.yaml:4:5: not valid YAML: expected ',' or '\]', but got ':'",
    ),
    (
        "a: 1\n\tb: 2\n",
        [],
        r"--config: .*/cfg\.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token",
    ),
    ("- just\n- a list\n", [], r"--config: '.*/cfg\.yaml' must hold a mapping at the top level"),
    (None, [], r"--config: got '.*/cfg\.yaml'; no such file"),
    ("train:\n  max_stepz: 3\n", [], r"train\.max_stepz: unknown key; valid keys here: .*max_steps.*"),
    (GOOD, ["train.max_stepz=3"], r"train\.max_stepz: unknown key; valid keys here: .*max_steps.*"),
    (GOOD, ["train.max_steps"], r"train\.max_steps: an override must look like key\.sub=value"),
    (GOOD, ["train.max_steps=abc"], r"train\.max_steps: got 'abc'; expected an integer"),
    (GOOD, ["train.progress=maybe"], r"train\.progress: got 'maybe'; expected true or false"),
    (GOOD, ["optim.lr=fast"], r"optim\.lr: got 'fast'; expected a number"),
    (GOOD, ["optim.lr=-1"], r"optim\.lr: got -1\.0; allowed: > 0\.0"),
    (GOOD, ["loss.pm_negatives=soft"], r"loss\.pm_negatives: got 'soft'; allowed: 'hard', 'random'"),
    (GOOD, ["optim.lr.x=1"], r"optim\.lr: is a value \(.*\), not a section"),
    (GOOD, ["train=3"], r"train: got 3; expected a mapping with keys run_name, .*, progress"),
    (
        GOOD,
        ["train.num_workers=3"],
        r"data\.batch_size: got 8; allowed: a multiple of train\.num_workers \(3\).*",
    ),
    (
        GOOD,
        ["eval.templates=[a photo]"],
        r"eval\.templates\[0\]: got 'a photo'; allowed: a string containing '\{\}'",
    ),
    (
        GOOD,
        ["data.train_shards=[/nonexistent/s-{000..001}.tar]"],
        r"data\.train_shards: got '/nonexistent/s-\{000\.\.001\}\.tar'; no such shard file '/nonexistent/s-000\.tar'",
    ),
]


@pytest.mark.parametrize(("text", "overrides", "line"), CASES, ids=[c[2][:40] for c in CASES])
def test_config_error_is_one_line_with_exit_code_2(
    text: str | None,
    overrides: list[str],
    line: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def launch(cfg: object) -> None:
        raise AssertionError(f"the config validated: {cfg}")

    monkeypatch.setitem(sys.modules, "siclip.train.launch", types.SimpleNamespace(launch=launch))
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["train", "--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"siclip: error: " + line + "\n", err), err
