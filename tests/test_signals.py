"""SIGTERM and Ctrl-C on make_trajectories.py, train_baseline.py and evaluate.py, with real
oracles (Psi4 hf/sto-3g on molecules of 3-6 atoms, as tests/test_faults.py; GFN2-xTB).

Each stage runs as a subprocess started as a terminal starts it (SIGINT at its default, in
its own process group) and gets the signal once it has made progress: SIGTERM to its PID,
as `kill` or a scheduler sends it, or SIGINT to its whole process group, as Ctrl-C does
(the oracle workers get it too). It must end within 10 s with exit status 143 or 130, its
last stderr line the one `stopped by ...` line (what is saved, the command to continue), no
traceback, and none of its oracle workers left running. That command, run to the end, must
give what an uninterrupted run gives.

Also the oracle journal: a rerun that asks the same questions computes no oracle job (the
journal's rows stay as they were, none replaced), and OracleJournal / JournalledPool on a
real xTB pool.
"""
import json
import os
import shlex
import shutil
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
from test_faults import (ENV, MODEL, MOLECULES, ROOT, assert_clean_jsonl, assert_same_labels,
                         command, db_rows, labelled, lines, ok)

SIGNALS = [signal.SIGTERM, signal.SIGINT]


def signals(default):
    """Both signals; the default suite sends `default`, the soak (-m soak) the other too."""
    return [s if s == default else pytest.param(s, marks=pytest.mark.soak) for s in SIGNALS]


# ---------------------------------------------------------------------------------------
# A stage as a terminal runs it, a signal, and what the stage must do then
# ---------------------------------------------------------------------------------------

