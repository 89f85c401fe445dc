"""The benchmark runs end to end in a tiny configuration and writes consistent outputs (no timing assertions)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adaclip_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tiny_benchmark_writes_table_json_and_figure(bench, tmp_path):
    outputs = {
        "table": tmp_path / "t" / "bench.md",
        "json": tmp_path / "m" / "bench.json",
        "figure": tmp_path / "f" / "bench",
    }
    code = bench.main(
        [
            "--models",
            "logistic",
            "cnn",
            "--batch-sizes",
            "8",
            "--methods",
            "fixed",
            "adaclip",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--runs",
            "2",
            "--quiet",
            "--table",
            str(outputs["table"]),
            "--json",
            str(outputs["json"]),
            "--figure",
            str(outputs["figure"]),
        ]
    )
    assert code == 0
    records = json.loads(outputs["json"].read_text())
    setups = {("nonprivate", "-"), ("opacus", "hooks"), ("opacus", "ghost")} | {
        (m, p) for m in ("fixed", "adaclip") for p in ("fast", "materialise")
    }
    assert {(r["model"], r["method"], r["path"], r["run"]) for r in records} == {
        (model, method, path, run) for model in ("logistic", "cnn") for method, path in setups for run in (1, 2)
    }
    required = {
        "model",
        "batch_size",
        "method",
        "path",
        "step_time_s",
        "examples_per_s",
        "ratio_to_nonprivate",
        "peak_memory_bytes",
        "device",
        "largest_tensor_bytes",
        "cpu_time_s",
        "cpu_ratio_to_nonprivate",
    }
    for r in records:
        assert required <= set(r) and r["batch_size"] == 8 and r["device"] == "cpu"
        assert r["step_time_s"] > 0 and r["examples_per_s"] == pytest.approx(8 / r["step_time_s"])
        assert r["peak_memory_bytes"] >= 0 and r["per_example_bytes"] == 8 * r["parameters"] * 4
        if r["method"] == "nonprivate":
            assert r["ratio_to_nonprivate"] == 1.0
    assert {r["parameters"] for r in records if r["model"] == "cnn"} == {26010}
    table = outputs["table"].read_text()
    main_table, scaling = table.split("## Scaling with batch size and width")
    assert main_table.count("\n| ") == 1 + 2 * len(setups)  # header and one row per model and setup
    assert scaling.count("\n| ") == 1 + 2 * len(setups)  # the scaling table: one row per model and setup too
    assert "| B = 8 |" in scaling and "| logistic 784-10 | non-private | " in scaling
    assert "| tanh CNN | adaclip/fast | " in scaling
    assert "x non-private (run 1)" in table and "x non-private (run 2)" in table
    assert (
        outputs["figure"].with_suffix(".png").stat().st_size > 0
        and outputs["figure"].with_suffix(".svg").stat().st_size > 0
    )


def test_fast_path_peak_memory_stays_below_the_per_example_matrix(bench):
    """Allocation sizes, not timings: the materialised path allocates at least [B, d]; the fast path far less."""
    setups = bench.build_setups("mlp", 64, ["fixed", "adaclip"], ["fast", "materialise"], [], "cpu")
    for setup in setups:
        setup.step()  # first step allocates optimizer and rule state
    peaks = {(s.method, s.path): bench.peak_step_memory(s, "cpu") for s in setups}
    largest = {(s.method, s.path): bench.largest_step_tensor(s) for s in setups}
    dim = 784 * 100 + 100 + 100 * 10 + 10
    per_example_bytes = 64 * dim * 4
    for method in ("fixed", "adaclip"):
        assert (
            peaks[(method, "materialise")] >= per_example_bytes
            and largest[(method, "materialise")] >= per_example_bytes
        )
        assert peaks[(method, "fast")] < per_example_bytes / 4
        # parameter-sized at most: the flat gradient and its noise (AdaCliP's quantile-scale count draws d + 1 normals)
        assert largest[(method, "fast")] <= (dim + 1) * 4


def test_params_file_sets_options_and_the_command_line_wins(bench, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "bench:\n  models: [logistic]\n  batch_sizes: [4]\n  methods: [auto]\n  paths: [fast]\n"
        "  baselines: []\n  repeats: 1\n  warmup: 0\n  runs: 2\n"
    )
    out = tmp_path / "bench.json"
    argv = [
        "--params-file",
        str(params),
        "--runs",
        "1",
        "--quiet",
        "--json",
        str(out),
        "--table",
        str(tmp_path / "bench.md"),
        "--figure",
        str(tmp_path / "bench"),
    ]
    assert bench.main(argv) == 0
    records = json.loads(out.read_text())
    assert {(r["model"], r["batch_size"], r["method"], r["path"], r["run"]) for r in records} == {
        ("logistic", 4, "nonprivate", "-", 1),
        ("logistic", 4, "auto", "fast", 1),
    }
    params.write_text("bench:\n  model: [logistic]\n")
    with pytest.raises(SystemExit, match="unknown key"):
        bench.main(["--params-file", str(params)])


def test_bad_options_are_named(bench, tmp_path):
    with pytest.raises(SystemExit, match="repeats"):
        bench.main(["--repeats", "0", "--table", str(tmp_path / "t.md")])
    with pytest.raises(SystemExit):
        bench.main(["--models", "resnet"])


def test_scaling_table_has_a_column_per_batch_size_and_marks_what_was_not_run(bench):
    def record(batch_size, method, path, ratio, step_s):
        return {
            "model": "mlp",
            "batch_size": batch_size,
            "method": method,
            "path": path,
            "run": 1,
            "step_time_s": step_s,
            "ratio_to_nonprivate": ratio,
            "peak_memory_bytes": 3 * 2**20,
        }

    records = [
        record(16, "nonprivate", "-", 1.0, 0.002),
        record(16, "adaclip", "materialise", 3.0, 0.006),
        record(8192, "nonprivate", "-", 1.0, 0.5),
        record(8192, "adaclip", "fast", 1.5, 0.75),
    ]
    lines = bench.scaling_table(records).splitlines()
    assert lines[0] == "| model | setup | B = 16 | B = 8192 |"
    assert "| MLP 784-100-10 | non-private | 2.00 ms, 3.0 MiB | 500.00 ms, 3.0 MiB |" in lines
    assert "| MLP 784-100-10 | adaclip/materialise | 3.00x, 3.0 MiB | - |" in lines
    assert "| MLP 784-100-10 | adaclip/fast | - | 1.50x, 3.0 MiB |" in lines


def test_every_method_steps_on_the_scatternet_linear_workload(bench):
    setups = bench.build_setups("scatter_linear", 6, list(bench.OUR_METHODS), ["fast"], [], "cpu")
    for setup in setups:
        setup.step()
    assert [s.method for s in setups] == ["nonprivate", *bench.OUR_METHODS]
    assert bench.per_example_bytes("scatter_linear", 6) == 6 * (81 * 7 * 7 * 10 + 10) * 4
