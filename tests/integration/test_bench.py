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
        "round_ratios",
        "cell",
    }
    for r in records:
        assert required <= set(r) and r["batch_size"] == 8 and r["device"] == "cpu"
        assert r["step_time_s"] > 0 and r["examples_per_s"] == pytest.approx(8 / r["step_time_s"])
        assert r["peak_memory_bytes"] >= 0 and r["per_example_bytes"] == 8 * r["parameters"] * 4
        assert len(r["round_ratios"]) == 1 and r["ratio_to_nonprivate"] == r["round_ratios"][0]
        assert r["cell"]["rounds"] == 2  # one round in each of the two runs, pooled
        if r["method"] == "nonprivate":
            assert r["ratio_to_nonprivate"] == 1.0
            assert r["cell"]["ratio"] == 1.0 and r["cell"]["spread"] == 0.0 and not r["cell"]["unstable"]
    assert {r["parameters"] for r in records if r["model"] == "cnn"} == {26010}
    table = outputs["table"].read_text()
    main_table, scaling = table.split("## Scaling with batch size and width")
    assert main_table.count("\n| ") == 1 + 2 * len(setups)  # header and one row per model and setup
    assert scaling.count("\n| ") == 1 + 2 * len(setups)  # the scaling table: one row per model and setup too
    assert "| B = 8 |" in scaling and "| logistic 784-10 | non-private | " in scaling
    assert "| tanh CNN | adaclip/fast | " in scaling
    assert "x non-private (run 1)" in table and "x non-private (run 2)" in table
    assert "| x non-private | spread | stable? |" in main_table and "(Q3 - Q1) / median" in main_table
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
    def record(batch_size, method, path, ratios, step_s):
        return {
            "model": "mlp",
            "batch_size": batch_size,
            "method": method,
            "path": path,
            "run": 1,
            "step_time_s": step_s,
            "cell": bench.ratio_statistics(ratios),
            "peak_memory_bytes": 3 * 2**20,
        }

    records = [
        record(16, "nonprivate", "-", [1.0, 1.0], 0.002),
        record(16, "adaclip", "materialise", [2.0, 3.0, 3.0, 3.0, 4.0], 0.006),
        record(8192, "nonprivate", "-", [1.0, 1.0], 0.5),
        record(8192, "adaclip", "fast", [1.47, 1.5, 1.5, 1.5, 1.53], 0.75),
    ]
    lines = bench.scaling_table(records).splitlines()
    assert lines[0] == "| model | setup | B = 16 | B = 8192 |"
    assert "| MLP 784-100-10 | non-private | 2.00 ms, 3.0 MiB | 500.00 ms, 3.0 MiB |" in lines
    # spread: (Q3 - Q1) / median = (3 - 3) / 3 = 0 and (1.5 - 1.5) / 1.5 = 0
    assert "| MLP 784-100-10 | adaclip/materialise | 3.00x (0 %), 3.0 MiB | - |" in lines
    assert "| MLP 784-100-10 | adaclip/fast | - | 1.50x (0 %), 3.0 MiB |" in lines
    records[1]["cell"] = bench.ratio_statistics([2.0, 2.5, 3.0, 3.5, 4.0])  # (3.5 - 2.5) / 3 = 33 %
    assert "| MLP 784-100-10 | adaclip/materialise | 3.00x (33 %, unstable), 3.0 MiB | - |" in (
        bench.scaling_table(records).splitlines()
    )


def test_spread_is_the_interquartile_range_over_the_median_and_flags_cells_above_ten_percent(bench):
    """Synthetic per-round ratios against hand-computed quartiles (linear interpolation between sorted values)."""
    wide = bench.ratio_statistics([1.4, 1.0, 1.2, 1.3, 1.1])  # sorted 1.0 .. 1.4: Q1 = 1.1, Q3 = 1.3
    assert wide["ratio"] == pytest.approx(1.2) and wide["q1"] == pytest.approx(1.1) and wide["q3"] == pytest.approx(1.3)
    assert wide["spread"] == pytest.approx(0.2 / 1.2) and wide["unstable"] and wide["rounds"] == 5
    narrow = bench.ratio_statistics([2.0, 2.02, 2.04, 2.06, 2.08])
    assert narrow["spread"] == pytest.approx(0.04 / 2.04) and not narrow["unstable"]
    # four rounds: Q1 = 1 + 0.75 * (1.5 - 1) = 1.375 and Q3 = 2.5 + 0.25 * (3 - 2.5) = 2.625, median 2
    four = bench.ratio_statistics([3.0, 1.0, 2.5, 1.5])
    assert four["q1"] == pytest.approx(1.375) and four["q3"] == pytest.approx(2.625)
    assert four["spread"] == pytest.approx(1.25 / 2.0) and four["unstable"]
    # the flag is "exceeds": a spread just below 10 % is stable, just above is not
    assert not bench.ratio_statistics([0.95, 0.95, 1.0, 1.0499, 1.0499])["unstable"]
    assert bench.ratio_statistics([0.949, 0.949, 1.0, 1.051, 1.051])["unstable"]
    single = bench.ratio_statistics([1.7])
    assert single["ratio"] == 1.7 and single["spread"] is None and single["unstable"]
    with pytest.raises(ValueError, match="ratios"):
        bench.ratio_statistics([])


