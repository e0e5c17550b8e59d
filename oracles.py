"""The oracles of GOLF: the genuine one (DFT in Psi4, or GFN2-xTB in tblite) and the
surrogate one (MMFF94 in RDKit).

GOLF (Tsypin et al., ICLR 2024) improves an NNP with conformations labelled by the *genuine
oracle*, the DFT method of the training data: wB97X-D/def2-SVP in Psi4, as nablaDFT. One
call costs CPU-minutes (the paper spent ~80 CPU-years), so nothing it computes may be lost
and one bad job (a segfault, an SCF that does not converge, a job that never ends) must
never stop a run. GFN2-xTB (semiempirical tight binding, Bannwarth et al. 2019) in
tblite is a genuine oracle too, hundreds of times cheaper than HF/STO-3G
(benchmarks/oracle_cost.py), with geometries close to DFT's: method names starting with
"gfn" run in tblite, every other method in Psi4, through the same pool. The *surrogate
oracle*, MMFF94 at tens of microseconds per energy, is the cheap one.

Genuine oracle
--------------
    pool = LocalOraclePool(method, n_workers, threads, memory, timeout, retries, max_opt_steps)
    pool = DaskOraclePool(scheduler, method, ...)    same jobs on a Dask cluster
    pool = make_oracle_pool(args)                    either, from the flags of add_oracle_args

    future = pool.submit(conf, conf_id)                    energy and forces of conf
    future = pool.submit(conf, conf_id, kind="optimize")   geometry optimization from conf
    future.done(); result = future.result()                an OracleResult
    pool.close()                                           (or `with pool:`)

A failure (worker death, timeout, SCF non-convergence, element without basis functions, ...)
is an OracleResult with ok=False and a reason, never an exception. Each job runs in a
persistent worker process that imported Psi4 (or tblite) once; a watchdog thread in the
parent kills a worker whose job runs past `timeout` and starts a new one. A failed job is
retried `retries` times. With Dask, each task runs its job the same way, in a child
process of the Dask worker, so a segfault never takes the Dask worker down.

Psi4 in this process (what the workers call): psi4_gradient, psi4_optimize (optking).
xTB in this process: xtb_gradient, xtb_optimize (ASE's BFGS in Cartesian coordinates,
stopping at Psi4's default max force, 3e-4 Hartree/Bohr).

Surrogate oracle
----------------
    MMFFSurrogate(conf).energy(positions [n_atoms, 3]) -> kcal/mol, force field built once
    mmff_minimize_checked(conf, max_iters=MMFF_MAX_ITERS) -> positions [n_atoms, 3], converged
    mmff_minimize(conf, max_iters=MMFF_MAX_ITERS) -> positions [n_atoms, 3]

Units: positions Angstrom, energies Hartree, forces Hartree/Angstrom. Psi4 and tblite work
in Bohr: their gradients (Hartree/Bohr) are converted with data.BOHR_TO_ANGSTROM. MMFF:
kcal/mol.
"""
import collections
import math
import multiprocessing.connection
import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem, rdDetermineBonds

import data   # imports no torch: the Psi4 workers run this file and start fast

DEFAULT_METHOD = "wb97x-d/def2-svp"   # the paper's level of theory, and nablaDFT's
KINDS = ("gradient", "optimize")
XTB_METHODS = {"gfn2-xtb": "GFN2-xTB", "gfn1-xtb": "GFN1-xTB"}   # --oracle_method -> tblite
# SCC convergence of tblite (1 is its default; smaller is tighter). xtb pairs 0.2 and 0.05
# with gradient thresholds around Psi4's 3e-4 Hartree/Bohr ("tight", "vtight"). Measured
# on 34 atoms: 0.1 keeps the gradient within 2e-8 Hartree/Bohr of its converged value
# (1: 3e-6), for ~15% more time than 1.
XTB_ACCURACY = 0.1
# Optimizations stop when every atom's force is below Psi4's default (QCHEM) max force,
# 3e-4 Hartree/Bohr = 3e-4 * 27.2114 eV / 0.529177 A = 0.0154 eV/A. ASE compares each
# atom's force norm, Psi4 the largest internal-coordinate force: ours is the tighter test.
XTB_MAX_FORCE = 3e-4            # Hartree/Bohr
# Most gradients of an optimization (--max_opt_steps): optking works in internal
# coordinates (its own limit is 50 steps), ASE's BFGS in Cartesian ones, and took 95-320
# steps on molecules of 30-40 atoms from ETKDG (notes/xtb.md).
DEFAULT_MAX_OPT_STEPS = {"psi4": 100, "xtb": 500}


class OracleError(RuntimeError):
    """The oracle cannot run at all (Psi4 missing, Dask unreachable, a bad flag): one line."""


def is_xtb(method):
    """A GFN-xTB method runs in tblite; every other method in Psi4."""
    return method.strip().lower().startswith("gfn")


def default_max_opt_steps(method):
    return DEFAULT_MAX_OPT_STEPS["xtb" if is_xtb(method) else "psi4"]


# Failure reasons that repeat on every attempt: the method, the basis, the element or the
# charge, not the geometry or the machine (Psi4's BasisSetNotFound, an unknown method "... are
# not available", an impossible chg/mult; an xtb engine's unsupported element; RDKit's
# missing MMFF types). Such a job is never retried. Not Psi4's ValidationError as such: it
# also says "atoms are too close", a geometry the NNP made, which evaluation must record.
PERMANENT_FAILURES = re.compile(
    r"BasisSetNotFound|basis set for atom|no basis|are not available|chg/mult|"
    r"unsupported element|not supported|not parametri[sz]ed|unknown method|not recognized|"
    r"no atom types", re.IGNORECASE)


