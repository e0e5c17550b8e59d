"""relax.py: the shipped f_GOLF-10k on a few small molecules, end to end; the quality check on
hand-made geometries; conformer selection; the genuine xTB check."""
import contextlib
import io
import json
import math
import os

import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from rdkit import Chem

import data
import make_trajectories
import molecule_files
import optimizers
import painn
import relax
import safe_io

# line 2 does not parse; Si is outside the model's elements; NH4+ is charged
SMILES = ("CCO ethanol\nC1CC broken_ring\nC[Si](C)(C)C tms\n[NH4+] ammonium\n"
          "CC(=O)O acetic_acid\n")
FAST = ["--batch_size", "4"]


def run(*argv):
    """relax.main -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = relax.main([*argv, *FAST])
    return status, out.getvalue(), err.getvalue()


def records(path):
    return [m for m in Chem.SDMolSupplier(str(path), removeHs=False)]


@pytest.fixture(scope="module")
def relaxed(tmp_path_factory):
    """One run on SMILES with the default checkpoint: (input, output, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("relax")
    smi, out = folder / "in.smi", folder / "out.sdf"
    smi.write_text(SMILES)
    status, stdout, stderr = run("--in", str(smi), "--out", str(out))
    assert status == 0, stderr
    return smi, out, stdout, stderr


def test_sdf_output_readable_with_properties(relaxed):
    smi, out, stdout, _ = relaxed
    mols = records(out)
    assert [m.GetProp("_Name") for m in mols] == ["ethanol", "acetic_acid"]
    assert [m.GetIntProp("input_index") for m in mols] == [0, 4]
    for m in mols:
        assert m.GetNumAtoms() == Chem.AddHs(Chem.MolFromSmiles(Chem.MolToSmiles(m))).GetNumAtoms()
        e_h, e_kcal = m.GetDoubleProp("nnp_energy_hartree"), m.GetDoubleProp("nnp_energy_kcal_mol")
        assert e_kcal == pytest.approx(e_h * data.HARTREE_TO_KCAL, rel=1e-12)
        assert m.GetIntProp("converged") == 1 and m.GetProp("flags") == "none"
        assert m.GetDoubleProp("max_force_eV_A") <= 0.05             # the default --fmax
        assert m.GetDoubleProp("nnp_energy_drop_kcal_mol") > 0       # ETKDG is not a minimum
        assert 0 < m.GetIntProp("steps") < 200
    # the relaxed geometry is the one whose energy is written: recompute it
    model = painn.load_checkpoint(relax.DEFAULT_CHECKPOINT)
    m = mols[0]
    z = torch.tensor([a.GetAtomicNum() for a in m.GetAtoms()])
    pos = torch.tensor(m.GetConformer().GetPositions(), dtype=torch.float32)
    energy, forces = model(z, pos, torch.zeros(len(z), dtype=torch.long), 1)
    written = m.GetDoubleProp("nnp_energy_hartree")
    assert float(energy[0].detach()) == pytest.approx(written, abs=2e-5)
    largest = float(torch.linalg.vector_norm(forces.detach(), dim=1).max()) * relax.HARTREE_TO_EV
    assert largest == pytest.approx(m.GetDoubleProp("max_force_eV_A"), abs=2e-3)
    assert "relaxed 2 conformations" in stdout and "input molecules skipped" in stdout


def test_bad_input_is_one_line_each_and_others_run(relaxed):
    smi, _, _, stderr = relaxed
    lines = stderr.splitlines()
    for where, why in ((2, "RDKit cannot parse SMILES 'C1CC'"),
                       (3, "element Si is outside the model's elements (H C N O F S Cl Br)"),
                       (4, "charge +1: the model knows neutral molecules only")):
        hits = [line for line in lines if f"{smi} line {where}:" in line]
        assert len(hits) == 1 and why in hits[0], stderr


def test_missing_input_and_bad_fmax_are_one_line(tmp_path):
    status, _, stderr = run("--in", str(tmp_path / "none.smi"), "--out", str(tmp_path / "o.sdf"))
    assert status == 2 and stderr.strip() == f"error: {tmp_path / 'none.smi'}: no such input file"
    assert not (tmp_path / "o.sdf").exists()
    status, _, stderr = run("--in", str(tmp_path / "none.smi"), "--out", str(tmp_path / "o.pdb"))
    assert status == 2 and stderr.strip().endswith("the extension says the format; use .sdf or .db")
    assert os.listdir(tmp_path) == []                  # no output, no lock file
    assert relax.force_threshold("0.05", "eV/A") == pytest.approx(0.05 / 27.211386, rel=1e-6)
    assert relax.force_threshold("1.2kcal/mol/A", "eV/A") == pytest.approx(1.2 / 627.509474)
    assert relax.force_threshold("0.05eV/A", "kcal/mol/A") == relax.force_threshold("0.05", "eV/A")
    assert relax.force_threshold("1e-3 Hartree/A", "eV/A") == pytest.approx(1e-3)
    with pytest.raises(data.DataError, match="--fmax 'fast'"):
        relax.force_threshold("fast", "eV/A")


def test_resume_skips_done_and_completes_a_cut_file(relaxed, tmp_path):
    smi, out, _, _ = relaxed
    full = out.read_text()
    status, stdout, _ = run("--in", str(smi), "--out", str(out))    # all done: nothing to do
    assert status == 0 and stdout.startswith("0 conformations of 0 molecules to relax, 2 done")
    assert out.read_text() == full
    # a run killed while writing the second record: the first whole, the second in part
    cut = tmp_path / "cut.sdf"
    first_end = full.index("$$$$\n") + 5
    cut.write_text(full[:first_end] + full[first_end:first_end + 300])
    status, stdout, stderr = run("--in", str(smi), "--out", str(cut))
    assert status == 0 and "cut a partial last record" in stderr
    assert stdout.startswith("1 conformations of 1 molecules to relax, 1 done")
    # the same conformations as the uninterrupted run: same records, same coordinates; the
    # energies agree to float32 rounding (the NNP sums atomic energies in float32, and the
    # sum's rounding depends on the other molecules of the batch)
    again, before = records(cut), records(out)
    assert [Chem.MolToMolBlock(m) for m in again] == [Chem.MolToMolBlock(m) for m in before]
    for a, b in zip(again, before):
        assert a.GetPropsAsDict().keys() == b.GetPropsAsDict().keys()
        for key, value in b.GetPropsAsDict().items():
            assert a.GetPropsAsDict()[key] == pytest.approx(value, abs=1e-3), key


def test_a_changed_input_is_refused_in_one_line(relaxed, tmp_path):
    """The output's molecule 4 (acetic acid) is another molecule in the changed input."""
    smi, out, _, _ = relaxed
    changed, copy = tmp_path / "changed.smi", tmp_path / "out.sdf"
    changed.write_text(smi.read_text().replace("CC(=O)O acetic_acid", "CCCO propanol"))
    copy.write_text(out.read_text())
    status, _, stderr = run("--in", str(changed), "--out", str(copy))
    assert status == 2 and stderr.splitlines()[-1] == (
        f"error: {copy}: input molecule 4 has other atoms than when this output was "
        "written: the input changed; write to another --out")


def test_quality_flags_on_hand_made_geometries():
    numbers, (start,) = make_trajectories.embed("CCO", 1, 0)          # C C O H H H H H H
    assert relax.quality_flags(numbers, start, start) == []
    stretched = start.copy()
    stretched[2] += 1.0 * (start[2] - start[1]) / np.linalg.norm(start[2] - start[1])
    assert relax.quality_flags(numbers, start, stretched)[0].startswith("bond_broken:2-3 2.")
    flown = start.copy()
    flown[5] += 10.0                                                 # an H of C1, far away
    flags = relax.quality_flags(numbers, start, flown)
    assert flags[0].startswith("bond_broken:1-6") and flags[1] == "flown_off:H6"
    nan = start.copy()
    nan[0, 0] = math.nan
    assert relax.quality_flags(numbers, start, nan) == ["non_finite"]
    # two H2 molecules on a line, 6 A apart, end with atoms 1 and 3 1.0 A apart: not bonded
    # (>= 1.25 * 0.62 = 0.775 A), but a clash (< 0.55 * (1.2 + 1.2) = 1.32 A); at 1.4 A neither
    h2 = np.array([[0, 0, 0], [-0.74, 0, 0], [6, 0, 0], [6.74, 0, 0]])
    close = h2.copy()
    close[2:, 0] -= 5.0
    assert relax.quality_flags([1] * 4, h2, close) == ["clash:1-3 1.00 A"]
    close[2:, 0] += 0.4
    assert relax.quality_flags([1] * 4, h2, close) == []
    close[2:, 0] -= 0.8                                      # 0.6 A: bonded, and a clash
    assert relax.quality_flags([1] * 4, h2, close) == ["bond_formed:1-3 0.60 A",
                                                       "clash:1-3 0.60 A"]


def test_an_exploding_optimizer_is_caught_retried_and_not_written(tmp_path):
    """SGD at rate 100 A^2/Hartree moves atoms by Angstroms a step: the molecule breaks. The
    retry (here uncapped too, --retry_max_step 1000) breaks again: failed, not written."""
    smi, out = tmp_path / "in.smi", tmp_path / "out.sdf"
    smi.write_text("CCO ethanol\n")
    status, stdout, _ = run("--in", str(smi), "--out", str(out), "--conf_opt", "sgd",
                            "--conf_opt_lr", "100", "--steps", "5", "--retry_max_step", "1000")
    assert status == 1                                  # nothing relaxed
    assert "failed (not written" in stdout and "retried with steps capped" in stdout
    assert not out.exists() or records(out) == []
    (failure,) = safe_io.read_jsonl(f"{out}.failed.jsonl")
    assert failure["input_index"] == 0 and failure["attempts"] == 2
    assert any(k in failure["reason"] for k in ("bond_broken", "flown_off", "non_finite"))
    assert failure["first_attempt"]
    assert failure["reason"] == failure["first_attempt"]   # a cap of 1000 A caps nothing
    # a retry capped at 0.05 A an update stays intact in its 5 steps: written, flagged as
    # not converged, never as converged
    status, stdout, _ = run("--in", str(smi), "--out", str(tmp_path / "capped.sdf"),
                            "--conf_opt", "sgd", "--conf_opt_lr", "100", "--steps", "5",
                            "--retry_max_step", "0.05")
    (m,) = records(tmp_path / "capped.sdf")
    assert m.GetIntProp("attempts") == 2 and m.GetIntProp("converged") == 0
    assert m.GetProp("flags").startswith("not_converged")
    # a rerun skips the failed one too
    status, stdout, _ = run("--in", str(smi), "--out", str(out), "--conf_opt", "sgd",
                            "--conf_opt_lr", "100", "--steps", "5", "--retry_max_step", "1000")
    assert stdout.startswith("0 conformations")


def test_select_conformers_keeps_lowest_and_drops_an_exact_duplicate():
    mol = molecule_files.Molecule(0, "x", "butane", None, [])
    embedded = make_trajectories.etkdg_molecule("CCCC", 6, 7)
    mol.numbers = np.array([a.GetAtomicNum() for a in embedded.GetAtoms()])
    mol.mol = Chem.AddHs(Chem.MolFromSmiles("CCCC"))
    confs = [c.GetPositions() for c in embedded.GetConformers()]
    # two distinct conformations (heavy-atom RMSD above 0.5 A), and a copy of the lowest
    rmsd = mol.heavy_atom_rmsd(confs[0], confs[1])
    far = next(i for i in range(1, 6)
               if mol.heavy_atom_rmsd(confs[0], confs[i]) > 0.5)
    assert mol.heavy_atom_rmsd(confs[0], confs[0]) == pytest.approx(0, abs=1e-6)
    assert rmsd == pytest.approx(mol.heavy_atom_rmsd(confs[1], confs[0]))

    def result(k, positions, energy):
        return relax.Result(relax.Task(mol, k, positions), positions, 0.0, energy, 0.0, 1, True)
    results = [result(0, confs[0], -2.0), result(1, confs[0].copy(), -1.9),
               result(2, confs[far], -1.0), result(3, confs[far] + 5.0, -0.5)]  # moved copy
    kept, n_dup = relax.select_conformers(results, 2, 0.5)
    assert [r.task.conformer for r in kept] == [0, 2] and n_dup == 1
    kept, n_dup = relax.select_conformers(results, 5, 0.5)
    assert [r.task.conformer for r in kept] == [0, 2] and n_dup == 2


def test_conformer_search_end_to_end_keeps_m_in_energy_order(tmp_path):
    smi, out = tmp_path / "in.smi", tmp_path / "best.sdf"
    smi.write_text("CCCCO butanol\n")
    status, stdout, _ = run("--in", str(smi), "--out", str(out), "--conformers", "4",
                            "--keep", "2")
    assert status == 0
    mols = records(out)
    assert 1 <= len(mols) <= 2 and [m.GetIntProp("energy_rank") for m in mols] == \
        list(range(1, len(mols) + 1))
    energies = [m.GetDoubleProp("nnp_energy_hartree") for m in mols]
    assert energies == sorted(energies)
    assert "--keep 2:" in stdout
    before = out.read_text()                     # a rerun: the molecule is done as a whole
    status, stdout, _ = run("--in", str(smi), "--out", str(out), "--conformers", "4",
                            "--keep", "2")
    assert status == 0 and stdout.startswith("0 conformations") and out.read_text() == before


def test_a_second_writer_is_one_line(tmp_path):
    smi, out = tmp_path / "in.smi", tmp_path / "out.sdf"
    smi.write_text("CCO ethanol\n")
    with safe_io.output_lock(str(out)):
        status, _, stderr = run("--in", str(smi), "--out", str(out))
    assert status == 2 and stderr.strip().startswith(f"error: {out} is being written by "
                                                     "another process (PID")


def test_xyz_in_db_out_charge_from_the_frame(tmp_path):
    numbers, confs = make_trajectories.embed("CC=O", 2, 3)
    frames = [Atoms(numbers, confs[0], info={"name": "acetaldehyde"}),
              Atoms(numbers, confs[1], info={"charge": 1}),
              Atoms(numbers, confs[1])]
    xyz, out = tmp_path / "in.xyz", tmp_path / "out.db"
    ase.io.write(xyz, frames, format="extxyz")
    status, stdout, stderr = run("--in", str(xyz), "--out", str(out))
    assert status == 0
    assert [line for line in stderr.splitlines() if "frame" in line] == [
        f"warning: {xyz} frame 2: charge +1: the model knows neutral molecules only; skipped"]
    rows = list(ase.db.connect(str(out)).select())
    assert [(r.input_index, r.conformer_index) for r in rows] == [(0, 0), (2, 0)]
    assert rows[0].name == "acetaldehyde" and rows[0].converged == 1
    assert list(rows[0].numbers) == list(numbers)
    assert rows[0].nnp_energy_kcal_mol == pytest.approx(
        rows[0].nnp_energy_hartree * data.HARTREE_TO_KCAL)


def test_per_slot_max_step_is_the_scalar_cap_slot_by_slot():
    """relax gives every slot its own cap (a tensor [n_slots] as optimizers' max_step): a
    capped slot follows the scalar-capped run, an uncapped (inf) one the uncapped run."""
    torch.manual_seed(0)
    x0 = torch.randn(7, 3, dtype=torch.float64) * 2
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    centre = torch.randn(7, 3, dtype=torch.float64)

    def ef(pos):                                   # E = sum |x - c|^4, a stiff well
        d = pos - centre
        e = torch.zeros(2, dtype=torch.float64).index_add(0, batch, (d ** 2).sum(1) ** 2)
        return e, -4 * (d ** 2).sum(1, keepdim=True) * d

    def run_opt(cap):
        opt = optimizers.make_optimizer("lbfgs", x0.clone(), batch, 2, max_step=cap)
        for _ in range(6):
            opt.step(ef)
        return [opt.slot_positions(k) for k in range(2)]
    mixed = optimizers.make_optimizer("lbfgs", x0.clone(), batch, 2)
    mixed.max_step = torch.tensor([0.1, math.inf], dtype=torch.float64)
    for _ in range(6):
        mixed.step(ef)
    capped, free = run_opt(0.1), run_opt(None)
    # (to rounding: torch computes scalar / tensor as tensor.reciprocal() * scalar)
    assert torch.allclose(mixed.slot_positions(0), capped[0], rtol=0, atol=1e-12)
    assert torch.equal(mixed.slot_positions(1), free[1])
    assert not torch.equal(capped[1], free[1])      # the cap matters in this well


def test_model_elements_of_the_official_and_our_checkpoints():
    official = painn.load_checkpoint(relax.DEFAULT_CHECKPOINT)
    assert painn.model_elements(official) == {1, 6, 7, 8, 9, 16, 17, 35}
    ours = painn.PaiNN(n_atom_basis=8, n_interactions=1, n_rbf=4,
                       atomrefs={1: -0.5, 6: -37.8, 8: -75.0})
    assert painn.model_elements(ours) == {1, 6, 8}


def test_check_with_xtb_reports_start_and_end_energies(tmp_path):
    smi, out = tmp_path / "in.smi", tmp_path / "out.sdf"
    smi.write_text("CCO ethanol\n")
    status, stdout, _ = run("--in", str(smi), "--out", str(out), "--check_with", "gfn2-xtb",
                            "--n_workers", "1")
    assert status == 0
    (m,) = records(out)
    start, end = m.GetDoubleProp("oracle_start_hartree"), m.GetDoubleProp("oracle_end_hartree")
    assert -12 < end < start < -11        # GFN2-xTB's ethanol is about -11.4 Hartree
    assert m.GetDoubleProp("oracle_drop_kcal_mol") == pytest.approx(
        (start - end) * data.HARTREE_TO_KCAL)
    assert "gfn2-xtb energy drop: mean" in stdout
    # both oracle results are journalled beside the output (oracle_pool.OracleJournal)
    journal = relax.oracle_pool.OracleJournal(str(tmp_path / "oracle_journal.sqlite"))
    assert len(journal) == 2
    journal.close()


def test_sdf_in_bad_record_one_line_implicit_hydrogens_added(tmp_path):
    from rdkit.Chem import AllChem
    ethanol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(ethanol, randomSeed=1)
    ethanol.SetProp("_Name", "ethanol")
    five = Chem.RWMol(Chem.MolFromSmiles("C"))           # a carbon with five hydrogens
    for _ in range(5):
        five.AddBond(0, five.AddAtom(Chem.Atom(1)), Chem.BondType.SINGLE)
    five.AddConformer(Chem.Conformer(6))
    acid = Chem.AddHs(Chem.MolFromSmiles("CC(=O)O"))
    AllChem.EmbedMolecule(acid, randomSeed=1)
    acid = Chem.RemoveHs(acid)                          # heavy atoms only: H left implicit
    acid.SetProp("_Name", "acetic_acid")
    blocks = [Chem.MolToMolBlock(ethanol), Chem.MolToMolBlock(five, kekulize=False),
              Chem.MolToMolBlock(acid)]
    sdf, out = tmp_path / "in.sdf", tmp_path / "out.sdf"
    sdf.write_text("".join(b + "$$$$\n" for b in blocks))
    status, _, stderr = run("--in", str(sdf), "--out", str(out))
    assert status == 0
    assert [line for line in stderr.splitlines() if "record" in line] == [
        f"note: {sdf} record 3: hydrogens the file leaves implicit were added (RDKit)",
        f"warning: {sdf} record 2: RDKit cannot read it (check its atoms, bonds and valences)"]
    mols = records(out)
    assert [m.GetProp("_Name") for m in mols] == ["ethanol", "acetic_acid"]
    assert mols[1].GetNumAtoms() == 8 and mols[1].GetIntProp("converged") == 1
    # the input's bonds are the output's
    canonical = Chem.MolToSmiles(Chem.MolFromSmiles("CC(=O)O"))
    assert Chem.MolToSmiles(Chem.RemoveHs(mols[1])) == canonical


def test_db_in_keeps_smiles_and_writes_oracle_labels(tmp_path):
    """An ASE db in, with --check_with: the output row is a labelled conformation of data.py's
    schema (xTB energy and forces at the relaxed geometry), its SMILES kept."""
    numbers, confs = make_trajectories.embed("CO", 1, 5)
    src = data.connect_for_writing(str(tmp_path / "in.db"))
    data.write_conformation(src, data.Conformation(numbers, confs[0], smiles="CO"), conf_id=7)
    out = tmp_path / "out.db"
    status, _, _ = run("--in", str(tmp_path / "in.db"), "--out", str(out),
                       "--check_with", "gfn2-xtb", "--n_workers", "1")
    assert status == 0
    (conf,), _ = data.read_db(str(out), "total", verbose=False)
    assert conf.smiles == "CO" and conf.forces.shape == (6, 3)
    assert conf.energy == pytest.approx(conf.info["oracle_end_hartree"])
    assert conf.info["oracle_end_hartree"] < conf.info["oracle_start_hartree"]


def test_sigterm_stops_with_one_line_and_a_rerun_goes_on(tmp_path, monkeypatch):
    """SIGTERM after the first result: exit 143, one `stopped by SIGTERM` line naming the
    command to go on; what was written stays, and the same command finishes the rest."""
    import signal
    smi, out = tmp_path / "in.smi", tmp_path / "out.sdf"
    smi.write_text("CCO ethanol\nCC(=O)O acetic_acid\nCOC dimethyl_ether\n")
    real = relax.relax_tasks

    def terminated_after_one(*args):
        for i, result in enumerate(real(*args)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield result
    monkeypatch.setattr(relax, "relax_tasks", terminated_after_one)
    status, _, stderr = run("--in", str(smi), "--out", str(out))
    assert status == 143
    (line,) = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert line.startswith(f"stopped by SIGTERM: every conformation written to {out} is kept")
    assert line.endswith(f"continue with: python relax.py --in {smi} --out {out} "
                         "--batch_size 4")
    assert len(records(out)) == 1
    monkeypatch.setattr(relax, "relax_tasks", real)
    status, stdout, _ = run("--in", str(smi), "--out", str(out))
    assert status == 0 and stdout.startswith("2 conformations of 2 molecules to relax, 1 done")
    assert [m.GetProp("_Name") for m in records(out)] == ["ethanol", "acetic_acid",
                                                          "dimethyl_ether"]
