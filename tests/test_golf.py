"""golf.py, Algorithm 1. Control flow with a deterministic fake oracle and a scripted MMFF
surrogate (which conformation is sent, termination, K stop, U updates, resume); the same
path with real GFN2-xTB is test_golf_with_real_xtb, and with real Psi4
tests/test_pipeline.py."""
import json
from concurrent.futures import Future

import numpy as np
import pytest
import torch

import data
import golf
import oracle_pool
import oracles
import painn
from test_train_baseline import SMALL, teacher_labelled, write


REAL_MMFF = oracles.MMFFSurrogate


class FakePool:
    """Labels every conformation at once: E = -n_atoms Hartree, F = 0. Records what was sent.
    Runs one job at a time (n_parallel). Journalled like a real pool (JournalledPool)."""
    n_parallel = 1
    result_settings = oracle_pool.result_settings("fake")

    def __init__(self):
        self.submitted = []

    def submit(self, conf, conf_id, kind="gradient"):
        self.submitted.append(conf)
        future = Future()
        future.set_result(oracle_pool.OracleResult(conf_id, True, energy=-float(conf.n_atoms),
                                               forces=np.zeros((conf.n_atoms, 3)), seconds=0.0))
        return future

    def submit_job(self, message):
        return self.submit(data.Conformation(message["numbers"], message["positions"]),
                           message["conf_id"], message["kind"])

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class ScriptedSurrogate:
    """MMFF stand-in: the i-th surrogate built returns scripts[i] call by call, and keeps
    the positions it was asked about (call t sees s_t)."""
    scripts, built, confs = [], [], []

    def __init__(self, conf):
        self.values = list(ScriptedSurrogate.scripts.pop(0))
        self.seen = []
        ScriptedSurrogate.built.append(self)
        ScriptedSurrogate.confs.append(conf)

    def energy(self, positions):
        self.seen.append(np.array(positions))
        return self.values.pop(0)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    d0 = write(tmp_path / "d0.db", teacher_labelled(["CO", "CCO"], 2))
    torch.manual_seed(0)
    ckpt = tmp_path / "baseline.pt"
    painn.save_checkpoint(painn.PaiNN(**SMALL, atomrefs={1: -0.5, 6: -37.8, 8: -75.0}), ckpt)
    pool = FakePool()
    monkeypatch.setattr(golf.oracle_pool, "make_oracle_pool", lambda args, journal=None:
                        oracle_pool.JournalledPool(pool, oracle_pool.OracleJournal(journal)))
    monkeypatch.setattr(golf.oracles, "MMFFSurrogate", ScriptedSurrogate)
    ScriptedSurrogate.scripts, ScriptedSurrogate.built, ScriptedSurrogate.confs = [], [], []

    def run(*flags):
        return golf.main(["--d0", d0, "--load_baseline", str(ckpt), "--out_dir", str(tmp_path / "golf"),
                   "--n_parallel", "1", "--batch_size", "4", "--checkpoint_every", "1000",
                   # Adam moves every step by ~lr, so no trajectory converges early
                   "--conf_opt", "adam", *flags])   # a later --out_dir wins
    return run, pool, tmp_path / "golf"


def test_rise_sends_the_conformation_before_the_step(setup):
    run, pool, out = setup
    ScriptedSurrogate.scripts = [[10, 9, 8, 9.5],        # rises at step 3: s_2 is sent
                                 [10, 9, 8, 7, 6],       # reaches T = 4: s_4 is sent
                                 [10, 9, 8, 7, 6]]       # moves while the jobs are in flight
    run("--max_oracle_steps", "2", "--utd_ratio", "3", "--timelimit_train", "4")
    first, second = ScriptedSurrogate.built[:2]
    np.testing.assert_array_equal(pool.submitted[0].positions, first.seen[2])
    np.testing.assert_array_equal(pool.submitted[1].positions, second.seen[4])
    assert not np.array_equal(first.seen[2], first.seen[3])        # the step did move it
    collected, _ = data.read_db(str(out / "collected.db"), "total")
    assert len(collected) == 2                                      # K, then stop
    np.testing.assert_array_equal(collected[0].positions, first.seen[2])
    assert collected[0].energy == -collected[0].n_atoms
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["step"] == 2 * 3                         # U updates per addition


