"""`specpt push`, the generated model cards and the release recipe, against a Hub-compatible server on 127.0.0.1
(`tests/hub_server.py`): uploads go through the real `huggingface_hub` client (create_repo, preupload, LFS batch,
commit), downloads through `from_pretrained` in fresh processes that see the server through `HF_ENDPOINT`."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from astropy.table import Table
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.repocard_data import model_index_to_eval_results
from safetensors import safe_open

from specpt_hf import SpecPTForRedshift, create_model
from specpt_hf.evaluation.results import eval_results, read_results_json
from specpt_hf.hub import (
    CARD_TEMPLATE,
    HubRefusedError,
    HubUnreachableError,
    ModelFolder,
    ModelFolderError,
    details_block,
    header_block,
    layout_block,
    push_to_hub,
    results_block,
    training_block,
    usage_block,
    write_repo_folder,
)
from specpt_hf.hub import main as push_main
from specpt_hf.loading import SHORT_NAMES
from specpt_hf.presets import count_parameters, preset_config
from specpt_hf.training.settings import TrainingSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_spectra  # noqa: E402
from hub_server import LocalHub, card_metadata_errors  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_specptTestWriteToken0123456789"
USER = "specpt-test"
REPO = f"{USER}/specpt-desi"
BLOCKS = ("header", "details", "layout", "results", "usage", "training")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback Hub, shared by the tests of this module; it accepts TOKEN for the user `specpt-test`."""
    with LocalHub(tmp_path_factory.mktemp("hub"), tokens={TOKEN: USER}) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def hub_environment(tmp_path_factory):
    """HF_TOKEN for uploads, LFS instead of Xet (the loopback Hub has no Xet storage), and private caches."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", TOKEN)
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_DISABLE_XET", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        patch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        yield


def load_release():
    spec = importlib.util.spec_from_file_location("release", ROOT / "examples" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RELEASE_ARGS = ["--mock", "24", "--preset", "specpt-tiny", "--repo-id", REPO]
RELEASE_ARGS += ["--autoencoder-steps", "3", "--redshift-steps", "3", "--eval-steps", "3"]


@pytest.fixture(scope="module")
def release(hub, tmp_path_factory):
    """The release recipe run once, end to end, on a tiny mock release, pushing to the loopback Hub."""
    out = tmp_path_factory.mktemp("release")
    assert load_release().main(["--out", str(out), *RELEASE_ARGS, "--hub-endpoint", hub.url]) == 0
    return out


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """A randomly initialised specpt-tiny redshift model, saved with save_pretrained."""
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    create_model("specpt-tiny", "redshift").save_pretrained(folder)
    return folder


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A private temporary folder for `tempfile` (to see what a failed push leaves behind)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def commits(hub: LocalHub) -> int:
    return sum(1 for method, path, status in hub.requests if path.endswith("/commit/main") and status == 200)


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary entries next to an output folder."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))
    )


def test_release_recipe_end_to_end(hub, release, capsys):
    autoencoder_repo = f"{REPO}-autoencoder"
    files = hub.files(REPO)
    expected = {"README.md", "config.json", "model.safetensors", "training_settings.yaml"}
    expected |= {"configuration_specpt.py", "modeling_specpt.py", "pipeline_specpt.py", "resampling.py"}
    expected |= {"emission_lines.py", "preprocessor_config.json"}
    assert expected <= set(files), sorted(files)
    assert files["model.safetensors"].lfs_oid, "weights must travel as an LFS object"
    local = release / "runs" / "redshift" / "best" / "model.safetensors"
    assert hub.read_file(REPO, "model.safetensors") == local.read_bytes()
    ae_files = hub.files(autoencoder_repo)
    assert {"README.md", "config.json", "model.safetensors", "modeling_specpt.py"} <= set(ae_files)
    assert "pipeline_specpt.py" not in ae_files and "resampling.py" not in ae_files
    assert "preprocessor_config.json" not in ae_files
    extractor = json.loads(hub.read_file(REPO, "preprocessor_config.json"))
    assert extractor["auto_map"] == {"AutoFeatureExtractor": "pipeline_specpt.SpecPTFeatureExtractor"}
    assert extractor["num_pixels"] == json.loads(hub.read_file(REPO, "config.json"))["num_pixels"]
    assert hub.read_file(REPO, "README.md") == (release / "hub" / "redshift" / "README.md").read_bytes()
    card = ModelCard(hub.read_file(REPO, "README.md").decode())
    assert card.data.base_model == autoencoder_repo
    assert card.data.eval_results and card.data.model_name == "specpt-desi"
    assert not (release / "hub" / "redshift.pushed.json").read_text().count(TOKEN)

    # a second run finds every output in place: nothing is trained or pushed again
    before = commits(hub)
    capsys.readouterr()
    assert load_release().main(["--out", str(release), *RELEASE_ARGS, "--hub-endpoint", hub.url]) == 0
    printed = capsys.readouterr().out
    for name in ("data", "prepare", "pretrain autoencoder", "train redshift model", "evaluate"):
        assert f"== {name}: done before, skipped" in printed
    assert printed.count("unchanged since") == 2
    assert commits(hub) == before


def test_generated_card(release):
    folder = release / "hub" / "redshift"
    results = read_results_json(release / "evaluation" / "results.json")
    card = ModelCard.load(folder / "README.md")
    assert card_metadata_errors(str(card)) == []
    assert card.data.library_name == "transformers" and card.data.license == "bsd-3-clause"
    assert {"specpt", "redshift", "desi"} <= set(card.data.tags)
    assert card.data.datasets is None

    # model-index: NMAD and η per class, exactly the results file's numbers (rounded to 4 digits)
    expected = eval_results(results["metrics"], results["dataset"]["name"], results["dataset"]["type"])
    ident = lambda r: (r.metric_config, r.metric_type)  # noqa: E731
    assert {ident(r): r.metric_value for r in card.data.eval_results} == {
        ident(r): r.metric_value for r in expected
    }
    assert {r.metric_type for r in card.data.eval_results} == {"nmad", "nmad_centred", "eta"}
    name, round_trip = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "specpt-desi" and round_trip == card.data.eval_results

    text = card.text
    assert "specpt:note" not in text and "template of every card" not in text
    for block in BLOCKS:
        assert f"<!-- specpt:{block} -->" in text and f"<!-- /specpt:{block} -->" in text
    for group, values in results["metrics"].items():
        assert f"| {values['n']} | {values['nmad']:.4g} |" in text, group
    bins = [b for b in results["by_redshift_bin"] if b["n"]]
    assert bins and f"| {bins[0]['z_min']:g}–{bins[0]['z_max']:g} | {bins[0]['n']} |" in text
    assert f'from_pretrained("{REPO}")' in text and f"--model {REPO}" in text
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        n_params = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118
    assert f"| parameters | {n_params:,} |" in text
    assert "| `preset` | `specpt-tiny` |" in text and "| `max_steps` | `3` |" in text
    assert "tokens of 64 pixels" in text  # the tiny preset's patch size, not the template's

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_specpt.SpecPTForRedshiftConfig",
        "AutoModel": "modeling_specpt.SpecPTForRedshift",
    }
    assert config["custom_pipelines"]["spectrum-redshift"] == {
        "impl": "pipeline_specpt.SpecPTRedshiftPipeline",
        "pt": ["AutoModel"],
    }


def test_model_card_md_is_the_generator_output_for_specpt_desi():
    """The blocks of the top-level MODEL_CARD.md are what the generator writes for the specpt-base release."""
    config = preset_config("specpt-base", "redshift")
    folder = ModelFolder(Path("."), {}, config, "SpecPTForRedshift", [], count_parameters(config, "redshift"))
    settings = TrainingSettings.from_yaml(ROOT / "examples/configs/specpt-base-redshift.yaml").to_dict()
    repo, base = SHORT_NAMES["specpt-desi"], SHORT_NAMES["specpt-desi-autoencoder"]
    generated = {
        "header": header_block(folder, repo, base),
        "details": details_block(folder, repo, settings),
        "layout": layout_block(config),
        "results": results_block(None),
        "usage": usage_block(folder, repo, has_pipeline=True),
        "training": training_block(settings),
    }
    text = CARD_TEMPLATE.read_text(encoding="utf-8")
    for block, content in generated.items():
        start, end = f"<!-- specpt:{block} -->\n", f"\n<!-- /specpt:{block} -->"
        assert text[text.index(start) + len(start) : text.index(end)] == content, block
    card = ModelCard.load(CARD_TEMPLATE)
    assert card.data.library_name == "transformers" and not card_metadata_errors(text)
    assert card.data.base_model == base
    assert "eprint        = {2501.01070}" in card.text and "Pattnaik, Rohan and Kartaltepe" in card.text
    for section in ("## Intended use", "## Limitations", "## Training data and selection", "## Results"):
        assert section in card.text
    assert "## Fine-tuning on other instruments" in card.text and "## Citation" in card.text


CHILD_SPECPT = r"""
import sys
import torch
from specpt_hf import SpecPTForRedshift
from huggingface_hub import constants

