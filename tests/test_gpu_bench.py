"""bench/gpu.py, the GPU check handed to accelerator hosts: its `--tiny` CPU smoke runs end to end.

The numbers themselves are speed and belong to the bench; the test checks that every section ran and that
what it states about the model is true.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_runs_on_cpu_and_reports_every_section() -> None:
    from models.sizing import count_spec_params, profile_specs
    from tinymars.profile import load_profile

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    tiny = load_profile("tiny", [])
    native = next(s for s in profile_specs(tiny).values() if s["arch"] == "native")
    params = count_spec_params(native, vocab_size=tiny.tokenizer.vocab_size, seq_len=tiny.pack.seq_len,
                               channel_names=tiny.channels.names, channel_dim=tiny.channels.max_dim)
    assert re.search(rf"^device: cpu; profile tiny: native model {params / 1e6:.2f}M params", out, re.M), out
    assert "MFU n/a" in out  # no bf16 peak on a CPU: the MFU is not made up
    assert "DDP: skipped, 1 GPU visible" in out

    def rate(label: str) -> float:
        m = re.search(rf"{re.escape(label)}.*?: ([\d,.]+) (?:real )?tokens/s", out)
        assert m, f"no '{label}' line in:\n{out}"
        return float(m.group(1).replace(",", ""))

    for label in ("1 process", "generation, kv cache (batch 4 x 8 new tokens)",
                  "generation, kv cache, fixed shape", "held-out target loss"):
        assert math.isfinite(rate(label)) and rate(label) > 0
    assert re.search(r"peak process RSS \d+\.\d\d GiB", out)

