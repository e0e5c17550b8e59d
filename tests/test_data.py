"""data.py: the nablaDFT / official GOLF db schema, energy kinds, batching, replay buffer,
and one clear error line for bad input."""
import numpy as np
import pytest
import torch

import data
import painn

WATER = (np.array([8, 1, 1]), np.array([[0, 0, 0.117], [0, 0.757, -0.467], [0, -0.757, -0.467]]))
METHANE = (np.array([6, 1, 1, 1, 1]),
           np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                     [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]]))


def conf(mol, energy, smiles, forces=True):
    z, pos = mol
    return data.Conformation(numbers=z, positions=pos.astype(float), energy=energy,
                             forces=np.full((len(z), 3), 0.01) if forces else None, smiles=smiles)


def write_db(path, confs, atomrefs=None, raw_energy=None):
    db = data.connect_for_writing(str(path), atomrefs=atomrefs)
    for c in confs:
        data.write_conformation(db, c, conf_id=7)
    return str(path)


def test_roundtrip_total_energies(tmp_path):
    c = conf(WATER, -76.3, "O")
    c.optimal_energy, c.optimal_positions = -76.31, WATER[1] * 1.01
    path = write_db(tmp_path / "a.db", [c, conf(METHANE, -40.4, "C")], atomrefs=painn.NABLADFT_ATOMREFS)
    confs, refs = data.read_db(path)
    assert refs[1] == painn.NABLADFT_ATOMREFS[1] and refs[35] == painn.NABLADFT_ATOMREFS[35]
    assert confs[0].energy == -76.3 and confs[0].smiles == "O" and confs[0].info["conf_id"] == 7
    assert confs[0].optimal_energy == -76.31
    np.testing.assert_array_equal(confs[0].optimal_positions, WATER[1] * 1.01)
    np.testing.assert_array_equal(confs[1].forces, np.full((5, 3), 0.01))
    import ase.db
    meta = ase.db.connect(path).metadata
    assert meta["_property_unit_dict"] == {"energy": "Hartree", "forces": "Hartree/Ang"}
    assert len(meta["atomrefs"]["energy"]) == 100


def test_formation_energies_become_total(tmp_path, capsys):
    refs = painn.NABLADFT_ATOMREFS
    shift = refs[8] + 2 * refs[1]
    formation = -0.05                                        # E - sum of atomrefs, Hartree
    path = write_db(tmp_path / "f.db", [conf(WATER, formation, "O")], atomrefs=refs)
    confs, _ = data.read_db(path)
    assert confs[0].energy == pytest.approx(shift + formation, abs=1e-12)
    assert "formation" in capsys.readouterr().out
    confs, _ = data.read_db(path, energy_kind="total")      # the user overrides auto
    assert confs[0].energy == formation


def test_formation_without_atomrefs_is_one_clear_error(tmp_path):
    path = write_db(tmp_path / "f.db", [conf(WATER, -0.05, "O")])
    with pytest.raises(data.DataError, match="no atomrefs"):
        data.read_db(path)


@pytest.mark.parametrize("problem, match", [
    ("nan", "NaN"), ("noforces", "no forces"), ("element", "atomic number"),
    ("missing", "no such database"), ("empty", "no rows")])
def test_bad_input_names_file_and_row(tmp_path, problem, match):
    path = str(tmp_path / "bad.db")
    if problem == "nan":
        c = conf(WATER, -76.3, "O")
        c.positions[1, 2] = np.nan
        write_db(path, [c])
    elif problem == "noforces":
        write_db(path, [conf(WATER, -76.3, "O", forces=False)])
    elif problem == "element":
        write_db(path, [data.Conformation(numbers=np.array([118, 1]), positions=np.eye(2, 3),
                                          energy=-1.0)])
    elif problem == "empty":
        data.connect_for_writing(path)
        import ase.db
        ase.db.connect(path).metadata = {"x": 1}
    with pytest.raises(data.DataError, match=match) as err:
        data.read_db(path, require_forces=True)
    assert path in str(err.value)
    if problem in ("nan", "noforces", "element"):
        assert "row 1" in str(err.value)


