"""`AutoModel.from_pretrained(folder, trust_remote_code=True)` in a fresh process where specpt_hf cannot be imported.

The folders are written by `save_pretrained` only (nothing is copied by hand); the child process blocks every
`specpt_hf` import with a meta-path finder (the package is installed editable, so dropping sys.path entries
alone would not hide it) and runs from an empty working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from specpt_hf import create_model

CHILD = r"""
import importlib.abc, json, sys
from pathlib import Path


class HideSpecPT(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "specpt_hf" or name.startswith("specpt_hf."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, HideSpecPT())
sys.path = [p for p in sys.path if not (Path(p or ".") / "specpt_hf").is_dir()]
try:
    import specpt_hf  # noqa: F401
    hidden = False
except ModuleNotFoundError:
    hidden = True

import torch
from transformers import AutoConfig, AutoModel

report = {"hidden": hidden, "models": {}}
data = torch.load(sys.argv[1])
for name, folder in data["folders"].items():
    try:
        AutoModel.from_pretrained(folder, trust_remote_code=False)
        refused = False
    except ValueError as error:
        refused = "trust_remote_code" in str(error)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**data["inputs"])
    report["models"][name] = {
        "refused_without_trust": refused,
        "config_class": type(config).__name__,
        "class": type(model).__name__,
        "module": type(model).__module__,
        "same_outputs": all(
            torch.allclose(out[key], value, atol=1e-6) for key, value in data["expected"][name].items()
        ),
    }
print("REPORT " + json.dumps(report))
"""


def test_trust_remote_code_without_specpt_hf(tmp_path, spectra_factory):
    spectra = spectra_factory(batch=2, num_pixels=7781)
    inputs = {key: spectra[key] for key in ("flux", "ivar", "mask")}
    folders, expected = {}, {}
    for task in ("autoencoder", "redshift"):
        torch.manual_seed(0)
        model = create_model("specpt-tiny", task).eval()
        folder = tmp_path / task
        model.save_pretrained(folder)
        folders[task] = str(folder)
        with torch.no_grad():
            out = model(**inputs)
        expected[task] = {key: value for key, value in out.items() if value is not None}
    torch.save({"folders": folders, "inputs": inputs, "expected": expected}, tmp_path / "data.pt")

    workdir = tmp_path / "empty"
    workdir.mkdir()
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "data.pt")],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "REPORT " in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
    report = json.loads(result.stdout.rsplit("REPORT ", 1)[1].splitlines()[0])
    assert report["hidden"], "specpt_hf was importable in the child process"
    classes = {"autoencoder": "SpecPTForSpectrumReconstruction", "redshift": "SpecPTForRedshift"}
    configs = {"autoencoder": "SpecPTConfig", "redshift": "SpecPTForRedshiftConfig"}
    for task, info in report["models"].items():
        assert info["refused_without_trust"], info
        assert info["class"] == classes[task] and info["config_class"] == configs[task]
        assert info["module"].startswith("transformers_modules"), info["module"]
        assert info["same_outputs"], info
