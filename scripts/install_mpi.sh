#!/usr/bin/env bash
# OpenMPI and what the `mpi` feature builds with (libclang for its bindings, pkg-config), from
# Debian / Ubuntu packages. Needs root (or sudo). Used by .ci/run and scripts/bench_dist.sh.
set -euo pipefail
if command -v mpirun >/dev/null && pkg-config --exists ompi 2>/dev/null; then
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev pkg-config >/dev/null
mpirun --version | head -1
