"""How often the NNP-optimizations of run.sh --preset official blew a molecule apart.

L-BFGS with lr 1, max_iter 5 and no line search (the paper's evaluation) now and then takes a
huge step even on a good model. Per evaluation directory, over its conformations:
    bond > 2 A       a bond of the SMILES (RDKit, hydrogens included) longer than 2 A at s_T
    max |s_T - s_0|  the largest distance an atom ended from its start (worst, median)
    oracle failed    the genuine oracle (xTB) returned no energy at some step / at s_T
    E_T > E_1        the oracle's energy at s_T above its energy after step 1
    E_T > E_0        diverged (Eq. 4's pct < 0), counted in pct_div

    python benchmarks/official_explosions.py [--run runs/official]
        [--evals eval_baseline eval_golf10k eval_rdkit]
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import oracles  # noqa: E402
import safe_io  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/official")
    p.add_argument("--test_db", default="runs/moses_test/test.db",
                   help="the test db the run evaluated (run.sh's official preset)")
    p.add_argument("--evals", nargs="+", default=["eval_baseline", "eval_golf10k", "eval_rdkit"])
    p.add_argument("--bond", type=float, default=2.0, help="a longer bond is broken, Angstrom")
    args = p.parse_args(argv)

    confs, _ = data.read_db(args.test_db, "total", verbose=False)
    by_row = {c.id: c for c in confs}
    bonds = {}                                   # test.db row -> [n_bonds, 2] atom indices
    for c in confs:
        mol = oracles.rdkit_molecule(c)
        bonds[c.id] = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()])

    print(f"{'evaluation':<16} {'n':>4} {'bond>2A':>8} {'max|dx| worst':>14} {'median':>7} "
          f"{'xTB failed':>10} {'at s_T':>6} {'E_T>E_1':>8} {'E_T>E_0':>8}")
    for name in args.evals:
        path = os.path.join(args.run, name)
        records = safe_io.read_jsonl(os.path.join(path, "per_conformation.jsonl"))
        finals, _ = data.read_db(os.path.join(path, "final.db"), "total", verbose=False)
        final_by_row = {int(c.info["conf_id"]): c.positions for c in finals}
        broken, moved, failed, failed_T, above_1, above_0 = [], [], 0, 0, 0, 0
        for r in records:
            c = by_row[r["conf_id"]]
            s_T = final_by_row[r["conf_id"]]                                 # [n_atoms, 3]
            i, j = bonds[c.id].T
            broken.append(np.linalg.norm(s_T[i] - s_T[j], axis=1).max() > args.bond)
            moved.append(np.linalg.norm(s_T - c.positions, axis=1).max())
            failed += bool(r["failures"])
            e = r["energy_dft"]
            failed_T += e[-1] is None
            if e[-1] is not None and e[0] is not None and len(e) > 1:
                above_1 += e[-1] > e[0]                      # steps[0] is t = 1 for NNPs
            if e[-1] is not None and r["e0"] is not None:
                above_0 += e[-1] > r["e0"]
        n = len(records)
        worst = f"{max(moved):.1f} A"
        print(f"{name:<16} {n:>4} {sum(broken):>8} {worst:>14} {np.median(moved):>6.2f}A "
              f"{failed:>10} {failed_T:>6} {above_1:>8} {above_0:>8}")


if __name__ == "__main__":
    main()
