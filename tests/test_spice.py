"""make_trajectories.py --spice: the paper's D0^SPICE / D_test^SPICE (App. E) from a small file
written here in SPICE's HDF5 layout (openmm/spice-dataset, downloader/README.md)."""
import collections
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


def embedded_bohr(mapped_smiles):
    """An ETKDG geometry of a mapped explicit-H SMILES in the file's atom order (atom k has
    map number k + 1), in Bohr: sane molecules, so a real oracle can label them."""
    from rdkit import Chem
    from rdkit.Chem import AllChem
    params = Chem.SmilesParserParams()
    params.removeHs = False
    mol = Chem.MolFromSmiles(mapped_smiles, params)
    assert AllChem.EmbedMolecule(mol, randomSeed=3) == 0
    positions = mol.GetConformer().GetPositions()
    xyz = np.zeros_like(positions)
    for atom in mol.GetAtoms():
        xyz[atom.GetAtomMapNum() - 1] = positions[atom.GetIdx()]
    return xyz / data.BOHR_TO_ANGSTROM


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
            xyz = embedded_bohr(smiles) + rng.normal(scale=0.05, size=(N_CONF, n, 3))
            # high-energy conformations 0-24 lie 0.05 Hartree above the low-energy ones
            energy = -100.0 + 0.05 * (np.arange(N_CONF) < 25) + 0.001 * rng.random(N_CONF)
            gradient = rng.normal(scale=0.01, size=(N_CONF, n, 3))
            if name == "101":
                xyz[7], energy[7], gradient[7] = water_bohr, water_energy, water_gradient
            g.create_dataset("conformations", data=xyz.astype(np.float32)).attrs["units"] = "bohr"
            g.create_dataset("dft_total_energy", data=energy)
            g.create_dataset("dft_total_gradient", data=gradient.astype(np.float32))
    return path, water_bohr, water_energy, water_gradient


def make(spice, tmp_path, *extra, labels="own"):
    """make_trajectories.py --spice of 2 + 3 molecules; SPICE's own labels unless `labels`."""
    out, out_test = str(tmp_path / "d0_spice.db"), str(tmp_path / "test_spice.db")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = make_trajectories.main(["--spice", spice, "--out", out, "--out_test", out_test,
                                     "--n_train_molecules", "2", "--n_test_molecules", "3",
                                     "--spice_labels", labels, *extra])
    return rc, out, out_test, printed.getvalue()


def chosen(path):
    """(conf_id, name, spice_index, energy_level) of a db's rows."""
    return [(row.conf_id, row.name, row.spice_index, row.energy_level)
            for row in ase.db.connect(path).select()]


def test_splits(spice_file, tmp_path):
    rc, out, out_test, printed = make(spice_file[0], tmp_path, "--n_train_conformations", "all",
                                      "--n_test_conformations", "all")
    assert rc == 0
    d0, test = ase.db.connect(out), ase.db.connect(out_test)
    train_names = {row.name for row in d0.select()}
    test_names = {row.name for row in test.select()}
    # 5 PubChem molecules without P or I: 2 for D0, the other 3 for the test set
    assert len(train_names) == 2 and len(test_names) == 3
    assert train_names | test_names == {f"spice:{n}" for n in ("101", "102", "103", "104", "105")}
    # D0, 'all': only the high-energy conformations 0-24, all of them
    assert d0.count() == 2 * 25
    assert {row.energy_level for row in d0.select()} == {"high"}
    assert max(row.spice_index for row in d0.select()) == 24
    # D_test, 'all': every molecule with as many high- as low-energy conformations
    for name in test_names:
        levels = [row.energy_level for row in test.select(name=name)]
        assert levels.count("high") == levels.count("low") == 25
    for db in (d0, test):
        assert db.metadata["method"] == data.SPICE_METHOD == "wB97M-D3BJ/def2-TZVPPD"
        assert "not the paper's O_G" in db.metadata["level_note"]
        assert db.metadata["spice_labels"] == "own"
        refs = db.metadata["atomrefs"]["energy"]
        assert refs[1] == -0.4987605100487531 and refs[15] == 0.0 and refs[53] == 0.0
    assert "2 with P or I dropped" in printed and "1 left out (other subset)" in printed
    assert "have the higher mean energy in 100.0% of 5 molecules" in printed
    # a rerun adds nothing
    rc, _, _, printed = make(spice_file[0], tmp_path, "--n_train_conformations", "all",
                             "--n_test_conformations", "all")
    assert rc == 0 and ase.db.connect(out).count() == 50 and "0 rows written now" in printed


