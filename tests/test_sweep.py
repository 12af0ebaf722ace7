"""Sweeps (flows/sweep.py, `tinymars sweep`): one Prefect parent flow over a grid, every shared stage built
once (lineage), a sweep report with every point's verdicts, `tinymars compare SWEEP`, and bad grids refused
before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from tinymars.lineage import Lineage
from tinymars.profile import ProfileError, load_profile
from tinymars.sweep import SweepError, grid_points, parse_vary, shared_stages, waits_for

# tiny, cut further: the sweep's bookkeeping is under test, not the science
CHEAP = ["train.steps=2", "train.warmup_steps=0", "train.eval_every=2", "train.log_every=1",
         "eval.arms=[mars, ablated]", "eval.max_new_tokens=4", "eval.followup_turns=0",
         "eval.max_prompts_per_capability=2", "steering.enabled=false",
         "eval.hypotheses=[{id: H1-selection, metric: dominant, beats: ablated}, "
         "{id: H2-register, metric: directional, beats: chance}]",
         "corpus.capabilities=[affect, time]", "channels.enabled={affect: {dim: 2}, time: {dim: 16}}",
         "train.models=[{name: native, arch: native, n_layer: 1, n_head: 2, d_model: 16}]"]
SHARED = ("corpus", "channels", "tokenizer", "pack")
PER_POINT = ("train:native", "generate", "score", "report")


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def swept(prefect_harness, tmp_path_factory):
    home = tmp_path_factory.mktemp("sweep") / "home"
    code = main(["sweep", "--profile", "tiny", *_sets(CHEAP), "--vary", "train.lr=1e-3,3e-3", "--home", str(home)])
    assert code == 0
    lin = Lineage(home / "lineage.duckdb")
    (sweep_run,) = lin.query("SELECT run_id, status FROM runs WHERE flow = 'sweep'")
    (report,) = lin.query("SELECT artifact_hash FROM stages WHERE run_id = ? AND stage = 'sweep'",
                          [sweep_run["run_id"]])
    folder = Path(lin.artifact(report["artifact_hash"])["path"])
    return home, lin, sweep_run, folder, json.loads((folder / "sweep.json").read_text())


def test_shared_stages_are_built_once_and_each_point_trains_and_evaluates(swept):
    _, lin, sweep_run, _, sweep = swept
    assert sweep_run["status"] == "completed"
    run_ids = [p["run_id"] for p in sweep["points"]]
    assert len(run_ids) == 2 and all(run_ids)
    rows = lin.query("SELECT run_id, name, cache_hit, artifact_hash FROM stages WHERE run_id IN (?, ?)", run_ids)
    for name in SHARED:  # one build, one cache hit, one artifact
        mine = [r for r in rows if r["name"] == name]
        assert sorted(r["cache_hit"] for r in mine) == [False, True], name
        assert len({r["artifact_hash"] for r in mine}) == 1, name
        assert next(r for r in mine if not r["cache_hit"])["run_id"] == run_ids[0]
    for name in PER_POINT:  # trained and evaluated twice: two builds, two artifacts
        mine = [r for r in rows if r["name"] == name]
        assert [r["cache_hit"] for r in mine] == [False, False], name
        assert len({r["artifact_hash"] for r in mine}) == 2, name
    profiles = [json.loads(lin.query("SELECT profile_json FROM runs WHERE run_id = ?", [r])[0]["profile_json"])
                for r in run_ids]
    assert [p["train"]["lr"] for p in profiles] == [1e-3, 3e-3]


def test_sweep_report_lists_every_point_with_its_verdicts(swept):
    _, lin, sweep_run, folder, sweep = swept
    md = (folder / "report.md").read_text()
    assert "<table>" in (folder / "report.html").read_text()
    for point in sweep["points"]:
        metrics = json.loads((Path(point["report"]).parent / "metrics.json").read_text())
        assert point["hypotheses"] == metrics["hypotheses"] and set(metrics["hypotheses"]) == {
            "H1-selection", "H2-register"}
        row = next(line for line in md.splitlines() if line.startswith(f"| {point['label']} | `train.lr="))
        assert point["run_id"] in row
        assert [c.strip() for c in row.strip("|").split("|")][-2:] == [
            metrics["hypotheses"]["H1-selection"], metrics["hypotheses"]["H2-register"]]
        assert point["report"] in md
    # lineage: the sweep report's parents are the points' reports
    parents = {a["content_hash"] for a in lin.parents(sweep_report_hash(lin, sweep_run))}
    assert parents == {p["report_hash"] for p in sweep["points"]}
    sharing = {s["stage"]: (s["built"], s["cache hits"]) for s in sweep["sharing"]}
    assert all(sharing[s] == (1, 1) for s in SHARED) and sharing["train:native"] == (2, 0)


def sweep_report_hash(lin: Lineage, sweep_run: dict) -> str:
    return lin.query("SELECT artifact_hash FROM stages WHERE run_id = ?", [sweep_run["run_id"]])[0]["artifact_hash"]


def test_compare_accepts_a_sweep(swept, capsys):
    home, _, sweep_run, folder, sweep = swept
    for ident in (sweep_run["run_id"], str(folder / "report.md")):
        capsys.readouterr()
        assert main(["compare", ident, "--home", str(home), "--json"]) == 0
        tables = json.loads(capsys.readouterr().out)
        assert [p["run"] for p in tables["points"]] == [p["run_id"] for p in sweep["points"]]
        assert {h["hypothesis"] for h in tables["hypotheses"]} == {"H1-selection", "H2-register"}
        assert any(m["metric"].startswith("train:native.") for m in tables["metrics"])  # different lr, losses


@pytest.mark.parametrize(("vary", "names"), [
    (["train.lrr=1e-3,3e-3"], "'lrr' is not a key of train"),
    (["train.lr=-1,1e-3"], "train.lr"),
    (["train.models.d_model=8,16"], "train.models"),
    (["train.lr=1e-3,1e-3"], "lists a value twice"),
    (["train.lr"], "expected KEY=V1,V2"),
    ([], "the grid is empty"),
])
def test_bad_grids_are_refused_before_any_work(tmp_path, capsys, vary, names):
    args = [a for v in vary for a in ("--vary", v)]
    assert main(["sweep", "--profile", "tiny", *args, "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert names in err, err
    assert not (tmp_path / "home").exists()  # nothing was started


def test_bad_value_names_the_point():
    with pytest.raises(SweepError, match="YAML"):
        parse_vary(["train.lr=[1,"])
    assert parse_vary(["train.lr=1e-3,3e-3", "eval.arms=[mars, ablated],[mars, ablated, text]"]) == {
        "train.lr": [1e-3, 3e-3], "eval.arms": [["mars", "ablated"], ["mars", "ablated", "text"]]}


def test_profile_sweep_section_is_validated():
    assert load_profile("tiny", ["sweep={vary: {train.lr: [1.0e-3, 3.0e-3]}}"]).sweep.vary == {
        "train.lr": [1e-3, 3e-3]}
    with pytest.raises(ProfileError, match=r"sweep\.vary.*'lrx' is not a key of train"):
        load_profile("tiny", ["sweep={vary: {train.lrx: [1]}}"])
    with pytest.raises(ProfileError, match="the grid is empty"):
        load_profile("tiny", ["sweep={vary: {}}"])


def test_points_wait_only_for_the_point_that_builds_what_they_share():
    """2 x 2 grid over a training and an evaluation key: hand-derived schedule."""
    grid = grid_points({"train.lr": [1e-3, 3e-3], "eval.alpha": [0.01, 0.05]})
    assert grid == [{"train.lr": 1e-3, "eval.alpha": 0.01}, {"train.lr": 1e-3, "eval.alpha": 0.05},
                    {"train.lr": 3e-3, "eval.alpha": 0.01}, {"train.lr": 3e-3, "eval.alpha": 0.05}]
    assert shared_stages(grid) == ["corpus", "channels", "tokenizer", "replay", "pack"]
    # without a prefix run everyone waits for point 0 (the corpus); points 1 and 3 reuse a trained model
    assert waits_for(grid) == [set(), {0}, {0}, {0, 2}]
    assert waits_for(grid, skip=set(shared_stages(grid))) == [set(), {0}, set(), {2}]
    # nothing shared at all (the corpus differs): no waiting
    assert waits_for(grid_points({"corpus.seed": [1, 2, 3]})) == [set(), set(), set()]
