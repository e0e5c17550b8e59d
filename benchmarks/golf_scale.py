"""golf.py's loop at the paper's scale: K genuine labels from W oracle workers at ~590 s a
job (Sec. 6: 240 workers, K = 10,000), on a virtual clock, for each way the loop adds results.

    nice -n 10 .venv/bin/python benchmarks/golf_scale.py --workers 240 --max_oracle_steps 2000

The loop is golf.py's own (`golf.Golf.run`: real PaiNN, batched L-BFGS, MMFF surrogate,
replay buffer and training) with two things replaced:
  - the oracle pool: W simulated workers take the jobs in the order they are sent; a job's
    label is its MMFF94 energy and forces (in Hartree), and its duration is drawn from a
    seeded lognormal (mean --latency_mean, standard deviation --latency_spread x mean);
  - the clock: golf.py reads the time from, and waits on jobs through, a virtual clock.
    NNP work is charged on it at modeled GPU costs: --update_ms per update of the paper's
    U = --charged_utd_ratio per added conformation, whatever U the run itself uses
    (--utd_ratio, low to keep this cheap), and --step_ms per batched optimization step.
    A job's future completes when the clock passes its end.
Virtual times do not depend on this machine or its load; only the run's own wall time does.

For each mode it runs golf.py twice, with two latency seeds (different timings), and prints
    MODE: K=.. W=.. wall/ideal=.. floor=.. busy=..% wait=..% most_in_flight=.. identical=yes|no
wall: virtual seconds from the start to the last update; ideal = K x (mean latency of the
jobs run) / W; floor: the end of the same jobs all sent at time 0, first come first served,
over ideal (the last jobs' spread: ~1.3 at K = 2000, W = 240, ~1.05 at K = 10,000); busy:
the workers' share of W x wall spent on jobs; wait: the trainer's share
of wall spent waiting for the oracle; most_in_flight: most jobs sent and not yet added;
identical: both runs collected the same conformations and labels and trained the same
weights. Modes: default (golf.py's defaults), synchronous (--oracle_lag 0) and pipelined.
A second line per mode gives the hours, the steps, how many steps after it was sent a job
entered D on average, and the run's time on this machine.

`--dask_workers N` checks the simulation against a real cluster: the default loop runs
against a local Dask cluster of N workers with the GFN2-xTB oracle on the real clock, and
again against SimulatedPool (N workers, the same xTB labels, durations drawn like the real
jobs', the NNP charged the time it took in the real run). It prints `dask:` and `simulated:`
lines; same_as_simulated=yes when both added the same jobs at the same steps, collected the
same labels and trained the same weights:

    .venv/bin/python benchmarks/golf_scale.py --dask_workers 2 --max_oracle_steps 200 \
        --n_parallel 8 --molecules 20 --smiles data/moses_sample.smi

The toy world: D0 is 180 conformations of 60 small molecules (data/small_molecules.smi)
with MMFF labels; f_baseline a tiny PaiNN (16 features, 2 blocks, 8 RBF, 4 A cutoff, 8.5k
parameters) trained on it for a few seconds. Its L-BFGS trajectories are short: most end
on an MMFF rise within 1-3 steps (the paper's run longer, up to T = 100). Short
trajectories end many at a step, which flatters the synchronous loop (it waits once a
step for the slowest of them), and charge few steps per added conformation; `--golf_flags
"--conf_opt adam"` gives ~9-step trajectories, and a larger --step_ms charges more per step.
"""
import argparse
import concurrent.futures
import dataclasses
import heapq
import itertools
import math
import multiprocessing
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import golf  # noqa: E402
import oracle_pool  # noqa: E402
import oracles  # noqa: E402
import painn  # noqa: E402
from train_baseline import Trainer  # noqa: E402

SMILES = os.path.join(ROOT, "data", "small_molecules.smi")
MODEL = dict(n_atom_basis=16, n_interactions=2, n_rbf=8, cutoff=4.0)   # a tiny PaiNN
MODES = {"default": [], "synchronous": ["--oracle_lag", "0"], "pipelined": ["--pipelined"]}


class Killed(Exception):
    """The simulated kill -9 of golf.py at a virtual time: nothing is saved."""