def test_app_e_sizes_spread_evenly_and_seeded(spice_file, tmp_path):
    """App. E's sizes are totals (D0^SPICE ~9,500 of ~3,500 molecules: 2-3 each): spread as
    evenly as the molecules allow, the same on a rerun and after a lost molecule, other
    ones with another --seed; the test set keeps high and low in equal parts."""
    sizes = ("--n_train_conformations", "5", "--n_test_conformations", "8")
    rc, out, out_test, printed = make(spice_file[0], tmp_path / "a", *sizes)
    assert rc == 0
    d0, test = chosen(out), chosen(out_test)
    per_molecule = sorted(collections.Counter(name for _, name, _, _ in d0).values())
    assert per_molecule == [2, 3] and {level for *_, level in d0} == {"high"}
    test_counts = collections.Counter((name, level) for _, name, _, level in test)
    assert sorted(test_counts.values()) == [1, 1, 1, 1, 2, 2]          # 4 pairs over 3
    for name in {name for _, name, _, _ in test}:
        assert test_counts[(name, "high")] == test_counts[(name, "low")]
    assert all(conf_id % 1000 == index for conf_id, _, index, _ in d0 + test)
    assert "D0^SPICE: 2 molecules, 5 conformations (asked: 5; 2-3 a molecule" in printed
    # the same command elsewhere: the same choice; a lost molecule comes back the same
    rc, out_b, out_test_b, _ = make(spice_file[0], tmp_path / "b", *sizes)
    assert chosen(out_b) == d0 and chosen(out_test_b) == test
    db = ase.db.connect(out_b)
    first = d0[0][1]
    db.delete([row.id for row in db.select(name=first)])
    rc, _, _, printed = make(spice_file[0], tmp_path / "b", *sizes)
    assert rc == 0 and chosen(out_b) == d0
    # another seed, other conformations; other sizes into the same db are refused
    rc, out_c, _, _ = make(spice_file[0], tmp_path / "c", *sizes, "--seed", "7")
    assert chosen(out_c) != d0
    rc, _, _, _ = make(spice_file[0], tmp_path / "a", "--n_train_conformations", "6",
                       "--n_test_conformations", "8")
    assert rc == 2
    # the defaults are App. E's totals; a small file gives all it has
    args = make_trajectories.parse_args(["--spice", "x.h5", "--out", "a", "--out_test", "b"])
    assert (args.n_train_conformations, args.n_test_conformations) == (9500, 18000)
    assert args.spice_labels == "oracle"


def test_spread_evenly_by_hand():
    rng = np.random.default_rng(0)
    assert data.spread_evenly([25, 25, 25], 7, rng).tolist().count(3) == 1
    assert sorted(data.spread_evenly([25, 25, 25], 7, rng).tolist()) == [2, 2, 3]
    # a molecule with fewer gives all it has; the rest goes to the others
    assert data.spread_evenly([1, 25, 25], 9, rng).tolist() == [1, 4, 4]
    assert data.spread_evenly([1, 2, 3], 100, rng).tolist() == [1, 2, 3]
    assert data.spread_evenly([1, 2, 3], None, rng).tolist() == [1, 2, 3]
    assert data.spread_evenly([4, 0, 4], 3, rng).tolist() in ([2, 0, 1], [1, 0, 2])


def test_the_oracle_relabels_every_chosen_conformation(spice_file, tmp_path):
    """Sec. 6.3: D0^SPICE and D_test^SPICE labelled by the genuine oracle (GFN2-xTB here, the
    cheap one; the default is --oracle_method wb97x-d/def2-svp): the same conformations as
    with SPICE's own labels, each with a direct oracle call's energy and forces, the
    oracle's atomrefs in the metadata; a rerun labels nothing again."""
    sizes = ("--n_train_conformations", "3", "--n_test_conformations", "4")
    xtb = ("--oracle_method", "gfn2-xtb", "--n_workers", "2")
    _, own_out, own_test, _ = make(spice_file[0], tmp_path / "own", *sizes)
    rc, out, out_test, printed = make(spice_file[0], tmp_path / "xtb", *sizes, *xtb,
                                      labels="oracle")
    assert rc == 0 and "labels: gfn2-xtb (the genuine oracle O_G" in printed
    assert chosen(out) == chosen(own_out) and chosen(out_test) == chosen(own_test)
    for path, own in ((out, own_out), (out_test, own_test)):
        db = ase.db.connect(path)
        assert db.metadata["method"] == "gfn2-xtb" and db.metadata["spice_labels"] == "oracle"
        assert data.read_atomrefs(db.metadata)[1] == pytest.approx(-0.393482764, abs=1e-8)
        spice_energy = {row.conf_id: row.data["energy"][0] for row in ase.db.connect(own).select()}
        for row in db.select():
            charge, multiplicity = oracles.charge_and_multiplicity(row.numbers, row.smiles)
            energy, gradient = oracles.xtb_gradient("gfn2-xtb", row.numbers, row.positions,
                                                    charge, multiplicity, {})
            assert row.data["energy"][0] == pytest.approx(energy, abs=1e-9)
            np.testing.assert_allclose(row.data["forces"], -gradient / data.BOHR_TO_ANGSTROM,
                                       atol=1e-8)
            assert abs(row.data["energy"][0] - spice_energy[row.conf_id]) > 1.0   # relabelled
    rc, _, _, printed = make(spice_file[0], tmp_path / "xtb", *sizes, *xtb, labels="oracle")
    assert rc == 0 and "0 conformations to do, 3 already finished" in printed


def test_units_order_and_sign_against_our_oracle(spice_file, tmp_path):
    """Water's conformation 7 holds Psi4's label in SPICE's units (Bohr, Hartree/Bohr) and atom
    order (H, H, O). Read back (Angstrom, Hartree/Angstrom, our order O, H, H), it must be
    what our oracle computes at the converted positions."""
    path, water_bohr, water_energy, water_gradient = spice_file
    rc, out, out_test, _ = make(path, tmp_path, "--n_train_conformations", "all",
                                "--n_test_conformations", "all")
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
    _, out, out_test, _ = make(spice_file[0], tmp_path, "--n_train_conformations", "all",
                               "--n_test_conformations", "all")
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
                                       "--spice_subset", "", "--spice_labels", "own"]) == 0
    # two conformations: index 0 and 1 are both below 25, so high-energy; none low
    assert ase.db.connect(out).count() == 2 and ase.db.connect(out_test).count() == 0