data = torch.load(sys.argv[1])
model = SpecPTForRedshift.from_pretrained(data["repo"]).eval()
with torch.no_grad():
    out = model(**data["inputs"])
same = {k: torch.allclose(out[k], v, atol=1e-6) for k, v in data["expected"].items()}
report({"same": same, "endpoint": constants.ENDPOINT, "name_or_path": model.name_or_path, "refines": model.refines})
"""

CHILD_REMOTE_CODE = r"""
import sys

import torch
from transformers import AutoModel, pipeline

data = torch.load(sys.argv[1])
model = AutoModel.from_pretrained(data["repo"], trust_remote_code=True).eval()
with torch.no_grad():
    out = model(**data["inputs"])
same = {k: torch.allclose(out[k], v, atol=1e-6) for k, v in data["expected"].items()}
estimator = pipeline("spectrum-redshift", model=data["repo"], trust_remote_code=True)
inputs = data["inputs"]
first = {"flux": inputs["flux"][0].numpy(), "ivar": inputs["ivar"][0].numpy(), "mask": inputs["mask"][0].numpy()}
z = estimator(first)["z"]
report({"module": type(model).__module__, "same": same, "pipeline_z": z, "pipeline_class": type(estimator).__name__,
        "refines": model.refines})
"""


def hub_child_env(hub: LocalHub, tmp_path: Path) -> dict[str, str | None]:
    """A child process whose Hub is the loopback one, with empty caches and no token (the repo is public)."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "child_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": None,
    }


