"""``vitkit push``: a run or checkpoint uploaded to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from vitkit.deploy.push import PUSH_FORMATS, push


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a run or checkpoint to the Hugging Face Hub",
        description="Convert RUN_OR_CHECKPOINT (a run folder: its best checkpoint; or any "
        "checkpoint load_pretrained reads) into a temporary folder, as `vitkit convert` "
        "would (--format hf: transformers' folder with preprocessor_config.json; timm: "
        "timm's hub folder; vitkit: vitkit's own), with a model card README.md (the run's test "
        "accuracy and training config when it is a run), and upload it in one commit with "
        "huggingface_hub. The token comes from HF_TOKEN or `hf auth login`, the server from "
        "HF_ENDPOINT. Prints the commit's URL. Needs pip install 'vitkit[hub]'.",
    )
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder or checkpoint")
    p.add_argument("repo", metavar="ORG/NAME", help="the Hub model repo (created if missing)")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private",
        dest="private",
        action="store_true",
        default=True,
        help="create the repo private (default); an existing repo keeps its visibility",
    )
    visibility.add_argument(
        "--public", dest="private", action="store_false", help="create the repo public"
    )
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument(
        "--format",
        dest="to",
        choices=PUSH_FORMATS,
        default="hf",
        help="folder format to upload (default: hf)",
    )
    p.add_argument(
        "--model", help="registered model name, for checkpoint formats without an architecture"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url = push(args.checkpoint, args.repo, args.to, args.private, args.revision, args.model)
    print(url)
    return 0
