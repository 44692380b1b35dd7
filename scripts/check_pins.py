"""Fail if an installed package's version differs from its pin in constraints.txt (or it is missing).

Run by .ci/run after installing, so CI tests exactly what the README's commands install on a
fresh machine: ``python scripts/check_pins.py [constraints.txt]``.
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement


def mismatches(constraints: Path) -> list[str]:
    """One line per pinned package whose installed version is not the pinned one."""
    problems = []
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req.name}: pinned {req.specifier}, not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name}: pinned {req.specifier}, installed {installed}")
    return problems


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "constraints.txt")
    problems = mismatches(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{path.name}: {'all pins match' if not problems else f'{len(problems)} mismatch(es)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
