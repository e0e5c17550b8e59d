"""PaiNN, the neural network potential (NNP) of GOLF, written from scratch.

Schutt, Unke, Gastegger, "Equivariant message passing for the prediction of tensorial
properties and molecular spectra", ICML 2021. GOLF (Tsypin et al., ICLR 2024) uses it as
f(z, X; theta) with the sizes of Table 5. This module computes the same function as
schnetpack 2's `PaiNN` representation + `Atomwise` head + `Forces`, so the official GOLF
checkpoints load into it (`load_checkpoint`) and give the same numbers.

One call handles a batch of molecules of different sizes, laid out as flat atoms:
    z         [n_atoms]     atomic numbers
    positions [n_atoms, 3]  Angstrom
    batch     [n_atoms]     molecule index of every atom, sorted (atoms of a molecule are
                            contiguous, molecules in increasing order)
and returns
    energy    [n_molecules] total energy, Hartree, float64
    forces    [n_atoms, 3]  F = -dE/dX (Eq. 1), Hartree/Angstrom

Energy = sum over atoms of the atomwise head + sum over atoms of a per-element reference
energy (`atomrefs`); the network itself learns E - sum_i ref[z_i].

Same function as schnetpack, computed differently for speed on CPU (benchmarks/painn.py):
  * the filters W(r_ij) depend on |r_ij| only, so they are computed once per pair {i, j},
    and the cutoff multiplies the filter net's input, not its wide output (PaiNN.filters);
  * vector features are stored component first, mu [3, n_atoms, F] (schnetpack:
    [n_atoms, 3, F]), so sums over x, y, z add contiguous blocks (Interaction, Mixing);
  * on CPU a batch is evaluated a few molecules at a time (group_molecules), which keeps
    the per-pair tensors small: 64 molecules cost no more per molecule than 8. On a GPU the
    whole batch is one pass (`evaluation`: "groups" | "one_pass" | "auto", by device), with
    no host-device synchronisation per group.
"""
import itertools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import safe_io

MAX_Z = 100  # size of the element embedding (atomic numbers 0..99)
MAX_GROUP_PAIRS = 8192  # atom pairs per pass of the network, see group_molecules
EVALUATIONS = ("auto", "groups", "one_pass")  # PaiNN.evaluation, see PaiNN.forward

# wB97X-D/def2-SVP energies of isolated atoms (Hartree), the `atomrefs` of nablaDFT.
# The official GOLF checkpoints predict E - sum_i NABLADFT_ATOMREFS[z_i].
NABLADFT_ATOMREFS = {
    1: -0.5024932583661139, 6: -37.79809934247253, 7: -54.522414832380626,
    8: -74.97667809850873, 9: -99.61446950401614, 15: -341.13941895023964,
    16: -397.9719278356063, 17: -459.98864965660516, 35: -2573.8571719614743,
    53: -297.7564286148722,
}
NABLADFT_ELEMENTS = (1, 6, 7, 8, 9, 16, 17, 35)   # H C N O F S Cl Br: nablaDFT's molecules


