"""Release readiness: the sdist and wheel build, pass ``twine check``, and the wheel installed into a fresh virtual
environment imports from that environment (not the repository) and trains.

Nothing is downloaded: the build runs without isolation (``setuptools`` from this environment), the wheel is installed
with ``--no-deps --no-index``, and the fresh environment sees this environment's dependencies through a ``.pth`` file
naming its site-packages (a directory listed in a ``.pth`` file is not itself a site directory, so this environment's
editable install of gnivo_trl is not picked up there).
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import gnivo_trl

ROOT = Path(__file__).parents[1]
SDIST_LIMIT_BYTES = 500_000  # the sdist is source text; anything near this means data or build output slipped in


def _run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def distributions(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    # The wheel is built from the sdist (build's default), which checks that the sdist holds everything a build needs.
    _run(
        sys.executable,
        "-m",
        "build",
        "--no-isolation",
        "--skip-dependency-check",
        "--outdir",
        str(out),
        str(ROOT),
        cwd=ROOT,
    )
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_distributions_pass_twine_check(distributions):
    sdist, wheel = distributions
    output = _run(sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel), cwd=ROOT)
    assert output.count("PASSED") == 2


@pytest.mark.slow
def test_version_is_single_sourced(distributions):
    sdist, wheel = distributions
    version = gnivo_trl.__version__
    assert wheel.name.startswith(f"gnivo_trl-{version}-") and sdist.name == f"gnivo_trl-{version}.tar.gz"
    with zipfile.ZipFile(wheel) as archive:
        metadata = Parser().parsestr(archive.read(f"gnivo_trl-{version}.dist-info/METADATA").decode())
    assert metadata["Name"] == "gnivo-trl" and metadata["Version"] == version
    assert any(line.startswith("trl") and "<1.17" in line for line in metadata.get_all("Requires-Dist"))


@pytest.mark.slow
def test_distribution_contents(distributions):
    sdist, wheel = distributions
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    assert top_level == {"gnivo_trl", f"gnivo_trl-{gnivo_trl.__version__}.dist-info"}  # no tests, no examples
    modules = {p.name for p in (ROOT / "gnivo_trl").glob("*.py")}
    with zipfile.ZipFile(wheel) as archive:
        assert modules <= {Path(name).name for name in archive.namelist() if name.startswith("gnivo_trl/")}
    assert sdist.stat().st_size < SDIST_LIMIT_BYTES
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE", "gnivo_trl/__init__.py", "gnivo_trl/losses.py"} <= names
    assert not any(part in name for name in names for part in ("__pycache__", ".pyc", ".venv/", "demo_output"))


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment_and_trains(distributions, tmp_path):
    _, wheel = distributions
    fresh = tmp_path / "fresh-venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(fresh), cwd=tmp_path)
    python = fresh / "bin" / "python"
    fresh_site = Path(
        _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (fresh_site / "_reuse_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel), cwd=tmp_path)

    probe = (
        "import importlib.metadata, json, gnivo_trl; "
        "print(json.dumps({'file': gnivo_trl.__file__, 'version': gnivo_trl.__version__, "
        "'metadata': importlib.metadata.version('gnivo-trl')}))"
    )
    info = json.loads(_run(str(python), "-c", probe, cwd=tmp_path).strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(fresh_site)  # the installed wheel, not the repository checkout
    assert not Path(info["file"]).is_relative_to(ROOT)
    assert info["version"] == info["metadata"] == gnivo_trl.__version__

    # A tiny warm start in a private cache: the default one takes minutes to build.
    _run(
        str(python),
        "-m",
        "gnivo_trl.demo",
        "--steps",
        "2",
        "--warm-start-examples",
        "640",
        "--eval-problems",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / "demo"),
        cwd=tmp_path,
    )
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2


PUBLIC_MODULES = sorted(
    f"gnivo_trl.{path.stem}" for path in (ROOT / "gnivo_trl").glob("*.py") if not path.stem.startswith("_")
)


def test_importing_the_package_leaves_the_environment_alone():
    """No module of the package changes the process: importing every public module in a fresh interpreter, with no
    Hugging Face variable set, sets none (a training script that imports CreditCallback must still reach the Hub)."""
    code = (
        "import json, os; before = dict(os.environ); "
        + "; ".join(f"import {module}" for module in PUBLIC_MODULES)
        + "; after = dict(os.environ)"
        + "; print(json.dumps({k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}))"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "TRANSF"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}
    assert {"gnivo_trl.credit", "gnivo_trl.agent_task", "gnivo_trl.synthetic", "gnivo_trl.demo"} <= set(PUBLIC_MODULES)


def _torch_floor(requirements: list[str]) -> Version:
    """The lowest torch release a list of requirement strings admits (its `>=` bound)."""
    (torch_requirement,) = [Requirement(line) for line in requirements if Requirement(line).name == "torch"]
    (floor,) = [Version(spec.version) for spec in torch_requirement.specifier if spec.operator == ">="]
    return floor


def test_torch_floor_admits_only_trls_fast_projection_path():
    """Below the torch release TRL's kernels check for, TRL's divergence kernel (the exact KL) and its fused head
    project the LM head in full float32 GEMMs instead of bf16 GEMMs with float32 output: several times slower on a
    GPU. The declared floor (pyproject.toml and the installed metadata alike) is at least that release, read from
    TRL's source, so a TRL that raises it fails here."""
    source = Path(importlib.util.find_spec("trl.kernels.chunked_logprob").origin).read_text()
    match = re.search(r'^_MM_OUT_DTYPE = Version\(torch\.__version__\) >= Version\("([0-9.]+)"\)', source, re.M)
    assert match, "TRL's fast-path torch condition moved: find it in trl/kernels/, then update this test and the floor"
    fast_path = Version(match.group(1))
    divergence = Path(importlib.util.find_spec("trl.kernels.chunked_divergence").origin).read_text()
    assert "_MM_OUT_DTYPE" in divergence  # the divergence kernel's projection takes the same path
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = [line for line in importlib.metadata.requires("gnivo-trl") if "extra ==" not in line]
    assert _torch_floor(declared) >= fast_path
    assert _torch_floor(installed) == _torch_floor(declared), "reinstall the package (make venv): stale metadata"