class VirtualClock:
    """golf.py's clock (now, wait) on virtual seconds. Jobs of SimulatedPool complete when
    the clock passes their end; `advance` charges modeled compute. With `kill_at`, the
    clock raises Killed when it reaches that time (the jobs done by then completed)."""

    def __init__(self, start=0.0, kill_at=None):
        self.time, self.kill_at = start, kill_at
        self.ends = []               # heap of (end, seq, future, result)
        self.seq = itertools.count()

    def now(self):
        return self.time

    def schedule(self, future, end, result):
        heapq.heappush(self.ends, (end, next(self.seq), future, result))

    def advance(self, seconds):
        self.advance_to(self.time + seconds)

    def advance_to(self, time_):
        killed = self.kill_at is not None and time_ >= self.kill_at
        self.time = max(self.time, self.kill_at if killed else time_)
        while self.ends and self.ends[0][0] <= self.time:
            _, _, future, result = heapq.heappop(self.ends)
            if not future.cancelled():
                future.set_result(result)
        if killed:
            raise Killed(f"killed at {self.time:.0f} s")

    def wait(self, futures, timeout=None, return_when=concurrent.futures.ALL_COMPLETED):
        """Advance from job end to job end until the futures are done (all, or the first),
        or `timeout` passed. A future may be a journal's, done when its job's is."""
        limit = math.inf if timeout is None else self.time + timeout

        def waited():
            n_done = sum(f.done() for f in futures)
            return n_done == len(futures) or (
                n_done > 0 and return_when == concurrent.futures.FIRST_COMPLETED)
        while not waited() and self.ends and self.ends[0][0] <= limit:
            self.advance_to(self.ends[0][0])
        if not waited() and limit < math.inf:
            self.advance_to(limit)
        done = {f for f in futures if f.done()}
        return done, set(futures) - done


class SimulatedPool:
    """W workers on the virtual clock, jobs first come first served. A job's label is its
    MMFF94 energy and forces (Hartree, Hartree/Angstrom), or, with a `labeller` (a real
    oracle pool), that pool's result; its duration the n-th draw of a seeded lognormal
    (n: the order it was sent in)."""

    result_settings = oracle_pool.result_settings("mmff94 (simulated)")

    def __init__(self, n_workers, clock, latency_mean, latency_spread, seed, labeller=None):
        self.n_parallel = n_workers
        self.clock, self.labeller = clock, labeller
        self.free_at = [clock.now()] * n_workers     # heap: when each worker is free
        sigma = math.sqrt(math.log(1 + latency_spread ** 2))
        self.mu, self.sigma = math.log(latency_mean) - sigma ** 2 / 2, sigma
        self.rng = np.random.default_rng(seed)
        self.durations = []                          # of job number 0, 1, ...: drawn in order
        self.jobs = []                               # (start, end) of every job

    def duration(self, conf_id):
        """Job number conf_id's duration: the same when a resumed run sends it again."""
        while len(self.durations) <= conf_id:
            self.durations.append(float(self.rng.lognormal(self.mu, self.sigma)))
        return self.durations[conf_id]

    def close(self):
        pass

    def submit(self, conf, conf_id, kind="gradient"):
        duration = self.duration(conf_id)
        if self.labeller is not None:
            result = dataclasses.replace(self.labeller.submit(conf, conf_id, kind).result(),
                                         seconds=duration)
        else:
            surrogate = oracles.MMFFSurrogate(conf)
            flat = np.asarray(conf.positions, dtype=np.float64).ravel().tolist()
            forces = -np.array(surrogate.force_field.CalcGrad(flat)).reshape(-1, 3)
            result = oracle_pool.OracleResult(
                conf_id, True, energy=surrogate.energy(conf.positions) / data.HARTREE_TO_KCAL,
                forces=forces / data.HARTREE_TO_KCAL, seconds=duration)
        start = max(self.clock.now(), heapq.heappop(self.free_at))
        heapq.heappush(self.free_at, start + duration)
        self.jobs.append((start, start + duration))
        future = concurrent.futures.Future()
        self.clock.schedule(future, start + duration, result)
        return future

    def floor_seconds(self):
        """The end of the same jobs sent all at once at time 0 (first come first served):
        no loop that sends them in this order finishes sooner."""
        free_at = [0.0] * self.n_parallel
        for start, end in self.jobs:
            heapq.heappush(free_at, heapq.heappop(free_at) + end - start)
        return max(free_at)

    def busy_seconds(self, until):
        return sum(max(0.0, min(end, until) - min(start, until)) for start, end in self.jobs)


