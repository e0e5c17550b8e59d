"""make_trajectories.py --spice: the paper's D0^SPICE / D_test^SPICE (App. E) from a small file
written here in SPICE's HDF5 layout (openmm/spice-dataset, downloader/README.md)."""
import contextlib
import io

import ase.db
import h5py
import numpy as np
import pytest

import data
import make_trajectories
import oracle_pool
import oracles

METHOD = "hf/sto-3g"
N_CONF = 50          # as SPICE's PubChem molecules: 25 high-energy (500 K MD), then 25 low
# name: (subset, mapped explicit-H SMILES, atomic numbers in map order). Map numbers are
# scrambled against the SMILES order, as SPICE's canonical ones often are.
MOLECULES = {
    "101": ("SPICE PubChem Set 1 Single Points Dataset v1.2", "[H:1][O:3][H:2]", [1, 1, 8]),
    "102": ("SPICE PubChem Set 1 Single Points Dataset v1.2",
            "[C:1]([H:2])([H:3])([H:4])[H:5]", [6, 1, 1, 1, 1]),
    "103": ("SPICE PubChem Set 1 Single Points Dataset v1.2",
            "[H:4][N:1]([H:2])[H:3]", [7, 1, 1, 1]),
    "104": ("SPICE PubChem Set 1 Single Points Dataset v1.2",
            "[C:2]([O:3][H:9])([H:7])([H:8])[C:1]([H:4])([H:5])[H:6]",
            [6, 6, 8, 1, 1, 1, 1, 1, 1]),
    "105": ("SPICE PubChem Set 1 Single Points Dataset v1.2",
            "[H:3][N+:1]([H:2])([H:4])[H:5]", [7, 1, 1, 1, 1]),
    "106": ("SPICE PubChem Set 1 Single Points Dataset v1.2",
            "[P:1]([H:2])([H:3])[H:4]", [15, 1, 1, 1]),                       # P: dropped
    "107": ("SPICE PubChem Set 1 Single Points Dataset v1.2",
            "[C:1]([I:2])([H:3])([H:4])[H:5]", [6, 53, 1, 1, 1]),             # I: dropped
    "108": ("SPICE DES370K Monomers Single Points Dataset v1.1",
            "[F:1][H:2]", [9, 1]),                                            # other subset
}


def water_label_in_bohr(positions_bohr):
    """Psi4's own energy (Hartree) and gradient (Hartree/Bohr) of water, atoms in the file's
    order (H, H, O), geometry given in Bohr: a real SPICE-layout label."""
    import psi4
    psi4.core.be_quiet()
    psi4.core.clean_options()            # Psi4's defaults, as the oracle workers use
    mol = psi4.core.Molecule.from_arrays(geom=positions_bohr, elez=[1, 1, 8], units="Bohr",
                                         fix_com=True, fix_orientation=True,
                                         fix_symmetry="c1", molecular_charge=0,
                                         molecular_multiplicity=1)
    gradient, wfn = psi4.gradient(METHOD, molecule=mol, return_wfn=True)
    psi4.core.clean()
    return wfn.energy(), np.array(gradient)


@pytest.fixture(scope="module")
def spice_file(tmp_path_factory):
    """The file, and the water label: (path, positions Bohr [3, 3], energy, gradient)."""
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("spice") / "SPICE-test.hdf5")
    water_bohr = np.array([[1.43, 1.10, 0.0], [-1.43, 1.10, 0.0], [0.0, 0.0, 0.0]])
    water_energy, water_gradient = water_label_in_bohr(water_bohr)
    with h5py.File(path, "w") as f:
        for name, (subset, smiles, numbers) in MOLECULES.items():
            g = f.create_group(name)
            g.create_dataset("subset", data=[subset], dtype=h5py.string_dtype())
            g.create_dataset("smiles", data=[smiles], dtype=h5py.string_dtype())
            g.create_dataset("atomic_numbers", data=np.array(numbers, dtype=np.int16))
            n = len(numbers)
            xyz = rng.normal(scale=2.0, size=(N_CONF, n, 3))
            # high-energy conformations 0-24 lie 0.05 Hartree above the low-energy ones
            energy = -100.0 + 0.05 * (np.arange(N_CONF) < 25) + 0.001 * rng.random(N_CONF)
            gradient = rng.normal(scale=0.01, size=(N_CONF, n, 3))
            if name == "101":
                xyz[7], energy[7], gradient[7] = water_bohr, water_energy, water_gradient
            g.create_dataset("conformations", data=xyz.astype(np.float32)).attrs["units"] = "bohr"
            g.create_dataset("dft_total_energy", data=energy)
            g.create_dataset("dft_total_gradient", data=gradient.astype(np.float32))
    return path, water_bohr, water_energy, water_gradient


def make(spice, tmp_path, *extra):
    out, out_test = str(tmp_path / "d0_spice.db"), str(tmp_path / "test_spice.db")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = make_trajectories.main(["--spice", spice, "--out", out, "--out_test", out_test,
                                     "--n_train_molecules", "2", "--n_test_molecules", "3",
                                     *extra])
    return rc, out, out_test, printed.getvalue()


