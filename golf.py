"""Stage 3: GOLF, Algorithm 1 of Tsypin et al. (ICLR 2024), batched, oracle jobs beside the NNP.

    python golf.py --d0 D0.db --load_baseline runs/baseline/checkpoint.pt --out_dir runs/golf

Algorithm 1 (line numbers in the comments below):
     1  f <- f_baseline; D <- D0
     3  s_0 ~ D                                    every slot of the batch holds a trajectory
     5  s_{t+1} <- Opt(s_t, F(s_t))                one batched L-BFGS step of all slots
     6  E^S_{t+1} <- O_S(s_{t+1})                  MMFF energy of every new conformation
     7  if E^S_{t+1} > E^S_t or t = T:             the trajectory ends
     8      (E, F) <- O_G(s)                       s = s_t on a rise, s_T at the time limit
     9      D <- D + {(s, E, F)}
    10      update f U times on minibatches of D   (a share --initial_conf_pct from D0)
    12      s_0 ~ D                                the slot restarts; other slots go on
    18  until K conformations have been added

s_0 ~ D (lines 3, 12): uniform over D = D0 plus every conformation collected so far (the
replay buffer holds D). --start_from d0 draws from D0 only, as the official code does.

A trajectory ends only as line 7 says: on a rise of the MMFF energy or at t = T. An L-BFGS
slot at the NNP's minimum goes on stepping: torch's L-BFGS moves it by tiny steps while
max |F| > 1e-7 and not at all below, so it stays where it is (or a tiny rise of MMFF ends
it) and that conformation is sent at T. --end_on_convergence is the official code's rule:
a slot also ends, and sends its conformation, once max |F| <= --grad_threshold.

The genuine oracle (lines 8-10) takes minutes a label (DFT), and many workers label at
once. A slot whose trajectory ended sends its conformation to the pool and restarts at
once; jobs run while the NNP trains and optimizes. The loop counts its optimization steps
t (one step moves every slot), and a job sent at step t enters D after step t + L
(--oracle_lag L), or earlier when its room in the pool is needed: at most
--max_jobs_in_flight jobs are sent and not yet added, and a slot that ends with that many
in flight first makes the oldest enter. Jobs enter in the order they were sent, each
waited for if it is not done, then trained on with its U updates (line 10). So a label
enters D, and training, up to L steps later than in Algorithm 1, where it enters before
the next step (--oracle_lag 0: the synchronous loop). Every choice depends on counts
(steps, jobs), never on when a result arrives: the same command gives the same
collected.db and checkpoint whatever the oracle's timing (an oracle timeout is the
exception). When every slot waits (K needs no more jobs), the steps until the oldest job is
due would change nothing and are skipped.

The jobs in flight scale with the pool, not with the trajectories (--n_parallel): by
default 5 x the jobs the pool runs at once (its local workers, or the Dask cluster's
threads, read once at the start). Results enter in order, so while the oldest job runs
long the jobs done behind it keep their room, and the pool's queue must last until it
ends; the price is freshness, a job waits a few job lengths in the queue
(benchmarks/README.md, golf_scale.py, measures the cap against sending every job at once).

By default L is cap x T / --n_parallel: every slot sends a job at least every T steps, so
by then the cap has made the job enter; a smaller L makes the loop wait for jobs before
the pool is full. No more jobs are sent than K needs. --pipelined adds each result when
it arrives instead, and a slot that finds no room waits (the run then depends on the
oracle's timing). Like the official code, the learning-rate schedule spans K * U updates.

Nothing is lost to a kill, SIGTERM or Ctrl-C (docs/reliability.md). Every finished oracle
result is in oracle_journal.sqlite before the loop sees it; checkpoint.pt holds the model
and the whole loop (trajectories, optimizer state, jobs in flight), written every
--checkpoint_every updates and at a signal. `--resume` replays from there: the jobs in
flight are sent again and the journal answers those that finished, so on a CPU the resumed
run's collected.db and checkpoint equal those of a run that never stopped.
"""
import argparse
import collections
import concurrent.futures
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import optimizers
import oracle_pool
import oracles
import painn
import relaxation
import safe_io
from train_baseline import (Trainer, add_compile_arg, add_training_args, prediction_errors,
                            rng_state, set_rng_state)

