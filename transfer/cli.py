"""The `cifar10-transfer` command (pyproject.toml's [project.scripts]): using a model the pipeline trained.

    cifar10-transfer predict PATH... [--json] [--model models/finetuned.keras]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transfer.errors import PipelineError
from transfer.paths import FINETUNED_MODEL


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="cifar10-transfer", description=__doc__.splitlines()[0])
    subcommands = commands.add_subparsers(dest="command", required=True)
    predict = subcommands.add_parser(
        "predict", help="classify PNG or JPEG images",
        description="One line per image: class, probability, path (tab-separated). Images are prepared "
                    "exactly as the preprocess stage stored the training images (resized, same encoding).")
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                         help="an image file, or a folder: its .png, .jpg and .jpeg files, subfolders included")
    predict.add_argument("--model", type=Path, default=FINETUNED_MODEL,
                         help=f"a .keras model the finetune stage saved (default: {FINETUNED_MODEL})")
    predict.add_argument("--json", action="store_true",
                         help="print one JSON list: path, class, probability and every class's probability")
    return commands


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        run_predict(args.paths, args.model, args.json)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def run_predict(paths: list[Path], model_path: Path, as_json: bool) -> None:
    from transfer.predict import image_files, load_classifier, predict  # TensorFlow: only once there is work

    files = image_files(paths)
    model, description = load_classifier(model_path)
    predictions = predict(model, description, files)
    if as_json:
        print(json.dumps([{"path": str(p.path), "class": p.label, "probability": round(p.probability, 6),
                           "probabilities": {name: round(value, 6) for name, value in p.probabilities.items()}}
                          for p in predictions], indent=2))
        return
    for p in predictions:
        print(f"{p.label}\t{p.probability:.4f}\t{p.path}", flush=True)


if __name__ == "__main__":
    main()
