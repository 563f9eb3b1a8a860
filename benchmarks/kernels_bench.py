"""`fastemp bench kernels`: the loss kernels and the augmentation backends, one at a time.

Over a grid of n (patches per image), B (images) and d (projection size), default
n in {20, 50, 200}, B in {100, 256}, d = 1024:

    cosine_to_mean   invariance term, forward + backward from raw p (n, B, d) (bf16 on GPU, fp32 CPU):
                     Triton kernel vs eager torch (F.normalize + cosine_similarity to the mean, as
                     fastemp's unfused path) vs the same function under torch.compile
    tcr              total coding rate, forward + backward from unit z (n, B, d) fp32: fastemp's
                     batched Cholesky (B x B side, closed-form gradient) vs the baseline's per-patch
                     d x d torch.logdet loop
    augmentation     patches/s making n*B patches of 32x32 images: the torch backend, plus the
                     baseline's per-patch CPU augmentation (one process, one patch a call); the DALI
                     backend reads files: `fastemp bench data` measures it

Each implementation's loss and gradient are compared with the first one's (max abs difference).
On the CPU, Triton only runs under TRITON_INTERPRET=1 and only as a correctness smoke: its time is
not reported (`timed: false`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from fastemp import runs
from fastemp.config import AugmentConfig
from fastemp.kernels.cosine_to_mean import cosine_to_mean, triton_usable
from fastemp.losses import invariance_loss, total_coding_rate
from fastemp.patches import make_patch_backend
from fastemp.runtime import resolve_device

from . import common
from .baseline import augmentation_patches_per_s, loop_tcr

# ------------------------------------------------------------------------------ implementations


def unfused_invariance(p: torch.Tensor) -> torch.Tensor:
    """fastemp's torch path: loss_sim of z = p / |p|."""
    return invariance_loss(F.normalize(p.float(), dim=-1))


def triton_invariance(p: torch.Tensor) -> torch.Tensor:
    return cosine_to_mean(p)[0]