JOBS_PER_WORKER = 5     # default --max_jobs_in_flight: this many per job the pool runs at once


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d0", required=True, help="the initial training data D0 (labelled ASE db)")
    p.add_argument("--out_dir", required=True,
                   help="checkpoint.pt, collected.db (the new data), metrics.jsonl")
    g = p.add_argument_group("GOLF (Table 5)")
    g.add_argument("--n_parallel", type=int, default=120,
                   help="concurrent trajectories (the jobs in flight are --max_jobs_in_flight)")
    g.add_argument("--max_oracle_steps", type=int, default=10_000,
                   help="K: genuine-oracle conformations to add")
    g.add_argument("--utd_ratio", type=int, default=50, help="U: NNP updates per added conformation")
    g.add_argument("--timelimit_train", type=int, default=100, help="T: steps of a trajectory")
    g.add_argument("--initial_conf_pct", type=float, default=0.1,
                   help="share of every minibatch drawn from D0")
    g.add_argument("--surrogate_energy_threshold", type=float, default=300.0,
                   help="kcal/mol: conformations with a higher MMFF energy are not sent "
                        "(the official code's rule and value; not in the paper)")
    g.add_argument("--start_from", choices=("d", "d0"), default="d",
                   help="s_0 ~ D (Algorithm 1, lines 3 and 12: D0 plus the collected "
                        "conformations) or ~ D0 only (the official code)")
    g.add_argument("--end_on_convergence", action="store_true",
                   help="a trajectory also ends when the optimizer converges (max |F| <= "
                        "--grad_threshold; the official code). Default: only on an MMFF "
                        "rise or at T (Algorithm 1, line 7)")
    g = p.add_argument_group("oracle jobs beside the NNP")
    g.add_argument("--oracle_lag", type=int, default=None,
                   help="L: a job sent at optimization step t is added to D and trained on "
                        "after step t + L at the latest (waiting for it if it is not done); "
                        "0: after the step that sent it, as Algorithm 1. Deterministic for "
                        "every L. Default: --max_jobs_in_flight x T / --n_parallel, the steps "
                        "in which the trajectories surely send that many jobs, so that the "
                        "cap decides while the pool is busy")
    g.add_argument("--max_jobs_in_flight", type=int, default=None,
                   help="most jobs sent and not yet added; at the cap the oldest is added "
                        "before the next is sent (default: "
                        f"{JOBS_PER_WORKER} x the jobs the pool runs at once, read at the "
                        "start: with --dask_scheduler, start the Dask workers first)")
    g.add_argument("--pipelined", action="store_true",
                   help="add each result as soon as it arrives, ignoring --oracle_lag "
                        "(the run then depends on the oracle's timing)")
    g = p.add_argument_group("GOLF's run")
    g.add_argument("--val_db", default=None,
                   help="labelled db to report validation errors on at the end (the same one "
                        "train_baseline.py --val_db uses; GOLF never trains on it)")
    g.add_argument("--log_every", type=int, default=10, help="log metrics every N additions")
    g.add_argument("--max_consecutive_failures", type=int, default=50,
                   help="stop when the genuine oracle fails this many times in a row (0: never)")
    g.add_argument("--max_seconds_without_progress", type=float, default=3600.0,
                   help="stop when nothing was added for this long (0: never)")
    add_compile_arg(p)
    add_training_args(p, fine_tune=True)   # no --total_steps: the schedule spans K * U
    optimizers.add_optimizer_args(p)
    oracles.add_oracle_args(p, optimize=False)        # GOLF's oracle jobs are gradients
    args = optimizers.parse_args_with_preset(p, argv)   # --optimizer_preset: Table 6
    if args.oracle_lag is not None and args.oracle_lag < 0:
        p.error(f"--oracle_lag must be 0 or more, not {args.oracle_lag}")
    if args.max_jobs_in_flight is not None and args.max_jobs_in_flight < 1:
        p.error(f"--max_jobs_in_flight must be at least 1, not {args.max_jobs_in_flight}")
    args.total_steps = args.max_oracle_steps * args.utd_ratio   # the schedule spans K * U
    return args


