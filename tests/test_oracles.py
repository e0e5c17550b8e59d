"""The oracles: real Psi4 at HF/STO-3G on small molecules, and RDKit MMFF94.

Literature values checked: the water of Crawford's programming project #3 (HF/STO-3G at
a fixed geometry, E = -74.942079928192 Hartree) and CCCBDB's HF/STO-3G water optimum
(E = -74.965901 Hartree, r(OH) = 0.989 A, HOH = 100.0 deg). Both are exact-integral
values, so the pools here use scf_type pk (Psi4's default, density fitting, is 1e-4 off).
"""
import os
import signal
import time

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

import data
import oracle_pool
import oracles
from data import BOHR_TO_ANGSTROM, Conformation

EXACT = {"scf_type": "pk", "e_convergence": 1e-10, "d_convergence": 1e-10}
METHOD = "hf/sto-3g"

# Crawford's water, given in Bohr
CRAWFORD_WATER = Conformation(
    numbers=np.array([8, 1, 1]), smiles="O",
    positions=np.array([[0.0, -0.143225816552, 0.0],
                        [1.638036840407, 1.136548822547, 0.0],
                        [-1.638036840407, 1.136548822547, 0.0]]) * BOHR_TO_ANGSTROM)


def embedded(smiles, seed=7):
    """An ETKDG conformation of a SMILES (hydrogens after the heavy atoms)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    return Conformation(numbers=np.array([a.GetAtomicNum() for a in mol.GetAtoms()]),
                        positions=mol.GetConformer().GetPositions(), smiles=smiles)


def wait_until_running(future, timeout=30.0):
    end = time.monotonic() + timeout
    while not future.running() and time.monotonic() < end:
        time.sleep(0.01)
    assert future.running()


def reaped(pid):
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture(scope="module")
def pool():
    """Two workers, retries=1, a generous timeout."""
    with oracle_pool.LocalOraclePool(METHOD, n_workers=2, timeout=60, retries=1,
                                 psi4_options=EXACT) as pool:
        yield pool


@pytest.fixture(scope="module")
def strict_pool():
    """One worker, timeout 5 s, no retries, optimizations of at most 2 steps."""
    with oracle_pool.LocalOraclePool(METHOD, n_workers=1, timeout=5, retries=0,
                                 max_opt_steps=2, psi4_options=EXACT) as pool:
        yield pool


# ---------------------------------------------------------------------------------------
# Energies and forces
# ---------------------------------------------------------------------------------------

def test_water_energy_and_forces_match_literature(pool):
    r = pool.submit(CRAWFORD_WATER, 7).result()
    assert r.ok and r.conf_id == 7 and r.attempts == 1 and r.reason == ""
    assert r.energy == pytest.approx(-74.942079928192, abs=1e-8)
    f = r.forces                                        # [3, 3] Hartree/Angstrom
    assert f.shape == (3, 3)
    np.testing.assert_allclose(f.sum(axis=0), 0.0, atol=1e-8)       # no net force
    np.testing.assert_allclose(f[:, 2], 0.0, atol=1e-8)             # planar molecule
    assert abs(f[0, 0]) < 1e-8                                      # O on the mirror axis
    np.testing.assert_allclose(f[1], f[2] * [-1, 1, 1], atol=1e-8)  # mirror-image hydrogens
    # OH bonds 1.1 A, longer than HF/STO-3G's 0.99 A: the hydrogens are pulled to O
    assert np.dot(f[1], CRAWFORD_WATER.positions[0] - CRAWFORD_WATER.positions[1]) > 0


def test_forces_are_minus_the_energy_gradient(pool):
    """F . d = -dE/dh along random directions d: central differences, h = 1e-3 A."""
    conf = Conformation(numbers=CRAWFORD_WATER.numbers, smiles="O",
                        positions=CRAWFORD_WATER.positions + [[0.0, 0.05, 0.02],
                                                              [0.03, 0.0, 0.0],
                                                              [0.0, -0.04, 0.01]])
    rng = np.random.default_rng(0)
    directions = [d / np.linalg.norm(d) for d in rng.normal(size=(2, 3, 3))]
    h = 1e-3
    center = pool.submit(conf, 0)
    shifted = [[pool.submit(Conformation(conf.numbers, conf.positions + s * h * d, smiles="O"),
                            1) for s in (1, -1)] for d in directions]
    forces = center.result().forces
    for d, (plus, minus) in zip(directions, shifted):
        slope = (plus.result().energy - minus.result().energy) / (2 * h)   # Hartree/A
        assert np.sum(forces * d) == pytest.approx(-slope, abs=1e-5)


def test_impossible_inputs_come_back_as_failure_records(pool):
    uranium = Conformation(numbers=np.array([92]), positions=np.zeros((1, 3)))
    no_basis = pool.submit(uranium, 1).result()
    doublet_water = pool.submit(CRAWFORD_WATER, 2, multiplicity=2).result()
    for r in (no_basis, doublet_water):
        assert not r.ok and r.energy is None and r.forces is None
        assert oracle_pool.is_permanent(r.reason)           # they would fail again:
        assert r.attempts == 1                          # not retried (retries=1)
        assert r.seconds >= 0.0
    assert "BasisSetNotFound" in no_basis.reason
    assert "chg/mult" in doublet_water.reason


def test_charge_and_multiplicity():
    assert oracles.charge_and_multiplicity([8, 1, 1], "O") == (0, 1)
    assert oracles.charge_and_multiplicity([7, 1, 1, 1, 1], "[NH4+]") == (1, 1)
    assert oracles.charge_and_multiplicity([6, 1, 1, 1], "[CH3]") == (0, 2)
    assert oracles.charge_and_multiplicity([6, 1, 1, 1], None) == (0, 2)   # no SMILES: 0


# ---------------------------------------------------------------------------------------
# Crashes, timeouts, retries
# ---------------------------------------------------------------------------------------

def test_killed_workers_are_retried(pool):
    """Both workers die (SIGKILL, as a segfault would) mid-job; retries=1 reruns the jobs
    on fresh workers and they succeed."""
    benzene = embedded("c1ccccc1")
    futures = [pool.submit(benzene, k) for k in range(2)]
    for future in futures:
        wait_until_running(future)
    old = pool.worker_pids
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    results = [f.result() for f in futures]
    assert all(r.ok and r.attempts == 2 for r in results)
    assert results[0].energy == results[1].energy
    assert not set(old) & set(pool.worker_pids)
    assert all(reaped(pid) for pid in old)


def test_crash_is_a_failure_record(strict_pool):
    future = strict_pool.submit(embedded("c1ccccc1"), 5)
    wait_until_running(future)
    (pid,) = strict_pool.worker_pids
    os.kill(pid, signal.SIGKILL)
    r = future.result()
    assert not r.ok and r.attempts == 1
    assert r.reason.startswith("worker died with signal 9")
    assert reaped(pid)
    assert strict_pool.submit(CRAWFORD_WATER, 6).result().ok      # the pool goes on


def test_timeout_kills_the_job_and_the_pool_goes_on(strict_pool):
    drug_like = embedded("O=C(NCC1CCCOC1)c1ccc(Cl)cc1O")     # 34 atoms: ~35 s at HF/STO-3G
    (pid,) = strict_pool.worker_pids
    slow = strict_pool.submit(drug_like, 8)
    water = strict_pool.submit(CRAWFORD_WATER, 9)              # queued behind it
    r = slow.result()
    assert not r.ok and r.reason.startswith("timeout") and 4.9 < r.seconds < 9
    assert reaped(pid)
    assert water.result().ok
    assert water.result().energy == pytest.approx(-74.942079928192, abs=1e-8)


def test_scf_non_convergence_is_a_failure_record():
    with oracle_pool.LocalOraclePool(METHOD, n_workers=1, retries=0,
                                 psi4_options={"maxiter": 2, "fail_on_maxiter": True}) as pool:
        r = pool.submit(CRAWFORD_WATER, 0).result()
    assert not r.ok and "SCFConvergenceError" in r.reason


def test_a_crashed_optimization_keeps_its_finished_steps(strict_pool):
    benzene = embedded("c1ccccc1")
    future = strict_pool.submit(benzene, 10, kind="optimize")
    wait_until_running(future)
    end = time.monotonic() + 30
    while not strict_pool._workers[0].job.steps and time.monotonic() < end:
        time.sleep(0.01)                                 # step 0 is done: kill the worker
    os.kill(strict_pool.worker_pids[0], signal.SIGKILL)
    r = future.result()
    assert not r.ok and r.reason.startswith("worker died")
    assert r.n_steps >= 1 and r.trajectory_forces.shape[1:] == (12, 3)
    single_point = strict_pool.submit(benzene, 11).result()
    assert r.energy == pytest.approx(single_point.energy, abs=1e-9)
    np.testing.assert_allclose(r.forces, single_point.forces, atol=1e-7)


def test_workers_are_reaped_and_scratch_removed():
    with oracle_pool.LocalOraclePool(METHOD, n_workers=1) as pool:
        assert pool.submit(CRAWFORD_WATER, 0).result().ok
        pids = pool.worker_pids
        dirs = [w.dir for w in pool._workers]
        assert all(os.path.isdir(d) for d in dirs)
    assert all(reaped(pid) for pid in pids)
    assert not any(os.path.exists(d) for d in dirs)
    with pytest.raises(oracles.OracleError):
        pool.submit(CRAWFORD_WATER, 1)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(oracles.OracleError, match="--psi4_memory"):
        oracle_pool.LocalOraclePool(METHOD, n_workers=1, memory="lots")
    with pytest.raises(oracles.OracleError, match="--n_workers"):
        oracle_pool.LocalOraclePool(METHOD, n_workers=0)
    with pytest.raises(oracles.OracleError, match="--oracle_threads must be at least 1"):
        oracle_pool.LocalOraclePool(METHOD, n_workers=1, threads=0)


def test_oracle_threads_flag_and_its_psi4_alias_reach_the_pool():
    import argparse
    parser = oracles.add_oracle_args(argparse.ArgumentParser())
    assert parser.parse_args([]).oracle_threads == 1
    for flag in ("--oracle_threads", "--psi4_threads"):
        args = parser.parse_args([flag, "3", "--n_workers", "1", "--oracle_method", "gfn2-xtb"])
        assert args.oracle_threads == 3
        with oracle_pool.make_oracle_pool(args) as pool:
            assert pool.settings["threads"] == 3 and pool.n_parallel == 1
            (worker,) = pool._workers
            with open(f"/proc/{worker.process.pid}/environ", "rb") as f:
                assert b"OMP_NUM_THREADS=3\0" in f.read()


def test_a_stage_that_never_optimizes_offers_no_optimization_flags(capsys):
    """add_oracle_args(optimize=False) (evaluate.py) has no --max_opt_steps or
    --opt_coordinates; its pool gets their defaults."""
    import argparse
    import evaluate
    parser = oracles.add_oracle_args(argparse.ArgumentParser(), optimize=False)
    args = parser.parse_args(["--n_workers", "1", "--oracle_method", "gfn2-xtb"])
    assert not hasattr(args, "max_opt_steps") and not hasattr(args, "opt_coordinates")
    with oracle_pool.make_oracle_pool(args) as pool:
        assert pool.settings["max_opt_steps"] == oracles.default_max_opt_steps("gfn2-xtb")
        assert pool.settings["opt_coordinates"] == oracles.DEFAULT_OPT_COORDINATES
    for flag in ("--max_opt_steps", "--opt_coordinates"):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--db", "t.db", "--out_dir", "e", flag, "3"])
        assert f"unrecognized arguments: {flag} 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Geometry optimization
# ---------------------------------------------------------------------------------------

def test_water_optimization_reaches_the_literature_minimum(pool):
    r = pool.submit(CRAWFORD_WATER, 3, kind="optimize").result()
    assert r.ok and r.converged and r.kind == "optimize"
    n = r.n_steps
    assert n >= 3
    assert r.trajectory_positions.shape == (n, 3, 3) and r.trajectory_forces.shape == (n, 3, 3)
    np.testing.assert_allclose(r.trajectory_positions[0], CRAWFORD_WATER.positions, atol=1e-9)
    assert r.energy == pytest.approx(-74.942079928192, abs=1e-8)     # step 0 = the start
    assert np.all(np.diff(r.trajectory_energy) < 0)
    assert r.optimal_energy == pytest.approx(-74.965901, abs=2e-6)   # CCCBDB
    assert np.abs(r.trajectory_forces[-1]).max() < 1e-3
    x = r.optimal_positions
    bond = np.linalg.norm(x[1] - x[0])
    angle = np.degrees(np.arccos(np.dot(x[1] - x[0], x[2] - x[0])
                                 / (bond * np.linalg.norm(x[2] - x[0]))))
    assert bond == pytest.approx(0.989, abs=1e-3) and angle == pytest.approx(100.0, abs=0.1)


def test_optimization_out_of_steps_returns_its_steps(strict_pool):
    r = strict_pool.submit(CRAWFORD_WATER, 4, kind="optimize").result()
    assert r.ok and not r.converged and r.n_steps == 2
    assert "not converged in 2 steps" in r.reason
    assert r.optimal_energy == r.trajectory_energy[-1] < r.energy


# ---------------------------------------------------------------------------------------
# Dask back end: same results as the local pool
# ---------------------------------------------------------------------------------------

def test_dask_pool_gives_the_local_results(pool):
    from dask.distributed import LocalCluster
    ethanol = embedded("CCO")
    local = [pool.submit(ethanol, 0).result(),
             pool.submit(CRAWFORD_WATER, 1, kind="optimize").result()]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, \
            oracle_pool.DaskOraclePool(cluster.scheduler_address, METHOD, timeout=60,
                                   retries=1, psi4_options=EXACT) as dask_pool:
        futures = [dask_pool.submit(ethanol, 0),
                   dask_pool.submit(CRAWFORD_WATER, 1, kind="optimize"),
                   dask_pool.submit(Conformation(np.array([92]), np.zeros((1, 3))), 2)]
        remote = [f.result(timeout=60) for f in futures]
    for a, b in zip(local, remote):
        assert b.ok and b.conf_id == a.conf_id
        assert b.energy == pytest.approx(a.energy, abs=1e-10)
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-10)
    np.testing.assert_allclose(remote[1].trajectory_energy, local[1].trajectory_energy,
                               atol=1e-10)
    assert not remote[2].ok and "BasisSetNotFound" in remote[2].reason


def one_worker_cluster():
    from dask.distributed import LocalCluster
    return LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None)


def cpu_ticks(pid):
    """CPU time a process has used (utime + stime, in clock ticks), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()      # fields[0] is the state, field 3
    return int(fields[11]) + int(fields[12])             # fields 14 and 15


