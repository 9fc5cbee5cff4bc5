"""Checkpoints by name: ``hf-hub:ORG/NAME[@REVISION]``, ``https://`` URLs and the paper's names.

``resolve_checkpoint`` turns such a name into a local file or folder, which the checkpoint
readers then take like any other; everything that accepts a checkpoint calls it first (the
checkpoint readers, ``locate_checkpoint``), so every command accepts a name without code of
its own. A local path is returned as it is, and a local file wins over a table name it shares.

- ``hf-hub:ORG/NAME[@REVISION]``: the repository's snapshot through ``huggingface_hub``, in its
  cache (``HF_HOME``, ``HF_HUB_CACHE``), with its token (``HF_TOKEN``) and offline switch
  (``HF_HUB_OFFLINE``). Only the files a checkpoint reader uses are fetched: the JSON files
  and the ``model*.safetensors`` weights, else the ``pytorch_model*.bin`` ones.
- ``https://`` and ``http://`` URLs: downloaded once into ``$VITKIT_CACHE/weights/``, through a
  temporary file renamed into place, with the SHA-256 written beside it (``FILE.sha256``). A
  download cut short, or one whose checksum differs from the table's, leaves nothing behind.
  A cached copy is used without any network call.
- ``PRETRAINED``: the paper's released weights by their names (``ViT-B_16``,
  ``imagenet21k+imagenet2012/ViT-L_16``, ...), each a URL of Google's ``vit_models`` bucket.

It sits at the bottom layer because ``locate_checkpoint`` (here too) needs it, and it knows
nothing of the formats: what it returns is read by ``vitkit.checkpoints``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitkit.utils.files import CACHE_VARIABLE, atomic_write, cache_folder

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
URL_SCHEMES = ("https://", "http://")
WEIGHTS_SUBFOLDER = "weights"  # downloads go to $VITKIT_CACHE/weights/<key>/<file name>
CHECKSUM_SUFFIX = ".sha256"
CHUNK = 1 << 20
TIMEOUT_S = 60
# The files of a Hub repository that a checkpoint reader uses; the pickled weights only where
# there are no safetensors ones (repositories often hold both, and more: TF, Flax, ONNX).
HUB_FILES = ["*.json", "model*.safetensors"]
HUB_PICKLE_FILES = ["pytorch_model*.bin"]
# Whether a download draws a progress bar on stderr: off for the library (it logs instead),
# on in the CLI.
SHOW_PROGRESS: ContextVar[bool] = ContextVar("show_download_progress", default=False)


class DownloadError(ValueError):
    """A checkpoint name that could not be turned into a local file; the message says why,
    what was tried and what to set."""


@dataclass(frozen=True)
class PretrainedWeights:
    """One entry of the names table: where the file is, and its SHA-256 where known."""

    url: str
    description: str
    sha256: str | None = None


OFFICIAL_BUCKET = "https://storage.googleapis.com/vit_models"
# The released models of google-research/vision_transformer (README, "Available models"):
# pre-trained on ImageNet-21k, and those fine-tuned on ImageNet-2012 at 384 px (-224: at 224).
PRETRAINED_21K = ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50+ViT-B_16")
FINETUNED_1K = (
    "ViT-B_16",
    "ViT-B_32",
    "ViT-L_16",
    "ViT-L_32",
    "R50+ViT-B_16",
    "ViT-B_16-224",
    "ViT-L_16-224",
)


def official_table() -> dict[str, PretrainedWeights]:
    table = {}
    for model in PRETRAINED_21K:
        url = f"{OFFICIAL_BUCKET}/imagenet21k/{urllib.parse.quote(model)}.npz"
        weights = PretrainedWeights(url, f"{model}, pre-trained on ImageNet-21k")
        table[f"imagenet21k/{model}"] = weights
        table[model] = weights  # a bare name: the pre-trained model, to fine-tune
    for model in FINETUNED_1K:
        upstream = urllib.parse.quote("imagenet21k+imagenet2012", safe="")
        url = f"{OFFICIAL_BUCKET}/{upstream}/{urllib.parse.quote(model)}.npz"
        description = f"{model}, ImageNet-21k, fine-tuned on ImageNet-2012"
        table[f"imagenet21k+imagenet2012/{model}"] = PretrainedWeights(url, description)
    return table


PRETRAINED: dict[str, PretrainedWeights] = official_table()


def is_remote(spec: Any) -> bool:
    """Whether ``spec`` names weights to fetch (an ``hf-hub:`` name, a URL or a table name)
    rather than a local path; nothing is looked up."""
    return isinstance(spec, str) and (
        spec.startswith((HF_HUB_PREFIX, *URL_SCHEMES)) or spec in PRETRAINED
    )


def resolve_checkpoint(spec: str | Path) -> Path:
    """The local file or folder that ``spec`` names, fetched into a cache first if needed."""
    if not isinstance(spec, str):
        return Path(spec)
    if spec.startswith(HF_HUB_PREFIX):
        return hub_snapshot(spec)
    if spec.startswith(URL_SCHEMES):
        return download(spec)
    if spec in PRETRAINED and not Path(spec).exists():
        return download(PRETRAINED[spec].url, PRETRAINED[spec].sha256)
    return Path(spec)


# ----------------------------------------------------------------------- Hugging Face Hub


def parse_hub_name(spec: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME[@REVISION]`` as (repository id, revision or None)."""
    repo_id, _, revision = spec.removeprefix(HF_HUB_PREFIX).partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DownloadError(
            f"{spec!r} is not a Hub name: write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION"
        )
    return repo_id, revision or None


