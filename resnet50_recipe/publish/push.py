"""`push`: an export folder to the Hugging Face Hub, checked before anything is uploaded, with the model card's
repo id filled in."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from resnet50_recipe.errors import UserError
from resnet50_recipe.publish.card import REPO_PLACEHOLDER
from resnet50_recipe.publish.export import verify_export

__all__ = ["push"]

log = logging.getLogger(__name__)


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None) -> str:
    """Check the export folder, then create the repo (exist_ok) and upload the folder; returns the repo's URL on
    the Hub pushed to (HF_ENDPOINT's, where it is set).

    A token the Hub refuses (401, 403) is bad input: UserError, in one line, before anything is uploaded.

    With `private`, an existing repo must be private already: create_repo(exist_ok=True) leaves an existing
    repo's visibility as it is, so a public one would publish the weights. It is refused (UserError) before any
    upload, and never made private here: that would hide whatever the repo already shows to its users.

    The token comes from `token`, HF_TOKEN or the huggingface login cache, as huggingface_hub resolves it;
    it is never printed or logged.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    verify_export(folder)
    with tempfile.TemporaryDirectory() as staging:
        # Upload a copy whose model card names the real repo, leaving the export folder as it was checked.
        staged = Path(staging) / folder.name
        shutil.copytree(folder, staged)
        card = staged / "README.md"
        card.write_text(card.read_text().replace(REPO_PLACEHOLDER, repo_id))
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status not in (401, 403):
                raise
            raise UserError(f"push to {repo_id}: the Hub refused the token ({status} at {api.endpoint}); set HF_TOKEN "
                            f"to a token with write access to {repo_id.split('/')[0]} (https://huggingface.co/"
                            "settings/tokens), or log in with `hf auth login`") from None
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise UserError(f"--private: {repo_id} exists and is public, and pushing would publish these weights; "
                            "make it private on the Hub first (Settings, or HfApi().update_repo_settings("
                            f"{repo_id!r}, private=True)), or push to another repo")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model", revision=revision,
                                 create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {folder.name} from resnet50-recipe")
    log.info("pushed %s to %s (%s)", folder, repo_id, info)
    return str(url)
