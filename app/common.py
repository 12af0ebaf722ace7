"""What the front door's commands share: the --home flag, one error line, running a flow, pre-flight, tables.

Everything here is public: a command module under `app/commands/` imports it from here, never from
`app.cli` (which imports the commands), so there is no loop between the two.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinymars.profile import Profile, ProfileError, is_local_source, load_profile, shipped_profiles
from tinymars.stages import downstream

if TYPE_CHECKING:  # duckdb loads only for the commands that read lineage: `tinymars --help` stays quick
    from tinymars.lineage import Lineage

DEFAULT_HOME = os.environ.get("TINYMARS_HOME", ".tinymars")


def home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home", default=DEFAULT_HOME,
        help="folder holding the artifact store and lineage.duckdb (default: $TINYMARS_HOME or ./.tinymars)",
    )


def fail(message: str, code: int = 2) -> int:
    print(f"tinymars: error: {message}", file=sys.stderr)
    return code


def call_flow(label: str, on_interrupt: str, flow_fn: Any, **params: Any) -> tuple[Any, int | None]:
    """Run a flow for a command: Ctrl-C and a failed flow become one clean error line and an exit code.

    The flow has already logged the traceback and recorded the failure; the user gets the reason once.
    Returns (result, None) on success, (None, exit code) otherwise.
    """
    try:
        return flow_fn(**params), None
    except KeyboardInterrupt:
        return None, fail(f"interrupted; {on_interrupt}", 130)
    except Exception as exc:
        return None, fail(f"{label} failed: {type(exc).__name__}: {exc}", 1)


def preflight(profile_arg: str, overrides: list[str], refresh: list[str], rehearse_home: Path | None = None
              ) -> Profile:
    """Everything that can be checked before work starts; raises ProfileError with the fix.

    With `rehearse_home`, the profile's own budget is checked, then its offline rehearsal (app.rehearse)
    is what gets the remaining checks and is returned."""
    prof = load_profile(_absolute(profile_arg), overrides)
    if rehearse_home is not None:
        from app.rehearse import rehearsal_profile
        from corpus.budget import budget_problems, token_budget

        if problems := budget_problems(token_budget(prof)):  # the paid run's own shape must pass first
            raise ProfileError(f"profile '{prof.name}' itself would fail: " + "\n".join(problems))
        prof = rehearsal_profile(prof, rehearse_home)
    try:
        downstream(refresh)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    from models.architectures import ARCHITECTURES

    for spec in prof.train.models:
        if spec.arch not in ARCHITECTURES:
            raise ProfileError(
                f"train.models[{spec.name}].arch: unknown architecture '{spec.arch}'; "
                f"registered: {', '.join(sorted(ARCHITECTURES))}"
            )
        if spec.arch == "adapter" and not Path(spec.base).expanduser().exists():
            raise ProfileError(
                f"train.models[{spec.name}].base: '{spec.base}' does not exist; point it at a local Hugging Face "
                "model folder (config.json) or one of our trained model folders (model.json)"
            )
    base = prof.tokenizer.base
    if prof.tokenizer.kind == "hf" and is_local_source(base) and not Path(base).expanduser().is_dir():
        raise ProfileError(f"tokenizer.base: '{base}' does not exist; point it at the adapter base's local Hugging "
                           "Face model folder (config.json + tokenizer files)")
    from corpus.teacher_corpus import check_runnable

    try:  # the teacher's key is in the environment variable the profile names (never printed), templates load
        check_runnable(prof.corpus)
        if prof.replay is not None:  # a local source exists, is readable and UTF-8; a hub source is pinned
            from corpus.replay import check_source

            check_source(prof.replay)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    from corpus.budget import budget_problems, token_budget

    if problems := budget_problems(token_budget(prof)):  # what the run would meet after paying for the corpus
        raise ProfileError("\n".join(problems))
    return prof


def runnable_here(prof: Profile) -> str | None:
    """Why a valid profile cannot run on this machine with this version, or None."""
    return missing_device(prof)


def missing_device(prof: Profile) -> str | None:
    """A device the profile names that this machine lacks (training dispatched to a work pool is not checked)."""
    import importlib.util

    wants_cuda = {"channels.embedder.device": prof.channels.embedder.device, "eval.device": prof.eval.device}
    if prof.eval.device == "xla" and importlib.util.find_spec("torch_xla") is None:
        return "eval.device: 'xla' but torch_xla is not installed here; run on the TPU host, or use auto or cpu"
    if prof.orchestration.train_dispatch == "local":
        wants_cuda["train.device"] = prof.train.device
        if prof.train.device == "xla" and importlib.util.find_spec("torch_xla") is None:
            return ("train.device: 'xla' but torch_xla is not installed here; run on the TPU host (install the "
                    "tpu extra), or use device: auto")
    wants_cuda = {k: v for k, v in wants_cuda.items() if str(v).startswith("cuda")}
    if wants_cuda:
        import torch

        if not torch.cuda.is_available():
            field, value = next(iter(wants_cuda.items()))
            return (f"{field}: '{value}' but no CUDA GPU is visible here; use auto (the GPU when there is one) or "
                    "cpu, or set orchestration.train_dispatch: deployment to train on an accelerator work pool")
    return None


def _absolute(profile_arg: str) -> str:
    """A profile path made absolute, so an error about the file names it unambiguously (flows receive the
    validated Profile itself, not the path)."""
    path = Path(profile_arg).expanduser()
    if profile_arg in shipped_profiles() or not (path.suffix in (".yaml", ".yml") or path.exists()):
        return profile_arg  # a shipped name, or an unknown one the loader names as typed
    return str(path.resolve())


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def open_lineage(home: str) -> Lineage:
    from tinymars.lineage import Lineage

    path = Path(home) / "lineage.duckdb"
    if not path.exists():
        raise FileNotFoundError(f"no lineage database at {path}; run `tinymars run` first or pass --home")
    return Lineage(path)