def hub_snapshot(spec: str) -> Path:
    """The local snapshot folder of the Hub repository ``spec`` names."""
    repo_id, revision = parse_hub_name(spec)
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise DownloadError(
            f"{spec} needs huggingface_hub: pip install 'vitkit[hub]' (or huggingface_hub)"
        ) from None
    try:
        folder = Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
        )
        if not any(folder.glob("*.safetensors")):
            folder = Path(
                huggingface_hub.snapshot_download(
                    repo_id, revision=revision, allow_patterns=HUB_PICKLE_FILES
                )
            )
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as err:
        raise DownloadError(
            f"{spec}: no such repository on the Hugging Face Hub, or it is private or gated "
            f"({first_line(err)}); check the name, or set HF_TOKEN to a token that may read it"
        ) from None
    except errors.RevisionNotFoundError:
        raise DownloadError(f"{spec}: the repository has no revision {revision!r}") from None
    except errors.HFValidationError as err:
        raise DownloadError(f"{spec} is not a valid Hub name ({first_line(err)})") from None
    except OSError as err:  # neither cached nor reachable
        reason = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else f"the Hub could not be reached ({first_line(err.__cause__ or err)})"
        )
        raise DownloadError(
            f"{spec}: tried the Hugging Face cache {constants.HF_HUB_CACHE}, which does not hold "
            f"it, and {reason}; connect to the network (HF_HUB_OFFLINE unset), or set HF_HOME "
            "or HF_HUB_CACHE to the cache that holds it"
        ) from None
    logger.info("%s: %s", spec, folder)
    return folder


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ------------------------------------------------------------------------------------ URLs


def cached_path(url: str) -> Path:
    """Where ``url`` is cached: ``$VITKIT_CACHE/weights/<hash of the URL>/<its file name>``
    (the file name kept, for the readers that recognise a format by its suffix)."""
    folder = cache_folder()
    if folder is None:
        raise DownloadError(
            f"cannot download {url}: {CACHE_VARIABLE} is off; set {CACHE_VARIABLE} to a folder "
            "to download into, or download the file yourself and pass its path"
        )
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path).rsplit("/", 1)[-1]
    if not re.fullmatch(r"[\w+.-]+", name) or name.startswith("."):
        name = "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return folder / WEIGHTS_SUBFOLDER / key / name


def download(url: str, sha256: str | None = None) -> Path:
    """The cached copy of ``url``, downloaded first if there is none.

    ``sha256``, when given, must be the file's checksum: a download that differs is an error
    and is not kept, and a cached copy recorded with another checksum is downloaded again.
    """
    path = cached_path(url)
    checksum_file = path.with_name(path.name + CHECKSUM_SUFFIX)
    if path.is_file() and checksum_file.is_file():
        recorded = checksum_file.read_text().split()[0]
        if sha256 is None or recorded == sha256:
            return path
    digest = hashlib.sha256()

    def fetch(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                logger.info("downloading %s to %s", url, path)
                received = copy_response(response, tmp, digest, total, path.name)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if isinstance(err, urllib.error.HTTPError):
                reason: object = f"the server answered HTTP {err.code} {err.reason}"
            else:
                reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"could not download {url} ({reason}); nothing is cached at {path}: connect "
                f"to the network, or set {CACHE_VARIABLE} to the cache folder that holds it "
                f"(now {path.parents[2]}), or download it yourself and pass the file's path"
            ) from None
        if total is not None and received != total:
            raise DownloadError(
                f"the download of {url} was cut short: {received} of {total} bytes; nothing "
                "was kept, try again"
            )
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DownloadError(
                f"{url} has SHA-256 {digest.hexdigest()}, not the expected {sha256}: the file "
                "was changed or damaged on the way; nothing was kept"
            )

    atomic_write(path, fetch)
    line = f"{digest.hexdigest()}  {path.name}\n"
    atomic_write(checksum_file, lambda tmp: tmp.write_text(line))
    return path


def copy_response(
    response: Any, out: Path, digest: Any, total: int | None, description: str
) -> int:
    """Copy ``response``'s body into ``out``, feeding ``digest``; the number of bytes copied.

    A connection closed early ends the copy short (the caller compares the count with the
    ``Content-Length``); the progress bar is drawn only where ``SHOW_PROGRESS`` asks."""
    received = 0
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=description,
        disable=not SHOW_PROGRESS.get(),
    )
    with open(out, "wb") as file, bar, contextlib.suppress(http.client.IncompleteRead):
        while chunk := response.read(CHUNK):
            file.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


__all__ = [
    "PRETRAINED",
    "SHOW_PROGRESS",
    "DownloadError",
    "PretrainedWeights",
    "download",
    "is_remote",
    "resolve_checkpoint",
]
