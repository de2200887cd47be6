import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "cluster" / "local-cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real local SLURM cluster (2 emulated nodes, partitions debug + urgent) for the whole test session;
    SLURM_CONF points the clients at it. Its own state dir and ports, so a developer's cluster keeps running."""
    if shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed: run cluster/local-cluster.sh install (CI: .ci/install-system.sh)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_PORT_BASE": "46817"}
    subprocess.run([str(LOCAL_CLUSTER), "start"], env=env, check=True, timeout=60)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    yield state
    subprocess.run([str(LOCAL_CLUSTER), "stop"], env=env, timeout=60)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