class TimedGolf(golf.Golf):
    """golf.Golf whose NNP work advances the virtual clock at modeled GPU costs, and which
    records the most jobs in flight and, for every job added, (step sent, step added)."""

    def __init__(self, *args, update_seconds, step_seconds, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_seconds, self.most_in_flight, self.added_at = step_seconds, 0, []
        self.n_optimization_steps, self.job_seconds = 0, []
        self.machine_seconds = {"update": 0.0, "step": 0.0}     # this machine's time
        update = self.trainer.update

        def timed_update(minibatch):
            self.clock.advance(update_seconds)
            t0 = time.perf_counter()
            loss = update(minibatch)
            self.machine_seconds["update"] += time.perf_counter() - t0
            return loss
        self.trainer.update = timed_update

    def optimization_step(self):
        self.clock.advance(self.step_seconds)
        self.n_optimization_steps += 1
        t0 = time.perf_counter()
        super().optimization_step()
        self.machine_seconds["step"] += time.perf_counter() - t0

    def submit_waiting(self):
        super().submit_waiting()
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))

    def add_result(self, future):
        self.added_at.append((self.in_flight[future][0], self.step))
        super().add_result(future)
        self.job_seconds.append(future.result().seconds)


class RealClock(golf.WallClock):
    """golf.py's own clock, for a run against a real pool: the NNP work takes its own time
    there, so TimedGolf's charges are nothing."""

    @staticmethod
    def advance(seconds):
        pass


# ---------------------------------------------------------------------------------------
# The toy world: D0 of small molecules labelled by MMFF, and a tiny f_baseline
# ---------------------------------------------------------------------------------------

def mmff_labelled(n_molecules, n_conformers, seed=0, noise=0.1, smiles_file=SMILES):
    """D0: ETKDG conformers of the first molecules of a SMILES file (data/small_molecules.smi),
    moved by 0.1 A noise, with MMFF94 energies and forces in Hartree."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem
    RDLogger.DisableLog("rdApp.*")
    rng = np.random.default_rng(seed)
    confs, n = [], 0
    for line in open(smiles_file):
        if line.startswith("#") or not line.strip() or n == n_molecules:
            continue
        smiles = line.split()[0]
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
            continue
        numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
        try:
            surrogate = oracles.MMFFSurrogate(data.Conformation(
                numbers, mol.GetConformer().GetPositions(), smiles=smiles))
        except data.DataError:
            continue
        n += 1
        for _ in range(n_conformers):
            positions = mol.GetConformer().GetPositions() + rng.normal(scale=noise,
                                                                       size=(len(numbers), 3))
            gradient = np.array(surrogate.force_field.CalcGrad(positions.ravel().tolist()))
            confs.append(data.Conformation(
                numbers, positions, surrogate.energy(positions) / data.HARTREE_TO_KCAL,
                -gradient.reshape(-1, 3) / data.HARTREE_TO_KCAL, smiles=smiles))
    return confs


def make_world(root, opts, labeller=None):
    """d0.db and baseline.pt (the tiny PaiNN trained on D0) under root. With a `labeller`
    (a real oracle pool), D0's labels are its results instead of MMFF's."""
    d0 = mmff_labelled(opts.molecules, opts.conformers, smiles_file=opts.smiles)
    if labeller is not None:
        futures = [labeller.submit(conf, i) for i, conf in enumerate(d0)]
        d0 = [dataclasses.replace(conf, energy=future.result().energy,
                                  forces=future.result().forces)
              for conf, future in zip(d0, futures) if future.result().ok]
    db = data.connect_for_writing(os.path.join(root, "d0.db"))
    for conf in d0:
        data.write_conformation(db, conf)
    torch.manual_seed(0)
    model = painn.PaiNN(**MODEL)
    args = golf.parse_args(["--d0", "-", "--out_dir", "-", "--load_baseline", "-",
                            "--lr", "3e-3", "--batch_size", str(opts.batch_size)])
    trainer = Trainer(model, args, opts.baseline_steps)
    buffer = data.ReplayBuffer(d0, 1.0, np.random.default_rng(0))
    for _ in range(opts.baseline_steps):
        trainer.update(buffer.sample_batch(opts.batch_size))
    painn.save_checkpoint(model, os.path.join(root, "baseline.pt"))
    return len(d0), sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# One golf.py run on the virtual clock
# ---------------------------------------------------------------------------------------

def golf_on(argv, pool, clock, update_seconds=0.0, step_seconds=0.0):
    """golf.py's main() with this pool and clock: returns the finished TimedGolf (its model
    trained, out_dir/collected.db written). With --resume in argv it goes on from the
    out_dir's checkpoint, as golf.py --resume does."""
    args = golf.parse_args(argv)
    torch.manual_seed(args.seed)                      # as golf.main
    rng = np.random.default_rng(args.seed)
    d0, _ = data.read_db(args.d0, args.energy_kind, require_energy=True, require_forces=True,
                         verbose=False)
    model = painn.load_checkpoint(args.load_baseline).to(args.device, getattr(torch, args.dtype))
    os.makedirs(args.out_dir, exist_ok=True)
    run = TimedGolf(args, d0, model, pool, rng, clock=clock, update_seconds=update_seconds,
                    step_seconds=step_seconds)
    if args.resume:
        run.resume()
    run.run()
    return run


