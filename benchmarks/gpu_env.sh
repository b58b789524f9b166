# Sourced by the GPU scripts (run_gpu_suite.sh, check_route_cuda.sh): prints the device, makes the package importable
# and, where pytest is missing, installs it from wheels brought along.
nvidia-smi --query-gpu=name,driver_version --format=csv
date -u
if [ -n "${MOE_FASTMASK_SOURCE_VIEW:-}" ] || ! python3 -c "import moe_fastmask.kernels.route" 2>/dev/null; then
    # not installed: use the source tree with kernels/ and csrc/ placed where the package expects them (a fresh
    # copy each time this file is sourced, so that a script that edits the sources and sources it again runs them)
    pkg=$(mktemp -d)
    cp -r moe_fastmask "$pkg/" && cp -r kernels "$pkg/moe_fastmask/kernels" && cp -r csrc "$pkg/moe_fastmask/csrc"
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 MOE_FASTMASK_SOURCE_VIEW="$pkg"
fi
if ! python3 -c "import pytest" 2>/dev/null && [ -n "${PYTEST_WHEELS:-}" ]; then
    # a machine without pytest (and without an index): install it from wheels brought along, for this run only
    site=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target "$site" "$PYTEST_WHEELS"/*.whl \
        && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
