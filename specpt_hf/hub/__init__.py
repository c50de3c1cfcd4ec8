"""Publishing a trained SpecPT model on the Hugging Face Hub (`specpt push`).

`model_folder` checks the saved model folder, `card` writes the model card from `MODEL_CARD.md`, `repo_folder`
writes the complete repo folder (weights, config.json, remote code, card), `push` uploads it and is the
`specpt push` command, and `repo_id` checks the repo ids given as arguments.
"""

from .card import (
    CARD_TEMPLATE,
    details_block,
    header_block,
    layout_block,
    render_model_card,
    results_block,
    training_block,
    usage_block,
)
from .model_folder import ModelFolder, ModelFolderError, check_model_folder
from .push import HubError, HubRefusedError, HubUnreachableError, main, push_to_hub
from .repo_folder import write_repo_folder

__all__ = [
    "CARD_TEMPLATE",
    "HubError",
    "HubRefusedError",
    "HubUnreachableError",
    "ModelFolder",
    "ModelFolderError",
    "check_model_folder",
    "details_block",
    "header_block",
    "layout_block",
    "main",
    "push_to_hub",
    "render_model_card",
    "results_block",
    "training_block",
    "usage_block",
    "write_repo_folder",
]
