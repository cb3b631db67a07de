"""run_experiments.py: grid expansion, skip / resume / failure isolation, tables; plot.py."""

import json
import sys

import pytest
import yaml

import config
import plot
import run_experiments as rx


def study(**extra):
    return {
        "seeds": [0, 1],
        "defaults": {"server_rounds": 3},
        "experiments": [
            {"config": "fedavg", "overrides": {"merging_strategy": ["average", "ties"], "client_lr": 0.1}},
            {"config": "flasc", "seeds": [5]},
        ],
        **extra,
    }


def test_grid_expands_as_a_cartesian_product_with_seeds(tmp_path):
    specs = rx.expand(study(), str(tmp_path))
    assert [s.name for s in specs] == [
        "fedavg-merging_strategy=average-seed0",
        "fedavg-merging_strategy=average-seed1",
        "fedavg-merging_strategy=ties-seed0",
        "fedavg-merging_strategy=ties-seed1",
        "flasc-seed5",
    ]
    ties = specs[2]
    assert ties.resolved["merging_strategy"] == "ties" and ties.resolved["client_lr"] == 0.1
    assert ties.resolved["server_rounds"] == 3 and ties.resolved["seed"] == 0
    assert specs[4].resolved["dl_density"] == 0.25 and specs[4].group == "flasc"


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"experiments": []}, ["non-empty"]),
        ({"experiments": [{"overrides": {}}]}, ["experiments[0]", "config"]),
        ({"experiments": [{"config": "fedavg", "overrides": {"client_lr": -1}}]}, ["experiments[0]", "client_lr"]),
        ({"experiments": [{"config": "fedavg", "overrides": {"seed": 3}}]}, ["seed", "set by the study"]),
        ({"experiments": [{"config": "nope"}]}, ["no config named"]),
        ({"experiments": [{"config": "fedavg"}, {"config": "fedavg"}]}, ["same run name"]),
        ({"experiment": []}, ["experiments"]),
    ],
)
def test_bad_studies_are_refused_clearly(bad, words, tmp_path):
    with pytest.raises(rx.StudyError) as e:
        rx.expand(bad, str(tmp_path))
    for w in words:
        assert w in str(e.value)


