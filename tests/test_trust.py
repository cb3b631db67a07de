"""Runs a researcher can trust unattended: numbers as people write them, divergence, bad input,
interrupts, integrity (issue 11)."""

import pytest

import config
import run_experiments as rx
import train_lora


# ---------------------------------------------------------------- numbers as people write them
@pytest.mark.parametrize(
    "text, value",
    [("1e-3", 1e-3), ("5e-4", 5e-4), ("1E-5", 1e-5), ("1e5", 1e5), ("-2.5e-7", -2.5e-7), ("0.001", 0.001), ("3", 3)],
)
def test_exponent_numbers_are_numbers_on_the_command_line_and_in_files(text, value, tmp_path, monkeypatch):
    assert config.parse_overrides(["--client-lr", text]) == {"client_lr": value}
    assert type(config.parse_overrides(["--client-lr", text])["client_lr"]) is type(value)
    if value <= 0:
        return  # a learning rate must be positive; the parsing above is the point
    (tmp_path / "mine.yaml").write_text(f"client_lr: {text}\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    (tmp_path / "basic_config.yaml").write_text(
        (config.Path(train_lora.__file__).parent / "configs" / "basic_config.yaml").read_text()
    )
    assert config.load_config("mine").client_lr == float(value)


def test_client_lr_1e_3_runs(tiny_overrides):
    argv = [f"--{k}={config.yaml_value(v)}" for k, v in tiny_overrides.items() if k != "client_lr"]
    assert train_lora.main([*argv, "--client-lr", "1e-3", "--server-rounds", "1"]) == 0


@pytest.mark.parametrize(
    "value",
    [
        1e-5,
        0.00001,
        5e-4,
        1e300,
        -0.0,
        3,
        0,
        True,
        False,
        None,
        [1, 2.5e-7, "x"],
        "cpu",
        "0",
        "1e-3",
        "null",
        "true",
        "a b: c",
    ],
)
def test_study_values_reach_the_run_exactly(value):
    spec = rx.RunSpec("r", "fedavg", {"opt": value}, "r", {}, {})
    cmd = rx.command(spec, "fresh", config.Path("/tmp"))
    i = cmd.index("--opt")
    back = config.yaml_load(cmd[i + 1])
    assert back == value and type(back) is type(value)


