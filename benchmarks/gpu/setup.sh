# Sourced by the GPU scripts (run from the repo root on the GPU box, NIXL wheels in .whl/;
# see README "Installing"): installs the wheels into /tmp/site without touching the box's
# torch, links the repo in as the `layoutc` package, and exports the environment.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/layoutc
for d in compiler runtime grammar specs tools connectors; do ln -sfn "$PWD/$d" /tmp/site/layoutc/$d; done
cp compiler/pkg/__init__.py compiler/pkg/__main__.py /tmp/site/layoutc/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NIXL_LOG_LEVEL=WARN
# NVLink multicast off in every process (the runtime and its workers set it too)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