def is_permanent(reason):
    """Will this failure repeat? (wrong method/basis, element without parameters)"""
    return bool(PERMANENT_FAILURES.search(reason or ""))


# ---------------------------------------------------------------------------------------
# Psi4 in this process
# ---------------------------------------------------------------------------------------

def charge_and_multiplicity(numbers, smiles=None):
    """Total charge from the SMILES formal charges (0 without a SMILES) and the lowest spin
    multiplicity: singlet for an even number of electrons, doublet for an odd one."""
    charge = 0
    if smiles:
        RDLogger.DisableLog("rdApp.*")
        mol = Chem.MolFromSmiles(smiles)
        RDLogger.EnableLog("rdApp.*")
        if mol is not None:
            charge = Chem.GetFormalCharge(mol)
    n_electrons = int(np.sum(numbers)) - charge
    return charge, 1 if n_electrons % 2 == 0 else 2


def psi4_molecule(psi4, numbers, positions, charge, multiplicity):
    """A Psi4 molecule exactly at `positions` (Angstrom): nocom, noreorient, symmetry c1."""
    return psi4.core.Molecule.from_arrays(
        geom=np.asarray(positions, dtype=np.float64), elez=[int(z) for z in numbers],
        units="Angstrom", fix_com=True, fix_orientation=True, fix_symmetry="c1",
        molecular_charge=charge, molecular_multiplicity=multiplicity)


def psi4_gradient(psi4, method, numbers, positions, charge, multiplicity):
    """Energy (Hartree) and gradient dE/dX [n_atoms, 3] (Hartree/Bohr) of one conformation."""
    molecule = psi4_molecule(psi4, numbers, positions, charge, multiplicity)
    if len(numbers) == 1:   # a free atom has no gradient (and psi4.gradient crashes on one)
        return float(psi4.energy(method, molecule=molecule)), np.zeros((1, 3))
    gradient, wfn = psi4.gradient(method, molecule=molecule, return_wfn=True)
    return float(wfn.energy()), np.array(gradient)


def psi4_optimize(psi4, method, numbers, positions, charge, multiplicity, max_steps, on_step):
    """Psi4's geometry optimizer (optking, default settings) from `positions`.

    Calls on_step(energy Hartree, gradient [n_atoms, 3] Hartree/Bohr, positions [n_atoms, 3]
    Angstrom) for every gradient it evaluates, the starting conformation first. Returns
    (converged, message): max_steps running out is converged=False, not an error.
    psi4.optimize(return_history=True) would lose the steps of an optimization that does
    not converge, so the gradient of every step goes through our function instead."""
    molecule = psi4_molecule(psi4, numbers, positions, charge, multiplicity)

    def gradient_of_one_step(gradient, label, ptype, **kwargs):  # psi4.optimize calls this
        g, wfn = gradient(method, **kwargs)
        geometry = np.array(kwargs["molecule"].geometry()) * psi4.constants.bohr2angstroms
        on_step(float(wfn.energy()), np.array(g), geometry)   # Bohr -> Angstrom as Psi4 read it
        return g, wfn

    psi4.set_options({"geom_maxiter": max_steps})
    try:
        psi4.optimize(gradient_of_one_step, molecule=molecule, dertype=1)
        return True, ""
    except psi4.OptimizationConvergenceError as err:
        return False, one_line(err)


# ---------------------------------------------------------------------------------------
# GFN-xTB (tblite) in this process
# ---------------------------------------------------------------------------------------

def xtb_calculator(method, numbers, positions, charge, multiplicity, options):
    """A tblite calculator of one molecule at `positions` (Angstrom, given to tblite in
    Bohr), with multiplicity - 1 unpaired electrons. options: tblite Calculator.set
    settings (e.g. {"max-iter": 5}) over ours."""
    from tblite.interface import Calculator as TBLiteCalculator
    xtb = TBLiteCalculator(XTB_METHODS[method.strip().lower()], np.asarray(numbers),
                           np.asarray(positions, dtype=np.float64) / data.BOHR_TO_ANGSTROM,
                           charge=float(charge), uhf=int(multiplicity) - 1)
    xtb.set("verbosity", 0)
    xtb.set("accuracy", XTB_ACCURACY)
    for key, value in options.items():
        xtb.set(key, value)
    return xtb


def xtb_gradient(method, numbers, positions, charge, multiplicity, options):
    """Energy (Hartree) and gradient dE/dX [n_atoms, 3] (Hartree/Bohr) of one conformation,
    the SCC started from scratch (a job's result does not depend on the worker's past).
    An SCC that does not converge raises TBLiteRuntimeError."""
    result = xtb_calculator(method, numbers, positions, charge, multiplicity,
                            options).singlepoint()
    return float(result.get("energy")), np.array(result.get("gradient"))


class XTBCalculator(Calculator):
    """ASE calculator over one tblite calculator, for ASE's optimizers (eV, eV/A). Every
    evaluation goes to on_step(energy Hartree, gradient [n_atoms, 3] Hartree/Bohr,
    positions [n_atoms, 3] Angstrom), the positions exactly those tblite was given. Each
    SCC starts from the previous step's density (~1.5 times faster)."""
    implemented_properties = ["energy", "forces"]

    def __init__(self, xtb, on_step):
        super().__init__()
        self.xtb, self.on_step, self.wavefunction = xtb, on_step, None

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)   # self.atoms: a copy of atoms
        positions = self.atoms.get_positions()                  # [n_atoms, 3] Angstrom
        self.xtb.update(positions=positions / data.BOHR_TO_ANGSTROM)
        self.wavefunction = self.xtb.singlepoint(self.wavefunction)
        energy = float(self.wavefunction.get("energy"))                # Hartree
        gradient = np.array(self.wavefunction.get("gradient"))         # Hartree/Bohr
        self.on_step(energy, gradient, positions)
        self.results = {"energy": energy * units.Hartree,
                        "forces": -gradient * units.Hartree / units.Bohr}


