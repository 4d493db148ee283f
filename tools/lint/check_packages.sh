#!/usr/bin/env bash
# Each workspace package synced on its own (only its declared dependencies) and imported: an undeclared
# dependency fails here rather than in production. Usage: tools/lint/check_packages.sh [uv]
set -euo pipefail
cd "$(dirname "$0")/../.."
UV=${1:-.tools/bin/uv}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
for manifest in libs/*/pyproject.toml services/*/pyproject.toml; do
  dir=$(dirname "$manifest")
  name=$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -1)
  pkg=$(basename "$(find "$dir/src" -mindepth 1 -maxdepth 1 -type d ! -name '__pycache__' | head -1)")
  env="$tmp/$name"
  if ! UV_PROJECT_ENVIRONMENT="$env" "$UV" sync --quiet --locked --no-dev --package "$name" 2>"$tmp/$name.log"; then
    echo "packages: $name: uv sync --package failed"; sed 's/^/    /' "$tmp/$name.log" | grep -v WARNING | tail -5
    fail=1; continue
  fi
  # import every module of the package, so that an import buried in a submodule is checked too
  if ! "$env/bin/python" - "$pkg" <<'PY' 2>"$tmp/$name.err"; then
import importlib, pkgutil, sys
root = importlib.import_module(sys.argv[1])
for mod in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
    if ".tests" in mod.name or mod.name.endswith("__main__"):
        continue
    importlib.import_module(mod.name)
PY
    echo "packages: $name: importing $pkg on its own dependencies failed:"; tail -3 "$tmp/$name.err" | sed 's/^/    /'
    fail=1; continue
  fi
  echo "packages: $name ok"
done
exit $fail
