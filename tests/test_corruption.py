"""Corrupt anything: after a complete run, damage one file of each artifact kind; the next run names the
file, quarantines the folder, rebuilds that stage only (to the same bytes), and takes everything else from cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import chaos_support as cs
from tinymars.stages import downstream

# artifact kind -> (stage name in lineage, file inside its artifact folder)
KINDS = {
    "corpus": ("corpus", "corpus.jsonl"),
    "embeddings": ("channels", "channels.safetensors"),
    "tokenizer-model": ("tokenizer", "tokenizer.model"),
    "shard": ("pack", "train-00000.parquet"),
    "checkpoint": ("train:native", "model.safetensors"),  # the trained weights (training checkpoints: test_training)
    "generations": ("generate", "generations.jsonl"),
}


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete(path: Path) -> None:
    path.unlink()


@pytest.fixture(scope="module")
def zygote(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return cs.shared_zygote(PREFECT_API_URL.value())


DAMAGES = (flip, truncate, delete)
# Every kind meets a damage, and every damage two kinds (rotating); TINYMARS_CORRUPTION_ALL=1 runs all 18
# pairs (each pair costs a rerun: the full matrix is a minute more than CI's time budget allows).
CASES = ([(kind, damage) for kind in KINDS for damage in DAMAGES] if os.environ.get("TINYMARS_CORRUPTION_ALL")
         else [(kind, DAMAGES[i % len(DAMAGES)]) for i, kind in enumerate(KINDS)])


@pytest.mark.parametrize(("kind", "damage"), CASES, ids=[f"{k}-{d.__name__}" for k, d in CASES])
def test_damaged_file_is_named_quarantined_and_only_its_stage_rebuilt(zygote, tmp_path_factory, tmp_path, kind, damage):
    name, filename = KINDS[kind]
    stage = name.split(":")[0]
    home = tmp_path / "home"
    cs.copy_home(cs.complete_home(zygote, tmp_path_factory.mktemp("complete")), home)
    before = cs.final_artifacts(home)
    key = before[name]["key"]
    folder = home / "artifacts" / stage / key
    target = folder / filename
    assert target.is_file(), f"{kind}: no {filename} in {sorted(p.name for p in folder.iterdir())}"
    original = cs.stable_files(folder)[filename]
    damage(target)

    log = cs.run_to_end(zygote, home, tmp_path / "rerun.log")

    assert "no longer matches its manifest" in log and str(target) in log, f"the warning must name {target}"
    aside = list((home / "artifacts" / stage).glob(f".corrupt-{key}-*"))
    assert len(aside) == 1, "the damaged folder is kept aside for inspection"
    rows = {r["name"]: r for r in cs.lineage_stages(home) if r["run_id"] == _last_run(home)}
    assert rows[name]["cache_hit"] is False and str(target) in rows[name]["error"], rows[name]
    affected = downstream([stage])
    for other, row in rows.items():
        if other != name and other.split(":")[0] not in affected:
            assert row["cache_hit"] is True, f"{other} is upstream of / beside {name} and must come from cache"
    after = cs.final_artifacts(home)
    assert after[name]["content_hash"] == before[name]["content_hash"], "the rebuild gives the same artifact"
    assert cs.stable_files(folder)[filename] == original
    for other, row in rows.items():  # same bytes rebuilt, so nothing downstream had to run again
        assert other == name or row["cache_hit"] is True, f"{other} rebuilt although {name} came back identical"


def _last_run(home: Path) -> str:
    import duckdb

    con = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        return con.execute("select run_id from runs order by started_at desc limit 1").fetchone()[0]
    finally:
        con.close()
