"""Running the genuine oracle without losing work: worker processes, a watchdog, Dask.

One DFT call costs CPU-minutes (the paper spent ~80 CPU-years on them), so nothing the
oracle computes may be lost, and one bad job (a segfault, an SCF that does not converge, a
job that never ends) must never stop a run. oracles.py computes energies, gradients and
optimizations (Psi4 or GFN2-xTB); this module runs them:

    pool = LocalOraclePool(method, n_workers, threads, memory, timeout, retries, max_opt_steps)
    pool = DaskOraclePool(scheduler, method, ...)    the same jobs on a Dask cluster
    pool = make_oracle_pool(args, journal)           either, from oracles.add_oracle_args' flags,
                                                     its results kept in an OracleJournal

    future = pool.submit(conf, conf_id)                    energy and forces of conf
    future = pool.submit(conf, conf_id, kind="optimize")   geometry optimization from conf
    future.done(); result = future.result()                an OracleResult
    pool.n_parallel                                        jobs the pool runs at once
    pool.close()                                           (or `with pool:`)

A failure (worker death, timeout, SCF non-convergence, element without basis functions, ...)
is an OracleResult with ok=False and a reason, never an exception. Each job runs in a
persistent worker process (OracleWorker) that imported Psi4 (or tblite) once; a watchdog
thread in the parent kills a worker whose job runs past `timeout` and starts a new one. A
failed job is retried `retries` times, unless its failure will repeat (is_permanent). With
Dask, each Dask worker keeps such a pool, whose engine processes are its children, so a
segfault never takes the Dask worker down.

The worker protocol (two pipes): the parent sends the settings, then one job (make_job's
dict) at a time, None to stop; the worker answers ('ready', pid) once, then per job zero or
more ('step', energy, gradient, positions) and one ('done', payload) or ('failed', reason).
Units on the pipe are Psi4's and tblite's (Hartree, Hartree/Bohr, Angstrom); OracleResult
holds Hartree and Hartree/Angstrom.

The journal (OracleJournal, JournalledPool) writes every finished result to an SQLite file
before anyone sees it, keyed by what the job asks (elements, positions, charge,
multiplicity, kind, method): a stage killed, preempted or stopped loses no finished label,
and a rerun that asks the same question gets the stored answer instead of a new DFT job.

Neither this module nor oracles.py imports torch: a worker starts in well under a second.
"""
import collections
import hashlib
import json
import math
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, InvalidStateError
import dataclasses
from dataclasses import dataclass, field

import numpy as np

import data
import oracles
from oracles import OracleError

KINDS = ("gradient", "optimize")   # what a job computes: energy and forces, or an optimization


# ---------------------------------------------------------------------------------------
# Failures that repeat
# ---------------------------------------------------------------------------------------

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
    default_charge, default_multiplicity = oracles.charge_and_multiplicity(numbers, conf.smiles)
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
# The worker process: imports Psi4 (or tblite) once, then runs jobs it reads from a pipe
# ---------------------------------------------------------------------------------------

