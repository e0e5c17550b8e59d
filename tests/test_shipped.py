"""What the demo ships instead of making (models/laptop/README.md) is what it says it is:
data/moses_test60.db holds GFN2-xTB optima (checked with xTB itself, here), and
models/laptop/f_baseline.pt is a PaiNN that predicts xTB's forces on those molecules."""
import os

import numpy as np
import pytest
import torch

import data
import oracles
import painn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST60 = os.path.join(ROOT, "data", "moses_test60.db")
BASELINE = os.path.join(ROOT, "models", "laptop", "f_baseline.pt")
tblite = pytest.importorskip("tblite.interface")


def xtb(conf, positions):
    """GFN2-xTB energy (Hartree) and largest atomic gradient norm (Hartree/Bohr)."""
    energy, grad = oracles.xtb_gradient("gfn2-xtb", conf.numbers, positions,
                                        *oracles.charge_and_multiplicity(conf.numbers, conf.smiles),
                                        {})
    return energy, float(np.linalg.norm(grad, axis=1).max())


def test_the_shipped_test_db_holds_xtb_optima_of_its_starts():
    confs, _ = data.read_db(TEST60, verbose=False)
    assert len(confs) == 60 and all(c.info["converged"] for c in confs)
    assert all(17 <= c.n_atoms <= 35 for c in confs)
    for c in sorted(confs, key=lambda c: c.n_atoms)[:3]:          # the three smallest
        e_opt, g_opt = xtb(c, c.optimal_positions)
        assert abs(e_opt - c.optimal_energy) < 1e-6               # the label is xTB's
        assert g_opt < oracles.XTB_MAX_FORCE                      # a stationary point
        e0, _ = xtb(c, c.positions)
        assert abs(e0 - c.energy) < 1e-6 and e0 > e_opt            # s_0 above its optimum


def test_the_shipped_f_baseline_predicts_xtb_forces_on_held_out_molecules():
    model = painn.load_checkpoint(BASELINE)
    assert model.hparams == {"n_atom_basis": 64, "n_interactions": 3, "n_rbf": 50, "cutoff": 5.0}
    confs, _ = data.read_db(TEST60, verbose=False)
    b = data.collate(confs, "cpu", torch.float32)
    with torch.no_grad():
        energy, forces = model(b.z, b.positions, b.batch, b.n_molecules)
    f_ref = b.forces
    mae = float((forces - f_ref).abs().mean()) * data.HARTREE_TO_KCAL      # kcal/mol/A
    # 2.29 on its validation molecules; an untrained or wrong-unit model is far above
    assert mae < 4.0, mae                                                  # 2.52 measured
    e_ref = b.energy
    assert float((energy.double() - e_ref).abs().median()) * data.HARTREE_TO_KCAL < 20.0   # 10.3 measured


# models/official/ (its README.md): the 11 PaiNN checkpoints the GOLF authors published, each
# with the authors' config.json of its run: Table 2's nablaDFT rows and Table 3's SPICE rows.
OFFICIAL = os.path.join(ROOT, "models", "official")
OFFICIAL_NABLADFT = ["baseline-NNP", "traj-10k", "traj-100k", "traj-500k", "GOLF-1k", "GOLF-10k"]
OFFICIAL_SPICE = ["baseline-NNP-SPICE", "traj-10k-SPICE", "traj-100k-SPICE", "traj-220k-SPICE",
                  "GOLF-10k-SPICE"]


def test_models_official_holds_the_11_published_checkpoints_with_their_configs():
    """Every file the README lists is there, and nothing else; each checkpoint is a different
    set of weights with Table 5's sizes, which its config states too; the config's training
    db says nablaDFT or SPICE as the name does, and every run subtracted atomrefs."""
    import json
    names = OFFICIAL_NABLADFT + OFFICIAL_SPICE
    expected = {"LICENSE", "README.md"} | {f"{n}.NNP_checkpoint_actor" for n in names} \
        | {f"{n}.config.json" for n in names}
    assert set(os.listdir(OFFICIAL)) == expected
    with open(os.path.join(OFFICIAL, "LICENSE")) as f:
        assert f.read().startswith("MIT License")
    weights = []
    for name in names:
        path = os.path.join(OFFICIAL, f"{name}.NNP_checkpoint_actor")
        hparams, state = painn.from_official_state_dict(painn.read_checkpoint(path))
        assert hparams == {"n_atom_basis": 128, "n_interactions": 3, "n_rbf": 50, "cutoff": 5.0}
        with open(os.path.join(OFFICIAL, f"{name}.config.json")) as f:
            config = json.load(f)
        assert (config["n_atom_basis"], config["n_interactions"], config["n_rbf"],
                config["cutoff"], config["backbone"]) == (128, 3, 50, 5.0, "painn")
        assert config["subtract_atomization_energy"] is True
        assert ("spice" in config["db_path"].lower()) == (name in OFFICIAL_SPICE)
        assert painn.official_level(path)[0] == ("SPICE" if name in OFFICIAL_SPICE
                                                 else "nablaDFT")
        weights.append(state["embedding.weight"])
    for i in range(len(weights)):                      # 11 different models
        for j in range(i):
            assert not torch.equal(weights[i], weights[j]), (names[i], names[j])
