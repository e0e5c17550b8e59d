"""painn.py: equivalence with schnetpack 2.1.1 (the reference implementation), symmetries,
forces = -dE/dX, and independence of the molecules of a batch."""
import math
import typing

import numpy as np
import pytest
import torch

import painn


def random_molecules(n_molecules, rng, n_min=5, n_max=50):
    """Random molecules: elements H, C, N, O, F, S, Cl, atoms >= 0.9 A apart."""
    elements = np.array([1, 6, 7, 8, 9, 16, 17])
    mols = []
    for _ in range(n_molecules):
        n = int(rng.integers(n_min, n_max + 1))
        pos = []
        while len(pos) < n:
            p = rng.uniform(-1, 1, 3) * (1.2 * n ** (1 / 3) + 1)
            if all(np.linalg.norm(p - q) > 0.9 for q in pos):
                pos.append(p)
        mols.append((rng.choice(elements, n), np.array(pos)))
    return mols


def flat(mols, dtype=torch.float64):
    z = torch.as_tensor(np.concatenate([m[0] for m in mols]))
    pos = torch.as_tensor(np.concatenate([m[1] for m in mols]), dtype=dtype)
    batch = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m[0]) for m in mols]))
    return z, pos, batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = painn.PaiNN(n_atom_basis=32, n_interactions=3, n_rbf=20, cutoff=5.0,
                    atomrefs=painn.NABLADFT_ATOMREFS).double()
    # xavier init with zero biases is too tame to catch mistakes: randomize biases too
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


def schnetpack_model(n_atom_basis, n_interactions, n_rbf, cutoff):
    import torch.utils.data.dataloader as dataloader
    if not hasattr(dataloader, "T_co"):  # schnetpack 2.1.1 imports a name torch 2.13 dropped
        dataloader.T_co = typing.TypeVar("T_co", covariant=True)
    spk = pytest.importorskip("schnetpack")
    representation = spk.representation.PaiNN(
        n_atom_basis=n_atom_basis, n_interactions=n_interactions,
        radial_basis=spk.nn.BesselRBF(n_rbf=n_rbf, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff))
    nnp = spk.model.NeuralNetworkPotential(
        representation=representation,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=n_atom_basis, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")])
    return spk, nnp


def perturbed_schnetpack_model(sizes, seed):
    """schnetpack's model in float64 with every weight and bias moved by 0.1 N(0, 1): its
    default init (zero biases) is too tame to catch mistakes."""
    torch.manual_seed(seed)
    spk, nnp = schnetpack_model(**sizes)
    nnp = nnp.double()
    with torch.no_grad():
        for p in nnp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return spk, nnp


class Actor(torch.nn.Module):
    """The official GOLF checkpoints are state dicts of an actor holding the NNP as `model`."""

    def __init__(self, nnp):
        super().__init__()
        self.model = nnp


def test_matches_schnetpack_and_loads_official_layout(tmp_path):
    sizes = dict(n_atom_basis=32, n_interactions=3, n_rbf=20, cutoff=5.0)
    spk, nnp = perturbed_schnetpack_model(sizes, seed=1)
    path = tmp_path / "NNP_checkpoint_actor"
    torch.save(Actor(nnp).state_dict(), path)
    sd = torch.load(path)
    assert sd["model.representation.filter_net.weight"].shape == (3 * 3 * 32, 20)
    ours = painn.load_checkpoint(path).double().eval()
    assert ours.hparams == sizes

    neighbors = spk.transform.MatScipyNeighborList(cutoff=sizes["cutoff"])
    for z_np, pos_np in random_molecules(6, np.random.default_rng(2)):
        from ase import Atoms
        atoms = Atoms(numbers=z_np, positions=pos_np)
        inputs = spk.interfaces.AtomsConverter(neighbor_list=neighbors, dtype=torch.float64)(atoms)
        ref = nnp(inputs)
        z, pos, batch = flat([(z_np, pos_np)])
        energy, forces = ours(z, pos, batch)
        # the official model predicts E minus the nablaDFT atomrefs
        ref_energy = ref["energy"].double() + sum(painn.NABLADFT_ATOMREFS[int(a)] for a in z_np)
        torch.testing.assert_close(energy, ref_energy.reshape(1), rtol=1e-9, atol=0)
        net_energy = energy - ours.reference_energy(z, batch, 1)
        torch.testing.assert_close(net_energy, ref["energy"].double().reshape(1), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(forces, ref["forces"].double(), rtol=1e-9, atol=1e-10)


def test_own_checkpoint_roundtrip(model, tmp_path):
    path = tmp_path / "model.pt"
    painn.save_checkpoint(model, path, step=7)
    loaded = painn.load_checkpoint(path).double().eval()
    z, pos, batch = flat(random_molecules(3, np.random.default_rng(3)))
    e1, f1 = model(z, pos, batch)
    e2, f2 = loaded(z, pos, batch)
    assert torch.equal(e1, e2) and torch.equal(f1, f2)
    assert loaded.atomrefs == model.atomrefs


def test_invariance_and_equivariance(model):
    rng = np.random.default_rng(4)
    z, pos, batch = flat(random_molecules(3, rng))
    energy, forces = model(z, pos, batch)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))             # random orthogonal matrix
    rot = torch.as_tensor(q)
    shift = torch.as_tensor(rng.normal(size=3) * 10)
    energy2, forces2 = model(z, pos @ rot.T + shift, batch)
    torch.testing.assert_close(energy2, energy, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(forces2, forces @ rot.T, rtol=1e-9, atol=1e-10)
    # permute atoms inside each molecule
    perm = torch.cat([torch.nonzero(batch == m).squeeze(1)[torch.randperm(int((batch == m).sum()))]
                      for m in range(3)])
    energy3, forces3 = model(z[perm], pos[perm], batch[perm])
    torch.testing.assert_close(energy3, energy, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(forces3, forces[perm], rtol=1e-9, atol=1e-10)


def test_forces_are_minus_gradient(model):
    z, pos, batch = flat(random_molecules(1, np.random.default_rng(5), 8, 12))
    _, forces = model(z, pos, batch)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 1), (7, 2)]:
        plus, minus = pos.clone(), pos.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = (model(z, plus, batch)[0] - model(z, minus, batch)[0]) / (2 * h)
        assert abs(float(fd) + float(forces[atom, axis])) < 1e-7 * max(1.0, abs(float(fd)))


