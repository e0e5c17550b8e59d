"""Does the lag change GOLF's result? golf.py's default loop (a job sent at step t enters D at
step t + L, or earlier at the cap of jobs in flight) against the synchronous loop of
Algorithm 1 (--oracle_lag 0: each step waits for its jobs), over seeds, with the laptop
preset's GOLF stage and the demo's scoring:

    .venv/bin/python benchmarks/oracle_lag.py [--seeds 0,1,2] [--out runs/oracle_lag]

For each seed and loop: golf.py from the laptop preset's f_baseline (models/laptop/, shipped)
on its D0 (runs/laptop/data/d0.db, made by `./run.sh --preset laptop`, or alone by the
make_trajectories.py command the error names), with the laptop's flags (K = 300, U = 5, 32
trajectories, lr 5e-4, batch 32) and GFN2-xTB on 2 local workers; then evaluate.py on the
60 held-out conformations of data/moses_test60.db (T = 100, as run.sh). Prints one line per
run, then each loop's mean and seed-to-seed standard deviation of pct_T, pct_div and E_res,
and the difference of the means against its standard error: "within seed noise" when the
difference is under two standard errors (two seeds at least). Every run resumes: a second
call only reads what is done ("golf.py s" is then the few seconds of the resumed call).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LOOPS = {"default": [], "synchronous": ["--oracle_lag", "0"]}
METRICS = (("pct_mean", "pct_T %"), ("pct_div", "pct_div %"), ("e_res_mean_kcal_mol",
                                                                "E_res kcal/mol"))
ORACLE = ["--oracle_method", "gfn2-xtb", "--n_workers", "2"]


def run(argv, log):
    """One stage script, its output to a log file; its last line on failure."""
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"error: {argv[0]} failed (exit {done.returncode}); see {log}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--d0", default="runs/laptop/data/d0.db")
    p.add_argument("--baseline", default="models/laptop/f_baseline.pt")
    p.add_argument("--test_db", default="data/moses_test60.db")
    p.add_argument("--max_oracle_steps", type=int, default=300, help="K (laptop preset)")
    p.add_argument("--out", default="runs/oracle_lag")
    opts = p.parse_args(argv)
    if not os.path.exists(os.path.join(ROOT, opts.d0)):
        sys.exit(f"error: no D0 at {opts.d0}; make it with `.venv/bin/python make_trajectories.py "
                 "--smiles data/moses_sample.smi --min_atoms 17 --max_atoms 35 --skip_molecules "
                 "260 --max_molecules 900 --conformer_selection butina --mode single_point "
                 f"--out {opts.d0} --oracle_method gfn2-xtb --n_workers 2` (the laptop preset's)")
    os.makedirs(os.path.join(ROOT, opts.out), exist_ok=True)
    seeds = [int(s) for s in opts.seeds.split(",")]
    results = {loop: [] for loop in LOOPS}
    print(f"{'loop':<12} {'seed':>4} " + " ".join(f"{name:>15}" for _, name in METRICS) +
          f" {'golf.py s':>10}", flush=True)
    for seed in seeds:
        for loop, flags in LOOPS.items():
            golf_dir = os.path.join(opts.out, f"{loop}_seed{seed}")
            eval_dir = os.path.join(opts.out, f"eval_{loop}_seed{seed}")
            log = os.path.join(ROOT, opts.out, f"{loop}_seed{seed}.log")
            t0 = time.perf_counter()
            run(["golf.py", "--d0", opts.d0, "--load_baseline", opts.baseline,
                 "--out_dir", golf_dir, "--max_oracle_steps", str(opts.max_oracle_steps),
                 "--utd_ratio", "5", "--n_parallel", "32", "--lr", "5e-4", "--batch_size", "32",
                 "--checkpoint_every", "250", "--resume", "--seed", str(seed), *ORACLE, *flags],
                log)
            seconds = time.perf_counter() - t0
            run(["evaluate.py", "--checkpoint", os.path.join(golf_dir, "checkpoint.pt"),
                 "--db", opts.test_db, "--out_dir", eval_dir, *ORACLE, "--timelimit_eval", "100",
                 "--eval_steps", "1,5,20,50,100", "--oracle_retries", "0",
                 "--page_conformations", "0"], log)
            with open(os.path.join(ROOT, eval_dir, "summary.json")) as f:
                summary = json.load(f)
            results[loop].append([summary[key] for key, _ in METRICS])
            print(f"{loop:<12} {seed:>4} " + " ".join(f"{v:>15.2f}" for v in results[loop][-1]) +
                  f" {seconds:>10.0f}", flush=True)
    n = len(seeds)
    means = {loop: np.mean(v, axis=0) for loop, v in results.items()}
    sds = {loop: np.std(v, axis=0, ddof=1) if n > 1 else np.zeros(len(METRICS))
           for loop, v in results.items()}
    for loop in LOOPS:
        print(f"{loop}: " + ", ".join(f"{name} {m:.2f} +- {s:.2f}" for (_, name), m, s in
                                      zip(METRICS, means[loop], sds[loop])) +
              f" (mean +- sd over {n} seeds)")
    for i, (_, name) in enumerate(METRICS):
        diff = means["default"][i] - means["synchronous"][i]
        se = float(np.sqrt((sds["default"][i] ** 2 + sds["synchronous"][i] ** 2) / n))
        verdict = "one seed: no seed noise to compare with" if n < 2 else \
            "within seed noise" if abs(diff) < 2 * se else "beyond seed noise"
        print(f"default - synchronous, {name}: {diff:+.2f} (standard error {se:.2f}): {verdict}")


if __name__ == "__main__":
    main()