def worker_main(job_fd, result_fd):
    """Child side. Reads the settings, then jobs (dicts) until None or the parent is gone;
    sends ('ready', pid), then per job zero or more ('step', energy, gradient, positions)
    and one ('done', payload) or ('failed', reason). An xTB worker never imports Psi4 (a
    slow import); its threads are OMP_NUM_THREADS, set by OracleWorker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle
    jobs = multiprocessing.connection.Connection(job_fd, writable=False)
    results = multiprocessing.connection.Connection(result_fd, readable=False)
    settings = jobs.recv()
    scratch = os.path.join(os.getcwd(), "scratch")  # cwd is this worker's own directory
    xtb = oracles.is_xtb(settings["method"])
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
        results.send(("error",
                      f"cannot start {'tblite' if xtb else 'Psi4'}: {oracles.one_line(err)}"))
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
            energy, gradient = oracles.psi4_gradient(*args)
            return ("done", {"energy": energy, "gradient": gradient})
        converged, message = oracles.psi4_optimize(*args, settings["max_opt_steps"], on_step,
                                                   settings["opt_coordinates"])
        return ("done", {"converged": converged, "message": message})
    except Exception as err:     # SCF not converged, no basis for an element, ...
        return ("failed", oracles.one_line(err))
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
            energy, gradient = oracles.xtb_gradient(*args)
            return ("done", {"energy": energy, "gradient": gradient})
        converged, message = oracles.xtb_optimize(*args, settings["max_opt_steps"], on_step)
        return ("done", {"converged": converged, "message": message})
    except Exception as err:     # SCC not converged, a bad spin or element, ...
        return ("failed", oracles.one_line(err))


class OracleWorker:
    """Parent side of one worker (Psi4 or tblite): a child Python running this file, in its
    own directory (Psi4's scratch and the files Psi4 leaves in its working directory),
    removed on close."""

    def __init__(self, settings, scratch_root, startup_timeout):
        self.dir = tempfile.mkdtemp(prefix="golf-oracle-", dir=scratch_root)
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        threads = str(settings["threads"])
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   OPENBLAS_NUM_THREADS=threads, PSI_SCRATCH=self.dir)
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--oracle_worker", str(job_r),
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
# Local back end: persistent worker processes and a watchdog thread
# ---------------------------------------------------------------------------------------

class LocalOraclePool:
    """Psi4 (or xTB) jobs on this machine, `n_workers` at a time, `threads` threads each.

    method: a Psi4 method/basis, or gfn2-xtb / gfn1-xtb (tblite; memory is then unused).
    timeout: seconds one gradient may take (every step of an optimization is one);
    a worker over it is killed and replaced. retries: extra attempts of a failed job.
    max_opt_steps: most gradients of an optimization (Psi4's geom_maxiter); None: 1000 for
    Psi4, 500 for xTB. opt_coordinates: Psi4's optimizer coordinates (optking's
    opt_coordinates; xTB: cartesian only). psi4_options: extra psi4.set_options, or for xTB
    extra tblite Calculator.set settings ({"max-iter": 5}).
    scratch: where workers make their directories (default $PSI_SCRATCH, else /tmp)."""

    def __init__(self, method=oracles.DEFAULT_METHOD, n_workers=2, threads=1, memory="2 GB",
                 timeout=600.0, retries=1, max_opt_steps=None, psi4_options=None,
                 scratch=None, startup_timeout=120.0,
                 opt_coordinates=oracles.DEFAULT_OPT_COORDINATES):
        if max_opt_steps is None:
            max_opt_steps = oracles.default_max_opt_steps(method)
        check_settings(n_workers, threads, timeout, retries, max_opt_steps, method,
                       opt_coordinates)
        self.settings = {"method": method, "threads": int(threads), "memory": memory,
                         "max_opt_steps": int(max_opt_steps), "options": dict(psi4_options or {}),
                         "opt_coordinates": opt_coordinates}
        self.scratch = scratch or os.environ.get("PSI_SCRATCH") or tempfile.gettempdir()
        if not os.path.isdir(self.scratch):
            raise OracleError(f"scratch directory {self.scratch} does not exist; create it or "
                              "set PSI_SCRATCH to an existing directory")
        self.timeout, self.retries = float(timeout), int(retries)
        self.startup_timeout = float(startup_timeout)
        self.n_workers = int(n_workers)
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
        return OracleWorker(self.settings, self.scratch, self.startup_timeout)

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
                        if oracles.is_xtb(self.settings["method"]) else "--psi4_memory / "
                        "--oracle_threads and that `python -c 'import psi4'` works")
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
    def result_settings(self):
        """The settings that decide a result (the journal's key)."""
        return result_settings(self.settings["method"], self.settings["options"],
                               self.settings["max_opt_steps"], self.settings["opt_coordinates"])

    @property
    def n_parallel(self):
        """Jobs the pool runs at once: its n_workers."""
        return self.n_workers

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
            self._break(f"oracle pool watchdog failed: {oracles.one_line(err)}")
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
                self._break(f"cannot start an oracle worker: {oracles.one_line(err)}")

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
        every job submitted after this."""
        with self._lock:
            self._broken = self._broken or reason
            queued, self._queue = list(self._queue), collections.deque()
        for job in queued:
            _settle(job.future, job.result(False, self._broken))


# ---------------------------------------------------------------------------------------
# Dask back end: the same jobs on a Dask cluster
# ---------------------------------------------------------------------------------------

ENGINES_PLUGIN = "golf-oracle-engines"    # the Dask worker plugin's name


def engines_plugin():
    """The Dask worker plugin that keeps each Dask worker's engine processes: per pool
    setting (method, threads, memory, timeout, retries, max_opt_steps, psi4_options), a
    LocalOraclePool with one engine per Dask thread, started by the first task that needs
    it and reused by the next ones (an engine's start costs many xTB gradients:
    benchmarks/oracle_pool.py --dask, an engine per task against engines kept, in
    benchmarks/README.md). The engines are children of the Dask worker, so a segfault or
    a stuck SCF costs one engine, which the pool replaces, never the Dask worker. Closed
    with the worker. Defined in a function: an engine process, which runs this file,
    starts without importing distributed (a slow import)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class OracleEngines(WorkerPlugin):
        name = ENGINES_PLUGIN
        idempotent = True         # a second client keeps the pools (and jobs) running

        def __reduce__(self):     # pickled as a call of engines_plugin(): the class is local
            return engines_plugin, ()

        def setup(self, worker):
            self.n_engines = worker.state.nthreads   # one per job Dask runs at once
            self.pools = {}                          # settings (JSON) -> LocalOraclePool
            self.lock = threading.Lock()

        def teardown(self, worker):
            with self.lock:
                pools, self.pools = list(self.pools.values()), {}
            for pool in pools:
                pool.close()

        def pool(self, pool_kwargs):
            """The pool of these settings, started when missing or broken (its engines
            could not start, perhaps for a while only)."""
            key = json.dumps(pool_kwargs, sort_keys=True, default=str)
            with self.lock:
                pool = self.pools.get(key)
                if pool is None or pool._broken:
                    if pool is not None:
                        pool.close()
                    pool = self.pools[key] = LocalOraclePool(n_workers=self.n_engines,
                                                             **pool_kwargs)
                return pool

        def engine_pids(self):
            """Process ids of the engines of every pool (for monitoring, and tests)."""
            with self.lock:
                return sorted(pid for pool in self.pools.values() for pid in pool.worker_pids)

    return OracleEngines()


def run_job_on_dask_worker(message, pool_kwargs):
    """A Dask task: one job in this Dask worker's engines of these settings (their timeout
    and retries as in a LocalOraclePool), waited for in the Dask thread."""
    from distributed import get_worker
    engines = get_worker().plugins[ENGINES_PLUGIN]
    return engines.pool(pool_kwargs).submit_job(message).result()


class DaskOraclePool:
    """Psi4 (or xTB) jobs on a Dask cluster: `dask scheduler` on one machine, and on every
    machine with this repo and Psi4 (or tblite), from the repo directory, `PYTHONPATH=.
    dask worker tcp://HOST:8786 --nthreads N` (N jobs at a time, each with `threads`
    threads). Each Dask worker keeps N engine processes per pool setting (engines_plugin,
    registered here), so a task costs only Dask's scheduling more than a local job
    (benchmarks/oracle_pool.py --dask; benchmarks/README.md). Same arguments and API as LocalOraclePool; scratch
    is each Dask worker's $PSI_SCRATCH or /tmp."""

    def __init__(self, scheduler, method=oracles.DEFAULT_METHOD, threads=1, memory="2 GB",
                 timeout=600.0, retries=1, max_opt_steps=None, psi4_options=None,
                 connect_timeout=20.0, opt_coordinates=oracles.DEFAULT_OPT_COORDINATES):
        from distributed import Client
        if max_opt_steps is None:
            max_opt_steps = oracles.default_max_opt_steps(method)
        check_settings(1, threads, timeout, retries, max_opt_steps, method, opt_coordinates)
        try:
            self.client = Client(scheduler, timeout=f"{connect_timeout}s")
        except (OSError, TimeoutError, ValueError) as err:
            raise OracleError(f"cannot reach the Dask scheduler at {scheduler} ({err}); start "
                              "it with `dask scheduler`, or drop --dask_scheduler") from None
        self.client.register_plugin(engines_plugin())   # on every worker, present and future
        self.pool_kwargs = dict(method=method, threads=threads, memory=memory,
                                timeout=timeout, retries=retries,
                                max_opt_steps=max_opt_steps, psi4_options=psi4_options,
                                opt_coordinates=opt_coordinates)
        self._tasks = {}              # key -> dask future: kept, or Dask forgets the task
        self._lock = threading.Lock()

    @property
    def result_settings(self):
        """The settings that decide a result (the journal's key)."""
        kw = self.pool_kwargs
        return result_settings(kw["method"], kw["psi4_options"], kw["max_opt_steps"],
                               kw["opt_coordinates"])

    @property
    def n_parallel(self):
        """Jobs the cluster runs at once now: the threads of all Dask workers."""
        return max(1, sum(self.client.nthreads().values()))

    def engine_pids(self):
        """{Dask worker address: process ids of its engines, of every pool setting}
        (for monitoring, and tests that kill one)."""
        return self.client.run(lambda dask_worker: dask_worker.plugins[ENGINES_PLUGIN]
                               .engine_pids())

    def submit(self, conf, conf_id, kind="gradient", charge=None, multiplicity=None):
        return self.submit_job(make_job(conf, conf_id, kind, charge, multiplicity))

    def submit_job(self, message):
        future = Future()
        future.set_running_or_notify_cancel()
        task = self.client.submit(run_job_on_dask_worker, message, self.pool_kwargs,
                                  pure=False)
        with self._lock:
            self._tasks[task.key] = task

        def copy_result(task):        # runs in a Dask thread when the task ends
            try:
                result = task.result()
            except BaseException as err:   # cancelled, KilledWorker, an import error
                result = OracleResult(message["conf_id"], False, message["kind"],
                                      reason=f"Dask task failed: {oracles.one_line(err)}")
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
# The journal: every finished result on disk before it is used, found again by its question
# ---------------------------------------------------------------------------------------

def result_settings(method, options=None, max_opt_steps=None, opt_coordinates=None):
    """The settings that decide a result (not threads, memory, timeout or retries)."""
    return {"method": method.strip().lower(), "options": dict(options or {}),
            "max_opt_steps": None if max_opt_steps is None else int(max_opt_steps),
            "opt_coordinates": opt_coordinates}


def job_key(message, settings):
    """SHA-256 of a job's question: kind, charge, multiplicity, the settings that decide
    its result (an optimization's step cap and coordinates only for kind 'optimize'), the
    elements and the exact bits of the float64 positions. conf_id is not part of it."""
    question = {"kind": message["kind"], "charge": int(message["charge"]),
                "multiplicity": int(message["multiplicity"]),
                "method": settings["method"], "options": settings["options"]}
    if message["kind"] == "optimize":
        question.update(max_opt_steps=settings["max_opt_steps"],
                        opt_coordinates=settings["opt_coordinates"])
    h = hashlib.sha256(json.dumps(question, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(message["numbers"], dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(message["positions"], dtype="<f8").tobytes())
    return h.hexdigest()


_ARRAYS = ("forces", "trajectory_positions", "trajectory_energy", "trajectory_forces")


def result_to_json(result):
    """An OracleResult as JSON text; floats round-trip exactly (Python writes the shortest
    repr that reads back to the same float64)."""
    record = {name: getattr(result, name) for name in OracleResult.__dataclass_fields__}
    for name in _ARRAYS:
        if record[name] is not None:
            record[name] = np.asarray(record[name], dtype=np.float64).tolist()
    return json.dumps(record)


def result_from_json(text):
    record = json.loads(text)
    for name in _ARRAYS:
        if record[name] is not None:
            record[name] = np.array(record[name], dtype=np.float64)
    return OracleResult(**record)


class OracleJournal:
    """Finished genuine-oracle results in an SQLite file, one committed transaction each,
    keyed by job_key. Only successful results are kept: a failure (a timeout, a worker
    lost) may not repeat, so a rerun asks again. Several processes may share one file
    (SQLite locks it); one process may call put() from any thread."""

    def __init__(self, path):
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=60.0, check_same_thread=False,
                                       isolation_level=None)   # autocommit: put() is durable
            # computed: how many times the job ran to a result; more than 1 only when two
            # runs asked at once (a check that a resumed run recomputes nothing)
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, "
                             "kind TEXT, n_atoms INTEGER, computed INTEGER, result TEXT)")
        except sqlite3.DatabaseError as err:
            raise data.DataError(f"{path}: not an oracle journal ({err}); move it away, or "
                                 "name another file with --oracle_journal") from None
        self._lock = threading.Lock()
        self.n_reused = self.n_stored = 0      # this process' hits and new results

    def __len__(self):
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def get(self, key):
        """The stored OracleResult of this question, or None."""
        with self._lock:
            row = self._db.execute("SELECT result FROM results WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else result_from_json(row[0])

    def put(self, key, result):
        n_atoms = None if result.forces is None else len(result.forces)
        with self._lock:
            self._db.execute("INSERT INTO results VALUES (?, ?, ?, 1, ?) ON CONFLICT(key) "
                             "DO UPDATE SET computed = computed + 1",
                             (key, result.kind, n_atoms, result_to_json(result)))
            self.n_stored += 1

    def times_computed(self):
        """[how many times each stored result was computed] (all 1: nothing twice)."""
        with self._lock:
            return [n for (n,) in self._db.execute("SELECT computed FROM results")]

    def close(self):
        with self._lock:
            self._db.close()


class JournalledPool:
    """A pool (Local, Dask or a simulated one) whose results pass through an OracleJournal.
    submit() of a question the journal answers returns that result at once (the same
    energy, forces and seconds as when it was computed); a question already running shares
    that job's answer; any other job runs in the pool, and its result is written to the
    journal before its future is done, so that whatever reads the future can be killed
    without losing it. Same API as the pool it wraps."""

    def __init__(self, pool, journal):
        self.pool, self.journal = pool, journal
        self.settings = pool.result_settings
        self._running = {}                 # key -> [(future, conf_id)] waiting for that job
        self._lock = threading.Lock()

    def __getattr__(self, name):          # n_parallel, worker_pids, ...: the pool's own
        return getattr(self.pool, name)

    def submit(self, conf, conf_id, kind="gradient", charge=None, multiplicity=None):
        given = {k: v for k, v in (("charge", charge), ("multiplicity", multiplicity))
                 if v is not None}
        return self._submit(make_job(conf, conf_id, kind, charge, multiplicity),
                            lambda: self.pool.submit(conf, conf_id, kind, **given))

    def submit_job(self, message):
        return self._submit(message, lambda: self.pool.submit_job(message))

    def _submit(self, message, start_job):
        key, future = job_key(message, self.settings), Future()
        with self._lock:                   # a job that ends meanwhile is in one or the other
            stored = self.journal.get(key)
            if stored is not None:
                stored.conf_id = message["conf_id"]
                self.journal.n_reused += 1
                future.set_result(stored)
                return future
            waiting = self._running.setdefault(key, [])
            waiting.append((future, message["conf_id"]))
            if len(waiting) > 1:           # the same question is running: its answer
                return future
        start_job().add_done_callback(lambda job: self._journal_then_settle(key, job))
        return future

    def _journal_then_settle(self, key, job):
        """In the pool's thread, when a job ends: keep a success (before the job leaves
        the running ones, so that the same question asked now finds it), then answer every
        future that waits for it."""
        result = None if job.cancelled() else job.result()
        if result is not None and result.ok:
            try:
                self.journal.put(key, result)
            except sqlite3.Error as err:
                print(f"warning: could not write {self.journal.path} ({err}); the result "
                      "is used but not kept", file=sys.stderr)
        with self._lock:
            waiting = self._running.pop(key)
        if result is None:                 # cancelled while queued (the pool closed)
            for future, _ in waiting:
                future.cancel()
            return
        for future, conf_id in waiting:
            _settle(future, dataclasses.replace(result, conf_id=conf_id))

    def close(self):
        try:
            self.pool.close()
        finally:
            self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------
# From the command-line flags of oracles.add_oracle_args
# ---------------------------------------------------------------------------------------

def check_settings(n_workers, threads, timeout, retries, max_opt_steps, method,
                   opt_coordinates=oracles.DEFAULT_OPT_COORDINATES):
    """A setting no pool can run with is one OracleError naming its flag."""
    if oracles.is_xtb(method) and method.strip().lower() not in oracles.XTB_METHODS:
        raise OracleError(f"--oracle_method {method} is not a tblite method; use "
                          f"{' or '.join(oracles.XTB_METHODS)}")
    if opt_coordinates not in oracles.OPT_COORDINATES:
        raise OracleError(f"--opt_coordinates must be one of {', '.join(oracles.OPT_COORDINATES)}, "
                          f"not {opt_coordinates}")
    if oracles.is_xtb(method) and opt_coordinates != "cartesian":
        raise OracleError(f"--opt_coordinates {opt_coordinates} is for Psi4's optimizer; xTB's "
                          "BFGS works in Cartesian coordinates only: drop the flag")
    for name, value, low in (("--n_workers", n_workers, 1), ("--oracle_threads", threads, 1),
                             ("--oracle_retries", retries, 0),
                             ("--max_opt_steps", max_opt_steps, 1)):
        if int(value) < low:
            raise OracleError(f"{name} must be at least {low}, not {value}")
    if not timeout > 0:
        raise OracleError(f"--oracle_timeout must be positive, not {timeout}")


def make_oracle_pool(args, journal=None):
    """A DaskOraclePool with --dask_scheduler, else a LocalOraclePool; with a journal path
    (--oracle_journal, else the stage's default beside its output) a JournalledPool of it.
    A stage without --max_opt_steps / --opt_coordinates (add_oracle_args(optimize=False))
    gets their defaults."""
    common = dict(method=args.oracle_method, threads=args.oracle_threads,
                  memory=args.psi4_memory, timeout=args.oracle_timeout,
                  retries=args.oracle_retries,
                  max_opt_steps=getattr(args, "max_opt_steps", None),
                  opt_coordinates=getattr(args, "opt_coordinates", oracles.DEFAULT_OPT_COORDINATES))
    if args.dask_scheduler:
        check_dask_scheduler(args.dask_scheduler)
        pool = DaskOraclePool(args.dask_scheduler, **common)
    else:
        pool = LocalOraclePool(n_workers=args.n_workers, **common)
    journal = getattr(args, "oracle_journal", None) or journal
    if journal is None:
        return pool
    try:
        return JournalledPool(pool, OracleJournal(journal))
    except BaseException:
        pool.close()
        raise


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


def usable_cores(sample_seconds=0.05, proc="/proc", cgroup="/sys/fs/cgroup"):
    """(allowed, idle): the cores this process may run on (its CPU affinity, at most its
    cgroup's CPU quota, rounded down), and how many of them the machine's other processes
    leave idle: the idle + iowait share of those cores' time in /proc/stat over
    sample_seconds, at least 1. Other jobs and our own oracle workers count alike. Per
    core, so a container pinned to some cores (cpuset) sees only its own."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    allowed = len(cpus)
    try:            # CPU quota of our cgroup, v2 (cpu.max: "QUOTA PERIOD") or v1
        with open(os.path.join(proc, "self", "cgroup")) as f:
            paths = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)
    except (OSError, ValueError):
        paths = {}
    v1 = paths.get("cpu,cpuacct", paths.get("cpu", "/")).lstrip("/")

    def read(name):
        with open(name) as f:
            return f.read()
    for files in ([os.path.join(cgroup, paths.get("", "/").lstrip("/"), "cpu.max")],
                  [os.path.join(cgroup, "cpu.max")],      # a container's own view
                  [os.path.join(cgroup, "cpu", v1, f"cpu.cfs_{x}_us") for x in ("quota", "period")],
                  [os.path.join(cgroup, "cpu", f"cpu.cfs_{x}_us") for x in ("quota", "period")]):
        try:
            quota, period = " ".join(read(name) for name in files).split()[:2]
            if quota not in ("max", "-1"):
                allowed = max(1, min(allowed, int(quota) // int(period)))
        except (OSError, ValueError):
            continue

    def idle_and_total():
        """Jiffies of our cores, (idle + iowait + our own process's, all): our own threads
        (spinning after a parallel op, say) leave the core to us, not busy."""
        idle = total = 0
        with open(os.path.join(proc, "stat")) as f:
            for line in f:
                name, *ticks = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    idle += int(ticks[3]) + int(ticks[4])
                    total += sum(int(t) for t in ticks[:8])   # user..steal (guest in user)
        with open(os.path.join(proc, "self", "stat")) as f:  # "pid (comm) state ... utime stime"
            own = f.read().rpartition(")")[2].split()
        return idle + int(own[11]) + int(own[12]), total
    try:
        idle0, total0 = idle_and_total()
        time.sleep(sample_seconds)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return allowed, allowed      # no /proc/stat (not Linux): assume the cores are free
    if total1 <= total0:
        return allowed, allowed
    # a core is free when >= 3/4 idle: a thread too many costs more than one too few
    # (benchmarks/threads.py; benchmarks/README.md, "Threads beside other work")
    idle_cores = len(cpus) * (idle1 - idle0) / (total1 - total0)
    return allowed, max(1, min(allowed, int(idle_cores + 0.25)))


def torch_threads_beside_the_pool(args, pool_idle=False):
    """Torch threads for the NNP: the cores this process may use (usable_cores) that other
    processes leave idle, less those the local oracle workers take (--n_workers x
    --oracle_threads; all of them when the workers run elsewhere (Dask) or no job can run
    beside the NNP: pool_idle), at least 1. More threads than free cores run many times
    slower: every parallel op waits for a thread that is not scheduled
    (benchmarks/threads.py)."""
    allowed, idle = usable_cores()
    if args.dask_scheduler or pool_idle:
        return idle
    return max(1, min(idle, allowed - args.n_workers * args.oracle_threads))



if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--oracle_worker":
        worker_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("oracle_pool.py is a library; its command line only starts the worker of "
                 "an oracle pool")