# ---------------------------------------------------------------- divergence
def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (Python's default parser accepts them)."""
    import json

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def every_json_output(run_dir):
    for path in sorted(run_dir.glob("*.json")):
        strict_json(path.read_text())
    return [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_diverging_run_stops_with_exit_3_strict_json_and_a_resumable_checkpoint(tiny_overrides, capsys, monkeypatch):

    from flasc.runtime import checkpoint

    argv = [f"--{k}={config.yaml_value(v)}" for k, v in tiny_overrides.items()] + ["--server-rounds", "4"]
    from flasc.client.worker import ClientWorker

    real = ClientWorker.train_client

    def nan_in_round_2(self, rnd, client, start, grad_mask, extras):
        params, stats = real(self, rnd, client, start, grad_mask, extras)
        return (params * float("nan"), stats) if rnd == 1 else (params, stats)

    monkeypatch.setattr(ClientWorker, "train_client", nan_in_round_2)
    code = train_lora.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == train_lora.EXIT_CODE["diverged"] == 3
    err = [line for line in err if line.startswith("error:")]  # the run's own log precedes it
    assert len(err) == 1 and err[0].startswith("error: round 2: client ") and "update is not finite" in err[0]
    run_dir = config.Path(tiny_overrides["dir"]) / "run"
    assert f"keeps the checkpoint of round 1 (python train_lora.py --resume {run_dir}" in err[0]
    records = every_json_output(run_dir)
    assert [r["round"] for r in records] == [1]  # nothing of the diverged round
    assert strict_json((run_dir / "diverged.json").read_text())["checkpoint_round"] == 1
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter").exists()
    cfg = config.from_mapping(config.yaml_load((run_dir / "config.yaml").read_text()))
    numel = checkpoint.read(run_dir / "checkpoint.pt")["federation"]["server"].numel()
    state = checkpoint.load(run_dir, cfg, numel)
    assert state["round"] == 1 and bool(state["federation"]["server"].isfinite().all())


def test_real_divergence_in_the_first_round_says_start_again(tiny_overrides, capsys):
    argv = [f"--{k}={config.yaml_value(v)}" for k, v in tiny_overrides.items()] + ["--client-lr", "1e6"]
    assert train_lora.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: round 1: ") and "no checkpoint was written" in err[0]
    every_json_output(config.Path(tiny_overrides["dir"]) / "run")


def test_normal_run_outputs_are_strict_json(tiny_overrides):
    run_dir = train_lora.train(
        config.load_config(overrides={**tiny_overrides, "noise_multiplier": 0.01, "l2_clip_norm": 1.0})
    )
    records = every_json_output(run_dir)
    assert len(records) == 3 and all(r["diverged_clients"] == 0 for r in records)
    summary = strict_json((run_dir / "summary.json").read_text())
    assert summary["epsilon"] is None or summary["epsilon"] > 0  # unbounded epsilon is null, never Infinity


def test_skip_drops_diverged_clients_and_counts_them(tiny_overrides, monkeypatch):
    cfg = config.load_config(overrides={**tiny_overrides, "diverged_clients": "skip", "server_batch": 3})
    import torch

    fed = train_lora.build(cfg, torch.device("cpu"))
    real = fed.worker.train_client
    bad = fed.sample_clients(0)[1]

    def one_bad(rnd, client, start, grad_mask, extras):
        params, stats = real(rnd, client, start, grad_mask, extras)
        return (params * float("nan"), stats) if client == bad else (params, stats)

    monkeypatch.setattr(fed.worker, "train_client", one_bad)
    calls = []
    real_aggregate = fed.aggregator.aggregate
    monkeypatch.setattr(
        fed.aggregator, "aggregate", lambda u, s, r: calls.append([x.client_id for x in u]) or real_aggregate(u, s, r)
    )
    record = fed.run_round(0)
    assert record["diverged_clients"] == 1 and bad not in calls[0] and len(calls[0]) == 2
    assert bool(torch.isfinite(fed.server).all())
    assert record["bytes_down"] == 3 * record["bytes_up"] / 2  # all three downloaded, two uploaded


@pytest.mark.slow
def test_study_reports_diverged_runs_apart_and_keeps_them_out_of_means(tmp_path, monkeypatch):
    import json
    import sys

    specs = rx.expand(
        {"experiments": [{"config": "fedavg", "overrides": {"client_lr": 0.1}, "seeds": [0, 1, 2]}]}, str(tmp_path)
    )

    def fake_command(spec, state, out_dir):  # seed 1 diverges, the others finish
        folder = out_dir / spec.name
        saved = config.dump(spec.resolved)  # what a real run writes first
        if spec.overrides["seed"] == 1:
            code = (
                f"import pathlib, sys; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True); "
                f"p.joinpath('config.yaml').write_text({saved!r}); "
                "p.joinpath('diverged.json').write_text('{}'); sys.exit(3)"
            )
        else:
            acc = 0.5 + spec.overrides["seed"] / 10
            summary = json.dumps(
                {
                    "test_accuracy": acc,
                    "best_test_accuracy": acc,
                    "bytes_total": 1e6,
                    "wall_time_s": 1.0,
                    "primary_metric": "accuracy",
                }
            )
            code = (
                f"import pathlib; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True); "
                f"p.joinpath('summary.json').write_text({summary!r})"
            )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(rx, "command", fake_command)
    outcome = rx.run_all(specs, tmp_path, jobs=1)
    assert outcome[specs[1].name].startswith("diverged") and outcome[specs[0].name] == "ok"
    (row,) = rx.results_table(specs, tmp_path)
    assert row["seeds"] == 2 and row["diverged"] == 1
    assert row["test acc"][0] == pytest.approx((0.5 + 0.7) / 2)  # seeds 0 and 2 only
    header, _, line = rx.write_tables([row], tmp_path).splitlines()
    cells = dict(zip(header.strip("|").split(" | "), line.strip("|").split(" | ")))
    assert cells["diverged"].strip() == "1" and cells["seeds"].strip() == "2"
    assert rx.state_of(specs[1], tmp_path) == "diverged"
    assert rx.run_all(specs, tmp_path, jobs=1)[specs[1].name] == "skipped (diverged before)"


# ---------------------------------------------------------------- your own config files
def test_config_accepts_a_yaml_path_anywhere_and_in_studies(tmp_path, monkeypatch):
    mine = tmp_path / "mine" / "my_flasc.yaml"
    mine.parent.mkdir()
    mine.write_text("# my FLASC\nextends: flasc\nclient_lr: 2e-3\n")
    (mine.parent / "child.yml").write_text("extends: my_flasc.yaml\nserver_lr: 0.5\n")  # relative to its file
    cfg = config.load_config(str(mine))
    assert (cfg.client_lr, cfg.dl_density) == (0.002, 0.25)
    monkeypatch.chdir(tmp_path)
    assert train_lora.parse_cli(["--config", "mine/child.yml"]).server_lr == 0.5
    assert train_lora.parse_cli(["--config=mine/child.yml"]).dl_density == 0.25
    with pytest.raises(config.ConfigError, match="--config: no file nope.yaml; expected a config name"):
        config.load_config("nope.yaml")
    specs = rx.expand({"experiments": [{"config": "mine/my_flasc.yaml"}]}, str(tmp_path / "runs"))
    assert specs[0].config == str(mine.resolve()) and specs[0].name == "my_flasc-seed0"
    assert specs[0].resolved["client_lr"] == 0.002


# ---------------------------------------------------------------- malformed files: one line, exit 2
@pytest.mark.parametrize(
    "text, words",
    [
        ("- fedavg\n- flasc\n", "must be a mapping"),
        ("experiments:\n  - config: fedavg\ndefaults: [1, 2]\n", "defaults: expected a mapping"),
        (
            "experiments:\n  - config: fedavg\n    overrides: [client_lr, 0.1]\n",
            "experiments[0]: overrides: expected a mapping",
        ),
        ("dir: 5\nexperiments:\n  - config: fedavg\n", "dir: 5 is not a folder path"),
        ("experiments:\n  - fedavg\n", "experiments[0]: each entry needs 'config: NAME'"),
    ],
)
def test_malformed_experiments_files_are_one_line_and_write_nothing(text, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    study.write_text(text)
    assert rx.main(["--config-list", str(study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_an_unwritable_dir_is_refused_before_loading_anything(tiny_overrides, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    loaded = []
    monkeypatch.setattr(train_lora, "build", lambda *a: loaded.append(a))
    argv = [f"--{k}={config.yaml_value(v)}" for k, v in tiny_overrides.items() if k != "dir"]
    for target in (blocker, blocker / "runs"):
        assert train_lora.main([*argv, "--dir", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: dir: {blocker} is a file, not a folder; expected a folder the runs can be written to"]
    assert loaded == [] and blocker.read_text() == "not a folder"
    study = tmp_path / "study.yaml"
    study.write_text(f"dir: {blocker}/study\nexperiments:\n  - config: fedavg\n")
    assert rx.main(["--config-list", str(study)]) == 2
    assert capsys.readouterr().err.startswith(f"error: dir: {blocker} is a file")


@pytest.mark.slow
def test_a_study_whose_runs_all_fail_writes_no_table(tmp_path, capsys, monkeypatch):
    import sys

    study = tmp_path / "study.yaml"
    study.write_text(f"dir: {tmp_path}/study\nexperiments:\n  - config: fedavg\n    seeds: [0, 1]\n")
    monkeypatch.setattr(rx, "command", lambda spec, state, out_dir: [sys.executable, "-c", "raise SystemExit(1)"])
    assert rx.main(["--config-list", str(study), "--jobs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: all 2 runs failed, none finished; see their logs in")
    assert not (tmp_path / "study" / "results.md").exists() and not (tmp_path / "study" / "results.csv").exists()


# ---------------------------------------------------------------- interrupts
def test_interrupts_wait_inside_deferred_sections_and_not_in_allowed_ones():
    import signal

    from flasc.runtime.interrupts import Interrupted, Interrupts

    it = Interrupts()
    with pytest.raises(Interrupted) as caught:
        with it.deferred():
            it._handle(signal.SIGTERM, None)  # arrives mid-section: waits
            done = True  # the section still completes
    assert done and caught.value.exit_code == 143
    with pytest.raises(Interrupted) as caught:
        with it.deferred():
            with it.allowed():
                it._handle(signal.SIGINT, None)  # local training: raises at once
            raise AssertionError("not reached")
    assert caught.value.exit_code == 130 and it.depth == 0 and it.pending is None


@pytest.mark.slow
def test_an_interrupted_study_stops_its_runs_and_tabulates_what_finished(tmp_path, capsys, monkeypatch):
    import json
    import os
    import signal
    import sys
    import threading

    study = tmp_path / "study.yaml"
    study.write_text(f"dir: {tmp_path}/study\nexperiments:\n  - config: fedavg\n    seeds: [0, 1]\n")
    started = tmp_path / "slow_started"

    def fake_command(spec, state, out_dir):
        folder = out_dir / spec.name
        saved = config.dump(spec.resolved)
        if spec.overrides["seed"] == 0:  # finishes at once
            summary = json.dumps(
                {
                    "test_accuracy": 0.8,
                    "best_test_accuracy": 0.8,
                    "bytes_total": 1e6,
                    "wall_time_s": 1.0,
                    "primary_metric": "accuracy",
                }
            )
            code = (
                f"import pathlib; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True); "
                f"p.joinpath('config.yaml').write_text({saved!r}); p.joinpath('summary.json').write_text({summary!r})"
            )
        else:  # trains until told to stop, then checkpoints and exits 143
            code = (
                f"import pathlib, signal, sys, time; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True); "
                f"p.joinpath('config.yaml').write_text({saved!r}); "
                "signal.signal(signal.SIGTERM, lambda *a: (p.joinpath('checkpoint.pt').write_text('x'), "
                "sys.exit(143))); "
                f"pathlib.Path({str(started)!r}).write_text('1'); time.sleep(60)"
            )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(rx, "command", fake_command)

    def stop_when_both_ran():
        while not (started.exists() and (tmp_path / "study" / "fedavg-seed0" / "summary.json").exists()):
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_both_ran, daemon=True).start()
    assert rx.main(["--config-list", str(study), "--jobs", "2"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted (SIGTERM): 1 running run(s) stopped, 1 group(s) tabulated in ")
    assert (tmp_path / "study" / "fedavg-seed1" / "checkpoint.pt").exists()
    table = (tmp_path / "study" / "results.md").read_text()
    assert "0.8000 ± 0.0000" in table
    assert (
        rx.state_of(rx.expand(config.yaml_load(study.read_text()), f"{tmp_path}/study")[1], tmp_path / "study")
        == "resume"
    )


# ---------------------------------------------------------------- the docs' bad-input table is true
TROUBLESHOOTING = config.Path(train_lora.__file__).parent / "docs" / "troubleshooting.md"


def docs_bad_input_rows():
    import re

    readme = TROUBLESHOOTING.read_text()
    table = readme.split("**Bad input**", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        arg = re.match(r"^`(--[^`]*)`", cells[0])
        if arg and not re.search(r"[A-Z]{4}", arg.group(1)) and not arg.group(1).startswith("--resume"):
            # (FILE / FOLDER placeholders and resumes need a run folder first)
            rows.append((arg.group(1).split(), cells[-1].strip("`")))
    return rows


def test_docs_bad_input_table_has_15_cases_and_its_command_line_ones_are_exact(tmp_path, capsys, monkeypatch):
    rows = docs_bad_input_rows()
    readme = TROUBLESHOOTING.read_text()
    table = readme.split("**Bad input**", 1)[1].split("\n\n", 2)[1]
    assert len(table.splitlines()) - 2 >= 15 and len(rows) >= 10
    monkeypatch.chdir(tmp_path)
    for argv, message in rows:
        where = [] if "--dir" in argv else ["--dir", str(tmp_path / "runs")]  # a row may be about --dir itself
        assert train_lora.main([*where, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, (argv, err)
        expected = message.split("...")[0].rstrip(" (")
        assert err[0].startswith(expected), (argv, err[0], expected)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- integrity
def test_a_flipped_checkpoint_bit_is_refused(tiny_overrides, capsys):
    run_dir = train_lora.train(config.load_config(overrides=tiny_overrides))
    (run_dir / "summary.json").unlink()  # as if it had stopped while saving the adapter
    path = run_dir / "checkpoint.pt"
    blob = bytearray(path.read_bytes())
    blob[len(blob) * 2 // 3] ^= 0x10  # one bit, inside the saved tensors
    path.write_bytes(bytes(blob))
    assert train_lora.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume: {path} is damaged (its content does not match its checksum); start the run again"]
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_a_live_run_folder_is_locked_against_a_second_writer(tiny_overrides, capsys):
    import subprocess
    import sys

    from flasc.runtime import tracking

    run_dir = train_lora.train(config.load_config(overrides=tiny_overrides))
    (run_dir / "summary.json").unlink()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); f.truncate(); f.write('4242'); f.flush(); "
            "print('locked', flush=True); time.sleep(60)",
            str(run_dir / tracking.LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (run_dir / "metrics.jsonl").read_text()
        assert train_lora.main(["--resume", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: --resume: {run_dir} is being written by a live process (pid 4242); "
            "wait for it to end or stop it first"
        ]
        assert (run_dir / "metrics.jsonl").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    assert train_lora.main(["--resume", str(run_dir)]) == 0  # the lock died with its process
    assert (run_dir / "summary.json").exists()


def test_config_yaml_names_the_folder_actually_used(tiny_overrides):
    first = train_lora.train(config.load_config(overrides={**tiny_overrides, "server_rounds": 0}))
    second = train_lora.train(config.load_config(overrides={**tiny_overrides, "server_rounds": 0}))
    assert (first.name, second.name) == ("run", "run-1")
    assert config.yaml_load((second / "config.yaml").read_text())["name"] == "run-1"


def test_adapter_config_is_canonical(tiny_overrides, tmp_path):
    import json

    import torch

    from flasc import models

    cfg = config.load_config(overrides=tiny_overrides)
    fed = train_lora.build(cfg, torch.device("cpu"))
    fed.model.peft_config["default"].target_modules = ["value", "query"]  # as a set may iterate
    models.save_trained(fed.model, tmp_path / "adapter")
    text = (tmp_path / "adapter" / "adapter_config.json").read_text()
    values = json.loads(text)
    assert values["target_modules"] == ["query", "value"]
    assert text == json.dumps(values, indent=2, sort_keys=True) + "\n"
    reloaded = models.load_trained(cfg, tmp_path / "adapter", 3, 0)  # peft still reads it
    assert sorted(reloaded.peft_config["default"].target_modules) == ["query", "value"]