def test_per_round_ratios_pair_each_sample_with_the_baseline_of_its_round(bench):
    assert bench.per_round_ratios([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == [2.0, 2.0, 3.0]
    # a slow setup sampled in the first rounds only is paired with those rounds
    assert bench.per_round_ratios([5.0, 9.0], [1.0, 3.0, 2.0]) == [5.0, 3.0]


def test_cells_pool_the_rounds_of_every_run_and_the_table_marks_unstable_ones(bench, monkeypatch):
    """measure() on scripted timings (no clock): per-run medians, pooled cell statistics and the table's flag."""
    setups = [bench.Setup(m, p, lambda: None) for m, p in (("nonprivate", "-"), ("fixed", "fast"), ("auto", "fast"))]
    monkeypatch.setattr(bench, "build_setups", lambda *args, **kwargs: setups)
    baseline = [1.0, 2.0, 1.0]  # the machine slows down in round 2: paired ratios do not see it
    scripted = iter(
        [
            {0: (baseline, baseline), 1: ([1.5, 3.0, 1.5], baseline), 2: ([1.5, 4.0, 2.0], baseline)},
            {0: (baseline, baseline), 1: ([1.5, 3.0, 1.5], baseline), 2: ([3.0, 6.0, 3.0], baseline)},
        ]
    )
    monkeypatch.setattr(bench, "time_setups", lambda *args, **kwargs: next(scripted))
    records, skipped = bench.measure(["logistic"], [8], ["fixed", "auto"], ["fast"], [], 3, 0, 2, "cpu", progress=False)
    assert not skipped
    by = {(r["method"], r["run"]): r for r in records}
    assert by[("fixed", 1)]["round_ratios"] == [1.5, 1.5, 1.5] and by[("fixed", 2)]["ratio_to_nonprivate"] == 1.5
    assert by[("fixed", 1)]["cell"] == {
        "ratio": 1.5,
        "q1": 1.5,
        "q3": 1.5,
        "spread": 0.0,
        "rounds": 6,
        "unstable": False,
    }
    # auto: run 1 [1.5, 2, 2], run 2 [3, 3, 3]; pooled sorted [1.5, 2, 2, 3, 3, 3]: median 2.5, Q1 2, Q3 3
    assert by[("auto", 1)]["ratio_to_nonprivate"] == 2.0 and by[("auto", 2)]["ratio_to_nonprivate"] == 3.0
    cell = by[("auto", 2)]["cell"]
    assert (cell["ratio"], cell["q1"], cell["q3"]) == (2.5, 2.0, 3.0) and cell["spread"] == pytest.approx(0.4)
    assert cell["unstable"] and by[("auto", 1)]["cell"] == cell
    rows = [line for line in bench.table(records, "note", []).splitlines() if line.startswith("| logistic")]
    assert (
        rows[1].startswith("| logistic 784-10 | 8 | fixed | fast |")
        and "| 1.50 | 0 % | stable | 1.50 | 1.50 |" in rows[1]
    )
    assert "| 2.50 | 40 % | unstable | 2.00 | 3.00 |" in rows[2]
    assert "2.50x (40 %, unstable)" in bench.scaling_table(records)


def test_every_method_steps_on_the_scatternet_linear_workload(bench):
    setups = bench.build_setups("scatter_linear", 6, list(bench.OUR_METHODS), ["fast"], [], "cpu")
    for setup in setups:
        setup.step()
    assert [s.method for s in setups] == ["nonprivate", *bench.OUR_METHODS]
    assert bench.per_example_bytes("scatter_linear", 6) == 6 * (81 * 7 * 7 * 10 + 10) * 4
