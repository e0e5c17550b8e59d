"""Speed of our PaiNN (painn.py) against schnetpack 2.1.1's PaiNN, same sizes, same weights.

    python benchmarks/painn.py [--threads 2] [--n_molecules 64] [--repeats 7] [--device cpu]

Workload: `--n_molecules` drug-like molecules of 30-40 atoms with hydrogens (the first
SMILES of data/moses_sample.smi that have that many atoms, one RDKit ETKDG conformer each,
fixed seed), PaiNN of Table 5 (n_atom_basis 128, n_interactions 3, n_rbf 50, cutoff 5 A),
float32, on --device (cpu or cuda). schnetpack's model is representation PaiNN + Atomwise + Forces in a
NeuralNetworkPotential with a PairwiseDistances input module; ours gets its weights through
painn.from_official_state_dict, the mapping used for the official GOLF checkpoints.

Timed (median of --repeats after warm-up):
  * energy + forces of all molecules in one call (inference: no graph kept);
  * a training step: energy + forces with create_graph=True,
    loss = mse(E) + mse(F), loss.backward();
  * cost per molecule of energy + forces when the same molecules are fed in calls of
    1, 8 and n_molecules molecules, for both evaluation modes of our model (groups of
    molecules, the CPU default; one pass per call, the GPU default).
schnetpack's neighbour list (MatScipyNeighborList via AtomsConverter) is computed once,
outside the timing; ours builds its neighbour pairs inside every call.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
import typing

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import painn  # noqa: E402
from molecules import load_molecules  # noqa: E402

SIZES = dict(n_atom_basis=128, n_interactions=3, n_rbf=50, cutoff=5.0)  # Table 5


def flat(mols, dtype, device="cpu"):
    """Our input layout: z [n_atoms], positions [n_atoms, 3], batch [n_atoms]."""
    z = torch.as_tensor(np.concatenate([m[0] for m in mols]))
    pos = torch.as_tensor(np.concatenate([m[1] for m in mols]), dtype=dtype)
    batch = torch.repeat_interleave(torch.arange(len(mols)),
                                    torch.tensor([len(m[0]) for m in mols]))
    return z.to(device), pos.to(device), batch.to(device)


def import_schnetpack():
    import torch.utils.data.dataloader as dataloader
    if not hasattr(dataloader, "T_co"):  # schnetpack 2.1.1 imports a name torch 2.13 dropped
        dataloader.T_co = typing.TypeVar("T_co", covariant=True)
    import schnetpack
    return schnetpack


def schnetpack_model(spk):
    representation = spk.representation.PaiNN(
        n_atom_basis=SIZES["n_atom_basis"], n_interactions=SIZES["n_interactions"],
        radial_basis=spk.nn.BesselRBF(n_rbf=SIZES["n_rbf"], cutoff=SIZES["cutoff"]),
        cutoff_fn=spk.nn.CosineCutoff(SIZES["cutoff"]))
    return spk.model.NeuralNetworkPotential(
        representation=representation,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=SIZES["n_atom_basis"], output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")])


def schnetpack_inputs(spk, mols, device="cpu"):
    """schnetpack's batch dict, neighbour list included (computed here, not timed)."""
    from ase import Atoms
    converter = spk.interfaces.AtomsConverter(
        neighbor_list=spk.transform.MatScipyNeighborList(cutoff=SIZES["cutoff"]),
        dtype=torch.float32)
    inputs = converter([Atoms(numbers=z, positions=p) for z, p in mols])
    return {k: v.to(device) for k, v in inputs.items()}


def same_weights(spk, seed, device):
    """schnetpack's NNP (non-zero biases, as a trained model has) and ours with its
    weights, float32, on device; and (hparams, state_dict) to build more of ours."""
    torch.manual_seed(seed)
    nnp = schnetpack_model(spk)
    with torch.no_grad():
        for name, p in nnp.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hparams, state_dict = painn.from_official_state_dict(
        {"model." + k: v for k, v in nnp.state_dict().items()})
    ours = painn.PaiNN(**hparams)
    ours.load_state_dict(state_dict)
    return nnp.to(device), ours.float().to(device), hparams, state_dict


