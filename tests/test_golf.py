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
import oracles
import painn
from test_train_baseline import SMALL, teacher_labelled, write


class FakePool:
    """Labels every conformation at once: E = -n_atoms Hartree, F = 0. Records what was sent."""

    def __init__(self):
        self.submitted = []

    def submit(self, conf, conf_id, kind="gradient"):
        self.submitted.append(conf)
        future = Future()
        future.set_result(oracles.OracleResult(conf_id, True, energy=-float(conf.n_atoms),
                                               forces=np.zeros((conf.n_atoms, 3)), seconds=0.0))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class ScriptedSurrogate:
    """MMFF stand-in: the i-th surrogate built returns scripts[i] call by call, and keeps
    the positions it was asked about (call t sees s_t)."""
    scripts, built = [], []

    def __init__(self, conf):
        self.values = list(ScriptedSurrogate.scripts.pop(0))
        self.seen = []
        ScriptedSurrogate.built.append(self)

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
    monkeypatch.setattr(golf.oracles, "make_oracle_pool", lambda args: pool)
    monkeypatch.setattr(golf.oracles, "MMFFSurrogate", ScriptedSurrogate)
    ScriptedSurrogate.scripts, ScriptedSurrogate.built = [], []

    def run(*flags):
        golf.main(["--d0", d0, "--load_baseline", str(ckpt), "--out_dir", str(tmp_path / "golf"),
                   "--n_parallel", "1", "--batch_size", "4", "--checkpoint_every", "1000",
                   # Adam moves every step by ~lr, so no trajectory converges early
                   "--conf_opt", "adam", *flags])
    return run, pool, tmp_path / "golf"


def test_rise_sends_the_conformation_before_the_step(setup):
    run, pool, out = setup
    ScriptedSurrogate.scripts = [[10, 9, 8, 9.5],        # rises at step 3: s_2 is sent
                                 [10, 9, 8, 7, 6],       # reaches T = 4: s_4 is sent
                                 [10]]                   # the restart after K is reached
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
                                 [10]]
    run("--max_oracle_steps", "2", "--utd_ratio", "2", "--timelimit_train", "2")
    assert len(pool.submitted) == 2
    np.testing.assert_array_equal(pool.submitted[0].positions, ScriptedSurrogate.built[0].seen[0])
    np.testing.assert_array_equal(pool.submitted[1].positions, ScriptedSurrogate.built[2].seen[2])
    log = [l for l in open(out / "metrics.jsonl")]
    assert '"n_rise_at_start": 1' in log[-1] and '"n_rejected_mmff": 1' in log[-1]


def test_resume_keeps_collected_data_and_owed_updates(setup, monkeypatch):
    run, pool, out = setup
    ScriptedSurrogate.scripts = [[10, 9, 8]] * 10
    real_update = golf.Trainer.update

    def crash_at_update_4(self, confs):
        if self.step == 4:
            raise KeyboardInterrupt           # killed after 2 additions (2 x U=2 updates)
        return real_update(self, confs)
    monkeypatch.setattr(golf.Trainer, "update", crash_at_update_4)
    with pytest.raises(KeyboardInterrupt):
        run("--max_oracle_steps", "4", "--utd_ratio", "2", "--timelimit_train", "2",
            "--checkpoint_every", "2")
    n_sent_before = len(pool.submitted)
    assert len(data.read_db(str(out / "collected.db"), "total")[0]) == 3
    monkeypatch.setattr(golf.Trainer, "update", real_update)
    with pytest.raises(SystemExit, match="--resume"):
        run("--max_oracle_steps", "4", "--utd_ratio", "2", "--timelimit_train", "2")
    run("--max_oracle_steps", "4", "--utd_ratio", "2", "--timelimit_train", "2", "--resume")
    assert len(pool.submitted) - n_sent_before == 1          # only the 4th is computed
    assert len(data.read_db(str(out / "collected.db"), "total")[0]) == 4
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["step"] == 4 * 2


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
    with oracles.LocalOraclePool("gfn2-xtb", n_workers=1) as pool:
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
