"""`tinymars serve-model`: an OpenAI-compatible server for one of our trained models, with channel state,
steering, concept readouts and online learning (app/serve_model.py; the engine is models/engine.py).

    tinymars serve-model .tinymars/artifacts/train/<key> --port 8000
    tinymars serve-model a3a2436b --home .tinymars --readouts .tinymars/artifacts/steer/<key>

MODEL: a trained model folder, or a unique prefix of a model artifact's content hash (or key) in HOME's
store. --readouts: a steer artifact folder (readout.safetensors + readout.json), that file, or a unique
prefix of a steer artifact's hash or key. Everything is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

from app.common import fail, home_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-model", help="serve a trained model over an OpenAI-compatible HTTP API "
                       "(channels, steering, readouts, online learning)")
    p.add_argument("model", metavar="MODEL", help="a trained model folder, or a unique prefix of a model "
                   "artifact's content hash (or key) in HOME's store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--readouts", metavar="STEER_ARTIFACT_OR_FILE", help="concept vectors for steering and readouts: "
                   "a steer artifact folder, its readout.safetensors, or a unique hash/key prefix in HOME")
    p.add_argument("--readout-layer", default="auto", help="block whose residual stream is read and steered "
                   "(default: the one the steer stage chose)")
    p.add_argument("--tokenizer", help="tokenizer.model or a tokenizer artifact folder (default: traced through "
                   "the artifact store)")
    p.add_argument("--base", help="an adapter's frozen base folder (default: the one its model.json records)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--lr", type=float, default=1e-4, help="online learning: AdamW learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="online learning: AdamW weight decay")
    p.add_argument("--no-train", action="store_true", help="serve only: no /train, /checkpoint")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded in one batch")
    home_arg(p)
    p.set_defaults(handler=cmd_serve_model)


def resolve_artifact(ident: str, home: str, stage: str, files: tuple[str, ...], flag: str) -> Path:
    """A folder (or a file in one) as given, else the unique artifact of `stage` whose content hash or key
    starts with `ident`."""
    path = Path(ident).expanduser()
    if path.is_file():
        path = path.parent
    if not path.exists():
        hits = []
        if ident.isalnum():
            for manifest in sorted((Path(home) / "artifacts" / stage).glob("*/manifest.json")):
                meta = json.loads(manifest.read_text())
                if meta.get("content_hash", "").startswith(ident) or meta.get("key", "").startswith(ident):
                    hits.append(manifest.parent)
        if len(hits) != 1:
            found = "no" if not hits else f"{len(hits)}"
            raise ValueError(f"{flag}: '{ident}' is not a folder and matches {found} {stage} artifacts under "
                             f"{home}/artifacts/{stage}; pass a folder or a unique hash prefix")
        path = hits[0]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{flag}: {path} has no {', '.join(missing)}; point it at a {stage} artifact folder")
    return path.resolve()


def cmd_serve_model(args: argparse.Namespace) -> int:
    from models.engine import EngineError

    if not 0 <= args.port <= 65535:
        return fail(f"--port: {args.port} is not a TCP port (0..65535)")
    if args.max_batch < 1:
        return fail(f"--max-batch: must be >= 1, got {args.max_batch}")
    layer = args.readout_layer if args.readout_layer == "auto" else None
    if layer is None:
        if not args.readout_layer.isdigit():
            return fail(f"--readout-layer: '{args.readout_layer}' is not auto or a block index")
        layer = int(args.readout_layer)
    try:
        model = resolve_artifact(args.model, args.home, "train", ("model.json", "model.safetensors"), "MODEL")
        readouts = None if args.readouts is None else resolve_artifact(
            args.readouts, args.home, "steer", ("readout.json", "readout.safetensors"), "--readouts")
        from models.online import OptimizerSettings

        optim = OptimizerSettings(lr=args.lr, weight_decay=args.weight_decay)
    except ValueError as exc:
        return fail(str(exc))
    import uvicorn

    from app.serve_model import Settings, create_app
    from models.engine import Engine
    from models.online import OnlineTrainer

    try:
        engine = Engine.load(model, tokenizer=args.tokenizer, readouts=readouts, readout_layer=layer,
                             device=args.device, base=args.base)
    except (EngineError, ValueError) as exc:
        return fail(str(exc))
    trainer = None if args.no_train else OnlineTrainer(engine, optim)
    settings = Settings(Path(args.home).resolve(), f"serve-{uuid.uuid4().hex[:12]}", args.max_batch)
    app = create_app(engine, trainer, settings)
    d = engine.describe()
    print(f"tinymars serve-model: {d['name']} ({d['arch']}, {d['content_hash'] or 'outside a store'}) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
