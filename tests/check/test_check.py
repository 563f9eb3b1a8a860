"""`fastemp check`: the command line, and that the checks can fail (tests/check/test_cases.py runs every case).

tests/conftest.py sets TRITON_INTERPRET=1, so the Triton kernel runs in the interpreter and the
`cos_to_mean` and fused-loss rows run rather than skip.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import fastemp.kernels.cosine_to_mean as ctm
from fastemp import check, losses
from fastemp.check import augment as check_augment
from fastemp.check import core as check_core
from fastemp.check import training as check_training
from fastemp.cli import main
from fastemp.config import DataConfig


def run_cli(tmp_path, *extra):
    out = tmp_path / "check.json"
    rc = main(["check", "--device", "cpu", "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    """The command line around run_checks (tests/check/test_cases.py runs every case's rows)."""
    rc, doc = run_cli(tmp_path, "--quick", "--only", "prefetch,lars")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert doc["passed"] is True and doc["device"] == "cpu" and doc["quick"] and doc["only"] == ["prefetch", "lars"]
    assert isinstance(doc["seed"], int) and f"seed {doc['seed']}" in printed
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["triton"] and env["device_name"] and "dali" in env
    assert set(doc["check_seconds"]) == {"prefetch", "lars"}
    rows = doc["results"]
    ops = ["prefetch taken", "prefetch other key"] + ["lars params", "lars momentum"] * 2 + ["lars fused"]
    assert [r["op"] for r in rows] == ops
    assert doc["counts"] == {"pass": len(rows) - 1, "FAIL": 0, "skipped": 1}  # --quick: no compiled LARS
    for r in rows[:-1]:
        assert r["status"] == "pass" and 0 <= r["err"] <= r["tol"] and r["shape"] and r["dtype"] == "fp32", r
    # the printed table has a row per result and a summary line
    assert printed.count(" pass ") == len(rows) - 1 and "OK:" in printed


@pytest.mark.parametrize("target", ["tcr", "cosine_to_mean"])
def test_a_broken_fast_path_fails(tmp_path, monkeypatch, capsys, target):
    """A fast path off by 0.1% (well above every tolerance for values) is caught: FAIL rows, exit 1."""
    if target == "tcr":
        real = losses.total_coding_rate
        monkeypatch.setattr(losses, "total_coding_rate", lambda z, eps=0.2: real(z, eps) * 1.001)
    else:
        real = ctm.cosine_to_mean
        monkeypatch.setattr(ctm, "cosine_to_mean", lambda p: (real(p)[0] * 1.001, real(p)[1]))
    rc, doc = run_cli(tmp_path, "--quick", "--only", target)
    assert rc == 1 and doc["passed"] is False
    failed = {r["op"] for r in doc["results"] if r["status"] == "FAIL"}
    assert failed == ({"tcr value", "tcr grad"} if target == "tcr" else {"cos_to_mean loss", "cos_to_mean grad"})
    assert "FAILED:" in capsys.readouterr().out


def test_a_crashing_check_is_a_failure_and_nan_never_passes(tmp_path, monkeypatch):
    def boom(z, eps=0.2):
        raise RuntimeError("cholesky exploded")

    monkeypatch.setattr(losses, "total_coding_rate", boom)
    rc, doc = run_cli(tmp_path, "--quick", "--only", "tcr")
    assert rc == 1 and doc["results"][0]["status"] == "FAIL" and "cholesky exploded" in doc["results"][0]["note"]

    ref = torch.ones(4)
    nan = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    assert check.compare("x", (4,), "fp32", nan, ref, tol=math.inf).status == "FAIL"
    assert check.compare("x", (4,), "fp32", ref, nan, tol=math.inf).status == "FAIL"
    assert check.compare("x", (4,), "fp32", ref * (1 + 1e-6), ref, tol=1e-5).status == "pass"
    assert check.compare("x", (4,), "fp32", ref * (1 + 1e-4), ref, tol=1e-5).status == "FAIL"
    assert check.compare("x", (4,), "fp32", ref[:3], ref, tol=1.0).status == "FAIL"  # shape mismatch


def test_compile_criterion_compiled_no_worse_than_eager():
    """CUDA compile rows: compiled and eager bf16 both against a float64 reference; compiled may be at
    most COMPILE_BF16_FACTOR x eager's error (+ floor) off it. Pure tensors, no model."""
    factor, floor = check_core.COMPILE_BF16_FACTOR, check_core.COMPILE_BF16_FLOOR
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(10_000, generator=gen, dtype=torch.float64)

    def off_by(scale):  # ref with relative-norm error ~scale
        return ref + scale * torch.randn(10_000, generator=gen, dtype=torch.float64)

    def row(out, eager, reference=ref):
        return check_core.compare_with_baseline("compile h", (10_000,), "bf16-amp", out, eager, reference, "eager")

    eager = off_by(1e-2)
    same = row(off_by(1e-2), eager)  # another rounding pattern, the same size of error
    assert same.status == "pass" and same.err == pytest.approx(1e-2, rel=0.05)
    assert same.tol == pytest.approx(factor * 1e-2 + floor, rel=0.05) and same.note.startswith("eager err 1.0")
    assert row(ref, eager).status == "pass"  # more accurate than eager is fine
    assert row(off_by(1e-1), eager).status == "FAIL"  # 10x eager's error
    assert row(ref, ref).status == "pass" and row(off_by(5e-5), ref).status == "pass"  # the floor
    nan = ref.clone()
    nan[7] = math.nan
    assert row(nan, eager).status == "FAIL"
    assert row(off_by(1e-2), nan).status == "FAIL" and "non-finite" in row(off_by(1e-2), nan).note
    assert row(off_by(1e-2), eager, nan).status == "FAIL"


TINY_BF16_CASE = dict(
    model=dict(width=4, hidden_dim=32, z_dim=16),
    n=4,
    batch=8,
    size=16,
    dtype=torch.float32,
    amp=torch.bfloat16,
    channels_last=False,
)


def test_compile_bf16_pipeline_runs_on_cpu_without_compiling():
    """The CUDA branch of the compile check (autocast + float64 reference) on CPU bf16 autocast, with the
    eager model standing in for the compiled one: the three-way step runs and passes; a "compiled"
    forward with the wrong semantics (BatchNorm in eval mode) fails."""

    def ctx():
        return check_core.Context(torch.device("cpu"), False, torch.Generator().manual_seed(0))

    rows = check_training.compile_rows(ctx(), TINY_BF16_CASE, compile_fn=lambda m: m)
    assert [r.op for r in rows] == ["compile h", "compile p", "compile grads", "compile BN stats"]
    assert all(r.status == "pass" and r.dtype == "bf16-amp" for r in rows), rows
    for r in rows:  # identical computations: the same error as eager, which is bf16-sized (not 0)
        assert f"eager err {r.err:.2e}" in r.note
        assert r.tol == pytest.approx(check_core.COMPILE_BF16_FACTOR * r.err + check_core.COMPILE_BF16_FLOOR)
    assert 1e-3 < rows[0].err < 0.2 and "worst tensor" in rows[2].note

    def eval_mode(module):
        def forward(x):
            module.eval()
            try:
                return module(x)
            finally:
                module.train()

        return forward

    broken = {r.op: r.status for r in check_training.compile_rows(ctx(), TINY_BF16_CASE, compile_fn=eval_mode)}
    assert broken["compile h"] == broken["compile p"] == broken["compile BN stats"] == "FAIL"


def test_a_broken_prefetch_fails(tmp_path, monkeypatch):
    """Prefetched patches that are not the ones made afresh (as a missed event wait would leave them), or a take
    that ignores the key, fail their rows."""
    from fastemp.patches import prefetch, torch_backend

    real_start = torch_backend.TorchPatches.start

    def stale_start(self, request):
        patches, event = real_start(self, request)
        patches[:, :, :2] = 0.0  # rows not yet written when they are read
        return patches, event

    monkeypatch.setattr(torch_backend.TorchPatches, "prefetch", lambda self, key, request: None)
    rc, doc = run_cli(tmp_path, "--only", "prefetch")  # nothing prefetched: every take made afresh, still equal
    assert rc == 0
    monkeypatch.undo()
    real_prefetch = prefetch.PatchBackend.prefetch

    def stale_prefetch(self, key, request):
        real_prefetch(self, key, request)
        self._ahead[key] = stale_start(self, request)

    monkeypatch.setattr(torch_backend.TorchPatches, "prefetch", stale_prefetch)
    rc, doc = run_cli(tmp_path, "--only", "prefetch")
    assert rc == 1 and {r["op"]: r["status"] for r in doc["results"]}["prefetch taken"] == "FAIL"
    monkeypatch.undo()
    real_take = prefetch.PatchBackend.take

    def take_ignoring_key(self, key, request):  # hands out whatever is in flight, whatever the key
        if self._ahead:
            return self.finish(self._ahead.pop(next(iter(self._ahead))))
        return real_take(self, key, request)

    monkeypatch.setattr(torch_backend.TorchPatches, "take", take_ignoring_key)
    rc, doc = run_cli(tmp_path, "--only", "prefetch")
    statuses = {r["op"]: r["status"] for r in doc["results"]}
    assert rc == 1 and statuses == {"prefetch taken": "pass", "prefetch other key": "FAIL"}


def test_eval_forward_cuda_branch_runs_on_cpu_and_catches_a_wrong_compiled_forward(tmp_path, monkeypatch):
    """The CUDA branch of eval_forward (bf16 autocast, channels_last, compiled vs eager bf16 vs the fp32 loop) at
    tiny sizes on CPU bf16 autocast, torch.compile standing in as the identity: passes; a "compiled" encoder 20%
    off fails; and a feature extraction on the wrong patches fails the CPU branch."""
    import fastemp.evaluate

    tiny = check_augment.eval_case(torch.device("cpu"))
    model = dataclasses.replace(tiny["config"].model, precision="bf16", compile="default")
    as_cuda = dataclasses.replace(tiny["config"], model=model, data=DataConfig(patch_compile="on"))
    monkeypatch.setattr(check_augment, "eval_case", lambda device: {**tiny, "config": as_cuda})
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    rc, doc = run_cli(tmp_path, "--only", "eval_forward")
    (row,) = doc["results"]
    assert rc == 0 and row["dtype"] == "bf16-amp" and row["note"].startswith("eager bf16 err") and row["err"] > 1e-4
    monkeypatch.setattr(torch, "compile", lambda f, **kw: (lambda x: f(x) * 1.2) if kw.get("mode") else f)
    rc, doc = run_cli(tmp_path, "--only", "eval_forward")
    assert rc == 1 and doc["results"][0]["status"] == "FAIL"
    monkeypatch.setattr(check_augment, "eval_case", lambda device: tiny)
    real = fastemp.evaluate.make_patch_backend

    class OtherSeeds:  # the right images, the wrong draws
        def __init__(self, inner):
            self.inner = inner

        def take(self, key, request):
            return self.inner.take(key, request._replace(seed=request.seed + 1))

        def prefetch(self, key, request):
            self.inner.prefetch(key, request._replace(seed=request.seed + 1))

    monkeypatch.setattr(fastemp.evaluate, "make_patch_backend", lambda *a, **kw: OtherSeeds(real(*a, **kw)))
    rc, doc = run_cli(tmp_path, "--only", "eval_forward")
    assert rc == 1 and doc["results"][0]["status"] == "FAIL" and doc["results"][0]["dtype"] == "fp32"


def test_skips_are_visible_and_not_failures(tmp_path, monkeypatch, capsys):
    import fastemp.patches

    monkeypatch.setattr(fastemp.patches, "dali_available", lambda: False)
    monkeypatch.setattr(ctm, "triton_usable", lambda device: False)
    rc, doc = run_cli(tmp_path, "--quick", "--only", "augment,cosine_to_mean,compile")
    assert rc == 0 and doc["passed"] is True
    assert [r["status"] for r in doc["results"]] == ["skipped"] * 3
    assert all(r["note"] for r in doc["results"])  # the reason is given
    assert capsys.readouterr().out.count("skipped") >= 3


def test_seed_replays_the_same_inputs(tmp_path):
    _, a = run_cli(tmp_path, "--quick", "--only", "tcr", "--seed", "1234")
    _, b = run_cli(tmp_path, "--quick", "--only", "prefetch,tcr", "--seed", "1234")
    assert a["seed"] == b["seed"] == 1234
    mine = [r for r in b["results"] if r["op"].startswith("tcr")]
    assert [r["err"] for r in a["results"]] == [r["err"] for r in mine]  # independent of the other checks
    assert b["results"][0]["op"].startswith("prefetch")  # in the order named
    _, c = run_cli(tmp_path, "--quick", "--only", "tcr")
    assert c["seed"] != 1234 and [r["err"] for r in c["results"]] != [r["err"] for r in a["results"]]


def test_bad_arguments(tmp_path):
    with pytest.raises(Exception, match="unknown check"):
        check.run_checks("cpu", only=["nope"])
    if not torch.cuda.is_available():
        assert main(["check", "--device", "cuda"]) == 2  # a one-line error, not a traceback