def test_a_dask_worker_keeps_its_engine_from_task_to_task():
    """Two tasks on a one-thread Dask worker run in one engine process; a second client
    with other settings (xTB) gets an engine of its own beside it; closing the cluster
    stops both."""
    with one_worker_cluster() as cluster:
        with oracle_pool.DaskOraclePool(cluster.scheduler_address, METHOD, timeout=60,
                                        psi4_options=EXACT) as dask_pool:
            first = dask_pool.submit(CRAWFORD_WATER, 0).result(timeout=60)
            ((address, engines),) = dask_pool.engine_pids().items()
            second = dask_pool.submit(CRAWFORD_WATER, 1).result(timeout=60)
            assert dask_pool.engine_pids() == {address: engines} and len(engines) == 1
        assert first.ok and second.ok
        assert first.energy == second.energy == pytest.approx(-74.942079928192, abs=1e-8)
        with oracle_pool.DaskOraclePool(cluster.scheduler_address, "gfn2-xtb",
                                        timeout=60) as xtb_pool:
            assert xtb_pool.submit(CRAWFORD_WATER, 2).result(timeout=60).ok
            (both,) = xtb_pool.engine_pids().values()
        assert len(both) == 2 and engines[0] in both
    assert all(reaped(pid) for pid in both)


def test_an_engine_killed_mid_task_is_a_failure_record_and_the_dask_worker_goes_on():
    drug_like = embedded("O=C(NCC1CCCOC1)c1ccc(Cl)cc1O")     # 34 atoms: ~35 s at HF/STO-3G
    with one_worker_cluster() as cluster, \
            oracle_pool.DaskOraclePool(cluster.scheduler_address, METHOD, timeout=60,
                                       retries=0, psi4_options=EXACT) as dask_pool:
        dask_worker_pid = dask_pool.client.run(os.getpid)
        assert dask_pool.submit(CRAWFORD_WATER, 0).result(timeout=60).ok
        ((_, (engine,)),) = dask_pool.engine_pids().items()
        idle = cpu_ticks(engine)
        slow = dask_pool.submit(drug_like, 1)
        end = time.monotonic() + 30
        while cpu_ticks(engine) < idle + 5 and time.monotonic() < end:
            time.sleep(0.01)                               # the engine computes: kill it
        os.kill(engine, signal.SIGKILL)
        r = slow.result(timeout=60)
        assert not r.ok and r.attempts == 1 and r.reason.startswith("worker died with signal 9")
        water = dask_pool.submit(CRAWFORD_WATER, 2).result(timeout=60)
        assert water.ok and water.energy == pytest.approx(-74.942079928192, abs=1e-8)
        assert dask_pool.client.run(os.getpid) == dask_worker_pid      # the same Dask worker
        ((_, (fresh,)),) = dask_pool.engine_pids().items()
        assert fresh != engine and reaped(engine)


