"""How close to the oracle's optimum can an NNP end? Start the paper's L-BFGS at the optimum.

pct_success counts a conformation when the NNP-optimized s_T lies within 1 kcal/mol of the
oracle's optimum E_opt (Eq. 8 below 1). An NNP's own minima are not the oracle's: even an
optimizer that never drifted would stop where the NNP's forces vanish. This measures where
that is. For every row of --test_db, s_0 := the oracle's optimum (optimal_positions), and
evaluate.py runs its usual T steps of L-BFGS (lr 1, 5 iterations, history 100) on each
checkpoint; the oracle scores s_T. Then, per model:
    E_res at the floor   E(s_T) - E_opt, kcal/mol: what the NNP's nearest minimum costs
    < 1 kcal/mol         the share of conformations that can count as a success at all
                         (in the basin the oracle optimized; the pct_success an NNP with
                         this accuracy reaches when nothing drifts)
    uphill               the share with E(s_T) > E_opt + 1e-6 Hartree
    moved                median largest atom displacement |s_T - optimum|, Angstrom
    SCC failed           s_T the oracle could not label (atoms pulled apart)

    python benchmarks/nnp_floor.py --test_db runs/moses_test/test.db --out_dir runs/floor \\
        --checkpoints f_baseline=runs/laptop/baseline/checkpoint.pt \\
                      f_GOLF-300=runs/laptop/seed0/golf/checkpoint.pt \\
        [--max_conformations 220] [--oracle_method gfn2-xtb] [--n_workers 2]

Each model's evaluation lands in --out_dir/<name> (resumable, as evaluate.py's); the
at-optimum test db in --out_dir/at_optimum.db.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import evaluate  # noqa: E402


def write_at_optimum_db(test_db, out_path, max_conformations):
    """A copy of the first max_conformations rows of test_db with s_0 = the optimum and
    E_0 = E_opt (no forces: evaluate.py needs none at s_0). Row order and conf ids kept."""
    confs, _ = data.read_db(test_db, verbose=False)
    confs = confs[:max_conformations]
    if os.path.exists(out_path):
        existing, _ = data.read_db(out_path, verbose=False)
        if [(c.smiles, c.n_atoms) for c in existing] != [(c.smiles, c.n_atoms) for c in confs]:
            sys.exit(f"error: {out_path} holds other conformations than the first "
                     f"{len(confs)} of {test_db}; use a new --out_dir")
        return
    missing = [c.id for c in confs if c.optimal_positions is None]
    if missing:
        sys.exit(f"error: {test_db}, row {missing[0]}: no optimal_positions; make the test db "
                 "with make_trajectories.py --mode optimize --out_optimal")
    db = data.connect_for_writing(out_path)
    with db:
        for c in confs:
            at_opt = data.Conformation(numbers=c.numbers, positions=c.optimal_positions,
                                       energy=c.optimal_energy, smiles=c.smiles,
                                       optimal_energy=c.optimal_energy,
                                       optimal_positions=c.optimal_positions)
            data.write_conformation(db, at_opt, **{k: v for k, v in c.info.items()
                                                   if isinstance(v, (int, float, str))})


def floor_row(name, out_dir, at_optimum):
    """One table row from a model's per-conformation records and final.db."""
    records = evaluate.read_records(os.path.join(out_dir, "per_conformation.jsonl"))
    final, _ = data.read_db(os.path.join(out_dir, "final.db"), "total", verbose=False)
    start = {c.id: c.optimal_positions for c in at_optimum}
    moved = [float(np.linalg.norm(f.positions - start[int(f.info["conf_id"])], axis=1).max())
             for f in final]
    e_res = np.array([(r["energy_dft"][-1] - r["e_opt"]) * data.HARTREE_TO_KCAL
                      for r in records if r["energy_dft"][-1] is not None])
    n = len(records)
    return {"model": name, "n": n, "scored": len(e_res),
            "e_res_median": float(np.median(e_res)), "e_res_mean": float(e_res.mean()),
            "pct_below_1": 100.0 * float((e_res < 1.0).sum()) / n,
            "pct_uphill": 100.0 * float((e_res > 1e-6 * data.HARTREE_TO_KCAL).sum()) / n,
            "moved_median": float(np.median(moved)), "scc_failed": n - len(e_res)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--test_db", default="runs/moses_test/test.db")
    p.add_argument("--out_dir", default="runs/floor")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--max_conformations", type=int, default=220)
    p.add_argument("--oracle_method", default="gfn2-xtb")
    p.add_argument("--n_workers", type=int, default=2)
    p.add_argument("--timelimit_eval", type=int, default=100, help="T, as evaluate.py")
    args = p.parse_args()
    named = [c.split("=", 1) for c in args.checkpoints]
    bad = [c for c, n in zip(args.checkpoints, named) if len(n) != 2 or not os.path.isfile(n[1])]
    if bad:
        sys.exit(f"error: --checkpoints {bad[0]}: give NAME=PATH with an existing checkpoint")
    os.makedirs(args.out_dir, exist_ok=True)
    db_path = os.path.join(args.out_dir, "at_optimum.db")
    write_at_optimum_db(args.test_db, db_path, args.max_conformations)
    at_optimum, _ = data.read_db(db_path, verbose=False)
    rows = []
    for name, checkpoint in named:
        out = os.path.join(args.out_dir, name)
        evaluate.main(["--checkpoint", checkpoint, "--db", db_path, "--out_dir", out,
                       "--timelimit_eval", str(args.timelimit_eval),
                       "--eval_steps", str(args.timelimit_eval),
                       "--oracle_method", args.oracle_method, "--n_workers", str(args.n_workers),
                       "--oracle_retries", "0", "--page_conformations", "0"])
        rows.append(floor_row(name, out, at_optimum))
    with open(os.path.join(args.out_dir, "floor.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nL-BFGS from the oracle's optimum, T = {args.timelimit_eval} "
          f"({args.test_db}, first {len(at_optimum)} rows; energies by {args.oracle_method})")
    print("| model | E_res median (kcal/mol) | E_res mean | < 1 kcal/mol (%) | uphill (%) "
          "| moved median (A) | SCC failed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['e_res_median']:.2f} | {r['e_res_mean']:.2f} | "
              f"{r['pct_below_1']:.1f} | {r['pct_uphill']:.1f} | {r['moved_median']:.3f} | "
              f"{r['scc_failed']} |")


if __name__ == "__main__":
    try:
        main()
    except data.DataError as err:        # a missing or malformed db: one line, no traceback
        sys.exit(f"error: {err}")
