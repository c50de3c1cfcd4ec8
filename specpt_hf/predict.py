"""`specpt predict`: many DESI coadd files in, one Redrock-style redshift catalog out.

    specpt predict data/healpix/ coadd-sv3-dark-26065.fits --model specpt-desi --out catalog.fits \
        [--format fits|parquet|csv] [--batch-size 64] [--device auto] [--resume] [--refine none|peaks|peaks+wide] \
        [--autoencoder specpt-desi-autoencoder] [--min-quality 0.5] [--min-coverage 0.5] [--max-anomaly 5] \
        [--min-delta-chi2 9] [--save-pdf] [--priors-out priors.fits [--priors-function gaussian|tophat]] [--bf16]

Directories are searched for `coadd-*.fits`. Files are read one at a time, a fixed number of rows at a time, by a
reader thread that feeds batches through a bounded queue to the model (so memory stays bounded and reading
overlaps compute). The catalog is written once at the end, to a temporary file then renamed, so a catalog under
the final name is always complete.

Catalog (HDU `REDSHIFTS` for FITS, one row per predicted spectrum; Redrock's column names where they mean the same):

| column | type | meaning |
| --- | --- | --- |
| TARGETID | int64 | DESI TARGETID |
| Z, ZERR | float64 | redshift and its 1-sigma uncertainty (refined: the chi^2 fit's, Delta chi^2 = 1) |
| ZWARN | int64 | `SpecPTZwarn` bit mask, 0 = no warning (names in the header keywords ZWARN0 ...) |
| CHI2, DELTACHI2 | float64 | refined only: best chi^2, and the next minimum >= 1000 km/s away minus it (of the archetypes' curve for fits they judged) |
| CHI2_SMOOTH | float64 | refined only: chi^2 of a smooth continuum with no redshift on the same pixels |
| OII_FLUX, OII_FLUX_IVAR | float64 | refined only: the [O II] 3727, 3730 doublet's flux (1e-17 erg/s/cm^2) at Z and its inverse variance (NaN off the grid; `specpt_hf.emission_lines`) |
| COEFF | float32 [vectors] | refined only: the winning template set's coefficients |
| SPECTYPE | str | refined only: the winning template set (GALAXY, QSO) |
| SPECTYPE_NET | str | with a spectral-type head (`config.spectype_labels`): its most probable type |
| NPIXELS | int32 | good pixels on the model's grid |
| Z_NET, ZERR_NET | float64 | the network's own redshift and uncertainty (equal to Z, ZERR without refinement) |
| QUALITY | float32 | p(z) mass within a few bins of the peak, in [0, 1] |
| ANOMALY | float32 | reduced chi^2 of the autoencoder's reconstruction (only with `--autoencoder`) |
| SURVEY, PROGRAM | str | provenance |
| HEALPIX | int32 | nside-64 nested healpix, -1 for tile coadds |
| SOURCE | str | coadd file name |

`--save-pdf` adds each target's p(z) (probability per bin, on the model's ln(1 + z) bins) and, when refining, its
coarse chi^2(z) samples (NaN where not searched): FITS HDUs `PZ` and `CHI2SCAN` (TARGETID and one vector per row, in
the order of REDSHIFTS) with images `PZ_Z` and `CHI2SCAN_Z` of the redshifts; Parquet / ECSV columns `PZ` and
`CHI2SCAN` with the redshifts in the metadata keys `PZ_Z` and `CHI2SCAN_Z`.
Z comes from a finer scan about the vertex of the coarse minimum, so CHI2SCAN's lowest sample may lie up to one
coarse step plus (`refinement_fine_trials` // 2 + 1) fine steps from Z (narrow-line spectra give jagged coarse curves).

`--priors-out FILE` writes Redrock's priors file (HDU PRIORS: TARGETID, Z, SIGMA, FUNCTION; see `specpt_hf.priors`)
from each target's p(z), so that `rrdesi --priors FILE` searches only inside SpecPT's window.

`--bf16` runs the network under bfloat16 autocast (the chi^2 refinement stays in float32 / float64): on GPUs, and
on CPUs with AMX or AVX512-BF16, it is the faster way (`benchmarks/refinement_frontier.py` measures it).

The header (FITS keywords, Parquet / ECSV table metadata) holds the model reference, its resolved repo id or folder,
its Hub revision, the autoencoder, the flag thresholds, the refinement, the redshift range and the versions of
specpt_hf, transformers and torch. Spectra without usable pixels are not in the catalog (counted); a file without
usable spectra is reported and skipped; an unreadable file is reported, skipped, and makes the exit status 1.

`--resume`: progress is kept next to the output in `<out>.progress/` (a manifest and one part file per finished
input file, each written atomically); a resumed run skips the files already done and predicts the rest. The
folder is removed once the catalog is written (kept while some files failed, so that a resumed run retries them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from astropy.io import fits
from astropy.table import Table
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text, make_folder
from .cli import add_debug_flag, run_reporting_errors
from .configuration_specpt import REFINEMENTS
from .data.desi import DesiFormatError, ReadStats, desi_brz_wavelength, read_desi_spectra
from .data.mmu import find_mmu_files, is_mmu_file, read_mmu_spectra
from .loading import load_model, resolve_model_name
from .modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction
from .prediction import (
    FlagThresholds,
    InferenceStats,
    SpecPTZwarn,
    batched,
    check_same_grid,
    pdf_redshifts,
    predict_batch,
    to_model_grid,
)
from .priors import PRIOR_FUNCTIONS, prior_halfwidths, write_priors

logger = logging.getLogger(__name__)

FORMATS = {".fits": "fits", ".fit": "fits", ".parquet": "parquet", ".csv": "csv"}
PROGRESS_SUFFIX = ".progress"
MANIFEST = "manifest.json"
QUEUE_BATCHES = 4  # batches the reader may hold ahead of the model
# catalog column <- prediction column, output dtype
CATALOG_COLUMNS: dict[str, tuple[str, str]] = {
    "TARGETID": ("targetid", "int64"),
    "Z": ("z_pred", "float64"),
    "ZERR": ("zerr_pred", "float64"),
    "ZWARN": ("zwarn", "int64"),
    "CHI2": ("chi2", "float64"),
    "DELTACHI2": ("deltachi2", "float64"),
    "CHI2_SMOOTH": ("chi2_smooth", "float64"),
    "OII_FLUX": ("oii_flux", "float64"),
    "OII_FLUX_IVAR": ("oii_flux_ivar", "float64"),
    "COEFF": ("coeff", "float32"),
    "SPECTYPE": ("spectype", "str"),
    "SPECTYPE_NET": ("spectype_net", "str"),
    "NPIXELS": ("npixels", "int32"),
    "Z_NET": ("z_net", "float64"),
    "ZERR_NET": ("zerr_net", "float64"),
    "QUALITY": ("quality", "float32"),
    "ANOMALY": ("anomaly", "float32"),
    "SURVEY": ("survey", "str"),
    "PROGRAM": ("program", "str"),
    "HEALPIX": ("healpix", "int32"),
    "SOURCE": ("source", "str"),
}

# `--save-pdf`: output column -> catalog name (FITS: an HDU NAME of TARGETID + NAME [n, k], and an image NAME_Z of
# the k redshifts; Parquet / ECSV: a column NAME and the redshifts in the metadata key NAME_Z)
PDF_NAMES = {"pz": "PZ", "chi2_scan": "CHI2SCAN"}

__all__ = ["SpecPTZwarn", "PredictSummary", "find_input_files", "main", "predict_catalog", "write_catalog"]


@dataclass
class PredictSummary:
    """What a `predict_catalog` run did."""

    out: Path
    files: int = 0  # input files
    resumed: int = 0  # done in an earlier run, skipped
    predicted: int = 0  # files predicted in this run
    empty: list[str] = field(default_factory=list)  # files without usable spectra
    failed: dict[str, str] = field(default_factory=dict)  # unreadable files -> message
    rows: int = 0  # catalog rows
    spectra: int = 0  # spectra predicted in this run
    skipped_spectra: int = 0  # spectra without usable pixels (reader + model grid)
    seconds: float = 0.0

    @property
    def spectra_per_second(self) -> float:
        return self.spectra / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def find_input_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and `coadd-*.fits` or Multimodal Universe files (`specpt_hf.data.mmu`) found under
    directories (sorted), without duplicates.

    Raises:
        FileNotFoundError: naming a path that does not exist, or a directory without such files.
    """
    files: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob("coadd-*.fits")) or find_mmu_files([path])
            if not found:
                raise FileNotFoundError(
                    f"{path}: no coadd-*.fits or Multimodal Universe files in this directory"
                )
            files.update(dict.fromkeys(p.resolve() for p in found))
        elif path.is_file():
            files[path.resolve()] = None
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return list(files)