def test_rise_at_the_first_step_sends_s0_and_mmff_threshold_sends_nothing(setup):
    run, pool, out = setup
    ScriptedSurrogate.scripts = [[10, 11],                  # rise at step 1: s_0 is sent
                                 [400, 399, 398],           # ends at T = 2 above 300 kcal/mol
                                 [10, 9, 8],                # ends at T = 2: s_2 is sent
                                 [10, 9, 8]]                # waits: K needs no more jobs
    run("--max_oracle_steps", "2", "--utd_ratio", "2", "--timelimit_train", "2")
    assert len(pool.submitted) == 2
    np.testing.assert_array_equal(pool.submitted[0].positions, ScriptedSurrogate.built[0].seen[0])
    np.testing.assert_array_equal(pool.submitted[1].positions, ScriptedSurrogate.built[2].seen[2])
    log = [l for l in open(out / "metrics.jsonl")]
    assert '"n_rise_at_start": 1' in log[-1] and '"n_rejected_mmff": 1' in log[-1]


def golf_outputs(out):
    """collected.db's rows (positions, energy, forces, keys) and checkpoint.pt's model,
    trainer and loop, to compare two runs."""
    rows = [(c.positions, c.energy, c.forces,
             {k: v for k, v in c.info.items() if k != "oracle_seconds"})   # the oracle's clock
            for c in data.read_db(f"{out}/collected.db", "total", verbose=False)[0]]
    ckpt = torch.load(f"{out}/checkpoint.pt", weights_only=True)
    del ckpt["loop"]["stats"]["wait_seconds"]          # the oracle's clock, not the run
    return rows, {k: ckpt[k] for k in ("model", "trainer", "rng", "loop")}


