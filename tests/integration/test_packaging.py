"""A non-editable install works from any directory (issue 9).

The project is built from exactly what the Dockerfile's build stage copies, installed with
`pip install --no-deps --target` (what `pip install .` and the image do, into a folder of its
own), and run from an unrelated directory: the default edge.toml, the example registries and the
gateway's OpenAPI schema must come from the installed package, not from the working tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
CONFIG_PACKAGE = "mro_edge_config"


def build_stage_copies() -> list[str]:
    """The sources `COPY`ed into the Dockerfile's first (build) stage."""
    stages = re.split(r"^FROM ", (REPO / "Dockerfile").read_text(), flags=re.M)
    sources: list[str] = []
    for line in stages[1].splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources.extend(line.split()[1:-1])
    return sources


def test_every_python_package_is_listed_in_pyproject():
    """pyproject.toml lists packages one by one (config/ is mapped in as mro_edge_config): a new
    package must be added there, or the wheel and the Docker image silently lack it."""
    found = {".".join(p.parent.relative_to(REPO).parts)
             for top in ("shared", "services", "mro_edge") for p in (REPO / top).rglob("__init__.py")}
    listed = {p for p in SETUPTOOLS["packages"] if not p.startswith(CONFIG_PACKAGE)}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "listed in pyproject.toml but not a package any more"
    assert SETUPTOOLS["package-dir"] == {CONFIG_PACKAGE: "config"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The project installed (no dependencies) into a folder, built from the Docker build context."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in build_stage_copies():
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    target = root / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                             str(target), str(src)], capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def test_the_build_context_holds_what_the_wheel_needs():
    assert {"pyproject.toml", "README.md", "constraints.txt", "config", "shared", "services",
            "mro_edge"} <= set(build_stage_copies())


def test_the_install_carries_config_registries_and_schema(site: Path):
    tops = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")}
    assert tops == {"shared", "services", "mro_edge", CONFIG_PACKAGE, "bin"}, "no top-level config/ or tests/"
    shipped = sorted(p.relative_to(REPO / "config") for p in (REPO / "config").rglob("*")
                     if p.is_file() and p.suffix in (".toml", ".json", ".md", ".conf"))
    assert Path("edge.toml") in shipped and Path("registries/technicians.toml") in shipped
    for rel in shipped:
        installed = site / CONFIG_PACKAGE / rel
        assert installed.is_file(), f"config/{rel} is not in the installed package"
        assert installed.read_bytes() == (REPO / "config" / rel).read_bytes()
    schema = site / "services" / "gateway" / "openapi.yaml"
    assert schema.read_bytes() == (REPO / "services" / "gateway" / "openapi.yaml").read_bytes()


def test_the_installed_package_loads_its_config_from_another_directory(site: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = """
import json, shared, mro_edge_config
from shared.runtime.config import DEFAULT_CONFIG, load_config
from shared.compliance import load_registry
from shared.compliance.settings import DEFAULT_REGISTRIES, compliance_settings
from mro_edge.simulator.fleet import fleet
config = load_config()
registry = load_registry(compliance_settings(config).registries_dir)
print(json.dumps({
    "shared": shared.__file__, "config_package": mro_edge_config.__file__,
    "default_config": str(DEFAULT_CONFIG), "registries": str(DEFAULT_REGISTRIES),
    "station": config.station, "mqtt_url": config.mqtt.url,
    "technicians": len(registry.technicians), "aircraft": len(registry.aircraft),
    "tools": len(registry.tools), "fleet_tools": len(fleet().registry.tools),
}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRO_")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("shared", "config_package", "default_config", "registries"):
        assert Path(out[key]).is_relative_to(site), f"{key} came from {out[key]}, not the installed package"
    edge = tomllib.loads((REPO / "config" / "edge.toml").read_text())
    assert out["station"] == edge["station"] and out["mqtt_url"] == edge["mqtt"]["url"]
    registries = REPO / "config" / "registries"
    expected = {name: len(tomllib.loads((registries / f"{file}.toml").read_text())[table])
                for name, file, table in (("technicians", "technicians", "technician"),
                                          ("aircraft", "aircraft", "aircraft"), ("tools", "tools", "tool"))}
    assert {name: out[name] for name in expected} == expected
    assert out["fleet_tools"] == expected["tools"], "the simulator reads the same packaged registries"
