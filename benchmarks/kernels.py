"""`fastemp bench kernels`: the step's parts outside the model over (n, B, d), each fast path beside the path it
replaced: cosine_to_mean (the invariance term from raw p, bf16 on CUDA: eager, compiled, Triton, interpreted and never
timed on the CPU), tcr (fp32: batched Cholesky vs the baseline's d x d logdet loop), augmentation (the torch recipe
eager and compiled; the baseline's one patch a call on the CPU), lars (one optimizer step of the --width model: the
per-tensor reference rule, eager, fused compiled). Loss kernels forward + backward, their loss and gradient against
the first implementation's; times: medians of --iters calls after --warmup, on the library's clock.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from fastemp.check.reference import reference_lars
from fastemp.clock import time_calls
from fastemp.config import AugmentConfig, ModelConfig, OptimConfig
from fastemp.kernels.cosine_to_mean import cosine_to_mean, triton_usable
from fastemp.lars import build_lars
from fastemp.losses import invariance_loss, total_coding_rate
from fastemp.model import build_model
from fastemp.patches.torch_backend import TorchPatches

from . import harness
from .baseline import augment_one_patch, loop_tcr
from .report import table

REFERENCE = {"cosine_to_mean": "eager", "tcr": "loop", "augmentation": "torch eager", "lars": "reference"}


def unfused_invariance(p: torch.Tensor) -> torch.Tensor:
    return invariance_loss(F.normalize(p.float(), dim=-1))


def implementations(device: torch.device, compile_torch: bool) -> dict[str, list]:
    """kernel -> [(impl, fn, timed, note)]; the first is the one the others are compared with. No Triton row where
    Triton cannot run (the CPU without TRITON_INTERPRET=1)."""
    on_cpu = device.type == "cpu"
    cosine = [("eager", unfused_invariance, True, "")]
    if compile_torch:
        cosine.append(("compiled", torch.compile(unfused_invariance, dynamic=False), True, "torch.compile default"))
    if triton_usable(device):
        note = "TRITON_INTERPRET=1 correctness smoke, never timed" if on_cpu else ""
        cosine.append(("triton", lambda p: cosine_to_mean(p)[0], not on_cpu, note))
    tcr = [("cholesky", lambda z: -total_coding_rate(z, 0.2).mean(), True, "batched Cholesky, B x B side")]
    return {"cosine_to_mean": cosine, "tcr": [*tcr, ("loop", loop_tcr, True, "per-patch d x d torch.logdet")]}


def loss_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.detach().float(), leaf.grad.float()


def loss_rows(args, device: torch.device, gen: torch.Generator) -> list[dict]:
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, impls = [], implementations(device, args.compile)
    for shape in harness.grid({"n": args.n, "B": args.batch, "d": args.dim}):
        p = torch.randn(shape["n"], shape["B"], shape["d"], device=device, generator=gen)
        for kernel, x in (("cosine_to_mean", p.to(low)), ("tcr", F.normalize(p, dim=-1))):
            reference = loss_and_grad(impls[kernel][0][1], x)

            def measure(impl, x=x, reference=reference) -> dict:
                _, fn, timed, note = impl
                loss, grad = loss_and_grad(fn, x)
                leaf = x.detach().requires_grad_(True)

                def call():
                    leaf.grad = None
                    fn(leaf).backward()

                seconds = statistics.median(time_calls(call, device, args.warmup, args.iters)) if timed else None
                diffs = {"loss_abs_diff": float((loss - reference[0]).abs())}
                diffs["grad_max_abs_diff"] = float((grad - reference[1]).abs().max())
                return {"timed": timed, "seconds": seconds, "note": note, **diffs}

            label = {"kernel": kernel, **shape, "dtype": str(x.dtype).replace("torch.", "")}
            rows += harness.run_points(impls[kernel], measure, lambda impl, lb=label: {**lb, "impl": impl[0]})
    return rows


def augmentation_rows(args, device: torch.device, gen: torch.Generator) -> list[dict]:
    pool = torch.randint(0, 256, (args.images, 32, 32, 3), dtype=torch.uint8, device=device, generator=gen)
    impls = ("torch eager", "torch compiled")[: 1 + args.compile]
    todo = [(impl, shape) for impl in impls for shape in harness.grid({"n": args.n, "B": args.batch})]
    todo.append(("baseline per-patch CPU (1 process)", {"n": 1, "B": 1}))

    def measure(point) -> dict:
        (impl, shape), seeds, note = point, iter(range(10**9)), ""
        if impl.startswith("baseline"):
            images, count = pool[:1000].cpu(), args.baseline_aug_patches
            call = lambda: augment_one_patch(images, next(seeds) % len(images), AugmentConfig())  # noqa: E731
            seconds, note = sum(time_calls(call, "cpu", 1, count)) / count, f"{count} patches, one at a time"
        else:
            backend = TorchPatches(pool, AugmentConfig(), impl.endswith("compiled"))
            index = torch.arange(shape["B"], device=device)
            call = lambda: backend(index, shape["n"], next(seeds))  # noqa: E731
            seconds = statistics.median(time_calls(call, device, args.warmup, args.iters))
        return {"seconds": seconds, "patches_per_s": shape["n"] * shape["B"] / seconds, "timed": True, "note": note}

    return harness.run_points(todo, measure, lambda p: {"kernel": "augmentation", "impl": p[0], **p[1]})


def lars_rows(args, device: torch.device) -> list[dict]:
    """One optimizer step per path over the same random gradients (copied in again before every step)."""
    options = OptimConfig()
    paths = [("reference", lambda m: reference_lars(m, options))]
    paths += [("eager", lambda m: build_lars(m, options))]
    paths += [("fused", lambda m: build_lars(m, options, fused_update=True))] if args.compile else []

    def measure(path) -> dict:
        torch.manual_seed(0)
        model = build_model(ModelConfig(width=args.width)).to(device).to(memory_format=torch.channels_last)
        grads = [torch.randn_like(p) * 1e-2 for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer = path[1](model)

        def step():
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)  # the adaptation rewrites the gradients: the same ones every step
            optimizer.step()

        first = time_calls(step, device, 0, 1)[0]  # a compiled path compiles here
        seconds = statistics.median(time_calls(step, device, args.warmup, args.iters))
        out = {"params": sum(p.numel() for p in model.parameters()), "first_call_s": first, "timed": True}
        return {**out, "seconds": seconds, "note": f"width {args.width}"}

    return harness.run_points(paths, measure, lambda path: {"kernel": "lars", "impl": path[0]})


def speedups(rows: list[dict]) -> list[dict]:
    """Each timed implementation's speed-up over its kernel's reference implementation at the same shape."""
    where = ("kernel", "n", "B", "d")
    key = lambda r: tuple(r.get(k) for k in where)  # noqa: E731
    times = {key(r): r["seconds"] for r in rows if r["impl"] == REFERENCE[r["kernel"]] and r.get("seconds")}
    faster = [r for r in rows if times.get(key(r)) and r.get("seconds") and r["impl"] != REFERENCE[r["kernel"]]]
    labels = [{**dict(zip(where, key(r))), "impl": r["impl"], "vs": REFERENCE[r["kernel"]]} for r in faster]
    return [{**label, "speedup": times[key(r)] / r["seconds"]} for label, r in zip(labels, faster)]


def run(args, _, results: harness.Results) -> dict:
    device = torch.device(results.environment["device"])
    gen = torch.Generator(device=device).manual_seed(0)
    rows = loss_rows(args, device, gen) + lars_rows(args, device)
    augmentation = augmentation_rows(args, device, gen)
    settings = {k: getattr(args, k) for k in ("n", "batch", "dim", "warmup", "iters", "compile", "width")}
    notes = ["CPU timings are noisy: shared cores; Triton on the CPU runs interpreted and is never timed."]
    result = {"settings": settings, "rows": rows, "augmentation": augmentation}
    result.update(speedups=speedups(rows + augmentation), notes=notes if device.type == "cpu" else [])
    return results.write(result, final=True)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Median of {s['iters']} timed calls after {s['warmup']} warm-up calls; loss kernels forward + backward; "
        "'diff': max abs difference from the first implementation of that kernel and shape.",
        "",
        table(result["rows"], "kernel impl n B d dtype seconds:ms loss_abs_diff grad_max_abs_diff status note"),
    ]
    keys, headers = "impl n B patches_per_s status note", "backend|n|B|patches/s|status|note"
    lines += ["", "## Augmentation", "", table(result["augmentation"], keys, headers)]
    if result["speedups"]:
        keys, headers = "kernel impl vs n B d speedup", "kernel|impl|over|n|B|d|x"
        lines += ["", "## Speed-ups", "", table(result["speedups"], keys, headers)]
    return harness.page(result, "Kernels", *lines)