def same_outputs(a, b):
    """Equal to the bit: nested dicts, lists, tensors, arrays and numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_outputs(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b or (a != a and b != b)          # nan == nan here


@pytest.mark.parametrize("stop", ["kill", "sigterm"])
def test_a_stopped_run_resumes_to_the_same_run_and_computes_no_label_twice(setup, monkeypatch,
                                                                           stop):
    """A kill (no save: the last periodic checkpoint) or a SIGTERM (saved at the signal)
    in the middle of training; the rerun with --resume replays from the checkpoint, the
    journal answers every job that had finished, and collected.db and checkpoint.pt end
    equal to those of a run that never stopped. The real MMFF surrogate: its energies are a
    function of the positions, so the replay sees what the first run saw."""
    import os
    import signal
    run, pool, out = setup
    monkeypatch.setattr(golf.oracles, "MMFFSurrogate", REAL_MMFF)
    flags = ["--max_oracle_steps", "6", "--utd_ratio", "2", "--timelimit_train", "3",
             "--n_parallel", "2", "--checkpoint_every", "3"]
    assert run(*flags, "--out_dir", f"{out}_whole") == 0
    whole = golf_outputs(f"{out}_whole")
    assert len(whole[0]) == 6 and whole[1]["trainer"]["step"] == 6 * 2

    pool.submitted = []
    real_update = golf.Trainer.update

    def stopped_at_update_7(self, confs):
        if self.step == 7:
            if stop == "kill":
                raise KeyboardInterrupt        # dies here: nothing saved
            os.kill(os.getpid(), signal.SIGTERM)   # golf.py stops at its next safe point
        return real_update(self, confs)
    monkeypatch.setattr(golf.Trainer, "update", stopped_at_update_7)
    if stop == "kill":
        with pytest.raises(KeyboardInterrupt):
            run(*flags)
    else:
        assert run(*flags) == 143
    n_rows = len(data.read_db(f"{out}/collected.db", "total")[0])
    assert n_rows >= 3                       # added before the stop, kept in collected.db
    monkeypatch.setattr(golf.Trainer, "update", real_update)
    assert run(*flags) == 2                  # the out_dir holds a run: --resume, or nothing
    assert run(*flags, "--resume") == 0
    assert same_outputs(golf_outputs(out), whole)
    sent = [c.positions.tobytes() for c in pool.submitted]
    assert len(sent) == len(set(sent))       # no conformation was labelled twice


def test_golf_with_real_xtb(tmp_path):
    """Algorithm 1 end to end with a genuine oracle, GFN2-xTB: D0 labelled by xTB, K = 6
    conformations added, each with xTB's energy and forces at exactly its positions."""
    from rdkit import Chem
    from rdkit.Chem import AllChem
    rng = np.random.default_rng(0)
    d0 = []
    for smiles in ("CO", "CCO", "CC(=O)N"):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        AllChem.EmbedMolecule(mol, randomSeed=1)
        numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
        for _ in range(2):
            positions = mol.GetConformer().GetPositions() + rng.normal(scale=0.03,
                                                                       size=(len(numbers), 3))
            energy, gradient = oracles.xtb_gradient("gfn2-xtb", numbers, positions, 0, 1, {})
            d0.append(data.Conformation(numbers, positions, energy,
                                        -gradient / data.BOHR_TO_ANGSTROM, smiles=smiles))
    d0_path = write(tmp_path / "d0.db", d0)
    with oracle_pool.LocalOraclePool("gfn2-xtb", n_workers=1) as pool:
        atomrefs = oracles.isolated_atom_energies(pool, [1, 6, 7, 8])
    torch.manual_seed(0)
    ckpt = tmp_path / "baseline.pt"
    painn.save_checkpoint(painn.PaiNN(**SMALL, atomrefs=atomrefs), ckpt)
    out = tmp_path / "golf"
    golf.main(["--d0", d0_path, "--load_baseline", str(ckpt), "--out_dir", str(out),
               "--max_oracle_steps", "6", "--utd_ratio", "2", "--timelimit_train", "5",
               "--n_parallel", "2", "--batch_size", "4", "--checkpoint_every", "1000",
               "--oracle_method", "gfn2-xtb", "--n_workers", "1"])
    collected, _ = data.read_db(str(out / "collected.db"), "total")
    assert len(collected) == 6
    for conf in collected:
        energy, gradient = oracles.xtb_gradient("gfn2-xtb", conf.numbers, conf.positions, 0,
                                                1, {})
        assert conf.energy == pytest.approx(energy, abs=1e-9)
        np.testing.assert_allclose(conf.forces, -gradient / data.BOHR_TO_ANGSTROM, atol=1e-8)
        assert conf.info["trajectory_step"] >= 1
        assert not any(np.array_equal(conf.positions, c.positions) for c in d0) or \
            conf.info["trajectory_step"] == 1          # s_0 is sent only on a rise at step 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["step"] == 6 * 2
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert log[-1]["event"] == "done" and log[-1]["n_added"] == 6
def test_start_from_d_draws_collected_conformations_and_d0_does_not(setup):
    run, pool, out = setup
    d0_positions = [c.positions for c in data.read_db(str(out.parent / "d0.db"), "total")[0]]

    def starts_from_collected():
        n = 0
        for surrogate, conf in zip(ScriptedSurrogate.built, ScriptedSurrogate.confs):
            in_d0 = any(np.array_equal(conf.positions, p) for p in d0_positions)
            sent = any(np.array_equal(conf.positions, c.positions) for c in pool.submitted)
            assert in_d0 or sent                        # every start is in D
            n += not in_d0
        return n

    ScriptedSurrogate.scripts = [[10, 9, 8]] * 40          # every trajectory ends at T = 2
    run("--max_oracle_steps", "12", "--utd_ratio", "1", "--timelimit_train", "2")
    assert starts_from_collected() > 0                     # D = D0 + collected (lines 3, 12)
    collected, _ = data.read_db(str(out / "collected.db"), "total")
    assert any(c.info["start_collected"] >= 0 for c in collected)
    assert all(c.info["start_collected"] == -1 for c in collected if c.info["trajectory_step"]
               and any(np.array_equal(c.positions, p) for p in d0_positions))

    ScriptedSurrogate.scripts, ScriptedSurrogate.built = [[10, 9, 8]] * 40, []
    ScriptedSurrogate.confs, pool.submitted = [], []
    run("--max_oracle_steps", "12", "--utd_ratio", "1", "--timelimit_train", "2",
        "--start_from", "d0", "--out_dir", str(out) + "_d0")
    assert starts_from_collected() == 0                    # the official code: D0 only


