"""Spot-check of run.sh --preset official: does wB97X-D/def2-SVP, the models' own level,
agree with GFN2-xTB, the preset's proxy oracle, on what the NNP-optimization did?

For the --n_molecules smallest test conformations (fewest atoms, then the conf_id key, which
make_trajectories.py derives from the SMILES line: the db's row ids follow arrival order) of
runs/moses_test/test.db, Psi4 single points at --method of
    s_0     the ETKDG start
    s_opt   the GFN2-xTB optimum (test.db's optimal_positions)
    s_T     each model's NNP-optimized conformation (<eval_dir>/final.db)
then prints, per conformation and geometry, E - E(s_0) in kcal/mol by xTB (from test.db and
per_conformation.jsonl) and by DFT. E_T - E_0 < 0 by both: the NNP-optimization lowered the
energy at both levels. E(s_T) - E(s_opt) by DFT shows whether s_T lies below the xTB optimum
on the DFT surface: the floor that xTB puts under the models' E_res.

Every finished single point is appended to <run>/dft_check.jsonl, and a rerun skips it
(a wB97X-D gradient of a 20-atom molecule takes minutes on 1 core).

    python benchmarks/official_dft_check.py [--run runs/official] [--n_molecules 3]
        [--evals eval_baseline eval_golf10k] [--method wb97x-d/def2-svp] [--n_workers 2]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import oracle_pool  # noqa: E402
import safe_io  # noqa: E402


def read_jsonl(path):
    """safe_io.read_jsonl, or no records before the file exists (the cache's first run)."""
    return safe_io.read_jsonl(path) if os.path.exists(path) else []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/official")
    p.add_argument("--test_db", default="runs/moses_test/test.db",
                   help="the test db the run evaluated (run.sh's official preset)")
    p.add_argument("--n_molecules", type=int, default=3)
    p.add_argument("--evals", nargs="+", default=["eval_baseline", "eval_golf10k"])
    p.add_argument("--method", default="wb97x-d/def2-svp")
    p.add_argument("--n_workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per Psi4 job")
    args = p.parse_args(argv)

    confs, _ = data.read_db(args.test_db, "total", verbose=False)
    records = {}                                   # (eval, test.db row) -> per_conformation record
    finals = {}                                    # (eval, test.db row) -> s_T [n_atoms, 3]
    for name in args.evals:
        for r in read_jsonl(os.path.join(args.run, name, "per_conformation.jsonl")):
            records[name, r["conf_id"]] = r
        try:                                       # none yet while evaluate.py runs
            final, _ = data.read_db(os.path.join(args.run, name, "final.db"), "total",
                                    verbose=False)
        except data.DataError:
            continue
        for c in final:
            finals[name, int(c.info["conf_id"])] = c.positions
    chosen = sorted(confs, key=lambda c: (c.n_atoms, c.info["conf_id"]))[:args.n_molecules]

    # xTB energies (Hartree) of every geometry, and the jobs DFT still has to do
    geometries = []                                # (conf, which, positions, E_xTB or None)
    for c in chosen:
        geometries.append((c, "s_0", c.positions, c.energy))
        geometries.append((c, "s_opt", c.optimal_positions, c.optimal_energy))
        for name in args.evals:
            if (name, c.id) in finals:
                e_t = records[name, c.id]["energy_dft"][-1]
                geometries.append((c, f"s_T {name}", finals[name, c.id], e_t))
    cache_path = os.path.join(args.run, "dft_check.jsonl")
    cache = {(r["row"], r["which"]): r for r in read_jsonl(cache_path)
             if r["method"] == args.method}
    todo = [g for g in geometries if (g[0].id, g[1]) not in cache]
    print(f"{len(geometries)} geometries of db rows {[c.id for c in chosen]} "
          f"({[c.n_atoms for c in chosen]} atoms); {len(todo)} {args.method} single points to do")

    if todo:
        with oracle_pool.LocalOraclePool(args.method, n_workers=args.n_workers,
                                     threads=args.threads, timeout=3600.0) as pool:
            futures = [(g, pool.submit(data.Conformation(numbers=g[0].numbers, positions=g[2],
                                                         smiles=g[0].smiles), g[0].id))
                       for g in todo]
            for (c, which, _, _), future in futures:
                result = future.result()
                row = {"row": c.id, "which": which, "method": args.method, "ok": result.ok,
                       "energy": result.energy, "reason": result.reason,
                       "seconds": result.seconds}
                print(f"  conformation {c.id} {which}: {result.energy} Hartree "
                      f"({result.seconds:.0f} s) {result.reason}", flush=True)
                cache[c.id, which] = row
                safe_io.append_jsonl(cache_path, row)

    kcal = data.HARTREE_TO_KCAL
    print(f"\nE - E(s_0), kcal/mol: GFN2-xTB against {args.method}")
    print(f"{'row':>5} {'atoms':>5}  {'geometry':<22} {'xTB':>9} {'DFT':>9}")
    for c, which, _, e_xtb in geometries:
        e0_dft = cache.get((c.id, "s_0"), {}).get("energy")
        e_dft = cache.get((c.id, which), {}).get("energy")
        d_xtb = "failed" if e_xtb is None else f"{(e_xtb - c.energy) * kcal:9.2f}"
        d_dft = "-" if e_dft is None or e0_dft is None else f"{(e_dft - e0_dft) * kcal:9.2f}"
        print(f"{c.id:>5} {c.n_atoms:>5}  {which:<22} {d_xtb:>9} {d_dft:>9}   {c.smiles}")


if __name__ == "__main__":
    main()