@pytest.fixture(scope="module")
def expected_outputs(release, tmp_path_factory):
    """Inputs and the redshift model's outputs before the push, saved for the child processes."""
    spectra = make_spectra(batch=3, num_pixels=7781, seed=3)
    inputs = {key: spectra[key] for key in ("flux", "ivar", "mask")}
    model = SpecPTForRedshift.from_pretrained(release / "runs" / "redshift" / "best").eval()
    with torch.no_grad():
        out = model(**inputs)
    assert model.refines  # the release recipe added templates
    expected = {key: out[key] for key in ("redshift", "redshift_err", "quality", "logits", "chi2")}
    path = tmp_path_factory.mktemp("expected") / "data.pt"
    torch.save({"repo": REPO, "inputs": inputs, "expected": expected}, path)
    return path, expected


def test_from_pretrained_downloads_and_predicts_the_same(hub, expected_outputs, tmp_path, fresh_python):
    data_file, _ = expected_outputs
    before = len(hub.requests)
    report = fresh_python(CHILD_SPECPT, data_file, env=hub_child_env(hub, tmp_path), hide_specpt=False)
    assert report["endpoint"] == hub.url
    assert all(report["same"].values()), report
    assert report["refines"], "the templates did not come back from the Hub"
    downloads = [path for method, path, status in hub.requests[before:] if method == "GET" and status == 200]
    assert any(
        path.startswith(f"/{REPO}/resolve/") and path.endswith("/model.safetensors") for path in downloads
    )
    assert (tmp_path / "child_home" / "hub" / f"models--{REPO.replace('/', '--')}").is_dir()


def test_auto_model_with_remote_code_without_specpt_hf(hub, expected_outputs, tmp_path, fresh_python):
    data_file, expected = expected_outputs
    report = fresh_python(CHILD_REMOTE_CODE, data_file, env=hub_child_env(hub, tmp_path))
    assert report["module"].startswith("transformers_modules"), report["module"]
    assert all(report["same"].values()), report
    assert report["refines"]
    assert report["pipeline_class"] == "SpecPTRedshiftPipeline"
    assert report["pipeline_z"] == pytest.approx(float(expected["redshift"][0]), abs=1e-5)