def test_splits(spice_file, tmp_path):
    rc, out, out_test, printed = make(spice_file[0], tmp_path)
    assert rc == 0
    d0, test = ase.db.connect(out), ase.db.connect(out_test)
    train_names = {row.name for row in d0.select()}
    test_names = {row.name for row in test.select()}
    # 5 PubChem molecules without P or I: 2 for D0, the other 3 for the test set
    assert len(train_names) == 2 and len(test_names) == 3
    assert train_names | test_names == {f"spice:{n}" for n in ("101", "102", "103", "104", "105")}
    # D0: only the high-energy conformations 0-24, all of them
    assert d0.count() == 2 * 25
    assert {row.energy_level for row in d0.select()} == {"high"}
    assert max(row.spice_index for row in d0.select()) == 24
    # D_test: every molecule with as many high- as low-energy conformations
    for name in test_names:
        levels = [row.energy_level for row in test.select(name=name)]
        assert levels.count("high") == levels.count("low") == 25
    for db in (d0, test):
        assert db.metadata["method"] == data.SPICE_METHOD == "wB97M-D3BJ/def2-TZVPPD"
        assert "not nablaDFT" in db.metadata["level_note"]
        refs = db.metadata["atomrefs"]["energy"]
        assert refs[1] == -0.4987605100487531 and refs[15] == 0.0 and refs[53] == 0.0
    assert "2 with P or I dropped" in printed and "1 left out (other subset)" in printed
    assert "have the higher mean energy in 100.0% of 5 molecules" in printed
    # a rerun adds nothing; a capped test set keeps the balance
    rc, _, _, printed = make(spice_file[0], tmp_path)
    assert rc == 0 and ase.db.connect(out).count() == 50 and "0 rows written now" in printed
    rc, _, out_test, _ = make(spice_file[0], tmp_path / "capped", "--spice_test_conformations", "4")
    levels = [row.energy_level for row in ase.db.connect(out_test).select()]
    assert len(levels) == 3 * 4 and levels.count("high") == 6


def test_units_order_and_sign_against_our_oracle(spice_file, tmp_path):
    """Water's conformation 7 holds Psi4's label in SPICE's units (Bohr, Hartree/Bohr) and atom
    order (H, H, O). Read back (Angstrom, Hartree/Angstrom, our order O, H, H), it must be
    what our oracle computes at the converted positions."""
    path, water_bohr, water_energy, water_gradient = spice_file
    rc, out, out_test, _ = make(path, tmp_path)
    rows = [row for p in (out, out_test) for row in ase.db.connect(p).select(name="spice:101")]
    row = next(r for r in rows if r.spice_index == 7)
    assert row.smiles == "O" and list(row.numbers) == [8, 1, 1]
    assert np.allclose(row.positions, water_bohr[[2, 0, 1]] * 0.529177210903, atol=1e-6)
    assert row.data["energy"][0] == water_energy
    conf = data.Conformation(numbers=row.numbers, positions=row.positions, smiles=row.smiles)
    with oracle_pool.LocalOraclePool(METHOD, n_workers=1) as pool:
        result = pool.submit(conf, 0).result()
    assert result.ok
    assert result.energy == pytest.approx(water_energy, abs=1e-6)   # float32 positions
    assert np.allclose(row.data["forces"], result.forces, atol=1e-5)
    assert np.abs(result.forces).max() > 0.01                       # not a trivial zero
    oracles.rdkit_molecule(conf)        # the SMILES's atom order is the row's (MMFF works)


def test_charged_molecule_keeps_its_charge(spice_file, tmp_path):
    _, out, out_test, _ = make(spice_file[0], tmp_path)
    row = next(r for p in (out, out_test) for r in ase.db.connect(p).select(name="spice:105"))
    assert row.smiles == "[NH4+]" and list(row.numbers) == [7, 1, 1, 1, 1]
    assert oracles.charge_and_multiplicity(row.numbers, row.smiles) == (1, 1)


def test_bad_input_is_one_clear_line(spice_file, tmp_path, capsys):
    path = str(tmp_path / "no_gradient.hdf5")
    with h5py.File(path, "w") as f:
        g = f.create_group("1")
        g.create_dataset("smiles", data=["[H:1][H:2]"], dtype=h5py.string_dtype())
        g.create_dataset("atomic_numbers", data=np.array([1, 1], dtype=np.int16))
        g.create_dataset("conformations", data=np.zeros((1, 2, 3)))
        g.create_dataset("dft_total_energy", data=np.zeros(1))
    rc, out, _, _ = make(path, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: {path}, group '1': no dft_total_gradient")
    rc, _, _, _ = make(spice_file[0], tmp_path / "big", "--n_test_molecules", "30")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "only 5 SPICE molecules without P or I" in err[0]


def test_a_file_without_subsets_needs_spice_subset_empty(tmp_path, capsys):
    path = str(tmp_path / "no_subset.hdf5")
    with h5py.File(path, "w") as f:
        for name in ("1", "2"):
            g = f.create_group(name)
            g.create_dataset("smiles", data=["[H:1][O:3][H:2]"], dtype=h5py.string_dtype())
            g.create_dataset("atomic_numbers", data=np.array([1, 1, 8], dtype=np.int16))
            g.create_dataset("conformations", data=np.ones((2, 3, 3)))
            g.create_dataset("dft_total_energy", data=np.zeros(2))
            g.create_dataset("dft_total_gradient", data=np.zeros((2, 3, 3)))
    rc, _, _, _ = make(path, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pass --spice_subset ''" in err[0]
    out, out_test = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    with contextlib.redirect_stdout(io.StringIO()):
        assert make_trajectories.main(["--spice", path, "--out", out, "--out_test", out_test,
                                       "--n_train_molecules", "1", "--n_test_molecules", "1",
                                       "--spice_subset", ""]) == 0
    # two conformations: index 0 and 1 are both below 25, so high-energy; none low
    assert ase.db.connect(out).count() == 2 and ase.db.connect(out_test).count() == 0
