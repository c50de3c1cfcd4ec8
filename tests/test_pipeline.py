"""The `spectrum-redshift` pipeline (DESI files, arrays on other grids, specutils Spectrum objects, remote code)
and model loading by folder, repo id or short name."""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.nddata import InverseVariance
from transformers import BertConfig, pipeline

from specpt_hf import create_model, load_pipeline
from specpt_hf.data import desi_brz_wavelength, read_desi_spectra
from specpt_hf.data.instrument import resample
from specpt_hf.loading import SHORT_NAMES, load_model, resolve_model_name
from specpt_hf.pipeline_specpt import SpecPTFeatureExtractor, SpecPTRedshiftPipeline
from specpt_hf.prediction import SpecPTZwarn, to_model_grid

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))
COADD = DATA / "coadd-sv3-dark-26065.fits"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    folders = {}
    for task in ("redshift", "autoencoder"):
        folders[task] = root / task
        create_model("specpt-tiny", task).save_pretrained(folders[task])
    return folders


@pytest.fixture(scope="module")
def pipe(folders) -> SpecPTRedshiftPipeline:
    return pipeline("spectrum-redshift", model=str(folders["redshift"]), device="cpu")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return list(read_desi_spectra(COADD))


def direct(model, flux, ivar, mask) -> np.ndarray:
    """Redshifts from calling the model itself."""
    with torch.no_grad():
        out = model(
            flux=torch.as_tensor(np.where(mask, 0.0, flux), dtype=torch.float32),
            ivar=torch.as_tensor(np.where(mask, 0.0, ivar), dtype=torch.float32),
            mask=torch.as_tensor(mask),
        )
    return out.redshift.numpy()


def test_registered_task_on_a_real_desi_file(pipe, records):
    assert isinstance(pipe, SpecPTRedshiftPipeline)
    results = pipe(str(COADD))
    assert [r["targetid"] for r in results] == [r["targetid"] for r in records]
    expected = direct(pipe.model, *(np.stack([r[k] for r in records]) for k in ("flux", "ivar", "mask")))
    np.testing.assert_allclose([r["z"] for r in results], expected, rtol=1e-6)
    for result, record in zip(results, records, strict=True):
        assert result["npixels"] == int((~record["mask"]).sum())
        assert result["survey"] == "sv3" and result["healpix"] == 26065
        assert 0.0 <= result["quality"] <= 1.0 and result["zerr"] > 0
        assert (
            result["zwarn"] & SpecPTZwarn.LOW_QUALITY == (result["quality"] < 0.5) * SpecPTZwarn.LOW_QUALITY
        )


def test_arrays_on_another_grid_are_resampled_with_coverage_masked(pipe, records):
    record = records[0]
    wave = np.arange(5000.0, 7000.0, 0.5)  # a finer grid covering a third of the model's
    flux, ivar, mask = resample(
        desi_brz_wavelength(), record["flux"], record["ivar"], wave, mask=record["mask"]
    )
    result = pipe({"wave": wave, "flux": flux, "ivar": ivar, "mask": mask})
    on_grid, ivar_grid, bad = to_model_grid(pipe.model.config, flux[None], ivar[None], mask[None], wave)
    model_wave = desi_brz_wavelength()
    outside = (model_wave < 4999.5) | (model_wave > 7000.0)  # model pixels not covered by the input
    assert bad[0][outside].all() and result["npixels"] == int((~bad).sum()) > 2000
    assert result["z"] == pytest.approx(float(direct(pipe.model, on_grid, ivar_grid, bad)[0]), rel=1e-6)
    assert result["zwarn"] & SpecPTZwarn.LITTLE_COVERAGE  # 2500 of 7781 pixels
    assert pipe((wave, flux, np.where(mask, 0.0, ivar)))["z"] == pytest.approx(result["z"], rel=1e-6)

    batch = pipe(
        {"wave": wave, "flux": np.stack([flux, np.full_like(flux, np.nan)]), "ivar": np.stack([ivar] * 2)}
    )
    assert batch[0]["z"] == pytest.approx(result["z"], rel=1e-6)
    assert np.isnan(batch[1]["z"]) and batch[1]["zwarn"] & SpecPTZwarn.NODATA and batch[1]["npixels"] == 0

    with pytest.raises(ValueError, match="no usable pixel on the model's grid"):
        pipe({"wave": np.linspace(10750.0, 17000.0, 135), "flux": np.ones(135)})  # HST G141: no overlap
    with pytest.raises(ValueError, match="7781"):
        pipe({"flux": np.ones(100)})


