"""SpecPT for Hugging Face: transformer models for galaxy spectra and spectroscopic redshifts.

Importing `specpt_hf` registers the models with the transformers Auto classes:

| config (`model_type`)                        | `AutoConfig` | `AutoModel`                        |
| -------------------------------------------- | ------------ | ---------------------------------- |
| `SpecPTConfig` (`"specpt"`)                  | yes          | `SpecPTForSpectrumReconstruction`  |
| `SpecPTForRedshiftConfig` (`"specpt_redshift"`) | yes       | `SpecPTForRedshift`                |

So `AutoModel.from_pretrained(folder)` returns the task model that was saved: the autoencoder or the redshift
model. A bare backbone is loaded with `SpecPTModel.from_pretrained(folder)` (from either kind of folder).
Both task models and both configs are registered for `trust_remote_code`: `save_pretrained` writes `auto_map`
into config.json and copies `configuration_specpt.py` and `modeling_specpt.py` next to the weights, so
`AutoModel.from_pretrained(folder, trust_remote_code=True)` works where `specpt_hf` is not installed.

It also registers the `spectrum-redshift` pipeline, so `transformers.pipeline("spectrum-redshift", model=folder)`
returns a `SpecPTRedshiftPipeline` (the class models ship as remote code), and plugs the package's DESI and
Multimodal Universe readers into it for file inputs. `load_model` and `load_pipeline` also take short names
(`SHORT_NAMES`, e.g. `specpt-desi`).
"""

from transformers import AutoConfig, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .file_pipeline import load_pipeline, read_file_input
from .loading import SHORT_NAMES, load_model
from .modeling_specpt import (
    SpecPTForRedshift,
    SpecPTForSpectrumReconstruction,
    SpecPTModel,
    SpecPTModelOutput,
    SpecPTPreTrainedModel,
    SpecPTReconstructionOutput,
    SpecPTRedshiftOutput,
    prepare_spectra,
)
from .pipeline_specpt import TASK, SpecPTFeatureExtractor, SpecPTRedshiftPipeline
from .presets import count_parameters, create_model, list_presets, preset_config

__version__ = "0.1.0"

AutoConfig.register(SpecPTConfig.model_type, SpecPTConfig, exist_ok=True)
AutoConfig.register(SpecPTForRedshiftConfig.model_type, SpecPTForRedshiftConfig, exist_ok=True)
AutoModel.register(SpecPTConfig, SpecPTForSpectrumReconstruction, exist_ok=True)
AutoModel.register(SpecPTForRedshiftConfig, SpecPTForRedshift, exist_ok=True)
SpecPTConfig.register_for_auto_class("AutoConfig")
SpecPTForRedshiftConfig.register_for_auto_class("AutoConfig")
SpecPTForSpectrumReconstruction.register_for_auto_class("AutoModel")
SpecPTForRedshift.register_for_auto_class("AutoModel")
SpecPTFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
SpecPTRedshiftPipeline.file_reader = staticmethod(read_file_input)
PIPELINE_REGISTRY.register_pipeline(
    TASK,
    pipeline_class=SpecPTRedshiftPipeline,
    pt_model=AutoModel,
    default={"model": (SHORT_NAMES["specpt-desi"], "main")},
)

__all__ = [
    "SHORT_NAMES",
    "SpecPTConfig",
    "SpecPTFeatureExtractor",
    "SpecPTForRedshift",
    "SpecPTForRedshiftConfig",
    "SpecPTForSpectrumReconstruction",
    "SpecPTModel",
    "SpecPTModelOutput",
    "SpecPTPreTrainedModel",
    "SpecPTReconstructionOutput",
    "SpecPTRedshiftOutput",
    "SpecPTRedshiftPipeline",
    "__version__",
    "count_parameters",
    "create_model",
    "list_presets",
    "load_model",
    "load_pipeline",
    "prepare_spectra",
    "preset_config",
]