def test_total_steps_is_refused_not_silently_replaced(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")           # argparse's help: one usage line
    needed = ["--d0", "x.db", "--out_dir", "o", "--load_baseline", "b.pt"]
    with pytest.raises(SystemExit):
        golf.parse_args([*needed, "--total_steps", "100"])
    assert "unrecognized arguments: --total_steps" in capsys.readouterr().err
    for flag in ("--max_opt_steps", "--opt_coordinates"):   # GOLF's jobs are gradients
        with pytest.raises(SystemExit):
            golf.parse_args([*needed, flag, "1"])
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    args = golf.parse_args([*needed, "--max_oracle_steps", "7", "--utd_ratio", "3"])
    assert args.total_steps == 21 and args.start_from == "d" and not args.pipelined
    assert args.oracle_lag is None and args.max_jobs_in_flight is None   # from the pool
    assert not args.end_on_convergence
    with pytest.raises(SystemExit):                       # GOLF fine-tunes f_baseline
        golf.parse_args(needed[:4])
    assert "--load_baseline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        golf.parse_args(["--help"])
    help_text = capsys.readouterr().out
    # neither train_baseline's schedule length nor PaiNN's sizes (the checkpoint's) are flags
    assert "--total_steps" not in help_text and "--n_atom_basis" not in help_text
    assert help_text.count("--load_baseline LOAD_BASELINE") == 2    # usage, and its help


class SlowPool(FakePool):
    """FakePool whose results arrive after random delays (threads), in any order."""

    def __init__(self, seed):
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def submit(self, conf, conf_id, kind="gradient"):
        import threading
        done = FakePool.submit(self, conf, conf_id, kind)
        future = Future()
        threading.Timer(float(self.rng.uniform(0, 0.03)),
                        lambda: future.set_result(done.result())).start()
        return future


def test_deterministic_mode_does_not_depend_on_arrival_order(setup, monkeypatch):
    """(With --pipelined the same test fails: the run depends on when results arrive.)"""
    run, _, out = setup
    results = []
    for seed in (1, 2):                                    # two different arrival orders
        pool = SlowPool(seed)
        monkeypatch.setattr(golf.oracle_pool, "make_oracle_pool", lambda args, journal=None: pool)
        ScriptedSurrogate.scripts = [[10, 9, 8]] * 40
        run("--max_oracle_steps", "8", "--utd_ratio", "2", "--timelimit_train", "2",
            "--n_parallel", "3", "--out_dir", f"{out}_{seed}")
        collected, _ = data.read_db(f"{out}_{seed}/collected.db", "total")
        weights = torch.load(f"{out}_{seed}/checkpoint.pt", weights_only=True)["model"]
        results.append(([c.positions for c in collected], weights["state_dict"]))
    (pos_a, w_a), (pos_b, w_b) = results
    assert len(pos_a) == len(pos_b) == 8
    assert all(np.array_equal(a, b) for a, b in zip(pos_a, pos_b))
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_a_converged_trajectory_goes_on_to_T_unless_end_on_convergence(setup):
    """Algorithm 1, line 7: a trajectory ends on an MMFF rise or at t = T, never because
    the optimizer converged; --end_on_convergence (the official code) also ends it then."""
    run, pool, out = setup
    lbfgs = ["--conf_opt", "lbfgs", "--grad_threshold", "1e3"]   # converged after one step
    flags = ["--max_oracle_steps", "2", "--utd_ratio", "1", "--timelimit_train", "4", *lbfgs]
    ScriptedSurrogate.scripts = [[10, 9, 8, 7, 6]] * 20            # never a rise
    run(*flags)
    collected, _ = data.read_db(str(out / "collected.db"), "total")
    assert [c.info["trajectory_step"] for c in collected] == [4, 4]  # s_T, T = 4
    first = ScriptedSurrogate.built[0]
    np.testing.assert_array_equal(pool.submitted[0].positions, first.seen[4])

    ScriptedSurrogate.scripts, ScriptedSurrogate.built = [[10, 9, 8, 7, 6]] * 20, []
    pool.submitted = []
    run(*flags, "--end_on_convergence", "--out_dir", f"{out}_official")
    collected, _ = data.read_db(f"{out}_official/collected.db", "total")
    assert [c.info["trajectory_step"] for c in collected] == [1, 1]  # s_1, converged
    np.testing.assert_array_equal(pool.submitted[0].positions,
                                  ScriptedSurrogate.built[0].seen[1])


# ---------------------------------------------------------------------------------------
# The oracle jobs beside the NNP, on benchmarks/golf_scale.py's simulated pool: W workers,
# job durations from a seeded lognormal (~590 s) on a virtual clock, MMFF labels, and the
# real golf.Golf loop, MMFF surrogate and L-BFGS
# ---------------------------------------------------------------------------------------

@pytest.fixture
def simulated(tmp_path):
    from benchmarks import golf_scale
    d0 = write(tmp_path / "d0.db", golf_scale.mmff_labelled(3, 2))
    torch.manual_seed(0)
    ckpt = tmp_path / "baseline.pt"
    painn.save_checkpoint(painn.PaiNN(**SMALL), ckpt)

    def run(name, *flags, workers=8, latency_seed=1):
        argv = ["--d0", d0, "--load_baseline", str(ckpt), "--out_dir", str(tmp_path / name),
                "--n_parallel", "2", "--batch_size", "4", "--checkpoint_every", "1000",
                "--max_oracle_steps", "12", "--utd_ratio", "2", "--timelimit_train", "4",
                "--energy_kind", "total", *flags]          # MMFF energies: near zero
        golf_run, pool = golf_scale.golf_on_virtual_clock(argv, workers, latency_seed)
        collected, _ = data.read_db(str(tmp_path / name / "collected.db"), "total")
        return golf_run, pool, collected
    return run


def same_run(a, b):
    (run_a, _, collected_a), (run_b, _, collected_b) = a, b
    weights_a, weights_b = run_a.model.state_dict(), run_b.model.state_dict()
    return len(collected_a) == len(collected_b) and all(
        np.array_equal(x.positions, y.positions) and x.energy == y.energy and
        np.array_equal(x.forces, y.forces) for x, y in zip(collected_a, collected_b)) and \
        all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_default_loop_gives_the_same_run_whatever_the_oracle_timing(simulated):
    """Two latency seeds: the jobs finish in other orders at other times, yet the default
    loop collects the same conformations and trains the same weights; --pipelined does not."""
    runs = {seed: simulated(f"lagged_{seed}", latency_seed=seed) for seed in (1, 2)}
    ends = [[end for _, end in pool.jobs] for _, pool, _ in runs.values()]
    assert np.argsort(ends[0][:12]).tolist() != np.argsort(ends[1][:12]).tolist()
    assert len(runs[1][2]) == 12 and same_run(runs[1], runs[2])
    assert runs[1][0].trainer.step == 12 * 2
    pipelined = [simulated(f"pipelined_{seed}", "--pipelined", latency_seed=seed)
                 for seed in (1, 2)]
    assert not same_run(*pipelined)


def test_jobs_in_flight_follow_the_pool_not_the_trajectories(simulated):
    """2 trajectories, 8 workers: up to 5 x 8 jobs in flight (the default cap), or
    --max_jobs_in_flight; at the cap, the oldest job enters before a new one is sent
    (before its step t + L), in the order sent, whatever the timing."""
    run, _, collected = simulated("pool_sized")
    assert run.max_jobs_in_flight == golf.JOBS_PER_WORKER * 8 == 40
    assert 2 < run.most_in_flight <= 12                                    # K = 12
    capped = [simulated(f"capped_{seed}", "--max_jobs_in_flight", "3", latency_seed=seed)
              for seed in (1, 2)]
    run = capped[0][0]
    assert run.max_jobs_in_flight == run.most_in_flight == 3
    sent = [s for s, _ in run.added_at]
    assert sent == sorted(sent) and len(sent) == 12
    assert run.oracle_lag == 3 * 4 // 2                 # cap x T / n_parallel
    assert all(added <= s + run.oracle_lag for s, added in run.added_at)
    assert any(added < s + run.oracle_lag for s, added in run.added_at)
    assert same_run(*capped)


@pytest.mark.parametrize("lag", [0, 3, 40])
def test_a_job_sent_at_step_t_is_added_after_step_t_plus_L(simulated, lag):
    run, _, collected = simulated(f"lag_{lag}", "--oracle_lag", str(lag))
    assert len(run.added_at) == len(collected) == 12
    assert all(added == sent + lag for sent, added in run.added_at)
    assert run.trainer.step == 12 * 2


def test_default_loop_twice_with_real_xtb_gives_the_same_run(tmp_path):
    """The same command twice, GFN2-xTB with 2 workers (results arrive in any order): the
    same collected db (only oracle_seconds, a timing, may differ) and weights."""
    from rdkit import Chem
    from rdkit.Chem import AllChem
    d0 = []
    for smiles in ("CO", "CCO", "CC(=O)N"):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        AllChem.EmbedMolecule(mol, randomSeed=1)
        numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
        positions = mol.GetConformer().GetPositions()
        energy, gradient = oracles.xtb_gradient("gfn2-xtb", numbers, positions, 0, 1, {})
        d0.append(data.Conformation(numbers, positions, energy,
                                    -gradient / data.BOHR_TO_ANGSTROM, smiles=smiles))
    d0_path = write(tmp_path / "d0.db", d0)
    torch.manual_seed(0)
    ckpt = tmp_path / "baseline.pt"
    painn.save_checkpoint(painn.PaiNN(**SMALL, atomrefs={1: -0.4, 6: -1.8, 7: -2.6, 8: -3.9}),
                          ckpt)
    runs = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        golf.main(["--d0", d0_path, "--load_baseline", str(ckpt), "--out_dir", str(out),
                   "--max_oracle_steps", "8", "--utd_ratio", "2", "--timelimit_train", "5",
                   "--n_parallel", "3", "--batch_size", "4", "--checkpoint_every", "1000",
                   "--oracle_method", "gfn2-xtb", "--n_workers", "2"])
        collected, _ = data.read_db(str(out / "collected.db"), "total")
        runs.append((collected, torch.load(out / "checkpoint.pt", weights_only=True)))
    (a, ckpt_a), (b, ckpt_b) = runs
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.forces, y.forces)
        assert x.energy == y.energy
        assert {k: v for k, v in x.info.items() if k != "oracle_seconds"} == \
            {k: v for k, v in y.info.items() if k != "oracle_seconds"}
    weights_a, weights_b = ckpt_a["model"]["state_dict"], ckpt_b["model"]["state_dict"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert ckpt_a["trainer"]["step"] == 8 * 2


def test_a_real_dask_cluster_with_xtb_drives_the_loop_as_the_simulated_pool(capsys):
    """benchmarks/golf_scale.py --dask_workers 2: the default loop against a real local Dask
    cluster (GFN2-xTB, real clock) and against the simulated pool of the scale benchmark
    (the same xTB labels, other timings, virtual clock) adds the same jobs at the same steps
    and trains the same weights."""
    from benchmarks import golf_scale
    golf_scale.main(["--dask_workers", "2", "--max_oracle_steps", "16", "--n_parallel", "3",
                     "--molecules", "4", "--conformers", "2", "--baseline_steps", "20"])
    lines = capsys.readouterr().out.splitlines()
    dask = next(line for line in lines if line.startswith("dask: "))
    assert dask.startswith("dask: K=16 W=2 ") and dask.endswith(" same_as_simulated=yes")
    assert any(line.startswith("simulated: K=16 W=2 ") for line in lines)


class FailingPool(FakePool):
    """FakePool whose jobs fail in a pattern: every one, or every other one."""

    def __init__(self, every):
        super().__init__()
        self.every = every

    def submit(self, conf, conf_id, kind="gradient"):
        self.submitted.append(conf)
        future = Future()
        if len(self.submitted) % self.every == 0:
            future.set_result(oracle_pool.OracleResult(conf_id, False,
                                                       reason="timeout: no result within 1 s"))
        else:
            future.set_result(oracle_pool.OracleResult(
                conf_id, True, energy=-float(conf.n_atoms), forces=np.zeros((conf.n_atoms, 3))))
        return future


@pytest.mark.parametrize("k", [1, 4, pytest.param(100, marks=pytest.mark.soak)])
@pytest.mark.parametrize("every", [1, 2])
def test_oracle_failures_never_end_in_a_traceback(setup, monkeypatch, capsys, k, every):
    """Every job failing: the loop sends new ones until --max_consecutive_failures in a row,
    then stops with one line (exit 1); every other job failing: it reaches K (exit 0)."""
    run, _, out = setup
    monkeypatch.setattr(golf.oracles, "MMFFSurrogate", REAL_MMFF)
    pool = FailingPool(every)
    monkeypatch.setattr(golf.oracle_pool, "make_oracle_pool", lambda args, journal=None: pool)
    rc = run("--max_oracle_steps", str(k), "--utd_ratio", "1", "--timelimit_train", "2",
             "--n_parallel", "3", "--max_consecutive_failures", "5", "--out_dir", f"{out}_{k}")
    err = capsys.readouterr().err.strip().splitlines()
    if every == 1:
        assert rc == 1 and len(pool.submitted) >= 5          # some were still in flight
        assert err[-1].startswith("error: GOLF stopped: the genuine oracle failed 5 times in a "
                                  "row (5 x timeout: no result within 1 s)")
    else:
        assert rc == 0 and len(data.read_db(f"{out}_{k}/collected.db", "total")[0]) == k
