"""`fastemp bench data`: the four arms' rows, with the fields the issue asks for, on a toy CPU run."""

import json

from fastemp.cli import main

NUM = (int, float)


def test_data_bench_rows_and_output_contract(tmp_path):
    code = main(
        [
            "bench",
            "data",
            "--device",
            "cpu",
            "--sources",
            "24",
            "--patch",
            "16",
            "--n",
            "2",
            "--batch",
            "4",
            "--workers",
            "0",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--classes",
            "2",
            "--per-class",
            "2",
            "model.width=8",
            "model.hidden_dim=16",
            "model.z_dim=8",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "data.json").read_text())
    assert result["benchmark"] == "data" and result["partial"] is False
    assert {"device", "torch", "commit"} <= set(result["environment"])
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"pillow", "dali", "resident", "step_only"}
    for arm, r in rows.items():
        assert (r["source_px"], r["patch_px"], r["n_patches"], r["batch_size"]) == (24, 16, 2, 4)
        if r["status"] == "skipped":  # DALI missing
            assert arm == "dali" and r["images_per_s"] is None
            continue
        assert r["status"] == "ok", r
        assert isinstance(r["images_per_s"], NUM) and r["images_per_s"] > 0
        assert 0.0 <= r["data_added_fraction"] < 1.0 and isinstance(r["cpu_workers"], int)
    assert rows["step_only"]["data_added_fraction"] == 0.0
    assert "| 24 | 16 | pillow |" in (tmp_path / "data.md").read_text()


def test_a_step_that_cannot_run_marks_every_arm(tmp_path):
    from fastemp.benchmarks.data_bench import ARMS, run_data_bench

    # a batch larger than the folder: the trainer refuses it, and the source still gets its four rows
    result = run_data_bench(
        "cpu",
        sources=(16,),
        n=2,
        batch=4,
        workers=0,
        warmup=0,
        steps=1,
        classes=2,  # a probe needs two classes
        per_class=1,
        patch=8,
        overrides=["model.width=8", "train.batch_size=64"],
        folder_root=str(tmp_path),
    )
    assert [r["arm"] for r in result["rows"]] == list(ARMS)
    assert all(r["status"] == "error" and "batch_size" in r["note"] for r in result["rows"])
