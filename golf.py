"""Stage 3: GOLF, Algorithm 1 of Tsypin et al. (ICLR 2024), batched (--pipelined: pipelined).

    python golf.py --d0 D0.db --load_baseline runs/baseline/checkpoint.pt --out_dir runs/golf

Algorithm 1 (line numbers in the comments below):
     1  f <- f_baseline; D <- D0
     3  s_0 ~ D                                    every slot of the batch holds a trajectory
     5  s_{t+1} <- Opt(s_t, F(s_t))                one batched L-BFGS step of all slots
     6  E^S_{t+1} <- O_S(s_{t+1})                  MMFF energy of every new conformation
     7  if E^S_{t+1} > E^S_t or t = T:             the trajectory ends
     8      (E, F) <- O_G(s)                       s = s_t on a rise, s_{T} at the time limit
     9      D <- D + {(s, E, F)}
    10      update f U times on minibatches of D   (a share --initial_conf_pct from D0)
    12      s_0 ~ D                                the slot restarts; other slots go on
    18  until K conformations have been added

s_0 ~ D (lines 3, 12): uniform over D = D0 plus every conformation collected so far (the
replay buffer holds D). --start_from d0 draws from D0 only, as the official code does.

A slot whose trajectory ended submits its conformation and restarts at once. At most
--n_parallel jobs are in flight; a slot waits (inactive) when the pool is full. No more jobs
are submitted than are needed to reach K. By default (deterministic) the loop then waits
for every job in flight and adds the results in submission order before it trains or
optimizes again, so the same command gives the same collected.db and checkpoint whatever
the oracle's timing (an oracle timeout is the exception). --pipelined keeps optimizing and
training while jobs run, and adds each result whenever it arrives (faster with a slow
oracle, but the run depends on timing). Like the official code, the learning-rate schedule
spans K * U updates (--total_steps is train_baseline.py's).
"""
import argparse
import collections
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait

import numpy as np
import torch
from tqdm import tqdm

import data
import optimizers
import oracle_pool
import oracles
import painn
import safe_io
from train_baseline import (Trainer, add_model_args, add_training_args, prediction_errors,
                            rng_state, set_rng_state)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d0", required=True, help="the initial training data D0 (labelled ASE db)")
    p.add_argument("--out_dir", required=True,
                   help="checkpoint.pt, collected.db (the new data), metrics.jsonl")
    g = p.add_argument_group("GOLF (Table 5)")
    g.add_argument("--n_parallel", type=int, default=120,
                   help="concurrent trajectories, and the most oracle jobs in flight")
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
    g.add_argument("--pipelined", action="store_true",
                   help="optimize and train while oracle jobs run (faster with a slow oracle; "
                        "the run then depends on timing). Default: deterministic")
    g.add_argument("--val_db", default=None,
                   help="labelled db to report validation errors on at the end (the same one "
                        "train_baseline.py --val_db uses; GOLF never trains on it)")
    g.add_argument("--log_every", type=int, default=10, help="log metrics every N additions")
    g.add_argument("--max_consecutive_failures", type=int, default=50,
                   help="stop when the genuine oracle fails this many times in a row (0: never)")
    g.add_argument("--max_seconds_without_progress", type=float, default=3600.0,
                   help="stop when nothing was added for this long (0: never)")
    add_model_args(p)        # used only without --load_baseline
    add_training_args(p, total_steps=None)
    optimizers.add_optimizer_args(p)
    oracles.add_oracle_args(p)
    args = optimizers.parse_args_with_preset(p, argv)   # --optimizer_preset: Table 6
    if args.total_steps is not None:
        p.error(f"--total_steps is not a golf.py flag: GOLF trains U = --utd_ratio updates per "
                f"added conformation, and its schedule spans K * U "
                f"= {args.max_oracle_steps * args.utd_ratio}; set --max_oracle_steps and "
                "--utd_ratio instead")
    args.total_steps = args.max_oracle_steps * args.utd_ratio   # the schedule spans K * U
    return args


class Stalled(RuntimeError):
    """The run makes no progress (the oracle fails every job, or nothing is added): one line."""


class Slot:
    """One trajectory: where it started in D (d0_index < len(D0): a D0 row, else a collected
    conformation), its MMFF surrogate and its last MMFF energy."""

    def __init__(self, d0_index, conf, surrogate):
        self.d0_index, self.conf, self.surrogate = d0_index, conf, surrogate
        self.energy_mmff = surrogate.energy(conf.positions)   # E^S_0, kcal/mol
        self.waiting = None          # a conformation that ended, waiting for room in the pool