def test_unreachable_dask_scheduler_is_one_clear_error():
    with pytest.raises(oracles.OracleError, match="cannot reach the Dask scheduler"):
        oracle_pool.DaskOraclePool("tcp://127.0.0.1:9", METHOD, connect_timeout=1)


# ---------------------------------------------------------------------------------------
# Surrogate oracle: MMFF94
# ---------------------------------------------------------------------------------------

def test_mmff_energy_matches_rdkit_and_reuses_the_force_field():
    conf = embedded("CC(=O)Oc1ccccc1C(=O)O")
    surrogate = oracles.MMFFSurrogate(conf)
    mol = Chem.AddHs(Chem.MolFromSmiles(conf.smiles))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    reference = AllChem.MMFFGetMoleculeForceField(
        mol, AllChem.MMFFGetMoleculeProperties(mol)).CalcEnergy()
    assert surrogate.energy(conf.positions) == pytest.approx(reference, rel=1e-10)
    moved = conf.positions + np.random.default_rng(0).normal(scale=0.05, size=conf.positions.shape)
    assert surrogate.energy(moved) != pytest.approx(reference)
    assert surrogate.energy(conf.positions) == pytest.approx(reference, rel=1e-10)


def test_mmff_minimize_lowers_the_energy():
    conf = embedded("CCOC(C)=O")
    positions = oracles.mmff_minimize(conf, max_iters=500)
    surrogate = oracles.MMFFSurrogate(conf)
    assert positions.shape == conf.positions.shape
    assert surrogate.energy(positions) < surrogate.energy(conf.positions) - 1.0


