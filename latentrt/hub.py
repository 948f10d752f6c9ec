"""Hugging Face Hub ids (``owner/name``) resolved to a local snapshot through huggingface_hub's cache.

Offline (``HF_HUB_OFFLINE=1``) the cached snapshot is used; online the config, tokenizer and safetensors
files are downloaded (not the ``.bin`` / ``.pt`` duplicates some repositories carry, nor code), with the
hub library's own progress bars. Nothing is ever imported or executed from a downloaded file.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
# what latentrt reads: configs, tokenizer files, safetensors weights and their index
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def is_hub_id(name: str) -> bool:
    """``owner/name`` with the characters the hub allows (a path that does not exist locally)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a Hub model repository (see module docstring)."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and loading Hub ids needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=ALLOW_PATTERNS,
                cache_dir=constants.HF_HUB_CACHE,
                local_files_only=offline,
            )
        )
    except LocalEntryNotFoundError as exc:
        at = f" at revision {revision!r}" if revision else ""
        if offline:
            raise CheckpointError(
                f"{repo_id!r} is not a local folder, and the Hub model{at} is not in the cache "
                f"({constants.HF_HUB_CACHE}) while offline (HF_HUB_OFFLINE=1): download it once online, or "
                "give a folder"
            ) from None
        if isinstance(exc.__cause__, huggingface_hub.errors.HfHubHTTPError):  # it answered, with an error status
            raise CheckpointError(
                f"{repo_id!r} is not a local folder and could not be fetched from the Hub{at}: the Hub answered "
                f"{str(exc.__cause__).splitlines()[0]!r}, and the model is not in the cache ({constants.HF_HUB_CACHE})"
            ) from None
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hub{at}: the Hub did not answer "
            f"(no network?) and the model is not in the cache ({constants.HF_HUB_CACHE})"
        ) from None
    except huggingface_hub.errors.GatedRepoError:  # before its base class, RepositoryNotFoundError
        raise CheckpointError(
            f"the Hub model {repo_id!r} is gated: accept its terms on its Hub page, then log in (hf auth login, or "
            "HF_TOKEN) so the download is authorised"
        ) from None
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, nor a model repository on the Hub that this login can see (a "
            "private one needs hf auth login, or HF_TOKEN)"
        ) from None
    except huggingface_hub.errors.RevisionNotFoundError:
        raise CheckpointError(f"the Hub model {repo_id!r} has no revision {revision!r}") from None
    except huggingface_hub.errors.HfHubHTTPError as exc:
        raise CheckpointError(f"fetching {repo_id!r} from the Hub failed: {str(exc).splitlines()[0]}") from None
