"""The Hugging Face hub and its local cache: what is cached, whether the hub answers, downloads.

Every network step is bounded: a machine without network learns so in about a second, never in the
~48 s that huggingface_hub's retries take.
"""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gptcli.errors import GptcliError, UsageError, first_line

# Files a causal LM needs from a hub repo; pickle weights are fetched only when the caller allows them.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cache folder of `repo_id` (at `revision`: a branch, tag or commit; default main) if its
    config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    check_repo_id(repo_id)
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def check_repo_id(repo_id: str) -> None:
    """Refuse a name the hub's own rules refuse (at most 96 characters, no '--' or '..', no trailing
    newline...) before it reaches the cache or the network."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        if repo_id.startswith(("/", "./", "../", "~")) or _exists(repo_id):
            raise UsageError(
                f"{repo_id!r} is a path, not a hub id: the cache holds hub models (as `gptcli models` "
                "lists them); a folder of your own is yours to move or delete"
            ) from exc
        # (huggingface_hub's own message names its `repo_type` argument, which means nothing here)
        raise UsageError(
            f"{repo_id!r} is not a hub id: a hub id is NAME or OWNER/NAME, of letters, digits, '-', '_' "
            "and '.', at most 96 characters, with no '--' or '..'"
        ) from exc


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a name too long for a path, a NUL byte
        return False


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # The connect timeout does not cover the DNS lookup, which can hang for many seconds on a
    # machine without network: run the probe in a daemon thread and stop waiting after `timeout`.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def unreachable_reason() -> str:
    """Why the hub cannot be asked: "HF_HUB_OFFLINE is set" or "<endpoint> is unreachable"."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is unreachable"


def download(
    repo_id: str,
    *,
    allow_pickle: bool = False,
    probed: bool = False,
    revision: str | None = None,
    fix: str = "pass -m with a local model folder, or connect once so it can be downloaded",
) -> Path:
    """Fetch a model repo's files into the cache (safetensors, configs, tokenizer); return its folder.

    `fix`: what the user can do when the hub cannot be reached, said in the error (it depends on the
    command: `pull` has no -m).
    """
    from huggingface_hub import constants, snapshot_download

    check_repo_id(repo_id)
    if not probed and not hub_reachable():
        raise GptcliError(
            f"model {repo_id!r} is not in the local cache ({constants.HF_HUB_CACHE}) and "
            f"{unreachable_reason()}: {fix} (later runs work offline, also with HF_HUB_OFFLINE=1)"
        )
    patterns = _HUB_FILES + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except Exception as exc:  # the hub's errors are many; the user needs the one line
        raise GptcliError(f"could not download {repo_id!r} from the hub: {first_line(exc)}") from exc


def remove_cached(repo_id: str) -> tuple[int, list[str]]:
    """Delete every cached revision of model `repo_id`; return (bytes freed, the folders removed).

    Raises UsageError when the cache does not hold it.
    """
    from huggingface_hub import constants, scan_cache_dir

    check_repo_id(repo_id)
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # no cache folder yet
        info = None
    repos = [r for r in (info.repos if info else []) if r.repo_type == "model" and r.repo_id == repo_id]
    if not repos or info is None:
        raise UsageError(f"{repo_id} is not in the local cache ({constants.HF_HUB_CACHE}): nothing to remove")
    (repo,) = repos
    freed = repo.size_on_disk
    try:
        if repo.revisions:  # huggingface_hub's own deletion: blobs, snapshots, refs, then the folder
            info.delete_revisions(*(revision.commit_hash for revision in repo.revisions)).execute()
        if repo.repo_path.exists():  # a download that never finished has no revision to delete
            shutil.rmtree(repo.repo_path)
    except OSError as exc:
        raise GptcliError(f"could not remove {repo.repo_path}: {exc.strerror or exc}") from exc
    return freed, [str(repo.repo_path)]


def cached_models() -> list[dict[str, Any]]:
    """Models in the local Hugging Face cache: [{"id", "size", "path"}], largest first."""
    from huggingface_hub import constants, scan_cache_dir

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # no cache folder yet, or one we cannot read: nothing is cached
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified, default=None)
        path = str(newest.snapshot_path) if newest else str(repo.repo_path)
        found.append({"id": repo.repo_id, "size": repo.size_on_disk, "path": path})
    return sorted(found, key=lambda m: -m["size"])
