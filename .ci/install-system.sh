#!/usr/bin/env bash
# System packages the test suite needs, on a fresh Debian 12 as root. Idempotent: each step skips itself
# when already done. One section per need.
set -euo pipefail
cd "$(dirname "$0")/.."

# Local SLURM cluster (slurmctld + slurmd + munge) for tests/cluster: the tests start and stop it themselves.
cluster/local-cluster.sh install