def test_specutils_spectrum_in_any_flux_unit(pipe):
    from specutils import SpectrumList

    arms = SpectrumList.read(str(COADD), format="DESI coadd")
    blue = arms[0]
    row = int(np.flatnonzero((blue.uncertainty.array > 0).any(axis=1))[0])
    spectrum = blue[row]
    result = pipe(spectrum)
    arrays = {
        "wave": blue.spectral_axis.value,
        "flux": blue.flux.value[row],
        "ivar": blue.uncertainty.array[row],
    }
    assert result["z"] == pytest.approx(pipe({**arrays, "mask": blue.mask[row]})["z"], rel=1e-6)
    assert 0 < result["npixels"] <= blue.flux.shape[1]

    # the same spectrum in f_nu, with a standard-deviation uncertainty, on a frequency axis
    from specutils import Spectrum

    wave = blue.spectral_axis
    fnu = spectrum.flux.to(u.erg / u.s / u.cm**2 / u.Hz, equivalencies=u.spectral_density(wave))
    ivar_nu = InverseVariance(
        spectrum.uncertainty.array / (fnu.value / spectrum.flux.value) ** 2, unit=fnu.unit**-2
    )
    freq = Spectrum(
        flux=fnu[::-1],
        spectral_axis=wave.to(u.Hz, equivalencies=u.spectral())[::-1],
        uncertainty=ivar_nu[::-1],
    )
    freq.mask = spectrum.mask[::-1]
    assert pipe(freq)["z"] == pytest.approx(result["z"], rel=1e-4)


def test_autoencoder_outputs(folders, pipe):
    rec_pipe = pipeline(
        "spectrum-redshift",
        model=str(folders["redshift"]),
        autoencoder=str(folders["autoencoder"]),
        device="cpu",
    )
    results = rec_pipe(str(COADD), return_reconstruction=True, return_embedding=True, batch_size=1)
    plain = pipe(str(COADD))
    autoencoder = rec_pipe.autoencoder
    record = next(iter(read_desi_spectra(COADD)))
    with torch.no_grad():
        good = ~record["mask"]
        out = autoencoder(
            flux=torch.as_tensor(np.where(good, record["flux"], 0.0))[None],
            ivar=torch.as_tensor(np.where(good, record["ivar"], 0.0))[None],
            mask=torch.as_tensor(record["mask"])[None],
        )
    model_flux = (out.reconstruction * out.scale[:, None])[0].numpy()
    chi2 = (record["ivar"] * (record["flux"] - model_flux) ** 2)[good].sum() / good.sum()
    first = results[0]
    assert first["anomaly"] == pytest.approx(float(chi2), rel=1e-4)
    np.testing.assert_allclose(first["reconstruction"], model_flux, rtol=1e-5, atol=1e-6)
    assert first["embedding"].shape == (rec_pipe.model.config.d_model,)
    assert [r["z"] for r in results] == pytest.approx([r["z"] for r in plain], rel=1e-6)
    assert "anomaly" not in plain[0]
    with pytest.raises(ValueError, match="autoencoder"):
        pipe(str(COADD), return_reconstruction=True)
    with pytest.raises(ValueError, match="redshift model"):
        pipeline("spectrum-redshift", model=str(folders["autoencoder"]), device="cpu")


def test_spectra_of_several_inputs_share_model_calls(pipe, records):
    """transformers' DataLoader batches spectra across inputs; results come back per input, in order, the same
    as one spectrum per call, inputs with and without ivar mixed in one batch (they run as separate calls)."""
    rows = [records[i % len(records)] for i in range(5)]  # the file's spectra, repeated
    stacked = {k: np.stack([r[k] for r in rows]) for k in ("flux", "ivar", "mask")}
    first = {key: value[:3] for key, value in stacked.items()}
    second = {key: value[3:] for key, value in stacked.items()}
    without_ivar = {"flux": stacked["flux"][3:], "mask": stacked["mask"][3:], "targetid": [7, 8]}
    single = {"flux": stacked["flux"][0], "ivar": stacked["ivar"][0]}
    calls = []
    hook = pipe.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(len(kwargs["flux"])), with_kwargs=True
    )
    try:
        pipe([first, second, single], batch_size=4)
        assert calls == [4, 2]  # 3 + 2 + 1 spectra in two model calls
        calls.clear()
        batched = pipe([first, without_ivar, single], batch_size=4)
        assert calls == [3, 1, 1, 1]  # per batch, the spectra with ivar, then those without
        alone = [pipe(inputs, batch_size=1) for inputs in (first, without_ivar, single)]
    finally:
        hook.remove()
    assert [len(batched[0]), len(batched[1])] == [3, 2] and isinstance(batched[2], dict)
    assert [r["targetid"] for r in batched[1]] == [7, 8]
    for got, expected in zip(
        [*batched[0], *batched[1], batched[2]], [*alone[0], *alone[1], alone[2]], strict=True
    ):
        assert got["z"] == pytest.approx(expected["z"], rel=1e-6) and got["zwarn"] == expected["zwarn"]
    assert batched[0][0]["z"] == pytest.approx(batched[2]["z"], rel=1e-6)  # the same spectrum twice


def test_feature_extractor_puts_spectra_on_the_model_grid(folders, records, tmp_path):
    config = load_model(folders["redshift"]).config
    extractor = SpecPTFeatureExtractor.from_model_config(config)
    extractor.save_pretrained(tmp_path)
    reloaded = SpecPTFeatureExtractor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == extractor.to_dict()
    wave = np.arange(5000.0, 7000.0, 0.5)
    flux = np.interp(wave, desi_brz_wavelength(), records[0]["flux"])
    features = reloaded({"wave": wave, "flux": flux, "targetid": 3})
    expected = to_model_grid(config, flux[None], None, None, wave)
    np.testing.assert_array_equal(features["flux"], expected[0])
    np.testing.assert_array_equal(features["mask"], expected[2])
    assert features["ivar"] is None and features["meta"] == [{"targetid": 3}] and features["single"]


