"""`tinymars chat MODEL`: talk to a trained model in the terminal while setting its channel state (app/chat.py).

    tinymars chat .tinymars/artifacts/train/<key>
    tinymars chat a3a2436b --home .tinymars            # a unique prefix of a model artifact's hash or key
    /affect +0.8    /time 23:00    /memory spent a week in Lisbon    /steer affect x1.0    /compare

--readouts: concept vectors for /steer and /readout; by default the steer artifact that lineage
records as built from this model (none when there is none). Everything is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from app.common import fail, home_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a trained model in the terminal, setting its channels, steering "
                       "and readouts (/help inside)")
    p.add_argument("model", metavar="MODEL", help="a trained model folder, or a unique prefix of a model "
                   "artifact's content hash (or key) in HOME's store")
    p.add_argument("--readouts", default="auto", metavar="STEER_ARTIFACT|auto|none",
                   help="concept vectors for /steer and /readout: a steer artifact folder or hash/key prefix; "
                   "auto (default): the steer artifact lineage records as built from MODEL; none: no readouts")
    p.add_argument("--readout-layer", default="auto", help="block read and steered (default: the steer stage's)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: traced through the artifact store)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--max-tokens", type=int, default=48, help="most new tokens per answer (/max changes it)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    home_arg(p)
    p.set_defaults(handler=cmd_chat)


def lineage_readouts(home: str, model: Path) -> Path | None:
    """The newest steer artifact lineage records as a child of the model's artifact, if its folder exists."""
    from tinymars.lineage import Lineage

    db = Path(home) / "lineage.duckdb"
    try:
        content_hash = json.loads((model / "manifest.json").read_text())["content_hash"]
    except (OSError, ValueError, KeyError):
        return None
    if not db.is_file():
        return None
    rows = Lineage(db).query(
        "SELECT a.path FROM edges e JOIN artifacts a ON a.content_hash = e.child_hash"
        " WHERE e.parent_hash = ? AND a.kind = 'steer' ORDER BY a.created_at DESC", [content_hash])
    for row in rows:
        if (Path(row["path"]) / "readout.safetensors").is_file():
            return Path(row["path"])
    return None


def cmd_chat(args: argparse.Namespace) -> int:
    # the one resolver of "a folder or a hash/key prefix in HOME" (written for serve-model)
    from app.commands.serve_model import resolve_artifact
    from models.generate import Sampling

    if args.max_tokens < 1:
        return fail(f"--max-tokens: must be >= 1, got {args.max_tokens}")
    layer: int | str = args.readout_layer
    if layer != "auto":
        if not str(layer).isdigit():
            return fail(f"--readout-layer: '{layer}' is not auto or a block index")
        layer = int(layer)
    if args.temperature < 0:
        return fail(f"--temperature: must be >= 0 (0 is greedy), got {args.temperature}")
    sampling = Sampling(temperature=args.temperature, seed=args.seed)
    try:
        model = resolve_artifact(args.model, args.home, "train", ("model.json", "model.safetensors"), "MODEL")
        if args.readouts == "none":
            readouts = None
        elif args.readouts == "auto":
            readouts = lineage_readouts(args.home, model)
        else:
            readouts = resolve_artifact(args.readouts, args.home, "steer", ("readout.json", "readout.safetensors"),
                                        "--readouts")
    except ValueError as exc:
        return fail(str(exc))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no loading bars in the middle of the chat
    from app.chat import ChatSession
    from models.engine import Engine, EngineError

    try:
        engine = Engine.load(model, tokenizer=args.tokenizer, readouts=readouts, readout_layer=layer,
                             device=args.device)
    except (EngineError, ValueError) as exc:
        if args.readouts == "auto" and readouts is not None and "readouts" in str(exc):
            return fail(f"{exc} (found by --readouts auto; pass --readouts none to chat without)")
        return fail(str(exc))
    try:
        import readline  # noqa: F401 (line editing and history for input())
    except ImportError:
        pass
    session = ChatSession(engine, sampling=sampling, max_new_tokens=args.max_tokens)
    session.banner()
    session.loop()
    return 0
