"""The generated report states numbers read from the summary, and lists every question."""

from adaclip.research.report import QUESTIONS, findings, headline_metrics, render_readme

SUMMARY = {
    "profile": "quick",
    "privacy": {"delta": 1e-5, "accountant": "prv", "main_epsilon": 3.0},
    "accuracy": {
        "fashion-mnist": {
            "metric": "test accuracy (%)",
            "higher_is_better": True,
            "by_epsilon": {
                "3": {
                    "fixed": {"mean": 80.25, "std": 0.1, "seeds": 2},
                    "adaclip": {"mean": 79.5, "std": 0.2, "seeds": 2},
                }
            },
            "nonprivate": {"mean": 84.0, "std": 0.0},
            "best_at_main_epsilon": {"method": "fixed", "mean": 80.25},
        },
        "diabetes": {
            "metric": "test MSE",
            "higher_is_better": False,
            "by_epsilon": {
                "3": {"fixed": {"mean": 0.61, "std": 0.0, "seeds": 2}, "adaclip": {"mean": 0.6, "std": 0.0, "seeds": 2}}
            },
            "nonprivate": None,
            "best_at_main_epsilon": {"method": "adaclip", "mean": 0.6},
        },
    },
    "clip": {
        "flat_regions": {
            "fixed": {"decades": 1.0, "flat_low": 0.1, "flat_high": 1.0},
            "adaclip": {"decades": 3.0, "flat_low": 0.01, "flat_high": 10.0},
        },
        "grid": [0.001, 100.0],
    },
    "size": {
        "fixed": {"1000": {"mean": 70.0}, "30000": {"mean": 82.0}},
        "adaclip": {"1000": {"mean": 72.5}, "30000": {"mean": 81.0}},
    },
    "diagnostics": {
        "fixed": {"noise_power": 0.5, "cosine_to_clean": 0.25, "clipped_fraction": 1.0, "noise_multiplier": 1.0},
        "adaclip": {"noise_power": 2.0, "cosine_to_clean": 0.125, "clipped_fraction": 0.5, "noise_multiplier": 1.0},
    },
    "theory": {"dim": 100, "noise_power_ratio": {"1": 1.0, "1000": 0.25}},
    "compute": {
        "mlp/B=64": {
            "adaclip/fast": {"ratio_to_nonprivate": 9.0},
            "fixed/fast": {"ratio_to_nonprivate": 3.0},
            "opacus/hooks": {"ratio_to_nonprivate": 12.0},
        },
        "mlp/B=600": {
            "adaclip/fast": {"ratio_to_nonprivate": 1.75},
            "fixed/materialise": {"ratio_to_nonprivate": 50.0},
            "nonprivate/-": {"ratio_to_nonprivate": 1.0},
        },
    },
    "audit": {
        "fixed": {"kind": "rule", "passed": True, "theoretical_epsilon": 3.0, "lower_bound": 0.5},
        "adaclip (optimizer)": {"kind": "optimizer", "passed": True, "theoretical_epsilon": 6.0, "lower_bound": 1.5},
        "control: no clipping": {"kind": "control", "passed": False, "theoretical_epsilon": 3.0, "lower_bound": 4.0},
        "control: noise halved": {"kind": "control", "passed": True, "theoretical_epsilon": 3.0, "lower_bound": 1.0},
    },
}


def test_findings_read_every_number_from_the_summary():
    found = findings(SUMMARY)
    assert "AdaCliP injected 4× the noise power of DP-SGD" in found["noise"]
    assert "DP-SGD (fixed C) 0.25, AdaCliP 0.12" in found["noise"]  # report order, 2 decimals
    assert "0.25× DP-SGD's noise power when per-coordinate gradient std spreads over a factor 1000" in found["noise"]
    assert "from 0.001 to 100 (5 decades" in found["clip"]
    assert "DP-SGD (fixed C) 1 decade(s) (C0 from 0.1 to 1); AdaCliP 3 decade(s) (C0 from 0.01 to 10)" in found["clip"]
    assert "fashion-mnist: DP-SGD (fixed C) was best with 80.2% (AdaCliP 79.5%; non-private 84.0%)" in found["accuracy"]
    assert "diabetes: AdaCliP was best with 0.600 MSE (DP-SGD (fixed C) 0.610 MSE)" in found["accuracy"]
    assert "+2.5 points at n = 1000 and -1.0 points at n = 30000" in found["size"]
    assert found["compute"] == (
        "Step time relative to non-private training, measured in one process: mlp/B=64: 3.00× (DP-SGD (fixed C)) to 9.00× (AdaCliP) "
        "on the fast path (opacus/hooks 12.00×); mlp/B=600: 1.75× (AdaCliP) to 1.75× (AdaCliP) on the fast path ()."
    )
    assert found["audit"] == (
        "2 of 2 audits of correct methods passed (largest audited lower bound: 1.50 against ε = 6.00 for "
        "adaclip (optimizer)); 1 of 2 deliberately broken controls were caught."
    )


def test_readme_lists_every_question_with_its_figures_and_inline_tables():
    text = render_readme(SUMMARY, {"tables/accounting.md": "| a |\n|---|\n"})
    for _key, title, figures, _, _table in QUESTIONS:
        assert f"## {title}" in text
        assert all(f"({stem}.png)" in text for stem in figures)
    assert "| a |" in text and "`quick` profile" in text


def test_headline_metrics_are_method_keyed_tables():
    metrics = headline_metrics(SUMMARY)
    assert metrics["q3_fashion-mnist_eps3"] == {"fixed": 80.25, "adaclip": 79.5, "nonprivate": 84.0}
    assert metrics["q2_flat_decades"] == {"fixed": 1.0, "adaclip": 3.0}
    assert metrics["q4_smallest_n"] == {"fixed": 70.0, "adaclip": 72.5}
    assert metrics["q5_step_time_ratio_mlp"] == {"adaclip": 1.75}


def test_a_section_without_finding_or_table_is_left_out():
    summary = {k: v for k, v in SUMMARY.items() if k != "audit"}
    text = render_readme(summary, {})
    assert "privacy audit" not in text and "## 5. What does it cost in compute?" in text