def test_mmff_without_smiles_perceives_bonds():
    conf = embedded("CCO")
    with_smiles = oracles.MMFFSurrogate(conf).energy(conf.positions)
    conf.smiles = None
    assert oracles.MMFFSurrogate(conf).energy(conf.positions) == pytest.approx(with_smiles)


def test_mmff_atom_order_mismatch_is_a_data_error():
    conf = embedded("CCO")
    conf.smiles, conf.id = "OCC", 12
    with pytest.raises(data.DataError, match="row 12"):
        oracles.MMFFSurrogate(conf)


def test_isolated_atom_energies_are_the_nabladft_atomrefs():
    """Free atoms, unrestricted, Hund's multiplicity: STO-3G's hydrogen atom is the textbook
    -0.46658 Hartree, and at wB97X-D/def2-SVP H and O give nablaDFT's atomrefs."""
    import painn
    with oracle_pool.LocalOraclePool(method="hf/sto-3g", n_workers=1) as pool:
        refs = oracles.isolated_atom_energies(pool, [1, 1, 8])
    assert refs[1] == pytest.approx(-0.466581849, abs=1e-7) and refs[8] < -73
    with oracle_pool.LocalOraclePool(method="wb97x-d/def2-svp", n_workers=1) as pool:
        refs = oracles.isolated_atom_energies(pool, [1, 8])
    for z in (1, 8):
        assert refs[z] == pytest.approx(painn.NABLADFT_ATOMREFS[z], abs=1e-5)


