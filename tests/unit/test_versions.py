"""One source of truth for the cloud's model runtime: constraints.txt pins torch and
transformers; the install step and both cloud images read it, pyproject's [cloud] ranges
contain it, pyproject's torch floor is transformers' own, and the environment the tests
run in has exactly these versions. Any drift between them fails here."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
PINNED = ("torch", "transformers")


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            [spec] = list(req.specifier)
            assert spec.operator == "==", f"{line}: pin an exact version"
            pins[req.name] = spec.version
    return pins


def _cloud_extra() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["optional-dependencies"]["cloud"]]
    return {r.name: r for r in reqs}


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{req} has no floor"
    return max(floors)


def test_constraints_pin_exactly_torch_and_transformers() -> None:
    assert sorted(_pins()) == sorted(PINNED)


def test_pyproject_ranges_contain_the_pins() -> None:
    extra = _cloud_extra()
    for name, version in _pins().items():
        assert name in extra, f"[cloud] does not require {name}"
        assert extra[name].specifier.contains(version), f"{extra[name]} excludes {version}"


def test_pyproject_torch_floor_is_at_least_transformers_own() -> None:
    try:
        requires = metadata.requires("transformers") or []
    except metadata.PackageNotFoundError:
        pytest.skip("transformers is not installed")
    theirs = [
        Requirement(r)
        for r in requires
        if r.startswith("torch") and Requirement(r).name == "torch" and "extra" in r
    ]
    assert theirs, "transformers' metadata names no torch requirement"
    floor = max(_floor(r) for r in theirs)
    assert _floor(_cloud_extra()["torch"]) >= floor, f"transformers needs torch>={floor}"


@pytest.mark.parametrize("name", PINNED)
def test_the_tests_run_the_pinned_version(name: str) -> None:
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    assert Version(installed).public == Version(_pins()[name]).public, (
        f"{name} {installed} is installed, constraints.txt pins {_pins()[name]}: make install"
    )


def test_install_step_reads_the_constraints() -> None:
    script = (ROOT / "scripts" / "install.sh").read_text()
    cloud = [line for line in script.splitlines() if "pip install" in line and "cloud" in line]
    assert cloud and all("-c constraints.txt" in line for line in cloud)
    assert not re.search(r"(torch|transformers)==\d", script), "pins live in constraints.txt"
    stamp = next(line for line in script.splitlines() if line.startswith("stamp_key="))
    assert "constraints.txt" in stamp, "a new pin must re-run the install"


@pytest.mark.parametrize("dockerfile", ["cloud.Dockerfile", "cloud-cpu.Dockerfile"])
def test_cloud_images_read_the_constraints(dockerfile: str) -> None:
    text = (ROOT / "docker" / dockerfile).read_text()
    assert re.search(r"^COPY constraints\.txt ", text, re.MULTILINE)
    assert "-c constraints.txt" in text
    assert not re.search(r"(torch|transformers)\s*==\s*\d", text)
