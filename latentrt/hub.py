"""Hugging Face Hub ids (``owner/name``) resolved to a local snapshot through huggingface_hub's cache.

Offline (``HF_HUB_OFFLINE=1``) the cached snapshot is used; online the config, tokenizer and safetensors
files are downloaded (not the ``.bin`` / ``.pt`` duplicates some repositories carry, nor code), with the
hub library's own progress bars. Nothing is ever imported or executed from a downloaded file.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError, InputError

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


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
):
    """transformers' ``push_to_hub``: the folder ``save_pretrained`` writes, uploaded as one commit to the Hub model
    repository ``repo_id`` (created if it does not exist: ``private`` then; ``revision``: a branch; ``create_pr``: as
    a pull request). ``token``: huggingface_hub's (default: the login, or HF_TOKEN). Returns huggingface_hub's
    ``CommitInfo`` (``.commit_url``, ``.pr_url``). ``latentrt.load(repo_id)`` reads it back to the same numbers."""
    import tempfile

    from .checkpoint import save_pretrained

    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise InputError(f"repo_id must be a Hub model id, owner/name, got {repo_id!r}")
    for name, value in (("private", private), ("create_pr", create_pr)):
        if value is not None and not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
    for name, value in (("token", token), ("revision", revision), ("commit_message", commit_message)):
        if value is not None and not isinstance(value, str):
            raise InputError(f"{name} must be a string or None, got {value!r}")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:
        raise CheckpointError("pushing to the Hub needs huggingface_hub (pip install huggingface_hub)") from None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="latentrt-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", max_shard_size=max_shard_size)  # (checked before any call)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=folder,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or "Upload model (latentrt save_pretrained)",
            )
        except OfflineModeIsEnabled:
            raise CheckpointError(f"cannot push {repo_id!r}: huggingface_hub is offline (HF_HUB_OFFLINE=1)") from None
        except HfHubHTTPError as exc:
            raise CheckpointError(
                f"pushing to {repo_id!r} failed: the Hub answered {str(exc).splitlines()[0]!r}"
            ) from None
        except _transport_errors() as exc:
            raise CheckpointError(f"pushing to {repo_id!r} failed: the Hub did not answer ({exc})") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The errors of a Hub that does not answer, from the HTTP client huggingface_hub uses (requests' are OSErrors;
    httpx's and httpx2's, of newer releases, are not)."""
    import importlib

    found: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)