def test_collate_layout():
    confs = [conf(WATER, -76.3, "O"), conf(METHANE, -40.4, "C")]
    b = data.collate(confs, dtype=torch.float64)
    assert b.batch.tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and b.n_molecules == 2
    assert b.z.tolist() == [8, 1, 1, 6, 1, 1, 1, 1]
    assert b.energy.dtype == torch.float64 and b.energy.tolist() == [-76.3, -40.4]
    assert b.positions.shape == (8, 3) and b.forces.shape == (8, 3)


def test_fit_atomrefs_recovers_exact_references():
    true = {1: -0.5, 6: -37.8, 8: -75.0}
    mols = [WATER, METHANE, (np.array([6, 8, 1, 1]), np.zeros((4, 3))),
            (np.array([6, 6, 1, 1, 1, 1, 1, 1]), np.zeros((8, 3)))]
    confs = [conf(m, sum(true[int(z)] for z in m[0]), None) for m in mols]
    fitted = data.fit_atomrefs(confs)
    assert fitted == pytest.approx(true, abs=1e-9)


def test_split_by_molecule_keeps_molecules_whole():
    confs = [conf(WATER, -76.3, s) for s in ["O", "O", "C", "C", "N", "N", "CC", "CC"]]
    train, val = data.split_by_molecule(confs, 0.25, seed=1)
    assert len(val) == 2 and len(train) == 6               # 1 of 4 molecules, both its conformations
    assert not {c.smiles for c in train} & {c.smiles for c in val}


def test_minibatches_cover_each_epoch_once():
    mb = data.Minibatches(10, 4, np.random.default_rng(0))
    first = mb.next_indices() + mb.next_indices() + mb.next_indices()[:2]
    assert sorted(first) == list(range(10))


def test_replay_buffer_initial_share():
    d0 = [conf(WATER, -76.3, "O")] * 5
    buf = data.ReplayBuffer(d0, 0.1, np.random.default_rng(0))
    assert all(c is d0[0] for c in buf.sample(64))            # nothing collected: all from D0
    new = conf(METHANE, -40.4, "C")
    buf.add(new)
    sample = buf.sample(64)
    assert sum(c is d0[0] for c in sample) == 6 and sum(c is new for c in sample) == 58


def random_confs(n, seed):
    """Labelled conformations of 1-12 atoms with distinct random values everywhere."""
    rng = np.random.default_rng(seed)
    confs = []
    for _ in range(n):
        k = int(rng.integers(1, 13))
        confs.append(data.Conformation(numbers=rng.integers(1, 10, k), positions=rng.normal(size=(k, 3)),
                                       energy=float(rng.normal()), forces=rng.normal(size=(k, 3))))
    return confs


def assert_same_batch(a, b):
    assert a.n_molecules == b.n_molecules
    for name in ("z", "positions", "batch", "energy", "forces"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conformation_tensors_gather_is_collate(dtype):
    confs = random_confs(30, seed=1)
    tensors = data.ConformationTensors(confs[:5], dtype=dtype)
    tensors.extend(confs[5:6])
    for c in confs[6:]:                                        # grows by doubling
        tensors.extend([c])
    assert len(tensors) == 30
    for idx in ([3], [29, 0, 7, 7, 12], list(range(30))[::-1]):
        assert_same_batch(tensors.gather(idx), data.collate([confs[i] for i in idx], dtype=dtype))
    with pytest.raises(ValueError, match="labelled"):
        tensors.extend([data.Conformation(numbers=np.array([1]), positions=np.zeros((1, 3)))])


def test_replay_buffer_sample_batch_draws_like_sample():
    d0, new = random_confs(9, seed=2), random_confs(6, seed=3)
    buffers = [data.ReplayBuffer(d0, 0.25, np.random.default_rng(5)) for _ in range(2)]
    for step in range(8):
        if step in (2, 3, 6):                                  # collected data arrives
            for buf in buffers:
                buf.add(new[step % len(new)])
        assert_same_batch(buffers[0].sample_batch(8), data.collate(buffers[1].sample(8)))
