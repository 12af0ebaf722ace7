"""Artifact store: keys, atomic builds, verification on read, concurrent publish, forced rebuild."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from tinymars.artifacts import ArtifactStore, code_version, hash_json, stage_key, verify


def _writer(content: str, rows: int = 1):
    def build(out: Path):
        (out / "data.txt").write_text(content)
        (out / "sub").mkdir()
        (out / "sub" / "more.bin").write_bytes(content.encode() * 3)
        return {"rows": rows, "meta": {"metrics": {"n": rows}}}

    return build


def test_key_depends_on_code_section_and_inputs():
    base = stage_key("eval", "code1", {"a": 1}, {"corpus": "h1"})
    assert base == stage_key("eval", "code1", {"a": 1}, {"corpus": "h1"})
    assert base != stage_key("eval", "code2", {"a": 1}, {"corpus": "h1"})
    assert base != stage_key("eval", "code1", {"a": 2}, {"corpus": "h1"})
    assert base != stage_key("eval", "code1", {"a": 1}, {"corpus": "h2"})
    assert base != stage_key("report", "code1", {"a": 1}, {"corpus": "h1"})
    # key order inside a section does not matter (canonical JSON)
    assert hash_json({"x": 1, "y": 2}) == hash_json({"y": 2, "x": 1})


def test_code_version_changes_with_source(tmp_path):
    f = tmp_path / "stage.py"
    f.write_text("x = 1\n")
    v1 = code_version([tmp_path])
    f.write_text("x = 2\n")
    assert code_version([tmp_path]) != v1


def test_build_then_lookup_verifies(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.build("corpus", "k1", _writer("hello", rows=3), inputs={"x": "abc"})
    assert art.rows == 3 and set(art.files) == {"data.txt", "sub/more.bin"}
    assert art.meta["metrics"] == {"n": 3}
    again = store.lookup("corpus", "k1")
    assert again is not None and again.content_hash == art.content_hash
    manifest = json.loads((Path(art.path) / "manifest.json").read_text())
    assert manifest["inputs"] == {"x": "abc"}
    assert store.lookup("corpus", "other") is None


def test_same_content_same_hash_different_content_different_hash(tmp_path):
    store = ArtifactStore(tmp_path)
    a = store.build("corpus", "k1", _writer("same"))
    b = store.build("corpus", "k2", _writer("same"))
    c = store.build("corpus", "k3", _writer("different"))
    assert a.content_hash == b.content_hash != c.content_hash


def test_failed_build_leaves_nothing_under_the_key(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(out: Path):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        store.build("pack", "k1", boom)
    assert store.lookup("pack", "k1") is None
    assert list((tmp_path / "pack").iterdir()) == [], "temporary folder must be cleaned up"


def test_interrupted_build_folder_is_never_trusted(tmp_path):
    """A folder a SIGKILL left behind (no manifest, temp name) is invisible to lookup."""
    store = ArtifactStore(tmp_path)
    (tmp_path / "pack" / ".tmp-k1-dead").mkdir(parents=True)
    (tmp_path / "pack" / ".tmp-k1-dead" / "x").write_text("partial")
    assert store.lookup("pack", "k1") is None
    (tmp_path / "pack" / "k1").mkdir()  # a folder under the key but without a manifest
    assert store.lookup("pack", "k1") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corruption_is_detected_quarantined_and_rebuilt(tmp_path, caplog, damage):
    store = ArtifactStore(tmp_path)
    art = store.build("tokenizer", "k1", _writer("payload" * 100))
    target = Path(art.path) / "sub" / "more.bin"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:5])
    elif damage == "delete":
        target.unlink()
    else:
        (Path(art.path) / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="tinymars.artifacts"):
        assert store.lookup("tokenizer", "k1") is None
    assert "no longer matches its manifest" in caplog.text
    if damage != "manifest":
        assert "sub/more.bin" in caplog.text, "the warning must say which file"
    assert list((tmp_path / "tokenizer").glob(".corrupt-k1-*")), "the damaged folder is kept aside"
    rebuilt = store.build("tokenizer", "k1", _writer("payload" * 100))
    assert rebuilt.content_hash == art.content_hash
    verify(Path(rebuilt.path))


def test_concurrent_publish_of_one_key(tmp_path):
    store = ArtifactStore(tmp_path)
    results, errors = [], []

    def worker():
        try:
            results.append(store.build("corpus", "k1", _writer("same")))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.content_hash for r in results}) == 1
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["k1"]


def test_forced_rebuild_replaces(tmp_path):
    store = ArtifactStore(tmp_path)
    store.build("eval", "k1", _writer("old"))
    new = store.build("eval", "k1", _writer("new"), replace=True)
    assert (Path(new.path) / "data.txt").read_text() == "new"
    assert store.lookup("eval", "k1").content_hash == new.content_hash