def test_load_model_names_and_bad_folders(folders, tmp_path, monkeypatch):
    assert resolve_model_name("specpt-desi") == SHORT_NAMES["specpt-desi"] == "specpt/specpt-desi"
    assert resolve_model_name("specpt-desi-autoencoder") == "specpt/specpt-desi-autoencoder"
    assert resolve_model_name("org/other") == "org/other"
    model = load_model(folders["redshift"])
    assert model.config.model_type == "specpt_redshift" and not model.training
    assert load_pipeline(folders["redshift"], device="cpu").model.config.num_redshift_bins == 32

    with pytest.raises(ValueError, match="autoencoder model"):
        load_model(folders["autoencoder"], task="redshift")
    foreign = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(foreign)
    with pytest.raises(ValueError, match="not a SpecPT model"):
        load_model(foreign)
    incomplete = tmp_path / "incomplete"
    load_model(folders["redshift"]).config.save_pretrained(incomplete)
    with pytest.raises(OSError, match="no model.safetensors"):
        load_model(incomplete)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model(tmp_path / "missing" / "model")

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1") as error:
        load_model("specpt-desi")
    assert "specpt/specpt-desi" in str(error.value) and "local model folder" in str(error.value)


CHILD = r"""
import sys

import torch
from transformers import AutoFeatureExtractor, pipeline

data = torch.load(sys.argv[1], weights_only=False)
pipe = pipeline("spectrum-redshift", model=data["folder"], trust_remote_code=True, device="cpu")
answer = {"class": type(pipe).__name__, "module": type(pipe).__module__}
extractor = AutoFeatureExtractor.from_pretrained(data["folder"], trust_remote_code=True)
answer["extractor"] = [type(extractor).__name__, extractor.num_pixels]
answer["z"] = [r["z"] for r in pipe({"wave": data["wave"], "flux": data["flux"], "ivar": data["ivar"]})]
for name, call in {
    "desi_file": lambda: pipe(data["coadd"]),
    "offline_autoencoder": lambda: pipeline(
        "spectrum-redshift", model=data["folder"], trust_remote_code=True, device="cpu",
        autoencoder="specpt-desi-autoencoder",
    ),
}.items():
    try:
        call()
        answer[name] = "no error"
    except (OSError, ValueError) as error:
        answer[name] = f"{type(error).__name__}: {error}"
report(answer)
"""


def test_trust_remote_code_pipeline_without_specpt_hf(pipe, records, tmp_path, fresh_python):
    folder = tmp_path / "shipped"
    pipe.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["spectrum-redshift"]["impl"] == "pipeline_specpt.SpecPTRedshiftPipeline"
    shipped = {"pipeline_specpt.py", "prediction.py", "loading.py", "resampling.py", "modeling_specpt.py"}
    assert shipped <= set(os.listdir(folder))
    assert isinstance(
        load_pipeline(folder, device="cpu"), SpecPTRedshiftPipeline
    )  # no trust_remote_code needed

    wave = np.arange(4000.0, 9000.0, 1.1)  # off the model's grid: the remote files resample by themselves
    stacked = [np.stack([r[k] for r in records]) for k in ("flux", "ivar", "mask")]
    flux, ivar, _ = resample(desi_brz_wavelength(), *stacked[:2], wave, mask=stacked[2])
    expected = [r["z"] for r in pipe({"wave": wave, "flux": flux, "ivar": ivar})]
    torch.save(
        {"folder": str(folder), "wave": wave, "flux": flux, "ivar": ivar, "coadd": str(COADD)},
        tmp_path / "data.pt",
    )
    report = fresh_python(CHILD, tmp_path / "data.pt", env={"HF_HUB_OFFLINE": "1"})
    assert report["class"] == "SpecPTRedshiftPipeline" and report["module"].startswith("transformers_modules")
    assert report["extractor"] == [
        "SpecPTFeatureExtractor",
        7781,
    ]  # preprocessor_config.json loads remotely too
    assert report["z"] == pytest.approx(expected, rel=1e-5)
    assert report["desi_file"].startswith("ValueError") and "specpt_hf" in report["desi_file"]
    assert "HF_HUB_OFFLINE=1" in report["offline_autoencoder"]
    assert "specpt/specpt-desi-autoencoder" in report["offline_autoencoder"]


def test_shipped_pipeline_files_import_nothing_from_the_package():
    """The pipeline file and every file it imports relatively (the remote code) import only outside libraries."""
    import ast

    from transformers.dynamic_module_utils import get_relative_import_files

    import specpt_hf.pipeline_specpt as shipped

    files = [Path(shipped.__file__), *map(Path, get_relative_import_files(shipped.__file__))]
    assert {"prediction.py", "loading.py", "modeling_specpt.py"} <= {f.name for f in files}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "specpt_hf" for name in names), (
                f"{path.name} imports {names}"
            )
