"""train_baseline.py: Eq. 2 by hand, learning, skipped non-finite updates, resume equality."""
import argparse
import json

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

import data
import painn
import train_baseline

SMALL = dict(n_atom_basis=16, n_interactions=2, n_rbf=8, cutoff=4.0)


def teacher_labelled(smiles_list, n_conf, seed=0):
    """Conformations of small molecules labelled by a fixed random 'teacher' PaiNN: a
    smooth, exactly learnable potential, so learning can be checked without Psi4."""
    torch.manual_seed(123)
    teacher = painn.PaiNN(**SMALL, atomrefs={1: -0.5, 6: -37.8, 7: -54.5, 8: -75.0}).double()
    rng = np.random.default_rng(seed)
    confs = []
    for smi in smiles_list:
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.EmbedMolecule(mol, randomSeed=1)
        base = mol.GetConformer().GetPositions()
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
        for _ in range(n_conf):
            pos = base + rng.normal(scale=0.05, size=base.shape)
            b = data.collate([data.Conformation(z, pos)], dtype=torch.float64)
            e, f = teacher(b.z, b.positions, b.batch, 1)
            confs.append(data.Conformation(z, pos, e.item(), f.detach().numpy(), smiles=smi))
    return confs


def write(path, confs):
    db = data.connect_for_writing(str(path))
    for c in confs:
        data.write_conformation(db, c)
    return str(path)


def test_loss_is_eq2_by_hand():
    torch.manual_seed(0)
    model = painn.PaiNN(**SMALL, atomrefs={1: -0.5, 8: -75.0}).double()
    confs = teacher_labelled(["O", "OO"], 1)
    confs[0].energy += 0.3                         # make the errors large and distinct
    confs[1].forces = confs[1].forces + 0.2
    b = data.collate(confs, dtype=torch.float64)
    loss = train_baseline.energy_force_loss(model, b, 0.01, 0.99)
    by_hand = 0.0
    for c in confs:
        bb = data.collate([c], dtype=torch.float64)
        e, f = model(bb.z, bb.positions, bb.batch, 1)
        de = float(e) - c.energy
        df = ((f.detach().numpy() - c.forces) ** 2).sum() / c.n_atoms
        by_hand += (0.01 * de ** 2 + 0.99 * df) / 2
    assert float(loss) == pytest.approx(by_hand, rel=1e-10)


def run(tmp_path, db, *extra, expect=0):
    out = tmp_path / "run"
    argv = ["--db", db, "--out_dir", str(out), "--n_atom_basis", "16", "--n_interactions", "2",
            "--n_rbf", "8", "--cutoff", "4.0", "--batch_size", "8", "--lr", "3e-3",
            "--dtype", "float64", *extra]
    if "--val_db" not in extra and "--val_fraction" not in extra:
        argv += ["--val_fraction", "0.25"]
    assert train_baseline.main(argv) == expect      # 2: bad input, one line on stderr
    return out