class NumberedJournalledPool(oracle_pool.JournalledPool):
    """golf.py's journal, with the job number in each question: a resumed run's jobs are
    answered from it as in golf.py, while a conformation the loop sends twice costs two
    jobs, as in the runs without a journal that the kills are compared with (the toy
    world sends many D0 starts twice)."""

    def submit(self, conf, conf_id, kind="gradient"):
        message = oracle_pool.make_job(conf, conf_id, kind)
        message["charge"] += 1000 * (conf_id + 1)        # part of the key, never computed
        return self._submit(message, lambda: self.pool.submit(conf, conf_id, kind))


def run_with_kills(root, opts):
    """--kill_at: the default loop killed (kill -9: nothing saved) at each virtual time, and
    resumed at once with --resume: a new golf.py on a fresh pool of W idle workers (the
    jobs running at the kill are lost with it), the oracle journal kept on disk between
    them. Returns the last run, the (start, end) of every job of every run, the journal,
    and the jobs that were running at each kill."""
    name = "killed"
    argv = golf_argv(root, name, opts, ["--checkpoint_every", str(opts.checkpoint_every)])
    journal_path = os.path.join(root, name, "oracle_journal.sqlite")
    os.makedirs(os.path.join(root, name), exist_ok=True)
    kill_times = [float(t) * 3600 for t in opts.kill_at.split(",")] + [None]
    start, jobs, kills, n_done = 0.0, [], [], 0
    for kill_at in kill_times:
        clock = VirtualClock(start, kill_at)
        pool = SimulatedPool(opts.workers, clock, opts.latency_mean, opts.latency_spread,
                             int(opts.latency_seeds.split(",")[0]))
        journal = oracle_pool.OracleJournal(journal_path)
        try:
            run = golf_on(argv + ["--resume"] * (start > 0),
                          NumberedJournalledPool(pool, journal), clock,
                          update_seconds=opts.update_ms / 1000 * opts.charged_utd_ratio
                          / opts.utd_ratio, step_seconds=opts.step_ms / 1000)
            break                                      # K reached before the next kill
        except Killed:
            n_done += sum(b <= clock.time for a, b in pool.jobs)
            kills.append(dict(at=clock.time,
                              running=[(a, b) for a, b in pool.jobs if a < clock.time < b],
                              # finished jobs whose label is not in the journal: lost
                              lost=n_done - len(journal)))
            start = clock.time
        finally:
            jobs += [(a, min(b, clock.time)) for a, b in pool.jobs if a < clock.time]
            journal.close()
    return run, jobs, journal_path, kills


def golf_on_virtual_clock(argv, workers, latency_seed, latency_mean=590.0, latency_spread=0.5,
                          update_seconds=0.025, step_seconds=0.03, labeller=None):
    """golf.py's main() with SimulatedPool and VirtualClock: the finished TimedGolf and
    the pool."""
    clock = VirtualClock()
    pool = SimulatedPool(workers, clock, latency_mean, latency_spread, latency_seed, labeller)
    return golf_on(argv, pool, clock, update_seconds, step_seconds), pool


