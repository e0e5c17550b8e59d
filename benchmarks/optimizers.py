"""Speed of the batched L-BFGS (optimizers.BatchedLBFGS) against the official code's way,
one torch.optim.LBFGS and one NNP call per molecule per evaluation.

Molecules: the first --n_molecules SMILES of data/moses_sample.smi with --min_atoms to
--max_atoms atoms (hydrogens included), one RDKit ETKDG conformer each (fixed seed).
Model: painn.PaiNN(128, 3, 50, 5.0) with a fixed random initialisation (or --checkpoint),
called in float32 as in training, plus a harmonic restraint to the start conformer
(--restraint; a random PaiNN has no minimum, and without it L-BFGS flings atoms apart).
Both runs do --steps trajectory steps of the paper's L-BFGS (lr 1, max_iter 5, history
100) and never flag a molecule converged (grad_threshold -1), so they do the same work.
The batched run evaluates, in each call, only the molecules still in their inner loop
(opt.evaluating), unless --whole_batch.

Prints: wall time of both runs and their ratio (goal >= 20x), and the share of the batched
run spent outside the NNP call (goal <= 10%). On a shared CPU use --threads 1: with 2
threads and another busy process, torch's thread pool waits and timings explode.

    .venv/bin/python benchmarks/optimizers.py --n_molecules 64 --steps 100 --threads 1
    .venv/bin/python benchmarks/optimizers.py --device cuda --reference_steps 10

On a GPU every NNP call is timed between two torch.cuda.synchronize(); the L-BFGS step
syncs once per inner iteration anyway (its exit test), so this adds little.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import optimizers  # noqa: E402
import painn  # noqa: E402
from molecules import load_molecules  # noqa: E402




def restrained(energy, forces, positions, start, batch, n_molecules, k):
    """Add E = k/2 |X - X_start|^2 per molecule (k in Hartree/A^2): a random-weight PaiNN has
    no minimum and L-BFGS would fling atoms out of each other's cutoff (cheap, unrealistic
    calls); the restraint keeps every molecule near its conformer in both runs."""
    if k == 0:
        return energy, forces
    diff = positions - start
    energy = energy + torch.zeros_like(energy).index_add(
        0, batch, (0.5 * k * (diff ** 2).sum(1)).to(energy.dtype))
    return energy, forces - k * diff


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batched(model, mols, steps, history, k, whole_batch):
    """All molecules in one BatchedLBFGS; returns (wall s, s inside the model, calls, opt)."""
    z = torch.cat([m[0] for m in mols])
    pos = torch.cat([m[1] for m in mols])
    device = pos.device
    start = pos.float()
    batch = torch.repeat_interleave(torch.arange(len(mols), device=device),
                                    torch.tensor([len(m[0]) for m in mols], device=device))
    opt = optimizers.BatchedLBFGS(pos, batch, len(mols), history_size=history,
                                  grad_threshold=-1.0, model_dtype=torch.float32)
    in_model = [0.0, 0]

    def energy_and_forces(positions):
        synchronize(device)
        t0 = time.perf_counter()
        keep = opt.evaluating[opt.batch]          # atoms of molecules still iterating
        if whole_batch or bool(keep.all()):
            energy, forces = model(z, positions, opt.batch, opt.n_slots)
        else:
            energy, forces_kept = model(z[keep], positions[keep], opt.batch[keep], opt.n_slots)
            forces = positions.new_zeros(positions.shape)
            forces[keep] = forces_kept
        synchronize(device)
        in_model[0] += time.perf_counter() - t0
        in_model[1] += 1
        return restrained(energy, forces, positions, start, opt.batch, opt.n_slots, k)

    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(energy_and_forces)
    synchronize(device)
    wall = time.perf_counter() - t0
    return wall, in_model[0], in_model[1], opt


def run_per_molecule(model, mols, steps, history, k):
    """The official code's way: one torch.optim.LBFGS and one model call per molecule."""
    states = []
    for z, pos in mols:
        X = pos.clone().requires_grad_(True)
        states.append((z, X, torch.optim.LBFGS([X], lr=1.0, max_iter=5, history_size=history)))
    in_model = [0.0, 0]

    def make_closure(z, X):
        zeros = torch.zeros(len(z), dtype=torch.long, device=X.device)
        start = X.detach().float().clone()

        def closure():
            t0 = time.perf_counter()
            positions = X.detach().float()
            energy, forces = model(z, positions, zeros, 1)
            in_model[0] += time.perf_counter() - t0
            in_model[1] += 1
            energy, forces = restrained(energy, forces, positions, start, zeros, 1, k)
            X.grad = -forces.double()
            return energy[0]
        return closure

    closures = [make_closure(z, X) for z, X, _ in states]
    device = states[0][1].device
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        for (_, _, lbfgs), closure in zip(states, closures):
            lbfgs.step(closure)
    synchronize(device)
    wall = time.perf_counter() - t0
    return wall, in_model[0], in_model[1], [X.detach() for _, X, _ in states]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_molecules", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--reference_steps", type=int, default=None,
                   help="steps of the per-molecule run (default: --steps); its time is scaled "
                        "to --steps if fewer")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--min_atoms", type=int, default=30)
    p.add_argument("--max_atoms", type=int, default=40)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smiles", default=os.path.join(ROOT, "data", "moses_sample.smi"))
    p.add_argument("--checkpoint", default=None, help="PaiNN checkpoint (default: random init)")
    p.add_argument("--n_atom_basis", type=int, default=128, help="PaiNN width (random init)")
    p.add_argument("--n_interactions", type=int, default=3, help="PaiNN depth (random init)")
    p.add_argument("--restraint", type=float, default=1.0,
                   help="k of a harmonic restraint to the start conformer, Hartree/A^2 (0: off)")
    p.add_argument("--whole_batch", action="store_true",
                   help="evaluate every molecule in every call, also those that left their "
                        "inner L-BFGS loop (default: only opt.evaluating molecules)")
    p.add_argument("--skip_reference", action="store_true", help="only the batched run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--profile", action="store_true", help="cProfile the batched run")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    mols = [(torch.as_tensor(z, device=device), torch.as_tensor(pos, device=device)) for z, pos in
            load_molecules(args.n_molecules, args.min_atoms, args.max_atoms, args.seed, args.smiles)]
    if args.checkpoint:
        model = painn.load_checkpoint(args.checkpoint)
    else:
        model = painn.PaiNN(n_atom_basis=args.n_atom_basis, n_interactions=args.n_interactions,
                            n_rbf=50, cutoff=5.0)
    model = model.float().to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    n_atoms = sum(len(m[0]) for m in mols)
    print(f"{len(mols)} molecules, {n_atoms} atoms, {args.steps} L-BFGS steps "
          f"(lr 1, max_iter 5, history {args.history}), {args.threads} threads, PaiNN "
          f"{model.hparams['n_atom_basis']} x {model.hparams['n_interactions']}, restraint "
          f"{args.restraint}, {device}; load average {os.getloadavg()[0]:.1f}")

    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
    wall_b, model_b, calls_b, opt = run_batched(model, mols, args.steps, args.history,
                                              args.restraint, args.whole_batch)
    if args.profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    outside = wall_b - model_b
    print(f"batched:      {wall_b:8.2f} s  ({calls_b} model calls, "
          f"{int(opt.n_evals.sum())} molecule evaluations, {1e3 * wall_b / args.steps:.1f} ms/step)")
    print(f"  inside the NNP call: {model_b:8.2f} s   outside: {outside:.2f} s = "
          f"{100 * outside / wall_b:.1f}% of the batched run (goal <= 10%)")

    if args.skip_reference:
        return
    ref_steps = args.reference_steps or args.steps
    wall_r, model_r, calls_r, final_r = run_per_molecule(model, mols, ref_steps, args.history,
                                                         args.restraint)
    scaled = wall_r * args.steps / ref_steps
    note = "" if ref_steps == args.steps else f" (measured {wall_r:.2f} s for {ref_steps} steps, scaled)"
    print(f"per molecule: {scaled:8.2f} s  ({calls_r} model calls){note}")
    print(f"  inside the NNP calls: {model_r:8.2f} s   outside: {wall_r - model_r:.2f} s "
          f"(torch.optim.LBFGS + Python) for {ref_steps} steps")
    print(f"optimizer time per step, batched vs per molecule: {1e3 * outside / args.steps:.1f} ms "
          f"vs {1e3 * (wall_r - model_r) / ref_steps:.1f} ms")
    print(f"NNP time per molecule evaluation: batched {1e3 * model_b / int(opt.n_evals.sum()):.1f} ms"
          f" vs alone {1e3 * model_r / calls_r:.1f} ms")
    print(f"speed-up batched / per molecule: {scaled / wall_b:.1f}x (goal >= 20x); "
          f"load average {os.getloadavg()[0]:.1f} (other processes distort timings)")
    if ref_steps == args.steps:
        # float32 NNP: the two runs agree up to the model's rounding, not bit for bit
        dev = max(float((opt.slot_positions(k) - final_r[k]).norm(dim=1).max())
                  for k in range(len(mols)))
        print(f"largest final position difference batched vs per molecule: {dev:.2e} A")


if __name__ == "__main__":
    main()
