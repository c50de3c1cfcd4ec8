"""The pipeline's file inputs and `load_pipeline`: the package's DESI and MMU readers behind the shipped pipeline.

    >>> from specpt_hf import load_pipeline
    >>> pipe = load_pipeline("specpt-desi", autoencoder="specpt-desi-autoencoder")   # short names
    >>> pipe("coadd-sv3-dark-26065.fits")        # one dict per good fiber of a DESI coadd / spectra file
    >>> pipe("desi/healpix=1234/001-of-004.hdf5")  # or of a Multimodal Universe DESI file

`SpecPTRedshiftPipeline` (specpt_hf/pipeline_specpt.py) travels with models as remote code and imports nothing
from the package; `import specpt_hf` sets its `file_reader` to `read_file_input`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import PreTrainedModel

from .configuration_specpt import SpecPTConfig
from .data.desi import desi_brz_wavelength, read_desi_spectra
from .data.mmu import is_mmu_file, read_mmu_spectra
from .loading import load_model
from .pipeline_specpt import TASK, SpecPTRedshiftPipeline
from .prediction import to_model_grid

META_FIELDS = ("targetid", "survey", "program", "healpix")


def read_file_input(path: str, config: SpecPTConfig) -> dict[str, Any]:
    """A DESI coadd / spectra file or a Multimodal Universe DESI file (HDF5 shard or Parquet export) as the
    pipeline's input: every good target fiber on the model's grid, with `targetid`, `survey`, `program`, `healpix`."""
    records = list(read_mmu_spectra(path) if is_mmu_file(path) else read_desi_spectra(path))
    if not records:
        raise ValueError(f"{path}: no usable spectra (no good target fiber with a usable pixel)")
    stack = {key: np.stack([r[key] for r in records]) for key in ("flux", "ivar", "mask")}
    flux, ivar, mask = to_model_grid(
        config, stack["flux"], stack["ivar"], stack["mask"], desi_brz_wavelength()
    )
    meta = [{key: r[key] for key in META_FIELDS} for r in records]
    return {"flux": flux, "ivar": ivar, "mask": mask, "meta": meta, "single": False, "source": path}


def load_pipeline(
    model: Any = "specpt-desi", autoencoder: Any = None, device: Any = None, **kwargs: Any
) -> SpecPTRedshiftPipeline:
    """A `spectrum-redshift` pipeline from a model object, folder, Hub repo id or short name (`SHORT_NAMES`),
    optionally with an autoencoder (same kinds of reference). `kwargs` are pipeline parameters (`batch_size`,
    thresholds, `return_embedding`, ...); `device` as in transformers (-1 or "cpu" for the CPU)."""
    if not isinstance(model, PreTrainedModel):
        model = load_model(model, task="redshift")
    return SpecPTRedshiftPipeline(model=model, autoencoder=autoencoder, task=TASK, device=device, **kwargs)
