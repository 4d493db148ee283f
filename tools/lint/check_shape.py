"""The shape every service keeps, for what import-linter cannot see (make lint).

- the five `src/<package>/` trees have the same top-level names;
- SQL (asyncpg calls) only under `adapters/` (and `migrations/`) of a service;
- the environment is read only in settings modules (`config.py`, `settings.py`) and the harness;
- no YAML is read at import time (a module-level `yaml.safe_load`).
Exits non-zero naming every offence.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKELETON = {
    "__init__.py",
    "__main__.py",
    "app.py",
    "config.py",
    "domain",
    "adapters",
    "service_layer",
    "entrypoints",
    "migrations",
    "seed",
}
REQUIRED = {
    "__init__.py",
    "__main__.py",
    "app.py",
    "config.py",
    "domain",
    "adapters",
    "service_layer",
    "entrypoints",
    "migrations",
}
SQL_CALL = re.compile(r"\.(execute|executemany|fetch|fetchrow|fetchval|copy_records_to_table)\(")
ENV_READ = re.compile(r"\bos\.(environ|getenv)\b")


def packages() -> list[Path]:
    return sorted(p for p in (ROOT / "services").glob("*/src/*_service") if p.is_dir())


def top_level(pkg: Path) -> set[str]:
    return {p.name for p in pkg.iterdir() if p.name != "__pycache__"}


def loads_yaml_at_import(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:  # module-level statements only (inside functions is fine)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for sub in ast.walk(node):
            func = sub.func if isinstance(sub, ast.Call) else None
            if (
                isinstance(func, ast.Attribute)
                and func.attr in {"safe_load", "load"}
                and isinstance(func.value, ast.Name)
                and func.value.id == "yaml"
            ):
                return True
    return False


def main() -> int:
    problems: list[str] = []
    pkgs = packages()
    shapes = {pkg: top_level(pkg) for pkg in pkgs}
    for pkg, names in shapes.items():
        rel = pkg.relative_to(ROOT)
        missing = REQUIRED - names
        extra = names - SKELETON
        if missing:
            problems.append(f"{rel}: missing {sorted(missing)}")
        if extra:
            problems.append(f"{rel}: outside the skeleton {sorted(extra)}")
    for path in sorted((ROOT / "services").glob("*/src/**/*.py")):
        rel = path.relative_to(ROOT)
        text = path.read_text()
        parts = set(rel.parts)
        if SQL_CALL.search(text) and not parts & {"adapters", "migrations"}:
            problems.append(f"{rel}: SQL outside adapters/")
        if ENV_READ.search(text) and path.name not in {"config.py", "settings.py"}:
            problems.append(f"{rel}: environment read outside config.py")
        if loads_yaml_at_import(path):
            problems.append(f"{rel}: YAML loaded at import time")
    for path in sorted((ROOT / "libs").glob("*/src/**/*.py")):
        rel = path.relative_to(ROOT)
        if "v2v_harness" in rel.parts:
            continue  # the harness is the tool that sets the environment up
        if ENV_READ.search(path.read_text()) and path.name not in {"config.py", "settings.py"}:
            problems.append(f"{rel}: environment read outside a settings module")
        if loads_yaml_at_import(path):
            problems.append(f"{rel}: YAML loaded at import time")
    for p in problems:
        print(f"shape: {p}")
    if problems:
        return 1
    print(f"shape: {len(pkgs)} services share one skeleton; SQL only in adapters; settings only in config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
