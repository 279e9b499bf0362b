"""services/core keeps its layers and its purity, for every file, however deep.

Layers follow the pipeline: errors <- allocation, routing, cluster <- workload, perf <- placement
<- planning <- sim, serving, control. A layer imports only the layers listed for it (and itself).
No file in core imports a service, the runtime, the generated protos or an I/O library, at module
level or inside a function. ``layer_violations`` reads the import statements (ast), so it needs no
import of the checked code; the last test also imports every module in a fresh interpreter to
catch what a third-party import pulls in.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# layer -> the other layers it may import (a layer always may import itself)
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "allocation": frozenset({"errors"}),
    "routing": frozenset({"errors"}),
    "cluster": frozenset({"errors"}),
    "workload": frozenset({"errors", "cluster"}),
    "perf": frozenset({"errors", "cluster"}),
    "placement": frozenset({"errors", "allocation", "cluster"}),
    "planning": frozenset({"errors", "allocation", "cluster", "workload", "perf", "placement"}),
    "sim": frozenset(
        {"errors", "allocation", "routing", "cluster", "workload", "perf", "placement", "planning"}
    ),
    # the engines a plan asks for (node agents, `scepsy apply`)
    "serving": frozenset(
        {"errors", "allocation", "cluster", "workload", "perf", "placement", "planning"}
    ),
    # the control loop's decisions (re-plan on drift)
    "control": frozenset(
        {"errors", "allocation", "cluster", "workload", "perf", "placement", "planning"}
    ),
}
# top-level modules that mean I/O or plumbing; core must not import them anywhere
FORBIDDEN = frozenset(
    {
        "grpc",
        "grpc_health",
        "grpc_status",
        "google",
        "redis",
        "pynvml",
        "asyncio",
        "aiohttp",
        "socket",
        "subprocess",
        "threading",
        "protos",
        "matplotlib",
        "prometheus_client",
        "structlog",
    }
)
# what of the rest of the repository core must not import
OUTSIDE = ("runtime", "agent", "profiler", "planner", "placer", "router", "cli")


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, relative ones resolved."""
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append((node.lineno, base))
            # ``from pkg import sub`` may name a submodule: count it as imported too
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def layer_of(module: str, core: str) -> str | None:
    """The layer of a module under ``core`` (its first component), None for ``core`` itself."""
    rest = module.removeprefix(core + ".")
    return None if module == core else rest.split(".")[0]


def layer_violations(root: Path, core: str) -> list[str]:
    """Every import in the tree at ``root`` (the package ``core``) against the rules above."""
    top = core.split(".", maxsplit=1)[0]
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        is_package = rel.name == "__init__"
        parts = rel.parts[:-1] if is_package else rel.parts
        module = ".".join([core, *parts])
        own = layer_of(module, core)
        if own is not None and own not in ALLOWED:
            problems.append(f"{path}: layer {own!r} is not declared in ALLOWED")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        reported: set[int] = set()  # one problem per import statement
        for line, name in imported_modules(tree, module, is_package):
            where = f"{path.relative_to(root)}:{line}"
            if line in reported:
                continue
            before = len(problems)
            if name.split(".")[0] in FORBIDDEN:
                problems.append(f"{where}: imports {name} (core is pure)")
            elif name.startswith(core + "."):
                target = layer_of(name, core)
                if own is None or target is None or target == own:
                    continue
                if target not in ALLOWED.get(own, frozenset()):
                    problems.append(f"{where}: {own} imports {name} (against the direction)")
            elif name.startswith(top + ".") and name.split(".")[1] in OUTSIDE:
                problems.append(f"{where}: imports {name} (core imports no service or runtime)")
            if len(problems) > before:
                reported.add(line)
    return problems


def test_core_keeps_its_layers_and_purity() -> None:
    assert layer_violations(REPO / "services/core", "services.core") == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "app/core" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in [root / "app", *(p for p in (root / "app").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return root / "app/core"


def test_an_import_against_the_direction_is_found(tmp_path: Path) -> None:
    core = _tree(
        tmp_path,
        {
            "errors.py": "class E(Exception): ...\n",
            "allocation.py": "from app.core.errors import E\n",
            "planning/alp.py": "from app.core.allocation import Allocation\n",
            "planning/search.py": "from .alp import predict\n",  # same layer: fine
            # placement may not see planning, neither directly nor relatively, nor in a function
            "placement/heuristic.py": "from app.core.planning.alp import Allocation\n",
            "placement/rules.py": "def f():\n    from ..planning import search\n",
        },
    )
    problems = layer_violations(core, "app.core")
    assert len(problems) == 2, problems
    assert "placement/heuristic.py:1: placement imports app.core.planning.alp" in problems[0]
    assert "placement/rules.py:2: placement imports app.core.planning" in problems[1]


def test_io_and_services_in_core_are_found(tmp_path: Path) -> None:
    core = _tree(
        tmp_path,
        {
            "errors.py": "",
            "cluster/inventory.py": "import grpc\n",
            "perf/model.py": "def f():\n    import redis.asyncio\n",
            "sim/run.py": "from app.runtime.store import Store\n",
            "workload/spec.py": "import yaml\nimport numpy as np\n",  # allowed libraries
        },
    )
    problems = layer_violations(core, "app.core")
    assert [p.split(": ", 1)[1] for p in problems] == [
        "imports grpc (core is pure)",
        "imports redis.asyncio (core is pure)",
        "imports app.runtime.store (core imports no service or runtime)",
    ]


def test_an_undeclared_layer_is_found(tmp_path: Path) -> None:
    core = _tree(tmp_path, {"errors.py": "", "misc/helpers.py": ""})
    assert any("layer 'misc' is not declared" in p for p in layer_violations(core, "app.core"))


def test_importing_all_of_core_loads_no_io_library() -> None:
    """What the ast check cannot see: a library that core imports pulling in I/O itself."""
    import services.core

    modules = sorted(
        m.name for m in pkgutil.walk_packages(services.core.__path__, "services.core.")
    )
    assert "services.core.planning.plan" in modules and "services.core.sim.systems" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"services.core pulled in: {out.stdout.strip()}"