def test_cli_push_never_shows_or_writes_the_token(hub, release, tmp_path):
    out, home = tmp_path / "repo", tmp_path / "home"
    env = dict(
        os.environ,
        HF_TOKEN=TOKEN,
        HF_DEBUG="1",  # huggingface_hub logs every request it sends
        HF_HOME=str(home),
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        OMP_NUM_THREADS="1",
    )
    model = release / "runs" / "redshift" / "best"
    command = [sys.executable, "-m", "specpt_hf.cli", "push", str(model), "--repo-id", f"{USER}/token-check"]
    command += ["--results", str(release / "evaluation" / "results.json"), "--out", str(out), "--private"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed to" in result.stdout and "Send:" in result.stderr  # the debug log was on
    assert TOKEN not in result.stdout + result.stderr
    assert hub.repos[f"{USER}/token-check"].private
    written = [path for path in [*tmp_path.rglob("*"), *hub.root.rglob("*")] if path.is_file()]
    assert any(path.name == "model.safetensors" for path in written)
    assert not [path for path in written if TOKEN.encode() in path.read_bytes()]


def test_wrong_token_error_does_not_show_it(hub, tiny_folder, tmp_path):
    wrong = "hf_wrongTokenWrongToken987654321"
    repo = write_repo_folder(tiny_folder, tmp_path / "repo", repo_id=f"{USER}/wrong-token")
    with pytest.raises(HubRefusedError) as info:
        push_to_hub(repo, f"{USER}/wrong-token", token=wrong, endpoint=hub.url)
    text = "".join(traceback.format_exception(info.value))
    assert info.value.status_code == 401 and hub.url in text and f"{USER}/wrong-token" in text
    assert wrong not in text and TOKEN not in text
    assert f"{USER}/wrong-token" not in hub.repos


def test_dry_run_writes_the_folder_only(hub, tiny_folder, tmp_path, capsys):
    out, before = tmp_path / "out", len(hub.requests)
    args = [
        str(tiny_folder),
        "--repo-id",
        f"{USER}/dry",
        "--dry-run",
        "--out",
        str(out),
        "--endpoint",
        hub.url,
    ]
    assert push_main(args) == 0
    assert {"README.md", "config.json", "model.safetensors", "modeling_specpt.py"} <= {
        p.name for p in out.iterdir()
    }
    assert len(hub.requests) == before and f"{USER}/dry" not in hub.repos
    assert push_main(args) == 1 and "already exists" in capsys.readouterr().err
    (out / "stale.txt").write_text("from an older run")
    assert push_main([*args, "--overwrite"]) == 0 and not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(SystemExit):
        push_main([str(tiny_folder), "--repo-id", f"{USER}/dry", "--dry-run"])


def test_push_to_a_branch_of_a_private_repo(hub, tiny_folder, tmp_path):
    repo = write_repo_folder(tiny_folder, tmp_path / "repo", repo_id=f"{USER}/branchy")
    info = push_to_hub(repo, f"{USER}/branchy", private=True, revision="v1", endpoint=hub.url)
    assert hub.repos[f"{USER}/branchy"].private and info.oid == hub.repos[f"{USER}/branchy"].refs["v1"]
    assert "model.safetensors" in hub.files(f"{USER}/branchy", "v1")
    assert hub.files(f"{USER}/branchy", "main") == {}
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(f"{USER}/branchy")
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info(f"{USER}/branchy", revision="v1").sha == info.oid


@pytest.mark.parametrize("status", [401, 403, 500])
def test_refusing_hub(status, tmp_path, tiny_folder, scratch, capsys):
    with LocalHub(tmp_path / "hub", tokens={TOKEN: USER}) as refusing:
        refusing.refuse = status
        assert push_main([str(tiny_folder), "--repo-id", f"{USER}/refused", "--endpoint", refusing.url]) == 1
        error = capsys.readouterr().err
        assert refusing.url in error and f"{USER}/refused" in error and f"HTTP {status}" in error
        assert TOKEN not in error
        assert list(scratch.iterdir()) == []  # the temporary repo folder is gone
        repo = write_repo_folder(tiny_folder, tmp_path / "repo", repo_id=f"{USER}/refused")
        with pytest.raises(HubRefusedError) as info:
            push_to_hub(repo, f"{USER}/refused", endpoint=refusing.url)
        assert info.value.status_code == status and refusing.url in str(info.value)
        assert refusing.repos == {}


def test_unreachable_hub(tmp_path, tiny_folder, scratch, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once closed
    out = tmp_path / "out"
    assert (
        push_main([str(tiny_folder), "--repo-id", f"{USER}/away", "--endpoint", endpoint, "--out", str(out)])
        == 1
    )
    error = capsys.readouterr().err
    assert endpoint in error and f"{USER}/away" in error and "could not be reached" in error
    assert {"README.md", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}  # complete
    assert leftovers(tmp_path) == [] and list(scratch.iterdir()) == []
    with pytest.raises(HubUnreachableError, match="could not be reached"):
        push_to_hub(out, f"{USER}/away", endpoint=endpoint)


def _remove_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _torch_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")


def _foreign_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))


