"""Bad input battery, fast half: every bad profile, override, file or file content fails before work (or in
its domain module) with a message that names the input and the fix, exits non-zero with no traceback,
and leaves what was there before untouched. The runtime half (stages failing mid-run on a real home)
is tests/test_bad_inputs_runtime.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from app.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = (ROOT / "tinymars" / "profiles" / "tiny.yaml").read_text()
TINY = yaml.safe_load(TINY_TEXT)


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_user_error(code: int, err: str, expected: list[str], exit_code: int = 2) -> None:
    assert code == exit_code, err
    assert err.startswith("tinymars: error: "), err
    assert "Traceback" not in err
    for phrase in expected:
        assert phrase in err, f"{phrase!r} not in:\n{err}"


def _mutated(mutate: Callable[[dict], Any]) -> dict:
    data = copy.deepcopy(TINY)
    mutate(data)
    return data


def _model(data: dict, i: int) -> dict:
    return data["train"]["models"][i]


def _teacher(**extra: Any) -> Callable[[dict], None]:
    teacher = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini", **extra}
    return lambda d: d["corpus"].update(teacher=teacher)


# ------------------------------------------------------------------ profiles: YAML text itself
YAML_CASES = {
    "yaml-unclosed-bracket": ("name: [unclosed\n", ["is not valid YAML", "while parsing a flow sequence"]),
    "yaml-tab-indent": ("name: t\ncorpus:\n\tseed: 1\n", ["is not valid YAML", "found character '\\t'"]),
    "yaml-list-not-mapping": ("- a\n- b\n", ["must be a YAML mapping with sections corpus, channels"]),
    "yaml-empty-file": ("", ["must be a YAML mapping with sections"]),
    "yaml-duplicate-channel": (
        TINY_TEXT.replace("    memory: {dim: 384}\n", "    memory: {dim: 384}\n    memory: {dim: 384}\n"),
        ["is not valid YAML", "key 'memory' is given twice in one mapping", "keep one"]),
    "yaml-duplicate-section": (TINY_TEXT + "train: {steps: 3}\n", ["key 'train' is given twice", "keep one"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_yaml_text(tmp_path, capsys, case):
    text, expected = YAML_CASES[case]
    path = tmp_path / "p.yaml"
    path.write_text(text)
    code, err = _cli(capsys, ["validate", "--profile", str(path)])
    _assert_user_error(code, err, [f"profile file '{path}'", *expected])


# ------------------------------------------------------------------ profiles: schema and semantics
PROFILE_CASES: dict[str, tuple[Callable[[dict], Any], list[str]]] = {
    "unknown-top-key": (lambda d: d.update(trian={}), ["trian: unknown key; remove it or check its spelling",
                                                       "allowed: channels, corpus"]),
    "unknown-train-key": (lambda d: d["train"].update(stepz=3), ["train.stepz: unknown key", "allowed: batch_size"]),
    "unknown-model-key": (lambda d: _model(d, 0).update(layers=3), ["train.models.0.layers: unknown key",
                                                                    "allowed: ", "n_layer"]),
    "unknown-channel-spec-key": (lambda d: d["channels"]["enabled"]["memory"].update(size=3),
                                 ["channels.enabled.memory.size: unknown key", "allowed: dim, tokens"]),
    "unknown-channel": (lambda d: d["channels"]["enabled"].update(mood={"dim": 2}),
                        ["channels.enabled.mood", "Input should be 'memory', 'identity'"]),
    "wrong-type-steps": (lambda d: d["train"].update(steps="many"), ["train.steps: Input should be a valid integer"]),
    "wrong-type-enabled-list": (lambda d: d["channels"].update(enabled=["memory"]),
                                ["channels.enabled: Input should be a valid dictionary"]),
    "wrong-type-capabilities": (lambda d: d["corpus"].update(capabilities="memory"),
                                ['corpus.capabilities: Input should be a valid list (got "memory")']),
    "wrong-type-models-mapping": (lambda d: d["train"].update(models={"name": "native"}),
                                  ["train.models: Input should be a valid list"]),
    "missing-section": (lambda d: d.pop("train"), ["train: required field is missing"]),
    "missing-model-arch": (lambda d: _model(d, 0).pop("arch"), ["train.models.0.arch: required field is missing"]),
    "negative-steps": (lambda d: d["train"].update(steps=-5),
                       ["train.steps: Input should be greater than or equal to 1 (got -5)"]),
    "negative-batch-size": (lambda d: d["train"].update(batch_size=-8),
                            ["train.batch_size: Input should be greater than or equal to 1 (got -8)"]),
    "negative-channel-dim": (lambda d: d["channels"]["enabled"]["affect"].update(dim=-2),
                             ["channels.enabled.affect.dim: Input should be greater than or equal to 1 (got -2)"]),
    "huge-channel-dim": (lambda d: d["channels"]["enabled"]["affect"].update(dim=10**9),
                         ["channels.enabled.affect.dim: Input should be less than or equal to 16384"]),
    "too-few-prompts": (lambda d: d["corpus"].update(prompts_per_capability=1),
                        ["corpus.prompts_per_capability: Input should be greater than or equal to 2 (got 1)"]),
    "nan-learning-rate": (lambda d: d["train"].update(lr=math.nan), ["train.lr: Input should be a finite number"]),
    "inf-weight-decay": (lambda d: d["train"].update(weight_decay=math.inf),
                         ["train.weight_decay: Input should be a finite number (got Infinity)"]),
    "vocab-below-special-tokens": (lambda d: d["tokenizer"].update(vocab_size=100),
                                   ["tokenizer.vocab_size: 100 leaves no room for learned pieces",
                                    "261 ids are reserved", "set vocab_size well above 261"]),
    "vocab-absurd": (lambda d: d["tokenizer"].update(vocab_size=10**6),
                     ["tokenizer.vocab_size: Input should be less than or equal to 262144"]),
    "eval-rows-exceed-corpus": (lambda d: d["eval"].update(max_prompts_per_capability=50),
                                ["eval.max_prompts_per_capability: 50 exceeds the prompts the corpus makes",
                                 "corpus.prompts_per_capability: 8", "lower it or raise"]),
    "seq-len-too-small": (lambda d: d["pack"].update(seq_len=8),
                          ["pack.seq_len: Input should be greater than or equal to 16 (got 8)"]),
    "text-channel-dim-mismatch": (lambda d: d["channels"]["enabled"]["memory"].update(dim=1024),
                                  ["enabled.memory.dim: 1024 does not match the embedder", "set dim: 384"]),
    "numeric-channel-too-small": (lambda d: d["channels"]["enabled"]["ethics"].update(dim=4),
                                  ["enabled.ethics.dim: 4 is too small; the ethics channel needs dim >= 24"]),
    "channel-tokens-differ": (lambda d: d["channels"]["enabled"]["memory"].update(tokens=3),
                              ["every channel must use the same number of tokens"]),
    "no-channels": (lambda d: d["channels"].update(enabled={}), ["enabled: needs at least one channel"]),
    "duplicate-capability": (lambda d: d["corpus"].update(capabilities=["affect", "affect"]),
                             ["corpus.capabilities: lists a capability twice"]),
    "unknown-capability": (lambda d: d["corpus"].update(capabilities=["humor"]),
                           ["corpus.capabilities.0: Input should be 'memory'", '(got "humor")']),
    "hypothesis-unknown-arm": (lambda d: d["eval"]["hypotheses"][0].update(arm="telepathy"),
                               ["eval.hypotheses.0.arm: Input should be 'mars', 'ablated', 'text'",
                                '(got "telepathy")']),
    "hypothesis-unknown-capability": (lambda d: d["eval"]["hypotheses"][0].update(capability="humor"),
                                      ["eval.hypotheses.0.capability: Input should be 'memory'", "or 'all'",
                                       '(got "humor")']),
    "hypothesis-arm-not-generated": (lambda d: d["eval"].update(arms=["mars", "ablated"]),
                                     ["compares arm 'text', which is not generated; add it to eval.arms"]),
    "hypothesis-metric-wrong-capability": (
        lambda d: d["eval"]["hypotheses"][0].update(capability="affect"),
        ["hypothesis H1-selection: metric 'dominant' applies to memory, identity, continuity (or all), not 'affect'"]),
    "hypothesis-duplicate-id": (lambda d: d["eval"]["hypotheses"].append(d["eval"]["hypotheses"][0]),
                                ["hypotheses: ids must be unique"]),
    "eval-arms-without-ablated": (lambda d: d["eval"].update(arms=["mars", "text"], hypotheses=[]),
                                  ["arms: the paired tests need both 'mars' and 'ablated'"]),
    "train-device-unknown": (lambda d: d["train"].update(device="tpu"),
                             ["train.device: Input should be 'auto', 'cpu', 'cuda' or 'xla' (got \"tpu\")"]),
    "train-devices-zero": (lambda d: d["train"].update(devices=0), ["train.devices"]),
    "duplicate-model-names": (lambda d: _model(d, 1).update(name="native"), ["models: names must be unique"]),
    "no-native-model": (lambda d: d["train"].update(models=[_model(d, 1)]),
                        ["needs one model with arch 'native'"]),
    "unknown-architecture": (lambda d: _model(d, 1).update(arch="transformerz"),
                             ["train.models[baseline].arch: unknown architecture 'transformerz'; registered:"]),
    "odd-head-dim": (lambda d: _model(d, 0).update(d_model=30), ["head dim d_model/n_head = 15 must be even (RoPE)"]),
    "warmup-exceeds-steps": (lambda d: d["train"].update(warmup_steps=100), ["warmup_steps 100 exceeds steps 12"]),
    "batch-not-divisible": (lambda d: d["train"].update(grad_accum=3),
                            ["batch_size 8 must be divisible by grad_accum x devices = 3"]),
    "bf16-on-cpu": (lambda d: d["train"].update(precision="bf16"), ["precision bf16 is for accelerators"]),
    "eval-model-unknown": (lambda d: d["eval"].update(model="nope"), ["eval.model: 'nope' is not a train.models name"]),
    "embedder-path-missing": (lambda d: d["channels"]["embedder"].update(model="./no/such/model"),
                              ["channels.embedder.model: local path './no/such/model' does not exist"]),
    "replay-path-missing": (lambda d: d.update(replay={"source": "/no/such/replay.jsonl", "tokens": 5000,
                                                       "share": 0.5}),
                            ["replay.source: local path '/no/such/replay.jsonl' does not exist"]),
    "replay-hub-unpinned": (lambda d: d.update(replay={"source": "HuggingFaceFW/fineweb-edu", "tokens": 5000,
                                                       "share": 0.5}),
                            ["replay: revision: the hub source 'HuggingFaceFW/fineweb-edu' needs a pinned revision"]),
    "replay-in-corpus-moved": (lambda d: d["corpus"].update(replay={"source": "x.jsonl"}),
                               ["corpus.replay moved to a top-level `replay:` section"]),
    "adapter-base-missing": (lambda d: d["train"]["models"].append(
        {"name": "adapter", "arch": "adapter", "base": "/no/such/base", "adapter": "film"}),
        ["train.models[adapter].base: '/no/such/base' does not exist"]),
    "teacher-without-key-env": (_teacher(), ["api_key_env: a paid endpoint needs the name of the environment"]),
    "teacher-key-env-unset": (_teacher(api_key_env="TINYMARS_BAD_INPUT_UNSET_KEY"),
                              ["corpus.teacher.api_key_env: the environment variable TINYMARS_BAD_INPUT_UNSET_KEY "
                               "is not set; export TINYMARS_BAD_INPUT_UNSET_KEY"]),
    "teacher-prompts-dir-missing": (_teacher(free=True, prompts_dir="/no/such/prompts"), ["/no/such/prompts"]),
    "profile-name-pattern": (lambda d: d.update(name="my profile!"), ["name: String should match pattern"]),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_bad_profile(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("TINYMARS_BAD_INPUT_UNSET_KEY", raising=False)
    mutate, expected = PROFILE_CASES[case]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_mutated(mutate)))
    code, err = _cli(capsys, ["validate", "--profile", str(path)])
    _assert_user_error(code, err, expected)


def test_pasted_key_is_refused_and_never_echoed(tmp_path, capsys):
    key = "sk-live-NOTAREALKEY0123456789abcdef"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_mutated(_teacher(api_key_env=key))))
    code, err = _cli(capsys, ["validate", "--profile", str(path)])
    _assert_user_error(code, err, ["api_key_env: must be the NAME of an environment variable", "never the key"])
    assert "NOTAREALKEY" not in err


def test_bad_profile_run_touches_nothing_in_an_existing_home(tmp_path, capsys):
    home = tmp_path / "home"
    (home / "artifacts" / "corpus" / "k").mkdir(parents=True)
    (home / "artifacts" / "corpus" / "k" / "corpus.jsonl").write_text("{}\n")
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_mutated(lambda d: d["tokenizer"].update(vocab_size=100))))
    code, err = _cli(capsys, ["run", "--profile", str(path), "--home", str(home)])
    _assert_user_error(code, err, ["tokenizer.vocab_size: 100 leaves no room"])
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ --set overrides and flags
OVERRIDE_CASES = {
    "set-no-equals": (["--set", "train.steps"], ["--set 'train.steps': expected SECTION.KEY=VALUE"]),
    "set-empty-key": (["--set", "=5"], ["--set '=5': empty name", "expected SECTION.KEY=VALUE"]),
    "set-empty-path-part": (["--set", "train..steps=3"], ["empty name in 'train..steps'"]),
    "set-into-a-value": (["--set", "train.steps.x=1"], ["--set 'train.steps.x=1': 'steps' is not a section"]),
    "set-into-a-list": (["--set", "train.models.0.n_layer=3"], ["'models' is not a section"]),
    "set-unknown-section": (["--set", "trian.steps=3"], ["trian: unknown key", "allowed: channels"]),
    "set-unknown-key": (["--set", "train.stepz=3"], ["train.stepz: unknown key"]),
    "set-bad-yaml-value": (["--set", "train.steps=[1"], ["--set 'train.steps=[1': value is not valid YAML"]),
    "set-wrong-type": (["--set", "train.steps=many"], ["train.steps: Input should be a valid integer", '(got "many")']),
    "set-nan": (["--set", "train.lr=.nan"], ["train.lr: Input should be a finite number"]),
    "set-out-of-range": (["--set", "corpus.heldout_fraction=1.5"],
                         ["corpus.heldout_fraction: Input should be less than 1 (got 1.5)"]),
    "refresh-unknown-stage": (["--refresh", "trian"], ["unknown stage", "'trian'", "allowed: corpus, channels"]),
}


@pytest.mark.parametrize("case", list(OVERRIDE_CASES))
def test_bad_override(tmp_path, capsys, case):
    extra, expected = OVERRIDE_CASES[case]
    home = tmp_path / "home"
    code, err = _cli(capsys, ["run", "--profile", "tiny", "--home", str(home), *extra])
    _assert_user_error(code, err, expected)
    assert not home.exists(), "no work may start before the inputs are valid"


# ------------------------------------------------------------------ devices this machine lacks
@pytest.mark.parametrize(("case", "mutate", "expected"), [
    ("train-device-cuda-absent", lambda d: d["train"].update(device="cuda"),
     "train.device: 'cuda' but no CUDA GPU is visible here; use auto"),
    ("embedder-device-cuda-absent", lambda d: d["channels"]["embedder"].update(device="cuda:1"),
     "channels.embedder.device: 'cuda:1' but no CUDA GPU is visible here"),
], ids=["train-device-cuda-absent", "embedder-device-cuda-absent"])
def test_missing_gpu(tmp_path, capsys, case, mutate, expected):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the profile is runnable here")
    path, home = tmp_path / "p.yaml", tmp_path / "home"
    path.write_text(yaml.safe_dump(_mutated(mutate)))
    code, err = _cli(capsys, ["run", "--profile", str(path), "--home", str(home)])
    _assert_user_error(code, err, [expected])
    assert not home.exists()
    assert main(["validate", "--profile", str(path)]) == 0  # the profile is valid: it just cannot run here
    assert f"note: cannot run here: {expected}" in capsys.readouterr().out


def test_missing_torch_xla(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed here")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_mutated(lambda d: d["train"].update(device="xla"))))
    code, err = _cli(capsys, ["run", "--profile", str(path), "--home", str(tmp_path / "home")])
    _assert_user_error(code, err, ["train.device: 'xla' but torch_xla is not installed here"])


# ------------------------------------------------------------------ missing and unreadable files
def test_profile_file_missing(tmp_path, capsys):
    code, err = _cli(capsys, ["validate", "--profile", str(tmp_path / "nope.yaml")])
    _assert_user_error(code, err, [f"profile file '{tmp_path / 'nope.yaml'}' does not exist",
                                   "shipped profiles: ", "tiny"])


def test_profile_is_a_folder(tmp_path, capsys):
    (tmp_path / "p.yaml").mkdir()
    code, err = _cli(capsys, ["validate", "--profile", str(tmp_path / "p.yaml")])
    _assert_user_error(code, err, [f"profile file '{tmp_path / 'p.yaml'}' is a folder; pass the YAML file"])


def test_profile_not_utf8(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_bytes(TINY_TEXT.replace("Test-sized", "T\xe9st-sized").encode("latin-1"))
    code, err = _cli(capsys, ["validate", "--profile", str(path)])
    _assert_user_error(code, err, [f"profile file '{path}' is not UTF-8 (byte 0xe9 at offset", "save it as UTF-8"])


def test_profile_unreadable(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(TINY_TEXT)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root (CI containers) reads it anyway
            pytest.skip("running as root: chmod 000 does not deny reading")
        code, err = _cli(capsys, ["validate", "--profile", str(path)])
    finally:
        path.chmod(0o600)
    _assert_user_error(code, err, [f"profile file '{path}' cannot be read (Permission denied); check its permissions"])


def test_unknown_profile_name(capsys):
    code, err = _cli(capsys, ["validate", "--profile", "smok"])
    _assert_user_error(code, err, ["unknown profile 'smok'; pass a YAML path or one of the shipped profiles"])


def test_runs_without_a_lineage_database(tmp_path, capsys):
    code, err = _cli(capsys, ["runs", "--home", str(tmp_path / "none")])
    _assert_user_error(code, err, [f"no lineage database at {tmp_path / 'none' / 'lineage.duckdb'}",
                                   "run `tinymars run` first or pass --home"])


def test_train_job_file_missing(tmp_path, capsys):
    from models.train_cli import main as train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main([str(tmp_path / "job.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"job file '{tmp_path / 'job.json'}' cannot be read as JSON" in err


# ------------------------------------------------------------------ channel states and vectors (corpus.channels)
def _row(capability: str, state: dict, row_id: str = "r0") -> dict:
    return {"row_id": row_id, "channel_state": {capability: state}}


DIMS = {"memory": 384, "affect": 2, "time": 16, "ethics": 24}
CHANNEL_CASES = {
    "nan-valence": (_row("affect", {"valence": math.nan, "saliency": 0.5}),
                    "row r0: bad affect channel state: affect.valence must be in [-1, 1], got nan"),
    "inf-caution": (_row("ethics", {"caution": math.inf, "category": "medical"}),
                    "row r0: bad ethics channel state: ethics.caution must be in [-1, 1], got inf"),
    "string-hour": (_row("time", {"hour": "seven", "weekday": 1}),
                    "row r0: bad time channel state: time.hour must be an integer in 0..23, got 'seven'"),
    "inf-hour": (_row("time", {"hour": math.inf, "weekday": 1}), "time.hour must be an integer in 0..23, got inf"),
    "missing-field": (_row("affect", {"valence": 0.5}), "row r0: the affect channel state lacks field 'saliency'"),
    "unknown-ethics-category": (_row("ethics", {"caution": 0.5, "category": "astrology"}),
                                "ethics.category 'astrology' is not one of tinymars.domain.ETHICS_CATEGORIES"),
    "empty-memory-text": (_row("memory", {"salient_item": 0, "text": "  "}),
                          "row r0: empty text for the memory channel"),
}


@pytest.mark.parametrize("case", list(CHANNEL_CASES))
def test_bad_channel_state(case):
    from corpus.channels import ChannelError, channel_matrices

    row, expected = CHANNEL_CASES[case]
    with pytest.raises(ChannelError) as err:
        channel_matrices([row], DIMS, lambda texts: np.ones((len(texts), 384), np.float32))
    assert expected in str(err.value)


@pytest.mark.parametrize(("case", "vectors", "expected"), [
    ("embedder-wrong-length", lambda n: np.ones((n, 100), np.float32),
     "channels.enabled.memory.dim: 384 but the embedder gives 100-d vectors; set dim: 100"),
    ("embedder-nan", lambda n: np.full((n, 384), np.nan, np.float32),
     "the embedder returned (1, 384) vectors (NaN/Inf or a wrong count) for 1 texts; check channels.embedder.model"),
    ("embedder-wrong-count", lambda n: np.ones((n + 1, 384), np.float32), "vectors (NaN/Inf or a wrong count)"),
], ids=["embedder-wrong-length", "embedder-nan", "embedder-wrong-count"])
def test_bad_embedder_output(case, vectors, expected):
    from corpus.channels import ChannelError, channel_matrices

    row = _row("memory", {"salient_item": 0, "text": "walks Rex the beagle"})
    with pytest.raises(ChannelError) as err:
        channel_matrices([row], DIMS, lambda texts: vectors(len(texts)))
    assert expected in str(err.value)


def _pack_inputs(tmp_path: Path):
    from corpus.tokenizer import Tokenizer, train_tokenizer

    rows = [{"row_id": f"r{i}", "prompt_id": f"p{i}", "capability": "affect", "kind": "register",
             "split": "train" if i % 2 else "heldout", "prompt": f"How was day {i}?",
             "target": f"It was a warm and kind day number {i}."} for i in range(6)]
    path = train_tokenizer([t for r in rows for t in (r["prompt"], r["target"])] * 20, tmp_path, 300)
    return rows, Tokenizer(path)


@pytest.mark.parametrize(("case", "matrix", "expected"), [
    ("pack-nan-channel-vectors", lambda n: np.where(np.arange(n)[:, None] == 2, np.nan, 0.5).astype(np.float32)
     * np.ones((n, 2), np.float32), "channels: NaN/Inf channel vectors in rows ['r2']; rebuild the channels stage"),
    ("pack-wrong-length-channels", lambda n: np.zeros((n - 1, 2), np.float32),
     "channels 'affect': 5 vectors for 6 corpus rows; the channels artifact was built from another corpus"),
], ids=["pack-nan-channel-vectors", "pack-wrong-length-channels"])
def test_bad_channel_vectors_refused_by_the_packer(tmp_path, case, matrix, expected):
    from corpus.pack import PackError, pack_rows

    rows, tok = _pack_inputs(tmp_path)
    with pytest.raises(PackError) as err:
        pack_rows(rows, {"affect": matrix(len(rows))}, tok, 64, 100, tmp_path)
    assert expected in str(err.value)
    assert not list(tmp_path.glob("*.parquet")), "nothing may be written for bad vectors"


def test_shard_channels_of_another_width(tmp_path):
    from corpus.pack import pack_rows
    from models.data import load_split

    rows, tok = _pack_inputs(tmp_path)
    meta = pack_rows(rows, {"affect": np.zeros((len(rows), 2), np.float32),
                            "time": np.zeros((len(rows), 16), np.float32)}, tok, 64, 100, tmp_path)
    with pytest.raises(ValueError, match=r"cannot unflatten channels of width 32 with channel_dim=5 \(pass"):
        load_split([tmp_path / n for n in meta["shards"]["train"]], channel_dim=5)


def test_tokenizer_on_an_empty_corpus(tmp_path):
    from corpus.tokenizer import TokenizerError, train_tokenizer

    with pytest.raises(TokenizerError, match="tokenizer: the corpus has no text to train on"):
        train_tokenizer(["", "   ", "\n"], tmp_path, 1000)
    assert not (tmp_path / "tokenizer.model").exists()


# ------------------------------------------------------------------ checkpoints of another model shape
@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    from models.architectures import build
    from models.checkpoint import save_model

    spec = {"arch": "native", "n_layer": 1, "n_head": 2, "d_model": 16}
    model = build(spec, vocab_size=300, seq_len=32, channel_names=["affect"], channel_dim=2, seed=0)
    save_model(model, tmp_path / "model")
    return tmp_path / "model"


def test_eval_load_of_weights_from_another_shape(tiny_model_dir):
    from models.checkpoint import load_model
    from models.weights import CheckpointError

    meta = json.loads((tiny_model_dir / "model.json").read_text())
    meta["build"]["spec"]["d_model"] = 32  # the recorded recipe no longer matches the weights
    (tiny_model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_model(tiny_model_dir)
    assert "model.safetensors: was written by a model of another shape: shapes differ (" in str(err.value)
    assert "load it with the model spec it was trained with" in str(err.value)


def test_eval_load_of_a_folder_without_model_json(tmp_path):
    from models.checkpoint import load_model
    from models.weights import CheckpointError

    with pytest.raises(CheckpointError, match=r"model.json: missing; .* is not a trained model folder"):
        load_model(tmp_path)


def test_resume_from_a_checkpoint_of_another_model(tmp_path, tiny_model_dir):
    from models.checkpoint import latest_checkpoint, write_checkpoint
    from models.weights import CheckpointError

    files = {"model.safetensors": (tiny_model_dir / "model.safetensors").read_bytes(), "optimizer.pt": b"o",
             "state.pt": b"s", "metrics.jsonl": b""}
    old = {"model": {"d_model": 16, "n_layer": 1}, "train": {"lr": 0.003}, "data": "abc"}
    write_checkpoint(tmp_path / "ckpt", 4, files, old)
    now = {**old, "model": {"d_model": 32, "n_layer": 1}}
    with pytest.raises(CheckpointError) as err:
        latest_checkpoint(tmp_path / "ckpt", now)
    assert "was written for another model or training recipe (model.d_model: checkpoint 16 vs now 32)" in str(err.value)
    assert "use a fresh checkpoint folder or the old settings" in str(err.value)
    assert (tmp_path / "ckpt" / "step-00000004" / "checkpoint.json").exists(), "a refused checkpoint is kept"


def test_checkpoint_weights_into_a_model_of_another_shape(tmp_path, tiny_model_dir):
    from models.architectures import build
    from models.weights import CheckpointError, load_weights

    other = build({"arch": "native", "n_layer": 2, "n_head": 2, "d_model": 16}, vocab_size=300, seq_len=32,
                  channel_names=["affect"], channel_dim=2, seed=0)
    with pytest.raises(CheckpointError, match=r"was written by a model of another shape: missing \['blocks.1"):
        load_weights(other, tiny_model_dir / "model.safetensors")


# ------------------------------------------------------------------ full disk (a file size limit in a child)
_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
""")


