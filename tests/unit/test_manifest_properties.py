"""Property tests of shard-manifest validation (``Manifest.from_dict`` / ``read_manifest``).

Any manifest siclip can write reads back equal through JSON; any one corruption of a valid manifest (a value of
the wrong type, a negative or boolean count, an unknown key, a missing or unsupported schema version, a
malformed shard entry) is refused with a one-line ``ManifestError`` that names the file and the bad key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siclip.data.shards import SCHEMA_VERSION, Manifest, ManifestError, read_manifest

SOURCE = "runs/x/manifest.json"
counts = st.integers(min_value=0, max_value=2**40)
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
json_leaf = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
)

manifests = st.builds(
    Manifest,
    schema_version=st.integers(1, SCHEMA_VERSION),
    kind=names,
    shards=st.lists(st.fixed_dictionaries({"name": names, "samples": counts}), max_size=4),
    samples_in=counts,
    samples_out=counts,
    samples_skipped=counts,
    skipped=st.dictionaries(names, counts, max_size=4),
    producer=st.dictionaries(st.text(max_size=6), json_value, max_size=3),
    config=st.dictionaries(st.text(max_size=6), json_value, max_size=3),
)

# (key, a wrong value for it, the text the message must hold)
WRONG: list[tuple[str, Any, str]] = [
    ("schema_version", SCHEMA_VERSION + 1, "schema_version"),
    ("schema_version", 0, "schema_version"),
    ("schema_version", True, "schema_version"),
    ("schema_version", "1", "schema_version"),
    ("kind", 3, "'kind'"),
    ("shards", {"name": "a.tar", "samples": 1}, "'shards'"),
    ("shards", [{"name": "a.tar"}], "shards[0]"),
    ("shards", [{"name": "a.tar", "samples": -1}], "shards[0]"),
    ("shards", [{"name": "a.tar", "samples": True}], "shards[0]"),
    ("shards", [{"name": 7, "samples": 1}], "shards[0]"),
    ("shards", ["a.tar"], "shards[0]"),
    ("samples_in", -1, "'samples_in'"),
    ("samples_out", 1.5, "'samples_out'"),
    ("samples_skipped", False, "'samples_skipped'"),
    ("skipped", [], "'skipped'"),
    ("skipped", {"too_small": -2}, "skipped['too_small']"),
    ("skipped", {"too_small": "2"}, "skipped['too_small']"),
    ("producer", "coca", "'producer'"),
    ("config", None, "'config'"),
]


@settings(max_examples=60, deadline=None)
@given(m=manifests)
def test_every_valid_manifest_reads_back_equal_through_json(m: Manifest) -> None:
    data = json.loads(json.dumps(m.to_dict()))
    assert Manifest.from_dict(data, source=SOURCE) == m


@settings(max_examples=60, deadline=None)
@given(m=manifests, wrong=st.sampled_from(WRONG))
def test_one_corrupted_key_is_a_one_line_error_naming_file_and_key(
    m: Manifest, wrong: tuple[str, Any, str]
) -> None:
    key, value, named = wrong
    data = m.to_dict()
    data[key] = value
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(data, source=SOURCE)
    msg = str(err.value)
    assert msg.startswith(SOURCE + ": ") and named in msg and "\n" not in msg


@settings(max_examples=40, deadline=None)
@given(m=manifests, extra=st.text(min_size=1, max_size=10))
def test_an_unknown_key_is_named_and_a_missing_version_refused(m: Manifest, extra: str) -> None:
    data = m.to_dict()
    if extra not in data:
        data[extra] = 1
        with pytest.raises(ManifestError, match="unknown key") as err:
            Manifest.from_dict(data, source=SOURCE)
        assert repr(extra) in str(err.value)
        del data[extra]
    del data["schema_version"]
    with pytest.raises(ManifestError, match=r"^runs/x/manifest\.json: missing 'schema_version'$"):
        Manifest.from_dict(data, source=SOURCE)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=manifests)
def test_a_manifest_file_on_disk_reads_back_and_a_non_object_is_refused(m: Manifest, tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(m.to_dict()))
    assert read_manifest(tmp_path) == m
    path.write_text(json.dumps([m.to_dict()]))
    with pytest.raises(ManifestError, match="expected a JSON object, got list"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("wrong", WRONG, ids=[f"{k}={v!r}" for k, v, _ in WRONG])
def test_each_corruption_is_refused_on_a_fixed_manifest(wrong: tuple[str, Any, str]) -> None:
    """Every entry of WRONG at least once, whatever examples hypothesis happens to draw."""
    key, value, named = wrong
    data = Manifest(
        kind="demo-web", shards=[{"name": "a.tar", "samples": 2}], samples_in=2, samples_out=2
    ).to_dict()
    data[key] = value
    with pytest.raises(ManifestError, match=rf"^{re.escape(SOURCE)}: .*{re.escape(named)}"):
        Manifest.from_dict(data, source=SOURCE)
