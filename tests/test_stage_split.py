"""Generate and score are two stages with honest keys (issue 13, items 7 and 8).

- the generate key holds no scoring setting, the score key no decoding setting, and the two partition
  the eval section; `eval` stays an alias for both;
- library versions (and the embedder's weights) are in the keys of the stages they shape;
- every module the generate / score / report tasks import is in their code version;
- the tokenizer trains on the train split only.

The two checks that need a real run share test_report_flow's copy of the session's tiny home (it already
runs `--set eval.alpha=0.05` after the cold run): a new alpha rebuilds only score and report (generate is a
cache hit in lineage), and the report shows nothing outside a content hash.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tasks import common
from tinymars.profile import EvalSection, load_profile
from tinymars.stages import ORDER, downstream, last_stage

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ stage graph and aliases
def test_eval_is_an_alias_for_generate_and_score():
    assert ORDER.index("generate") < ORDER.index("score") < ORDER.index("report")
    assert downstream(["eval"]) == {"generate", "score", "report"}
    assert downstream(["score"]) == {"score", "report"}
    assert last_stage("eval") == "score" and last_stage("generate") == "generate"
    with pytest.raises(ValueError, match=r"unknown stage.*'evaluate'.*eval = generate \+ score"):
        downstream(["evaluate"])
    with pytest.raises(ValueError, match="--only: unknown stage 'nope'"):
        last_stage("nope")


# ------------------------------------------------------------------ what each key holds
def test_generate_and_score_keys_partition_the_eval_section():
    fields = set(EvalSection.model_fields)
    generation, scoring = set(EvalSection().generation()), set(EvalSection().scoring())
    assert generation | scoring == fields and not generation & scoring


@pytest.mark.parametrize("override", ["eval.alpha=0.05", "eval.bootstrap_resamples=900", "eval.bootstrap_seed=3",
                                      "eval.persistence_segments=2", "eval.hypotheses=[]"])
def test_a_scoring_setting_changes_the_score_key_only(override):
    from tasks.generate import generate_key_section

    base, changed = load_profile("tiny", []), load_profile("tiny", [override])
    assert generate_key_section(changed) == generate_key_section(base)
    assert changed.eval.scoring() != base.eval.scoring()


@pytest.mark.parametrize("override", ["eval.max_new_tokens=6", "eval.followup_turns=0", "eval.batch_size=8",
                                      "eval.max_prompts_per_capability=2", "eval.sampling.temperature=0.7",
                                      "eval.fixed_shape=true"])
def test_a_generation_setting_changes_the_generate_key_only(override):
    from tasks.generate import generate_key_section

    base, changed = load_profile("tiny", []), load_profile("tiny", [override])
    assert generate_key_section(changed) != generate_key_section(base)
    assert changed.eval.scoring() == base.eval.scoring()


def test_the_steer_arm_settings_join_the_generate_key_only_when_the_arm_runs():
    from tasks.generate import generate_key_section

    smoke, tiny = (load_profile(p, []) for p in ("smoke", "tiny"))
    assert "steer" in smoke.eval.arms and "steer" not in tiny.eval.arms
    stronger = load_profile("smoke", ["steering.multiplier=2.0"])
    assert generate_key_section(stronger) != generate_key_section(smoke)
    assert generate_key_section(load_profile("tiny", ["steering.multiplier=2.0"])) == generate_key_section(tiny)


# ------------------------------------------------------------------ library versions
def test_every_stage_names_its_libraries_and_they_are_installed():
    assert set(common.STAGE_LIBRARIES) == set(ORDER) == set(common.STAGE_SOURCES)
    for stage, libraries in common.STAGE_LIBRARIES.items():
        for name in libraries:
            if name != common.EMBEDDER_WEIGHTS:  # a misspelt distribution would silently key on "not installed"
                assert common.library_version(name) != "not installed", f"{stage}: {name}"
    assert common.STAGE_LIBRARIES["score"] == ("numpy", "scipy", "vaderSentiment")
    assert "torch" in common.STAGE_LIBRARIES["generate"] and "torch" not in common.STAGE_LIBRARIES["score"]


def _write(out: Path) -> None:
    (out / "x.json").write_text("{}\n")


def test_a_library_upgrade_rebuilds_exactly_the_stages_it_shapes(tmp_path, monkeypatch):
    home = str(tmp_path / "home")
    first = common.run_stage("score", home, {"alpha": 0.01}, {}, _write)
    assert common.run_stage("score", home, {"alpha": 0.01}, {}, _write)["cache_hit"] is True
    generate, train = common.stage_code_version("generate"), common.stage_code_version("train")
    real = common.library_version
    monkeypatch.setattr(common, "library_version", lambda d: "99.0" if d == "scipy" else real(d))
    upgraded = common.run_stage("score", home, {"alpha": 0.01}, {}, _write)
    assert upgraded["key"] != first["key"] and upgraded["cache_hit"] is False
    assert common.stage_code_version("generate") == generate  # scipy shapes no response: nothing regenerates
    manifest = json.loads((Path(upgraded["artifact"]["path"]) / "manifest.json").read_text())
    assert manifest["meta"]["libraries"]["scipy"] == "99.0"
    monkeypatch.setattr(common, "library_version", lambda d: "3.0-fake" if d == "torch" else real(d))
    assert common.stage_code_version("generate") != generate and common.stage_code_version("train") != train
    assert common.run_stage("score", home, {"alpha": 0.01}, {}, _write)["key"] == first["key"]


def test_the_embedder_fingerprint_follows_its_files_and_is_cached(tmp_path, monkeypatch):
    model, home = tmp_path / "embedder", tmp_path / "home"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights one")
    (model / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')
    (model / "README.md").write_text("docs")
    section = {"embedder": {"model": str(model)}}

    def fingerprint() -> str:
        return common.library_versions("channels", section, home)[common.EMBEDDER_WEIGHTS]

    first = fingerprint()
    assert (home / "cache" / "file-sha256.json").is_file()
    hashed = []
    real = common.sha256_file
    monkeypatch.setattr(common, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert fingerprint() == first and hashed == []  # unchanged files are not read again
    (model / "README.md").write_text("other docs")
    assert fingerprint() == first
    (model / "model.safetensors").write_bytes(b"weights two, retrained")
    assert fingerprint() != first and hashed == ["model.safetensors"]
    with pytest.raises(ValueError, match="needs the channels section"):
        common.library_versions("channels", None)


# ------------------------------------------------------------------ code versions cover what the stages run
# How a key is made, not what a stage computes (the profile enters every key as data).
INFRASTRUCTURE = {"tasks/common.py", "tinymars/artifacts.py", "tinymars/profile.py", "tinymars/prices.py",
                  "tinymars/stages.py", "tinymars/lineage.py",
                  "tinymars/sweep.py",  # the profile's sweep-section validation
                  "tinymars/progress.py"}  # what a terminal shows while a stage runs, never its bytes
PACKAGES = {"corpus", "models", "scorers", "tinymars", "tasks"}


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _closure(task_module: str) -> set[str]:
    """Every file of ours the task module imports, transitively through domain code (another task module
    is listed itself; what its helpers call is listed by hand, see STAGE_SOURCES["report"])."""
    seen, todo = set(), [ROOT / task_module]
    while todo:
        for module in _imports(todo.pop()):
            path = _module_file(module)
            if path is None or path in seen or path.name == "__init__.py":
                continue
            seen.add(path)
            if path.parts[len(ROOT.parts)] != "tasks":
                todo.append(path)
    return {p.relative_to(ROOT).as_posix() for p in seen} | {task_module}


@pytest.mark.parametrize("stage, task_module", [("generate", "tasks/generate.py"), ("score", "tasks/score.py"),
                                                ("report", "tasks/report.py")])
def test_the_code_version_covers_every_module_the_stage_runs(stage, task_module):
    sources = common.STAGE_SOURCES[stage]
    missing = sorted(f for f in _closure(task_module) - INFRASTRUCTURE
                     if not any(f == s or f.startswith(s + "/") for s in sources))
    assert missing == [], f"{stage}: add {missing} to tasks.common.STAGE_SOURCES"
    if stage == "report":  # headline_metrics (metrics.json) and the concept-quality tables are scorer code
        assert "scorers" in sources


def test_the_score_stage_runs_no_model_code():
    assert not any(f.startswith("models/") for f in _closure("tasks/score.py"))
    assert "scorers" in common.STAGE_SOURCES["score"] and "models" not in common.STAGE_SOURCES["score"]


# ------------------------------------------------------------------ the tokenizer sees the train split only
NEEDLE = "qorblixat"  # a word only the held-out rows contain


def _corpus_rows() -> list[dict]:
    words = "morning coffee river piano beagle sister thread memory warm night plan meeting report".split()
    rows = []
    for i in range(60):
        split = "heldout" if i % 4 == 0 else "train"
        text = " ".join(words[(i + k) % len(words)] for k in range(8))
        target = f"{(NEEDLE + ' ') * 6}{text}." if split == "heldout" else f"{text}."
        rows.append({"row_id": f"r{i}", "prompt_id": f"p{i}", "capability": "affect", "kind": "register",
                     "split": split, "prompt": f"{text}?", "target": target, "channel_state": {}})
    return rows


def _pieces(model: Path) -> list[str]:
    from corpus.tokenizer import Tokenizer

    tok = Tokenizer(model)
    return [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]


def test_training_texts_exclude_heldout_rows():
    from corpus.tokenizer import TokenizerError, training_texts

    rows = _corpus_rows()
    texts = training_texts(rows)
    assert len(texts) == 2 * sum(r["split"] == "train" for r in rows)
    assert not any(NEEDLE in t for t in texts)
    with pytest.raises(TokenizerError, match="no train-split rows"):
        training_texts([r for r in rows if r["split"] == "heldout"])


def test_a_heldout_only_string_never_becomes_a_piece(tmp_path):
    from corpus.tokenizer import Tokenizer, train_tokenizer
    from tasks.tokenizer import tokenizer_task

    rows = _corpus_rows()
    # the same trainer fed every row does learn the word: the check below can fail
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    train_tokenizer([t for r in rows for t in (r["prompt"], r["target"])], leaky, vocab_size=340)
    assert any(len(p.strip("▁")) > 2 and p.strip("▁") in NEEDLE for p in _pieces(leaky / "tokenizer.model"))

    home = str(tmp_path / "home")

    def corpus_files(out: Path) -> None:
        (out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    corpus = common.run_stage("corpus", home, {"test": "heldout-only word"}, {}, corpus_files)
    result = tokenizer_task.fn(load_profile("tiny", ["tokenizer.vocab_size=340"]), home, corpus)
    model = Path(result["artifact"]["path"]) / "tokenizer.model"
    assert not any(len(p.strip("▁")) > 2 and p.strip("▁") in NEEDLE for p in _pieces(model))
    tok = Tokenizer(model)
    assert tok.unk_id not in tok.encode(NEEDLE) and tok.decode(tok.encode(NEEDLE)) == NEEDLE  # byte fallback