def xtb_optimize(method, numbers, positions, charge, multiplicity, options, max_steps,
                 on_step):
    """ASE's BFGS in Cartesian coordinates from `positions`, until every atom's force is
    below XTB_MAX_FORCE, with at most max_steps gradients (the start included), as Psi4's
    geom_maxiter. BFGS (full inverse Hessian; 3N <= ~200 here, so it costs nothing) takes
    one gradient per step and no line search, so every gradient is a step of the
    trajectory; it needed as many or fewer steps than LBFGS and far fewer than FIRE on
    drug-like molecules. Calls on_step for every gradient (see XTBCalculator). Returns
    (converged, message); running out of steps is converged=False, not an error."""
    from ase.optimize import BFGS    # imports scipy (~0.5 s): only workers that optimize
    atoms = Atoms(numbers=np.asarray(numbers),
                  positions=np.asarray(positions, dtype=np.float64))
    atoms.calc = XTBCalculator(
        xtb_calculator(method, numbers, positions, charge, multiplicity, options), on_step)
    optimizer = BFGS(atoms, logfile=None)
    fmax = XTB_MAX_FORCE * units.Hartree / units.Bohr                # eV/A
    if optimizer.run(fmax=fmax, steps=max_steps - 1):
        return True, ""
    largest = np.linalg.norm(atoms.get_forces(), axis=1).max() * units.Bohr / units.Hartree
    return False, (f"BFGS: largest atomic force {largest:.1e} Hartree/Bohr, criterion "
                   f"{XTB_MAX_FORCE:.0e}")


def one_line(err, limit=300):
    """An exception as one short line (Psi4's messages span many lines)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:limit]


# ---------------------------------------------------------------------------------------
# The worker process: imports Psi4 (or tblite) once, then runs jobs it reads from a pipe
# ---------------------------------------------------------------------------------------

def worker_main(job_fd, result_fd):
    """Child side. Reads the settings, then jobs (dicts) until None or the parent is gone;
    sends ('ready', pid), then per job zero or more ('step', energy, gradient, positions)
    and one ('done', payload) or ('failed', reason). An xTB worker never imports Psi4
    (~1 s); its threads are OMP_NUM_THREADS, set by Psi4Process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle
    jobs = multiprocessing.connection.Connection(job_fd, writable=False)
    results = multiprocessing.connection.Connection(result_fd, readable=False)
    settings = jobs.recv()
    scratch = os.path.join(os.getcwd(), "scratch")  # cwd is this worker's own directory
    xtb = is_xtb(settings["method"])
    try:
        if xtb:
            import tblite.interface  # noqa: F401   fail here, not at the first job
            psi4 = None
        else:
            import psi4
            psi4.core.be_quiet()
            psi4.set_memory(settings["memory"])
            psi4.core.set_num_threads(settings["threads"])
    except Exception as err:
        results.send(("error", f"cannot start {'tblite' if xtb else 'Psi4'}: {one_line(err)}"))
        return
    results.send(("ready", os.getpid()))

    def leave(parent_gone):
        # os._exit skips Psi4's exit handlers, which would clean files of the scratch we
        # removed. The parent removes our directory, unless it is gone (killed).
        if parent_gone:
            shutil.rmtree(os.getcwd(), ignore_errors=True)
        os._exit(0)

    while True:
        try:
            job = jobs.recv()
        except EOFError:
            leave(parent_gone=True)
        if job is None:
            leave(parent_gone=False)
        on_step = lambda *step: results.send(("step", *step))   # noqa: E731
        if xtb:
            reply = run_xtb_job(settings, job, on_step)
        else:
            reply = run_psi4_job(psi4, settings, job, scratch, on_step)
        try:
            results.send(reply)
        except OSError:
            leave(parent_gone=True)


def run_psi4_job(psi4, settings, job, scratch, on_step):
    """One job in this worker's Psi4: ('done', payload) or ('failed', reason)."""
    os.makedirs(scratch, exist_ok=True)
    psi4.core.IOManager.shared_object().set_default_path(scratch)
    psi4.core.clean_options()
    psi4.set_options({"reference": "rhf" if job["multiplicity"] == 1 else "uhf",
                      **settings["options"]})
    args = (psi4, settings["method"], job["numbers"], job["positions"], job["charge"],
            job["multiplicity"])
    try:
        if job["kind"] == "gradient":
            energy, gradient = psi4_gradient(*args)
            return ("done", {"energy": energy, "gradient": gradient})
        converged, message = psi4_optimize(*args, settings["max_opt_steps"], on_step)
        return ("done", {"converged": converged, "message": message})
    except Exception as err:     # SCF not converged, no basis for an element, ...
        return ("failed", one_line(err))
    finally:
        psi4.core.clean()
        psi4.core.clean_variables()
        shutil.rmtree(scratch, ignore_errors=True)


def run_xtb_job(settings, job, on_step):
    """One job in tblite: ('done', payload) or ('failed', reason)."""
    args = (settings["method"], job["numbers"], job["positions"], job["charge"],
            job["multiplicity"], settings["options"])
    try:
        if job["kind"] == "gradient":
            energy, gradient = xtb_gradient(*args)
            return ("done", {"energy": energy, "gradient": gradient})
        converged, message = xtb_optimize(*args, settings["max_opt_steps"], on_step)
        return ("done", {"converged": converged, "message": message})
    except Exception as err:     # SCC not converged, a bad spin or element, ...
        return ("failed", one_line(err))