# ---------------------------------------------------------------------------------------
# GFN2-xTB in tblite: the same pool, another engine
# ---------------------------------------------------------------------------------------

XTB = "gfn2-xtb"
XTB_MAX_FORCE = oracles.XTB_MAX_FORCE / BOHR_TO_ANGSTROM      # Hartree/Angstrom


def tblite_direct(conf, uhf=0, method="GFN2-xTB"):
    """Energy (Hartree) and gradient (Hartree/Bohr) from tblite called here, as its docs do."""
    from tblite.interface import Calculator
    calc = Calculator(method, conf.numbers, conf.positions / BOHR_TO_ANGSTROM, 0.0, uhf)
    calc.set("verbosity", 0)
    calc.set("accuracy", oracles.XTB_ACCURACY)
    result = calc.singlepoint()
    return result.get("energy"), result.get("gradient")


@pytest.fixture(scope="module")
def xtb_pool():
    with oracle_pool.LocalOraclePool(XTB, n_workers=2, timeout=60, retries=1) as pool:
        yield pool


def test_xtb_energy_and_forces_are_tblites_in_hartree_per_angstrom(xtb_pool):
    from ase import Atoms
    from ase.units import Hartree
    from tblite.ase import TBLite
    ethanol = embedded("CCO")
    r = xtb_pool.submit(ethanol, 3).result()
    assert r.ok and r.conf_id == 3 and r.attempts == 1 and r.forces.shape == (9, 3)
    energy, gradient = tblite_direct(ethanol)
    # the same calculation (up to the order of OpenMP sums: the worker runs 1 thread)
    assert r.energy == pytest.approx(energy, abs=1e-10)
    np.testing.assert_allclose(r.forces, -gradient / BOHR_TO_ANGSTROM, rtol=0, atol=1e-12)
    # tblite's own ASE calculator, eV and eV/A: its unit conversions, not ours
    atoms = Atoms(numbers=ethanol.numbers, positions=ethanol.positions)
    atoms.calc = TBLite(method="GFN2-xTB", accuracy=oracles.XTB_ACCURACY, verbosity=0)
    assert r.energy == pytest.approx(atoms.get_potential_energy() / Hartree, abs=1e-8)
    np.testing.assert_allclose(r.forces, atoms.get_forces() / Hartree, atol=1e-7)
    assert -11.5 < r.energy < -11.3                         # GFN2-xTB ethanol: ~ -11.39
    np.testing.assert_allclose(r.forces.sum(axis=0), 0.0, atol=1e-7)   # no net force


