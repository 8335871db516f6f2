"""`--push-to-hub REPO [--private]`: checked before any work (a repository name, a token, a hub that can be reached
from here), uploaded with huggingface_hub only once the export folder is complete and verified."""

from __future__ import annotations

import os
import re
from pathlib import Path

from alignlab.export import ExportError

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubError(ExportError):
    """The upload cannot happen as asked; the message says why and what to do instead."""


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_token(repo: str) -> str:
    """The token the upload will use, after checking what can be checked without the network: the repository name,
    the hub not switched off (HF_HUB_OFFLINE), a token saved by `hf auth login` or set in HF_TOKEN."""
    from huggingface_hub import get_token

    if not _REPO.match(repo):
        raise HubError(f"--push-to-hub {repo}: expected a model repository as OWNER/NAME, e.g. my-org/my-model")
    if _offline():
        raise HubError(
            f"--push-to-hub {repo}: the hub is switched off here (HF_HUB_OFFLINE=1), so nothing can be uploaded. "
            f"Export without --push-to-hub, then upload the folder where the hub is reachable: "
            f"hf upload {repo} DIR"
        )
    token = get_token()
    if not token:
        raise HubError(
            f"--push-to-hub {repo}: no Hugging Face token found. Run `hf auth login` (or set HF_TOKEN to a token "
            f"with write access), then export again."
        )
    return token


def upload(folder: str | Path, repo: str, token: str, private: bool = False) -> str:
    """Create `repo` (a model repository, private if asked; an existing one is kept) and upload every file of
    `folder` in one commit. Returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo,
        repo_type="model",
        folder_path=str(folder),
        commit_message=f"Upload {Path(folder).name} exported by alignlab",
    )
    return str(url)
