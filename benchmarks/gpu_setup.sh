# Sourced by the GPU scripts (gpu_tp.sh, gpu_families.sh) from the repository root of the device
# machine: the environment, $OUT, Ray from the carried bundle (.devsite/ray-bundle.tar.xz), the
# committed snapshot to measure when .devsite/head.tar.gz is there (REPO then points at it),
# the tree installed as the package under /tmp/pkg, and the GPUs in $OUT/gpus.txt. Leaves the
# shell in /tmp: Ray puts the driver's cwd on the actors' sys.path, not the bare repo root.
REPO=$PWD
ROOT=$PWD   # the carried tree's root (.devsite), whatever REPO becomes
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -f .devsite/ray-bundle.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .devsite/ray-bundle.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
if [ -f .devsite/head.tar.gz ]; then   # measure a commit, not a tree others edit
  rm -rf /tmp/head && mkdir -p /tmp/head && tar xzf .devsite/head.tar.gz -C /tmp/head
  REPO=/tmp/head
fi
# the tree as the installed package (ringserve.kernels, ringserve.actors)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r "$REPO/ringserve" /tmp/pkg/ringserve \
  && cp -r "$REPO/kernels" /tmp/pkg/ringserve/kernels && cp -r "$REPO/actors" /tmp/pkg/ringserve/actors
export PYTHONPATH=/tmp/pkg:$PYTHONPATH
use_tree() {  # $1: .devsite/<name>.tar.gz (git archive of ringserve kernels actors benchmarks
  # [tests]): unpacked to /tmp/tree_<name>, installed as the package, REPO pointed at it
  local name=${1%.tar.gz}
  rm -rf "/tmp/tree_$name" && mkdir -p "/tmp/tree_$name" \
    && tar xzf "$ROOT/.devsite/$1" -C "/tmp/tree_$name" || return 1
  REPO=/tmp/tree_$name
  rm -rf /tmp/pkg/ringserve && cp -r "$REPO/ringserve" /tmp/pkg/ringserve \
    && cp -r "$REPO/kernels" /tmp/pkg/ringserve/kernels \
    && cp -r "$REPO/actors" /tmp/pkg/ringserve/actors
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
cd /tmp
