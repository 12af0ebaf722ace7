"""`tinymars score GENERATIONS.jsonl`: every figure and verdict of an eval, re-computed offline.

No model, no network: the generations, the scoring settings the profile pre-registered
(`settings.json` beside the file, or `--profile`), and the measurements that needed the model
(`measurements.json` beside it: held-out losses, gates). `--check` compares the result with the
eval artifact's `scores.json` and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.common import fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="re-score saved generations offline (no model): every figure and verdict")
    p.add_argument("generations", metavar="GENERATIONS.jsonl", help="an eval artifact's generations.jsonl")
    p.add_argument("--profile", help="take the scoring settings from this profile's eval section "
                   "(default: settings.json beside the generations)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="profile override, with --profile")
    p.add_argument("--alpha", type=float, help="override the per-capability significance level")
    p.add_argument("--measurements", help="measurements.json (default: beside the generations, if there)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON instead of Markdown")
    p.add_argument("--out", metavar="DIR", help="also write scores.json and evaluation.md into DIR")
    p.add_argument("--check", nargs="?", const="", metavar="SCORES.json",
                   help="compare with a saved scores.json (default: beside the generations); exit 1 on a difference")
    p.set_defaults(handler=cmd_score)


def _settings(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    if args.profile:
        from tinymars.profile import load_profile

        settings = load_profile(args.profile, args.overrides).eval.scoring()
    elif (folder / "settings.json").is_file():
        settings = json.loads((folder / "settings.json").read_text())
    else:
        raise ValueError(f"no settings.json beside the generations in {folder}; pass --profile to take the "
                         "pre-registered settings (alpha, hypotheses, bootstrap seed) from a profile")
    if args.alpha is not None:
        if not 0.0 < args.alpha < 1.0:
            raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
        settings = {**settings, "alpha": args.alpha}
    return settings


def _measurements(args: argparse.Namespace, folder: Path) -> dict[str, Any] | None:
    path = Path(args.measurements) if args.measurements else folder / "measurements.json"
    if args.measurements and not path.is_file():
        raise ValueError(f"--measurements: {path} does not exist")
    return json.loads(path.read_text()) if path.is_file() else None


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON values differ (exact: floats must be equal to the last digit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'saved' if k in b else 'recomputed'}")
            else:
                out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{path}: recomputed {a!r} != saved {b!r}"]


def cmd_score(args: argparse.Namespace) -> int:
    from scorers.evaluate import score_all
    from scorers.io import GenerationsError, read_generations
    from scorers.report_md import format_evaluation
    from tinymars.profile import ProfileError

    gen = Path(args.generations)
    try:
        records = read_generations(gen)
        scores = score_all(records, _settings(args, gen.parent), _measurements(args, gen.parent))
    except (GenerationsError, ProfileError, ValueError) as exc:
        return fail(str(exc))
    text = format_evaluation(scores)
    if args.out:
        from tinymars.artifacts import write_atomic

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "scores.json", json.dumps(scores, indent=1, allow_nan=False) + "\n")
        write_atomic(out / "evaluation.md", text)
    print(json.dumps(scores, indent=1, allow_nan=False) if args.json else text, end="" if not args.json else "\n")
    if args.check is None:
        return 0
    saved_path = Path(args.check) if args.check else gen.parent / "scores.json"
    if not saved_path.is_file():
        return fail(f"--check: {saved_path} does not exist")
    diffs = differences(scores, json.loads(saved_path.read_text()))
    if diffs:
        print(f"tinymars: {len(diffs)} difference(s) from {saved_path}:", *diffs[:20], sep="\n  ", file=sys.stderr)
        return 1
    print(f"tinymars: reproduced {saved_path} exactly ({len(records)} generations, "
          f"{len(scores['hypotheses'])} hypotheses)", file=sys.stderr)
    return 0
