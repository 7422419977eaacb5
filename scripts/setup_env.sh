#!/usr/bin/env bash
# Creates .venv (if missing) and installs torch==2.13.0 and this package (editable) into it.
#
#   bash scripts/setup_env.sh          # test mode (default): + the test extras (what scripts/test.sh
#                                      #   and .ci/run need: pytest, torchjd, transformers, ...)
#   bash scripts/setup_env.sh demo     # demo mode: + numpy only (what scripts/demo.sh needs)
#
# Idempotent: when .venv/.setup-stamp records this mode (or test mode, which includes the demo's
# packages) for the same pyproject.toml, torch version and Python, nothing is installed. A venv set
# up in demo mode gets the test extras on the first test-mode call.
# Installs with uv (pinned, installed into .venv by pip) when possible, with pip otherwise
# (SETUP_INSTALLER=pip forces pip); uv is given pip's configured find-links, indexes and
# constraints. torch is pinned: never leave it open (an open range can pull GBs of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-test}
case $MODE in
    test) extras="[test]" ;;
    demo) extras="[demo]" ;;
    *) echo "usage: bash scripts/setup_env.sh [test|demo]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
UV_VERSION=0.13.9
STAMP=.venv/.setup-stamp
start=$SECONDS

fingerprint() {
    # What the install depends on: the dependency declarations, torch's pin and the interpreter.
    local python_version
    python_version=$(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')
    printf '%s torch=%s python=%s\n' "$(sha256sum pyproject.toml | cut -d' ' -f1)" \
        "$TORCH_VERSION" "$python_version"
}
step() { echo "setup [$((SECONDS - start))s]: $*"; }

if [ -x .venv/bin/python ] && [ -f "$STAMP" ]; then
    read -r stamped_mode stamped_print < "$STAMP" || true
    if [ "$stamped_print" = "$(fingerprint)" ] && { [ "$stamped_mode" = "$MODE" ] || [ "$stamped_mode" = test ]; }; then
        echo "setup: .venv is up to date ($stamped_mode mode; delete .venv/.setup-stamp to reinstall)"
        exit 0
    fi
fi

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
rm -f "$STAMP"
packages=("torch==${TORCH_VERSION}" -e ".${extras}")

installer=${SETUP_INSTALLER:-uv}
if [ "$installer" = uv ] && [ ! -x .venv/bin/uv ]; then
    step "installing uv==${UV_VERSION} into .venv (the fast installer)"
    if ! .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on \
        "uv==${UV_VERSION}"; then
        step "uv could not be installed: using pip"
        installer=pip
    fi
fi

step "installing ${packages[*]} with $installer ($MODE mode)"
if [ "$installer" = uv ]; then
    # uv does not read pip's configuration: pass on its find-links, indexes and constraints, and
    # pick the best version over all indexes, as pip does (uv's default stops at the first index
    # that has the package at all).
    uv_args=(--index-strategy unsafe-best-match)
    while IFS= read -r line; do
        key=${line%%=*}
        value=${line#*=}
        value=${value#\'}
        value=${value%\'}
        case $key in
            *.find-links) for v in $value; do uv_args+=(--find-links "$v"); done ;;
            *.index-url) uv_args+=(--index-url "$value") ;;
            *.extra-index-url) for v in $value; do uv_args+=(--extra-index-url "$v"); done ;;
            *.constraint) for v in $value; do [ -e "$v" ] && uv_args+=(--constraint "$v"); done ;;
        esac
    done < <(.venv/bin/python -m pip config list 2>/dev/null || true)
    # Bytecode is compiled at install time, as pip does: with PYTHONDONTWRITEBYTECODE set, every
    # process would otherwise recompile torch's modules at each import.
    .venv/bin/uv pip install --python .venv/bin/python --compile-bytecode "${uv_args[@]}" \
        "${packages[@]}"
else
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on "${packages[@]}"
fi
printf '%s %s\n' "$MODE" "$(fingerprint)" > "$STAMP"
step "done ($MODE mode)"