class Stalled(RuntimeError):
    """The run makes no progress (the oracle fails every job, or nothing is added): one line."""


class WallClock:
    """The time golf.py reads and how it waits for oracle jobs: real time, waited in slices
    of a second so that a stop signal (stop.check()) is seen within one. (The benchmark
    benchmarks/golf_scale.py runs the same loop on a virtual clock with a simulated pool.)"""
    now = staticmethod(time.perf_counter)

    def __init__(self, stop=None):
        self.stop = stop

    def wait(self, futures, timeout=None, return_when=concurrent.futures.ALL_COMPLETED):
        end = None if timeout is None else time.perf_counter() + timeout
        while True:
            left = 1.0 if end is None else min(1.0, max(0.0, end - time.perf_counter()))
            done, not_done = concurrent.futures.wait(futures, left, return_when)
            if self.stop is not None:
                self.stop.check()
            if not not_done or (done and return_when == concurrent.futures.FIRST_COMPLETED) \
                    or (end is not None and time.perf_counter() >= end):
                return done, not_done


class Slot:
    """One trajectory: where it started in D (d_index < len(D0): a D0 row, else a collected
    conformation), its MMFF surrogate and its last MMFF energy."""

    def __init__(self, d_index, conf, surrogate):
        self.d_index, self.conf, self.surrogate = d_index, conf, surrogate
        self.energy_mmff = surrogate.energy(conf.positions)   # E^S_0, kcal/mol
        # the conformation its trajectory ended with, until sent: right after the step, or
        # once K needs it (--pipelined: once there is room in the pool)
        self.waiting = None