class Psi4Process:
    """Parent side of one worker (Psi4 or tblite): a child Python running this file, in its
    own directory (Psi4's scratch and the files Psi4 leaves in its working directory),
    removed on close."""

    def __init__(self, settings, scratch_root, startup_timeout):
        self.dir = tempfile.mkdtemp(prefix="golf-psi4-", dir=scratch_root)
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        threads = str(settings["threads"])
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   OPENBLAS_NUM_THREADS=threads, PSI_SCRATCH=self.dir)
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--psi4_worker", str(job_r),
                 str(result_w)], pass_fds=(job_r, result_w), cwd=self.dir, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        os.close(job_r)
        os.close(result_w)
        self.jobs = multiprocessing.connection.Connection(job_w, readable=False)
        self.results = multiprocessing.connection.Connection(result_r, writable=False)
        self.jobs.send(settings)
        self.ready = False            # Psi4 imported
        self.job = None               # the _Job it runs
        self.deadline = time.monotonic() + startup_timeout  # when its next message is due

    def death_reason(self):
        """Why the process ended (after the pipe closed): 'worker died with signal N (SIGX)'."""
        code = self.process.wait()
        if code < 0:
            reason = f"worker died with signal {-code} ({signal.Signals(-code).name})"
        else:
            reason = f"worker exited with code {code}"
        try:
            with open(self.stderr_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            if lines:
                reason += f"; its last stderr line: {lines[-1][:200]}"
        except OSError:
            pass
        return reason

    def close(self, kill=False):
        """Stop the process (politely when idle, else kill), reap it, remove its directory."""
        if self.process.poll() is None:
            if not kill and self.job is None:
                try:
                    self.jobs.send(None)
                    self.process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.process.poll() is None:
                self.process.kill()
        self.process.wait()           # no zombies
        self.jobs.close()
        self.results.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Results and jobs
# ---------------------------------------------------------------------------------------

@dataclass
class OracleResult:
    """What the genuine oracle returned for one job. ok=False is a failure record."""
    conf_id: int
    ok: bool
    kind: str = "gradient"
    energy: float | None = None           # Hartree, of the submitted conformation
    forces: np.ndarray | None = None      # [n_atoms, 3] Hartree/Angstrom, = -gradient
    reason: str = ""                      # why it failed, or why an optimization stopped
    seconds: float = 0.0                  # wall time of all attempts
    attempts: int = 0
    # kind "optimize": every step t = 0..T of the optimizer, step 0 the submitted
    # conformation. A failed optimization keeps the steps it finished.
    trajectory_positions: np.ndarray | None = None  # [n_steps, n_atoms, 3] Angstrom
    trajectory_energy: np.ndarray | None = None     # [n_steps] Hartree
    trajectory_forces: np.ndarray | None = None     # [n_steps, n_atoms, 3] Hartree/Angstrom
    converged: bool = False               # the optimizer met its criteria within max steps

    @property
    def n_steps(self):
        return 0 if self.trajectory_energy is None else len(self.trajectory_energy)

    @property
    def optimal_energy(self):
        """Energy of the last step (the optimum when converged), Hartree."""
        return float(self.trajectory_energy[-1]) if self.n_steps else None

    @property
    def optimal_positions(self):
        """[n_atoms, 3] Angstrom, the last step's conformation."""
        return self.trajectory_positions[-1] if self.n_steps else None


def make_job(conf, conf_id, kind="gradient", charge=None, multiplicity=None):
    """The message a worker runs: atoms, positions (Angstrom), charge and multiplicity
    (from the SMILES unless given)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    numbers = np.asarray(conf.numbers, dtype=np.int64)
    default_charge, default_multiplicity = charge_and_multiplicity(numbers, conf.smiles)
    return {"conf_id": conf_id, "kind": kind, "numbers": numbers,
            "positions": np.asarray(conf.positions, dtype=np.float64),
            "charge": default_charge if charge is None else int(charge),
            "multiplicity": default_multiplicity if multiplicity is None else int(multiplicity)}


@dataclass
class _Job:
    message: dict
    future: Future
    attempts: int = 0
    seconds: float = 0.0          # of the finished attempts
    started: float = 0.0          # time.monotonic() of the current attempt
    steps: list = field(default_factory=list)       # (energy, gradient, positions) so far
    best_steps: list = field(default_factory=list)  # longest partial trajectory of a failure

    def result(self, ok, reason="", payload=None):
        """The OracleResult of this job, in our units (Hartree/Bohr -> Hartree/Angstrom)."""
        kind = self.message["kind"]
        out = OracleResult(conf_id=self.message["conf_id"], ok=ok, kind=kind, reason=reason,
                           seconds=self.seconds, attempts=self.attempts)
        if kind == "gradient":
            if ok:
                out.energy = payload["energy"]
                out.forces = -payload["gradient"] / data.BOHR_TO_ANGSTROM
            return out
        steps = self.steps if ok else max(self.steps, self.best_steps, key=len)
        if steps:
            out.trajectory_energy = np.array([s[0] for s in steps])
            out.trajectory_forces = -np.stack([s[1] for s in steps]) / data.BOHR_TO_ANGSTROM
            out.trajectory_positions = np.stack([s[2] for s in steps])
            out.energy, out.forces = float(out.trajectory_energy[0]), out.trajectory_forces[0]
        if ok:
            out.converged = payload["converged"]
            if not out.converged:
                out.reason = f"not converged in {len(steps)} steps ({payload['message']})"
            elif not steps:
                out.ok, out.reason = False, "the optimizer returned no steps"
        return out


def _settle(future, result):
    """Set a future's result unless it was cancelled meanwhile."""
    try:
        future.set_result(result)
    except InvalidStateError:
        pass


# ---------------------------------------------------------------------------------------
# Local back end: persistent worker processes and a watchdog thread
# ---------------------------------------------------------------------------------------

class LocalOraclePool:
    """Psi4 (or xTB) jobs on this machine, `n_workers` at a time, `threads` threads each.

    method: a Psi4 method/basis, or gfn2-xtb / gfn1-xtb (tblite; memory is then unused).
    timeout: seconds one gradient may take (every step of an optimization is one);
    a worker over it is killed and replaced. retries: extra attempts of a failed job.
    max_opt_steps: most gradients of an optimization (Psi4's geom_maxiter); None: 100 for
    Psi4, 500 for xTB. psi4_options: extra psi4.set_options, or for xTB extra tblite
    Calculator.set settings ({"max-iter": 5}).
    scratch: where workers make their directories (default $PSI_SCRATCH, else /tmp)."""

    def __init__(self, method=DEFAULT_METHOD, n_workers=2, threads=1, memory="2 GB",
                 timeout=600.0, retries=1, max_opt_steps=None, psi4_options=None,
                 scratch=None, startup_timeout=120.0):
        if max_opt_steps is None:
            max_opt_steps = default_max_opt_steps(method)
        check_settings(n_workers, threads, timeout, retries, max_opt_steps, method)
        self.settings = {"method": method, "threads": int(threads), "memory": memory,
                         "max_opt_steps": int(max_opt_steps), "options": dict(psi4_options or {})}
        self.scratch = scratch or os.environ.get("PSI_SCRATCH") or tempfile.gettempdir()
        if not os.path.isdir(self.scratch):
            raise OracleError(f"scratch directory {self.scratch} does not exist; create it or "
                              "set PSI_SCRATCH to an existing directory")
        self.timeout, self.retries = float(timeout), int(retries)
        self.startup_timeout = float(startup_timeout)
        self.n_parallel = int(n_workers)
        self._queue = collections.deque()      # _Jobs waiting for a worker
        self._lock = threading.Lock()          # guards _queue and _closed
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._closed = False
        self._broken = None                    # why workers cannot start: every job fails
        self._workers = [self._new_worker() for _ in range(n_workers)]
        try:
            self._wait_until_ready()
        except BaseException:
            for worker in self._workers:
                worker.close(kill=True)
            self._wake_r.close()
            self._wake_w.close()
            raise
        self._thread = threading.Thread(target=self._run, name="oracle-watchdog", daemon=True)
        self._thread.start()

    def _new_worker(self):
        return Psi4Process(self.settings, self.scratch, self.startup_timeout)

    def _wait_until_ready(self):
        """Block until every worker imported Psi4 (or tblite); a worker that cannot is one
        clear error."""
        for worker in self._workers:
            if not worker.results.poll(max(0.0, worker.deadline - time.monotonic())):
                raise OracleError(f"an oracle worker did not start within "
                                  f"{self.startup_timeout:g} s")
            try:
                message = worker.results.recv()
            except EOFError:
                raise OracleError(f"an oracle worker could not start: "
                                  f"{worker.death_reason()}") from None
            if message[0] == "error":
                hint = ("that `python -c 'import tblite.interface'` works (pip install tblite)"
                        if is_xtb(self.settings["method"]) else "--psi4_memory / "
                        "--psi4_threads and that `python -c 'import psi4'` works")
                raise OracleError(f"{message[1]} (check {hint})")
            worker.ready, worker.deadline = True, math.inf

    # -- the public API ------------------------------------------------------------------

    def submit(self, conf, conf_id, kind="gradient", charge=None, multiplicity=None):
        """Queue one job: kind 'gradient' (energy and forces) or 'optimize'. Returns a
        concurrent.futures.Future of an OracleResult."""
        return self.submit_job(make_job(conf, conf_id, kind, charge, multiplicity))

    def submit_job(self, message):
        future = Future()
        with self._lock:
            if self._closed:
                raise OracleError("submit() on a closed oracle pool")
            if self._broken:
                future.set_result(OracleResult(message["conf_id"], False, message["kind"],
                                               reason=self._broken))
                return future
            self._queue.append(_Job(message, future))
            self._wake_w.send(None)
        return future

    @property
    def worker_pids(self):
        """Process ids of the current workers (for monitoring, and tests that kill one)."""
        return [worker.process.pid for worker in self._workers if worker is not None]

    def close(self):
        """Stop the watchdog and the workers. Queued jobs are cancelled; a running job ends
        as a failure record 'pool closed'. Collect the results you need first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake_w.send(None)
        self._thread.join()
        for job in self._queue:
            if not job.future.cancel():          # a job between two attempts
                _settle(job.future, job.result(False, "pool closed before the job finished"))
        self._queue.clear()
        for worker in filter(None, self._workers):
            if worker.job is not None:
                _settle(worker.job.future,
                        worker.job.result(False, "pool closed before the job finished"))
            worker.close(kill=worker.job is not None)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the watchdog thread -------------------------------------------------------------

    def _run(self):
        """Hand queued jobs to idle workers, read their messages, kill those past the timeout."""
        try:
            while self._step():
                pass
        except Exception as err:       # a bug or an OS error here must not hang the futures
            self._break(f"oracle pool watchdog failed: {one_line(err)}")
            for worker in self._workers:
                if worker is not None and worker.job is not None:
                    _settle(worker.job.future, worker.job.result(False, self._broken))
                    worker.job = None

    def _step(self):
        with self._lock:
            if self._closed:
                return False
            self._start_queued_jobs()
        # sleep until a worker sends something, a job is submitted, or the next deadline
        deadline = min((w.deadline for w in self._workers), default=math.inf)
        timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(
            [w.results for w in self._workers] + [self._wake_r], timeout)
        while self._wake_r.poll():
            self._wake_r.recv()
        for i, worker in enumerate(self._workers):
            if worker.results in ready:
                self._read(i)
            elif time.monotonic() > worker.deadline and worker.job is not None:
                job = worker.job
                self._replace(i)
                self._attempt_failed(job, f"timeout: no result within {self.timeout:g} s "
                                          "(worker killed)")
            elif time.monotonic() > worker.deadline:      # a replacement that never started
                self._break(f"an oracle worker did not start within "
                            f"{self.startup_timeout:g} s")
                self._replace(i)
        self._workers = [w for w in self._workers if w is not None]   # None: pool broken
        return True

    def _start_queued_jobs(self):
        for worker in self._workers:
            if not worker.ready or worker.job is not None:
                continue
            job = None
            while self._queue and job is None:
                job = self._queue.popleft()
                if job.attempts == 0 and not job.future.set_running_or_notify_cancel():
                    job = None                       # cancelled while queued
            if job is None:
                return
            job.attempts += 1
            job.steps, job.started = [], time.monotonic()
            worker.job, worker.deadline = job, job.started + self.timeout
            try:
                worker.jobs.send(job.message)
            except OSError:
                pass           # the worker just died: _read sees it and fails the attempt

    def _read(self, i):
        worker = self._workers[i]
        try:
            message = worker.results.recv()
        except (EOFError, OSError):                  # the worker process ended
            job, reason = worker.job, worker.death_reason()
            if not worker.ready:                     # a replacement could not start
                self._break(f"an oracle worker could not start: {reason}")
            self._replace(i)
            if job is not None:
                self._attempt_failed(job, reason)
            return
        tag = message[0]
        if tag == "ready":
            worker.ready, worker.deadline = True, math.inf
        elif tag == "error":                         # it exits next; no more replacements
            self._break(message[1])
        elif tag == "step":                          # one finished optimization step
            worker.job.steps.append(message[1:])
            worker.deadline = time.monotonic() + self.timeout
        else:                                        # 'done' or 'failed'
            job, worker.job, worker.deadline = worker.job, None, math.inf
            if tag == "done":
                job.seconds += time.monotonic() - job.started
                _settle(job.future, job.result(True, payload=message[1]))
            else:
                self._attempt_failed(job, message[1])

    def _replace(self, i):
        """Kill worker i (stuck or dead) and start a fresh one in its slot (None once the
        pool is broken: workers cannot start)."""
        self._workers[i].close(kill=True)
        self._workers[i] = None
        if not self._broken:
            try:
                self._workers[i] = self._new_worker()
            except OSError as err:
                self._break(f"cannot start an oracle worker: {one_line(err)}")

    def _attempt_failed(self, job, reason):
        job.seconds += time.monotonic() - job.started
        if len(job.steps) > len(job.best_steps):
            job.best_steps = job.steps
        with self._lock:
            if job.attempts <= self.retries and not self._closed and not self._broken \
                    and not is_permanent(reason):
                self._queue.appendleft(job)          # retry first, before newer jobs
                return
        _settle(job.future, job.result(False, reason))

    def _break(self, reason):
        """Workers cannot start (e.g. Psi4 was uninstalled): fail every queued job, and
        every job submitted from now on."""
        with self._lock:
            self._broken = self._broken or reason
            queued, self._queue = list(self._queue), collections.deque()
        for job in queued:
            _settle(job.future, job.result(False, self._broken))


# ---------------------------------------------------------------------------------------
# Dask back end: the same jobs on a Dask cluster
# ---------------------------------------------------------------------------------------

def run_job_in_child_process(message, pool_kwargs):
    """A Dask task: one job in a one-worker LocalOraclePool (its own Psi4 or tblite process,
    the timeout and the retries), so a segfault or a stuck SCF never kills the Dask worker."""
    with LocalOraclePool(n_workers=1, **pool_kwargs) as pool:
        return pool.submit_job(message).result()


class DaskOraclePool:
    """Psi4 (or xTB) jobs on a Dask cluster: `dask scheduler` on one machine, and on every
    machine with this repo and Psi4 (or tblite), from the repo directory, `PYTHONPATH=.
    dask worker tcp://HOST:8786 --nthreads N` (N jobs at a time, each with `threads`
    threads). Each task starts a worker process (~0.6 s, Psi4 or tblite), negligible next
    to a DFT job but ~10-50 xTB gradients: send xTB single points to the local pool, and
    to Dask only optimizations or more cores than this machine has. Same
    arguments and API as LocalOraclePool; scratch is each Dask worker's $PSI_SCRATCH or /tmp."""

    def __init__(self, scheduler, method=DEFAULT_METHOD, threads=1, memory="2 GB",
                 timeout=600.0, retries=1, max_opt_steps=None, psi4_options=None,
                 connect_timeout=20.0):
        from dask.distributed import Client
        if max_opt_steps is None:
            max_opt_steps = default_max_opt_steps(method)
        check_settings(1, threads, timeout, retries, max_opt_steps, method)
        try:
            self.client = Client(scheduler, timeout=f"{connect_timeout}s")
        except (OSError, TimeoutError, ValueError) as err:
            raise OracleError(f"cannot reach the Dask scheduler at {scheduler} ({err}); start "
                              "it with `dask scheduler`, or drop --dask_scheduler") from None
        self.pool_kwargs = dict(method=method, threads=threads, memory=memory,
                                timeout=timeout, retries=retries,
                                max_opt_steps=max_opt_steps, psi4_options=psi4_options)
        self._tasks = {}              # key -> dask future: kept, or Dask forgets the task
        self._lock = threading.Lock()

    @property
    def n_parallel(self):
        """Jobs the cluster runs at once now: the threads of all Dask workers."""
        return max(1, sum(self.client.nthreads().values()))

    def submit(self, conf, conf_id, kind="gradient", charge=None, multiplicity=None):
        return self.submit_job(make_job(conf, conf_id, kind, charge, multiplicity))

    def submit_job(self, message):
        future = Future()
        future.set_running_or_notify_cancel()
        task = self.client.submit(run_job_in_child_process, message, self.pool_kwargs,
                                  pure=False)
        with self._lock:
            self._tasks[task.key] = task

        def copy_result(task):        # runs in a Dask thread when the task ends
            try:
                result = task.result()
            except BaseException as err:   # cancelled, KilledWorker, an import error
                result = OracleResult(message["conf_id"], False, message["kind"],
                                      reason=f"Dask task failed: {one_line(err)}")
            with self._lock:
                self._tasks.pop(task.key, None)
            _settle(future, result)

        task.add_done_callback(copy_result)
        return future

    def close(self):
        with self._lock:
            tasks = list(self._tasks.values())
        if tasks:
            self.client.cancel(tasks)
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------
# Command-line flags shared by the stage scripts
# ---------------------------------------------------------------------------------------

def check_settings(n_workers, threads, timeout, retries, max_opt_steps, method):
    if is_xtb(method) and method.strip().lower() not in XTB_METHODS:
        raise OracleError(f"--oracle_method {method} is not a tblite method; use "
                          f"{' or '.join(XTB_METHODS)}")
    for name, value, low in (("--n_workers", n_workers, 1), ("--psi4_threads", threads, 1),
                             ("--oracle_retries", retries, 0),
                             ("--max_opt_steps", max_opt_steps, 1)):
        if int(value) < low:
            raise OracleError(f"{name} must be at least {low}, not {value}")
    if not timeout > 0:
        raise OracleError(f"--oracle_timeout must be positive, not {timeout}")


def add_oracle_args(parser):
    """The genuine oracle's flags (Psi4 or xTB, and the pool)."""
    group = parser.add_argument_group("genuine oracle (Psi4, or GFN2-xTB in tblite)")
    group.add_argument("--oracle_method", default=DEFAULT_METHOD,
                       help="Psi4 method/basis (default: %(default)s, the paper's level), "
                            "or gfn2-xtb (GFN2-xTB in tblite, tens of ms per gradient of "
                            "a drug-like molecule; also gfn1-xtb)")
    group.add_argument("--psi4_threads", type=int, default=1,
                       help="threads per Psi4 or xTB job (OMP_NUM_THREADS)")
    group.add_argument("--psi4_memory", default="2 GB",
                       help="memory per Psi4 job (xTB ignores it)")
    group.add_argument("--oracle_timeout", type=float, default=600.0,
                       help="seconds one gradient may take; an optimization's every "
                            "step is one (default: %(default)s, as the official code)")
    group.add_argument("--oracle_retries", type=int, default=1,
                       help="extra attempts of a failed job (default: %(default)s)")
    group.add_argument("--n_workers", type=int, default=2,
                       help="oracle jobs at once on this machine (default: %(default)s; use "
                            "about cores / --psi4_threads)")
    group.add_argument("--dask_scheduler", default=None,
                       help="tcp://HOST:PORT of a Dask scheduler: run the jobs on its "
                            "workers instead of --n_workers local processes")
    group.add_argument("--max_opt_steps", type=int, default=None,
                       help="most steps (gradients) of an optimization (default: 100 for "
                            "Psi4, as geom_maxiter, whose own 50 is short for drug-like "
                            "molecules from ETKDG; 500 for xTB, whose Cartesian BFGS took "
                            "95-320 on 30-40 atoms)")
    return parser


def torch_threads_beside_the_pool(args, pool_idle=False):
    """Cores this machine has left for the NNP next to the local oracle workers (at least 1):
    an oversubscribed torch thread pool runs many times slower, measured here. Every core
    when the workers run elsewhere (Dask) or no job can run beside the NNP (pool_idle)."""
    if args.dask_scheduler or pool_idle:
        return os.cpu_count() or 1
    return max(1, (os.cpu_count() or 1) - args.n_workers * args.psi4_threads)


def check_dask_scheduler(address, timeout=5.0):
    """Fail fast, before any output exists: can a TCP connection reach the scheduler?"""
    scheme, _, host_port = address.rpartition("://")
    if scheme not in ("", "tcp", "tls"):
        return                                   # inproc://, ucx://: Dask's own check
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout).close()
    except (OSError, ValueError) as err:
        raise OracleError(f"cannot reach the Dask scheduler at {address} ({err}); start it "
                          "with `dask scheduler`, or drop --dask_scheduler") from None


