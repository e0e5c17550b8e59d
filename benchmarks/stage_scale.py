"""How well evaluate.py and make_trajectories.py keep W oracle workers busy (W = 240).

A DFT job takes minutes (wB97X-D/def2-SVP on 20-40 atoms: 4-10 min a core), so at the
paper's scale what a stage costs is how many of the W workers its submission loop keeps
busy. This drives each stage's own loop (make_trajectories.make, evaluate.evaluate_optimization)
against a simulated pool of W workers whose jobs take seeded lognormal times (mean
--mean_job_s, 590 s; log-sd --sigma) on a virtual clock, and prints, per stage:

    utilization   busy worker-seconds / (W x wall), wall from the pool's start to its last
                  result; and the same until the last job starts (below 1: the stage left
                  workers idle while it had jobs left, e.g. by capping the jobs in flight)
    wall/ideal    wall / max(busy worker-seconds / W, the longest job): 1 is perfect packing
    most in flight: jobs submitted and not finished at once (running and queued)

The virtual clock stands still while the stage computes (ETKDG, the NNP's batches, db
writes) and jumps to the next job's end when the stage waits, so the numbers are the same on
every run and every machine; the stage's own time on this machine is printed beside them
(--count_stage_time puts it on the clock). The simulated oracle returns zeros: it times
the submission loops, nothing else (the real pools are timed by benchmarks/oracle_pool.py).

    python benchmarks/stage_scale.py [--workers 240] [--jobs_per_worker 10] [--sigma 0.5]
"""
import argparse
import collections
import heapq
import itertools
import os
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future
from contextlib import ExitStack
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import evaluate  # noqa: E402
import make_trajectories  # noqa: E402
import oracle_pool  # noqa: E402
import painn  # noqa: E402

TEST_DB = os.path.join(ROOT, "data", "moses_test60.db")          # 60 drug-like test rows
SMILES = os.path.join(ROOT, "data", "moses_sample.smi")          # 5000 drug-like SMILES
CHECKPOINT = os.path.join(ROOT, "models", "laptop", "f_baseline.pt")


# ---------------------------------------------------------------------------------------
# A pool of W workers on a virtual clock
# ---------------------------------------------------------------------------------------