def catalog_format(out: Path, fmt: str | None) -> str:
    """`fmt`, or the format implied by the suffix of `out`."""
    if fmt is not None:
        if fmt not in set(FORMATS.values()):
            raise ValueError(f"`format` must be one of {sorted(set(FORMATS.values()))}, got {fmt!r}")
        return fmt
    try:
        return FORMATS[out.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"{out}: cannot tell the format from the suffix; pass --format fits|parquet|csv"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Progress sidecar
# ----------------------------------------------------------------------------------------------------------------


def _save_npz(path: Path, columns: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a file object: np.savez would add ".npz" to a name
        np.savez(handle, **columns)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_key(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class ProgressStore:
    """`<out>.progress/`: `manifest.json` (run settings + finished files) and one `.npz` part per finished file."""

    def __init__(self, out: Path, settings: dict[str, Any], resume: bool) -> None:
        self.folder = out.with_name(out.name + PROGRESS_SUFFIX)
        self.settings = settings
        self.files: dict[str, dict[str, Any]] = {}
        manifest = self._read_manifest() if resume else None
        if manifest is not None:
            if manifest.get("settings") != settings:
                raise ValueError(
                    f"{self.folder}: the progress was made with other settings ({manifest.get('settings')}); "
                    "rerun without --resume to start again"
                )
            self.files = manifest["files"]
        elif self.folder.exists():
            shutil.rmtree(self.folder)
        make_folder(self.folder)
        self._write_manifest()

    def _read_manifest(self) -> dict[str, Any] | None:
        """The manifest being resumed; None (start from the first file) when it is missing or damaged."""
        path = self.folder / MANIFEST
        if not path.is_file():
            if self.folder.exists():
                logger.info("%s: no manifest, starting from the first file", self.folder)
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise ValueError("no `files` table")
        except (ValueError, UnicodeDecodeError) as err:
            logger.warning("%s: damaged (%s), starting from the first file", path, err)
            return None
        return manifest

    def _write_manifest(self) -> None:
        text = json.dumps({"settings": self.settings, "files": self.files}, indent=1)
        atomic_write_text(self.folder / MANIFEST, text)

    def done(self, path: Path) -> bool:
        """Whether `path` (unchanged since) was finished earlier."""
        entry = self.files.get(str(path))
        if entry is None or {k: entry.get(k) for k in ("size", "mtime_ns")} != _file_key(path):
            return False
        if entry.get("part") is None:
            return True
        part = self.folder / entry["part"]
        if part.is_file() and _sha256(part) == entry.get("sha256"):
            return True
        logger.warning("%s: its saved rows in %s are missing or damaged; predicting it again", path, part)
        return False

    def record(self, index: int, path: Path, columns: dict[str, np.ndarray] | None, stats: dict) -> None:
        """Save the rows of a finished file (None: it had none), then the manifest; both atomically."""
        part = digest = None
        if columns is not None:
            part = f"part-{index:06d}.npz"
            digest = _sha256(atomic_write(self.folder / part, lambda tmp: _save_npz(tmp, columns)))
        self.files[str(path)] = {**_file_key(path), "part": part, "sha256": digest, "stats": stats}
        self._write_manifest()

    def columns(self, files: list[Path]) -> list[dict[str, np.ndarray]]:
        """The saved rows of `files`, in that order."""
        parts = []
        for path in files:
            entry = self.files.get(str(path))
            if entry and entry["part"]:
                with np.load(self.folder / entry["part"], allow_pickle=False) as data:
                    parts.append({key: data[key] for key in data.files})
        return parts

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Reading thread
# ----------------------------------------------------------------------------------------------------------------


class _Reader(threading.Thread):
    """Reads the pending files in order and queues ("batch", i, batch), ("end", i, stats), ("failed", i, message),
    then ("done",); ("error", exception) if something unexpected happened."""

    def __init__(self, files: list[tuple[int, Path]], batch_size: int, config: Any) -> None:
        super().__init__(name="specpt-predict-reader", daemon=True)
        self.files = files
        self.batch_size = batch_size
        self.config = config
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.stop = threading.Event()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_file(self, index: int, path: Path) -> bool:
        stats = ReadStats()
        try:
            records = read_mmu_spectra(path) if is_mmu_file(path) else read_desi_spectra(path, stats=stats)
            for batch in batched(records, self.batch_size):
                flux, ivar, mask = to_model_grid(
                    self.config, batch["flux"], batch["ivar"], batch["mask"], desi_brz_wavelength()
                )
                batch.update(flux=flux, ivar=ivar, mask=mask)
                if not self._put(("batch", index, batch)):
                    return False
        except (DesiFormatError, OSError) as error:
            return self._put(("failed", index, str(error)))
        return self._put(("end", index, stats.as_dict()))

    def run(self) -> None:
        try:
            for index, path in self.files:
                if not self._read_file(index, path):
                    return
        except BaseException as error:  # handed to the main thread, which re-raises it
            self._put(("error", error))
            return
        self._put(("done",))

    def items(self) -> Iterator[tuple]:
        while (item := self.queue.get())[0] != "done":
            if item[0] == "error":
                raise item[1]
            yield item

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=30)


# ----------------------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` -> CUDA when available, else CPU; a device this torch build or machine lacks -> ValueError."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device}: not a torch device ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu or auto")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")
    return resolved


def _load(ref: Any, task: str) -> tuple[Any, str]:
    """(model, reference string) from a model object or a name / folder / repo id."""
    if isinstance(ref, torch.nn.Module):
        return ref, str(getattr(ref, "name_or_path", "") or type(ref).__name__)
    return load_model(ref, task=task), os.fspath(ref)


def _run_settings(
    model: SpecPTForRedshift,
    model_ref: str,
    ae_ref: str | None,
    thresholds: FlagThresholds,
    save_pdf: bool = False,
    priors: bool = False,
    bf16: bool = False,
) -> dict:
    """What decides the predictions: a resumed run must use the same. The model is identified by its weights,
    templates and refinement settings, not by how its path was spelled."""
    from . import __version__

    return {
        "model_sha256": model_digest(model),
        "refinement": model.config.refinement if model.refines else "none",
        "model_revision": getattr(model.config, "_commit_hash", None),
        "autoencoder": os.path.abspath(ae_ref) if ae_ref and os.path.isdir(ae_ref) else ae_ref,
        "thresholds": thresholds.as_dict(),
        "save_pdf": save_pdf,
        "priors": priors,
        "bf16": bf16,
        "specpt_hf": __version__,
    }


def model_digest(model: SpecPTForRedshift) -> str:
    """SHA-256 of the model's weights (and templates), in key order: the identity of what predicts."""
    digest = hashlib.sha256()
    tensors = dict(model.state_dict())
    for name, templates in (model.templates or {}).items():
        tensors[f"templates.{name}"] = templates.basis
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_columns(parts: list[dict[str, np.ndarray]], path: Path) -> dict[str, np.ndarray] | None:
    parts = [part for part in parts if len(part["z_pred"])]
    if not parts:
        return None
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    columns["source"] = np.full(len(columns["z_pred"]), path.name)
    return columns


def predict_catalog(
    files: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    model: Any = "specpt-desi",
    *,
    autoencoder: Any = None,
    fmt: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    resume: bool = False,
    thresholds: FlagThresholds | None = None,
    progress: bool = True,
    refine: str | None = None,
    save_pdf: bool = False,
    priors_out: str | os.PathLike | None = None,
    priors_function: str = "gaussian",
    bf16: bool = False,
) -> PredictSummary:
    """Predict every usable spectrum of `files` and write one catalog to `out` (see the module docstring).

    Args:
        files: coadd files and/or directories (searched for `coadd-*.fits`).
        out: the catalog path; `fmt` (fits, parquet, csv) defaults to its suffix.
        model, autoencoder: model objects, or folders / repo ids / short names for `load_model`.
        batch_size: spectra per model call. device: "auto" (default: CUDA when available), "cpu", "cuda:0", ...
        resume: continue from `<out>.progress/` (files already done are not read again).
        thresholds: the ZWARN thresholds.
        refine: `none`, `peaks` or `peaks+wide` in place of the model's `config.refinement` (refinement needs
            the model's templates; `none` gives the network-only catalog).
        save_pdf: also write each target's p(z) on the model's bins and, when refining, its chi^2(z) samples
            (`PDF_NAMES`; a p(z) head only).
        priors_out, priors_function: also write Redrock's priors file there (`specpt_hf.priors`: a window
            around each Z holding 99 % of its p(z); `gaussian` or `tophat`), for `rrdesi --priors`.
        bf16: run the network under bfloat16 autocast (the refinement keeps float32 / float64).

    Raises:
        FileNotFoundError / ValueError / OSError for bad arguments, models or settings that differ from the
        progress being resumed. Unreadable input files are reported in the summary, not raised.
    """
    start = time.perf_counter()
    out = Path(out)
    fmt = catalog_format(out, fmt)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    paths = find_input_files(files)
    inputs = {path.resolve() for path in paths}
    if out.resolve() in inputs or out.with_name(out.name + PROGRESS_SUFFIX).resolve() in inputs:
        raise ValueError(f"--out {out}: is one of the input files; the catalog would replace it")
    if priors_out is not None:
        priors_out = Path(priors_out)
        if priors_out.resolve() in inputs | {out.resolve()}:
            raise ValueError(
                f"--priors-out {priors_out}: is the catalog or an input file; it would replace it"
            )
        if priors_function not in PRIOR_FUNCTIONS:
            raise ValueError(f"--priors-function must be one of {PRIOR_FUNCTIONS}, got {priors_function!r}")
    thresholds = thresholds or FlagThresholds()
    device = _resolve_device(device)
    model, model_ref = _load(model, "redshift")
    model = model.to(device).eval()
    if refine is not None:
        if refine not in REFINEMENTS:
            raise ValueError(f"`refine` must be one of {REFINEMENTS}, got {refine!r}")
        model.config.refinement = refine
    if (save_pdf or priors_out is not None) and model.config.head_type != "pz":
        raise ValueError(
            f"--save-pdf and --priors-out need a p(z) head (head_type 'pz'); {model_ref} has "
            f"{model.config.head_type!r}"
        )
    ae_ref = None
    if autoencoder is not None:
        autoencoder, ae_ref = _load(autoencoder, "autoencoder")
        check_same_grid(model, autoencoder)
        autoencoder = autoencoder.to(device).eval()
    make_folder(out.parent)
    priors = priors_out is not None
    settings = _run_settings(model, model_ref, ae_ref, thresholds, save_pdf, priors, bf16)
    store = ProgressStore(out, settings, resume)
    summary = PredictSummary(out=out, files=len(paths))
    pending = [(i, path) for i, path in enumerate(paths) if not store.done(path)]
    summary.resumed = len(paths) - len(pending)
    if summary.resumed:
        logger.info("resuming: %d of %d files already done", summary.resumed, len(paths))

    outputs = {"save_pdf": save_pdf, "priors": priors}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        _predict_files(
            pending, store, model, autoencoder, thresholds, batch_size, progress, summary, **outputs
        )
    for path in paths:
        stats = store.files.get(str(path), {}).get("stats", {})
        summary.skipped_spectra += stats.get("no_data", 0) + stats.get("model_grid_no_data", 0)
        if str(path) in store.files and store.files[str(path)]["part"] is None:
            summary.empty.append(str(path))

    parts = store.columns(paths)
    summary.rows = sum(len(part["z_pred"]) for part in parts)
    summary.seconds = time.perf_counter() - start
    if not parts:
        raise ValueError(
            f"no usable spectra in any of the {len(paths)} input files; nothing written to {out}"
        )
    meta = _catalog_meta(model, model_ref, ae_ref, thresholds, summary, bf16)
    grids = pdf_redshifts(model) if save_pdf else {}
    pdf = {
        name: (np.concatenate([part[key] for part in parts]), grids[key])
        for key, name in PDF_NAMES.items()
        if key in parts[0]
    }
    write_catalog(_catalog_table(parts, autoencoder is not None, meta), out, fmt, pdf)
    if priors_out is not None:
        columns = {
            k: np.concatenate([part[k] for part in parts]) for k in ("targetid", "z_pred", "prior_halfwidth")
        }
        write_priors(
            priors_out, columns["targetid"], columns["z_pred"], columns["prior_halfwidth"], priors_function
        )
    if summary.failed:
        logger.error(
            "%d files could not be read (kept %s; rerun with --resume to retry them): %s",
            len(summary.failed),
            store.folder,
            "; ".join(summary.failed.values()),
        )
    else:
        store.remove()
    return summary


def _predict_files(
    pending: list[tuple[int, Path]],
    store: ProgressStore,
    model: SpecPTForRedshift,
    autoencoder: SpecPTForSpectrumReconstruction | None,
    thresholds: FlagThresholds,
    batch_size: int,
    progress: bool,
    summary: PredictSummary,
    save_pdf: bool = False,
    priors: bool = False,
) -> None:
    """Run the reader thread over `pending` and the models over its batches; record each finished file."""
    if not pending:
        return
    reader = _Reader(pending, batch_size, model.config)
    pz_grid = pdf_redshifts(model)["pz"] if priors else None
    paths = dict(pending)
    rows: dict[int, list[dict[str, np.ndarray]]] = {}
    stats: dict[int, InferenceStats] = {}
    files_bar = tqdm(
        total=summary.files, initial=summary.resumed, desc="files", unit="file", disable=not progress
    )
    spectra_bar = tqdm(desc="spectra", unit="spectrum", disable=not progress, position=1, leave=False)
    reader.start()
    try:
        for kind, index, payload in reader.items():
            if kind == "batch":
                file_stats = stats.setdefault(index, InferenceStats())
                columns = predict_batch(
                    model,
                    payload,
                    autoencoder=autoencoder,
                    thresholds=thresholds,
                    stats=file_stats,
                    return_pdf=save_pdf or priors,
                )
                if priors:
                    columns["prior_halfwidth"] = prior_halfwidths(pz_grid, columns["pz"], columns["z_pred"])
                if not save_pdf:
                    columns = {key: value for key, value in columns.items() if key not in PDF_NAMES}
                rows.setdefault(index, []).append(columns)
                spectra_bar.update(len(payload["flux"]))
                continue
            path = paths[index]
            if kind == "failed":
                logger.error("%s: skipped, cannot be read: %s", path, payload)
                summary.failed[str(path)] = payload
                rows.pop(index, None)
            else:
                _finish_file(
                    index, path, rows.pop(index, []), payload, stats.pop(index, InferenceStats()), store
                )
                summary.predicted += 1
                summary.spectra += store.files[str(path)]["stats"]["predicted"]
            files_bar.update(1)
    finally:
        reader.close()
        files_bar.close()
        spectra_bar.close()


def _finish_file(
    index: int, path: Path, parts: list, read_stats: dict, model_stats: InferenceStats, store: ProgressStore
) -> None:
    columns = _file_columns(parts, path)
    stats = {**read_stats, "predicted": model_stats.spectra, "model_grid_no_data": model_stats.skipped}
    if columns is None:
        logger.warning(
            "%s: no usable spectra (%d fibers, %d without usable pixels); skipped",
            path,
            read_stats.get("fibers", 0),
            read_stats.get("no_data", 0) + model_stats.skipped,
        )
    elif model_stats.skipped:
        logger.warning("%s: %d spectra without usable pixels on the model's grid", path, model_stats.skipped)
    store.record(index, path, columns, stats)


# ----------------------------------------------------------------------------------------------------------------
# Catalog
# ----------------------------------------------------------------------------------------------------------------


def _catalog_meta(
    model: SpecPTForRedshift,
    model_ref: str,
    ae_ref: str | None,
    thresholds: FlagThresholds,
    summary: PredictSummary,
    bf16: bool = False,
) -> dict[str, Any]:
    """Header keywords (FITS-length names) of the catalog."""
    import transformers

    from . import __version__

    meta = {
        "MODEL": model_ref,
        "MODELID": resolve_model_name(model_ref) if model_ref else "",
        "MODELREV": getattr(model.config, "_commit_hash", None) or "",
        "AUTOENC": ae_ref or "",
        "SPECPTV": __version__,
        "TRANSFV": transformers.__version__,
        "TORCHV": str(torch.__version__),
        "ZMIN": model.config.z_min,
        "ZMAX": model.config.z_max,
        "MINQUAL": thresholds.min_quality,
        "MINCOV": thresholds.min_coverage,
        "MAXANOM": thresholds.max_anomaly,
        "MINDCHI2": thresholds.min_delta_chi2,
        "MINFCHI2": thresholds.min_feature_chi2
        if math.isfinite(thresholds.min_feature_chi2)
        else "-inf",  # FITS: no inf
        "OIIDCHI2": thresholds.oii_delta_chi2,
        "WEAKCHI2": thresholds.weak_fit_chi2,
        "REFINE": model.config.refinement if model.refines else "none",
        "BF16": bf16,
        "NFILES": summary.files,
        "NEMPTY": len(summary.empty),
        "NFAILED": len(summary.failed),
    }
    meta.update({f"ZWARN{flag.bit_length() - 1}": flag.name for flag in SpecPTZwarn})
    return meta


def _catalog_table(parts: list[dict[str, np.ndarray]], with_anomaly: bool, meta: dict[str, Any]) -> Table:
    table = Table(meta=meta)
    for name, (key, dtype) in CATALOG_COLUMNS.items():
        if (name == "ANOMALY" and not with_anomaly) or key not in parts[0]:
            continue  # ANOMALY needs an autoencoder; CHI2 ... SPECTYPE need template refinement
        values = np.concatenate([part[key] for part in parts])
        table[name] = values.astype(str) if dtype == "str" else values.astype(dtype)
    return table


def write_catalog(
    table: Table,
    out: str | os.PathLike,
    fmt: str,
    pdf: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """Write `table` to `out` atomically: FITS (HDU REDSHIFTS, `table.meta` as header keywords in it and in the
    primary header), Parquet or CSV (ECSV: the metadata in `#` header lines, then plain comma-separated rows).

    `pdf` ({NAME: (values [rows, k], redshifts [k])}, e.g. `PZ`, `CHI2SCAN`): FITS gets an HDU NAME (TARGETID, NAME)
    and an image NAME_Z of the redshifts; Parquet / ECSV a column NAME and the redshifts as metadata NAME_Z.
    """
    out = Path(out)
    pdf = pdf or {}

    def write(tmp: Path) -> None:
        if fmt == "fits":
            hdu = fits.table_to_hdu(table)
            hdu.name = "REDSHIFTS"
            primary = fits.PrimaryHDU()
            primary.header.update({key: value for key, value in table.meta.items()})
            hdus = [primary, hdu]
            for name, (values, redshifts) in pdf.items():
                hdus.append(fits.table_to_hdu(Table({"TARGETID": table["TARGETID"], name: values})))
                hdus[-1].name = name
                hdus.append(fits.ImageHDU(redshifts, name=f"{name}_Z"))
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
            return
        full = table.copy(copy_data=False)
        for name, (values, redshifts) in pdf.items():
            full[name] = values
            full.meta[f"{name}_Z"] = redshifts.tolist()
        if fmt == "parquet":
            full.write(tmp, format="parquet", overwrite=True)
        elif fmt == "csv":
            full.write(tmp, format="ascii.ecsv", delimiter=",", overwrite=True)
        else:
            raise ValueError(f"unknown catalog format {fmt!r}")

    atomic_write(out, write)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specpt predict", description="Redshift catalog from DESI coadd files (see `specpt_hf.predict`)."
    )
    parser.add_argument("files", nargs="+", help="coadd files, or directories searched for coadd-*.fits")
    parser.add_argument(
        "--model", default="specpt-desi", help="redshift model: folder, Hub repo id or short name"
    )
    parser.add_argument("--out", required=True, type=Path, help="catalog path (.fits, .parquet or .csv)")
    parser.add_argument(
        "--format", choices=sorted(set(FORMATS.values())), help="default: from the --out suffix"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="spectra per model call (default 64)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--resume", action="store_true", help="skip the files finished by an interrupted run")
    parser.add_argument(
        "--autoencoder", help="autoencoder for the ANOMALY column (folder, repo id, short name)"
    )
    defaults = FlagThresholds()
    parser.add_argument(
        "--min-quality", type=float, default=defaults.min_quality, help="LOW_QUALITY below this"
    )
    parser.add_argument(
        "--min-coverage",
        type=float,
        default=defaults.min_coverage,
        help="LITTLE_COVERAGE below this pixel fraction",
    )
    parser.add_argument(
        "--max-anomaly", type=float, default=defaults.max_anomaly, help="ANOMALOUS above this"
    )
    parser.add_argument(
        "--min-delta-chi2",
        type=float,
        default=defaults.min_delta_chi2,
        help="SMALL_DELTA_CHI2 below this (with refinement)",
    )
    parser.add_argument(
        "--min-feature-chi2",
        type=float,
        default=defaults.min_feature_chi2,
        help="SMALL_DELTA_CHI2 where CHI2_SMOOTH - CHI2 is below this (with refinement; -inf: off)",
    )
    parser.add_argument(
        "--oii-delta-chi2",
        type=float,
        default=defaults.oii_delta_chi2,
        help="below this DELTACHI2 a GALAXY fit also needs DESI's ELG [O II] criterion (with refinement; 0: off)",
    )
    parser.add_argument(
        "--weak-fit-chi2",
        type=float,
        default=defaults.weak_fit_chi2,
        help="SMALL_DELTA_CHI2 where DELTACHI2 and CHI2_SMOOTH - CHI2 are both below this (with refinement; 0: off)",
    )
    parser.add_argument(
        "--refine",
        choices=REFINEMENTS,
        help="template chi^2 refinement (default: the model's config.refinement; needs its templates)",
    )
    parser.add_argument(
        "--save-pdf",
        action="store_true",
        help="also write each target's p(z) and, when refining, its chi^2(z) samples (HDUs PZ, CHI2SCAN)",
    )
    parser.add_argument(
        "--priors-out",
        type=Path,
        help="also write Redrock's priors file (HDU PRIORS) from each target's p(z), for `rrdesi --priors`",
    )
    parser.add_argument(
        "--priors-function",
        choices=PRIOR_FUNCTIONS,
        default="gaussian",
        help="Redrock prior shape (default gaussian; tophat needs numpy < 2 with Redrock 0.21)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="the network under bfloat16 autocast (GPUs; CPUs with AMX)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-file details")
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.threads is not None:
        if args.threads < 1:
            build_parser().error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return run_reporting_errors("predict", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    thresholds = FlagThresholds(
        min_quality=args.min_quality,
        min_coverage=args.min_coverage,
        max_anomaly=args.max_anomaly,
        min_delta_chi2=args.min_delta_chi2,
        min_feature_chi2=args.min_feature_chi2,
        oii_delta_chi2=args.oii_delta_chi2,
        weak_fit_chi2=args.weak_fit_chi2,
    )
    summary = predict_catalog(
        args.files,
        args.out,
        args.model,
        autoencoder=args.autoencoder,
        fmt=args.format,
        batch_size=args.batch_size,
        device=args.device,
        resume=args.resume,
        thresholds=thresholds,
        progress=not args.no_progress,
        refine=args.refine,
        save_pdf=args.save_pdf,
        priors_out=args.priors_out,
        priors_function=args.priors_function,
        bf16=args.bf16,
    )
    print(
        f"{summary.out}: {summary.rows} spectra from {summary.files} files ({summary.resumed} resumed, "
        f"{len(summary.empty)} without usable spectra, {len(summary.failed)} unreadable); "
        f"{summary.spectra} predicted in {summary.seconds:.1f} s ({summary.spectra_per_second:.1f} spectra/s)"
    )
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