def make_oracle_pool(args):
    """A DaskOraclePool with --dask_scheduler, else a LocalOraclePool."""
    common = dict(method=args.oracle_method, threads=args.psi4_threads,
                  memory=args.psi4_memory, timeout=args.oracle_timeout,
                  retries=args.oracle_retries, max_opt_steps=args.max_opt_steps)
    if args.dask_scheduler:
        check_dask_scheduler(args.dask_scheduler)
        return DaskOraclePool(args.dask_scheduler, **common)
    return LocalOraclePool(n_workers=args.n_workers, **common)


# ---------------------------------------------------------------------------------------
# Reference energies of isolated atoms (the `atomrefs` of a dataset)
# ---------------------------------------------------------------------------------------

# Ground-state spin multiplicities of the free atoms (Hund's rules)
ATOM_MULTIPLICITY = {1: 2, 3: 2, 5: 2, 6: 3, 7: 4, 8: 3, 9: 2, 11: 2, 13: 2, 14: 3, 15: 4,
                     16: 3, 17: 2, 35: 2, 53: 2}


def isolated_atom_energies(pool, elements):
    """{z: energy of the free atom} (Hartree) at the pool's level of theory, unrestricted
    for open shells: what nablaDFT's atomrefs are (Psi4 reproduces its wB97X-D/def2-SVP
    values to 0.001 kcal/mol). Raises OracleError naming an atom that fails."""
    futures = {}
    for z in sorted(set(int(z) for z in elements)):
        atom = data.Conformation(numbers=np.array([z]), positions=np.zeros((1, 3)))
        futures[z] = pool.submit(atom, -z, charge=0, multiplicity=ATOM_MULTIPLICITY.get(z, 1))
    energies = {}
    for z, future in futures.items():
        result = future.result()
        if not result.ok:
            raise OracleError(f"the isolated atom Z={z} failed: {result.reason}")
        energies[z] = result.energy
    return energies