def fake_run(folder, resolved, acc, finished=True, checkpoint=False, epsilon=None, metric=None):
    """A finished (or not) run folder; metric: the primary metric's name (old summaries had none)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    key = metric or "accuracy"
    evals = [
        {"round": r, f"test_{key}": acc * r / 3, "bytes_up_total": 1e6 * r, "bytes_down_total": 1e6 * r}
        for r in (1, 2, 3)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"x")
    if finished:
        s = {f"test_{key}": acc, f"best_test_{key}": acc + 0.01, "bytes_total": 6e6, "wall_time_s": 10.0}
        if metric is not None:
            s["primary_metric"] = metric
        if epsilon is not None:
            s["epsilon"] = epsilon
        (folder / "summary.json").write_text(json.dumps(s))


def test_skip_resume_and_conflict_states(tmp_path):
    specs = rx.expand(study(), str(tmp_path))
    fake_run(tmp_path / specs[0].name, specs[0].resolved, 0.9)
    fake_run(tmp_path / specs[1].name, specs[1].resolved, 0.9, finished=False, checkpoint=True)
    fake_run(tmp_path / specs[2].name, {**specs[2].resolved, "client_lr": 0.2}, 0.9)
    fake_run(tmp_path / specs[3].name, specs[3].resolved, 0.9, finished=False)
    assert [rx.state_of(s, tmp_path) for s in specs] == ["done", "resume", "conflict", "fresh", "fresh"]
    assert rx.command(specs[1], "resume", tmp_path)[-2:] == ["--resume", str(tmp_path / specs[1].name)]
    cmd = rx.command(specs[2], "fresh", tmp_path)
    assert "--merging_strategy" in cmd and cmd[cmd.index("--merging_strategy") + 1] == "ties"


def test_runs_made_before_an_option_existed_still_count(tmp_path):
    """A finished run whose config.yaml lacks an option added to flasc later (it ran as the option's
    default does) is done, not a conflict; one whose config has an option flasc does not know is."""
    specs = rx.expand(study(), str(tmp_path))
    older = {k: v for k, v in specs[0].resolved.items() if k != "client_parallelism"}
    fake_run(tmp_path / specs[0].name, older, 0.9)
    fake_run(tmp_path / specs[1].name, {**older, "client_parallelism": 4}, 0.9)
    fake_run(tmp_path / specs[2].name, {**specs[2].resolved, "no_such_option": 1}, 0.9)
    assert [rx.state_of(s, tmp_path) for s in specs[:3]] == ["done", "conflict", "conflict"]


@pytest.mark.slow
def test_failures_are_isolated_and_reported(tmp_path, monkeypatch):
    specs = rx.expand({"experiments": [{"config": "fedavg", "overrides": {"client_lr": [0.1, 0.2]}}]}, str(tmp_path))

    def fake_command(spec, state, out_dir):  # the first run fails, the second "trains"
        if "0.1" in spec.name:
            return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        code = (
            f"import json, pathlib; p = pathlib.Path({str(out_dir / spec.name)!r}); p.mkdir(parents=True); "
            f"p.joinpath('summary.json').write_text('{{}}')"
        )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(rx, "command", fake_command)
    outcome = rx.run_all(specs, tmp_path, jobs=2)
    assert outcome[specs[0].name].startswith("failed (exit 3)") and "logs" in outcome[specs[0].name]
    assert outcome[specs[1].name] == "ok"
    assert "boom" in (tmp_path / "logs" / f"{specs[0].name}.log").read_text()


def test_results_table_mean_and_std_over_seeds(tmp_path):
    specs = rx.expand(study(), str(tmp_path))
    for spec, acc in zip(specs, (0.8, 0.9, 0.7, 0.7, 0.5)):
        fake_run(tmp_path / spec.name, spec.resolved, acc)
    rows = rx.results_table(specs, tmp_path)
    assert len(rows) == 3 and rows[0]["seeds"] == 2
    mean, std = rows[0]["test acc"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.0707107, rel=1e-4)  # sample std
    assert rows[1]["test acc"] == (pytest.approx(0.7), 0.0)
    md = rx.write_tables(rows, tmp_path)
    assert "0.8500 ± 0.0707" in md and (tmp_path / "results.csv").read_text().count("\n") == 4


def test_tables_and_plots_use_each_runs_primary_metric(tmp_path):
    specs = rx.expand(study(), str(tmp_path))
    for spec, score in zip(specs, (0.6, 0.7, 0.5, 0.5, 0.4)):
        fake_run(tmp_path / spec.name, spec.resolved, score, metric="micro_f1")
    rows = rx.results_table(specs, tmp_path)
    assert rows[0]["test micro_f1"] == (pytest.approx(0.65), pytest.approx(0.0707107, rel=1e-4))
    assert "test acc" not in rows[0]
    md = rx.write_tables(rows, tmp_path)
    assert md.splitlines()[0].count("micro_f1") == 2 and "0.6500 ± 0.0707" in md
    runs = [plot.load_run(tmp_path / s.name) for s in specs]
    assert [e["test_micro_f1"] for e in runs[0]["evals"]] == pytest.approx([0.2, 0.4, 0.6])
    assert plot.main([str(tmp_path / s.name) for s in specs] + ["--out", str(tmp_path / "figs")]) == 0


def test_dry_run_prints_the_expanded_runs(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study(dir=str(tmp_path / "out"))))
    assert rx.main(["--config-list", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 runs" in out and "fedavg-merging_strategy=ties-seed1" in out
    assert not (tmp_path / "out").exists()


def test_bad_experiments_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("experiments: [{config: fedavg, overrides: {dl_density: 2}}]")
    assert rx.main(["--config-list", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dl_density" in err[0]


def test_shipped_experiments_file_expands():
    from conftest import ROOT

    specs = rx.expand(yaml.safe_load((ROOT / "experiments.yaml").read_text()), "runs/x")
    assert len(specs) >= 4 and len({s.resolved["merging_strategy"] for s in specs}) >= 3


# ---------------------------------------------------------------- plot.py
def test_plot_writes_png_and_pdf_with_seed_bands(tmp_path):
    base = dict(config.load_config())
    dirs = []
    for i, (strategy, seed, acc) in enumerate([("average", 0, 0.8), ("average", 1, 0.9), ("ties", 0, 0.7)]):
        d = tmp_path / f"r{i}"
        fake_run(d, {**base, "merging_strategy": strategy, "seed": seed, "name": f"r{i}"}, acc)
        dirs.append(str(d))
    assert plot.main([*dirs, "--out", str(tmp_path / "figs")]) == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    for stem in ("accuracy_vs_round", "accuracy_vs_megabytes", "final_accuracy"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (tmp_path / "figs" / f"{stem}.png").stat().st_size > 1000


def test_plot_refuses_empty_or_unfinished_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err
    fake_run(tmp_path / "half", dict(config.load_config()), 0.5, finished=False)
    assert plot.main([str(tmp_path / "half")]) == 2
    assert "unfinished" in capsys.readouterr().err
    assert plot.main([]) == 2


def test_plot_draws_shadow_gains_drift_and_time_curves(tmp_path):
    base = dict(config.load_config())
    dirs = []
    for seed, gain in ((0, 0.01), (1, 0.03)):
        d = tmp_path / f"s{seed}"
        fake_run(d, {**base, "seed": seed, "name": d.name, "shadow_strategies": ["ties"]}, 0.8)
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for m in lines:
            m.update({"seconds": 2.0, "shadow_ties_gain": gain * m["round"], "drift_cosine_mean": 0.1 * seed})
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        dirs.append(str(d))
    runs = [plot.load_run(plot.Path(d)) for d in dirs]
    assert [e["elapsed_seconds"] for e in runs[0]["evals"]] == [2.0, 4.0, 6.0]  # cumulative from "seconds"
    assert plot.shadow_names(runs) == ["ties"]

    class Axes:  # records what _band draws
        def plot(self, x, y, **kw):
            self.line = (x, y)
            return [type("Line", (), {"get_color": lambda self: "k"})()]

        def fill_between(self, x, lo, hi, **kw):
            self.band = (lo, hi)

    ax = Axes()
    assert plot._band(ax, runs, "shadow_ties_gain", "ties")
    assert ax.line[0] == [1, 2, 3] and ax.line[1] == pytest.approx([0.02, 0.04, 0.06])  # mean of the seeds
    assert ax.band == (pytest.approx([0.01, 0.02, 0.03]), pytest.approx([0.03, 0.06, 0.09]))
    assert plot.ema([1.0, 0.0, 0.0], 0.5) == [1.0, 0.5, 0.25]

    assert plot.main([*dirs, "--out", str(tmp_path / "figs"), "--ema", "0.5"]) == 0
    for stem in ("shadow_gain_vs_round", "drift_vs_round", "accuracy_vs_seconds"):
        assert (tmp_path / "figs" / f"{stem}.png").stat().st_size > 1000
    assert plot.main([*dirs, "--ema", "1.5"]) == 2


def test_a_list_valued_option_is_a_value_and_a_list_of_lists_its_axis(tmp_path):
    specs = rx.expand(
        {
            "defaults": {"shadow_strategies": ["ties", "fisher"]},
            "experiments": [
                {"config": "fedavg", "overrides": {"iid_alpha": [0.1, 1.0]}},
                {"config": "flasc", "overrides": {"shadow_strategies": [["ties"], ["dare"]]}},
            ],
        },
        str(tmp_path),
    )
    assert [s.resolved["shadow_strategies"] for s in specs] == [["ties", "fisher"]] * 2 + [["ties"], ["dare"]]
    assert [s.resolved["iid_alpha"] for s in specs[:2]] == [0.1, 1.0]
    cmd = rx.command(specs[0], "fresh", tmp_path)
    assert cmd[cmd.index("--shadow_strategies") + 1] == "[ties, fisher]"  # read back as the same list


def test_study_tables_of_shadow_gains_and_drift_by_hand(tmp_path):
    from flasc.studies import tables as study_tables

    specs = rx.expand(
        {"seeds": [0, 1], "experiments": [{"config": "fedavg", "overrides": {"iid_alpha": [0.1, 100.0]}}]},
        str(tmp_path),
    )
    gains = {0.1: [[0.02, 0.04, 0.0, 0.02], [0.0, 0.02, -0.02, 0.0]], 100.0: [[0.0] * 4, [-0.01] * 4]}
    for spec in specs:
        fake_run(tmp_path / spec.name, spec.resolved, 0.8)
        g = gains[spec.resolved["iid_alpha"]][spec.resolved["seed"]]
        lines = [
            {"round": r + 1, "shadow_ties_gain": g[r], "drift_cosine_mean": 0.5 + spec.resolved["seed"] / 10}
            for r in range(4)
        ]
        (tmp_path / spec.name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    md = study_tables.shadow_table(specs, tmp_path)
    rows = [x for x in md.splitlines() if x.startswith("| iid_alpha")]
    # alpha 0.1: seed means 0.02 and 0.0 -> +0.0100 ± 0.0141; first half (rounds 1-2): 0.03, 0.01; second: 0.01, -0.01
    assert rows[0] == "| iid_alpha=0.1 | 2 | +0.0100 ± 0.0141 |"
    assert (
        rows[2] == "| iid_alpha=0.1 | 2 | +0.0200 ± 0.0141 |" and rows[4] == "| iid_alpha=0.1 | 2 | +0.0000 ± 0.0141 |"
    )
    assert rows[1] == "| iid_alpha=100.0 | 2 | -0.0050 ± 0.0071 |"
    assert rows[6] == "| iid_alpha=0.1 | 0.50 |" and rows[7] == "| iid_alpha=100.0 | 0.00 |"  # 4 of 8 rounds won
    drift = study_tables.drift_table(specs, tmp_path)
    assert "| iid_alpha=0.1 | 2 | 0.5500 ± 0.0707 |" in drift
    assert (tmp_path / "shadows.md").read_text() == md and (tmp_path / "drift.md").is_file()


def test_the_merging_study_files_expand():
    from conftest import ROOT

    shadows = rx.expand(yaml.safe_load((ROOT / "experiments" / "merging_study.yaml").read_text()), "runs/x")
    assert len(shadows) == 18 and {s.resolved["client_epochs"] for s in shadows} == {1, 5}
    assert {s.resolved["iid_alpha"] for s in shadows} == {0.1, 1.0, 100.0}
    assert all(len(s.resolved["shadow_strategies"]) == 8 for s in shadows)
    full = rx.expand(yaml.safe_load((ROOT / "experiments" / "merging_study_full.yaml").read_text()), "runs/y")
    # whole runs with exactly the settings their shadows had in stage 1
    same = ("server_rounds", "max_length", "fisher_examples", "density", "ties_scope", "client_lr", "clients")
    assert all(f.resolved[k] == shadows[0].resolved[k] for f in full for k in same)


def test_results_table_has_personal_tier_and_seconds_per_round_columns(tmp_path):
    specs = rx.expand({"seeds": [0, 1], "experiments": [{"config": "fedsa"}]}, str(tmp_path))
    for spec, (personal, glob, tier0, secs) in zip(
        specs, ((0.9, 0.6, 0.5, [1.0, 9.0, 3.0]), (0.8, 0.4, 0.7, [2.0, 2.0, 4.0]))
    ):
        folder = tmp_path / spec.name
        fake_run(folder, spec.resolved, 0.7)
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(personal_accuracy_mean=personal, personal_global_accuracy_mean=glob, tier0_test_accuracy=tier0)
        (folder / "summary.json").write_text(json.dumps(summary))
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        (folder / "metrics.jsonl").write_text(
            "".join(json.dumps({**m, "train_seconds": s}) + "\n" for m, s in zip(lines, secs))
        )
    row = rx.results_table(specs, tmp_path)[0]
    assert row["algorithm"] == "fedsa"
    assert row["personal acc"] == (pytest.approx(0.85), pytest.approx(0.0707107, rel=1e-4))
    assert row["global acc on local tests"][0] == pytest.approx(0.5)
    assert row["tier0 test acc"][0] == pytest.approx(0.6)
    assert row["s/round"][0] == pytest.approx(2.5)  # medians 3.0 and 2.0 of each run's rounds
    header = rx.write_tables([row], tmp_path).splitlines()[0]
    assert header.index("test acc") < header.index("personal acc") < header.index("MB") < header.index("s/round")


def test_the_baselines_study_compares_every_method_on_the_same_clients():
    from conftest import ROOT

    specs = rx.expand(yaml.safe_load((ROOT / "experiments" / "baselines.yaml").read_text()), "runs/z")
    algos = {
        (s.resolved["algorithm"], s.resolved["freeze_a"], s.resolved["merging_strategy"], s.resolved["tiers"])
        for s in specs
    }
    assert {a for a, _, _, t in algos if t == 1} == {"fedavg", "fedsa", "flora", "fedex", "scaffold"}
    assert {a for a, _, _, t in algos if t == 3} == {"fedavg", "flexlora", "hetlora", "flora"}
    same = (
        "iid_alpha",
        "clients",
        "server_batch",
        "server_rounds",
        "max_length",
        "eval_personalized",
        "local_test_fraction",
        "client_lr",
        "lora_rank",
    )
    assert all(s.resolved[k] == specs[0].resolved[k] for s in specs for k in same)
    assert specs[0].resolved["iid_alpha"] == 0.1 and len({s.resolved["seed"] for s in specs}) >= 2


def test_paired_differences_to_the_studys_first_group_by_hand(tmp_path):
    """Per seed, run minus the first group's run of that seed; mean ± std/√n over the common seeds,
    a * beyond two standard errors; a seed only one of the two finished is left out."""
    from flasc.studies import tables as study_tables

    study = {"seeds": [0, 1, 2], "experiments": [{"config": "fedavg"}, {"config": "ffa"}, {"config": "flasc"}]}
    specs = rx.expand(study, str(tmp_path))
    acc = {"fedavg": [0.80, 0.70, 0.90], "ffa": [0.85, 0.76, 0.93], "flasc": [0.82, 0.68, None]}
    for spec in specs:
        value = acc[spec.group][spec.resolved["seed"]]
        if value is not None:
            fake_run(tmp_path / spec.name, spec.resolved, value)
    md = study_tables.paired_table(specs, tmp_path)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ff") or "| flasc" in line}
    # ffa: differences 0.05, 0.06, 0.03 -> mean 0.0467, std 0.01528, se 0.00882: beyond 2 se
    assert rows["ffa"] == "| ffa | fedavg | 3 | +0.0467 ± 0.0088 * |"
    # flasc: seeds 0 and 1 only, differences 0.02, -0.02 -> mean 0, se 0.02
    assert rows["flasc"] == "| flasc | fedavg | 2 | +0.0000 ± 0.0200 |"
    assert (tmp_path / "paired.md").read_text() == md

    # paired_with: flasc against ffa (0.82 - 0.85, 0.68 - 0.76: mean -0.055, se 0.025), ffa a reference only
    study["experiments"][1]["paired_with"] = "ffa"
    study["experiments"][2]["paired_with"] = "ffa"
    md = study_tables.paired_table(rx.expand(study, str(tmp_path)), tmp_path)
    assert [line for line in md.splitlines() if line.startswith("| f")] == ["| flasc | ffa | 2 | -0.0550 ± 0.0250 * |"]
    study["experiments"][2]["paired_with"] = "dense"
    with pytest.raises(rx.StudyError, match=r"experiments\[2\]: paired_with: 'dense' is no group of this study"):
        rx.expand(study, str(tmp_path))


def test_the_2025_study_joins_the_24_round_study_and_the_density_study_sweeps_flascs_densities():
    """baselines_2025: the 24-round study's federation and seeds 0 and 1 among at least 4, every
    2025 method, SCAFFOLD with plain SGD. flasc_density: download = upload density 1, 1/4, 1/16,
    1/64 at alpha 0.5 and 0.1 on 3 seeds, every other option the quickstart's."""
    from conftest import ROOT

    load = lambda name: rx.expand(yaml.safe_load((ROOT / "experiments" / name).read_text()), "runs/z")  # noqa: E731
    new, old = load("baselines_2025.yaml"), load("baselines_long.yaml")
    same = ("iid_alpha", "clients", "server_batch", "server_rounds", "max_length", "local_test_fraction", "seed")
    joined = {tuple(s.resolved[k] for k in same) for s in old}
    assert joined <= {tuple(s.resolved[k] for k in same) for s in new}
    assert len({s.resolved["seed"] for s in new}) >= 4
    assert {"rolora", "fedsb", "fedsvd", "lorafair"} <= {s.resolved["algorithm"] for s in new}
    assert all(s.resolved["client_momentum"] == 0 for s in new if s.resolved["algorithm"] == "scaffold")
    assert any(s.resolved["flexlora_split"] == "balanced" and s.resolved["tiers"] == 3 for s in new)

    density = load("flasc_density.yaml")
    quick = config.load_config("fedavg")
    grid = {(s.resolved["iid_alpha"], s.resolved["dl_density"], s.resolved["seed"]) for s in density}
    assert grid == {(a, d, seed) for a in (0.5, 0.1) for d in (1, 1 / 4, 1 / 16, 1 / 64) for seed in (0, 1, 2)}
    ignore = {"iid_alpha", "dl_density", "ul_density", "seed", "name", "dir", "config"}
    for s in density:
        assert s.resolved["ul_density"] == s.resolved["dl_density"]
        assert {k: v for k, v in s.resolved.items() if k not in ignore} == {
            k: v for k, v in quick.items() if k not in ignore
        }
