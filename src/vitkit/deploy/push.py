"""Upload a model to the Hugging Face Hub: ``push(checkpoint, "ORG/NAME")``.

The model is converted into a temporary folder (a Hugging Face transformers folder by default,
timm's hub folder, or vitkit's own, each with its model card) and uploaded in one commit with
``huggingface_hub`` (``HfApi.create_repo`` then ``upload_folder``), which takes the token from
``HF_TOKEN`` or ``hf auth login`` and the server from ``HF_ENDPOINT``. A new repo is private
unless asked otherwise; an existing one keeps its visibility. huggingface_hub is optional
(``pip install 'vitkit[hub]'``) and imported only here.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from vitkit.checkpoints import load_pretrained
from vitkit.checkpoints.export import export
from vitkit.deploy.common import import_optional
from vitkit.utils.runlayout import locate_checkpoint

logger = logging.getLogger(__name__)

PUSH_FORMATS = ("hf", "timm", "vitkit")


def check_repo_id(repo: str) -> None:
    owner, _, name = repo.partition("/")
    if not owner or not name or "/" in name:
        raise ValueError(f"the Hub repo must be named ORG/NAME (or USER/NAME), not {repo!r}")


def push(
    checkpoint: str | Path,
    repo: str,
    to: str = "hf",
    private: bool = True,
    revision: str | None = None,
    model: str | None = None,
) -> str:
    """Convert ``checkpoint`` (any checkpoint ``load_pretrained`` reads, or a run folder) to
    format ``to`` and upload it to the Hub repo ``repo`` (``ORG/NAME``), creating the repo
    (``private``) if it does not exist; ``revision`` is the branch to commit to (default: the
    main branch). Returns the URL of the commit."""
    check_repo_id(repo)
    if to not in PUSH_FORMATS:
        raise ValueError(f"unknown format {to!r} to push; choose one of {PUSH_FORMATS}")
    hub = import_optional("huggingface_hub", "vitkit push needs pip install 'vitkit[hub]'")
    run = locate_checkpoint(checkpoint)[1] if Path(checkpoint).exists() else None
    pretrained = load_pretrained(checkpoint, model)
    api = hub.HfApi()
    with tempfile.TemporaryDirectory(prefix="vitkit-push-") as tmp:
        folder = Path(tmp) / "model"
        export(pretrained, folder, to, run=run, card=True, repo=repo)
        api.create_repo(repo, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            revision=revision,
            commit_message=f"Upload {Path(checkpoint).name} ({to} format) with vitkit",
        )
    logger.info("pushed %s to %s", checkpoint, commit.commit_url)
    return str(commit.commit_url)


__all__ = ["PUSH_FORMATS", "push"]
