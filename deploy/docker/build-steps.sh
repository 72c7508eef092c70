#!/usr/bin/env bash
# The Dockerfiles' build steps without Docker, for CI:
#   1. copy what the Dockerfiles COPY (pyproject.toml, README.md, the three packages) into a
#      scratch folder and build the project wheel there (pip wheel --no-deps);
#   2. create a fresh virtualenv and install the wheel with --no-deps: the dependencies come
#      from the Python this runs with (the test environment), so no download is needed;
#   3. run the Dockerfiles' smoke checks with the venv's commands: edge-agent --version,
#      cloud-hub --help, the web templates shipped as package data, and edge-agent
#      check-config on the k3s base ConfigMap's TOML.
# Exits non-zero at the first failure; the source tree is not written to.
#
# Usage: deploy/docker/build-steps.sh [PYTHON]     (default: $PYTHON, then python3)
#        KEEP=1 keeps the scratch folder (printed at the end).
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
config="$root/deploy/k3s/base/edge-agent.toml"

die() { echo "build-steps: $*" >&2; exit 1; }
step() { echo "build-steps: $*"; }

command -v "$PY" > /dev/null 2>&1 || [ -x "$PY" ] || die "no python at '$PY' (give it as the argument or \$PYTHON)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is older than Python 3.11"
[ -f "$config" ] || die "missing $config"

work="$(mktemp -d "${TMPDIR:-/tmp}/edge-build-steps.XXXXXX")"
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "build-steps: kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

# 1. the wheel, built from a copy of exactly what the Dockerfiles COPY
step "copying the sources the Dockerfiles copy"
mkdir -p "$work/src" "$work/wheels"
cp "$root/pyproject.toml" "$root/README.md" "$work/src/"
for pkg in edge_agent cloud_hub hub_protocol; do
    cp -R "$root/$pkg" "$work/src/$pkg"
done
find "$work/src" -name __pycache__ -type d -prune -exec rm -rf {} +

# Build without isolation when this Python already has what pyproject's build-system needs
# (setuptools >= 68 able to write wheels): then nothing is downloaded. Otherwise pip fetches
# the build backend into an isolated environment, as `docker build` does.
isolation=(--no-build-isolation)
how="without build isolation (offline)"
if ! "$PY" - <<'PYCHECK'
import sys
try:
    import setuptools
except ImportError:
    sys.exit(1)
major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
if major < 68:
    sys.exit(1)
if (major, minor) < (70, 1):  # bdist_wheel moved into setuptools in 70.1
    try:
        import wheel  # noqa: F401
    except ImportError:
        sys.exit(1)
PYCHECK
then
    isolation=()
    how="in an isolated build environment (pip fetches the build backend)"
fi
step "building the wheel, $how"
"$PY" -m pip wheel --no-deps --disable-pip-version-check -q ${isolation[@]+"${isolation[@]}"} -w "$work/wheels" "$work/src" \
    || die "pip wheel failed"
wheels=("$work"/wheels/edge_agent-*.whl)
[ -f "${wheels[0]}" ] || die "no edge_agent wheel was built"
whl="${wheels[0]}"
step "built $(basename "$whl")"

# 2. a fresh venv that sees the test environment's packages, and the wheel in it
step "creating a virtualenv and installing the wheel (--no-deps)"
"$PY" -m venv --system-site-packages "$work/venv" || die "python -m venv failed"
venv_py="$work/venv/bin/python"
# --system-site-packages shows the *base* interpreter's packages. When $PY is itself a venv
# (make test's .venv), its site-packages hold the dependencies: list them in a .pth file.
# A path in a .pth file is only appended to sys.path; the .pth files inside it (such as an
# editable install's import hook for this very project) are not run, so the wheel's copy is
# the one imported.
purelib="$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if p))' \
    > "$purelib/zz-test-environment.pth"
"$venv_py" -m pip install --no-deps --no-index --disable-pip-version-check -q "$whl" \
    || die "installing the wheel failed"

# 3. the smoke checks, from a neutral folder with a clean environment (no EDGE_* variables,
#    and no source checkout on sys.path)
run() {
    (cd "$work" && env -i PATH="$work/venv/bin:/usr/local/bin:/usr/bin:/bin" HOME="$work" \
        LANG=C.UTF-8 "$@")
}
step "checking the installed package comes from the wheel"
run python -c '
import sys, edge_agent, cloud_hub, hub_protocol
for m in (edge_agent, cloud_hub, hub_protocol):
    if not m.__file__.startswith(sys.prefix):
        sys.exit(f"{m.__name__} imported from {m.__file__}, not from the venv {sys.prefix}")
' || die "the venv does not import the installed wheel"
step "edge-agent --version"
run edge-agent --version || die "edge-agent --version failed"
step "cloud-hub --help"
run cloud-hub --help > /dev/null || die "cloud-hub --help failed"
step "package data (web templates)"
run python -c "import edge_agent.web, importlib.resources as r; assert (r.files('edge_agent.web') / 'templates' / 'study.html').is_file()" \
    || die "edge_agent/web/templates/study.html is not in the wheel"
step "edge-agent check-config --config deploy/k3s/base/edge-agent.toml"
run edge-agent check-config --config "$config" || die "check-config refused $config"
step "all build steps passed"