def test_xtb_forces_are_minus_the_energy_gradient(xtb_pool):
    """F . d = -dE/dh along random directions d: central differences, h = 1e-3 A."""
    conf = embedded("CC(=O)N")
    rng = np.random.default_rng(0)
    directions = [d / np.linalg.norm(d) for d in rng.normal(size=(3, conf.n_atoms, 3))]
    h = 1e-3
    center = xtb_pool.submit(conf, 0)
    shifted = [[xtb_pool.submit(Conformation(conf.numbers, conf.positions + s * h * d,
                                             smiles=conf.smiles), 1) for s in (1, -1)]
               for d in directions]
    forces = center.result().forces
    for d, (plus, minus) in zip(directions, shifted):
        slope = (plus.result().energy - minus.result().energy) / (2 * h)   # Hartree/A
        assert abs(np.sum(forces * d)) > 1e-3                              # not trivially 0
        assert np.sum(forces * d) == pytest.approx(-slope, abs=2e-6)


def test_xtb_impossible_inputs_come_back_as_failure_records(xtb_pool):
    doublet_water = xtb_pool.submit(CRAWFORD_WATER, 1, multiplicity=2).result()
    oganesson = xtb_pool.submit(Conformation(np.array([118]), np.zeros((1, 3))), 2).result()
    for r in (doublet_water, oganesson):
        assert not r.ok and r.energy is None and r.attempts == 2
        assert "TBLiteRuntimeError" in r.reason
    assert "not compatible" in doublet_water.reason and "Z >86" in oganesson.reason
    with oracle_pool.LocalOraclePool(XTB, n_workers=1, retries=0,
                                 psi4_options={"max-iter": 2}) as pool:   # SCC out of cycles
        r = pool.submit(embedded("CCO"), 0).result()
    assert not r.ok and "SCF not converged in 2" in r.reason
    with pytest.raises(oracles.OracleError, match="not a tblite method; use gfn2-xtb or gfn1-xtb"):
        oracle_pool.LocalOraclePool("gfn0-xtb", n_workers=1)


