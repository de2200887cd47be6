"""bench/kernels.py's end-to-end decode on the tiny shape: every runner (HF fp32, packed HF generate, qat decoder with
the fp32 and the int8 head, llama.cpp on qat's TQ2_0 / TQ1_0 export) decodes the same number of tokens, and the
ratios and breakdown it reports are printed."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.kernels]


def test_end_to_end_decode_runs_every_runner_on_the_tiny_shape():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), "--skip-kernels", "--threads", "1",
                             "--reps", "3", "--e2e-models", "tiny", "--e2e-tokens", "4"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^CPU .+, flags .*avx2", out, re.M)
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \| [\d.]+x \|$", out, re.M))
    assert set(rows) == {"HF fp32", "packed ternary, HF generate", "packed ternary, qat decoder",
                         "packed ternary, qat decoder, int8 head", "llama.cpp TQ2_0", "llama.cpp TQ1_0",
                         "packed binary, HF generate", "packed binary, qat decoder"}
    assert all(float(tps) > 0 for tps in rows.values())
    assert re.search(r"^packed ternary, qat decoder / llama.cpp TQ2_0: [\d.]+x$", out, re.M)
    assert re.search(r"^\| ternary, int8 head \|( [\d.-]+ \|){4}$", out, re.M)
    # Teacher forcing: both runtimes compute the same function of the same ids (llama.cpp's Q8_K activations and fp16
    # scales differ from qat's per-token int8 by a few % of the logits on a random model; an export that scrambled
    # a tensor differs by ~100%).
    forced = re.search(r"^Same ids fed to both .*: next-token argmax equal at (\d+) of (\d+) positions; max \|logit "
                       r"difference\| ([\d.e+-]+) of the largest", out, re.M)
    assert forced, out[-2000:]
    assert int(forced.group(2)) == 4 and float(forced.group(3)) < 0.2