# ---------------------------------------------------------------------------------------
# Surrogate oracle: MMFF94 in RDKit (kcal/mol)
# ---------------------------------------------------------------------------------------

def rdkit_molecule(conf):
    """RDKit molecule with explicit hydrogens and one conformer at conf.positions.

    From the row's SMILES, whose atoms (hydrogens added at the end, as nablaDFT and
    make_trajectories.py lay them out) must be the conformation's, in the same order.
    Without a SMILES, bonds are perceived from the coordinates (neutral molecule)."""
    where = f"row {conf.id}" if conf.id is not None else "conformation"
    numbers = [int(z) for z in conf.numbers]
    if conf.smiles:
        RDLogger.DisableLog("rdApp.*")
        mol = Chem.MolFromSmiles(conf.smiles)
        RDLogger.EnableLog("rdApp.*")
        if mol is None:
            raise data.DataError(f"{where}: RDKit cannot parse SMILES {conf.smiles!r}")
        mol = Chem.AddHs(mol)
        elements = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
        if elements != numbers:
            raise data.DataError(
                f"{where}: the atoms of SMILES {conf.smiles!r} with hydrogens ({elements}) "
                f"are not the conformation's atoms in the same order ({numbers}); fix the "
                "smiles key, or remove it to perceive bonds from the coordinates")
    else:
        xyz = f"{len(numbers)}\n\n" + "".join(
            f"{Chem.GetPeriodicTable().GetElementSymbol(z)} {x:.8f} {y:.8f} {w:.8f}\n"
            for z, (x, y, w) in zip(numbers, conf.positions))
        mol = Chem.MolFromXYZBlock(xyz)
        try:
            rdDetermineBonds.DetermineBonds(mol, charge=0)
        except Exception as err:
            raise data.DataError(f"{where}: no SMILES, and RDKit cannot perceive bonds from "
                                 f"the coordinates ({one_line(err)}); add a smiles key") from None
        mol = Chem.Mol(mol)
        mol.RemoveAllConformers()
    conformer = Chem.Conformer(len(numbers))
    for i, (x, y, z) in enumerate(np.asarray(conf.positions, dtype=np.float64)):
        conformer.SetAtomPosition(i, (float(x), float(y), float(z)))
    mol.AddConformer(conformer, assignId=True)
    return mol