def golf_argv(root, out_name, opts, extra=()):
    return ["--d0", os.path.join(root, "d0.db"), "--load_baseline",
            os.path.join(root, "baseline.pt"), "--out_dir", os.path.join(root, out_name),
            "--max_oracle_steps", str(opts.max_oracle_steps), "--utd_ratio", str(opts.utd_ratio),
            "--n_parallel", str(opts.n_parallel), "--timelimit_train", str(opts.timelimit_train),
            "--batch_size", str(opts.batch_size), "--lr", "1e-3", "--energy_kind", "total",
            "--checkpoint_every", str(10 ** 9), "--log_every", "100",
            "--max_seconds_without_progress", "0", "--lbfgs_history", str(opts.lbfgs_history),
            *opts.golf_flags.split(), *extra]


def run_mode(root, mode, latency_seed, opts):
    """One benchmark run (in a worker process): its numbers, its collected conformations
    (positions, energy, forces) and final weights."""
    sys.stdout = sys.stderr = open(os.devnull, "w")   # runs side by side: no bars, no logs
    torch.set_num_threads(1)
    oracle_pool.torch_threads_beside_the_pool = lambda args, pool_idle=False: 1
    out_dir = os.path.join(root, f"{mode}_{latency_seed}")
    extra = list(MODES[mode])
    if mode != "synchronous":
        extra += [] if opts.oracle_lag is None else ["--oracle_lag", str(opts.oracle_lag)]
        extra += [] if opts.max_jobs_in_flight is None else \
            ["--max_jobs_in_flight", str(opts.max_jobs_in_flight)]
    argv = golf_argv(root, f"{mode}_{latency_seed}", opts, extra)
    t0, cpu0 = time.perf_counter(), time.process_time()
    run, pool = golf_on_virtual_clock(
        argv, opts.workers, latency_seed, opts.latency_mean, opts.latency_spread,
        update_seconds=opts.update_ms / 1000 * opts.charged_utd_ratio / opts.utd_ratio,
        step_seconds=opts.step_ms / 1000)
    wall = run.clock.now()
    durations = [end - start for start, end in pool.jobs]
    collected, _ = data.read_db(os.path.join(out_dir, "collected.db"), "total", verbose=False)
    numbers = dict(wall=wall, ideal=opts.max_oracle_steps * np.mean(durations) / opts.workers,
                   floor=pool.floor_seconds(),
                   busy=pool.busy_seconds(wall) / (opts.workers * wall),
                   wait=run.stats["wait_seconds"] / wall, most_in_flight=run.most_in_flight,
                   steps=run.step, seconds=time.perf_counter() - t0,
                   cpu_seconds=time.process_time() - cpu0, lag=run.oracle_lag,
                   cap=run.max_jobs_in_flight, opt_steps=run.n_optimization_steps,
                   trajectory=np.mean([c.info["trajectory_step"] for c in collected]),
                   delay=np.mean([added - sent for sent, added in run.added_at]))
    return mode, latency_seed, numbers, labels_of(collected), run.model.state_dict()


def run_killed(root, opts):
    """--kill_at, in a worker process: the killed and resumed run's numbers, its collected
    labels and final weights."""
    sys.stdout = sys.stderr = open(os.devnull, "w")
    torch.set_num_threads(1)
    oracle_pool.torch_threads_beside_the_pool = lambda args, pool_idle=False: 1
    t0 = time.perf_counter()
    run, jobs, journal_path, kills = run_with_kills(root, opts)
    journal = oracle_pool.OracleJournal(journal_path)
    computed = journal.times_computed()        # per finished label: times it was computed
    journal.close()
    collected, _ = data.read_db(os.path.join(root, "killed", "collected.db"), "total",
                                verbose=False)
    numbers = dict(wall=run.clock.now(), busy=sum(end - start for start, end in jobs),
                   kills=kills, twice=sum(n > 1 for n in computed), labels=len(computed),
                   finished=len(jobs) - sum(len(k["running"]) for k in kills),
                   seconds=time.perf_counter() - t0)
    return numbers, labels_of(collected), run.model.state_dict()


def labels_of(collected):
    """(positions, energy, forces) of each collected conformation: what `same` compares."""
    return [(c.positions, c.energy, c.forces) for c in collected]


