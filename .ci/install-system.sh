#!/usr/bin/env bash
# System packages the test suite needs, on a fresh Debian 12 as root. Idempotent: each step skips itself
# when already done. One section per need.
set -euo pipefail
cd "$(dirname "$0")/.."

# Local SLURM cluster (slurmctld + slurmd + munge) for tests/cluster: the tests start and stop it themselves.
cluster/local-cluster.sh install

# Python 3.11 documentation sources: one corpus of the evaluation suite (qat/data/corpora.py).
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  apt-get install -y python3.11-doc || { apt-get update -qq && apt-get install -y python3.11-doc; }
fi