class Golf:
    """The state of a GOLF run: model, trainer, replay buffer, trajectories, oracle jobs."""

    def __init__(self, args, d0, model, pool, rng, clock=None, stop=None):
        self.args, self.d0, self.model, self.pool, self.rng = args, d0, model, pool, rng
        self.clock = clock or WallClock(stop)
        self.stop = stop             # safe_io.StopSignals: SIGTERM / Ctrl-C, seen at safe points
        self.dtype = getattr(torch, args.dtype)
        self.trainer = Trainer(model, args, args.total_steps)
        self.buffer = data.ReplayBuffer(d0, args.initial_conf_pct, rng)
        self.updates_owed = 0        # U per added conformation, paid as training steps
        self.failures_in_a_row = collections.Counter()   # reason -> count, since the last addition
        self.last_progress = self.clock.now()
        # the pool's capacity, read once: the run then depends on counts only
        self.max_jobs_in_flight = args.max_jobs_in_flight or JOBS_PER_WORKER * pool.n_parallel
        # every slot sends a job at least every T steps: in L steps the slots send at least
        # the cap, so the cap, not L, decides when jobs enter while the pool is busy
        self.oracle_lag = args.oracle_lag if args.oracle_lag is not None else math.ceil(
            self.max_jobs_in_flight * args.timelimit_train / args.n_parallel)
        self.step = 0                # optimization steps of the loop (each moves every slot)
        self.in_flight = {}          # future -> (step sent at, job number, conformation), in order
        self.submitting = False      # inside submit_waiting (a resumed run finishes it first)
        self.rows_to_confirm = []    # collected.db rows past the checkpoint (see record)
        self.stats = dict(n_added=0, n_failed=0, n_rejected_mmff=0, n_rise_at_start=0,
                          n_submitted=0, wait_seconds=0.0, loss=float("nan"))
        self.collected_db = data.connect_for_writing(
            os.path.join(args.out_dir, "collected.db"), atomrefs=None, source="golf.py")
        self.slots, self.engine, self.opt, self.z = [], None, None, None

    # ---- the loop -----------------------------------------------------------------------

    def run(self):
        self.start_time = self.last_progress = self.clock.now()
        self.bar = safe_io.progress(total=self.args.max_oracle_steps, initial=self.stats["n_added"],
                        desc="GOLF: conformations added", dynamic_ncols=True)
        self.log({"event": "start", "max_jobs_in_flight": self.max_jobs_in_flight,
                  "oracle_lag": None if self.args.pipelined else self.oracle_lag})
        if not self.slots:                             # a resumed run has its trajectories
            self.start_trajectories()                  # line 3
            self.save()                                # from here on a kill resumes them
        try:
            self.train()                               # a resumed run first ends what it
            if self.submitting:                        # was doing when it stopped
                self.submit_waiting()
            while True:
                self.check_stop()
                for future in self.due():              # in the order they were sent
                    self.take_result(future)           # lines 8-10 (waits if it is not done)
                if self.stats["n_added"] >= self.args.max_oracle_steps:
                    break                              # line 18
                self.check_progress()
                if self.can_move():
                    self.optimization_step()           # lines 5-7
                elif self.in_flight:
                    # every slot waits (K needs no more jobs, or --pipelined and no room):
                    # nothing would happen in the steps before the oldest job is due, so go
                    # to that step
                    oldest_sent = next(iter(self.in_flight.values()))[0]
                    self.step = max(self.step, oldest_sent + self.oracle_lag)
                # else: the jobs failed, and the ended trajectories send new ones just below
                self.submit_waiting()                  # line 8 for the ended trajectories
        except safe_io.Interrupted:
            self.save()                                # the state at the signal, whole
            raise
        finally:
            self.bar.close()                           # before any last line is printed
        for future in self.in_flight:        # K reached: jobs still running are not needed
            future.cancel()
        self.save()
        self.log({"event": "done"})

    def check_stop(self):
        """A safe point: SIGTERM or Ctrl-C came -> safe_io.Interrupted (run() saves)."""
        if self.stop is not None:
            self.stop.check()

    # ---- trajectories -------------------------------------------------------------------

    def sample_start(self):
        """Line 3 / 12: s_0 ~ D (uniform over D0 and the collected conformations; --start_from
        d0: D0 only), with its MMFF surrogate. Index i < len(D0) is a D0 row."""
        n_collected = len(self.buffer.collected) if self.args.start_from == "d" else 0
        while True:
            i = int(self.rng.integers(len(self.d0) + n_collected))
            conf = self.start_conformation(i)
            try:
                return Slot(i, conf, oracles.MMFFSurrogate(conf))
            except data.DataError as err:       # no MMFF parameters for this molecule
                tqdm.write(f"skipping {'D0 row' if i < len(self.d0) else 'collected'} "
                           f"{conf.id} as a start: {err}")

    def start_conformation(self, i):
        """Row i of D = D0 followed by the collected conformations."""
        return self.d0[i] if i < len(self.d0) else self.buffer.collected[i - len(self.d0)]

    def start_trajectories(self):
        """Line 3: every slot of the batch starts a trajectory at s_0 ~ D; line 5's
        NNP-optimization is relaxation.Relaxation's, one slot a trajectory."""
        self.slots = [self.sample_start() for _ in range(self.args.n_parallel)]
        self.build_optimizer()

    def build_optimizer(self):
        """Line 5's NNP-optimization: relaxation.Relaxation (the paper's L-BFGS by default),
        one slot a trajectory, started at the slots' s_0."""
        self.engine = relaxation.Relaxation(self.model, self.args, len(self.slots))
        self.opt = self.engine.opt
        if not self.args.end_on_convergence:   # line 7 knows no convergence: never converged
            self.opt.grad_threshold = -math.inf
        for k, slot in enumerate(self.slots):
            self.engine.fill(k, slot.conf.numbers, slot.conf.positions)
        self.refresh_atomic_numbers()

    def refresh_atomic_numbers(self):
        """The engine's atomic numbers, from the slots' molecules (also after a change of
        the optimizer's state outside fill and empty)."""
        self.engine.numbers = [torch.as_tensor(s.conf.numbers, device=self.engine.device)
                               for s in self.slots]
        self.z = self.engine.z = self.opt.concat_slots(self.engine.numbers)

    def restart(self, k):
        """Line 12: a new s_0 in slot k; the other slots are untouched."""
        self.slots[k] = self.sample_start()
        self.engine.fill(k, self.slots[k].conf.numbers, self.slots[k].conf.positions)

    def moving(self, k):
        return self.engine.moving(k)

    def can_move(self):
        return self.engine.can_move()

    def optimization_step(self):
        """Lines 5-7 for every moving slot; ended trajectories go to `end_trajectory`."""
        self.model.eval()
        self.step += 1
        before = {k: self.engine.positions(k) for k in range(len(self.slots)) if self.moving(k)}
        self.engine.step()                                             # line 5
        for k, positions_before in before.items():
            slot = self.slots[k]
            positions = self.engine.positions(k)
            energy_mmff = slot.surrogate.energy(positions)             # line 6
            t = int(self.opt.n_steps[k]) - 1           # this step took s_t to s_{t+1}
            if energy_mmff > slot.energy_mmff:                          # line 7: a rise
                # s_t is sent. At t = 0 it is s_0, a conformation of D, relabelled, as
                # Algorithm 1 says; skipping it can stall a poor f_baseline whose every
                # first step goes uphill
                self.stats["n_rise_at_start"] += t == 0
                self.end_trajectory(k, positions_before, slot.energy_mmff)
            elif t + 1 >= self.args.timelimit_train or bool(self.opt.converged[k]):
                self.end_trajectory(k, positions, energy_mmff)   # t + 1 = T: s_T is sent
            else:                                  # (converged: --end_on_convergence only)
                slot.energy_mmff = energy_mmff
        self.refresh_atomic_numbers()

    def end_trajectory(self, k, positions, energy_mmff):
        """Line 8: the slot keeps the conformation for the genuine oracle (submit_waiting
        sends it after the step) and leaves the batch, unless MMFF calls it broken."""
        slot = self.slots[k]
        if energy_mmff > self.args.surrogate_energy_threshold:
            self.stats["n_rejected_mmff"] += 1
            self.restart(k)
            return
        from_d0 = slot.d_index < len(self.d0)
        conf = data.Conformation(numbers=slot.conf.numbers, positions=positions.copy(),
                                 smiles=slot.conf.smiles,
                                 info={"d0_row": int(slot.conf.id or 0) if from_d0
                                       else int(slot.conf.info.get("d0_row", 0)),
                                       "start_collected": -1 if from_d0    # index in collected
                                       else slot.d_index - len(self.d0),
                                       "trajectory_step": int(self.opt.n_steps[k])})
        slot.waiting = conf
        self.engine.empty(k)

    def submit_waiting(self):
        """Line 8: send the conformations of ended trajectories to the pool, in slot order,
        and restart their slots (line 12). With --max_jobs_in_flight jobs in flight the
        oldest enters D first (before its step t + L, waited for if not done), so no
        trajectory waits for room; --pipelined: the slot waits for room instead. No more
        jobs are sent than K needs."""
        restarted, self.submitting = False, True
        for k, slot in enumerate(self.slots):
            needed = self.args.max_oracle_steps - self.stats["n_added"] - len(self.in_flight)
            if slot.waiting is None or needed <= 0:
                continue
            if len(self.in_flight) >= self.max_jobs_in_flight:
                if self.args.pipelined:
                    continue
                self.take_result(next(iter(self.in_flight)))     # makes room
            future = self.pool.submit(slot.waiting, self.stats["n_submitted"])
            self.in_flight[future] = (self.step, self.stats["n_submitted"], slot.waiting)
            self.stats["n_submitted"] += 1
            self.restart(k)
            restarted = True
        if restarted:
            self.refresh_atomic_numbers()
        self.submitting = False

    # ---- oracle results and training ---------------------------------------------------

    def due(self):
        """The jobs whose results enter D now, in the order they were sent: every job sent
        at step t - L or before (--oracle_lag L), done or not. --pipelined: the jobs done by
        now, after waiting (at most 1 s) for one if no slot can move."""
        if self.args.pipelined:
            if self.in_flight and not self.can_move() and \
                    not any(f.done() for f in self.in_flight):
                self.wait_for(list(self.in_flight), timeout=1.0,
                              return_when=concurrent.futures.FIRST_COMPLETED)
            return [f for f in self.in_flight if f.done()]
        return [f for f, (sent, _, _) in self.in_flight.items()
                if sent <= self.step - self.oracle_lag]

    def take_result(self, future):
        self.add_result(future)                      # lines 8-9
        self.train()                                 # line 10

    def add_result(self, future):
        """Lines 8-9: wait for the job if it is not done, then add its labelled conformation
        to D (and to collected.db at once), owing U training updates for it (line 10)."""
        self.wait_for([future])
        _, _, conf = self.in_flight.pop(future)
        result = future.result()
        if not result.ok:
            self.stats["n_failed"] += 1
            self.failures_in_a_row[result.reason[:120]] += 1
            self.log({"event": "oracle_failure", "reason": result.reason,
                      "seconds": result.seconds})
            self.check_progress()            # stops at exactly N failures in a row
            return
        self.failures_in_a_row.clear()
        self.last_progress = self.clock.now()
        labelled = data.Conformation(numbers=conf.numbers, positions=conf.positions,
                                     energy=result.energy, forces=result.forces,
                                     smiles=conf.smiles, info=conf.info)
        self.record(labelled, result.seconds)
        self.buffer.add(labelled)                                          # line 9
        self.stats["n_added"] += 1
        self.updates_owed += self.args.utd_ratio                           # line 10
        self.bar.update(1)
        if self.stats["n_added"] % self.args.log_every == 0:
            self.log({"event": "progress"})

    def record(self, labelled, oracle_seconds):
        """Write an added conformation to collected.db (the label itself is already in the
        oracle journal). A resumed run replays the steps after its checkpoint and adds the
        rows a stopped run wrote after it again: an identical row is kept as it is; a row
        that differs (a replay on a GPU need not be bitwise) is dropped with every row after
        it, and the new one written."""
        if self.rows_to_confirm:
            row = self.rows_to_confirm.pop(0)
            if np.array_equal(row.numbers, labelled.numbers) and \
                    np.array_equal(row.positions, labelled.positions) and \
                    row.energy == labelled.energy:
                return
            self.collected_db.delete([row.id] + [r.id for r in self.rows_to_confirm])
            self.rows_to_confirm = []
        data.write_conformation(self.collected_db, labelled, **labelled.info,
                                oracle_seconds=float(oracle_seconds))

    def wait_for(self, futures, **how):
        """Wait on the oracle (the trainer idles meanwhile; counted in wait_seconds)."""
        if all(f.done() for f in futures):
            return
        t0 = self.clock.now()
        self.clock.wait(futures, **how)
        self.stats["wait_seconds"] += self.clock.now() - t0

    def train(self):
        """Line 10: pay the owed updates, each on a minibatch of D with a D0 share."""
        if not self.updates_owed:
            return
        # every core for torch while no job is in flight (the synchronous loop,
        # --oracle_lag 0, trains only then)
        torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(self.args,
                                                                    pool_idle=not self.in_flight))
        while self.updates_owed:
            self.check_stop()
            loss = self.trainer.update(self.buffer.sample_batch(self.args.batch_size,
                                                                self.args.device, self.dtype))
            self.updates_owed -= 1
            if self.trainer.step % self.args.checkpoint_every == 0:
                self.save()
        torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(self.args))
        self.stats["loss"] = float(loss)     # read once: it waits for the device
        self.bar.set_postfix(added=self.stats["n_added"], jobs=len(self.in_flight),
                             failed=self.stats["n_failed"], loss=f"{self.stats['loss']:.2e}",
                             lr=f"{self.trainer.lr:.1e}")

    def check_progress(self):
        """Progress or stop: N oracle failures in a row, or no addition for a set time."""
        n_failed, limit = sum(self.failures_in_a_row.values()), self.args.max_consecutive_failures
        idle, max_idle = self.clock.now() - self.last_progress, \
            self.args.max_seconds_without_progress
        if (limit and n_failed >= limit) or (max_idle and idle > max_idle):
            reasons = "; ".join(f"{n} x {r}" for r, n in self.failures_in_a_row.most_common(3))
            why = f"the genuine oracle failed {n_failed} times in a row" if limit and \
                n_failed >= limit else f"nothing was added for {idle:.0f} s"
            permanent = any(oracle_pool.is_permanent(r) for r in self.failures_in_a_row)
            hint = ("check --oracle_method (method and basis) and the elements of --d0"
                    if permanent else "check --oracle_timeout, --psi4_memory, the Psi4 or "
                    "Dask workers, and the MMFF rejections (--surrogate_energy_threshold)")
            self.save()
            self.log({"event": "stopped", "why": why})
            raise Stalled(f"GOLF stopped: {why} ({reasons or 'no oracle failures'}); {hint}. "
                          f"The {self.stats['n_added']} conformations added are saved: fix "
                          "it and rerun with --resume")

    # ---- records ------------------------------------------------------------------------

    def log(self, record):
        elapsed = self.clock.now() - self.start_time
        record = {**record, **self.stats, "updates": self.trainer.step, "lr": self.trainer.lr,
                  "in_flight": len(self.in_flight), "step": self.step,
                  "elapsed_seconds": elapsed,
                  "wait_share": self.stats["wait_seconds"] / max(elapsed, 1e-9)}
        safe_io.append_jsonl(os.path.join(self.args.out_dir, "metrics.jsonl"), record)
        if record["event"] != "progress":
            tqdm.write(json.dumps(record))

    def save(self):
        """checkpoint.pt: the model, trainer and RNGs, and the loop (loop_state): everything a
        resumed run needs to go on as if it had not stopped. Written whole or not at all."""
        painn.save_checkpoint(self.model, os.path.join(self.args.out_dir, "checkpoint.pt"),
                              trainer=self.trainer.state_dict(), rng=rng_state(self.rng),
                              loop=self.loop_state(), args=vars(self.args))

    def loop_state(self):
        """The trajectories (each slot's start in D, its last MMFF energy, a conformation it
        waits to send), the optimizer's state of every slot, the step counter, the oracle
        jobs in flight (conformation, job number, step sent), the owed updates and counts.
        Tensors and plain values only: read back with torch.load(weights_only=True)."""
        def conf_state(conf):
            return None if conf is None else {
                "numbers": torch.as_tensor(np.asarray(conf.numbers, dtype=np.int64)),
                "positions": torch.as_tensor(np.asarray(conf.positions, dtype=np.float64)),
                "smiles": conf.smiles, "info": dict(conf.info)}
        return {"step": self.step, "submitting": self.submitting,
                "updates_owed": self.updates_owed, "stats": dict(self.stats),
                "failures_in_a_row": dict(self.failures_in_a_row),
                "slots": [{"d_index": s.d_index, "energy_mmff": s.energy_mmff,
                           "waiting": conf_state(s.waiting)} for s in self.slots],
                "optimizer": self.opt.state_dict(),
                "in_flight": [{"sent": sent, "job": job, "conf": conf_state(conf)}
                              for sent, job, conf in self.in_flight.values()]}

    def load_loop_state(self, loop):
        """Take back loop_state(): rebuild the slots and their optimizer, and send the jobs
        that were in flight again, in the same order with the same numbers (the oracle
        journal answers those that had finished)."""
        def conf_from(state):
            return None if state is None else data.Conformation(
                numbers=state["numbers"].numpy(), positions=state["positions"].numpy(),
                smiles=state["smiles"], info=state["info"])
        self.step, self.submitting = loop["step"], loop["submitting"]
        self.updates_owed = loop["updates_owed"]
        self.stats.update(loop["stats"])
        self.failures_in_a_row = collections.Counter(loop["failures_in_a_row"])
        self.slots = []
        for state in loop["slots"]:
            conf = self.start_conformation(state["d_index"])
            slot = Slot(state["d_index"], conf, oracles.MMFFSurrogate(conf))
            slot.energy_mmff, slot.waiting = state["energy_mmff"], conf_from(state["waiting"])
            self.slots.append(slot)
        self.build_optimizer()
        self.opt.load_state_dict(loop["optimizer"])
        self.refresh_atomic_numbers()
        for job in loop["in_flight"]:
            conf = conf_from(job["conf"])
            self.in_flight[self.pool.submit(conf, job["job"])] = (job["sent"], job["job"], conf)

    def resume(self):
        """After a stop or a kill: the last checkpoint (model, trainer, RNGs, the loop) and
        the conformations collected up to it; the rows collected.db got after it are
        confirmed or replaced as the replay adds them again (record)."""
        path = os.path.join(self.args.out_dir, "checkpoint.pt")
        collected_path = os.path.join(self.args.out_dir, "collected.db")
        collected = data.read_db(collected_path, "total", verbose=False)[0] \
            if os.path.exists(collected_path) and len(self.collected_db) else []
        ckpt = painn.read_checkpoint(path, self.args.device) if os.path.exists(path) else None
        loop = ckpt.get("loop") if ckpt else None
        n_kept = loop["stats"]["n_added"] if loop else len(collected)
        if n_kept > self.args.max_oracle_steps:   # K changed, or an older run doubled
            print(f"warning: {collected_path} holds {n_kept} conformations; K = "
                  f"{self.args.max_oracle_steps} of them are used", file=sys.stderr)
            n_kept, loop = self.args.max_oracle_steps, None
        # only a replay from the loop's checkpoint adds the later rows again; otherwise
        # they stay as they are, unused
        collected, self.rows_to_confirm = collected[:n_kept], collected[n_kept:] if loop else []
        for conf in collected:
            self.buffer.add(conf)
        self.stats["n_added"] = len(collected)
        if ckpt:
            self.model.load_state_dict(ckpt["model"]["state_dict"])
            self.trainer.load_state_dict(ckpt["trainer"])
            set_rng_state(self.rng, ckpt["rng"])
        if loop:
            self.load_loop_state(loop)
        else:
            # a checkpoint without the loop (K changed): the collected data and the model
            # go on, with new trajectories; the schedule spans K * U updates, never more
            self.updates_owed = max(0, min(len(collected) * self.args.utd_ratio,
                                           self.args.total_steps) - self.trainer.step)
        if ckpt:
            print(f"resumed: {len(collected)} conformations collected, {self.trainer.step} "
                  f"updates done, {self.updates_owed} owed, {len(self.in_flight)} oracle "
                  f"jobs sent again, {len(self.rows_to_confirm)} rows to confirm")


