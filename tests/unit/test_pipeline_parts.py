"""The data build's Ray-free parts that ``run_pipeline`` and its actors are made of (``siclip/data/commit.py``,
``siclip/data/prepare.py``), called directly.

The integration test runs them inside Ray Data; here each one is pinned on its own: naming and joining shard
paths, a shard row as the read stage hands it on, writing and committing a shard
(a flaky store survived, a broken one reported, the counts check), the inputs' checks, refusing to mix two
datasets in one folder, the manifest's totals and its retried write, and the message naming unfinished
shards. Ray's retries of a failed read, end to end, are in tests/integration/test_pipeline.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import siclip.data.commit as commit
import siclip.data.prepare as prepare
from siclip.config import ConfigError, from_dict, to_dict
from siclip.data.shards import Manifest, ShardIOError, iter_raw_samples, read_manifest, write_manifest
from tests.data_fixtures import good_sample, noise_jpeg, write_tar


def _cfg(**caption: Any) -> Any:
    return from_dict({"caption": caption, "teacher": {"name": "tiny-teacher", "source": "t.pt"}})


# ---- names, images ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("s3://bucket/cc12m/00012.tar", "00012.tar"),
        ("data/in/00012.tar/", "00012.tar"),
        ("00012.tar", "00012.tar"),
        ("pipe:aws s3 cp s3://bucket/cc12m/00012.tar -", "00012.tar"),
        ("pipe:curl -fsSL 'https://host/cc12m/00012.tar?sig=a/b' ", "00012.tar"),
        ('pipe:cat "/data/my shards/00012.tar.gz"', "00012.tar.gz"),
    ],
)
def test_output_name_is_the_inputs_base_name(url: str, name: str) -> None:
    assert commit.output_name(url) == name


def test_a_pipe_that_names_no_tar_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"^caption\.input_shards: got 'pipe:cat -'; a pipe: command must name"
    ):
        commit.output_name("pipe:cat -")


@pytest.mark.parametrize(("out_dir", "want"), [("s3://b/out/", "s3://b/out/a.tar"), ("out", "out/a.tar")])
def test_join_puts_one_slash_between(out_dir: str, want: str) -> None:
    assert commit.shard_path(out_dir, "a.tar") == want


# ---- the read stage's row -------------------------------------------------------------------------------------


def _shard(tmp_path: Path, keys: list[str], name: str = "00000.tar") -> str:
    members = [m for i, k in enumerate(keys) for m in good_sample(k, i)]
    odd = [
        ("small.jpg", noise_jpeg(7, (40, 11))),
        ("small.txt", b"x"),
        ("wide.jpg", noise_jpeg(8, (120, 30))),
        ("wide.txt", b"x"),
    ]
    path = tmp_path / name
    write_tar(path, [*members, ("bad.txt", b"a caption without an image"), *odd])
    return str(path)


def test_prepare_row_hands_on_the_shard_as_one_row(tmp_path: Path) -> None:
    url = _shard(tmp_path, ["a", "b"])  # a, b: 40x28
    row = prepare.prepare_row(
        {"url": url, "name": "00000.tar"},
        image_size=16,
        center_crop=True,
        min_image_size=12,
        max_aspect_ratio=3.5,
        retry_delay_s=0.0,
    )
    assert row["shard"] == "00000.tar" and row["samples_in"] == 5
    assert row["skipped"] == '{"bad_aspect": 1, "missing_image": 1, "too_small": 1}'
    assert row["keys"] == ["a", "b"] and row["txt"] == ["photo a", "photo b"]
    assert [json.loads(m) for m in row["json"]] == [{"url": "http://x/a.jpg"}, {"url": "http://x/b.jpg"}]
    assert [Image.open(io.BytesIO(j)).size for j in row["jpg"]] == [(16, 16)] * 2  # center-cropped to 16


def test_prepare_row_raises_a_retryable_error_naming_an_unreadable_shard(tmp_path: Path) -> None:
    """ShardIOError is what Ray retries (``retry_exceptions``); the message names the shard."""
    missing = str(tmp_path / "gone.tar")
    with pytest.raises(ShardIOError, match=r"gone\.tar"):
        prepare.prepare_row(
            {"url": missing, "name": "gone.tar"},
            image_size=16,
            center_crop=False,
            min_image_size=0,
            max_aspect_ratio=10.0,
            retry_delay_s=0.0,
        )


# ---- writing and committing a shard ---------------------------------------------------------------------------


def _row(
    n: int = 2, *, skipped: dict[str, int] | None = None, samples_in: int | None = None
) -> dict[str, Any]:
    skipped = {"not_image": 1, "empty_caption": 2} if skipped is None else skipped
    return {
        "shard": "00003.tar",
        "samples_in": n + sum(skipped.values()) if samples_in is None else samples_in,
        "skipped": json.dumps(skipped),
        "keys": [f"k{i}" for i in range(n)],
        "jpg": [bytes([i]) * 4 for i in range(n)],
        "txt": [f"t{i}" for i in range(n)],
        "json": [json.dumps({"i": i}) for i in range(n)],
        "syn": [json.dumps({"syn_text": [f"s{i}"]}) for i in range(n)],
        "npz": [bytes([100 + i]) * 3 for i in range(n)],
    }


@pytest.mark.parametrize("with_npz", [False, True])
def test_write_shard_writes_every_sample_and_returns_its_entry(tmp_path: Path, with_npz: bool) -> None:
    path = str(tmp_path / "00003.tar")
    entry = commit.write_shard(path, _row(), with_npz=with_npz)
    data = Path(path).read_bytes()
    assert entry == {
        "name": "00003.tar",
        "samples": 2,
        "samples_in": 5,
        "skipped": {"empty_caption": 2, "not_image": 1},
        "bytes": len(data),  # what a resume checks the file against
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert list(entry["skipped"]) == ["empty_caption", "not_image"]  # sorted
    got = list(iter_raw_samples(path))
    assert [s["__key__"] for s in got] == ["k0", "k1"]
    exts = {"jpg", "txt", "json", "syn.json"} | ({"npz"} if with_npz else set())
    assert all(set(s) - {"__key__", "__url__"} == exts for s in got)
    assert got[1]["jpg"] == b"\x01" * 4 and got[1]["txt"] == b"t1" and got[1]["json"] == b'{"i": 1}'
    assert json.loads(got[0]["syn.json"]) == {"syn_text": ["s0"]}
    if with_npz:
        assert got[1]["npz"] == bytes([101]) * 3


def test_write_shard_refuses_counts_that_do_not_add_up_and_leaves_no_file(tmp_path: Path) -> None:
    path = str(tmp_path / "00003.tar")
    with pytest.raises(RuntimeError, match=r"^.*00003\.tar: samples_in 9 != samples_out 2 \+ skipped 3$"):
        commit.write_shard(path, _row(samples_in=9), with_npz=False)
    assert list(tmp_path.iterdir()) == []


def test_commit_shard_survives_as_many_store_failures_as_it_may_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``caption.max_retries`` = 2: a store that drops the first two writes still gets the shard."""
    failures = [ConnectionError("dropped")] * 2
    real = commit.write_shard

    def flaky(path: str, row: dict[str, Any], *, with_npz: bool) -> dict[str, Any]:
        if failures:
            raise failures.pop()
        return real(path, row, with_npz=with_npz)

    monkeypatch.setattr(commit, "write_shard", flaky)
    out = commit.commit_shard(str(tmp_path) + "/", _row(), with_npz=True, max_retries=2, retry_delay_s=0.0)
    assert json.loads(out["entry"])["samples"] == 2 and out["error"] == "" and out["name"] == "00003.tar"
    assert [s["__key__"] for s in iter_raw_samples(str(tmp_path / "00003.tar"))] == ["k0", "k1"]