# ---------------------------------------------------------------------------------------
# Geometry: neighbour pairs, radial basis, cutoff
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def neighbor_pairs(positions, batch, n_molecules, cutoff, skin=1e-4, half=False):
    """All ordered pairs (i, j), i != j, of atoms of the same molecule closer than `cutoff`
    (half=True: only those with i < j, each pair {i, j} once).

    Per molecule, in one padded block: positions are scattered into [n_molecules, max_n, 3],
    all distances come from one batched torch.cdist, and a mask keeps real, distinct
    atoms within the cutoff. Returns idx_i, idx_j [n_pairs] (flat atom indices), sorted
    by i. Only indices are returned: distances are recomputed with autograd by the caller.
    cdist's matrix-product formula is accurate to ~1e-7 A only, so pairs are kept up to
    `skin` beyond the cutoff; the cosine cutoff gives those exactly zero weight.
    """
    n_atoms = positions.shape[0]
    counts = torch.zeros(n_molecules, dtype=torch.long, device=positions.device).index_add_(
        0, batch, torch.ones_like(batch))                                 # [n_molecules]
    # (not bincount: on a GPU it syncs with the host to size its output)
    first_atom = torch.cumsum(counts, 0) - counts                         # [n_molecules]
    local = torch.arange(n_atoms, device=positions.device) - first_atom[batch]  # [n_atoms]
    max_n = int(counts.max()) if n_atoms else 0
    padded = positions.new_zeros(n_molecules, max_n, 3)
    padded[batch, local] = positions.detach()
    real = torch.zeros(n_molecules, max_n, dtype=torch.bool, device=positions.device)
    real[batch, local] = True
    dist = torch.cdist(padded, padded)                                   # [n_mol, max_n, max_n]
    mask = (dist < cutoff + skin) & real[:, :, None] & real[:, None, :]
    if half:                                                             # i < j only
        mask = mask.triu_(diagonal=1)
    else:
        mask.diagonal(dim1=1, dim2=2).fill_(False)                       # no self pairs
    mol, a, b = mask.nonzero(as_tuple=True)
    return first_atom[mol] + a, first_atom[mol] + b


def bessel_rbf(d, frequencies):
    """Radial basis sin(n pi d / r_c) / d, n = 1..n_rbf. d [n_pairs] -> [n_pairs, n_rbf]."""
    return torch.sin(d[:, None] * frequencies) / d[:, None]


def cosine_cutoff(d, cutoff):
    """f_c(d) = 0.5 (cos(pi d / r_c) + 1) for d < r_c, else 0. d [n_pairs] -> [n_pairs]."""
    return 0.5 * (torch.cos(d * math.pi / cutoff) + 1.0) * (d < cutoff).to(d.dtype)


def group_molecules(counts, max_pairs):
    """Cut molecules 0..len(counts)-1 (counts: atoms of each) into consecutive groups of at
    most `max_pairs` atom pairs n(n-1) in total (a bigger molecule makes a group alone).
    Returns [(first, end)] molecule ranges.

    One group is one pass of the network, with its own autograd graph. Small groups keep the
    [n_pairs, ...] tensors small, and so cheap: glibc's malloc hands out blocks above its
    mmap threshold (32 MB at most) as fresh pages from the kernel, zeroed and faulted in
    again on every call, while smaller blocks are recycled (the cost per molecule, one pass
    against groups: benchmarks/README.md, "Why groups")."""
    groups, start, pairs = [], 0, 0
    for m, n in enumerate(counts):
        if m > start and pairs + n * (n - 1) > max_pairs:
            groups.append((start, m))
            start, pairs = m, 0
        pairs += n * (n - 1)
    if counts:
        groups.append((start, len(counts)))
    return groups


class MLP(nn.Sequential):
    """Linear -> SiLU -> Linear, the two-layer nets of PaiNN (keys .0 and .1, as schnetpack)."""

    def __init__(self, n_in, n_hidden, n_out):
        super().__init__(nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_out))

    def forward(self, x):
        return self[1](F.silu(self[0](x)))


# ---------------------------------------------------------------------------------------
# The two PaiNN blocks. Features of atom i: scalars s_i (here q [n_atoms, F]) and vectors
# v_i (here mu [3, n_atoms, F]: F vectors of 3 components). The vectors are stored component
# first (schnetpack: [n_atoms, 3, F]), so that sums over the x, y, z components, here and in
# the backward pass, add up contiguous blocks. "o" is the elementwise product over the F
# features; r_ij = x_j - x_i points from atom i to its neighbour j.
# ---------------------------------------------------------------------------------------

