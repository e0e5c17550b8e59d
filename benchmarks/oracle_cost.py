"""Cost of one genuine-oracle label (energy and forces): GFN2-xTB against HF/STO-3G Psi4.

One drug-like molecule of --min_atoms..--max_atoms atoms (hydrogens included) from
data/moses_sample.smi, its ETKDG conformer, 1 thread per job:
    xTB bare       oracles.xtb_gradient in this process (what an xTB worker runs per job)
    xTB pool       LocalOraclePool("gfn2-xtb", 1 worker): submit() -> result(), one at a time
    Psi4 pool      LocalOraclePool("hf/sto-3g", 1 worker), the same (--psi4_jobs, 0: skip)
    xTB optimize   one optimization through the xTB pool (ASE BFGS to 3e-4 Hartree/Bohr)
Prints the median seconds per label, the Psi4/xTB ratio, and the pool's overhead per xTB
job: the round trip minus the bare call (pickling, pipes, the watchdog thread, a fresh
tblite calculator), and minus the time the pool measured for the job (OracleResult.seconds).

    python benchmarks/oracle_cost.py [--min_atoms 20] [--max_atoms 30] [--xtb_jobs 30]
                                     [--psi4_jobs 3] [--molecule 0]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")      # as the pool's workers run
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # molecules.py
sys.path.insert(0, ROOT)           # first: benchmarks/oracle_pool.py must not stand for ours
import oracle_pool  # noqa: E402
import oracles  # noqa: E402
from data import Conformation  # noqa: E402
from molecules import load_molecules  # noqa: E402


def timed(job, n):
    """[n] seconds of n calls, and the last call's result."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        result = job()
        times.append(time.perf_counter() - start)
    return np.array(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min_atoms", type=int, default=20)
    parser.add_argument("--max_atoms", type=int, default=30)
    parser.add_argument("--molecule", type=int, default=0, help="which molecule of that size")
    parser.add_argument("--xtb_jobs", type=int, default=30)
    parser.add_argument("--psi4_jobs", type=int, default=3)
    args = parser.parse_args(argv)

    numbers, positions = load_molecules(args.molecule + 1, args.min_atoms, args.max_atoms)[-1]
    conf = Conformation(numbers, positions)
    charge, multiplicity = oracles.charge_and_multiplicity(numbers)
    print(f"load average {os.getloadavg()[0]:.2f}; a molecule of {len(numbers)} atoms, "
          "1 thread per job; median seconds per label:")

    oracles.xtb_gradient("gfn2-xtb", numbers, positions, charge, multiplicity, {})  # warm-up
    bare, _ = timed(lambda: oracles.xtb_gradient("gfn2-xtb", numbers, positions, charge,
                                                 multiplicity, {}), args.xtb_jobs)
    with oracle_pool.LocalOraclePool("gfn2-xtb", n_workers=1, threads=1) as pool:
        pool.submit(conf, 0).result()                                             # warm-up
        worker_seconds = []

        def pool_job():
            result = pool.submit(conf, 0).result()
            worker_seconds.append(result.seconds)
            return result
        pooled, result = timed(pool_job, args.xtb_jobs)
        assert result.ok, result.reason
        start = time.perf_counter()
        optimization = pool.submit(conf, 1, kind="optimize").result()
        optimization_seconds = time.perf_counter() - start
    xtb = np.median(pooled)
    print(f"  GFN2-xTB, bare tblite      {np.median(bare):8.4f} s   ({args.xtb_jobs} jobs)")
    print(f"  GFN2-xTB, LocalOraclePool  {xtb:8.4f} s   ({1e3 * (xtb - np.median(bare)):+.1f} "
          f"ms against bare; {1e3 * np.median(pooled - worker_seconds):.2f} ms outside the "
          "worker's job time)")
    if args.psi4_jobs:
        with oracle_pool.LocalOraclePool("hf/sto-3g", n_workers=1, threads=1) as pool:
            psi4, result = timed(lambda: pool.submit(conf, 0).result(), args.psi4_jobs)
        assert result.ok, result.reason
        print(f"  HF/STO-3G, LocalOraclePool {np.median(psi4):8.4f} s   ({args.psi4_jobs} jobs)"
              f"   = {np.median(psi4) / xtb:.0f} x GFN2-xTB")
    print(f"  GFN2-xTB optimization: {optimization.n_steps} steps (gradients), converged "
          f"{optimization.converged}, {optimization_seconds:.2f} s = "
          f"{optimization_seconds / max(optimization.n_steps, 1):.4f} s per step")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
