"""Publish a trained SpecPT model on the Hub: write its repo folder (weights, config with `auto_map`, code files,
pipeline, model card with the evaluation results), then upload it. The same as `specpt push`, as a script to adapt.

    python examples/push_to_hub.py --model-dir runs/specpt-small-redshift/best --repo-id my-org/specpt-small \
        --results eval/results.json --base-model my-org/specpt-small-autoencoder
    python examples/push_to_hub.py --model-dir runs/specpt-small-redshift/best --repo-id my-org/specpt-small \
        --out hub/specpt-small --dry-run      # look at hub/specpt-small/README.md first

The token comes from HF_TOKEN or `hf auth login`; the Hub from HF_ENDPOINT or `--endpoint`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from specpt_hf.hub import push_to_hub, write_repo_folder


def push_function(args: argparse.Namespace) -> str | None:
    """Write the repo folder (into `args.out`, or a temporary folder) and push it; return the commit URL."""
    with tempfile.TemporaryDirectory(prefix="specpt-push-") as scratch:
        folder = write_repo_folder(
            args.model_dir,
            args.out or Path(scratch) / "repo",
            args.results,
            repo_id=args.repo_id,
            base_model=args.base_model,
            overwrite=args.overwrite,
        )
        print(f"repo folder: {folder}")
        if args.dry_run:
            return None
        info = push_to_hub(folder, args.repo_id, private=args.private, endpoint=args.endpoint)
    print(f"pushed: {info.commit_url}")
    return info.commit_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="folder written by `specpt train`")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the Hub repo")
    parser.add_argument("--results", type=Path, help="results.json from `specpt evaluate`")
    parser.add_argument("--base-model", help="repo id of the autoencoder the model started from")
    parser.add_argument("--out", type=Path, help="keep the repo folder here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or the public Hub)")
    parser.add_argument("--dry-run", action="store_true", help="write the folder (needs --out), push nothing")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out")
    push_function(args)


if __name__ == "__main__":
    main()
