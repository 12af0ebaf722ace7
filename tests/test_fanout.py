"""Fan-out: the device groups concurrent trainers get (a pure function, hand-computed tables), and the
iteration flow training the tiny profile's models at the same time with the sequential run's results."""

from __future__ import annotations

import pytest

from models.fanout import CUDA_ENV, THREADS_ENV, TrainerSlot, plan_slots
from tests.chaos_support import copy_home
from tinymars.lineage import Lineage
from tinymars.profile import ProfileError, load_profile

GPUS8 = [str(i) for i in range(8)]


def slots(models: int, kind: str = "cuda", parallel="auto", devices="auto", visible=GPUS8, cores: int = 48,
          batch: int = 32, accum: int = 1) -> list[TrainerSlot]:
    return plan_slots(models, kind, parallel, devices, visible, cores, batch, accum)


def test_device_groups_split_the_visible_gpus_evenly() -> None:
    # 8 GPUs, 3 models: three groups of 2, GPUs 6 and 7 unused; 48 cores / 6 processes = 8 threads each
    assert slots(3) == [TrainerSlot(2, {CUDA_ENV: "0,1", THREADS_ENV: "8"}),
                        TrainerSlot(2, {CUDA_ENV: "2,3", THREADS_ENV: "8"}),
                        TrainerSlot(2, {CUDA_ENV: "4,5", THREADS_ENV: "8"})]
    # 8 GPUs, 2 models: two groups of 4
    assert [s.env[CUDA_ENV] for s in slots(2)] == ["0,1,2,3", "4,5,6,7"]
    # more models than GPUs: one GPU each, as many trainers as GPUs (the rest wait for their slot)
    assert [(s.nproc, s.env[CUDA_ENV]) for s in slots(5, visible=["0", "1"])] == [(1, "0"), (1, "1")]
    # the ids the parent may use (its own CUDA_VISIBLE_DEVICES), not 0..n-1
    assert [s.env[CUDA_ENV] for s in slots(2, visible=["2", "5", "7"])] == ["2", "5"]
    # a group of 3 would not split a batch of 8: groups of 2 (GPUs 4 and 5 unused)
    assert [s.env[CUDA_ENV] for s in slots(2, visible=GPUS8[:6], batch=8)] == ["0,1", "2,3"]
    # an int forces the count; train.devices fixes the group size
    assert [s.env[CUDA_ENV] for s in slots(3, parallel=2, devices=3)] == ["0,1,2", "3,4,5"]


def test_no_fan_out_unless_it_helps_or_is_asked_for() -> None:
    assert slots(3, visible=["0"]) == []  # one GPU
    assert slots(1) == []  # one model
    assert slots(3, devices=2) == []  # auto with a fixed devices count: trained as configured
    assert slots(3, parallel=1) == []
    assert slots(3, kind="cpu", visible=[]) == []  # CPU cores are shared: auto never fans out there
    assert slots(3, kind="xla", visible=[]) == []
    # an int on CPU: that many trainers, each with its share of the cores
    assert slots(2, kind="cpu", parallel=2, visible=[], cores=2) == [TrainerSlot(1, {THREADS_ENV: "1"})] * 2
    assert slots(3, kind="cpu", parallel=8, devices=2, visible=[], cores=16) == [TrainerSlot(2, {THREADS_ENV: "2"})] * 3


def test_impossible_fan_out_names_the_fields() -> None:
    with pytest.raises(ValueError, match=r"train\.parallel_models: 3 concurrent trainers .* need 3 devices, but 2 "
                                         r"are visible; lower train\.parallel_models or train\.devices"):
        slots(3, parallel=3, visible=["0", "1"])
    with pytest.raises(ValueError, match=r"train\.parallel_models: 2 concurrent trainers with 4 device\(s\) each"):
        slots(2, parallel=2, devices=4, visible=GPUS8[:6])
    with pytest.raises(ValueError, match=r"train\.parallel_models: 2 concurrent trainers on XLA is not supported"):
        slots(2, kind="xla", parallel=2, visible=[])
    with pytest.raises(ProfileError, match=r"train: parallel_models: 2 concurrent trainers on XLA .* use auto or 1"):
        load_profile("tiny", ["train.device=xla", "train.parallel_models=2"])


# ---- the flow ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fanned(tiny_reference, tmp_path_factory):
    """The tiny reference home, its two models retrained by two concurrent trainers (2 CPU trainers forced).

    The slots keep the reference's thread count (their OMP_NUM_THREADS share is dropped): a CPU matmul's
    float summation order depends on its thread count, so only the same count gives the same bytes
    (the share itself is checked in the tables above)."""
    import tasks.train
    from flows.iteration import iteration

    home = copy_home(tiny_reference, tmp_path_factory.mktemp("fanout") / "home")
    planned: list[list[TrainerSlot]] = []

    def ambient_threads(*args):
        planned.append(plan_slots(*args))
        return [TrainerSlot(slot.nproc, {k: v for k, v in slot.env.items() if k != THREADS_ENV})
                for slot in planned[-1]]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks.train, "plan_slots", ambient_threads)
        out = iteration(profile="tiny", home=str(home), overrides=["train.parallel_models=2"], refresh=["train"],
                        only="train")
    assert len(planned) == 1 and len(planned[0]) == 2  # the flow asked for two concurrent slots
    return home, out


def train_rows(lin: Lineage, run_id: str) -> dict[str, dict]:
    return {s["name"]: s for s in lin.query("SELECT * FROM stages WHERE run_id = ? AND stage = 'train'", [run_id])}


@pytest.mark.slow
def test_concurrent_trainers_overlap_and_match_the_sequential_run(fanned, tiny_reference) -> None:
    home, out = fanned
    lin = Lineage(home / "lineage.duckdb")
    runs = {r["run_id"]: r for r in lin.runs()}
    reference = next(r for r in runs if r != out["run_id"])
    assert runs[out["run_id"]]["status"] == "completed"
    fan, seq = train_rows(lin, out["run_id"]), train_rows(lin, reference)
    assert set(fan) == set(seq) == {"train:native", "train:baseline"}
    assert not any(s["cache_hit"] for s in fan.values())  # both really retrained
    a, b = fan["train:native"], fan["train:baseline"]
    assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]  # the two runs overlap in time
    # and they trained the very same models (training is deterministic): same content hashes
    assert {n: s["artifact_hash"] for n, s in fan.items()} == {n: s["artifact_hash"] for n, s in seq.items()}


@pytest.mark.slow
def test_a_failing_model_fails_the_run_and_the_others_are_recorded(fanned, monkeypatch) -> None:
    import tasks.train
    from flows.iteration import iteration

    home, _ = fanned
    real = tasks.train.run_stage

    def native_breaks(stage, home_, section, inputs, build, force=False, name=None):
        if name == "train:native":
            raise RuntimeError("native trainer exploded")
        return real(stage, home_, section, inputs, build, force, name=name)

    monkeypatch.setattr(tasks.train, "run_stage", native_breaks)
    with pytest.raises(RuntimeError, match="native trainer exploded"):
        iteration(profile="tiny", home=str(home), overrides=["train.parallel_models=2"], only="train")
    lin = Lineage(home / "lineage.duckdb")
    last = lin.runs(1)[0]
    assert last["status"] == "failed"
    rows = train_rows(lin, last["run_id"])
    assert rows["train:native"]["status"] == "failed" and "native trainer exploded" in rows["train:native"]["error"]
    assert rows["train:baseline"]["status"] == "completed" and rows["train:baseline"]["artifact_hash"]