class Interaction(nn.Module):
    """Message block (PaiNN Eq. 7-8): atom i gathers from every neighbour j within the cutoff

        Delta s_i = sum_j phi_s(s_j) o W_s(|r_ij|)                                   Eq. 7
        Delta v_i = sum_j v_j o phi_vv(s_j) o W_vv(|r_ij|)
                  + sum_j phi_vs(s_j) o W_vs(|r_ij|) r_ij / |r_ij|                    Eq. 8

    and s_i <- s_i + Delta s_i, v_i <- v_i + Delta v_i. phi = [phi_s, phi_vs, phi_vv] is
    one net of s_j (Linear, SiLU, Linear: F -> F -> 3F); W = [W_s, W_vs, W_vv] [3F] is this
    block's filter, a linear map of the radial basis of |r_ij| times the cosine cutoff
    (PaiNN.filters).

    Computed fused: one product phi(s_j) o W(r_ij) for the three, and one index_add for all
    four sums (Delta s, and Delta v's x, y, z). Every pair {a, b} is visited once and sends
    its messages both ways, b -> a and a -> b: W_ab = W_ba (the filter depends on the
    distance only) and r_ba / |r_ba| = -r_ab / |r_ab|."""

    def __init__(self, n_features):
        super().__init__()
        self.n_features = n_features
        self.interatomic_context_net = MLP(n_features, n_features, 3 * n_features)  # phi

    def forward(self, q, mu, filters, unit, src, dst):
        # q [n_atoms, F]; mu [3, n_atoms, F]; filters [n_half, 3F]: W of every pair {a, b};
        # src = (b, a) and dst = (a, b) [2 * n_half]: j and i of the two directions of every
        # pair; unit [3, 2, n_half, 1]: r_ij / |r_ij| of each direction.
        # (index_select rather than phi[src]: on CPU its backward, index_add, is several
        # times faster than indexing's, index_put with accumulate.)
        n_half, n_features = filters.shape[0], self.n_features
        phi_j = self.interatomic_context_net(q).index_select(0, src)      # phi(s_j) [2 n_half, 3F]
        x = filters * phi_j.view(2, n_half, 3 * n_features)               # phi o W [2, n_half, 3F]
        # phi_s o W_s, phi_vs o W_vs, phi_vv o W_vv: 3 x [2, n_half, F]
        dq, dmu_r, dmu_mu = torch.split(x, n_features, dim=-1)
        mu_j = mu.index_select(1, src).view(3, 2, n_half, n_features)     # v_j [3, 2, n_half, F]
        # Eq. 8's terms: v_j o phi_vv o W_vv + phi_vs o W_vs r_ij / |r_ij|   [3, 2, n_half, F]
        dmu = torch.addcmul(dmu_mu * mu_j, dmu_r, unit)
        messages = torch.cat([dq[None], dmu]).flatten(1, 2)               # [4, 2 n_half, F]
        update = q.new_zeros(4, q.shape[0], n_features).index_add(1, dst, messages)  # sum_j
        return q + update[0], mu + update[1:]                             # Eq. 7, Eq. 8


class Mixing(nn.Module):
    """Update block (PaiNN Eq. 9-11): each atom mixes its own scalar and vector channels,

        U v_i, V v_i = two linear maps of the F vector channels (no bias: equivariant)
        [a_ss, a_vv, a_sv] = a(s_i, |V v_i|)   one net (Linear, SiLU, Linear: 2F -> F -> 3F)
        Delta v_i = a_vv o U v_i
        Delta s_i = a_ss + a_sv o <U v_i, V v_i>      (<,>: scalar product of 3-vectors)

    and s_i <- s_i + Delta s_i, v_i <- v_i + Delta v_i. |V v_i| = sqrt(sum_xyz (V v_i)^2 +
    epsilon): the epsilon keeps the gradient finite at v_i = 0, where every block starts."""

    def __init__(self, n_features, epsilon=1e-8):
        super().__init__()
        self.n_features = n_features
        self.epsilon = epsilon
        self.mu_channel_mix = nn.Linear(n_features, 2 * n_features, bias=False)  # V, U
        self.intraatomic_context_net = MLP(2 * n_features, n_features, 3 * n_features)  # a

    def forward(self, q, mu):
        # q [n_atoms, F]; mu [3, n_atoms, F]
        mu_v, mu_w = torch.split(self.mu_channel_mix(mu), self.n_features, dim=-1)  # V v, U v
        norm_v = torch.sqrt(torch.sum(mu_v ** 2, dim=0) + self.epsilon)   # |V v| [n, F]
        a = self.intraatomic_context_net(torch.cat([q, norm_v], dim=-1))  # [n, 3F]
        a_ss, a_vv, a_sv = torch.split(a, self.n_features, dim=-1)        # 3 x [n, F]
        q = q + a_ss + a_sv * torch.sum(mu_v * mu_w, dim=0)               # Delta s: <V v, U v>
        mu = mu + a_vv * mu_w                                             # Delta v = a_vv U v
        return q, mu


