"""`tinymars steer`: concept vectors + quality report for a trained model folder or a local HF model.

    tinymars steer --model .tinymars/artifacts/train/<key> --pairs .tinymars/artifacts/corpus/<key> --out readout/
    tinymars steer --model ~/models/gpt2 --pairs pairs.jsonl --out readout/ --layers 4,6,8 --method pca

--model: one of our trained model folders (or its train-artifact key prefix under --home), or a
local Hugging Face causal LM folder. --pairs: a JSONL file of {"concept", "positive", "negative"
[, "baseline"]} lines, or a corpus artifact (folder or corpus.jsonl). Every input is checked before
a model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from app.common import call_flow, fail, home_arg
from tinymars.profile import SteeringSection

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="extract concept/steering vectors and their quality report from a model")
    p.add_argument("--model", required=True, help="a trained model folder (model.json), its train-artifact key "
                   "prefix under --home, or a local Hugging Face model folder (config.json)")
    p.add_argument("--pairs", required=True, help="paired-text JSONL (concept, positive, negative[, baseline]) "
                   "or a corpus artifact folder / corpus.jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for readout.safetensors, "
                   "readout.json and quality.json")
    p.add_argument("--tokenizer", help="our tokenizer.model (default: traced through the artifact store) or a HF "
                   "tokenizer folder (default: the model folder)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated block indices, e.g. 2,4,6")
    p.add_argument("--pooling", default="last", help="last | mean")
    p.add_argument("--method", default="diff_means", help="the readout's method: diff_means | pca | logistic | "
                   "logistic_l1 | subspace")
    p.add_argument("--methods", help="comma-separated methods compared in quality.json (default: all)")
    p.add_argument("--max-pairs", type=int, default=64, help="most pairs per concept")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    home_arg(p)
    p.set_defaults(handler=cmd_steer)


def settings_from(args: argparse.Namespace) -> SteeringSection:
    """The steering section the flags describe, validated by the one profile schema."""
    from pydantic import ValidationError

    raw: dict[str, Any] = {"pooling": args.pooling, "method": args.method, "max_pairs": args.max_pairs,
                           "batch_size": args.batch_size, "device": args.device}
    if args.layers != "all":
        try:
            raw["layers"] = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers: '{args.layers}' is not 'all' or comma-separated block indices "
                             "(e.g. 2,4,6)") from None
    if args.methods:
        raw["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        return SteeringSection.model_validate(raw)
    except ValidationError as exc:
        raise ValueError("; ".join(_flag_error(e) for e in exc.errors())) from None


def _flag_error(err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a cross-field check: its message names the fields
        return f"--{msg}"
    flag = str(err["loc"][0]).replace("_", "-")
    return f"--{flag}: {msg} (got {err.get('input')!r})"


def resolve_model(model: str, home: str) -> Path:
    """A folder as given, else a unique train-artifact key prefix under HOME/artifacts/train."""
    path = Path(model).expanduser()
    if not path.exists():
        hits = sorted((Path(home) / "artifacts" / "train").glob(f"{model}*")) if model.isalnum() else []
        if len(hits) != 1:
            found = "no" if not hits else f"{len(hits)}"
            raise ValueError(f"--model: '{model}' is not a folder and matches {found} train artifacts under "
                             f"{home}/artifacts/train; pass a model folder path or a unique key prefix")
        path = hits[0]
    if not ((path / "model.json").is_file() or (path / "config.json").is_file()):
        raise ValueError(f"--model: {path} has neither model.json (one of our trained models) nor config.json "
                         "(a Hugging Face model); point it at a model folder")
    return path.resolve()


def check_inputs(args: argparse.Namespace, settings: SteeringSection) -> tuple[Path, Path, str | None]:
    """Every check that needs no model weights; raises ValueError naming the flag and the fix."""
    model = resolve_model(args.model, args.home)
    pairs = Path(args.pairs).expanduser()
    if not pairs.exists():
        raise ValueError(f"--pairs: {pairs} does not exist; pass a paired-text JSONL or a corpus artifact folder")
    if pairs.is_dir() and not (pairs / "corpus.jsonl").is_file():
        raise ValueError(f"--pairs: folder {pairs} has no corpus.jsonl; pass a corpus artifact folder or a JSONL")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; pass a folder (it is created if missing)")
    tokenizer = args.tokenizer
    if tokenizer is not None and not Path(tokenizer).expanduser().exists():
        raise ValueError(f"--tokenizer: {tokenizer} does not exist")
    native = (model / "model.json").is_file()
    if native and tokenizer is None:
        from tasks.steering import tokenizer_of_model

        tokenizer = str(tokenizer_of_model(model))
    if not native and tokenizer is None and not any((model / f).is_file() for f in HF_TOKENIZER_FILES):
        raise ValueError(f"--tokenizer: {model} holds no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}); "
                         "pass --tokenizer FOLDER")
    n_layer = _depth(model)
    if n_layer is not None and isinstance(settings.layers, list) and max(settings.layers) >= n_layer:
        raise ValueError(f"--layers: {settings.layers} reaches past the model's {n_layer} blocks "
                         f"(0..{n_layer - 1})")
    return model, pairs.resolve(), tokenizer


def _depth(model: Path) -> int | None:
    if (model / "model.json").is_file():
        return json.loads((model / "model.json").read_text())["build"]["spec"].get("n_layer")
    config = json.loads((model / "config.json").read_text())
    config = config.get("text_config", config)
    return config.get("num_hidden_layers", config.get("n_layer"))


def cmd_steer(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        model, pairs, tokenizer = check_inputs(args, settings)
    except ValueError as exc:
        return fail(str(exc))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    out = Path(args.out).expanduser().resolve()
    from flows.steering import steering

    result, code = call_flow("steer", "nothing half-written is kept (files are written atomically)", steering,
                             model=str(model), pairs=str(pairs), out_dir=str(out),
                             settings=settings.model_dump(mode="json"), tokenizer=tokenizer)
    if code is not None:
        return code
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"readout: {out / 'readout.safetensors'} ({', '.join(result['concepts'])}; method {settings.method})")
    print(f"quality: {out / 'quality.json'}")
    for key, value in sorted(result["metrics"].items()):
        print(f"  {key:<24} {value:g}")
    return 0