def main(argv=None):
    """Exit code: 0 done, 1 stalled, 2 bad input, 130 / 143 stopped by Ctrl-C / SIGTERM."""
    args = parse_args(argv)
    journal = args.oracle_journal or os.path.join(args.out_dir, "oracle_journal.sqlite")
    try:
        with safe_io.StopSignals(deferred=True) as stop:
            golf = run_golf(args, journal, stop)
    except (data.DataError, painn.CheckpointError, oracles.OracleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stalled as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except safe_io.Interrupted as stop:
        print(safe_io.stopped_line(
            stop, f"{args.out_dir}/checkpoint.pt holds the model, the trajectories and the "
                  "oracle jobs in flight; every finished label is in " + journal,
            safe_io.continue_command("--resume", None if argv is None else ["golf.py", *argv])),
            file=sys.stderr)
        return stop.exit_code
    print(f"done: {golf.stats['n_added']} conformations added "
          f"({args.out_dir}/collected.db), checkpoint {args.out_dir}/checkpoint.pt")
    return 0


def run_golf(args, journal, stop):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    d0, _ = data.read_db(args.d0, args.energy_kind, require_energy=True, require_forces=True)
    val = data.read_db(args.val_db, args.energy_kind, require_energy=True,
                       require_forces=True)[0] if args.val_db else []
    model = painn.load_checkpoint(args.load_baseline).to(args.device, getattr(torch, args.dtype))
    if args.dask_scheduler:      # fail fast, before any output exists
        oracle_pool.check_dask_scheduler(args.dask_scheduler)
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.resume and (os.path.exists(os.path.join(args.out_dir, "checkpoint.pt")) or
                            os.path.exists(os.path.join(args.out_dir, "collected.db"))):
        raise data.DataError(f"{args.out_dir} holds a GOLF run; pass --resume to continue it")
    torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(args))
    if args.compile:
        model.compile_network()
    with safe_io.output_lock(args.out_dir), \
            oracle_pool.make_oracle_pool(args, journal) as pool:
        golf = Golf(args, d0, model, pool, rng, stop=stop)
        if args.resume:
            golf.resume()
        golf.run()
    if val:
        errors = prediction_errors(model, val, args.batch_size, args.device, golf.trainer.dtype)
        golf.log({"event": "validation", "val_db": args.val_db, **errors})
    return golf


if __name__ == "__main__":
    sys.exit(main())