# ---------------------------------------------------------------------------------------
# The potential
# ---------------------------------------------------------------------------------------

class PaiNN(nn.Module):
    """E = f(z, X): PaiNN representation, atomwise energy head, per-element references."""

    def __init__(self, n_atom_basis=128, n_interactions=3, n_rbf=50, cutoff=5.0,
                 atomrefs=None):
        super().__init__()
        self.hparams = dict(n_atom_basis=n_atom_basis, n_interactions=n_interactions,
                            n_rbf=n_rbf, cutoff=cutoff)
        self.n_features = n_atom_basis
        self.n_interactions = n_interactions
        self.cutoff = cutoff
        self.max_group_pairs = MAX_GROUP_PAIRS  # atom pairs per pass, see group_molecules
        self.evaluation = "auto"                # one of EVALUATIONS, see evaluation_mode
        self.compiled_network = None            # see compile_network
        self.register_buffer("rbf_frequencies", torch.arange(1, n_rbf + 1) * math.pi / cutoff)
        self.embedding = nn.Embedding(MAX_Z, n_atom_basis)
        # one filter net for all blocks: n_rbf -> n_interactions * 3F
        self.filter_net = nn.Linear(n_rbf, n_interactions * 3 * n_atom_basis)
        self.interactions = nn.ModuleList(Interaction(n_atom_basis) for _ in range(n_interactions))
        self.mixing = nn.ModuleList(Mixing(n_atom_basis) for _ in range(n_interactions))
        self.energy_head = MLP(n_atom_basis, n_atom_basis // 2, 1)       # F -> F/2 -> 1
        for layer in self.modules():                                      # schnetpack's init
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.set_atomrefs(atomrefs)

    def forward(self, z, positions, batch, n_molecules=None, create_graph=None):
        """Energies [n_molecules] (float64, Hartree) and forces [n_atoms, 3] = -dE/dX.

        create_graph (default: self.training) keeps the graph of the forces, needed when
        the forces enter the loss (Eq. 2). Both evaluation modes give the same numbers."""
        if n_molecules is None:
            n_molecules = int(batch.max()) + 1 if batch.numel() else 0
        if create_graph is None:
            create_graph = self.training
        if bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("batch must be sorted: the atoms of a molecule contiguous, "
                             "molecules in increasing order")
        if self.evaluation_mode(positions.device) == "one_pass" and len(positions):
            energy_net, forces = self.energy_and_forces_net(z, positions, batch, n_molecules,
                                                            create_graph)
        else:
            counts = torch.bincount(batch, minlength=n_molecules).tolist()   # atoms per molecule
            first_atom = [0] + list(itertools.accumulate(counts))
            energy_net, forces = [], []
            # molecules are independent: evaluate them a group at a time (see group_molecules)
            for m0, m1 in group_molecules(counts, self.max_group_pairs):
                a0, a1 = first_atom[m0], first_atom[m1]
                e, f = self.energy_and_forces_net(z[a0:a1], positions[a0:a1],
                                                  batch[a0:a1] - m0, m1 - m0, create_graph)
                energy_net.append(e)
                forces.append(f)
            energy_net = torch.cat(energy_net) if energy_net else positions.new_zeros(0)
            forces = torch.cat(forces) if forces else torch.zeros_like(positions)
        energy = energy_net.double() + self.reference_energy(z, batch, n_molecules)
        return energy, forces

    def energy_and_forces_net(self, z, positions, batch, n_molecules, create_graph):
        """One pass of the network (its own autograd graph): the network's energies
        [n_molecules] (model dtype, no references) and forces [n_atoms, 3] = -dE/dX (Eq. 1).
        Without create_graph, the torch.compile'd network runs if compile_network() made
        one (on CPU with one torch thread only)."""
        with torch.enable_grad():
            pos = positions
            if not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            # pairs (i, j) and (j, i) share distance and filter: keep each pair {a, b} once
            a, b = neighbor_pairs(pos, batch, n_molecules, self.cutoff, half=True)  # [n_half]
            use_compiled = not create_graph and self.compiled_network is not None and (
                pos.device.type != "cpu" or torch.get_num_threads() == 1)
            network = self.compiled_network if use_compiled else self.network
            atomic = network(z, pos, a, b)                                # E_i [n_atoms]
            energy = atomic.new_zeros(n_molecules).index_add(0, batch, atomic)  # sum_i E_i
            grad, = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
        return energy, -grad

    def network(self, z, positions, a, b):
        """Atomic energies E_i [n_atoms] from the pairs {a, b} (a < b) within the cutoff: the
        part with static control flow, which torch.compile can take whole (compile_network).
        s_i = embedding(z_i), v_i = 0; n_interactions times a message block (Eq. 7-8) and
        an update block (Eq. 9-11); E_i = energy_head(s_i) (F -> F/2 -> 1)."""
        r_ab = positions.index_select(0, b) - positions.index_select(0, a)  # [n_half, 3]
        d_ab = torch.linalg.vector_norm(r_ab, dim=1)                      # [n_half]
        unit_ab = r_ab / d_ab[:, None]
        filters = torch.split(self.filters(d_ab), 3 * self.n_features, dim=-1)
        # messages go both ways: to a from b along unit_ab, to b from a along -unit_ab
        src, dst = torch.cat([b, a]), torch.cat([a, b])                   # [2 * n_half]
        unit = torch.stack([unit_ab.T, -unit_ab.T], dim=1)[..., None]     # [3, 2, n_half, 1]

        q = self.embedding(z)                                             # s [n_atoms, F]
        mu = q.new_zeros(3, q.shape[0], self.n_features)                  # v [3, n_atoms, F]
        for interaction, mixing, w in zip(self.interactions, self.mixing, filters):
            q, mu = interaction(q, mu, w, unit, src, dst)
            q, mu = mixing(q, mu)
        return self.energy_head(q).squeeze(-1)                            # [n_atoms]

    def filters(self, d):
        """The filters W(|r_ij|) of all blocks: W(d) = filter_net(rbf(d)) f_c(d), the Bessel
        radial basis sin(n pi d / r_c) / d (n = 1..n_rbf) through one linear layer, times
        the cosine cutoff f_c; d [n] -> [n, n_interactions * 3F].

        The cutoff multiplies the (n_rbf + 1)-wide input instead of the wide output:
        (rbf W^T + b) f_c = [rbf f_c, f_c] [W, b]^T, one matrix product. (Scaling the rows
        of the wide output, and its gradient, is a broadcast, slower on CPU than a plain
        elementwise product.)"""
        fc = cosine_cutoff(d, self.cutoff)[:, None]                       # [n, 1]
        rbf = torch.cat([bessel_rbf(d, self.rbf_frequencies), torch.ones_like(fc)], dim=1)
        weight = torch.cat([self.filter_net.weight, self.filter_net.bias[:, None]], dim=1)
        return (rbf * fc) @ weight.T                                      # [n, n_int*3F]

    def reference_energy(self, z, batch, n_molecules):
        """sum_i ref[z_i] per molecule, float64 [n_molecules]."""
        if z.device not in self._atomrefs_tensor:
            self._atomrefs_tensor[z.device] = torch.tensor(self.atomrefs, dtype=torch.float64,
                                                           device=z.device)
        refs = self._atomrefs_tensor[z.device][z]
        return refs.new_zeros(n_molecules).index_add(0, batch, refs)

    def set_atomrefs(self, atomrefs):
        """Per-element reference energies (Hartree): a dict {z: E} or a length-MAX_Z list.
        Kept in float64 outside the parameters, so `.float()` never rounds them."""
        refs = [0.0] * MAX_Z
        if isinstance(atomrefs, dict):
            for z, e in atomrefs.items():
                refs[int(z)] = float(e)
        elif atomrefs is not None:
            refs[:len(atomrefs)] = [float(e) for e in atomrefs]
        self.atomrefs = refs
        self._atomrefs_tensor = {}

    def evaluation_mode(self, device):
        """How a call is evaluated: "groups" of molecules (CPU: see group_molecules) or the
        whole batch in "one_pass" (GPU: fewer, bigger kernels, no sync per group)."""
        if self.evaluation == "auto":
            return "groups" if torch.device(device).type == "cpu" else "one_pass"
        return self.evaluation

    def compile_network(self):
        """torch.compile the network (dynamic shapes: every batch has its own atom and pair
        counts) for the calls without a graph of the forces: NNP-optimization and
        validation. Training steps stay eager: torch.compile's autograd has no double
        backward, which a loss on forces needs (Eq. 2). On CPU the compiled network is used
        with one torch thread only: with 2 threads torch 2.13's CPU code for it gave wrong
        forces or crashed (tests/test_painn.py), so more threads run eagerly."""
        self.compiled_network = torch.compile(self.network, dynamic=True)
        return self


# ---------------------------------------------------------------------------------------
# Checkpoints: ours, and the official GOLF `NNP_checkpoint_actor` files
# ---------------------------------------------------------------------------------------

def model_state(model):
    """What a checkpoint needs to rebuild `model` with no flags."""
    return {"hparams": dict(model.hparams), "atomrefs": list(model.atomrefs),
            "state_dict": model.state_dict()}


def save_checkpoint(model, path, **extra):
    """Our checkpoint: model state (+ anything in `extra`, e.g. optimizer state), written
    whole or not at all (safe_io.atomic_write: a kill never leaves half a file)."""
    with safe_io.atomic_write(path) as tmp:
        torch.save({"model": model_state(model), **extra}, tmp)


OFFICIAL_PREFIX = "model.representation."


class CheckpointError(ValueError):
    """A file that is not a readable golf or official GOLF checkpoint."""


def from_official_state_dict(sd):
    """Map an official GOLF / schnetpack state dict to (hparams, our state dict).

    Hyperparameters are read from the shapes (filter_net: [n_int*3F, n_rbf])."""
    rep = {k[len(OFFICIAL_PREFIX):]: v for k, v in sd.items() if k.startswith(OFFICIAL_PREFIX)}
    n_features = rep["embedding.weight"].shape[1]
    n_rbf = rep["radial_basis.freqs"].shape[0]
    n_interactions = rep["filter_net.weight"].shape[0] // (3 * n_features)
    cutoff = float(rep["cutoff_fn.cutoff"].reshape(-1)[0])
    renamed = {"radial_basis.freqs": "rbf_frequencies"}
    ours = {renamed.get(k, k): v for k, v in rep.items() if k != "cutoff_fn.cutoff"}
    for k, v in sd.items():
        if k.startswith("model.output_modules.0.outnet."):
            ours["energy_head." + k[len("model.output_modules.0.outnet."):]] = v
    hparams = dict(n_atom_basis=n_features, n_interactions=n_interactions, n_rbf=n_rbf,
                   cutoff=cutoff)
    return hparams, ours


# The official files hold weights only. What their energies mean is in the authors'
# config.json of each run (shipped beside each file in models/official/): `env` and `db_path`
# name the training db, nablaDFT's (GOLF_train, traj-*) or their SPICE db (spice_train*), and
# `subtract_atomization_energy` says the network was trained on E - sum_i ref[z_i], with the
# `atomrefs` stored in that db's metadata (Hartree). Both kinds of db were labelled by the
# same oracle, wB97X-D/def2-SVP (App. E: "the same DFT-based oracle"; the GOLF-SPICE branch's
# dft_worker), and both hold nablaDFT's atomrefs. On ethanol at three geometries
# (benchmarks/official_spice_level.py; its numbers in models/official/README.md, checked by
# tests/test_calculator.py), the SPICE models follow wB97X-D/def2-SVP's forces and not
# those of SPICE's own level, wB97M-D3BJ/def2-TZVPPD, and with NABLADFT_ATOMREFS added they
# give wB97X-D/def2-SVP's total energy; SPICE's atomrefs would not.
OFFICIAL_TRAINING_SETS = {
    # training set: (level of the model's energies, atomrefs the network was trained without)
    "nablaDFT": ("wB97X-D/def2-SVP", NABLADFT_ATOMREFS),
    "SPICE": ("wB97X-D/def2-SVP", NABLADFT_ATOMREFS),
}
OFFICIAL_SUFFIX = ".NNP_checkpoint_actor"


def official_config(path):
    """(config path, dict) of the authors' config.json of an official checkpoint, or
    (None, None): `<name>.config.json` beside `<name>.NNP_checkpoint_actor` (models/official/),
    else `config.json` in the same folder (the authors' checkpoints/<name>/ layout)."""
    import json
    path = os.fspath(path)
    stem = path[:-len(OFFICIAL_SUFFIX)] if path.endswith(OFFICIAL_SUFFIX) else path
    for candidate in (stem + ".config.json", os.path.join(os.path.dirname(path), "config.json")):
        if os.path.isfile(candidate):
            try:
                with open(candidate) as f:
                    config = json.load(f)
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{candidate}: cannot read the config of {path} "
                                      f"({err}); fix or remove it") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{candidate}: not a GOLF config (a JSON object) for "
                                      f"{path}; fix or remove it")
            return candidate, config
    return None, None


