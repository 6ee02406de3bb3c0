"""The package's metadata: dependency bounds that the tested stack satisfies, and a licence."""

from __future__ import annotations

import json
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(name): version for name, version in
            (line.split("==") for line in lines if line.strip() and not line.startswith("#"))}


def test_every_dependency_is_pinned_and_its_pin_is_allowed():
    """The tested versions (constraints.txt) satisfy pyproject.toml, and the key packages' lower
    bounds are the tested major.minor (their APIs move: transformers 4.50 lacked a class HAVIR imports)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    requirements = [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # tomli, for Python < 3.11
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {requirement}"
    bounds = {canonicalize_name(r.name): next(s.version for s in r.specifier if s.operator == ">=") for r in requirements}
    for key in ("torch", "diffusers", "transformers", "nibabel", "nilearn", "huggingface-hub", "typer"):
        assert bounds[key] == ".".join(pins[key].split(".")[:2]), f"{key}>={bounds[key]}, tested {pins[key]}"


def test_mit_licence_is_shipped():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_model_artefacts_record_the_versions_that_made_them(tmp_path):
    """The features cache, the run folder and a reconstruction folder each say which torch,
    diffusers, transformers and numpy made them (issue 18)."""
    import h5py

    from havir.features import compute_features, features_path
    from havir.io import MODEL_STACK
    from havir.nsd.synth import synthesize_nsd
    from havir.prepare import prepare_subject
    from havir.reconstruct import reconstruct_run
    from havir.train import TrainConfig, train_subject

    synthesize_nsd(tmp_path / "nsd", (1,), 60, 0)
    prepare_subject(tmp_path / "nsd", 1, tmp_path / "data", progress=False)
    compute_features(tmp_path / "data", 1, model="tiny", progress=False)
    train_subject(tmp_path / "data", 1, tmp_path / "run", config=TrainConfig(preset="tiny", epochs=1), progress=False)
    reconstruct_run(tmp_path / "run", tmp_path / "recon", mode="structural", limit=2, device="cpu")
    with h5py.File(features_path(tmp_path / "data", 1), "r") as h5:
        recorded = {"features": json.loads(h5.attrs["versions"])}
    recorded["run"] = json.loads((tmp_path / "run" / "summary.json").read_text())["versions"]
    recorded["reconstruction"] = json.loads((tmp_path / "recon" / "manifest.json").read_text())["versions"]
    for artefact, versions in recorded.items():
        assert {"havir", *MODEL_STACK} <= versions.keys(), artefact
        assert versions["diffusers"] == metadata.version("diffusers"), artefact


def test_readme_reads_on_a_package_page():
    """The README is the wheel's long description: a package page has no checkout beside it, so
    every link is absolute, and each image is this repository's raw file of a path that exists
    here; a GPU user is told to install torch for their CUDA before HAVIR (issue 18)."""
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    repository = project["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", repository)[1]
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert images and all(target.startswith("https://") for target in targets), targets
    for image in images:
        path = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)", image)
        assert path and (ROOT / path[1]).is_file(), image
    torch_first = readme.index("pip install torch==")
    assert torch_first < readme.index("pip install -c constraints.txt .") and "download.pytorch.org/whl/cu" in readme


def test_the_hub_command_is_hf_download_everywhere():
    """huggingface-cli is gone from the pinned huggingface_hub: no message or page names it."""
    files = [*ROOT.glob("havir/**/*.py"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("scripts/**/*"), ROOT / "README.md",
             ROOT / "Makefile"]
    named = [str(f.relative_to(ROOT)) for f in files if f.is_file() and "huggingface-cli" in f.read_text(errors="replace")]
    assert named == []
    assert "hf download" in (ROOT / "havir" / "models" / "versatile.py").read_text()
