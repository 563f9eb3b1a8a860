"""The bad-input and fault catalog: every user mistake is one line, exit 2, no traceback, and no
file outside the run folder (nor a good old run) is touched.

The cases run through fastemp.cli.main inside ONE subprocess (a torch import costs seconds per
process), each with its own captured stderr, exit code and before/after snapshot of the
workspace (the exit code of a real `python -m fastemp` process: test_distributed.py's torchrun errors).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import TINY

from fastemp import checkpoint, run_folder, runs
from fastemp.cli import main

# Runs each case through fastemp.cli.main with its own stderr; reports exit code, stderr and the
# files that changed outside the folder the case may write to.
HARNESS = r"""
import contextlib, io, json, os, sys, traceback
from fastemp.cli import main

def snapshot(root, skip):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip and os.path.abspath(dirpath).startswith(skip):
            continue
        for name in filenames + dirnames:
            if name == ".lock":  # the run-folder lock: bookkeeping, rewritten by whoever takes it
                continue
            path = os.path.join(dirpath, name)
            if skip and os.path.abspath(path).startswith(skip):
                continue
            st = os.lstat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
    return out

def full_disk(obj, f, *args, **kwargs):
    f.write(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

cases, root = json.load(sys.stdin), sys.argv[1]
results = []
import torch
real_save = torch.save
for case in cases:
    torch.save = full_disk if case.get("fault") == "full_disk" else real_save
    os.chdir(case["cwd"])
    skip = os.path.abspath(case["may_write"]) if case["may_write"] else None
    before = snapshot(root, skip)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(case["argv"])
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "exception"
    after = snapshot(root, skip)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue(), "changed": changed})
print(json.dumps(results))
"""


def _file_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project folder (the working directory) and a finished 4-step run with a step-2 checkpoint."""
    root = tmp_path_factory.mktemp("catalog")
    project = root / "project"
    project.mkdir()
    (project / "important.txt").write_text("an unrelated project\n")
    old = root / "old"
    assert (
        main(["train", *TINY, "train.max_steps=4", "train.ckpt_every=2", "eval.at_end=false", "--out", str(old)]) == 0
    )
    return root, project, old


def _variant(root: Path, old: Path, name: str, edit=None) -> Path:
    run = root / name
    shutil.copytree(old, run)
    if edit:
        edit(run)
    return run


def _corrupt(run):
    (run / "checkpoint.pt").write_bytes(b"this is not a checkpoint" * 10)


def _truncate(run):
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])


def _empty(run):
    (run / "checkpoint.pt").write_bytes(b"")


def _nan_weights(run):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].fill_(float("nan"))
    state["sha256"] = checkpoint.digest(state)  # a consistent file: the weights themselves are bad
    torch.save(state, run / "checkpoint.pt")


def _edit_n_patches(run):
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("n_patches: 4", "n_patches: 6"))


def _no_checkpoint(run):
    (run / "checkpoint.pt").unlink()