def synchronize():
    """Wait for the GPU (if any): a timing must include the kernels a call queued."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def compare(fns, repeats, warmup=2, min_time=0.2):
    """Median seconds per call of each fn() in `fns`, over `repeats` rounds after `warmup`
    calls. The functions take turns within each round, so that a change of load on the
    machine hits all of them alike; a round loops each fn for about min_time seconds."""
    loops = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        loops.append(max(1, int(min_time / max(time.perf_counter() - t0, 1e-9))))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, t in zip(fns, loops, times):
            synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            synchronize()
            t.append((time.perf_counter() - t0) / n)
    return [statistics.median(t) for t in times]


def load_average():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--n_molecules", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0, help="ETKDG and weight seed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(os.cpu_count() = {os.cpu_count()}), float32, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"load before the run: {load_average()}")
    print("(other processes on the machine slow both models down and make the timings "
          "noisy; the two models take turns, so the ratios hold up better than the times)")

    mols = load_molecules(args.n_molecules, 30, 40, seed=args.seed)
    n_atoms = sum(len(m[0]) for m in mols)
    z, pos, batch = flat(mols, torch.float32, device)
    n_pairs = len(painn.neighbor_pairs(pos, batch, len(mols), SIZES["cutoff"], skin=0.0)[0])
    print(f"{len(mols)} molecules, {n_atoms} atoms ({n_atoms / len(mols):.1f} per molecule), "
          f"{n_pairs} ordered pairs within {SIZES['cutoff']} A "
          f"({n_pairs / sum(len(m[0]) * (len(m[0]) - 1) for m in mols):.0%} of all pairs)")
    print(f"model: PaiNN {SIZES}")

    # --- the same weights in both models -------------------------------------------------
    spk = import_schnetpack()
    nnp, ours, hparams, state_dict = same_weights(spk, args.seed, device)
    inputs = schnetpack_inputs(spk, mols, device)

    def spk_call(training):
        nnp.train(training)  # schnetpack's Forces keeps the graph when training
        return nnp(dict(inputs))

    nnp.eval(), ours.eval()
    out = {k: v.detach() for k, v in spk_call(False).items()}
    energy, forces = (t.detach() for t in ours(z, pos, batch))
    e_diff = float((energy.float() - out["energy"]).abs().max())
    f_diff = float((forces - out["forces"]).abs().max())
    print(f"same function: max |dE| = {e_diff:.2e}, max |dF| = {f_diff:.2e} "
          f"(float32; |E| ~ {float(out['energy'].abs().mean()):.2f}, "
          f"|F| ~ {float(out['forces'].abs().mean()):.3f})")
    target_e = torch.randn_like(energy, dtype=torch.float32)
    target_f = torch.randn_like(forces)

    # --- energy + forces, and a training step --------------------------------------------
    def ours_ef():
        ours.eval()
        ours(z, pos, batch)

    def spk_ef():
        spk_call(False)

    def ours_train():
        ours.train()
        ours.zero_grad(set_to_none=True)
        e, f = ours(z, pos, batch, create_graph=True)
        loss = F.mse_loss(e.float(), target_e) + F.mse_loss(f, target_f)
        loss.backward()

    def spk_train():
        nnp.zero_grad(set_to_none=True)
        o = spk_call(True)
        loss = F.mse_loss(o["energy"], target_e) + F.mse_loss(o["forces"], target_f)
        loss.backward()

    print(f"\n{len(mols)} molecules per call, median of {args.repeats} repeats "
          "(schnetpack: neighbour list precomputed, not timed; ours: built in every call)")
    print(f"{'':24s}{'ours':>10s}{'schnetpack':>12s}{'speed-up':>10s}")
    for name, f_ours, f_spk in [("energy + forces", ours_ef, spk_ef),
                                ("training step", ours_train, spk_train)]:
        t_ours, t_spk = compare([f_ours, f_spk], args.repeats)
        print(f"{name:24s}{t_ours * 1e3:8.1f}ms{t_spk * 1e3:10.1f}ms{t_spk / t_ours:9.2f}x")

    # --- per-molecule cost vs molecules per call -----------------------------------------
    print(f"\nenergy + forces, cost per molecule when the {len(mols)} molecules are fed "
          "k per call;\nour model in its two evaluation modes: molecule groups "
          "(painn.group_molecules, the CPU default) and the whole call in one pass "
          f"(the GPU default); on {device} 'auto' is {ours.evaluation_mode(device)}")
    print(f"{'k':>6s}{'ours, groups':>14s}{'ours, 1 pass':>14s}{'schnetpack':>14s}")
    groups = painn.PaiNN(**hparams)
    groups.load_state_dict(state_dict)
    groups.float().to(device).eval()
    groups.evaluation = "groups"
    one_pass = painn.PaiNN(**hparams)
    one_pass.load_state_dict(state_dict)
    one_pass.float().to(device).eval()
    one_pass.evaluation = "one_pass"
    ours.eval(), nnp.eval()
    for k in sorted({1, 8, len(mols)}):
        chunks = [mols[s:s + k] for s in range(0, len(mols), k)]
        ours_batches = [flat(c, torch.float32, device) for c in chunks]
        spk_batches = [schnetpack_inputs(spk, c, device) for c in chunks]
        fns = [lambda m=m: [m(*b) for b in ours_batches] for m in (groups, one_pass)]
        fns.append(lambda: [nnp(dict(b)) for b in spk_batches])
        times = compare(fns, max(3, args.repeats // 2))
        print(f"{k:6d}" + "".join(f"{t / len(mols) * 1e3:{w}.2f}ms"
                                  for t, w in zip(times, (12, 12, 12))))
    print(f"\nload after the run: {load_average()}")


if __name__ == "__main__":
    main()
