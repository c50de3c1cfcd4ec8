"""`AutoModel.from_pretrained(folder, trust_remote_code=True)` in a fresh process where specpt_hf cannot be imported.

The folders (an autoencoder; a redshift model without and with templates and archetypes) are written by
`save_pretrained` only (nothing is copied by hand); the child process
(`fresh_python`, tests/conftest.py) cannot import `specpt_hf` and runs from an empty working directory.
"""

from __future__ import annotations

import torch
from test_archetypes import _archetypes
from test_refinement import _true_templates

from specpt_hf import create_model

CHILD = r"""
import sys

import torch
from transformers import AutoConfig, AutoModel

models = {}
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
    models[name] = {
        "refused_without_trust": refused,
        "config_class": type(config).__name__,
        "class": type(model).__name__,
        "module": type(model).__module__,
        "same_outputs": all(
            torch.allclose(out[key], value, atol=1e-6) for key, value in data["expected"][name].items()
        ),
    }
report({"models": models})
"""


def test_trust_remote_code_without_specpt_hf(tmp_path, spectra_factory, fresh_python):
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
    torch.manual_seed(0)
    model = create_model("specpt-tiny", "redshift", refinement_archetype_gate=None).eval()
    model.set_templates({"GALAXY": _true_templates()})  # the refinement and its archetypes come along too
    model.set_archetypes({"GALAXY": _archetypes(_true_templates())})
    model.save_pretrained(tmp_path / "refined")
    folders["refined"] = str(tmp_path / "refined")
    with torch.no_grad():
        out = model(**inputs)
    expected["refined"] = {key: value for key, value in out.items() if value is not None}
    assert "delta_chi2" in expected["refined"]
    torch.save({"folders": folders, "inputs": inputs, "expected": expected}, tmp_path / "data.pt")

    report = fresh_python(CHILD, tmp_path / "data.pt", env={"HF_HUB_OFFLINE": "1"})
    classes = {
        "autoencoder": "SpecPTForSpectrumReconstruction",
        "redshift": "SpecPTForRedshift",
        "refined": "SpecPTForRedshift",
    }
    configs = {
        "autoencoder": "SpecPTConfig",
        "redshift": "SpecPTForRedshiftConfig",
        "refined": "SpecPTForRedshiftConfig",
    }
    assert sorted(report["models"]) == sorted(classes)
    for task, info in report["models"].items():
        assert info["refused_without_trust"], info
        assert info["class"] == classes[task] and info["config_class"] == configs[task]
        assert info["module"].startswith("transformers_modules"), info["module"]
        assert info["same_outputs"], info
