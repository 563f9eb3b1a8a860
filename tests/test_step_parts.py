"""benchmarks/step_parts.py on the CPU at toy sizes, without its compiled paths (timings never asserted)."""

import torch

from fastemp.benchmarks import step_parts
from fastemp.config import ModelConfig


def test_step_parts_rows_and_report():
    cpu = torch.device("cpu")
    rows = step_parts.lars_rows(cpu, 1, 2, ModelConfig(width=4, hidden_dim=16, z_dim=8), fused=False)
    rows += step_parts.patch_rows(cpu, 2, 4, 1, 2, compiled=(False,))
    assert [(r["part"], r["path"].split()[0]) for r in rows] == [
        ("lars", "reference"),
        ("lars", "eager"),
        ("patches", "eager"),
    ]
    assert all(r["median_s"] > 0 and r["iters"] == 2 for r in rows) and rows[-1]["patches"] == 8
    text = step_parts.markdown(
        {"environment": {"device": "cpu", "torch": torch.__version__}, "n": 2, "batch": 4, "rows": rows}
    )
    assert text.count("| lars ") == 2 and "| patches " in text