def test_xtb_timeout_is_a_failure_record_and_is_retried():
    alkane = embedded("C" * 60)                       # 182 atoms: ~1 s per gradient
    with oracle_pool.LocalOraclePool(XTB, n_workers=1, timeout=0.2, retries=1) as pool:
        (pid,) = pool.worker_pids
        slow, water = pool.submit(alkane, 0), pool.submit(CRAWFORD_WATER, 1)
        r = slow.result()
        assert not r.ok and r.reason.startswith("timeout") and r.attempts == 2
        assert 0.39 < r.seconds < 5 and reaped(pid)
        assert water.result().ok
        assert water.result().energy == pytest.approx(tblite_direct(CRAWFORD_WATER)[0], abs=1e-10)


def test_xtb_optimization_records_every_step_down_to_the_criterion(xtb_pool):
    ethanol = embedded("CCO")
    r = xtb_pool.submit(ethanol, 5, kind="optimize").result()
    assert r.ok and r.converged and r.kind == "optimize" and r.reason == ""
    n = r.n_steps
    assert 5 <= n <= 200
    assert r.trajectory_positions.shape == (n, 9, 3) and r.trajectory_forces.shape == (n, 9, 3)
    np.testing.assert_array_equal(r.trajectory_positions[0], ethanol.positions)   # step 0
    assert r.energy == pytest.approx(tblite_direct(ethanol)[0], abs=1e-10)   # a fresh SCC
    # every step is a new geometry, and its label is that geometry's (no off-by-one): each
    # SCC starts from the previous step's density, so equal up to the SCC tolerance
    assert np.all(np.abs(np.diff(r.trajectory_positions, axis=0)).max(axis=(1, 2)) > 0)
    for t in (1, n // 2, n - 1):
        conf = Conformation(ethanol.numbers, r.trajectory_positions[t], smiles="CCO")
        energy, gradient = tblite_direct(conf)
        assert r.trajectory_energy[t] == pytest.approx(energy, abs=1e-9)
        np.testing.assert_allclose(r.trajectory_forces[t], -gradient / BOHR_TO_ANGSTROM,
                                   atol=1e-6)
    # down overall (BFGS without line search may go up on a step), to the criterion
    assert r.optimal_energy < r.energy - 1e-3
    assert r.optimal_energy < r.trajectory_energy.min() + 1e-6
    forces = np.linalg.norm(r.trajectory_forces, axis=2).max(axis=1)    # [n] largest atom
    assert forces[-1] < XTB_MAX_FORCE and np.all(forces[:-1] >= XTB_MAX_FORCE)
    co = np.linalg.norm(r.optimal_positions[1] - r.optimal_positions[2])    # C-O bond
    assert co == pytest.approx(1.42, abs=0.03)


def test_xtb_optimization_out_of_steps_keeps_them():
    ethanol = embedded("CCO")
    with oracle_pool.LocalOraclePool(XTB, n_workers=1, max_opt_steps=3) as pool:
        r = pool.submit(ethanol, 4, kind="optimize").result()
    assert r.ok and not r.converged and r.n_steps == 3
    assert "not converged in 3 steps" in r.reason and "Hartree/Bohr" in r.reason
    assert r.optimal_energy == r.trajectory_energy[-1] < r.energy


def test_xtb_free_atoms_have_hunds_spin():
    """isolated_atom_energies: each free atom with its unpaired electrons (uhf) as tblite
    computes it; GFN2-xTB's hydrogen atom is -0.393482764 Hartree."""
    unpaired = {1: 1, 6: 2, 7: 3, 8: 2, 9: 1, 16: 2, 17: 1, 35: 1}
    with oracle_pool.LocalOraclePool(XTB, n_workers=1) as pool:
        refs = oracles.isolated_atom_energies(pool, [35, 1, 6, 7, 8, 9, 16, 17, 1])
    assert sorted(refs) == sorted(unpaired)
    for z, uhf in unpaired.items():
        atom = Conformation(np.array([z]), np.zeros((1, 3)))
        assert refs[z] == pytest.approx(tblite_direct(atom, uhf)[0], abs=1e-10)
    oxygen = Conformation(np.array([8]), np.zeros((1, 3)))
    assert abs(refs[8] - tblite_direct(oxygen, 0)[0]) > 1e-4    # the spin reached tblite
    assert refs[1] == pytest.approx(-0.393482764, abs=1e-8)


def test_gfn1_xtb_is_tblites_gfn1():
    ethanol = embedded("CCO")
    with oracle_pool.LocalOraclePool("GFN1-xTB", n_workers=1) as pool:
        r = pool.submit(ethanol, 0).result()
    assert r.ok and r.energy == pytest.approx(tblite_direct(ethanol, method="GFN1-xTB")[0],
                                              abs=1e-10)


def test_xtb_dask_pool_gives_the_local_results(xtb_pool):
    from dask.distributed import LocalCluster
    ethanol = embedded("CCO")
    local = [xtb_pool.submit(ethanol, 0).result(),
             xtb_pool.submit(ethanol, 1, kind="optimize").result()]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, \
            oracle_pool.DaskOraclePool(cluster.scheduler_address, XTB, timeout=60) as dask_pool:
        remote = [f.result(timeout=60) for f in (dask_pool.submit(ethanol, 0),
                                                 dask_pool.submit(ethanol, 1, kind="optimize"))]
    for a, b in zip(local, remote):
        assert b.ok and b.conf_id == a.conf_id and b.energy == a.energy
        np.testing.assert_array_equal(b.forces, a.forces)
    assert remote[1].converged and remote[1].n_steps == local[1].n_steps
    np.testing.assert_array_equal(remote[1].trajectory_energy, local[1].trajectory_energy)


@pytest.mark.soak
def test_a_dask_worker_killed_mid_job_costs_that_job_only():
    """kill -9 of a whole Dask worker process while it runs a job: Dask gives the task to
    a live worker and the job ends as it would have (the same xTB result, bit for bit);
    the jobs on the other worker go on. (An engine killed inside a worker is
    test_an_engine_killed_mid_task_...: a failure record, retried by the pool.)"""
    from dask.distributed import LocalCluster
    drug_like = embedded("O=C(NCC1CCCOC1)c1ccc(Cl)cc1O")         # 34 atoms
    with oracle_pool.LocalOraclePool(XTB, n_workers=1) as local:
        expected = local.submit(drug_like, 0, kind="optimize").result()
    assert expected.ok and expected.n_steps > 20                   # seconds of xTB steps
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, \
            oracle_pool.DaskOraclePool(cluster.scheduler_address, XTB, timeout=60) as pool:
        pids = pool.client.run(os.getpid)                          # address -> pid
        slow = pool.submit(drug_like, 0, kind="optimize")
        end, victim = time.monotonic() + 60, None
        while victim is None and time.monotonic() < end:
            busy = [a for a, keys in pool.client.processing().items() if keys]
            victim = busy[0] if busy else None
            time.sleep(0.05)
        time.sleep(1.0)                                            # mid-job
        others = [pool.submit(CRAWFORD_WATER, i) for i in range(1, 5)]
        os.kill(pids[victim], signal.SIGKILL)
        result = slow.result(timeout=120)
        assert result.ok and result.n_steps == expected.n_steps
        np.testing.assert_array_equal(result.trajectory_positions[-1],
                                      expected.trajectory_positions[-1])
        assert result.energy == expected.energy
        assert all(f.result(timeout=120).ok for f in others)