def start(script, argv, tmp_path):
    """The stage as a subprocess in its own process group, SIGINT at its default (a
    background job of a script would inherit it ignored); stderr to a file."""
    log = open(tmp_path / f"{script}.stderr", "w+")
    process = subprocess.Popen(command(script, *argv), cwd=ROOT, env=ENV, stdout=log,
                               stderr=log, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    process.log = log
    return process


def oracle_workers(pid):
    """Process ids of the oracle workers that process `pid` runs (its children)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
            if parent == pid and is_oracle_worker(int(entry)):
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def is_oracle_worker(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"--oracle_worker" in f.read()      # a zombie's cmdline is empty
    except OSError:
        return False


def signal_when(process, progress, signum, timeout=120):
    """Wait until progress() is true while the stage runs, then signal it: SIGTERM to its
    PID, SIGINT to its process group (Ctrl-C). Returns (its oracle workers at the signal,
    seconds from the signal to its exit)."""
    deadline = time.monotonic() + timeout
    while not progress():
        assert process.poll() is None, "the stage ended before the signal"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    assert process.poll() is None, "the stage ended before the signal"
    workers = oracle_workers(process.pid)
    sent = time.monotonic()
    if signum == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)
    else:
        os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    return workers, time.monotonic() - sent


def assert_stopped(process, signum, workers, seconds):
    """Exit status 128 + signum within 10 s, no traceback, no oracle worker left, and one
    last line 'stopped by NAME: SAVED; continue with: python ...'. Returns (SAVED, the
    command as argv, run with this Python)."""
    process.log.seek(0)
    err = process.log.read()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err[-3000:]
    assert seconds < 10
    assert "Traceback" not in err
    assert not [pid for pid in workers if is_oracle_worker(pid)]       # none left running
    last = err.strip().splitlines()[-1]
    assert [line for line in err.splitlines() if line.startswith("stopped by")] == [last]
    assert last.startswith(f"stopped by {name}: ")
    saved, separator, continue_with = last[len(f"stopped by {name}: "):].partition(
        "; continue with: ")
    argv = shlex.split(continue_with)
    assert separator and argv[0] == "python"
    return saved, [sys.executable, *argv[1:]]


def run_to_the_end(argv):
    p = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stdout


def journal_rows(path):
    """Every row of an oracle journal with its rowid: a result computed again would
    replace its row (INSERT OR REPLACE), with a new rowid."""
    with sqlite3.connect(path) as con:
        return con.execute("SELECT rowid, key, result FROM results ORDER BY rowid").fetchall()


# ---------------------------------------------------------------------------------------
# Uninterrupted runs, made once: D0 (make_trajectories.py), f_baseline (train_baseline.py)
# on it, an evaluation (evaluate.py) of f_baseline
# ---------------------------------------------------------------------------------------

def d0_argv(smiles, out):
    return ["--smiles", smiles, "--conformers_per_molecule", "2", "--out", out,
            "--oracle_method", "hf/sto-3g", "--n_workers", "2"]     # 12 jobs, any order


def train_argv(d0, out_dir):
    # no checkpoint before the end: a resumed run can only go on from the one at the signal
    return ["--db", d0, "--out_dir", out_dir, *MODEL, "--total_steps", "200", "--batch_size",
            "4", "--lr", "3e-3", "--val_fraction", "0.2", "--eval_every", "4",
            "--checkpoint_every", "1000"]


def eval_argv(baseline, test_db, out_dir):
    # 2 jobs a conformation; steps of at most 0.02 A keep the tiny NNP's geometries ones
    # the SCF converges on (a failure is not journalled: the rerun test needs none)
    return ["--checkpoint", baseline / "checkpoint.pt", "--db", test_db, "--out_dir", out_dir,
            "--timelimit_eval", "3", "--eval_steps", "1,3", "--batch_size", "1",
            "--max_step", "0.02", "--page_conformations", "0", "--oracle_method", "hf/sto-3g",
            "--n_workers", "2"]


@pytest.fixture(scope="module")
def d0(tmp_path_factory):
    root = tmp_path_factory.mktemp("d0")
    (root / "mols.smi").write_text(MOLECULES)
    ok("make_trajectories.py", *d0_argv(root / "mols.smi", root / "d0.db"))
    return root


@pytest.fixture(scope="module")
def baseline(d0):
    ok("train_baseline.py", *train_argv(d0 / "d0.db", d0 / "baseline"))
    return d0 / "baseline"


@pytest.fixture(scope="module")
def evaluation(d0, baseline):
    """A test db of 8 labelled D0 rows (optimum: 0.01 Hartree below, at the same
    positions), and evaluate.py's uninterrupted run on it."""
    confs, _ = data.read_db(str(d0 / "d0.db"), "total", verbose=False)
    test_db = data.connect_for_writing(str(d0 / "test.db"))
    for c in confs[:8]:
        c.optimal_energy, c.optimal_positions = c.energy - 0.01, c.positions
        data.write_conformation(test_db, c, converged=True)
    ok("evaluate.py", *eval_argv(baseline, d0 / "test.db", d0 / "eval"))
    return d0 / "eval"


def assert_same_evaluation(a, b):
    """As test_faults.check_evaluate: the same records, final.db rows and summary."""
    got = {r["conf_id"]: r for r in assert_clean_jsonl(a / "per_conformation.jsonl")}
    whole = {r["conf_id"]: r for r in assert_clean_jsonl(b / "per_conformation.jsonl")}
    assert got.keys() == whole.keys() and len(got) == lines(a / "per_conformation.jsonl") == 8
    assert not [r for r in whole.values() if r["failures"]]
    for k in whole:
        assert got[k]["energy_dft"] == pytest.approx(whole[k]["energy_dft"], abs=1e-9)
        assert got[k]["failures"] == whole[k]["failures"]
    finals, n_rows = labelled(a / "final.db")
    whole_finals = labelled(b / "final.db")[0]
    assert n_rows == len(finals) == 8 and finals.keys() == whole_finals.keys()   # each once
    for k in finals:
        assert finals[k][0] == pytest.approx(whole_finals[k][0], abs=1e-9)
        np.testing.assert_allclose(finals[k][2], whole_finals[k][2], atol=1e-9)
    x, y = (json.load(open(d / "summary.json")) for d in (a, b))
    for key in ("n_conformations", "pct_mean", "pct_div", "e_res_mean_kcal_mol", "pct_success",
                "cov", "mat"):
        assert x[key] == pytest.approx(y[key], rel=1e-9, nan_ok=True), key


# ---------------------------------------------------------------------------------------
# A signal, then the printed command: an uninterrupted run's outputs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", signals(signal.SIGTERM), ids=lambda s: signal.Signals(s).name)
def test_make_trajectories_stops_at_a_signal_and_continues(d0, tmp_path, signum):
    out = tmp_path / "d0.db"
    argv = d0_argv(d0 / "mols.smi", out)
    process = start("make_trajectories.py", argv, tmp_path)
    workers, seconds = signal_when(process, lambda: db_rows(out) >= 3, signum)
    saved, again = assert_stopped(process, signum, workers, seconds)
    assert workers                                   # it was labelling
    assert saved == (f"every finished result is in {out} and the oracle journal "
                     f"{out}.oracle_journal.sqlite")
    assert again == command("make_trajectories.py", *argv)       # the same command
    assert 3 <= db_rows(out) < 12
    run_to_the_end(again)
    got, n_got = labelled(out)
    whole, n_whole = labelled(d0 / "d0.db")
    assert n_got == len(got) == n_whole == 12                     # none lost, none doubled
    assert_same_labels(got, whole)


@pytest.mark.parametrize("signum", signals(signal.SIGINT), ids=lambda s: signal.Signals(s).name)
def test_train_baseline_saves_a_checkpoint_at_the_signal_and_resumes(d0, baseline, tmp_path,
                                                                     signum):
    out = tmp_path / "baseline"
    argv = train_argv(d0 / "d0.db", out)
    process = start("train_baseline.py", argv, tmp_path)
    workers, seconds = signal_when(process, lambda: lines(out / "metrics.jsonl") >= 3, signum)
    saved, again = assert_stopped(process, signum, workers, seconds)
    step = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["step"]
    assert 12 <= step < 200                        # saved at the signal, not at an interval
    assert saved == f"checkpoint at step {step} of 200 in {out / 'checkpoint.pt'}"
    assert again == command("train_baseline.py", *argv, "--resume")
    run_to_the_end(again)
    a = torch.load(baseline / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["trainer"]["step"] == b["trainer"]["step"] == 200
    assert all(torch.equal(a["model"]["state_dict"][k], b["model"]["state_dict"][k])
               for k in a["model"]["state_dict"])
    assert assert_clean_jsonl(out / "metrics.jsonl") == \
        assert_clean_jsonl(baseline / "metrics.jsonl")


@pytest.mark.parametrize("signum", signals(signal.SIGTERM), ids=lambda s: signal.Signals(s).name)
def test_evaluate_stops_at_a_signal_and_continues(d0, baseline, evaluation, tmp_path, signum):
    out = tmp_path / "eval"
    argv = eval_argv(baseline, d0 / "test.db", out)
    process = start("evaluate.py", argv, tmp_path)
    workers, seconds = signal_when(
        process, lambda: lines(out / "per_conformation.jsonl") >= 2, signum)
    saved, again = assert_stopped(process, signum, workers, seconds)
    assert workers
    assert saved == (f"the record of every finished conformation is in "
                     f"{out / 'per_conformation.jsonl'}, every finished oracle result in the "
                     f"oracle journal {out / 'oracle_journal.sqlite'}")
    assert again == command("evaluate.py", *argv)
    assert 2 <= lines(out / "per_conformation.jsonl") < 8
    assert not (out / "summary.json").exists()
    run_to_the_end(again)
    assert_same_evaluation(out, evaluation)


# ---------------------------------------------------------------------------------------
# The oracle journal: a rerun asks, the journal answers
# ---------------------------------------------------------------------------------------

def test_make_trajectories_rerun_with_the_journal_computes_no_job(d0, tmp_path):
    """Its outputs gone, the journal kept: the same rows, bit for bit, the free atoms'
    energies included, and no job run (no journal row added or replaced)."""
    out = tmp_path / "d0.db"
    journal = f"{out}.oracle_journal.sqlite"
    shutil.copy(f"{d0 / 'd0.db'}.oracle_journal.sqlite", journal)
    before = journal_rows(journal)
    assert len(before) == 12 + 4                         # the conformations, H C N O atoms
    stdout = run_to_the_end(command("make_trajectories.py", *d0_argv(d0 / "mols.smi", out)))
    assert f"{journal}: 12 oracle results read again, 0 new ones kept" in stdout
    assert journal_rows(journal) == before
    got, whole = labelled(out)[0], labelled(d0 / "d0.db")[0]
    assert got.keys() == whole.keys()
    for k in whole:
        assert got[k][0] == whole[k][0]
        assert np.array_equal(got[k][1], whole[k][1]) and np.array_equal(got[k][2], whole[k][2])
    assert (data.read_db(str(out), "total", verbose=False)[1] ==
            data.read_db(str(d0 / "d0.db"), "total", verbose=False)[1])       # atomrefs


def test_evaluate_rerun_with_the_journal_computes_no_job(d0, baseline, evaluation, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    shutil.copy(evaluation / "oracle_journal.sqlite", out / "oracle_journal.sqlite")
    before = journal_rows(out / "oracle_journal.sqlite")
    assert len(before) == 8 * 2
    stdout = run_to_the_end(command("evaluate.py", *eval_argv(baseline, d0 / "test.db", out)))
    assert "oracle_journal.sqlite: 16 oracle results read again, 0 new ones kept" in stdout
    assert journal_rows(out / "oracle_journal.sqlite") == before
    records = sorted(assert_clean_jsonl(out / "per_conformation.jsonl"), key=lambda r: r["conf_id"])
    whole = sorted(assert_clean_jsonl(evaluation / "per_conformation.jsonl"),
                   key=lambda r: r["conf_id"])
    assert [r["energy_dft"] for r in records] == [r["energy_dft"] for r in whole]   # exactly
    assert_same_evaluation(out, evaluation)


def test_the_journal_computes_a_question_once_and_keeps_its_answer_exactly(tmp_path):
    """Real GFN2-xTB: the same question twice is one job; the answer comes back bit for bit
    (energy, forces, seconds), also to another process' journal on the file; another
    position bit, charge, kind or method is another question; a failure is not kept."""
    water = data.Conformation(np.array([8, 1, 1]), np.array(
        [[0.0, 0.0, 0.117], [0.0, 0.757, -0.467], [0.0, -0.757, -0.467]]), smiles="O")
    path = str(tmp_path / "journal.sqlite")
    with oracle_pool.JournalledPool(oracle_pool.LocalOraclePool("gfn2-xtb", n_workers=1),
                                    oracle_pool.OracleJournal(path)) as pool:
        journal = pool.journal
        first = pool.submit(water, 1).result()
        again = pool.submit(water, 2).result()
        assert first.ok and journal.n_stored == 1 and journal.n_reused == 1 and len(journal) == 1
        assert again.conf_id == 2 and again.attempts == first.attempts
        assert np.float64(again.energy).tobytes() == np.float64(first.energy).tobytes()
        assert again.forces.tobytes() == first.forces.tobytes()
        assert again.seconds == first.seconds
        # another question: one bit of one coordinate, the charge, the kind
        nudged = data.Conformation(water.numbers, water.positions.copy(), smiles="O")
        nudged.positions[0, 2] = np.nextafter(nudged.positions[0, 2], 1.0)
        assert pool.submit(nudged, 3).result().ok and journal.n_stored == 2
        assert pool.submit(water, 4, charge=1, multiplicity=2).result().ok
        assert journal.n_stored == 3
        optimized = pool.submit(water, 5, kind="optimize").result()
        assert optimized.ok and journal.n_stored == 4
        reread = pool.submit(water, 6, kind="optimize").result()
        for name in ("trajectory_positions", "trajectory_energy", "trajectory_forces"):
            assert getattr(reread, name).tobytes() == getattr(optimized, name).tobytes()
        assert reread.converged and journal.n_reused == 2
        # a failure (atoms on top of each other) is not kept: asked again, it runs again
        crushed = data.Conformation(np.array([8, 1, 1]), np.zeros((3, 3)))
        failed = pool.submit(crushed, 7).result()
        assert not failed.ok and journal.n_stored == 4 and len(journal) == 4
        assert not pool.submit(crushed, 8).result().ok and journal.n_reused == 2
    # the file, read by another journal (another process, a rerun): the same bits
    with oracle_pool.JournalledPool(oracle_pool.LocalOraclePool("gfn2-xtb", n_workers=1),
                                    oracle_pool.OracleJournal(path)) as pool:
        kept = pool.submit(water, 9).result()
        assert pool.journal.n_reused == 1 and pool.journal.n_stored == 0
        assert kept.conf_id == 9 and kept.forces.tobytes() == first.forces.tobytes()
        assert np.float64(kept.energy).tobytes() == np.float64(first.energy).tobytes()
    # another method, the same file: another question
    with oracle_pool.JournalledPool(oracle_pool.LocalOraclePool("gfn1-xtb", n_workers=1),
                                    oracle_pool.OracleJournal(path)) as pool:
        other = pool.submit(water, 10).result()
        assert other.ok and pool.journal.n_stored == 1 and pool.journal.n_reused == 0
        assert other.energy != first.energy and len(pool.journal) == 5
