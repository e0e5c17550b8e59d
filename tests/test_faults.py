"""Fault injection with the real oracle (Psi4 hf/sto-3g on molecules of 3-6 atoms).

Every writing stage runs as a subprocess, as a user runs it, and is killed with SIGKILL at
points a seeded RNG picks (after a number of output events: rows, records, log lines, plus a
random delay, so some kills land mid-write); after some kills a partial JSON line is
appended (a kill mid-write). Each kill is followed by the same command again, and the
last run goes to the end. Its outputs must equal an uninterrupted run's: no row lost, none
doubled, the same numbers. Also: two writers on one output (the second is refused, naming
the holder's PID), an oracle that always fails (a non-zero exit, no spin), corrupt tails.

The default suite runs one chain of 2 kill points per stage, and SIGTERM or Ctrl-C once per
stage. The soak (`pytest -m soak tests/test_faults.py`, by hand) runs 20 seeded chains of 5
per stage, 100 kill points per stage, and both signals.
"""
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import oracle_pool
import safe_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ORACLE = ["--oracle_method", "hf/sto-3g", "--n_workers", "1"]
MOLECULES = "O water\nC methane\nN ammonia\nCO methanol\nC=O formaldehyde\nCN methylamine\n"
MODEL = ["--n_atom_basis", "8", "--n_interactions", "1", "--n_rbf", "8"]
N_KILLS = 2          # a chain in the default suite; the soak runs chains of SOAK_KILLS
SOAK_KILLS = 5


def command(script, *argv):
    return [sys.executable, os.path.join(ROOT, script), *map(str, argv)]