def same(a, b):
    (labels_a, weights_a), (labels_b, weights_b) = a, b
    return len(labels_a) == len(labels_b) and all(
        np.array_equal(pa, pb) and ea == eb and np.array_equal(fa, fb)
        for (pa, ea, fa), (pb, eb, fb) in zip(labels_a, labels_b)) and \
        all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def kill_check(opts):
    """--kill_at: the default loop killed and resumed, beside the same run never killed.
    Prints the lost finished labels (goal 0), the labels computed twice (goal 0), the jobs
    running at each kill (whose work is done again: the bound), wall/ideal, and whether the
    resumed run collected the same labels and trained the same weights."""
    t0 = time.perf_counter()
    seed = int(opts.latency_seeds.split(",")[0])
    with tempfile.TemporaryDirectory() as root:
        make_world(root, opts)
        with multiprocessing.get_context("fork").Pool(2) as workers:
            whole = workers.apply_async(run_mode, (root, "default", seed, opts))
            killed = workers.apply_async(run_killed, (root, opts))
            _, _, ref, ref_labels, ref_weights = whole.get()
            n, labels, weights = killed.get()
    ideal = ref["ideal"]
    identical = same((labels, weights), (ref_labels, ref_weights))
    running = [len(k["running"]) for k in n["kills"]]
    redone = sum(k["at"] - a for k in n["kills"] for a, _ in k["running"])
    kill_hours = ",".join(f"{k['at'] / 3600:.2f}" for k in n["kills"])
    print(f"default: K={opts.max_oracle_steps} W={opts.workers} "
          f"wall/ideal={ref['wall'] / ideal:.2f} busy={100 * ref['busy']:.0f}% (never killed)")
    print(f"killed: K={opts.max_oracle_steps} W={opts.workers} kills={len(n['kills'])} at "
          f"{kill_hours} h "
          f"wall/ideal={n['wall'] / ideal:.2f} "
          f"lost_finished_labels={sum(k['lost'] for k in n['kills'])} "
          f"labels_computed_twice={n['twice']} running_at_kills={'+'.join(map(str, running))} "
          f"oracle_time_redone={redone / 3600:.1f} h (the running jobs' elapsed time) "
          f"identical={'yes' if identical else 'no'}")
    print(f"    {n['labels']} labels in the journal; checkpoint every {opts.checkpoint_every} "
          f"updates; {n['seconds']:.0f} s and {ref['seconds']:.0f} s on this machine; "
          f"benchmark {time.perf_counter() - t0:.0f} s", flush=True)
    return identical


def real_dask_check(opts):
    """--dask_workers N: golf.py's default loop twice on the same xTB-labelled toy world,
    once against a real local Dask cluster of N one-thread workers with the GFN2-xTB oracle
    on the real clock, once against SimulatedPool (N workers, xTB labels from a local pool,
    durations drawn like the real jobs', the NNP charged what it took in the real run) on
    the virtual clock. Prints one line for each, and whether both added the same jobs at the
    same steps and trained the same weights."""
    threads, rule = torch.get_num_threads(), oracle_pool.torch_threads_beside_the_pool
    torch.set_num_threads(1)       # the same torch arithmetic in both runs
    oracle_pool.torch_threads_beside_the_pool = lambda args, pool_idle=False: 1
    try:
        return compare_dask_and_simulated(opts)
    finally:
        torch.set_num_threads(threads)
        oracle_pool.torch_threads_beside_the_pool = rule


