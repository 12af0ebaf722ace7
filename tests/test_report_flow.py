"""The report of a real `tiny` flow run: offline re-score reproduces it, every section and artifact is
there, the HTML renders with its plots in headless Chromium, and `tinymars compare` shows two runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from tests.chaos_support import copy_home
from tinymars.lineage import Lineage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tiny_reference, tmp_path_factory):
    """The session's cold tiny run (a copy), then a new alpha (score + report rebuild): two runs to compare."""
    home = copy_home(tiny_reference, tmp_path_factory.mktemp("report") / "home")
    assert main(["run", "--profile", "tiny", "--home", str(home), "--set", "eval.alpha=0.05"]) == 0
    lin = Lineage(home / "lineage.duckdb")
    runs = sorted(lin.runs(), key=lambda r: r["started_at"])
    first = {s["name"]: Path(lin.artifact(s["artifact_hash"])["path"]) for s in lin.stages(runs[0]["run_id"])}
    return {"home": home, "runs": [r["run_id"] for r in runs], "generate": first["generate"], "score": first["score"],
            "report": first["report"]}


def test_tinymars_score_reproduces_the_report_exactly(chain, capsys):
    capsys.readouterr()
    assert main(["score", str(chain["score"]), "--check"]) == 0
    out = capsys.readouterr()
    assert "reproduced" in out.err and "exactly" in out.err
    report = (chain["report"] / "report.md").read_text()
    assert out.out.startswith("## Hypotheses (pre-registered)") and out.out in report  # the same text, verbatim
    assert main(["score", str(chain["score"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((chain["score"] / "scores.json").read_text())
    # the check can fail: another alpha changes the verdict columns, and --check says where
    assert main(["score", str(chain["score"]), "--alpha", "0.5", "--check"]) == 1
    assert ".settings.alpha" in capsys.readouterr().err
    # the generations were scored twice (alpha 0.01, then 0.05): which settings is ambiguous, and the error says so
    assert main(["score", str(chain["generate"] / "generations.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "2 score artifacts were scored from it" in err and str(chain["score"]) in err


def test_tinymars_score_offline_inputs_and_errors(chain, tmp_path, capsys):
    gen = chain["generate"] / "generations.jsonl"
    lone = tmp_path / "generations.jsonl"
    shutil.copy(gen, lone)
    assert main(["score", str(lone)]) == 2  # no settings beside it: the error says to pass --profile
    assert "--profile" in capsys.readouterr().err
    assert main(["score", str(lone), "--profile", "tiny", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    # from the profile, without the measurements, the generation-based figures are the same
    saved = json.loads((chain["score"] / "scores.json").read_text())
    got = json.loads((tmp_path / "o" / "scores.json").read_text())
    for key in ("capabilities", "hypotheses", "channel_vs_text", "persistence", "similarity", "settings"):
        assert got[key] == saved[key], key
    assert got["relief"]["models"] == {} and (tmp_path / "o" / "evaluation.md").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"row_id": 1}\n')
    assert main(["score", str(bad), "--profile", "tiny"]) == 2
    assert "line 1: missing field" in capsys.readouterr().err


def test_report_sections_metrics_and_html(chain):
    report = (chain["report"] / "report.md").read_text()
    for heading in ("## Corpus", "## Models", "## Hypotheses (pre-registered)", "## Evaluation: MARS vs ABLATED",
                    "## Channel vs text", "## Persistence", "## Response distance between arms", "## Relief valve",
                    "## Gates", "## Settings"):
        assert heading in report, heading
    for hid in ("H1-selection", "H5-conflict", "H7-channel-vs-text"):
        assert f"| {hid} |" in report
    metrics = json.loads((chain["report"] / "metrics.json").read_text())
    assert set(metrics["hypotheses"].values()) <= {"supported", "not supported", "inconclusive"}
    assert len(metrics["hypotheses"]) == 7 and "tok_per_s" not in json.dumps(metrics["models"])
    assert "memory.p" in metrics["eval"] and "relief.baseline.zeroed_nats" in metrics["eval"]
    page = (chain["report"] / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 7
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained


def test_prefect_artifacts_are_published(chain):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    keys = ["tinymars-report", "tinymars-hypotheses", "tinymars-capabilities"]
    with get_client(sync_client=True) as client:  # prefect 3.8.8's sync client needs every field spelt out
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
                                     flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
                                     sort=ArtifactSort.CREATED_DESC, limit=50, offset=0)
    kinds = {a.key: a.type for a in arts}
    assert kinds == {"tinymars-report": "markdown", "tinymars-hypotheses": "table", "tinymars-capabilities": "table"}


def test_compare_shows_two_runs_side_by_side(chain, capsys):
    a, b = chain["runs"]
    capsys.readouterr()
    assert main(["compare", a, b[:18], "--home", str(chain["home"]), "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s["same artifact"] for s in tables["stages"]}
    assert stages["corpus"] and stages["train:native"] and stages["generate"]  # a re-scoring never regenerates
    assert not stages["score"] and not stages["report"]
    assert {h["hypothesis"] for h in tables["hypotheses"]} >= {"H1-selection", "H7-channel-vs-text"}
    assert any(m["metric"].startswith("score.") for m in tables["metrics"])  # headline metrics
    assert main(["compare", a, b, "--home", str(chain["home"])]) == 0
    text = capsys.readouterr().out
    assert f"A = {a}" in text and f"B = {b}" in text and "hypotheses:" in text
    assert main(["compare", a, "nope", "--home", str(chain["home"])]) == 2


def test_a_new_alpha_rescores_and_reports_but_never_regenerates(chain):
    """The chain's second run is `tinymars run --set eval.alpha=0.05` after the cold one: lineage shows
    generate as a cache hit (the same generations) and only score and report built."""
    lin = Lineage(chain["home"] / "lineage.duckdb")
    cold, alpha = ({s["name"]: s for s in lin.stages(run)} for run in chain["runs"][:2])
    assert [n for n, s in alpha.items() if not s["cache_hit"]] == ["score", "report"]
    assert alpha["generate"]["cache_hit"] is True
    assert alpha["generate"]["artifact_hash"] == cold["generate"]["artifact_hash"]
    score = alpha["score"]["artifact_hash"]
    assert score != cold["score"]["artifact_hash"]
    assert [p["content_hash"] for p in lin.parents(score)] == [alpha["generate"]["artifact_hash"]]
    assert json.loads((Path(lin.artifact(score)["path"]) / "settings.json").read_text())["alpha"] == 0.05


def test_the_report_shows_nothing_outside_a_content_hash(chain):
    """Poison the manifest metadata of every input of the latest report (its files, so the artifacts, still
    verify), force the report: it comes back byte-identical, so it read no figure from metadata."""
    from tinymars.artifacts import verify

    lin = Lineage(chain["home"] / "lineage.duckdb")
    report = {s["name"]: s for s in lin.stages(chain["runs"][1])}["report"]["artifact_hash"]
    folder = Path(lin.artifact(report)["path"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    parents = lin.parents(report)
    assert {p["name"] for p in parents} == {"corpus", "pack", "score", "steer", "train:native", "train:baseline"}
    for parent in parents:
        path = Path(parent["path"]) / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["meta"] = {"metrics": {k: 987654.0 for k in manifest["meta"].get("metrics", {})},
                            "stats": {"poisoned": 1}, "arch": "poisoned", "model": "poisoned"}
        path.write_text(json.dumps(manifest))
        verify(Path(parent["path"]))  # still a valid artifact: metadata is outside the content hash
    assert main(["run", "--profile", "tiny", "--home", str(chain["home"]), "--set", "eval.alpha=0.05",
                 "--refresh", "report"]) == 0
    rebuilt = {s["name"]: s for s in lin.stages(lin.runs(1)[0]["run_id"])}["report"]
    assert rebuilt["cache_hit"] is False and rebuilt["artifact_hash"] == report
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before
    assert b"987654" not in after["report.md"] and b"poisoned" not in after["report.md"]
    assert b"## Concept vector quality" in after["report.md"]  # from the steer artifact's quality.json


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`apt-get install -y chromium`; "
                                               "`make test` installs it when run as root)")
def test_html_renders_with_its_plots_in_headless_chromium(chain, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,12000", f"--screenshot={shot}", (chain["report"] / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = (imread(shot)[..., :3] * 255).round().astype(int)

    def count(hex_color: str) -> int:
        rgb = [int(hex_color[i:i + 2], 16) for i in (0, 2, 4)]
        return int((np.abs(pixels - rgb).sum(-1) <= 6).sum())

    # plot colours that only the rendered PNGs contain: model lines / MARS bars, the native's loss line,
    # the ABLATED / channels-zeroed bars, the TEXT arm's legend patch
    assert count("1f77b4") > 2000 and count("d62728") > 300 and count("7f7f7f") > 2000 and count("ff7f0e") > 50
    keep = Path(__file__).resolve().parents[1] / ".pytest_cache" / "report-screenshot.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)  # for a person to look at