def test_training_learns_and_logs(tmp_path):
    confs = teacher_labelled(["C", "CO", "CCO", "CN", "CC", "NCO", "OCO", "CCN"], 6)
    db = write(tmp_path / "d0.db", confs)
    torch.manual_seed(0)                        # the initial weights of the run (--seed 0)
    untrained = painn.PaiNN(**SMALL, atomrefs=data.fit_atomrefs(confs)).double()
    out = run(tmp_path, db, "--total_steps", "100", "--eval_every", "50", "--checkpoint_every", "50")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [50, 100]
    assert {"energy_mae_kcal_mol", "forces_mae_kcal_mol_A", "lr", "n_skipped"} <= set(records[0])
    model = painn.load_checkpoint(out / "checkpoint.pt")
    assert model.hparams == SMALL
    before = train_baseline.prediction_errors(untrained, confs, dtype=torch.float64)
    after = train_baseline.prediction_errors(model, confs, dtype=torch.float64)
    assert after["forces_mae_kcal_mol_A"] < 0.5 * before["forces_mae_kcal_mol_A"]
    assert after["energy_mae_kcal_mol"] < 0.5 * before["energy_mae_kcal_mol"]


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, capsys):
    db = write(tmp_path / "d0.db", teacher_labelled(["C", "CO", "CCO", "CN"], 4))
    flags = ["--total_steps", "20", "--eval_every", "100", "--checkpoint_every", "10"]
    whole = run(tmp_path / "a", db, *flags)

    real_update, calls = train_baseline.Trainer.update, []

    def crash_at_step_13(self, confs):       # the process dies after the step-10 checkpoint
        if self.step == 13:
            raise KeyboardInterrupt
        return real_update(self, confs)
    monkeypatch.setattr(train_baseline.Trainer, "update", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", db, *flags)
    monkeypatch.setattr(train_baseline.Trainer, "update", real_update)
    run(tmp_path / "b", db, *flags, expect=2)          # the checkpoint exists: one line
    assert "checkpoint.pt exists; pass --resume" in capsys.readouterr().err
    resumed = run(tmp_path / "b", db, *flags, "--resume")

    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]["state_dict"]
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)["model"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_skips_the_update():
    torch.manual_seed(0)
    model = painn.PaiNN(**SMALL, atomrefs={1: -0.5, 8: -75.0}).double()
    args = argparse.Namespace(lr=1e-3, lr_final=1e-7, dtype="float64", device="cpu",
                              energy_loss_coef=0.01, force_loss_coef=0.99, clip_value=1.0)
    trainer = train_baseline.Trainer(model, args, total_steps=10)
    confs = teacher_labelled(["O"], 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    confs[0].energy = float("nan")
    trainer.update(confs)
    assert trainer.n_skipped == 1 and trainer.step == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    confs[0].energy = confs[1].energy
    trainer.update(confs)
    assert trainer.n_skipped == 1
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_forces_is_one_clear_error(tmp_path, capsys):
    confs = teacher_labelled(["O"], 1)
    confs[0].forces = None
    db = write(tmp_path / "bad.db", confs)
    run(tmp_path, db, "--total_steps", "1", expect=2)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "no forces" in line


def test_val_db_validates_on_it_and_trains_on_all_of_db(tmp_path, capsys):
    train_confs = teacher_labelled(["C", "CO", "CCO", "CN"], 3)
    val_confs = teacher_labelled(["CC", "NCO"], 2, seed=1)
    db, val_db = write(tmp_path / "d0.db", train_confs), write(tmp_path / "val.db", val_confs)
    out = run(tmp_path, db, "--val_db", val_db, "--total_steps", "4", "--eval_every", "4")
    assert "12 training and 4 validation conformations" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    model = painn.load_checkpoint(out / "checkpoint.pt").double()
    expected = train_baseline.prediction_errors(model, data.read_db(val_db, verbose=False)[0],
                                                dtype=torch.float64)
    assert record["n_conformations"] == 4
    assert record["energy_mae_kcal_mol"] == pytest.approx(expected["energy_mae_kcal_mol"])


def test_update_on_device_tensors_equals_update_on_conformations():
    """train_baseline.main's minibatches (gathered from data.ConformationTensors) give the same
    losses and weights as collating the same conformations, step after step."""
    confs = teacher_labelled(["C", "CO", "CCO", "CN"], 3)
    args = argparse.Namespace(lr=3e-3, lr_final=1e-7, dtype="float64", device="cpu",
                              energy_loss_coef=0.01, force_loss_coef=0.99, clip_value=1.0)
    runs = []
    for on_device in (False, True):
        torch.manual_seed(0)
        model = painn.PaiNN(**SMALL, atomrefs=data.fit_atomrefs(confs)).double()
        trainer = train_baseline.Trainer(model, args, total_steps=6)
        sampler = data.Minibatches(len(confs), 5, np.random.default_rng(1))
        tensors = data.ConformationTensors(confs, "cpu", torch.float64)
        losses = []
        for _ in range(6):
            idx = sampler.next_indices()
            batch = tensors.gather(idx) if on_device else [confs[i] for i in idx]
            losses.append(float(trainer.update(batch)))
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_all_of_d0_is_trained_on_unless_val_fraction_holds_some_out(tmp_path, capsys):
    """The paper trains f_baseline on all of D0: no hold-out by default; --val_fraction 0.25
    holds out a quarter of the molecules (whole molecules, seeded) and validates on them."""
    confs = teacher_labelled(["C", "CO", "CCO", "CN"], 3)
    db = write(tmp_path / "d0.db", confs)
    out = run(tmp_path / "all", db, "--val_fraction", "0", "--total_steps", "2",
              "--eval_every", "1")
    assert "12 training and 0 validation conformations" in capsys.readouterr().out
    assert not (out / "metrics.jsonl").exists()            # nothing to validate on
    out = run(tmp_path / "held", db, "--val_fraction", "0.25", "--total_steps", "2",
              "--eval_every", "2")
    assert "9 training and 3 validation conformations" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert record["n_conformations"] == 3
    assert train_baseline.parse_args(["--db", db, "--out_dir", "x"]).val_fraction == 0.0
    assert train_baseline.main(["--db", db, "--out_dir", str(tmp_path / "both"), "--val_db",
                                db, "--val_fraction", "0.25"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --val_db and --val_fraction both "
                                               "validate; pass one of them")