def _other_sizes(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ffn_dim": 48}))


def _truncated_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


@pytest.mark.parametrize(
    "damage, file, words",
    [
        (_remove_weights, "model.safetensors", "missing"),
        (_torch_weights, "pytorch_model.bin", "not in safetensors format"),
        (_foreign_config, "config.json", "'bert' is not a SpecPT model"),
        (_other_sizes, "model.safetensors", "do not match config.json"),
        (_truncated_weights, "model.safetensors", "not a readable safetensors file"),
        (_no_config, "config.json", "missing"),
    ],
)
def test_bad_model_folder(damage, file, words, tiny_folder, tmp_path, hub):
    damage(tiny_folder)
    out, before = tmp_path / "out", len(hub.requests)
    with pytest.raises(ModelFolderError) as info:
        write_repo_folder(tiny_folder, out, repo_id=f"{USER}/bad")
    assert str(tiny_folder / file) in str(info.value) and words in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not out.exists() and leftovers(tmp_path) == []
    assert push_main([str(tiny_folder), "--repo-id", f"{USER}/bad", "--endpoint", hub.url]) == 1
    assert len(hub.requests) == before  # nothing was sent


def test_card_without_results_and_for_an_autoencoder(tmp_path):
    torch.manual_seed(0)
    create_model("specpt-tiny", "autoencoder").save_pretrained(tmp_path / "ae")
    repo = write_repo_folder(tmp_path / "ae", tmp_path / "repo", repo_id=f"{USER}/ae")
    card = ModelCard.load(repo / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "No evaluation results were given" in card.text and card.data.base_model is None
    assert "SpecPTForSpectrumReconstruction.from_pretrained" in card.text
    config = json.loads((repo / "config.json").read_text())
    assert "custom_pipelines" not in config and not (repo / "pipeline_specpt.py").exists()
    assert config["auto_map"]["AutoModel"] == "modeling_specpt.SpecPTForSpectrumReconstruction"
    with pytest.raises(ValueError, match="ORG/NAME"):
        write_repo_folder(tmp_path / "ae", tmp_path / "other", repo_id="no-namespace")
    shutil.rmtree(repo)


def test_push_to_hub_example_script(hub, tiny_folder, tmp_path):
    spec = importlib.util.spec_from_file_location("push_to_hub_example", ROOT / "examples" / "push_to_hub.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--model-dir", str(tiny_folder), "--repo-id", f"{USER}/example", "--endpoint", hub.url]
    script.main(args)
    assert {"README.md", "config.json", "model.safetensors"} <= set(hub.files(f"{USER}/example"))
    assert (
        hub.read_file(f"{USER}/example", "model.safetensors")
        == (tiny_folder / "model.safetensors").read_bytes()
    )


def test_release_recipe_downloads_the_wanted_classes(release, tmp_path):
    """The download branch: a catalog whose good BGS and ELG targets sit in the two healpix of the mock release
    (served over HTTP like the EDR); LRG and a bad fiber point to healpix the server does not have."""
    rows = [  # class, program, healpix, COADD_FIBERSTATUS, SV3_DESI_TARGET, SV3_BGS_TARGET
        ("bgs", "bright", 26000, 0, 1 << 60, 1),
        ("elg", "dark", 26001, 0, 1 << 1, 0),
        ("lrg", "dark", 26002, 0, 1 << 0, 0),
        ("bgs", "bright", 26003, 4, 1 << 60, 1),
    ]
    catalog = Table(
        {
            "TARGETID": np.arange(1, len(rows) + 1),
            "SURVEY": ["sv3"] * len(rows),
            "PROGRAM": [row[1] for row in rows],
            "HEALPIX": [row[2] for row in rows],
            "OBJTYPE": ["TGT"] * len(rows),
            "COADD_FIBERSTATUS": [row[3] for row in rows],
            "ZWARN": np.zeros(len(rows), np.int64),
            "SV3_DESI_TARGET": np.array([row[4] for row in rows], np.int64),
            "SV3_BGS_TARGET": np.array([row[5] for row in rows], np.int64),
        }
    )
    catalog.meta["EXTNAME"] = "ZCATALOG"
    catalog.write(tmp_path / "zcatalog.fits")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

    handler = functools.partial(Quiet, directory=str(release / "data" / "raw"))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "out"
        args = ["--out", str(out), "--catalog", str(tmp_path / "zcatalog.fits"), "--base-url", base_url]
        try:
            assert load_release().main([*args, "--stop-after", "prepare"]) == 0
        finally:
            server.shutdown()
    fetched = sorted(p.name for p in (out / "data" / "raw").rglob("*.fits"))
    assert fetched == [
        "coadd-sv3-bright-26000.fits",
        "coadd-sv3-dark-26001.fits",
        "redrock-sv3-bright-26000.fits",
        "redrock-sv3-dark-26001.fits",
    ]
    shards = {p.name.split("-")[0] for p in (out / "data" / "train-set" / "train").glob("*.parquet")}
    assert shards == {"bgs", "elg"}
    assert not (out / "runs").exists()
