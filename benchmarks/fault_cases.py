"""Fault cases tried as a user would, on every stage: prints a table of what each ends in.

    .venv/bin/python benchmarks/fault_cases.py [REPO_DIR]     (default: this repo; ~3 min)

REPO_DIR is the checkout whose scripts run (e.g. another checkout, to compare). Every case is
a command line with a fault (a bad path, a file of the wrong kind, a locked output, an
unreachable Dask scheduler, a failing oracle, a torn JSON line, a kill mid-run, ...). The
outcome is one of:
    ok         one `error: ...` line and a non-zero exit, or a correct resume
    traceback  a Python traceback
    hang       still running after the case's time limit
    exit 0     a run that did nothing useful reports success
    duplicate  a row or record written twice, or more than asked for
    loss       a finished result lost, or a run that can no longer resume
    corrupt    a record glued onto a torn line: a file no JSON-lines reader can read
Inputs (a labelled D0, a test db, a baseline) are made once with this repo's scripts and
Psi4 hf/sto-3g.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else HERE
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ORACLE = ["--oracle_method", "hf/sto-3g", "--n_workers", "1"]
MODEL = ["--n_atom_basis", "8", "--n_interactions", "1", "--n_rbf", "8"]
DEAD_SCHEDULER = "tcp://127.0.0.1:1"


def sh(repo, script, *argv, timeout=60):
    """(exit status or 'hang', stdout, stderr) of a stage of `repo`."""
    try:
        p = subprocess.run([sys.executable, os.path.join(repo, script), *map(str, argv)],
                           cwd=repo, env=ENV, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as err:
        return "hang", err.stdout or "", err.stderr or ""


def rows(path, where=""):
    with sqlite3.connect(path) as con:
        return con.execute(f"SELECT COUNT(*) FROM systems {where}").fetchone()[0]


def one_error_line(rc, out, err):
    if rc == "hang":
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if rc == 0:
        return "exit 0"
    last = (err.strip().splitlines() or [""])[-1]
    return "ok" if last.startswith("error:") else f"exit {rc}, last line {last[:60]!r}"


def inputs(root):
    """D0 (6 conformations), a test db with optima (2), a baseline, made with this repo."""
    smi = os.path.join(root, "mols.smi")
    with open(smi, "w") as f:
        f.write("O water\nC methane\nN ammonia\n")
    d0, test = os.path.join(root, "d0.db"), os.path.join(root, "test.db")
    for argv in (["--smiles", smi, "--conformers_per_molecule", "2", "--out", d0, *ORACLE],
                 ["--smiles", smi, "--max_molecules", "2", "--mode", "optimize", "--seed", "7",
                  "--out", os.path.join(root, "traj.db"), "--out_optimal", test, *ORACLE]):
        assert sh(HERE, "make_trajectories.py", *argv)[0] == 0
    baseline = os.path.join(root, "baseline")
    assert sh(HERE, "train_baseline.py", "--db", d0, "--out_dir", baseline, *MODEL,
              "--total_steps", "20", "--batch_size", "4", "--val_fraction", "0.3")[0] == 0
    text = os.path.join(root, "notes.txt")
    with open(text, "w") as f:
        f.write("not a checkpoint\n")
    noise = os.path.join(root, "noise.bin")
    with open(noise, "wb") as f:
        f.write(os.urandom(4096))
    return dict(smi=smi, d0=d0, test=test, ckpt=os.path.join(baseline, "checkpoint.pt"),
                text=text, noise=noise)


def golf_argv(x, out, *extra):
    return ["--d0", x["d0"], "--load_baseline", x["ckpt"], "--out_dir", out,
            "--max_oracle_steps", "6", "--utd_ratio", "2", "--n_parallel", "2",
            "--timelimit_train", "3", "--batch_size", "4", *ORACLE, *extra]


def eval_argv(x, out, *extra):
    return ["--checkpoint", x["ckpt"], "--db", x["test"], "--out_dir", out,
            "--timelimit_eval", "2", "--eval_steps", "1,2", "--batch_size", "1", *ORACLE, *extra]


def train_argv(x, out, *extra):
    return ["--db", x["d0"], "--out_dir", out, *MODEL, "--total_steps", "60",
            "--batch_size", "4", "--val_fraction", "0.3", "--eval_every", "5",
            "--checkpoint_every", "20", *extra]


def two_writers(repo, script, argv, count):
    """Two processes on one output at once: both write (duplicate), or the second is refused."""
    first = subprocess.Popen([sys.executable, os.path.join(repo, script), *map(str, argv)],
                             cwd=repo, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    rc, out, err = sh(repo, script, *argv, timeout=120)
    first.wait(timeout=120)
    refused = rc != 0 and "another process" in err
    return "ok" if refused else ("duplicate" if count() > count.expected else one_error_line(rc, out, err))


def kill_then_rerun(repo, script, argv, events, target, rerun_argv=None, tear=None):
    """kill -9 once `events()` reached `target` (tear: then leave a partial JSON line at the
    end of that file), rerun to the end; returns the rerun's (rc, out, err)."""
    p = subprocess.Popen([sys.executable, os.path.join(repo, script), *map(str, argv)],
                         cwd=repo, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while p.poll() is None and events() < target and time.monotonic() < deadline:
        time.sleep(0.01)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    if tear:
        with open(tear, "a") as f:
            f.write('{"conf_id": 1, "smi')
    return sh(repo, script, *(rerun_argv or argv), timeout=180)


def lines_of(path):
    try:
        return open(path).read().count("\n")
    except OSError:
        return 0


def cases(repo, x, tmp):
    """(stage, case, outcome) for every case."""
    def d(name):
        return os.path.join(tmp, name)

    mt, tb, gf, ev = "make_trajectories.py", "train_baseline.py", "golf.py", "evaluate.py"
    yield mt, "missing --smiles file", \
        one_error_line(*sh(repo, mt, "--smiles", d("no.smi"), "--out", d("a.db"), *ORACLE))
    yield mt, "text file as --db", \
        one_error_line(*sh(repo, mt, "--db", x["text"], "--out", d("b.db"), *ORACLE))
    open(d("empty.db"), "w").close()
    yield mt, "empty file as --db", \
        one_error_line(*sh(repo, mt, "--db", d("empty.db"), "--out", d("c.db"), *ORACLE))
    os.makedirs(d("dir.db"))
    yield mt, "a directory as --out", \
        one_error_line(*sh(repo, mt, "--smiles", x["smi"], "--out", d("dir.db"), *ORACLE))
    yield mt, "--out made with other flags", \
        one_error_line(*sh(repo, mt, "--smiles", x["smi"], "--out", x["d0"], "--oracle_method", "hf/3-21g"))

    t0 = time.monotonic()
    rc, out, err = sh(
        repo, mt, "--smiles", x["smi"], "--out", d("dask.db"), "--dask_scheduler", DEAD_SCHEDULER, "--oracle_method", "hf/sto-3g", timeout=120)
    outcome = one_error_line(rc, out, err)
    if outcome == "ok" and (os.path.exists(d("dask.db")) or time.monotonic() - t0 > 15):
        outcome = "slow, leaves an empty db"
    yield mt, "unreachable --dask_scheduler", outcome
    rc, out, err = sh(
        repo, mt, "--smiles", x["smi"], "--out", d("nonsense.db"), "--oracle_method", "nonsense/sto-3g", "--n_workers", "1")
    yield mt, "unknown method (every job fails, will repeat)", "ok" if rc != 0 and "rerun the same command to retry" not in out and "Traceback" not in err else one_error_line(rc, out, err)
    with open(d("iodine.smi"), "w") as f:
        f.write("I hydrogen_iodide\n")
    rc, out, err = sh(
        repo, mt, "--smiles", d("iodine.smi"), "--out", d("iodine.db"), "--oracle_method", "hf/cc-pvdz", "--n_workers", "1")
    yield mt, "element without basis functions", "ok" if rc != 0 and "Traceback" not in err else one_error_line(rc, out, err)
    rc, out, err = sh(
        repo, mt, "--smiles", x["smi"], "--out", d("timeout.db"), "--oracle_timeout", "0.01", *ORACLE)
    yield mt, "--oracle_timeout 0.01 (every job fails)", one_error_line(rc, out, err)
    with open(d("bad.smi"), "w") as f:
        f.write("C1CC broken\n")
    rc, out, err = sh(repo, mt, "--smiles", d("bad.smi"), "--out", d("bad.db"), *ORACLE)
    yield mt, "no parsable SMILES at all", "ok" if rc != 0 or "0 conformations to do" in out else one_error_line(rc, out, err)

    out_db = d("two.db")
    count = lambda: rows(out_db)   # noqa: E731
    count.expected = 6
    yield mt, "two processes on one --out", two_writers(repo, mt, ["--smiles", x["smi"], "--conformers_per_molecule", "2", "--out", out_db, *ORACLE], count)
    kill_db = d("kill.db")
    rc, out, err = kill_then_rerun(repo, mt, ["--smiles", x["smi"], "--conformers_per_molecule", "2", "--out", kill_db, *ORACLE], lambda: rows(kill_db) if os.path.exists(kill_db) else 0, 2)
    yield mt, "kill -9 mid-run, rerun", "ok" if rc == 0 and rows(kill_db) == 6 else one_error_line(rc, out, err)
    fail_db = d("torn.db")
    sh(repo, mt, "--smiles", x["smi"], "--out", fail_db, "--oracle_timeout", "0.01", *ORACLE)
    with open(fail_db + ".failures.jsonl", "a") as f:
        f.write('{"conf_id": 1, "smi')
    sh(repo, mt, "--smiles", x["smi"], "--out", fail_db, "--oracle_timeout", "0.01", *ORACLE)
    try:
        [json.loads(line) for line in open(fail_db + ".failures.jsonl")]
        yield mt, "torn last line of failures.jsonl, rerun", "ok"
    except ValueError:
        yield mt, "torn last line of failures.jsonl, rerun", "corrupt"

    yield tb, "missing --db", \
        one_error_line(*sh(repo, tb, "--db", d("no.db"), "--out_dir", d("t1")))
    yield tb, "text file as --load_baseline", \
        one_error_line(*sh(repo, tb, *train_argv(x, d("t2"), "--load_baseline", x["text"])))
    yield tb, "random bytes as --load_baseline", \
        one_error_line(*sh(repo, tb, *train_argv(x, d("t3"), "--load_baseline", x["noise"])))
    os.makedirs(d("t4"))
    with open(os.path.join(d("t4"), "checkpoint.pt"), "w") as f:
        f.write("garbage")
    yield tb, "--resume with a corrupt checkpoint.pt", \
        one_error_line(*sh(repo, tb, *train_argv(x, d("t4"), "--resume")))
    metrics = os.path.join(d("t5"), "metrics.jsonl")
    rc, out, err = kill_then_rerun(repo, tb, train_argv(x, d("t5")), lambda: lines_of(metrics), 6, train_argv(x, d("t5"), "--resume"))
    steps = [json.loads(line)["step"] for line in open(metrics)] if rc == 0 else []
    yield tb, "kill -9 between checkpoints, --resume", "ok" if rc == 0 and len(steps) == len(set(steps)) == 12 else ("duplicate" if rc == 0 else one_error_line(rc, out, err))
    count = lambda: lines_of(os.path.join(d("t6"), "metrics.jsonl"))   # noqa: E731
    count.expected = 300
    yield tb, "two processes on one --out_dir", two_writers(repo, tb, train_argv(x, d("t6"), "--total_steps", "1500"), count)
    metrics = os.path.join(d("t7"), "metrics.jsonl")
    rc, out, err = kill_then_rerun(repo, tb, train_argv(x, d("t7")), lambda: lines_of(metrics), 6, train_argv(x, d("t7"), "--resume"), tear=metrics)
    try:
        [json.loads(line) for line in open(metrics)]
        yield tb, "torn last line of metrics.jsonl, --resume", one_error_line(rc, out, err) if rc != 0 else "ok"
    except ValueError:
        yield tb, "torn last line of metrics.jsonl, --resume", "corrupt"

    t0 = time.monotonic()
    rc, out, err = sh(
        repo, gf, *golf_argv(x, d("g1"), "--dask_scheduler", DEAD_SCHEDULER), timeout=120)
    yield gf, "unreachable --dask_scheduler", one_error_line(rc, out, err)
    yield gf, "--oracle_timeout 0.01 (every job fails)", \
        one_error_line(*sh(repo, gf, *golf_argv(x, d("g2"), "--oracle_timeout", "0.01"), timeout=120))
    yield gf, "unknown method (every job fails)", \
        one_error_line(*sh(repo, gf, *golf_argv(x, d("g3"), "--oracle_method", "nonsense/sto-3g"), timeout=120))
    yield gf, "text file as --load_baseline", \
        one_error_line(*sh(repo, gf, *golf_argv(x, d("g4"))[:2], "--load_baseline", x["text"], *golf_argv(x, d("g4"))[4:]))
    yield gf, "random bytes as --load_baseline", \
        one_error_line(*sh(repo, gf, *golf_argv(x, d("g5"))[:2], "--load_baseline", x["noise"], *golf_argv(x, d("g5"))[4:]))
    yield gf, "text file as --d0", \
        one_error_line(*sh(repo, gf, "--d0", x["text"], *golf_argv(x, d("g6"))[2:]))
    collected = os.path.join(d("g7"), "collected.db")
    count = lambda: rows(collected)   # noqa: E731
    count.expected = 6
    yield gf, "two processes on one --out_dir", two_writers(repo, gf, golf_argv(x, d("g7")), count)
    collected = os.path.join(d("g9"), "collected.db")    # every row twice: 12 rows, K = 6
    sh(repo, gf, *golf_argv(x, d("g9")), timeout=180)
    import ase.db
    db = ase.db.connect(collected)
    for row in list(db.select()):                            # as two writers left it
        db.write(row.toatoms(), data=row.data, **row.key_value_pairs)
    rc, out, err = sh(repo, gf, *golf_argv(x, d("g9"), "--resume"), timeout=120)
    log = [json.loads(line) for line in open(os.path.join(d("g9"), "metrics.jsonl"))]
    yield gf, "--resume of a doubled collected.db (12 rows, K = 6)", \
        "ok" if rc == 0 and log[-1]["updates"] <= 12 else \
        f"duplicate (trains to {log[-1]['updates']} of 12 updates, lr climbs to {log[-1]['lr']:.1e})" \
        if rc == 0 else one_error_line(rc, out, err)
    collected = os.path.join(d("g8"), "collected.db")
    rc, out, err = kill_then_rerun(repo, gf, golf_argv(x, d("g8"), "--checkpoint_every", "1000"), lambda: rows(collected) if os.path.exists(collected) else 0, 2)
    yield gf, "kill -9 before the first checkpoint, same command", "ok" if rc != 0 and "--resume" in err and "Traceback" not in err else ("duplicate" if rows(collected) > 6 else one_error_line(rc, out, err))
    rc, out, err = sh(repo, gf, *golf_argv(x, d("g8"), "--resume"), timeout=120)
    yield gf, "kill -9, then --resume", "ok" if rc == 0 and rows(collected) == 6 else one_error_line(rc, out, err)

    records = os.path.join(d("e1"), "per_conformation.jsonl")
    rc, out, err = kill_then_rerun(repo, ev, eval_argv(x, d("e1")), lambda: lines_of(records), 1, tear=records)
    yield ev, "torn last line of per_conformation.jsonl, rerun", \
        one_error_line(rc, out, err) if rc != 0 else "ok"
    final = os.path.join(d("e2"), "final.db")
    sh(repo, ev, *eval_argv(x, d("e2")))
    with open(os.path.join(d("e2"), "per_conformation.jsonl")) as f:
        kept = f.readlines()[:-1]
    with open(os.path.join(d("e2"), "per_conformation.jsonl"), "w") as f:
        f.writelines(kept)                     # killed after final.db's row, before the record
    rc, out, err = sh(repo, ev, *eval_argv(x, d("e2")))
    yield ev, "kill between final.db row and record, rerun", "ok" if rc == 0 and rows(final) == 2 else ("duplicate" if rc == 0 else one_error_line(rc, out, err))
    yield ev, "text file as --checkpoint", \
        one_error_line(*sh(repo, ev, "--checkpoint", x["text"], *eval_argv(x, d("e3"))[2:]))
    yield ev, "random bytes as --checkpoint", \
        one_error_line(*sh(repo, ev, "--checkpoint", x["noise"], *eval_argv(x, d("e4"))[2:]))
    yield ev, "--db without optimal_energy", \
        one_error_line(*sh(repo, ev, "--checkpoint", x["ckpt"], "--db", x["d0"], *eval_argv(x, d("e5"))[4:]))
    yield ev, "--task table with a missing summary.json", \
        one_error_line(*sh(repo, ev, "--task", "table", "--summaries", d("none.json")))
    rc, out, err = sh(repo, ev, *eval_argv(x, d("e6"), "--oracle_method", "nonsense/sto-3g"))
    poisoned = os.path.exists(os.path.join(d("e6"), "per_conformation.jsonl"))
    yield ev, "unknown method (every job fails)", "loss (a fixed rerun skips them as done)" if poisoned else one_error_line(rc, out, err)
    yield ev, "unreachable --dask_scheduler", \
        one_error_line(*sh(repo, ev, *eval_argv(x, d("e7"), "--dask_scheduler", DEAD_SCHEDULER), timeout=120))
    records = os.path.join(d("e8"), "per_conformation.jsonl")
    count = lambda: lines_of(records)   # noqa: E731
    count.expected = 2
    yield ev, "two processes on one --out_dir", two_writers(repo, ev, eval_argv(x, d("e8")), count)


def main():
    with tempfile.TemporaryDirectory(prefix="golf-faults-") as tmp:
        x = inputs(tmp)
        print("| stage | case | outcome |\n|---|---|---|")
        for stage, case, outcome in cases(REPO, x, tmp):
            print(f"| {stage} | {case} | {outcome} |", flush=True)


if __name__ == "__main__":
    main()