def _partial_metrics(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": -1')  # killed in the middle of a line


class _RunsCode:
    """Pickles as a call of exec: what a crafted checkpoint would run on a weights_only=False load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _edit_state(edit, sign=True):
    """A variant edit of checkpoint.pt's state; signed again (a consistent file) unless sign=False."""

    def apply(run):
        path = run / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        edit(state)
        if sign:
            state["sha256"] = checkpoint.digest(state)
        torch.save(state, path)

    return apply


def _crafted(marker):
    return _edit_state(lambda state: state["model"].update(evil=_RunsCode(marker)), sign=False)


def _flip_bit(run):
    path = run / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    weight = (
        max((v for v in state["model"].values() if v.is_floating_point()), key=torch.Tensor.numel).numpy().tobytes()
    )
    at = data.find(weight)
    assert at >= 0
    data[at + len(weight) // 2] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(data))


def _drop_tensor(state):
    del state["model"][next(iter(state["model"]))]


def _reshape_tensor(state):
    key = next(k for k, v in state["model"].items() if v.dim() == 4)
    state["model"][key] = torch.zeros(1, 1, 1, 1)


def _two_ranks_without_sync_bn(run):
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("sync_bn: true", "sync_bn: false"))

    def edit(state):
        state["config"]["model"]["sync_bn"] = False
        state["layout"].update(world_size=2, sync_bn=False, images_per_rank=10, bn_images=10)

    _edit_state(edit)(run)


def _folder_as(name: str):
    """A variant edit: the run file `name` replaced by a folder."""

    def apply(run):
        (run / name).unlink(missing_ok=True)
        (run / name).mkdir()

    return apply


def _read_only(path: Path) -> bool:
    """Make path read-only even for root (chattr +i); False when this machine cannot."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


def test_catalog_of_bad_inputs(workspace, huge_png):
    root, project, old = workspace
    yaml_bad = root / "bad.yaml"
    yaml_bad.write_text("train:\n  epochs: [1\n")
    yaml_empty = root / "empty.yaml"
    yaml_empty.write_text("")
    no_test = root / "images"
    (no_test / "train" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(no_test / "train" / "a" / "x.png")
    (no_test / "train" / "b").mkdir()
    Image.new("RGB", (32, 32), (10, 10, 200)).save(no_test / "train" / "b" / "x.png")
    # issue 14: YAML that parses but is refused; ImageFolders a probe cannot score; an image bomb
    yaml_twice = root / "twice.yaml"
    yaml_twice.write_text("train:\n  epochs: 1\nmodel:\n  width: 4\ntrain:\n  batch_size: 20\n")
    yaml_bomb = root / "bomb.yaml"
    yaml_bomb.write_text(
        "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
        + "train: {epochs: *i}\n"
    )
    folders = {}
    for name, layout in [
        ("one_class", {"train/a": 2, "test/a": 1}),
        ("test_only_class", {"train/a": 1, "train/b": 1, "test/a": 1, "test/z": 1}),
        ("bomb", {"train/a": 1, "train/b": 1, "test/a": 1}),
    ]:
        for where, count in layout.items():
            (root / name / where).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (40 * i, 90, 10)).save(root / name / where / f"{i}.png")
        folders[name] = [
            "data.source=imagefolder",
            f"data.path={root / name}",
            f"data.root={root / 'cache14'}",
            "train.batch_size=1",
            "eval.probe_batch_size=1",
        ]
    (root / "bomb" / "train" / "b" / "huge.png").write_bytes(huge_png)
    a_file = root / "a_file.txt"
    a_file.write_text("not a folder\n")
    not_a_run = root / "notes"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("mine\n")

    train = ["train", *TINY]
    fresh = str(root / "fresh")
    # (argv, a phrase the message must contain, the folder the case may write to)
    cases = [
        (train + ["train.batch_size=500", "--out", fresh], "exceeds the 120 training images", None),
        (train + ["train.batch_size=0", "--out", fresh], "train.batch_size must be > 0", None),
        (train + ["train.n_patches=0", "--out", fresh], "train.n_patches must be >= 2", None),
        (train + ["train.n_patches=-3", "--out", fresh], "train.n_patches must be >= 2", None),
        (train + ["train.n_patches=1", "--out", fresh], "needs two patches per image", None),
        (train + ["train.epochs=0", "--out", fresh], "train.epochs must be > 0", None),
        (train + ["train.log_every=0", "--out", fresh], "train.log_every must be > 0", None),
        (train + ["loss.eps=0", "--out", fresh], "loss.eps must be > 0", None),
        (train + ["augment.crop_size=0", "--out", fresh], "augment.crop_size must be > 0", None),
        (train + ["model.width=0", "--out", fresh], "model.width must be > 0", None),
        (train + ["optim.lr=-0.1", "--out", fresh], "optim.lr must be > 0", None),
        (train + ["model.compile=fast", "--out", fresh], "model.compile must be one of", None),
        (train + ["model.precision=fp16", "--out", fresh], "model.precision must be one of", None),
        (train + ["data.backend=jax", "--out", fresh], "data.backend must be one of", None),
        (train + ["eval.mode=full", "--out", fresh], "eval.mode must be one of", None),
        (train + ["eval.patches=0", "--out", fresh], "eval.patches must be > 0", None),
        (train + ["train.device=gpu", "--out", fresh], "train.device must be", None),
        (train + ["name=a/b", "--out", fresh], "name must be", None),
        (train + ["optim.lr=fast", "--out", fresh], "optim.lr: expected a number", None),
        (["train", "--config", str(yaml_bad), "--out", fresh], f"{yaml_bad}: YAML syntax error at line", None),
        (["train", "--config", str(yaml_empty), "--out", fresh], "is empty", None),
        (
            train
            + [
                "data.source=imagefolder",
                f"data.path={no_test}",
                "train.batch_size=1",
                "eval.probe_batch_size=1",
                f"data.root={root / 'cache'}",
                "--out",
                fresh,
            ],
            "no images in",
            str(root / "cache"),
        ),
        # ^ the test split is checked before training (the decoded train split may be cached)
        (train + ["data.source=imagefolder", "data.path=/no/such/data", "--out", fresh], "does not exist", None),
        (train + ["--bogus-flag"], "unrecognized arguments", None),
        # data loss: --force never empties the working directory, an ancestor, or a folder of other files
        (train + ["--out", ".", "--force"], "working directory", None),
        (train + ["--out", str(root), "--force"], "ancestor", None),
        (train + ["--out", str(not_a_run), "--force"], "not a fastemp run folder", None),
        (train + ["--out", str(old)], "pass --force", None),
        # --force with a typo in the new config leaves the old run exactly as it was
        (
            train + ["data.source=imagefolder", "data.path=/no/such/data", "--out", str(old), "--force"],
            "does not exist",
            None,
        ),
        (train + ["train.batch_size=500", "--out", str(old), "--force"], "exceeds", None),
        # checkpoints
        (["resume", str(_variant(root, old, "corrupt", _corrupt))], "corrupt or truncated", None),
        (["resume", str(_variant(root, old, "truncated", _truncate))], "corrupt or truncated", None),
        (["resume", str(_variant(root, old, "empty", _empty))], "is empty (0 bytes)", None),
        (["eval", str(_variant(root, old, "corrupt_eval", _corrupt))], "corrupt or truncated", None),
        (["eval", str(_variant(root, old, "nan", _nan_weights))], "non-finite weights", None),
        (
            ["eval", str(_variant(root, old, "nockpt", _no_checkpoint))],
            "not found: the run stopped before its first checkpoint",
            None,
        ),
        (["eval", str(old), "model.width=8"], "was trained with model.width=4", None),
        (["resume", str(_variant(root, old, "edited", _edit_n_patches))], "train.n_patches (4 -> 6)", None),
        (["resume", str(not_a_run)], "no config.yaml", None),
        (["resume", str(root / "missing")], "does not exist", None),
        (
            ["train", "data.source=cifar10", f"data.root={root / 'nodata'}", "data.download=false", "--out", fresh],
            "not found and data.download=false",
            None,
        ),
        # issue 14: YAML, value ranges, data a probe cannot score, memory, bad CLI numbers and output paths
        (
            ["train", "--config", str(yaml_twice), "--out", fresh],
            "duplicate key 'train' at line 5 (first at line 1)",
            None,
        ),
        (
            ["train", "--config", str(yaml_bomb), "--out", fresh],
            "YAML aliases expand to more than 100,000 values",
            None,
        ),
        (train + ["optim.lr=" + "9x" * 50_000, "--out", fresh], "optim.lr: expected a number, got '9x9x", None),
        (train + ["train.seed=1e30", "--out", fresh], "train.seed: '1e30' is out of range", None),
        (train + ["optim.lr=" + "9" * 400, "--out", fresh], "optim.lr: expected a finite number, got inf", None),
        (train + ["data.synthetic_seed=-99999999999999999999", "--out", fresh], "is out of range", None),
        (train + folders["one_class"] + ["--out", fresh], "a linear probe needs at least 2 classes", None),
        (train + folders["test_only_class"] + ["--out", fresh], "test/ has classes with no training images: z", None),
        (train + folders["bomb"] + ["--out", fresh], "huge.png (900,000,000 pixels, over the limit", None),
        (train + ["train.n_patches=1000000", "--out", fresh], "this run needs about", None),
        (train + ["data.synthetic_train=1000000000", "--out", fresh], "this run needs about", None),
        (train + ["eval.mode=patches", "eval.patches=100000000", "--out", fresh], "this run needs about", None),
        (["eval", str(old), "eval.mode=patches", "eval.patches=100000000"], "this run needs about", None),
        (
            ["bench", "throughput", "--n", "abc", "--out", str(root / "bench")],
            "argument --n: expected comma-separated",
            None,
        ),
        (["bench", "kernels", "--threads", "many", "--out", str(root / "bench")], "argument --threads", None),
        (["tune", "--batch", "1.5", "--out", str(root / "tuned.yaml")], "argument --batch", None),
        (["bench", "throughput", "--out", str(a_file / "results"), "data.source=synthetic"], "lies under", None),
        (["bench", "kernels", "--out", str(a_file)], "is a file, not a folder", None),
        (["tune", "--out", str(a_file / "tuned.yaml"), "data.source=synthetic"], "is a file, not a folder", None),
        (["check", "--json", str(a_file / "check.json"), "--only", "tcr", "--quick"], "lies under", None),
    ]
    if not torch.cuda.is_available():
        cases.append((train + ["train.device=cuda", "--out", fresh], "no CUDA device", None))

    # issue 14: checkpoints that cannot run code or lie, locked run folders, --force that keeps the old run
    busy = _variant(root, old, "busy")
    run_folder.lock_run_dir(busy, "fastemp train")  # this (pytest) process holds busy: the harness is another one
    (root / "dangling").symlink_to(root / "nowhere")
    ro_parent, ro_run = root / "ro_parent", _variant(root, old, "ro_run")
    ro_parent.mkdir()
    marker = root / "crafted-ran"
    force_old = [_variant(root, old, f"force{i}") for i in range(2)]
    before_force = [_file_bytes(r) for r in force_old]
    disk_fresh = root / "disk_fresh"
    huge_yaml = root / "huge.yaml"
    with open(huge_yaml, "wb") as f:
        f.truncate(3 << 30)  # sparse: a config of 3 GB (one line of zeros) refused by its size, never read
    cases += [
        # issue 22: run files that are folders, a checkpoint from a newer fastemp, a huge config, --out under a file
        (
            ["resume", str(_variant(root, old, "dir_summary", _folder_as("summary.json")))],
            "summary.json is not a",
            None,
        ),
        (["resume", str(_variant(root, old, "dir_ckpt", _folder_as("checkpoint.pt")))], "checkpoint.pt is not a", None),
        (["eval", str(_variant(root, old, "dir_eval", _folder_as("eval.json")))], "eval.json is not a file", None),
        (["eval", str(_variant(root, old, "dir_lock", _folder_as(".lock")))], ".lock is not a file", None),
        (
            train + ["--out", str(_variant(root, old, "dir_lock2", _folder_as(".lock"))), "--force"],
            ".lock is not",
            None,
        ),
        (
            ["resume", str(_variant(root, old, "newer", _edit_state(lambda state: state.update(format=3))))],
            "has checkpoint format 3, written by a newer fastemp (this one reads format 2 and older)",
            None,
        ),
        (["train", "--config", str(huge_yaml), "--out", fresh], "over the limit of 1,048,576 for a config", None),
        (train + ["--out", str(a_file / "run")], f"lies under {a_file}, which is a file", None),
        (["eval", str(_variant(root, old, "crafted_eval", _crafted(marker)))], "holds Python objects", None),
        (["resume", str(_variant(root, old, "crafted_resume", _crafted(marker)))], "loading one could run code", None),
        (["eval", str(_variant(root, old, "flipped_eval", _flip_bit))], "is corrupt: its sha256 does not match", None),
        (["resume", str(_variant(root, old, "flipped", _flip_bit))], "is corrupt: its sha256 does not match", None),
        (
            ["resume", str(_variant(root, old, "unsigned", _edit_state(lambda s: s.pop("sha256"), sign=False)))],
            "lacks sha256 (it has no checksum",
            None,
        ),
        (
            ["resume", str(_variant(root, old, "dropped", _edit_state(_drop_tensor)))],
            "does not fit the model: missing ",
            None,
        ),
        (["eval", str(_variant(root, old, "reshaped", _edit_state(_reshape_tensor)))], "misshaped ", None),
        (
            ["resume", str(_variant(root, old, "two_ranks", _two_ranks_without_sync_bn))],
            "a different recipe mid-run; resume it with 2 process(es)",
            None,
        ),
        (train + ["--out", str(busy)], f"is in use by fastemp train (pid {os.getpid()}", None),
        (train + ["--out", str(busy), "--force"], "is in use by fastemp train", None),
        (["resume", str(busy)], "is in use by fastemp train", None),
        (["eval", str(busy)], "is in use by fastemp train", None),
        (train + ["--out", str(root / "dangling")], "is a symlink to", None),
        (train + ["--out", str(root / ("n" * 300))], "over the filesystem's limit of 255", None),
        (train + [f"name={'n' * 300}"], "over the filesystem's limit", None),
        # --force: a new run that fails before its first checkpoint puts the old run back, byte for byte
        (
            train + ["optim.lr=1e30", "train.max_steps=6", "--out", str(force_old[0]), "--force"],
            "nothing of the new run was kept",
            str(force_old[0]),
        ),
        (
            train + ["train.max_steps=2", "eval.at_end=false", "--out", str(force_old[1]), "--force"],
            "(no checkpoint of this run exists yet); free space",
            str(force_old[1]),
            "full_disk",
        ),
        (
            train + ["train.max_steps=2", "eval.at_end=false", "--out", str(disk_fresh)],
            "holds this run's config.yaml and metrics but no checkpoint; to try again: fastemp train",
            str(disk_fresh),
            "full_disk",
        ),
    ]
    # lr 1e30 makes the weights inf after step 1; checkpoints every step, logs every 5: the run must stop at the
    # first checkpoint write after the blow-up, naming step 2, with step 1 still saved
    diverged, diverged_case = root / "diverged", len(cases)
    lr_1e30 = ["optim.lr=1e30", "train.max_steps=6", "train.ckpt_every=1", "train.log_every=5", "--out", str(diverged)]
    cases.append((train + lr_1e30, "became non-finite at step 2", str(diverged)))
    read_only = all([_read_only(ro_parent), _read_only(ro_run)])  # both tried: the finally below undoes both
    if read_only:
        cases += [
            (train + ["--out", str(ro_parent / "run")], f"{ro_parent} is not writable; choose another --out", None),
            (["resume", str(ro_run)], "is read-only and resume writes", None),
            (["eval", str(ro_run)], "the evaluation is printed above", None),
        ]

    payload = [
        {"argv": argv, "cwd": str(project), "may_write": may, "fault": rest[0] if rest else None}
        for argv, _, may, *rest in cases
    ]
    # --debug (anywhere on the command line) shows the traceback of the error instead of its one line
    payload.append({"argv": ["train", *TINY, "--debug", "train.epochs=0"], "cwd": str(project), "may_write": None})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", HARNESS, str(root)],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        run_folder.unlock_all()
        _writable(ro_parent)
        _writable(ro_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, debug = json.loads(proc.stdout)
    assert debug["code"] == "exception" and not debug["changed"], debug
    assert "Traceback" in debug["stderr"] and "ConfigError: train.epochs must be > 0" in debug["stderr"], debug
    failures = []
    for (argv, phrase, *_), got in zip(cases, results):
        lines = got["stderr"].strip().splitlines()
        ok = (
            got["code"] == 2
            and len(lines) == 1
            and lines[0].startswith("fastemp: error: ")
            and "; " in lines[0]
            and phrase in lines[0]
            and not got["changed"]
        )
        if not ok:
            failures.append(
                f"{argv[-4:]}: code {got['code']}, changed {got['changed'][:3]}, stderr {got['stderr'][-400:]!r}"
            )
    assert not failures, "\n".join(failures)
    assert not marker.exists()  # the crafted checkpoints ran nothing, on eval or on resume
    for run, files in zip(force_old, before_force):  # --force put the old run back, unchanged
        assert {k: v for k, v in _file_bytes(run).items() if k != ".lock"} == {
            k: v for k, v in files.items() if k != ".lock"
        }
    assert sorted(p.name for p in disk_fresh.iterdir()) == [".lock", "config.yaml", "metrics.jsonl"]
    assert "(sim)" in results[diverged_case]["stderr"]
    state = torch.load(diverged / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if read_only:
        assert '"linear_top1"' in results[-1]["stdout"]  # the finished evaluation was printed before the error
    assert not [p for p in root.rglob("*") if ".tmp" in p.name or "replaced" in p.name]
    assert (project / "important.txt").read_text() == "an unrelated project\n"
    assert not (root / "fresh").exists()  # a run that failed validation leaves no folder behind
    assert (not_a_run / "notes.txt").is_file()
    assert not (root / "cache14").exists() and not (root / "bench").exists()  # refused before any cache or result


def test_resume_with_a_partial_metrics_line_and_force_replaces_only_after_validation(workspace):
    root, _, old = workspace
    run = _variant(root, old, "partial", _partial_metrics)
    (run / "checkpoint.pt").write_bytes((old / "checkpoint.pt").read_bytes())
    assert main(["resume", str(run), "--no-progress"]) == 0
    assert [r["step"] for r in runs.read_lines(run / "metrics.jsonl")] == [1, 2, 4]

    target = _variant(root, old, "replaced")
    (target / "eval.json").write_text("{}")
    assert main(["train", *TINY, "train.max_steps=2", "eval.at_end=false", "--out", str(target), "--force"]) == 0
    assert not (target / "eval.json").exists()  # the old run is gone, and so is the folder it was moved to
    assert not [p for p in root.iterdir() if ".replaced-" in p.name]
    assert torch.load(target / "checkpoint.pt", weights_only=True)["step"] == 2


def test_dali_backend_on_resident_images_is_a_config_error():
    from fastemp.config import ConfigError, load_config
    from fastemp.validate import check_config

    with pytest.raises(ConfigError, match="data.backend=dali reads image files: use data.streamed=true") as err:
        check_config(load_config("quickstart", ["data.backend=dali"]))
    assert "\n" not in str(err.value)


def test_disk_full_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    from fastemp.errors import UserError

    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"step": 1}, path)
    good = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        UserError,
        match=f"disk full: could not write {path} \\(the previous checkpoint.pt is intact\\); "
        "free space on the disk holding .*, then run fastemp resume",
    ):
        checkpoint.save({"step": 2}, path)
    assert path.read_bytes() == good and not (tmp_path / "checkpoint.pt.tmp").exists()
    with pytest.raises(UserError, match="no checkpoint of this run exists yet"):
        checkpoint.save({"step": 2}, tmp_path / "other.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_imagefolder_cache_leaves_no_temp_file_on_a_full_disk(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    import numpy as np

    from fastemp.data import imagefolder

    cache = tmp_path / "cache"
    paths = (cache / "x.images.npy", cache / "x.json")
    real_write = Path.write_text

    def full_disk_at_the_second_file(self, text):
        if self.name.startswith(paths[1].name):
            real_write(self, text[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, text)

    monkeypatch.setattr(Path, "write_text", full_disk_at_the_second_file)
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        imagefolder._cache_save(paths, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64), {"classes": ["a"]})
    assert list(cache.iterdir()) == []
