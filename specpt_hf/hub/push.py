"""`specpt push`: turn a trained SpecPT model folder into a complete Hub repo folder, then upload it.

    specpt push runs/redshift/best --repo-id my-org/specpt-desi --results eval/results.json
    specpt push runs/redshift/best --repo-id my-org/specpt-desi --dry-run --out hub/specpt-desi

The repo folder is written by `write_repo_folder` (see `specpt_hf.hub.repo_folder`). The upload uses
`huggingface_hub` (`HfApi.create_repo(exist_ok=True)` + `upload_folder`) against `HF_ENDPOINT` (or `--endpoint`)
with the token from `HF_TOKEN` or `hf auth login`. The token is never printed, logged or written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..cli import add_debug_flag, run_reporting_errors
from .card import CARD_TEMPLATE
from .model_folder import ModelFolderError
from .repo_folder import write_repo_folder
from .repo_id import check_repo_id

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload SpecPT model"


class HubError(OSError):
    """The Hub could not be reached or refused the request."""


class HubUnreachableError(HubError):
    """No answer from the Hub endpoint (connection refused, DNS, timeout, offline mode)."""


class HubRefusedError(HubError):
    """The Hub answered with an HTTP error."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "no answer": the HTTP client's transport errors and the OS's connection errors."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _refused(err: HfHubHTTPError, where: str) -> HubRefusedError:
    status = err.response.status_code if err.response is not None else None
    reason = getattr(err.response, "reason_phrase", "") if err.response is not None else ""
    server = (err.server_message or "").strip().splitlines()
    detail = f": {server[0]}" if server else ""
    hint = {
        401: " Check the token (HF_TOKEN or `hf auth login`): it is missing, invalid or expired.",
        403: " The token has no write access to this namespace.",
        404: " The repo or revision does not exist, or the token cannot see it.",
    }.get(status or 0, "")
    return HubRefusedError(f"{where} failed: the Hub answered HTTP {status} {reason}{detail}.{hint}", status)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed (`exist_ok`) and upload `folder` to it (on branch `revision`, created from main
    when missing). Raises `HubUnreachableError` / `HubRefusedError` naming the endpoint and the repo, never the
    token."""
    repo_id = check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder / 'config.json'}: missing; write the repo folder first")
    api = HfApi(endpoint=endpoint, token=token)
    where = f"pushing {folder} to {repo_id} at {api.endpoint}"
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            repo_type="model",
        )
    except HfHubHTTPError as err:
        raise _refused(err, where) from None
    except OfflineModeIsEnabled:
        raise HubUnreachableError(f"{where} failed: HF_HUB_OFFLINE is set, so nothing is sent") from None
    except _transport_errors() as err:
        raise HubUnreachableError(f"{where} failed: the Hub could not be reached ({err})") from None
    logger.info("pushed %s to %s (%s)", folder, repo_id, info.commit_url)
    return info


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specpt push", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model_dir", type=Path, help="model folder (save_pretrained output, e.g. runs/redshift/best)"
    )
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the Hub repo")
    parser.add_argument("--results", type=Path, help="results.json from `specpt evaluate` (fills the card)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created from main when missing)")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    parser.add_argument(
        "--dry-run", action="store_true", help="write the repo folder (needs --out), upload nothing"
    )
    parser.add_argument("--out", type=Path, help="where to write the repo folder (kept after the upload)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument(
        "--base-model", help="repo id of the autoencoder the model was trained from (card metadata)"
    )
    parser.add_argument(
        "--dataset", action="append", help="Hub id of a training data set (card metadata; repeatable)"
    )
    parser.add_argument(
        "--card-template", type=Path, help=f"model card template (default: {CARD_TEMPLATE.name})"
    )
    parser.add_argument("--endpoint", help=f"Hub URL (default: HF_ENDPOINT or {hub_constants.ENDPOINT})")
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`specpt push`: write the repo folder, then upload it (the token comes from HF_TOKEN or `hf auth login`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out FOLDER")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_reporting_errors("push", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    check_repo_id(args.repo_id, "--repo-id")
    if args.base_model:
        check_repo_id(args.base_model, "--base-model")
    with tempfile.TemporaryDirectory(prefix="specpt-push-") as scratch:
        out = args.out or Path(scratch) / args.repo_id.split("/")[-1]
        write_repo_folder(
            args.model_dir,
            out,
            args.results,
            repo_id=args.repo_id,
            template=args.card_template,
            base_model=args.base_model,
            datasets=args.dataset,
            overwrite=args.overwrite,
        )
        if args.out is not None:
            print(f"repo folder: {out}")
        if args.dry_run:
            return 0
        info = push_to_hub(
            out,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            endpoint=args.endpoint,
        )
    print(f"pushed to {info.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