def official_level(path):
    """(training set, level of theory, atomrefs) of an official checkpoint, from its config
    (official_config): training set 'SPICE' where the config's `env` or `db_path` names a
    SPICE db, else 'nablaDFT', also where there is no config (the paper's main set); atomrefs
    None where the config says the network learned total energies
    (`subtract_atomization_energy` false)."""
    _, config = official_config(path)
    config = config or {}
    names = f"{config.get('env', '')} {config.get('db_path', '')}".lower()
    training_set = "SPICE" if "spice" in names else "nablaDFT"
    level, atomrefs = OFFICIAL_TRAINING_SETS[training_set]
    if config.get("subtract_atomization_energy", True) in (False, "False", "false"):
        atomrefs = None
    return training_set, level, atomrefs


def load_checkpoint(path, device="cpu", atomrefs=None):
    """Rebuild a PaiNN from our checkpoint or from an official GOLF `NNP_checkpoint_actor`.

    Official files hold a plain state dict of a schnetpack NeuralNetworkPotential (keys
    `model.representation.*`, `model.output_modules.0.outnet.*`) that predicts E minus the
    atomrefs of its training db; loading one adds those (official_level: nablaDFT's for all
    11 published models, whose energies are all at wB97X-D/def2-SVP), so the model returns
    total energies. `atomrefs` ({z: Hartree}) replaces the references the file implies.
    """
    ckpt = read_checkpoint(path, device)
    official = isinstance(ckpt, dict) and f"{OFFICIAL_PREFIX}embedding.weight" in ckpt
    official_refs = official_level(path)[2] if official and atomrefs is None else None
    try:
        if isinstance(ckpt, dict) and "model" in ckpt and "state_dict" in ckpt["model"]:
            state = ckpt["model"]
            hparams, state_dict, refs = state["hparams"], state["state_dict"], state["atomrefs"]
        elif official:
            hparams, state_dict = from_official_state_dict(ckpt)
            refs = official_refs
        else:
            raise KeyError("model")
        refs = refs if atomrefs is None else atomrefs
        model = PaiNN(**hparams, atomrefs=refs).to(state_dict["embedding.weight"].dtype)
        model.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError):
        raise CheckpointError(f"{path} is neither a golf checkpoint nor an official "
                              "NNP_checkpoint_actor state dict; pass a checkpoint.pt of "
                              "train_baseline.py or golf.py") from None
    return model.to(device)


