"""Overhead of the oracle pool per Psi4 (or xTB) job.

`--jobs` gradients of one small molecule at HF/STO-3G (or --method gfn2-xtb), each way in
turn (interleaved, so that a change of machine load hits all alike):
    bare    psi4.gradient in this process (oracles.psi4_gradient), as a worker runs it;
            for xTB, oracles.xtb_gradient
    pool    LocalOraclePool with one worker: submit() -> result(), one job at a time
    dask    (--dask) DaskOraclePool on a one-worker LocalCluster, one job at a time
            (the Dask worker keeps its engine process from task to task)
    dask, engine per task
            (--dask) the same cluster, each task in a one-worker LocalOraclePool of its
            own, started and closed in the task: what keeping the engine saves
Prints the median time per job and its difference to the bare call. That difference
also holds Psi4's own speed, which varies by a few percent from process to process; each
pool's machinery alone (pipes, pickling, the watchdog thread, unit conversion, and Dask's
scheduling) is the round trip minus the time the engine took (OracleResult.seconds),
printed too.

    python benchmarks/oracle_pool.py [--jobs 20] [--smiles CCO] [--dask] [--method gfn2-xtb]
"""
import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack

os.environ.setdefault("OMP_NUM_THREADS", "1")      # as the pool's workers run
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import oracle_pool  # noqa: E402
import oracles  # noqa: E402
from data import Conformation  # noqa: E402


def conformation(smiles):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    return Conformation(np.array([a.GetAtomicNum() for a in mol.GetAtoms()]),
                        mol.GetConformer().GetPositions(), smiles=smiles)


def bare_psi4():
    """Psi4 in this process, set up as a worker sets it up. Psi4 leaves files in its
    working directory: work in a temporary one, removed at exit (registered before Psi4
    is imported, so it runs after Psi4's own exit handlers)."""
    workdir = tempfile.mkdtemp(prefix="golf-bench-")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    os.chdir(workdir)
    import psi4
    psi4.core.IOManager.shared_object().set_default_path(workdir)
    psi4.core.be_quiet()
    psi4.set_memory("2 GB")
    psi4.core.set_num_threads(1)
    return psi4


def job_in_its_own_engine(message, pool_kwargs):
    """A Dask task that starts an engine for one job, and closes it."""
    with oracle_pool.LocalOraclePool(n_workers=1, **pool_kwargs) as pool:
        return pool.submit_job(message).result()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--smiles", default="CCO")
    parser.add_argument("--dask", action="store_true", help="also time the Dask back end")
    parser.add_argument("--method", default="hf/sto-3g", help="a Psi4 method, or gfn2-xtb")
    args = parser.parse_args(argv)
    method = args.method
    bare_name = "bare xtb_gradient" if oracles.is_xtb(method) else "bare psi4.gradient"

    conf = conformation(args.smiles)
    charge, multiplicity = oracles.charge_and_multiplicity(conf.numbers, conf.smiles)
    if oracles.is_xtb(method):
        def bare_job():                              # what an xTB worker does per job
            oracles.xtb_gradient(method, conf.numbers, conf.positions, charge, multiplicity, {})
    else:
        psi4 = bare_psi4()

        def bare_job():                              # what a worker does per job
            psi4.core.clean_options()
            psi4.set_options({"reference": "rhf"})
            oracles.psi4_gradient(psi4, method, conf.numbers, conf.positions, charge,
                                  multiplicity)
            psi4.core.clean()
            return None

    with ExitStack() as stack:
        ways = {bare_name: bare_job}
        pool = stack.enter_context(oracle_pool.LocalOraclePool(method, n_workers=1))
        ways["LocalOraclePool"] = lambda: pool.submit(conf, 0).result()
        if args.dask:
            from dask.distributed import LocalCluster
            cluster = stack.enter_context(LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None))
            dask_pool = stack.enter_context(oracle_pool.DaskOraclePool(cluster.scheduler_address,
                                                                   method))
            ways["DaskOraclePool"] = lambda: dask_pool.submit(conf, 0).result()
            message = oracle_pool.make_job(conf, 0)
            ways["Dask, engine per task"] = lambda: dask_pool.client.submit(
                job_in_its_own_engine, message, dask_pool.pool_kwargs, pure=False).result()
        for job in ways.values():                    # warm-up
            job()
        times = {name: [] for name in ways}
        machinery = {name: [] for name in ways if name != bare_name}   # round trip - engine
        for _ in range(args.jobs):
            for name, job in ways.items():
                start = time.perf_counter()
                result = job()
                times[name].append(time.perf_counter() - start)
                if name != bare_name:
                    assert result.ok, result.reason
                    machinery[name].append(times[name][-1] - result.seconds)

    bare = np.median(times[bare_name])
    print(f"{args.jobs} gradients of {args.smiles} ({conf.n_atoms} atoms), {method}, "
          "1 thread; median per job:")
    for name, values in times.items():
        line = f"  {name:22s} {1e3 * np.median(values):7.1f} ms"
        if name != bare_name:
            line += (f"   {1e3 * (np.median(values) - bare):+7.1f} ms against bare;"
                     f" outside the engine {1e3 * np.median(machinery[name]):7.2f} ms")
        print(line)


if __name__ == "__main__":
    main()