class Golf:
    """The state of a GOLF run: model, trainer, replay buffer, trajectories, oracle jobs."""

    def __init__(self, args, d0, model, pool, rng):
        self.args, self.d0, self.model, self.pool, self.rng = args, d0, model, pool, rng
        self.dtype = getattr(torch, args.dtype)
        self.trainer = Trainer(model, args, args.total_steps)
        self.buffer = data.ReplayBuffer(d0, args.initial_conf_pct, rng)
        self.updates_owed = 0        # U per added conformation, paid as training steps
        self.failures_in_a_row = collections.Counter()   # reason -> count, since the last addition
        self.last_progress = time.perf_counter()
        self.in_flight = {}          # future -> (slot's D0 index, the conformation sent)
        self.stats = dict(n_added=0, n_failed=0, n_rejected_mmff=0, n_rise_at_start=0,
                          n_submitted=0, wait_seconds=0.0, loss=float("nan"))
        self.collected_db = data.connect_for_writing(
            os.path.join(args.out_dir, "collected.db"), atomrefs=None, source="golf.py")
        self.slots, self.opt, self.z = [], None, None

    # ---- trajectories -------------------------------------------------------------------

    def sample_start(self):
        """Line 3 / 12: s_0 ~ D (uniform over D0 and the collected conformations; --start_from
        d0: D0 only), with its MMFF surrogate. Index i < len(D0) is a D0 row."""
        collected = self.buffer.collected if self.args.start_from == "d" else []
        while True:
            i = int(self.rng.integers(len(self.d0) + len(collected)))
            conf = self.d0[i] if i < len(self.d0) else collected[i - len(self.d0)]
            try:
                return Slot(i, conf, oracles.MMFFSurrogate(conf))
            except data.DataError as err:       # no MMFF parameters for this molecule
                tqdm.write(f"skipping {'D0 row' if i < len(self.d0) else 'collected'} "
                           f"{conf.id} as a start: {err}")

    def start_trajectories(self):
        self.slots = [self.sample_start() for _ in range(self.args.n_parallel)]
        positions = np.concatenate([s.conf.positions for s in self.slots])
        counts = torch.tensor([s.conf.n_atoms for s in self.slots])
        batch = torch.repeat_interleave(torch.arange(len(self.slots)), counts)
        self.opt = optimizers.optimizer_from_args(self.args, torch.as_tensor(positions), batch,
                                                  len(self.slots), model_dtype=self.dtype)
        self.refresh_atomic_numbers()

    def refresh_atomic_numbers(self):
        z = [torch.as_tensor(s.conf.numbers, device=self.args.device) for s in self.slots]
        self.z = self.opt.concat_slots(z)

    def restart(self, k):
        """Line 12: a new s_0 in slot k; the other slots are untouched."""
        self.slots[k] = self.sample_start()
        self.opt.replace(k, torch.tensor(self.slots[k].conf.positions))

    def energy_and_forces(self, positions):
        """The NNP on the whole batch of slots at once: [n_slots], [n_atoms, 3]."""
        positions = positions.to(self.args.device)
        energy, forces = self.model(self.z, positions, self.opt.batch.to(self.args.device),
                                    self.opt.n_slots)
        return energy.detach(), forces.detach()

    def optimization_step(self):
        """Lines 5-7 for every moving slot; ended trajectories go to `end_trajectory`."""
        self.model.eval()
        before = {k: self.opt.slot_positions(k).numpy().copy()
                  for k in range(len(self.slots)) if self.moving(k)}
        self.opt.step(self.energy_and_forces)                          # line 5
        for k, positions_before in before.items():
            slot = self.slots[k]
            positions = self.opt.slot_positions(k).numpy()
            energy_mmff = slot.surrogate.energy(positions)             # line 6
            t = int(self.opt.n_steps[k])
            if energy_mmff > slot.energy_mmff:                          # line 7: a rise
                # s_t is sent even for t = 0, as Algorithm 1 says (s_0 is a D0 conformation,
                # relabelled); skipping it can stall a poor f_baseline whose every first
                # step goes uphill
                self.stats["n_rise_at_start"] += t == 1
                self.end_trajectory(k, positions_before, slot.energy_mmff)
            elif t >= self.args.timelimit_train or bool(self.opt.converged[k]):
                self.end_trajectory(k, positions, energy_mmff)          # t = T: s_T is sent
            else:
                slot.energy_mmff = energy_mmff
        self.refresh_atomic_numbers()

    def moving(self, k):
        return bool(self.opt.active[k]) and not bool(self.opt.converged[k])

    def end_trajectory(self, k, positions, energy_mmff):
        """Line 8: send the conformation to the genuine oracle, unless MMFF calls it broken."""
        slot = self.slots[k]
        if energy_mmff > self.args.surrogate_energy_threshold:
            self.stats["n_rejected_mmff"] += 1
            self.restart(k)
            return
        from_d0 = slot.d0_index < len(self.d0)
        conf = data.Conformation(numbers=slot.conf.numbers, positions=positions.copy(),
                                 smiles=slot.conf.smiles,
                                 info={"d0_row": int(slot.conf.id or 0) if from_d0
                                       else int(slot.conf.info.get("d0_row", 0)),
                                       "start_collected": -1 if from_d0    # index in collected
                                       else slot.d0_index - len(self.d0),
                                       "trajectory_step": int(self.opt.n_steps[k])})
        slot.waiting = conf
        self.opt.deactivate(k)
        self.submit_waiting()

    def jobs_wanted(self):
        """Jobs the pool may take now: room in the pool, and no more than K needs."""
        needed = self.args.max_oracle_steps - self.stats["n_added"] - len(self.in_flight)
        return min(self.args.n_parallel - len(self.in_flight), needed)

    def submit_waiting(self):
        for k, slot in enumerate(self.slots):
            if slot.waiting is not None and self.jobs_wanted() > 0:
                future = self.pool.submit(slot.waiting, self.stats["n_submitted"])
                self.in_flight[future] = slot.waiting
                self.stats["n_submitted"] += 1
                self.restart(k)
        self.refresh_atomic_numbers()

    # ---- oracle results and training ---------------------------------------------------

    def harvest(self, timeout=0.0):
        """Lines 8-10 for every finished job: add the labelled conformation to D (and to
        collected.db at once), and owe U training updates for it."""
        if not self.in_flight:
            return
        t0 = time.perf_counter()
        if self.args.pipelined:
            done, _ = wait(list(self.in_flight), timeout=timeout, return_when=FIRST_COMPLETED)
        else:                               # deterministic: every job in flight
            done, _ = wait(list(self.in_flight))
        if timeout or not self.args.pipelined:
            self.stats["wait_seconds"] += time.perf_counter() - t0
        for future in [f for f in self.in_flight if f in done]:      # in submission order
            conf = self.in_flight.pop(future)
            result = future.result()
            if not result.ok:
                self.stats["n_failed"] += 1
                self.failures_in_a_row[result.reason[:120]] += 1
                self.log({"event": "oracle_failure", "reason": result.reason,
                          "seconds": result.seconds})
                continue
            self.failures_in_a_row.clear()
            self.last_progress = time.perf_counter()
            labelled = data.Conformation(numbers=conf.numbers, positions=conf.positions,
                                         energy=result.energy, forces=result.forces,
                                         smiles=conf.smiles, info=conf.info)
            data.write_conformation(self.collected_db, labelled, **conf.info,
                                    oracle_seconds=float(result.seconds))   # never lost
            self.buffer.add(labelled)                                          # line 9
            self.stats["n_added"] += 1
            self.updates_owed += self.args.utd_ratio                           # line 10
            self.bar.update(1)
            if self.stats["n_added"] % self.args.log_every == 0:
                self.log({"event": "progress"})

    def train(self, max_updates=None):
        """Line 10: pay owed updates, each on a minibatch with a D0 share."""
        n = self.updates_owed if max_updates is None else min(self.updates_owed, max_updates)
        # no oracle job in flight (always so here, unless --pipelined): torch takes every core
        torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(self.args,
                                                                    pool_idle=not self.in_flight))
        for _ in range(n):
            loss = self.trainer.update(self.buffer.sample_batch(self.args.batch_size,
                                                                self.args.device, self.dtype))
            self.updates_owed -= 1
            if self.trainer.step % self.args.checkpoint_every == 0:
                self.save()
        torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(self.args))
        if n:
            self.stats["loss"] = float(loss)     # read once: it waits for the device
        self.bar.set_postfix(added=self.stats["n_added"], jobs=len(self.in_flight),
                             failed=self.stats["n_failed"], loss=f"{self.stats['loss']:.2e}",
                             lr=f"{self.trainer.lr:.1e}")

    def check_progress(self):
        """Progress or stop: N oracle failures in a row, or no addition for a set time."""
        n_failed, limit = sum(self.failures_in_a_row.values()), self.args.max_consecutive_failures
        idle, max_idle = time.perf_counter() - self.last_progress, \
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

    # ---- the loop -----------------------------------------------------------------------

    def run(self):
        self.start_time = self.last_progress = time.perf_counter()
        self.bar = tqdm(total=self.args.max_oracle_steps, initial=self.stats["n_added"],
                        desc="GOLF: conformations added", dynamic_ncols=True)
        self.start_trajectories()
        while self.stats["n_added"] < self.args.max_oracle_steps or self.updates_owed:
            self.harvest()
            if self.updates_owed:
                # train U updates at a time, so trajectories and the pool keep moving
                self.train(max_updates=self.args.utd_ratio)
                continue
            if self.stats["n_added"] >= self.args.max_oracle_steps:
                break
            self.check_progress()
            self.submit_waiting()
            if any(self.moving(k) for k in range(len(self.slots))):
                self.optimization_step()
            elif self.in_flight:
                self.harvest(timeout=1.0)    # nothing to move or train: wait on the oracle
            else:
                raise RuntimeError("no trajectory can move and no oracle job is running")
        self.bar.close()
        for future in self.in_flight:        # K reached: jobs still running are not needed
            future.cancel()
        self.save()
        self.log({"event": "done"})

    def log(self, record):
        elapsed = time.perf_counter() - self.start_time
        record = {**record, **self.stats, "updates": self.trainer.step, "lr": self.trainer.lr,
                  "in_flight": len(self.in_flight), "elapsed_seconds": elapsed,
                  "wait_share": self.stats["wait_seconds"] / max(elapsed, 1e-9)}
        safe_io.append_jsonl(os.path.join(self.args.out_dir, "metrics.jsonl"), record)
        if record["event"] != "progress":
            tqdm.write(json.dumps(record))

    def save(self):
        painn.save_checkpoint(self.model, os.path.join(self.args.out_dir, "checkpoint.pt"),
                              trainer=self.trainer.state_dict(), rng=rng_state(self.rng),
                              args=vars(self.args))

    def resume(self):
        """After a kill: reload the collected data and the last checkpoint; owed updates are
        U per collected conformation minus the updates the checkpoint has done."""
        path = os.path.join(self.args.out_dir, "checkpoint.pt")
        collected_path = os.path.join(self.args.out_dir, "collected.db")
        collected = data.read_db(collected_path, "total", verbose=False)[0] \
            if os.path.exists(collected_path) and len(self.collected_db) else []
        if len(collected) > self.args.max_oracle_steps:   # K changed, or an older run doubled
            print(f"warning: {collected_path} holds {len(collected)} conformations; "
                  f"K = {self.args.max_oracle_steps} of them are used", file=sys.stderr)
            collected = collected[:self.args.max_oracle_steps]
        for conf in collected:
            self.buffer.add(conf)
        self.stats["n_added"] = len(collected)
        if os.path.exists(path):
            ckpt = painn.read_checkpoint(path, self.args.device)
            self.model.load_state_dict(ckpt["model"]["state_dict"])
            self.trainer.load_state_dict(ckpt["trainer"])
            set_rng_state(self.rng, ckpt["rng"])
        # the schedule spans K * U updates (total_steps), never more: the cosine lr must
        # not climb back
        self.updates_owed = max(0, min(len(collected) * self.args.utd_ratio,
                                       self.args.total_steps) - self.trainer.step)
        if collected or self.trainer.step:
            print(f"resumed: {len(collected)} conformations collected, {self.trainer.step} "
                  f"updates done, {self.updates_owed} owed")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if not args.load_baseline:
        sys.exit("error: --load_baseline is required: GOLF fine-tunes f_baseline "
                 "(train it with train_baseline.py)")
    d0, _ = data.read_db(args.d0, args.energy_kind, require_energy=True, require_forces=True)
    val = data.read_db(args.val_db, args.energy_kind, require_energy=True,
                       require_forces=True)[0] if args.val_db else []
    model = painn.load_checkpoint(args.load_baseline).to(args.device, getattr(torch, args.dtype))
    if args.dask_scheduler:      # fail fast, before any output exists
        oracle_pool.check_dask_scheduler(args.dask_scheduler)
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.resume and (os.path.exists(os.path.join(args.out_dir, "checkpoint.pt")) or
                            os.path.exists(os.path.join(args.out_dir, "collected.db"))):
        sys.exit(f"error: {args.out_dir} holds a GOLF run; pass --resume to continue it")
    torch.set_num_threads(oracle_pool.torch_threads_beside_the_pool(args))
    if args.compile:
        model.compile_network()
    with safe_io.output_lock(args.out_dir), oracle_pool.make_oracle_pool(args) as pool:
        golf = Golf(args, d0, model, pool, rng)
        if args.resume:
            golf.resume()
        golf.run()
    if val:
        errors = prediction_errors(model, val, args.batch_size, args.device, golf.trainer.dtype)
        golf.log({"event": "validation", "val_db": args.val_db, **errors})
    print(f"done: {golf.stats['n_added']} conformations added "
          f"({args.out_dir}/collected.db), checkpoint {args.out_dir}/checkpoint.pt")


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, painn.CheckpointError, oracles.OracleError, Stalled) as err:
        sys.exit(f"error: {err}")