class SimulatedPool:
    """The oracle pool's API (submit, n_parallel, close) with W workers whose jobs take
    lognormal times (seeded, drawn in submission order) on a virtual clock. Jobs start in
    submission order as workers free up, as in the real pools."""

    def __init__(self, n_workers, mean_job_s, sigma, seed, count_stage_time):
        self.n_parallel = n_workers
        self.rng = np.random.default_rng(seed)
        self.mu = np.log(mean_job_s) - sigma ** 2 / 2       # so that the mean is mean_job_s
        self.sigma = sigma
        self.count_stage_time = count_stage_time
        self.real_start, self.skipped = time.perf_counter(), 0.0
        self.ends = []                  # heap of (end time, order, future, result): running
        self.queue = collections.deque()   # (future, job seconds, result) waiting
        self.order = itertools.count()
        self.runs = []                  # (start, end) of every job
        self.most_in_flight = 0

    def now(self):
        real = time.perf_counter() - self.real_start if self.count_stage_time else 0.0
        return real + self.skipped

    def submit(self, conf, conf_id, kind="gradient", charge=None, multiplicity=None):
        self.catch_up()
        future = VirtualFuture(self)
        future.set_running_or_notify_cancel()
        seconds = float(self.rng.lognormal(self.mu, self.sigma))
        self.queue.append((future, seconds, fake_result(conf, conf_id, kind)))
        self.start_queued(self.now())
        self.most_in_flight = max(self.most_in_flight, len(self.ends) + len(self.queue))
        return future

    def start_queued(self, t):
        while self.queue and len(self.ends) < self.n_parallel:
            future, seconds, result = self.queue.popleft()
            heapq.heappush(self.ends, (t + seconds, next(self.order), future, result))
            self.runs.append((t, t + seconds))

    def finish_next(self):
        """The next job ends: its result is set, its worker takes the next queued job."""
        end, _, future, result = heapq.heappop(self.ends)
        future.set_result(result)
        self.start_queued(end)

    def catch_up(self):
        """Finish every job whose end the clock has passed."""
        while self.ends and self.ends[0][0] <= self.now():
            self.finish_next()

    def wait_for_one(self, futures):
        """Advance the clock until one of `futures` is done (the stage waits)."""
        self.catch_up()
        while not any(Future.done(f) for f in futures):
            if not self.ends:
                raise RuntimeError("the stage waits for jobs that no worker will run")
            self.skipped += max(0.0, self.ends[0][0] - self.now())
            self.finish_next()

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VirtualFuture(Future):
    """A Future that is done once the virtual clock passed its job's end."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def done(self):
        self.pool.catch_up()
        return super().done()


def fake_result(conf, conf_id, kind):
    """Zeros in the shape of an OracleResult (optimizations: 5 steps at the start)."""
    forces = np.zeros((len(conf.numbers), 3))
    result = oracle_pool.OracleResult(conf_id, True, kind, energy=0.0, forces=forces, attempts=1)
    if kind == "optimize":
        result.trajectory_positions = np.repeat(np.asarray(conf.positions)[None], 5, axis=0)
        result.trajectory_energy = np.zeros(5)
        result.trajectory_forces = np.zeros((5,) + forces.shape)
        result.converged = True
    return result


def virtual_wait(futures, return_when=FIRST_COMPLETED):
    """concurrent.futures.wait(..., FIRST_COMPLETED) on the virtual clock."""
    assert return_when == FIRST_COMPLETED
    futures = list(futures)
    futures[0].pool.wait_for_one(futures)
    done = {f for f in futures if Future.done(f)}
    return done, set(futures) - done


def virtual_as_completed(futures):
    """concurrent.futures.as_completed on the virtual clock, in the order jobs end."""
    left = list(futures)
    while left:
        left[0].pool.wait_for_one(left)
        for future in [f for f in left if Future.done(f)]:
            left.remove(future)
            yield future


class SpringNNP(torch.nn.Module):
    """A stand-in for the NNP, for timing only: E = k/2 |X|^2 per molecule, F = -k X. It
    makes evaluate's NNP batches take milliseconds instead of minutes on this CPU (they
    are off the virtual clock either way); --real_nnp runs f_baseline instead."""

    def forward(self, z, positions, batch, n_molecules=None, create_graph=None):
        k = 0.01                                                   # Hartree/Angstrom^2
        energy = torch.zeros(n_molecules, dtype=torch.float64).index_add_(
            0, batch, 0.5 * k * (positions.double() ** 2).sum(dim=1))   # [n_molecules]
        return energy, -k * positions                                  # [n_atoms, 3]


# ---------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------

def replicated_test_db(path, n_rows):
    """A test db of n_rows rows: the 60 rows of data/moses_test60.db over and over."""
    confs, _ = data.read_db(TEST_DB, "auto", verbose=False)
    db = data.connect_for_writing(path)
    with db:
        for i in range(n_rows):
            c = confs[i % len(confs)]
            data.write_conformation(db, c, conf_id=i, converged=True)
    return path


def run_stage(name, stage, argv, pool_args, real_nnp):
    """Run one stage on a SimulatedPool; its numbers."""
    pools = []

    def make_pool(args, journal=None):          # no journal: the jobs are simulated
        pools.append(SimulatedPool(**pool_args))
        return pools[-1]

    start = time.perf_counter()
    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(oracle_pool, "make_oracle_pool", make_pool))
        patches.enter_context(mock.patch.object(make_trajectories, "wait", virtual_wait))
        patches.enter_context(mock.patch.object(evaluate, "as_completed", virtual_as_completed))
        if not real_nnp:
            patches.enter_context(mock.patch.object(painn, "load_checkpoint",
                                                    lambda path, device: SpringNNP()))
        stage(argv)
    (pool,) = pools
    W, (starts, ends) = pool.n_parallel, np.array(pool.runs).T   # [n_jobs] virtual seconds
    wall, busy, last_start = ends.max(), (ends - starts).sum(), starts.max()
    busy_before_last_start = (np.minimum(ends, last_start) - starts).sum()
    return {"stage": name, "jobs": len(starts), "utilization": busy / (W * wall),
            "wall/ideal": wall / max(busy / W, (ends - starts).max()),
            "until last start": busy_before_last_start / (W * last_start),
            "most in flight": pool.most_in_flight, "wall_h": wall / 3600,
            "stage_real_s": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=240, help="W, oracle workers")
    parser.add_argument("--jobs_per_worker", type=int, default=10)
    parser.add_argument("--mean_job_s", type=float, default=590.0)
    parser.add_argument("--sigma", type=float, default=0.5, help="log-sd of a job's time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count_stage_time", action="store_true",
                        help="the stage's own time on this machine advances the clock")
    parser.add_argument("--real_nnp", action="store_true",
                        help="evaluate optimizes with models/laptop/f_baseline.pt (minutes a "
                             "batch on a CPU), not a stand-in")
    args = parser.parse_args(argv)
    n_jobs = args.workers * args.jobs_per_worker
    pool_args = dict(n_workers=args.workers, mean_job_s=args.mean_job_s, sigma=args.sigma,
                     seed=args.seed, count_stage_time=args.count_stage_time)
    oracle = ["--n_workers", str(args.workers)]
    n_eval_steps = len(evaluate.EVAL_STEPS.split(","))

    with tempfile.TemporaryDirectory(prefix="golf-stage-scale-") as tmp:
        n_test = -(-n_jobs // n_eval_steps)                 # one job per eval step
        test_db = replicated_test_db(os.path.join(tmp, "test.db"), n_test)
        starts_db = replicated_test_db(os.path.join(tmp, "starts.db"), n_jobs)
        stages = [
            ("make_trajectories single_point (D0, --smiles)",
             lambda a: make_trajectories.make(make_trajectories.parse_args(a)),
             ["--smiles", SMILES, "--max_molecules", str(n_jobs), "--mode", "single_point",
              "--out", os.path.join(tmp, "d0.db"), *oracle]),
            ("make_trajectories optimize (D-test, --db)",
             lambda a: make_trajectories.make(make_trajectories.parse_args(a)),
             ["--db", starts_db, "--mode", "optimize", "--out", os.path.join(tmp, "traj.db"),
              *oracle]),
            (f"evaluate --model nnp ({'f_baseline' if args.real_nnp else 'stand-in NNP'})",
             lambda a: evaluate.evaluate_optimization(evaluate.parse_args(a)),
             ["--checkpoint", CHECKPOINT, "--db", test_db,
              "--out_dir", os.path.join(tmp, "eval"), "--n_bootstrap", "10", *oracle]),
        ]
        rows = [run_stage(name, stage, argv, pool_args, args.real_nnp)
                for name, stage, argv in stages]

    print(f"\nW = {args.workers} workers, jobs of lognormal time, mean {args.mean_job_s:g} s, "
          f"log-sd {args.sigma:g}, seed {args.seed}; the stage's own time "
          f"{'on' if args.count_stage_time else 'off'} the clock")
    print(f"{'stage':48s} {'jobs':>5s} {'util.':>6s} {'to last start':>13s} {'wall/ideal':>10s} "
          f"{'in flight':>9s} {'wall h':>6s} {'own s':>6s}")
    for r in rows:
        print(f"{r['stage']:48s} {r['jobs']:5d} {r['utilization']:6.3f} "
              f"{r['until last start']:13.3f} {r['wall/ideal']:10.3f} {r['most in flight']:9d} "
              f"{r['wall_h']:6.2f} {r['stage_real_s']:6.0f}")
    print("util.: busy worker-seconds / (W x wall); to last start: the same until the last job "
          "starts (1: the stage\nnever left a worker idle); in flight: most jobs submitted and "
          "not finished at once; own s: this machine's seconds in the stage")


if __name__ == "__main__":
    main()
