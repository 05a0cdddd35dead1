"""The install metadata: pyproject's ranges, its extras and constraints.txt agree."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from train_testutil import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    """``constraints.txt`` as ``{normalised name: version}``."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirements(extra: str | None = None) -> list[Requirement]:
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("extra", [None, "test"])
def test_constraints_pin_versions_inside_the_declared_ranges(extra):
    pins = _pins()
    for requirement in _requirements(extra):
        if requirement.marker and not requirement.marker.evaluate():
            continue  # e.g. tensorflow (macOS) beside tensorflow-cpu (Linux)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is declared but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}")


@pytest.mark.parametrize("extra, jax_extra", [("cuda12", "cuda12"), ("tpu", "tpu")])
def test_accelerator_extras_install_the_pinned_jax(extra, jax_extra):
    (jax,) = [r for r in _requirements() if r.name == "jax"]
    (accelerated,) = _requirements(extra)
    assert accelerated.name == "jax" and accelerated.extras == {jax_extra}
    assert accelerated.specifier == jax.specifier  # the plugin of the same jax
    readme = (REPO / "README.md").read_text()
    assert f"-e '.[{extra}]'" in readme  # and README says how to install it