def compare_dask_and_simulated(opts):
    from dask.distributed import LocalCluster
    xtb = dict(method="gfn2-xtb", threads=1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, \
            oracle_pool.LocalOraclePool(n_workers=opts.dask_workers, **xtb) as labeller:
        n_d0, _ = make_world(root, opts, labeller)
        argv = golf_argv(root, "dask", opts, ["--oracle_method", "gfn2-xtb"])
        with LocalCluster(n_workers=opts.dask_workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                oracle_pool.DaskOraclePool(cluster.scheduler_address, **xtb) as pool:
            warm_up = [pool.submit(mmff_labelled(1, 1)[0], 0) for _ in range(4 * pool.n_parallel)]
            concurrent.futures.wait(warm_up)      # every Dask worker has started its engine
            start = time.perf_counter()
            real = golf_on(argv, pool, RealClock())
            wall = time.perf_counter() - start
        mean = float(np.mean(real.job_seconds))
        spread = float(np.std(real.job_seconds) / mean)
        update_seconds = real.machine_seconds["update"] / max(1, real.trainer.step)
        step_seconds = real.machine_seconds["step"] / max(1, real.n_optimization_steps)
        simulated, sim_pool = golf_on_virtual_clock(
            golf_argv(root, "simulated", opts, ["--oracle_method", "gfn2-xtb"]),
            opts.dask_workers, latency_seed=1, latency_mean=mean, latency_spread=spread,
            update_seconds=update_seconds, step_seconds=step_seconds, labeller=labeller)
        collected = [labels_of(data.read_db(os.path.join(root, name, "collected.db"), "total",
                                            verbose=False)[0]) for name in ("dask", "simulated")]
    identical = same((collected[0], real.model.state_dict()),
                     (collected[1], simulated.model.state_dict())) and \
        real.added_at == simulated.added_at
    k, w = opts.max_oracle_steps, opts.dask_workers
    sim_wall = simulated.clock.now()
    sim_ideal = k * np.mean([end - start for start, end in sim_pool.jobs]) / w
    print(f"D0: {n_d0} conformations of {opts.molecules} molecules of "
          f"{os.path.basename(opts.smiles)} labelled by GFN2-xTB; "
          f"jobs: GFN2-xTB gradients of {mean * 1000:.0f} ms +- {100 * spread:.0f} % in the "
          f"Dask workers' engines; {opts.n_parallel} trajectories, T = {opts.timelimit_train}, "
          f"U = {opts.utd_ratio}", flush=True)
    print(f"dask: K={k} W={w} wall/ideal={wall / (k * mean / w):.2f} "
          f"busy={100 * sum(real.job_seconds) / (w * wall):.0f}% "
          f"wait={100 * real.stats['wait_seconds'] / wall:.0f}% "
          f"most_in_flight={real.most_in_flight} same_as_simulated={'yes' if identical else 'no'}")
    print(f"simulated: K={k} W={w} wall/ideal={sim_wall / sim_ideal:.2f} "
          f"busy={100 * sim_pool.busy_seconds(sim_wall) / (w * sim_wall):.0f}% "
          f"wait={100 * simulated.stats['wait_seconds'] / sim_wall:.0f}% "
          f"most_in_flight={simulated.most_in_flight}")
    print(f"    real: wall {wall:.1f} s, {real.n_optimization_steps} optimization steps "
          f"({1000 * step_seconds:.0f} ms each), {real.trainer.step} updates "
          f"({1000 * update_seconds:.0f} ms each), "
          f"lag {real.oracle_lag}, cap {real.max_jobs_in_flight}; simulated wall "
          f"{sim_wall:.1f} s; benchmark {time.perf_counter() - t0:.0f} s", flush=True)
    return identical


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=240, help="W: oracle workers")
    p.add_argument("--max_oracle_steps", type=int, default=2000, help="K")
    p.add_argument("--modes", default="default,synchronous,pipelined",
                   help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--oracle_lag", type=int, default=None,
                   help="golf.py's --oracle_lag for the default and pipelined modes "
                        "(default: golf.py's)")
    p.add_argument("--max_jobs_in_flight", type=int, default=None,
                   help="golf.py's --max_jobs_in_flight (default: golf.py's)")
    p.add_argument("--latency_mean", type=float, default=590.0,
                   help="seconds a job takes on average (the paper's DFT: ~590 CPU-s)")
    p.add_argument("--latency_spread", type=float, default=0.5,
                   help="standard deviation of a job's duration / its mean")
    p.add_argument("--latency_seeds", default="1,2", help="two seeds: two timings")
    p.add_argument("--n_parallel", type=int, default=120, help="trajectories (Table 5)")
    p.add_argument("--timelimit_train", type=int, default=100, help="T (Table 5)")
    p.add_argument("--utd_ratio", type=int, default=1,
                   help="U the run trains with (low: this machine trains the tiny PaiNN)")
    p.add_argument("--charged_utd_ratio", type=int, default=50,
                   help="U whose cost the virtual clock is charged (Table 5: 50)")
    p.add_argument("--update_ms", type=float, default=25.0,
                   help="modeled GPU time of one update (batch 64, Table 5 PaiNN)")
    p.add_argument("--step_ms", type=float, default=30.0,
                   help="modeled GPU time of one batched L-BFGS step (up to 6 NNP calls)")
    p.add_argument("--batch_size", type=int, default=8, help="minibatch of the tiny PaiNN")
    p.add_argument("--lbfgs_history", type=int, default=10,
                   help="L-BFGS memory (Table 5: 100). The toy trajectories end within a few "
                        "steps (<= 5 pairs a step), and here the memory of 120 slots costs "
                        "CPU time only: the clock is charged --step_ms a step either way")
    p.add_argument("--molecules", type=int, default=60, help="molecules of D0")
    p.add_argument("--smiles", default=SMILES, help="D0's molecules: the first of this file")
    p.add_argument("--conformers", type=int, default=3, help="conformations of each in D0")
    p.add_argument("--baseline_steps", type=int, default=300,
                   help="updates that train f_baseline on D0")
    p.add_argument("--golf_flags", default="",
                   help="more golf.py flags for every run, e.g. '--conf_opt adam'")
    p.add_argument("--processes", type=int, default=2, help="runs at once")
    p.add_argument("--kill_at", default=None,
                   help="virtual hours, comma-separated (e.g. 0.5,1,1.5): instead, the default "
                        "loop killed (kill -9) at each and resumed with --resume, against the "
                        "same run never killed")
    p.add_argument("--checkpoint_every", type=int, default=100,
                   help="golf.py's --checkpoint_every in the --kill_at run (updates)")
    p.add_argument("--dask_workers", type=int, default=0,
                   help="N > 0: instead, the default loop against a real local Dask cluster "
                        "of N workers with the GFN2-xTB oracle, beside the simulated pool "
                        "(e.g. --dask_workers 2 --max_oracle_steps 200 --n_parallel 8)")
    opts = p.parse_args(argv)
    if opts.dask_workers > 0:
        return real_dask_check(opts)
    if opts.kill_at:
        return kill_check(opts)
    modes = opts.modes.split(",")
    seeds = [int(s) for s in opts.latency_seeds.split(",")]
    if any(m not in MODES for m in modes) or len(seeds) != 2:
        p.error(f"--modes takes {', '.join(MODES)}; --latency_seeds two seeds")
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        n_d0, n_params = make_world(root, opts)
        print(f"D0: {n_d0} MMFF-labelled conformations of {opts.molecules} small molecules; "
              f"f_baseline: PaiNN {MODEL}, {n_params} parameters; U = {opts.utd_ratio} run, "
              f"{opts.charged_utd_ratio} x {opts.update_ms:g} ms charged per conformation; "
              f"{opts.step_ms:g} ms per optimization step; {opts.n_parallel} trajectories, "
              f"T = {opts.timelimit_train}; jobs {opts.latency_mean:g} s "
              f"+- {100 * opts.latency_spread:g} % (lognormal)", flush=True)
        jobs = [(root, mode, seed, opts) for mode in modes for seed in seeds]
        with multiprocessing.get_context("fork").Pool(opts.processes) as workers:
            results = workers.starmap(run_mode, jobs)
    by_mode = {}
    for mode, seed, numbers, labels, weights in results:
        by_mode.setdefault(mode, []).append((numbers, (labels, weights)))
    for mode in modes:
        (n, a), (_, b) = by_mode[mode]
        name = mode if mode == "synchronous" or (opts.oracle_lag is None and
                                                  opts.max_jobs_in_flight is None) \
            else f"{mode}[lag={n['lag']},cap={n['cap']}]"
        print(f"{name}: K={opts.max_oracle_steps} W={opts.workers} "
              f"wall/ideal={n['wall'] / n['ideal']:.2f} floor={n['floor'] / n['ideal']:.2f} "
              f"busy={100 * n['busy']:.0f}% "
              f"wait={100 * n['wait']:.0f}% most_in_flight={n['most_in_flight']} "
              f"identical={'yes' if same(a, b) else 'no'}", flush=True)
        print(f"    wall {n['wall'] / 3600:.2f} h, ideal {n['ideal'] / 3600:.2f} h; "
              f"{n['opt_steps']} optimization steps (loop counter {n['steps']}), a job added "
              f"{n['delay']:.1f} steps after it was sent (lag {n['lag']}, cap {n['cap']}); "
              f"trajectories of the added conformations ended at step {n['trajectory']:.1f} "
              f"on average; {n['seconds']:.0f} s ({n['cpu_seconds']:.0f} s of CPU) on this machine",
              flush=True)
    print(f"benchmark wall time {time.perf_counter() - t0:.0f} s; load average "
          f"{load:.1f} -> {os.getloadavg()[0]:.1f} (virtual times do not depend on it)")


if __name__ == "__main__":
    main()
