"""`tinymars score ARTIFACT`: every figure and verdict of an evaluation, re-computed offline.

No model, no network: the generate artifact's `generations.jsonl` and `measurements.json` (held-out
losses, gates: what needed the model) and the scoring settings the profile pre-registered. ARTIFACT is
a score artifact folder (its `settings.json`; the generations of the generate artifact it was scored
from, found through its manifest), or a generate artifact folder / its `generations.jsonl` (settings from
`--profile`, or from the one score artifact in the same store scored from it; a former eval artifact's
`settings.json` beside the file also works). `--check` compares the result with that score artifact's
`scores.json` and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.common import fail

GENERATIONS, SETTINGS, SCORES = "generations.jsonl", "settings.json", "scores.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="re-score saved generations offline (no model): every figure and verdict")
    p.add_argument("source", metavar="ARTIFACT", help="a score artifact folder, or a generate artifact folder or "
                   "its generations.jsonl (HOME/artifacts/{score,generate}/KEY)")
    p.add_argument("--profile", help="take the scoring settings from this profile's eval section "
                   "(default: the score artifact's settings.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="profile override, with --profile")
    p.add_argument("--alpha", type=float, help="override the per-capability significance level")
    p.add_argument("--measurements", help="measurements.json (default: beside the generations, if there)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON instead of Markdown")
    p.add_argument("--out", metavar="DIR", help="also write scores.json and evaluation.md into DIR")
    p.add_argument("--check", nargs="?", const="", metavar="SCORES.json",
                   help="compare with a saved scores.json (default: the score artifact's); exit 1 on a difference")
    p.set_defaults(handler=cmd_score)


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _generate_of(score_dir: Path) -> Path:
    """The generate artifact a score artifact was scored from (its manifest's input hash, in the same store)."""
    want = _manifest(score_dir).get("inputs", {}).get("generate")
    root = score_dir.resolve().parents[1]  # HOME/artifacts/score/<key> -> HOME/artifacts
    for manifest in sorted((root / "generate").glob("*/manifest.json")):
        if want and json.loads(manifest.read_text()).get("content_hash") == want:
            return manifest.parent
    raise ValueError(f"{score_dir}: cannot find the generate artifact it was scored from ({(want or '?')[:12]}) "
                     f"under {root / 'generate'}; pass that artifact's generations.jsonl with --profile")


def _scores_of(generate_dir: Path) -> list[Path]:
    """The score artifacts in the same store that were scored from this generate artifact."""
    have = _manifest(generate_dir).get("content_hash")
    if not have:
        return []
    root = generate_dir.resolve().parents[1]
    return [m.parent for m in sorted((root / "score").glob("*/manifest.json"))
            if json.loads(m.read_text()).get("inputs", {}).get("generate") == have]


def locate(source: Path) -> tuple[Path, Path | None]:
    """(generations.jsonl, the score folder whose settings and scores go with it, or None)."""
    folder = source if source.is_dir() else source.parent
    if source.is_dir() and (folder / SCORES).is_file() and not (folder / GENERATIONS).is_file():
        return _generate_of(folder) / GENERATIONS, folder  # a score artifact
    gen = folder / GENERATIONS if source.is_dir() else source
    if (folder / SETTINGS).is_file():  # a former eval artifact: generations, settings and scores in one folder
        return gen, folder
    scored = _scores_of(folder)
    return gen, scored[0] if len(scored) == 1 else None  # several: _settings asks which one


def _settings(args: argparse.Namespace, gen: Path, score_dir: Path | None) -> dict[str, Any]:
    if args.profile:
        from tinymars.profile import load_profile

        settings = load_profile(args.profile, args.overrides).eval.scoring()
    elif score_dir is not None:
        settings = json.loads((score_dir / SETTINGS).read_text())
    else:
        many = _scores_of(gen.parent)
        hint = (f"{len(many)} score artifacts were scored from it ({', '.join(str(d) for d in many)}): pass one "
                "of them instead, or --profile" if many else "pass --profile to take the pre-registered settings "
                "(alpha, hypotheses, bootstrap seed) from a profile, or pass a score artifact folder")
        raise ValueError(f"no scoring settings for {gen}: {hint}")
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

    try:
        gen, score_dir = locate(Path(args.source))
        records = read_generations(gen)
        scores = score_all(records, _settings(args, gen, score_dir), _measurements(args, gen.parent))
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
    if not args.check and score_dir is None:
        return fail(f"--check: no score artifact goes with {gen}; pass the saved SCORES.json or a score artifact")
    saved_path = Path(args.check) if args.check else score_dir / SCORES
    if not saved_path.is_file():
        return fail(f"--check: {saved_path} does not exist")
    diffs = differences(scores, json.loads(saved_path.read_text()))
    if diffs:
        print(f"tinymars: {len(diffs)} difference(s) from {saved_path}:", *diffs[:20], sep="\n  ", file=sys.stderr)
        return 1
    print(f"tinymars: reproduced {saved_path} exactly ({len(records)} generations, "
          f"{len(scores['hypotheses'])} hypotheses)", file=sys.stderr)
    return 0