def test_commit_shard_gives_up_with_an_error_row_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries spent, the shard comes back as a failed write (the driver counts them to stop early)."""

    def broken(path: str, row: dict[str, Any], *, with_npz: bool) -> dict[str, Any]:
        raise PermissionError("no credentials")

    monkeypatch.setattr(commit, "write_shard", broken)
    out = commit.commit_shard("s3://b/out", _row(), with_npz=False, max_retries=1, retry_delay_s=0.0)
    assert out == {
        "name": "00003.tar",
        "entry": "",
        "error": "s3://b/out/00003.tar: cannot write (PermissionError: no credentials)",
    }


def test_commit_shard_raises_a_counts_bug_instead_of_reporting_a_failed_write(tmp_path: Path) -> None:
    """A bug is not a flaky store: it fails the task (and the build names the shard), and leaves no file."""
    with pytest.raises(RuntimeError, match="samples_in 9"):
        commit.commit_shard(
            str(tmp_path), _row(samples_in=9), with_npz=False, max_retries=3, retry_delay_s=0.0
        )
    assert list(tmp_path.iterdir()) == []


# ---- inputs and an earlier run --------------------------------------------------------------------------------


def test_resolve_inputs_pairs_each_url_with_its_output_name(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    cfg = _cfg(
        input_shards=[str(tmp_path / "0000{0..1}.tar"), str(tmp_path / "*2.tar"), "s3://b/x/00009.tar"]
    )
    assert commit.resolve_inputs(cfg) == [
        (str(tmp_path / "00000.tar"), "00000.tar"),
        (str(tmp_path / "00001.tar"), "00001.tar"),
        (str(tmp_path / "00002.tar"), "00002.tar"),
        ("s3://b/x/00009.tar", "00009.tar"),  # a URI is not checked locally
    ]


def test_resolve_inputs_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^caption\.input_shards: got \[.*\*\.tar'\]; no input shards matched$"
    ):
        commit.resolve_inputs(_cfg(input_shards=[str(tmp_path / "*.tar")]))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in "ab":
        (tmp_path / d / "00000.tar").write_bytes(b"")
    missing = [str(tmp_path / "a" / "00000.tar"), str(tmp_path / "x.tar"), str(tmp_path / "y.tar")]
    with pytest.raises(
        ConfigError, match=r"^caption\.input_shards: no such shard file '.*/x\.tar' \(2 missing\)$"
    ):
        commit.resolve_inputs(_cfg(input_shards=missing))
    with pytest.raises(
        ConfigError,
        match=r"^caption\.input_shards: two inputs share the shard name '00000\.tar'; output shards keep the input's base name, so names must be unique$",
    ):
        commit.resolve_inputs(_cfg(input_shards=[str(tmp_path / "[ab]" / "00000.tar")]))


def _previous(out_dir: Path, cfg: Any, shards: list[dict[str, Any]]) -> None:
    config = {"caption": to_dict(cfg.caption), "teacher": to_dict(cfg.teacher)}
    write_manifest(str(out_dir), Manifest(kind="cc12m-syn", shards=shards, config=config))


def test_load_previous_reads_an_earlier_run_by_shard_name(tmp_path: Path) -> None:
    cfg = _cfg(seed=3)
    assert commit.load_previous(str(tmp_path), cfg) == {}  # no manifest yet
    shards = [{"name": "00000.tar", "samples": 1}, {"name": "00001.tar", "samples": 2}]
    _previous(tmp_path, cfg, shards)
    assert commit.load_previous(str(tmp_path), _cfg(seed=3, num_actors=4)) == {s["name"]: s for s in shards}


def test_load_previous_takes_a_manifest_without_caption_settings(tmp_path: Path) -> None:
    """A folder whose manifest records no caption settings (hand-made, older) has nothing to contradict."""
    write_manifest(str(tmp_path), Manifest(kind="cc12m-syn", shards=[{"name": "a.tar", "samples": 1}]))
    assert commit.load_previous(str(tmp_path), _cfg(seed=9)) == {"a.tar": {"name": "a.tar", "samples": 1}}


@pytest.mark.parametrize(
    ("before", "now", "message"),
    [
        ({"seed": 3}, {"seed": 4}, "caption.seed: got 4 but {dir} was built with 3;"),
        ({}, {"num_captions": 2}, "caption.num_captions: got 2 but {dir} was built with 5;"),
        (
            {},
            {"teacher_embeddings": True},
            "caption.teacher_embeddings: got True but {dir} was built with False;",
        ),
    ],
)
def test_load_previous_refuses_a_folder_built_differently(
    tmp_path: Path, before: dict[str, Any], now: dict[str, Any], message: str
) -> None:
    _previous(tmp_path, _cfg(**before), [])
    with pytest.raises(ConfigError) as info:
        commit.load_previous(str(tmp_path), _cfg(**now))
    assert str(info.value).startswith(message.format(dir=tmp_path))
    assert str(info.value).endswith("rather than mixing two datasets")


def test_load_previous_checks_the_teacher_only_when_embeddings_are_stored(tmp_path: Path) -> None:
    cfg = _cfg(teacher_embeddings=True)
    _previous(tmp_path, cfg, [])
    other = from_dict(
        {"caption": {"teacher_embeddings": True}, "teacher": {"name": "tiny-teacher", "source": "u.pt"}}
    )
    with pytest.raises(ConfigError, match=r"^teacher\.source: got 'u\.pt' but .* was built with 't\.pt'; "):
        commit.load_previous(str(tmp_path), other)
    _previous(tmp_path, _cfg(), [])  # no embeddings stored: the teacher does not matter
    plain_other = from_dict({"caption": {}, "teacher": {"name": "tiny-teacher", "source": "u.pt"}})
    assert commit.load_previous(str(tmp_path), plain_other) == {}


# ---- the manifest -------------------------------------------------------------------------------------------


def test_build_manifest_keeps_the_input_order_and_adds_up(tmp_path: Path) -> None:
    records = {
        "b.tar": {"name": "b.tar", "samples": 3, "samples_in": 5, "skipped": {"not_image": 2}},
        "a.tar": {"name": "a.tar", "samples": 4, "samples_in": 5, "skipped": {"not_image": 1, "bad_json": 0}},
        "c.tar": {"name": "c.tar", "samples": 2},  # an older record without samples_in: nothing skipped
    }
    cfg = _cfg()
    m = commit.build_manifest(cfg, ["a.tar", "missing.tar", "b.tar", "c.tar"], records, {"who": "test"})
    assert [s["name"] for s in m.shards] == ["a.tar", "b.tar", "c.tar"]
    assert (m.samples_in, m.samples_out, m.samples_skipped) == (12, 9, 3)
    assert m.skipped == {"bad_json": 0, "not_image": 3} and list(m.skipped) == ["bad_json", "not_image"]
    assert m.kind == "cc12m-syn" and m.producer == {"who": "test"}
    assert m.config == {"caption": to_dict(cfg.caption)}  # no teacher without stored embeddings
    with_teacher = _cfg(teacher_embeddings=True)
    assert commit.build_manifest(with_teacher, [], records, {}).config["teacher"] == to_dict(
        with_teacher.teacher
    )


def test_build_manifest_refuses_totals_that_do_not_add_up() -> None:
    records = {"a.tar": {"name": "a.tar", "samples": 4, "samples_in": 6, "skipped": {"not_image": 1}}}
    with pytest.raises(RuntimeError, match=r"^manifest totals do not add up: in 6 != out 4 \+ skipped 1$"):
        commit.build_manifest(_cfg(), ["a.tar"], records, {})


def test_try_write_manifest_survives_a_flaky_store_and_reports_a_broken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = Manifest(
        kind="cc12m-syn", shards=[{"name": "a.tar", "samples": 1}], samples_in=1, samples_out=1
    )
    assert commit.try_write_manifest(str(tmp_path), manifest, attempts=3, delay_s=0.0)
    assert read_manifest(str(tmp_path)) == manifest
    (tmp_path / "manifest.json").unlink()
    failures = [OSError("throttled")] * 2
    real = commit.write_manifest

    def flaky(out_dir: str, m: Manifest) -> str:
        if failures:
            raise failures.pop()
        return real(out_dir, m)

    monkeypatch.setattr(commit, "write_manifest", flaky)
    assert commit.try_write_manifest(str(tmp_path), manifest, attempts=3, delay_s=0.0)
    assert read_manifest(str(tmp_path)) == manifest  # two failures, written by the third attempt
    (tmp_path / "manifest.json").unlink()
    failures.extend([OSError("down")] * 3)
    assert not commit.try_write_manifest(str(tmp_path), manifest, attempts=3, delay_s=0.0)
    assert not (tmp_path / "manifest.json").exists()


def test_unfinished_error_names_up_to_five_shards_of_each_kind() -> None:
    failed = [f"{i:05d}.tar" for i in range(7)]
    got = str(commit.unfinished_error("s3://b/out", failed, ["x.tar"]))
    assert got == (
        "siclip data: 7 shards could not be built (00000.tar, 00001.tar, 00002.tar, 00003.tar, 00004.tar, ...); "
        "1 built shards could not be recorded in s3://b/out/manifest.json (x.tar); "
        "see the errors above, then run the same command again to finish them"
    )
    only = str(commit.unfinished_error("out", failed[:5], []))
    assert only.startswith(
        "siclip data: 5 shards could not be built (00000.tar, 00001.tar, 00002.tar, 00003.tar, 00004.tar); see"
    )
    recorded = str(commit.unfinished_error("out", [], failed[:6]))  # one past five: the list is cut
    assert recorded == (
        "siclip data: 6 built shards could not be recorded in out/manifest.json (00000.tar, 00001.tar, "
        "00002.tar, 00003.tar, 00004.tar, ...); see the errors above, then run the same command again to finish them"
    )
    assert isinstance(commit.unfinished_error("o", ["a"], []), commit.ShardBuildError)


# ---- one sample: validation and resizing ------------------------------------------------------------------------


def _image_bytes(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 7 if mode in ("L", "P") else None).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ({"__duplicate__": b"", "jpg": b"x", "txt": b"c"}, "duplicate_key"),
        ({"txt": b"c"}, "missing_image"),
        ({"jpg": b"", "txt": b"c"}, "empty_image"),
        ({"png": _image_bytes((4, 4))}, "missing_caption"),
        ({"png": _image_bytes((4, 4)), "txt": b"\xff\xfe"}, "undecodable_text"),
        ({"png": _image_bytes((4, 4)), "txt": b" \n"}, "empty_caption"),
        ({"png": _image_bytes((4, 4)), "txt": b"c", "json": b"[1]"}, "bad_json"),
        ({"png": b"not a png", "txt": b"c"}, "not_image"),
        ({"png": _image_bytes((3, 9)), "txt": b"c"}, "too_small"),
    ],
)
def test_a_skipped_sample_returns_its_reason_and_nothing_else(members: dict[str, bytes], reason: str) -> None:
    assert prepare.validate_sample(members, min_image_size=4) == (reason, None, "", {})


def test_size_limits_are_inclusive() -> None:
    """A shorter side equal to ``min_image_size`` and an aspect ratio equal to the maximum are kept."""
    members = {"png": _image_bytes((12, 4)), "txt": b" a caption ", "json": b'{"k": 1}'}
    reason, image, caption, meta = prepare.validate_sample(members, min_image_size=4, max_aspect_ratio=3.0)
    assert (reason, caption, meta, image.size) == (None, "a caption", {"k": 1}, (12, 4))
    assert prepare.validate_sample(members, min_image_size=5)[0] == "too_small"
    assert prepare.validate_sample(members, max_aspect_ratio=2.99)[0] == "bad_aspect"
    assert prepare.validate_sample(members)[0] is None  # defaults: no size limits


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_every_usable_image_comes_out_rgb(mode: str) -> None:
    ext, fmt = ("jpg", "JPEG") if mode in ("L", "CMYK") else ("png", "PNG")
    _, image, _, _ = prepare.validate_sample({ext: _image_bytes((5, 6), mode, fmt), "txt": b"c"})
    assert image.mode == "RGB" and image.size == (5, 6)


@pytest.mark.parametrize("size", [1, 3, 8])
def test_resize_makes_the_shorter_side_size_keeping_the_aspect(size: int) -> None:
    for w, h in [(30, 20), (20, 30), (16, 16)]:
        got = prepare.resize_image(Image.new("RGB", (w, h)), size).size
        short, long = (0, 1) if w <= h else (1, 0)
        assert got[short] == size
        assert got[long] == round(max(w, h) * size / min(w, h))


@pytest.mark.parametrize("wh", [(40, 20), (20, 40), (20, 20)])
def test_center_crop_cuts_the_middle_square_of_the_resized_image(wh: tuple[int, int]) -> None:
    # every column and row its own value, so the crop's position shows in its pixels
    w, h = wh
    source = Image.new("RGB", wh)
    source.putdata([(x * 255 // w, y * 255 // h, 0) for y in range(h) for x in range(w)])
    size = 10
    resized = prepare.resize_image(source, size)
    rw, rh = resized.size
    left, top = (rw - size) // 2, (rh - size) // 2
    want = resized.crop((left, top, left + size, top + size))
    got = prepare.resize_image(source, size, center_crop=True)
    assert got.size == (size, size)
    assert list(got.getdata()) == list(want.getdata())
    if wh[0] != wh[1]:
        assert list(got.getdata()) != list(resized.crop((0, 0, size, size)).getdata())