def _run_limited(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LIMITED + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_disk_full_in_write_atomic_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    out = _run_limited(f"""
        from pathlib import Path
        from tinymars.artifacts import DiskFull, write_atomic
        try:
            write_atomic(Path({str(target)!r}), b"x" * (2 << 20))
        except DiskFull as exc:
            print(exc)
            sys.exit(1)
    """)
    assert out.returncode == 1, out.stderr
    assert f"disk full or file size limit reached while writing {target}" in out.stdout
    assert "free space there (or raise the limit) and rerun" in out.stdout
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"], "no temporary file is left behind"


def test_disk_full_while_building_an_artifact(tmp_path):
    from tinymars.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path / "artifacts")
    prior = store.build("corpus", "good", lambda out: (out / "corpus.jsonl").write_text("{}\n") and None)
    out = _run_limited(f"""
        import numpy as np
        from safetensors.numpy import save_file
        from tinymars.artifacts import ArtifactStore, DiskFull
        store = ArtifactStore({str(tmp_path / "artifacts")!r})
        try:
            store.build("channels", "big",
                        lambda out: save_file({{"x": np.zeros(1 << 19)}}, str(out / "channels.safetensors")))
        except DiskFull as exc:
            print(exc)
            sys.exit(1)
    """)
    assert out.returncode == 1, out.stderr
    assert "disk full or file size limit reached while writing" in out.stdout
    assert f"{tmp_path / 'artifacts' / 'channels'}/.tmp-big-" in out.stdout
    assert "(building the channels artifact) (Error while serializing: I/O error: File too large" in out.stdout
    assert not list((tmp_path / "artifacts").glob("*/.tmp-*")), "the half-written build folder is removed"
    assert store.lookup("channels", "big") is None
    assert store.lookup("corpus", "good") == prior