def run(script, *argv, timeout=300):
    """The stage to its end: (exit status, stdout, stderr)."""
    p = subprocess.run(command(script, *argv), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def ok(script, *argv):
    rc, out, err = run(script, *argv)
    assert rc == 0, err[-3000:]
    return out


def db_rows(path):
    """Rows of an ASE db, read while another process may be writing it (0 if not yet)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2) as con:
            return con.execute("SELECT COUNT(*) FROM systems").fetchone()[0]
    except sqlite3.Error:
        return 0


def lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def kill_and_rerun(script, argv, events, n_events, seed, tmp_path, step=(0, 2),
                   torn_file=None, n_kills=N_KILLS):
    """n_kills times: start the stage, wait until `events()` grew by a seeded number (below
    `n_events`, what a whole run makes), wait a seeded fraction of a second more, kill -9
    (and, half of the time, leave a partial line at the end of `torn_file`). Then the same
    command to the end. Returns the kills that landed (the process still ran)."""
    rng = np.random.default_rng(seed)
    landed = 0
    for _ in range(n_kills):
        target = min(events() + int(rng.integers(*step)), n_events - 1)
        delay = float(rng.uniform(0.0, 0.15))
        with open(tmp_path / "killed.log", "ab") as log:
            p = subprocess.Popen(command(script, *argv), cwd=ROOT, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 120
        while p.poll() is None and events() < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            landed += 1
        p.wait()
        if torn_file is not None and rng.random() < 0.5 and os.path.exists(torn_file):
            with open(torn_file, "a") as f:
                f.write('{"torn": "a write cut by a k')           # no newline: cut short
    ok(script, *argv)
    return landed


# ---------------------------------------------------------------------------------------
# Uninterrupted runs of the four stages, made once
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    smiles = root / "mols.smi"
    smiles.write_text(MOLECULES)
    paths = {"smiles": smiles, "d0": root / "d0.db", "test": root / "test.db",
             "baseline": root / "baseline", "golf": root / "golf", "eval": root / "eval"}
    ok("make_trajectories.py", *d0_argv(paths["smiles"], paths["d0"]))
    ok("make_trajectories.py", "--smiles", smiles, "--max_molecules", "4", "--mode", "optimize",
       "--conformers_per_molecule", "3", "--seed", "7", "--out", root / "test_traj.db",
       "--out_optimal", paths["test"], "--oracle_method", "hf/sto-3g", "--n_workers", "2")
    ok("train_baseline.py", *train_argv(paths["d0"], paths["baseline"]))
    return paths


def d0_argv(smiles, out):
    # 2 workers: rows arrive in a nondeterministic order
    return ["--smiles", smiles, "--conformers_per_molecule", "4", "--mode", "single_point",
            "--out", out, "--oracle_method", "hf/sto-3g", "--n_workers", "2"]


def train_argv(d0, out_dir):
    # checkpoints every 7 steps, logs every 4: kills fall between checkpoints
    return ["--db", d0, "--out_dir", out_dir, *MODEL, "--total_steps", "300",
            "--batch_size", "4", "--lr", "3e-3", "--val_fraction", "0.2", "--eval_every", "4",
            "--checkpoint_every", "7", "--resume"]


def golf_argv(clean, out_dir):
    return ["--d0", clean["d0"], "--load_baseline", clean["baseline"] / "checkpoint.pt",
            "--out_dir", out_dir, "--max_oracle_steps", "10", "--utd_ratio", "3",
            "--n_parallel", "2", "--timelimit_train", "4", "--batch_size", "4",
            "--checkpoint_every", "4", "--lr", "1e-3", "--lr_final", "1e-5", "--resume",
            *ORACLE]


def eval_argv(clean, out_dir):
    return ["--checkpoint", clean["baseline"] / "checkpoint.pt", "--db", clean["test"],
            "--out_dir", out_dir, "--timelimit_eval", "3", "--eval_steps", "1,3",
            "--batch_size", "1", *ORACLE]


def labelled(path):
    """{conf_id: (energy, forces, positions)} of a db, and its number of rows."""
    confs, _ = data.read_db(str(path), "total", verbose=False)
    return {c.info["conf_id"]: (c.energy, c.forces, c.positions) for c in confs}, len(confs)


def assert_same_labels(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == pytest.approx(b[k][0], abs=1e-9)
        np.testing.assert_allclose(a[k][1], b[k][1], atol=1e-7)
        np.testing.assert_array_equal(a[k][2], b[k][2])


def assert_clean_jsonl(path):
    """Every line whole JSON, none partial (a later append cut the torn one off)."""
    with open(path) as f:
        text = f.read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------
# kill -9 at seeded points, then the same command: outputs equal an uninterrupted run
# ---------------------------------------------------------------------------------------

def check_make_trajectories(clean, tmp_path, seed, n_kills=N_KILLS):
    out = tmp_path / "d0.db"
    landed = kill_and_rerun("make_trajectories.py", d0_argv(clean["smiles"], out),
                            lambda: db_rows(out), 24, seed, tmp_path, n_kills=n_kills)
    killed, n_killed = labelled(out)
    whole, n_whole = labelled(clean["d0"])
    assert n_killed == len(killed) == n_whole == len(whole) == 24     # none lost, none doubled
    assert_same_labels(killed, whole)
    assert not os.path.exists(f"{out}.failures.jsonl")
    return landed


def check_train_baseline(clean, tmp_path, seed, n_kills=N_KILLS):
    out = tmp_path / "baseline"
    landed = kill_and_rerun("train_baseline.py", train_argv(clean["d0"], out),
                            lambda: lines(out / "metrics.jsonl"), 75, seed, tmp_path,
                            step=(1, 8), torn_file=out / "metrics.jsonl", n_kills=n_kills)
    a = torch.load(clean["baseline"] / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["trainer"]["step"] == b["trainer"]["step"] == 300
    assert all(torch.equal(a["model"]["state_dict"][k], b["model"]["state_dict"][k])
               for k in a["model"]["state_dict"])
    # the validation log: the same records, each once (none doubled by a resume)
    assert assert_clean_jsonl(out / "metrics.jsonl") == \
        assert_clean_jsonl(clean["baseline"] / "metrics.jsonl")
    return landed


def check_golf(clean, tmp_path, seed, n_kills=N_KILLS):
    """Killed at seeded points (some with labels finished and not yet entered: the lag is
    5 jobs a worker) and resumed, GOLF collects the same conformations and trains the same
    weights as a run never killed, and computes no finished label twice."""
    from test_golf import golf_outputs, same_outputs
    out = tmp_path / "golf"
    if not os.path.exists(clean["golf"] / "checkpoint.pt"):
        ok("golf.py", *golf_argv(clean, clean["golf"]))
    landed = kill_and_rerun("golf.py", golf_argv(clean, out),
                            lambda: db_rows(out / "collected.db"), 10, seed, tmp_path,
                            torn_file=out / "metrics.jsonl", n_kills=n_kills)
    rows, ckpt = golf_outputs(out)
    assert len(rows) == 10 and ckpt["trainer"]["step"] == 10 * 3      # K, K * U
    assert same_outputs((rows, ckpt), golf_outputs(clean["golf"]))
    journal = oracle_pool.OracleJournal(str(out / "oracle_journal.sqlite"))
    assert set(journal.times_computed()) == {1}                        # none twice
    log = assert_clean_jsonl(out / "metrics.jsonl")
    assert log[-1]["event"] == "done" and log[-1]["n_added"] == 10
    # the cosine schedule ends at lr_final and never climbs back
    assert log[-1]["lr"] == pytest.approx(1e-5, rel=1e-3)
    return landed


def check_evaluate(clean, tmp_path, seed, n_kills=N_KILLS):
    out = tmp_path / "eval"
    if not os.path.exists(clean["eval"] / "summary.json"):
        ok("evaluate.py", *eval_argv(clean, clean["eval"]))
    # rows whose reference optimization did not converge are not evaluated (App. E)
    tests, _ = data.read_db(str(clean["test"]), "total", verbose=False)
    n_scored = sum(bool(c.info.get("converged", True)) for c in tests)
    assert n_scored >= 10
    landed = kill_and_rerun("evaluate.py", eval_argv(clean, out),
                            lambda: lines(out / "per_conformation.jsonl"), n_scored, seed, tmp_path,
                            torn_file=out / "per_conformation.jsonl", n_kills=n_kills)
    killed = {r["conf_id"]: r for r in assert_clean_jsonl(out / "per_conformation.jsonl")}
    whole = {r["conf_id"]: r for r in assert_clean_jsonl(clean["eval"] / "per_conformation.jsonl")}
    assert len(killed) == len(whole) == lines(out / "per_conformation.jsonl") == n_scored
    assert killed.keys() == whole.keys()
    for k in whole:
        assert killed[k]["energy_dft"] == pytest.approx(whole[k]["energy_dft"], abs=1e-9)
        assert killed[k]["failures"] == whole[k]["failures"]
    finals, n_rows = labelled(out / "final.db")
    whole_finals = labelled(clean["eval"] / "final.db")[0]
    assert n_rows == len(finals) == n_scored and finals.keys() == whole_finals.keys()  # each once
    for k in finals:
        assert finals[k][0] == pytest.approx(whole_finals[k][0], abs=1e-9)
        np.testing.assert_allclose(finals[k][2], whole_finals[k][2], atol=1e-9)
    a = json.load(open(out / "summary.json"))
    b = json.load(open(clean["eval"] / "summary.json"))
    for key in ("n_conformations", "pct_mean", "pct_div", "e_res_mean_kcal_mol", "pct_success",
                "cov", "mat"):
        assert a[key] == pytest.approx(b[key], rel=1e-9, nan_ok=True), key
    return landed


STAGES = {"make_trajectories": check_make_trajectories, "train_baseline": check_train_baseline,
          "golf": check_golf, "evaluate": check_evaluate}


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_at_seeded_points_then_rerun_equals_an_uninterrupted_run(clean, tmp_path, stage):
    landed = STAGES[stage](clean, tmp_path, seed=0)
    assert landed == N_KILLS


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(1, 21))
@pytest.mark.parametrize("stage", list(STAGES))
def test_soak_kill_9(clean, tmp_path, stage, seed):
    """By hand: 20 chains of 5 kills per stage, 100 kill points per stage."""
    landed = STAGES[stage](clean, tmp_path, seed=seed, n_kills=SOAK_KILLS)
    assert landed == SOAK_KILLS


# ---------------------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------------------

def test_a_second_make_trajectories_on_one_output_is_refused(clean, tmp_path):
    out = tmp_path / "d0.db"
    first = subprocess.Popen(command("make_trajectories.py", *d0_argv(clean["smiles"], out)),
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = f"{out}.writer.lock"
        while not os.path.exists(lock) or not open(lock).read().strip():
            assert first.poll() is None
            time.sleep(0.01)
        rc, _, err = run("make_trajectories.py", *d0_argv(clean["smiles"], out))
        assert rc != 0 and "Traceback" not in err
        assert f"being written by another process (PID {first.pid})" in err.strip().splitlines()[-1]
    finally:
        first.wait(timeout=120)
    assert first.returncode == 0
    assert labelled(out)[1] == 24                                     # one writer: 24 rows


def test_the_ase_lock_a_kill_leaves_does_not_hang_the_rerun(clean, tmp_path):
    """ase.db creates <db>.lock for each write; kill -9 inside a write leaves it, and ase
    then waits for it forever (found by the kill loop above)."""
    out = tmp_path / "d0.db"
    open(f"{out}.lock", "w").close()
    rc, _, err = run("make_trajectories.py", *d0_argv(clean["smiles"], out)[:-1], "1",
                     "--max_molecules", "1", timeout=120)
    assert rc == 0, err[-2000:]
    assert f"removed {out}.lock" in err and labelled(out)[1] == 4


@pytest.mark.parametrize("stage", ["train_baseline", "golf", "evaluate"])
def test_every_stage_refuses_an_output_another_process_writes(clean, tmp_path, stage):
    out = tmp_path / stage
    argv = {"train_baseline": lambda: ("train_baseline.py", train_argv(clean["d0"], out)),
            "golf": lambda: ("golf.py", golf_argv(clean, out)),
            "evaluate": lambda: ("evaluate.py", eval_argv(clean, out))}[stage]()
    os.makedirs(out)
    with safe_io.output_lock(str(out)):       # this test process is the other writer
        rc, _, err = run(argv[0], *argv[1])
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: {out} is being written by another process "
                                            f"(PID {os.getpid()}); wait for it to end, or "
                                            "write to another output")
    assert sorted(os.listdir(out)) == [".writer.lock"]                      # it wrote nothing


# ---------------------------------------------------------------------------------------
# An oracle that always fails: a non-zero exit and one line, never a spin
# ---------------------------------------------------------------------------------------

def test_golf_stops_when_the_oracle_fails_every_job(clean, tmp_path):
    t0 = time.monotonic()
    rc, _, err = run("golf.py", *golf_argv(clean, tmp_path / "golf"), "--oracle_timeout", "0.01",
                     "--max_consecutive_failures", "6", timeout=120)
    last = err.strip().splitlines()[-1]
    assert rc != 0 and "Traceback" not in err and time.monotonic() - t0 < 100
    # several failed results may come in one loop iteration; it stops at the sixth
    assert last.startswith("error: GOLF stopped: the genuine oracle failed 6 times in a row "
                           "(6 x timeout: no result within 0.01 s")
    assert "--oracle_timeout" in last and "--resume" in last
    log = assert_clean_jsonl(tmp_path / "golf" / "metrics.jsonl")
    assert log[-1]["event"] == "stopped" and log[-1]["n_added"] == 0


def test_permanent_failures_are_not_retried_and_fail_the_run(clean, tmp_path):
    out = tmp_path / "d0.db"
    rc, stdout, err = run("make_trajectories.py", "--smiles", clean["smiles"], "--max_molecules",
                          "2", "--out", out, "--oracle_method", "hf/nonsense", "--n_workers", "1")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: every one of the 2 conformations failed; "
                                            "nothing was labelled (the reasons are above)")
    assert "[will repeat: not retried]" in stdout and "rerun the same command" not in stdout
    failures = safe_io.read_jsonl(f"{out}.failures.jsonl")
    assert [f["attempts"] for f in failures] == [1, 1]       # --oracle_retries 1 not used
    assert all(f["reason"].startswith("BasisSetNotFound") for f in failures)
    # evaluate stops at the first such failure and records nothing for it
    rc, _, err = run("evaluate.py", *eval_argv(clean, tmp_path / "eval"),
                     "--oracle_method", "nonsense/sto-3g")
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: the oracle cannot label conformation")
    assert not os.path.exists(tmp_path / "eval" / "per_conformation.jsonl")


def test_permanent_failures_are_told_from_transient_ones():
    import oracle_pool
    # reasons as Psi4, the pool and RDKit word them (see test_oracles.py for the real calls)
    for reason in ("BasisSetNotFound: BasisSet::construct: Unable to find a basis set for "
                   "atom 1 for key BASIS among: Shell Entries: ['I']",
                   "ValidationError: Derivative method 'name' nonsense and derivative level "
                   "'dertype' (auto) are not available.",
                   "MMFF: row 3: MMFF94 has no atom types for [Se]",
                   "RuntimeError: unsupported element Z=92"):
        assert oracle_pool.is_permanent(reason), reason
    for reason in ("timeout: no result within 600 s (worker killed)",
                   "SCFConvergenceError: Could not converge SCF iterations in 100 iterations.",
                   "ValidationError: Following atoms are too close: [(1, 2, 0.0349)]",
                   "worker died with signal 9 (SIGKILL)", "pool closed before the job finished",
                   "Dask task failed: KilledWorker", ""):
        assert not oracle_pool.is_permanent(reason), reason


def test_anything_but_a_checkpoint_is_one_clear_error(tmp_path):
    import painn
    text, noise, foreign = tmp_path / "notes.txt", tmp_path / "noise.bin", tmp_path / "sd.pt"
    text.write_text("not a checkpoint\n")
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"layer.weight": torch.zeros(2, 2)}, foreign)     # a torch file, not ours
    for path in (text, noise, foreign, tmp_path / "missing.pt"):
        with pytest.raises(painn.CheckpointError) as err:
            painn.load_checkpoint(str(path))
        message = str(err.value)
        assert str(path) in message and "\n" not in message
        assert "weights_only" not in message                   # never advise unsafe loading


# ---------------------------------------------------------------------------------------
# SIGTERM (a scheduler's) and Ctrl-C (a terminal's SIGINT to the foreground process group)
# ---------------------------------------------------------------------------------------

def stop_with_signal(argv, script, signum, ready, tmp_path):
    """Start the stage as a terminal starts a foreground job (its own process group, SIGINT
    at its default: a script's background job would inherit it ignored), wait until
    `ready()`, then send `signum`: Ctrl-C to the whole group, SIGTERM to the process.
    Returns (exit status, seconds from the signal to the exit, stderr)."""
    with open(tmp_path / "stopped.err", "wb") as err:
        p = subprocess.Popen(command(script, *argv), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=err, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while p.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, "the stage ended before the signal"
        t0 = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(p.pid, signal.SIGINT)
        else:
            os.kill(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=60)
        seconds = time.monotonic() - t0
    left = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes of the stage still run: {left}"   # workers stopped
    return rc, seconds, (tmp_path / "stopped.err").read_text()


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.soak),
                                    signal.SIGINT])
def test_golf_stops_on_sigterm_and_ctrl_c_in_one_line_and_resumes_to_the_same_run(
        clean, tmp_path, signum):
    from test_golf import golf_outputs, same_outputs
    if not os.path.exists(clean["golf"] / "checkpoint.pt"):
        ok("golf.py", *golf_argv(clean, clean["golf"]))
    out = tmp_path / "golf"
    rc, seconds, err = stop_with_signal(golf_argv(clean, out), "golf.py", signum,
                                        lambda: db_rows(out / "collected.db") >= 3, tmp_path)
    name = signal.Signals(signum).name
    assert rc == 128 + signum and seconds < 10 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {name}: {out}/checkpoint.pt holds the model")
    python, *printed = shlex.split(last.split("continue with: ")[1])
    assert python == "python" and "--resume" in printed
    p = subprocess.run([sys.executable, *printed], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)      # the printed command, to the end
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_outputs(golf_outputs(out), golf_outputs(clean["golf"]))
    journal = oracle_pool.OracleJournal(str(out / "oracle_journal.sqlite"))
    assert set(journal.times_computed()) == {1}
