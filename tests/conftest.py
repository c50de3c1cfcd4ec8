"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import datasets
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def private_datasets_cache(tmp_path_factory):
    """The Arrow cache of `datasets` goes to a temporary folder per test module, not the user's cache."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        yield


def make_spectra(
    batch: int = 3,
    num_pixels: int = 300,
    seed: int = 0,
    bad_fraction: float = 0.1,
    wavelength_start: float = 3600.0,
    wavelength_step: float = 0.8,
) -> dict[str, torch.Tensor]:
    """Fake galaxy-like spectra on a linear grid: a sloped continuum, a few Gaussian emission lines, Gaussian
    noise with its `ivar`, and a random `mask` (True = bad pixel) that also has ivar = 0.

    Returns a dict with `flux`, `ivar`, `mask` [batch, num_pixels] and `wavelength` [num_pixels]."""
    generator = torch.Generator().manual_seed(seed)
    wavelength = wavelength_start + wavelength_step * torch.arange(num_pixels, dtype=torch.float32)
    x = (wavelength - wavelength.mean()) / (wavelength.max() - wavelength.min() + 1e-6)  # [-0.5, 0.5]
    level = 0.5 + 2.0 * torch.rand(batch, 1, generator=generator)  # [batch, 1]
    slope = 0.5 * torch.randn(batch, 1, generator=generator)  # [batch, 1]
    flux = level * (1.0 + slope * x)  # [batch, pixels]
    for _ in range(3):
        centre = wavelength[0] + (wavelength[-1] - wavelength[0]) * torch.rand(batch, 1, generator=generator)
        width = 2.0 + 4.0 * torch.rand(batch, 1, generator=generator)
        flux = flux + 3.0 * level * torch.exp(-0.5 * ((wavelength - centre) / width) ** 2)
    sigma = 0.1 * level.expand(batch, num_pixels)  # [batch, pixels]
    flux = flux + sigma * torch.randn(batch, num_pixels, generator=generator)
    ivar = 1.0 / sigma**2
    mask = torch.rand(batch, num_pixels, generator=generator) < bad_fraction
    ivar = torch.where(mask, 0.0, ivar)
    return {"flux": flux, "ivar": ivar, "mask": mask, "wavelength": wavelength}


@pytest.fixture
def spectra_factory() -> Callable[..., dict[str, torch.Tensor]]:
    """`make_spectra(batch, num_pixels, seed, bad_fraction, ...)`: fake spectra with flux, ivar, mask, wavelength."""
    return make_spectra


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one torch thread (tiny models are much faster that way on a shared CPU, where
    two threads wait on each other). Opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The prelude of every `fresh_python` child: `report(data)` prints the child's answer for the parent, and with
# `hide_specpt` a meta-path finder blocks every `specpt_hf` import (the package is installed editable, so dropping
# sys.path entries alone would not hide it).
_CHILD_PRELUDE = r"""
import importlib.abc as _abc, json as _json, sys as _sys
from pathlib import Path as _Path


class _HideSpecPT(_abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "specpt_hf" or name.startswith("specpt_hf."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


if HIDE_SPECPT:
    _sys.meta_path.insert(0, _HideSpecPT())
    _sys.path = [p for p in _sys.path if not (_Path(p or ".") / "specpt_hf").is_dir()]
try:
    import specpt_hf  # noqa: F401

    _hidden = False
except ModuleNotFoundError:
    _hidden = True


def report(data):
    print("REPORT " + _json.dumps({**data, "specpt_hf_hidden": _hidden}))
"""


@pytest.fixture
def fresh_python(tmp_path) -> Callable[..., dict]:
    """`fresh_python(code, *args, env=None, hide_specpt=True)`: run `code` with `python -c` in a fresh process,
    from an empty working directory, with an empty PYTHONPATH, a private transformers modules cache
    (`HF_MODULES_CACHE`, so remote code is copied afresh) and one OpenMP thread; `env` adds variables (None
    removes one). With `hide_specpt` the child cannot import `specpt_hf` (checked). `code` ends by calling
    `report(dict)`; that dict is returned (with `specpt_hf_hidden`)."""

    def run(
        code: str,
        *args: str,
        env: dict[str, str | None] | None = None,
        hide_specpt: bool = True,
        timeout: float = 300,
    ) -> dict:
        workdir = tmp_path / "empty"
        workdir.mkdir(exist_ok=True)
        variables = {
            **os.environ,
            "PYTHONPATH": "",
            "HF_MODULES_CACHE": str(tmp_path / "child_modules"),
            "OMP_NUM_THREADS": "1",
        }
        for name, value in (env or {}).items():
            if value is None:
                variables.pop(name, None)
            else:
                variables[name] = value
        prelude = f"HIDE_SPECPT = {bool(hide_specpt)}\n{_CHILD_PRELUDE}\n"
        result = subprocess.run(
            [sys.executable, "-c", prelude + code, *map(str, args)],
            cwd=workdir,
            env=variables,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0 and "REPORT " in result.stdout, (
            result.stdout[-2000:] + result.stderr[-4000:]
        )
        answer = json.loads(result.stdout.rsplit("REPORT ", 1)[1].splitlines()[0])
        problem = "was importable" if hide_specpt else "could not be imported"
        assert answer["specpt_hf_hidden"] == hide_specpt, f"specpt_hf {problem} in the child process"
        return answer

    return run
