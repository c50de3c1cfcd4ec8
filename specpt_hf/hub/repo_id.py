"""Hub repo ids given as arguments: checked with `huggingface_hub.utils.validate_repo_id`, namespace required."""

from __future__ import annotations

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def check_repo_id(repo_id: str, argument: str = "repo_id") -> str:
    """Return `repo_id` when it is a valid Hub id of the form ORG/NAME; else ValueError naming `argument`."""
    try:
        validate_repo_id(repo_id)
        reason = "" if "/" in (repo_id or "") else "no namespace"
    except HFValidationError as err:
        reason = str(err)
    if reason:
        raise ValueError(
            f"{argument} must look like ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}: {reason}"
        )
    return repo_id