class MMFFSurrogate:
    """MMFF94 energy of one molecule at any positions; the force field is built once.

    ForceField.CalcEnergy takes a flat position list, so a new conformation costs one call:
    ~25 us for a 36-atom molecule (benchmarks/mmff.py; the paper quotes ~120 us)."""

    def __init__(self, conf):
        self.mol = rdkit_molecule(conf)
        properties = AllChem.MMFFGetMoleculeProperties(self.mol, mmffVariant="MMFF94")
        if properties is None:
            where = f"row {conf.id}" if conf.id is not None else "conformation"
            raise data.DataError(f"{where}: MMFF94 has no atom types for {conf.smiles or 'it'}")
        self.force_field = AllChem.MMFFGetMoleculeForceField(self.mol, properties)

    def energy(self, positions):
        """MMFF94 energy (kcal/mol) at positions [n_atoms, 3] Angstrom."""
        return self.force_field.CalcEnergy(np.asarray(positions, dtype=np.float64).ravel().tolist())


MMFF_MAX_ITERS = 1000   # MMFF minimization iterations for D_rdkit and the RDKit row alike


def mmff_minimize_checked(conf, max_iters=MMFF_MAX_ITERS):
    """MMFF94 minimum near conf.positions: the paper's RDKit baseline and the start of its
    D_rdkit conformations. Returns positions [n_atoms, 3] Angstrom and whether RDKit's
    minimizer converged within max_iters (ForceField.Minimize returns 0)."""
    surrogate = MMFFSurrogate(conf)
    surrogate.force_field.Initialize()
    not_converged = surrogate.force_field.Minimize(maxIts=max_iters)
    return np.array(surrogate.force_field.Positions()).reshape(-1, 3), not_converged == 0


def mmff_minimize(conf, max_iters=MMFF_MAX_ITERS):
    """The positions of mmff_minimize_checked, converged or not."""
    return mmff_minimize_checked(conf, max_iters)[0]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--psi4_worker":
        worker_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("oracles.py is a library; its command line only starts the worker of an "
                 "oracle pool")