def cholesky_tcr(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """fastemp: -mean_i R(Z_i) with one batched Cholesky."""
    return -total_coding_rate(z, eps).mean()


def cosine_impls(device: torch.device, compile_torch: bool) -> list[tuple[str, object, bool, str]]:
    """(name, fn or None, timed, note) for the invariance term on this device."""
    out = [("eager", unfused_invariance, True, "")]
    if compile_torch:
        out.append(("compiled", torch.compile(unfused_invariance, dynamic=False), True, "torch.compile default"))
    if triton_usable(device):
        on_cpu = device.type == "cpu"
        out.append(
            (
                "triton",
                triton_invariance,
                not on_cpu,
                "TRITON_INTERPRET=1 correctness smoke, time not meaningful" if on_cpu else "",
            )
        )
    else:
        out.append(("triton", None, False, "Triton cannot run here (CPU without TRITON_INTERPRET=1)"))
    return out


# ----------------------------------------------------------------------------------- measuring


def loss_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and d fn / dx, as fp32 copies."""
    leaf = x.detach().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.detach().float(), leaf.grad.float()


def time_fwd_bwd(fn, x: torch.Tensor, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of fn(x).backward()."""
    leaf = x.detach().requires_grad_(True)

    def call():
        leaf.grad = None
        fn(leaf).backward()

    return common.median(common.time_calls(call, device, warmup, iters))


def compare_impls(
    kernel: str, impls, x: torch.Tensor, shape: dict, device: torch.device, warmup: int, iters: int
) -> list[dict]:
    """Rows for each implementation of one kernel at one shape: time and agreement with the first."""
    rows, ref = [], None
    for name, fn, timed, note in impls:
        row = {
            "kernel": kernel,
            "impl": name,
            **shape,
            "dtype": str(x.dtype).replace("torch.", ""),
            "timed": bool(timed and fn is not None),
            "seconds": None,
            "note": note,
            "loss_abs_diff": None,
            "grad_max_abs_diff": None,
            "status": "ok",
        }
        if fn is None:
            rows.append({**row, "status": "skipped"})
            continue
        try:
            loss, grad = loss_and_grad(fn, x)
            if ref is None:
                ref = (loss, grad)
            row.update(loss_abs_diff=float((loss - ref[0]).abs()), grad_max_abs_diff=float((grad - ref[1]).abs().max()))
            if row["timed"]:
                row["seconds"] = time_fwd_bwd(fn, x, device, warmup, iters)
        except Exception as err:
            status = "oom" if common.is_out_of_memory(err) else "error"
            print(f"fastemp bench kernels: {kernel}/{name} {shape} failed: {err}", file=sys.stderr)
            row.update(status=status, note=f"{type(err).__name__}: {err}"[:300], timed=False)
        rows.append(row)
    return rows


def augmentation_rows(
    images: torch.Tensor, n: int, batch: int, device: torch.device, warmup: int, iters: int
) -> list[dict]:
    """patches/s of the torch backend making n*B patches per call."""
    rows, aug = [], AugmentConfig()
    index = torch.arange(batch, device=device) % images.shape[0]
    for name in ("torch",):
        row = {
            "kernel": "augmentation",
            "impl": name,
            "n": n,
            "B": batch,
            "seconds": None,
            "patches_per_s": None,
            "timed": False,
            "status": "ok",
            "note": "",
        }
        try:
            backend = make_patch_backend(name, images, aug, seed=0)
            counter = iter(range(10**9))
            seconds = common.median(
                common.time_calls(lambda b=backend, c=counter: b(index, n, seed=next(c)), device, warmup, iters)
            )
            row.update(seconds=seconds, patches_per_s=n * batch / seconds, timed=True)
        except Exception as err:
            print(f"fastemp bench kernels: augmentation/{name} failed: {err}", file=sys.stderr)
            row.update(status="error", note=f"{type(err).__name__}: {err}"[:300])
        rows.append(row)
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """Per kernel and shape: each timed implementation's speed-up over the slowest reference
    (eager for cosine_to_mean, loop for tcr, torch for augmentation)."""
    reference = {"cosine_to_mean": "eager", "tcr": "loop", "augmentation": "torch"}
    out = []
    for r in rows:
        if r["kernel"] not in reference or not r["timed"] or r["impl"] == reference[r["kernel"]]:
            continue
        ref = next(
            (
                q
                for q in rows
                if q["kernel"] == r["kernel"]
                and q["impl"] == reference[r["kernel"]]
                and q["n"] == r["n"]
                and q["B"] == r["B"]
                and q.get("d") == r.get("d")
                and q["timed"]
            ),
            None,
        )
        if ref:
            out.append(
                {
                    "kernel": r["kernel"],
                    "impl": r["impl"],
                    "vs": ref["impl"],
                    "n": r["n"],
                    "B": r["B"],
                    "d": r.get("d"),
                    "speedup": ref["seconds"] / r["seconds"],
                }
            )
    return out


# ------------------------------------------------------------------------------------ the run


def run_kernels(
    device: str = "auto",
    ns=(20, 50, 200),
    batches=(100, 256),
    dims=(1024,),
    warmup: int = 3,
    iters: int = 20,
    compile_torch: bool = True,
    augmentation: bool = True,
    images: int = 10_000,
    baseline_aug_patches: int = 200,
    seed: int = 0,
) -> dict:
    dev = resolve_device(device)
    environment = runs.environment(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    low = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for n in ns:
        for batch in batches:
            for d in dims:
                shape = {"n": n, "B": batch, "d": d}
                p = torch.randn(n, batch, d, device=dev, generator=gen).to(low)
                rows += compare_impls("cosine_to_mean", cosine_impls(dev, compile_torch), p, shape, dev, warmup, iters)
                z = F.normalize(torch.randn(n, batch, d, device=dev, generator=gen), dim=-1)
                rows += compare_impls(
                    "tcr",
                    [
                        ("cholesky", cholesky_tcr, True, "batched Cholesky, B x B side"),
                        ("loop", loop_tcr, True, "per-patch d x d torch.logdet"),
                    ],
                    z,
                    shape,
                    dev,
                    warmup,
                    iters,
                )
                del p, z
                common.free_device_memory(dev)
    aug_rows = []
    if augmentation:
        pool = torch.randint(0, 256, (images, 32, 32, 3), dtype=torch.uint8, device=dev, generator=gen)
        for n in ns:
            for batch in batches:
                aug_rows += augmentation_rows(pool, n, batch, dev, warmup, iters)
        rate = augmentation_patches_per_s(pool[:1000], AugmentConfig(), baseline_aug_patches)
        aug_rows.append(
            {
                "kernel": "augmentation",
                "impl": "baseline per-patch CPU (1 process)",
                "n": 1,
                "B": 1,
                "seconds": 1.0 / rate,
                "patches_per_s": rate,
                "timed": True,
                "status": "ok",
                "note": f"{baseline_aug_patches} patches, one at a time",
            }
        )
    notes = []
    if dev.type == "cpu":
        notes.append("CPU timings are noisy: the machine's cores are shared with other work.")
        notes.append("Triton on the CPU runs interpreted (TRITON_INTERPRET=1): a correctness smoke, never timed.")
        notes.append(f"torch ran with {torch.get_num_threads()} CPU thread(s).")
    result = {
        **common.base_result("kernels", environment),
        "settings": {
            "n": list(ns),
            "B": list(batches),
            "d": list(dims),
            "warmup": warmup,
            "iters": iters,
            "compile_torch": compile_torch,
            "cosine_dtype": str(low).replace("torch.", ""),
            "augmentation_images": images if augmentation else None,
        },
        "rows": rows,
        "augmentation": aug_rows,
        "speedups": speedups(rows + aug_rows),
        "notes": notes,
    }
    return result


def kernels_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Kernels: {common.device_label(env)} ({env.get('device')})",
        "",
        f"Median of {result['settings']['iters']} timed calls after {result['settings']['warmup']} warm-up calls; "
        "forward + backward for the loss kernels. 'diff' columns: max abs difference from the first "
        "implementation listed for that shape.",
        "",
    ]
    rows = [
        [
            r["kernel"],
            r["impl"],
            r["n"],
            r["B"],
            r["d"],
            r["dtype"],
            r["seconds"] * 1e3 if r["seconds"] is not None else None,
            r["loss_abs_diff"],
            r["grad_max_abs_diff"],
            r["status"],
            r["note"],
        ]
        for r in result["rows"]
    ]
    lines += [
        common.markdown_table(
            ["kernel", "impl", "n", "B", "d", "dtype", "ms", "loss diff", "grad diff", "status", "note"], rows
        ),
        "",
    ]
    if result["augmentation"]:
        rows = [
            [
                r["impl"],
                r["n"],
                r["B"],
                r["patches_per_s"],
                r["seconds"] * 1e3 if r["seconds"] else None,
                r["status"],
                r["note"],
            ]
            for r in result["augmentation"]
        ]
        lines += [
            "## Augmentation",
            "",
            common.markdown_table(["backend", "n", "B", "patches/s", "ms per call", "status", "note"], rows),
            "",
        ]
    if result["speedups"]:
        rows = [[s["kernel"], s["impl"], s["vs"], s["n"], s["B"], s["d"], s["speedup"]] for s in result["speedups"]]
        lines += ["## Speed-ups", "", common.markdown_table(["kernel", "impl", "over", "n", "B", "d", "x"], rows), ""]
    lines += ["## Environment", "", common.environment_markdown(env), ""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)