def model_elements(model):
    """Atomic numbers the model was trained on: those with a per-element reference energy
    in the checkpoint (train_baseline.py takes them from its training db, which holds the
    free-atom energies of its elements), except nablaDFT's atomrefs (the official models,
    and our dbs at its level), which also list P and I, absent from nablaDFT's molecules:
    then H C N O F S Cl Br."""
    refs = {z for z, e in enumerate(model.atomrefs) if e}
    return set(NABLADFT_ELEMENTS) if not refs or refs == set(NABLADFT_ATOMREFS) else refs


def read_checkpoint(path, device="cpu"):
    """torch.load of a checkpoint, tensors only (weights_only: no code runs). Anything that
    is not such a file is one CheckpointError; never a hint to load it unsafely."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    except Exception as err:    # UnpicklingError, zip errors, KeyError of a foreign format
        # torch's own text of a refused unpickling advises weights_only=False: not shown
        detail = " ".join(str(err).split())[:200] if isinstance(err, RuntimeError) \
            and "weights_only" not in str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a checkpoint torch can read safely "
                              f"({detail}); pass a checkpoint.pt of "
                              "train_baseline.py or golf.py, or an official "
                              "NNP_checkpoint_actor") from None


# ---------------------------------------------------------------------------------------
# ASE calculator: relax, run MD or compute frequencies with a trained NNP in ASE
# ---------------------------------------------------------------------------------------

try:   # ase is needed by GolfCalculator only: the rest of this file works without it
    from ase.calculators.calculator import Calculator, all_changes
    from ase.units import Hartree as HARTREE_TO_EV
except ImportError:
    Calculator, all_changes, HARTREE_TO_EV = object, None, None


class GolfCalculator(Calculator):
    """ASE calculator for any checkpoint that load_checkpoint reads (ours or an official
    `NNP_checkpoint_actor`), or for a loaded PaiNN:

        atoms.calc = GolfCalculator("models/official/GOLF-10k.NNP_checkpoint_actor")
        BFGS(atoms).run(fmax=0.01)

    Energy in eV and forces in eV/A, as ASE expects (the model works in Hartree and
    Hartree/A). Molecules only: the model has no periodic images, so pbc must be off.
    dtype float64 (default) gives forces that are the exact gradient of the energy to ~1e-9,
    which relaxations with line searches and frequency calculations need."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, checkpoint, device="cpu", dtype=torch.float64, atomrefs=None, **kwargs):
        if Calculator is object:
            raise ImportError("GolfCalculator needs ase: pip install ase")
        super().__init__(**kwargs)
        model = checkpoint if isinstance(checkpoint, nn.Module) else \
            load_checkpoint(checkpoint, device, atomrefs=atomrefs)   # atomrefs: see there
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)   # sets self.atoms
        if self.atoms.pbc.any():
            raise ValueError("GolfCalculator: the NNP is for isolated molecules; set "
                             "atoms.pbc = False")
        z = torch.as_tensor(self.atoms.numbers, device=self.device)                # [n_atoms]
        positions = torch.as_tensor(self.atoms.positions, dtype=self.dtype,
                                    device=self.device)                            # [n_atoms, 3] A
        batch = torch.zeros(len(z), dtype=torch.long, device=self.device)          # one molecule
        energy, forces = self.model(z, positions, batch, 1)                        # Hartree, Hartree/A
        energy_ev = float(energy.detach()[0]) * HARTREE_TO_EV
        self.results = {"energy": energy_ev, "free_energy": energy_ev,
                        "forces": forces.detach().cpu().double().numpy() * HARTREE_TO_EV}