def test_molecules_in_a_batch_do_not_see_each_other(model):
    mols = random_molecules(4, np.random.default_rng(6))
    for m in mols:                                           # all at the same place
        m[1][:] -= m[1].mean(0)
    energy, forces = model(*flat(mols))
    start = 0
    for k, m in enumerate(mols):
        e1, f1 = model(*flat([m]))
        torch.testing.assert_close(energy[k:k + 1], e1, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(forces[start:start + len(m[0])], f1, rtol=1e-10, atol=1e-12)
        start += len(m[0])


def test_neighbor_pairs_are_all_pairs_within_cutoff():
    z, pos, batch = flat(random_molecules(3, np.random.default_rng(7), 10, 40))
    idx_i, idx_j = painn.neighbor_pairs(pos, batch, 3, 4.0, skin=0.0)
    got = set(zip(idx_i.tolist(), idx_j.tolist()))
    d = torch.cdist(pos, pos)
    want = {(i, j) for i in range(len(z)) for j in range(len(z))
            if i != j and batch[i] == batch[j] and d[i, j] < 4.0}
    assert got == want


def test_radial_basis_and_cutoff_by_hand():
    d = torch.tensor([1.0, 2.5, 5.0, 6.0], dtype=torch.float64)
    freqs = torch.arange(1, 4, dtype=torch.float64) * math.pi / 5.0
    rbf = painn.bessel_rbf(d, freqs)
    assert rbf[1, 0].item() == pytest.approx(math.sin(math.pi / 2) / 2.5)
    assert rbf[0, 2].item() == pytest.approx(math.sin(3 * math.pi / 5) / 1.0)
    fc = painn.cosine_cutoff(d, 5.0)
    assert fc.tolist() == pytest.approx([0.5 * (math.cos(math.pi / 5) + 1), 0.5, 0.0, 0.0])


def test_group_molecules():
    # pairs n(n-1): 20, 6, 0, 90, 2
    assert painn.group_molecules([5, 3, 1, 10, 2], 30) == [(0, 3), (3, 4), (4, 5)]
    assert painn.group_molecules([5, 3, 1, 10, 2], 10**6) == [(0, 5)]
    assert painn.group_molecules([5, 3], 1) == [(0, 1), (1, 2)]     # one molecule at least
    assert painn.group_molecules([], 100) == []


@pytest.mark.parametrize("create_graph", [False, True])
def test_molecule_groups_do_not_change_the_function(model, create_graph):
    """Both evaluation modes (CPU default "groups", GPU default "one_pass") give the same
    energies, forces and training gradients, whatever the group size."""
    z, pos, batch = flat(random_molecules(7, np.random.default_rng(8), 2, 30))
    results = []
    for evaluation, max_pairs in [("one_pass", painn.MAX_GROUP_PAIRS), ("groups", 10**9),
                                  ("groups", 1000), ("groups", 1)]:  # 1 pass, groups, 1 by 1
        model.evaluation, model.max_group_pairs = evaluation, max_pairs
        model.zero_grad(set_to_none=True)
        energy, forces = model(z, pos, batch, create_graph=create_graph)
        if create_graph:                                     # a training step's gradients
            (energy.square().sum() + forces.square().sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()] if create_graph else []
        results.append((energy.detach(), forces.detach(), grads))
    model.evaluation, model.max_group_pairs = "auto", painn.MAX_GROUP_PAIRS
    model.zero_grad(set_to_none=True)
    for energy, forces, grads in results[1:]:
        torch.testing.assert_close(energy, results[0][0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(forces, results[0][1], rtol=1e-10, atol=1e-12)
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-12)


def test_evaluation_mode_follows_the_device(model):
    assert model.evaluation_mode(torch.device("cpu")) == "groups"
    assert model.evaluation_mode(torch.device("cuda")) == "one_pass"   # no GPU needed
    model.evaluation = "one_pass"
    assert model.evaluation_mode("cpu") == "one_pass"
    model.evaluation = "auto"


def test_half_neighbor_pairs_are_the_pairs_with_i_below_j():
    z, pos, batch = flat(random_molecules(5, np.random.default_rng(3), 2, 20))
    i, j = painn.neighbor_pairs(pos, batch, 5, 4.0)
    a, b = painn.neighbor_pairs(pos, batch, 5, 4.0, half=True)
    keep = i < j
    assert torch.equal(a, i[keep]) and torch.equal(b, j[keep]) and len(a) * 2 == len(i)


def test_training_gradients_match_schnetpack():
    """A training step backpropagates through the forces (double backward): the parameter
    gradients of a loss on energies and forces equal schnetpack's."""
    sizes = dict(n_atom_basis=16, n_interactions=2, n_rbf=10, cutoff=5.0)
    spk, nnp = perturbed_schnetpack_model(sizes, seed=3)
    official = {"model." + k: v for k, v in nnp.state_dict().items()}
    hparams, state_dict = painn.from_official_state_dict(official)
    ours = painn.PaiNN(**hparams).double()
    ours.load_state_dict(state_dict)
    ours.max_group_pairs = 2000                              # several passes per batch

    from ase import Atoms
    mols = random_molecules(5, np.random.default_rng(9), 3, 30)
    converter = spk.interfaces.AtomsConverter(
        neighbor_list=spk.transform.MatScipyNeighborList(cutoff=sizes["cutoff"]),
        dtype=torch.float64)
    inputs = converter([Atoms(numbers=zm, positions=pm) for zm, pm in mols])
    nnp.train()
    ref = nnp(inputs)
    (ref["energy"].square().sum() + ref["forces"].square().sum()).backward()

    ours.train()
    energy, forces = ours(*flat(mols))
    (energy.square().sum() + forces.square().sum()).backward()
    torch.testing.assert_close(energy, ref["energy"].detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(forces.detach(), ref["forces"].detach(), rtol=1e-9, atol=1e-10)

    spk_grads = {"model." + k: p.grad for k, p in nnp.named_parameters()}
    _, ref_grads = painn.from_official_state_dict({k: spk_grads.get(k, v)
                                                   for k, v in official.items()})
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.soak          # ~1 min of C++ compilation: by hand, -m soak
def test_compiled_network_gives_the_same_energies_and_forces():
    """--compile: torch.compile'd network (CPU here, needs a C++ compiler) = eager, for
    two batch shapes (dynamic shapes, no recompile per batch), both evaluation modes and
    2 threads; a training step (create_graph) still runs, eagerly."""
    cases = [(1, 1, "one_pass"), (1, 2, "groups"), (1, 3, "one_pass"), (2, 1, "one_pass")]
    torch.manual_seed(1)
    eager = painn.PaiNN(n_atom_basis=16, n_interactions=2, n_rbf=8, cutoff=5.0).double().eval()
    compiled = painn.PaiNN(n_atom_basis=16, n_interactions=2, n_rbf=8, cutoff=5.0).double().eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_network()
    threads = torch.get_num_threads()
    try:
        for n_threads, seed, evaluation in cases:
            torch.set_num_threads(n_threads)       # 2 threads: compiled code is not used on CPU
            z, pos, batch = flat(random_molecules(5, np.random.default_rng(seed), 3, 14))
            compiled.evaluation = eager.evaluation = evaluation
            e0, f0 = eager(z, pos, batch)
            e1, f1 = compiled(z, pos, batch)
            torch.testing.assert_close(e1, e0, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(f1, f0, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
    compiled.train()
    energy, forces = compiled(z, pos, batch)
    (energy.square().sum() + forces.square().sum()).backward()
    assert all(p.grad is not None for p in compiled.parameters())
