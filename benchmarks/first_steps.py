"""Why NNP optimizations explode: the first L-BFGS steps of an NNP, measured against GFN2-xTB.

For every conformation of --db, the batched L-BFGS of evaluate.py (the paper's settings:
lr 1, 5 iterations a step, history 100; --max_step to cap it) takes --steps steps twice:
    NNP      on the checkpoint's energy and forces (what evaluate.py and golf.py do)
    xTB      on GFN2-xTB's own energy and forces (the same optimizer, an exact potential)
and, at every step t of the NNP run, xTB and MMFF94 label s_{t-1} and s_t. Prints per step:
    the largest atom displacement |s_t - s_{t-1}| (median, p90, max; share > 0.5 and > 2 A),
    for the NNP run and for the xTB run (is a big step L-BFGS's doing or the NNP's?),
    the shares of NNP steps on which xTB's energy rose and MMFF's energy rose, and how often
    the two disagree (GOLF sends a conformation when MMFF rises: Algorithm 1, line 7),
and the NNP's force error against xTB at s_0 beside the step-1 displacement (Spearman).

    python benchmarks/first_steps.py --checkpoint runs/demo/baseline/checkpoint.pt \\
        --db runs/demo/data/test.db [--steps 3] [--max_step 0.2] [--max_conformations 60]
        [--stride 25]     (every 25th row: e.g. D0's own conformations, one per molecule)
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import optimizers  # noqa: E402
import oracles  # noqa: E402
import painn  # noqa: E402


def xtb_energy_and_forces(method, confs):
    """energy_and_forces(positions [n_atoms, 3]) for the optimizers, from xTB in this
    process: energies [S] Hartree, forces [n_atoms, 3] Hartree/A. A failed SCC: NaN."""
    charges = [oracles.charge_and_multiplicity(c.numbers, c.smiles) for c in confs]

    def energy_and_forces(positions, batch):      # batch [n_atoms]: slot of every atom
        e = torch.zeros(len(confs), dtype=torch.float64)
        f = torch.zeros_like(positions, dtype=torch.float64)
        for k, c in enumerate(confs):
            mask = batch == k
            try:
                energy, grad = oracles.xtb_gradient(method, c.numbers, positions[mask].numpy(),
                                                    *charges[k], {})
            except Exception:          # noqa: BLE001 - tblite's SCC error, atoms far apart
                energy, grad = float("nan"), np.full((int(mask.sum()), 3), np.nan)
            e[k] = energy
            f[mask] = torch.as_tensor(-grad / data.BOHR_TO_ANGSTROM)
        return e, f
    return energy_and_forces


def run_steps(args, confs, energy_and_forces, steps):
    """positions [steps + 1] of per-conformation arrays: s_0 .. s_steps."""
    b = data.collate(confs, "cpu", torch.float64)
    opt = optimizers.optimizer_from_args(args, b.positions, b.batch, len(confs))
    out = [[opt.slot_positions(k).numpy().copy() for k in range(len(confs))]]
    for _ in range(steps):
        opt.step(lambda x: energy_and_forces(x, opt))
        out.append([opt.slot_positions(k).numpy().copy() for k in range(len(confs))])
    return out


def largest_displacement(a, b):
    return float(np.linalg.norm(a - b, axis=1).max())


def describe(v):
    v = np.asarray(v)
    return (f"median {np.median(v):.3f}, p90 {np.percentile(v, 90):.3f}, max {v.max():.3g} A; "
            f"> 0.5 A: {100 * (v > 0.5).mean():.0f} %, > 2 A: {100 * (v > 2).mean():.0f} %")


def spearman(a, b):
    ra, rb = (np.argsort(np.argsort(x)) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max_conformations", type=int, default=60)
    p.add_argument("--stride", type=int, default=1, help="every N-th row of --db")
    p.add_argument("--xtb_method", default="gfn2-xtb")
    optimizers.add_optimizer_args(p)
    args = optimizers.parse_args_with_preset(p)
    torch.manual_seed(0)
    confs, _ = data.read_db(args.db, verbose=False)
    confs = confs[::args.stride][:args.max_conformations]
    model = painn.load_checkpoint(args.checkpoint, "cpu").eval()

    def nnp_energy_and_forces(positions, opt):
        z = opt.concat_slots([torch.as_tensor(c.numbers) for c in confs])
        e, f = model(z, positions.float(), opt.batch, opt.n_slots)
        return e.detach().double(), f.detach().double()

    xtb_batch = xtb_energy_and_forces(args.xtb_method, confs)

    def xtb(positions, opt):
        return xtb_batch(positions, opt.batch)

    nnp_run = run_steps(args, confs, nnp_energy_and_forces, args.steps)
    xtb_run = run_steps(args, confs, xtb, args.steps)
    surrogates = [oracles.MMFFSurrogate(c) for c in confs]
    print(f"{len(confs)} conformations of {args.db}, {args.checkpoint}; L-BFGS lr "
          f"{args.conf_opt_lr or 1.0}, {args.max_iter} iterations a step, max_step "
          f"{args.max_step}")

    # the NNP's force error at s_0 against xTB, per conformation (kcal/mol/A)
    b = data.collate(confs, "cpu", torch.float64)
    layout = optimizers.optimizer_from_args(args, b.positions, b.batch, len(confs))
    _, f_nnp = nnp_energy_and_forces(b.positions, layout)
    _, f_xtb = xtb_batch(b.positions, b.batch)
    force_mae = [float((f_nnp[b.batch == k] - f_xtb[b.batch == k]).abs().mean())
                 * data.HARTREE_TO_KCAL for k in range(len(confs))]
    print(f"NNP force MAE against xTB at s_0: mean {np.mean(force_mae):.2f} kcal/mol/A")
    for t in range(1, args.steps + 1):
        d_nnp = [largest_displacement(nnp_run[t][k], nnp_run[t - 1][k]) for k in range(len(confs))]
        d_xtb = [largest_displacement(xtb_run[t][k], xtb_run[t - 1][k]) for k in range(len(confs))]
        print(f"step {t}: largest atom displacement, NNP run: {describe(d_nnp)}")
        print(f"step {t}: largest atom displacement, xTB run: {describe(d_xtb)}")
        if t == 1:
            print(f"step 1: Spearman(NNP force MAE at s_0, NNP step-1 displacement) = "
                  f"{spearman(force_mae, d_nnp):+.2f}")
        # energies before and after the NNP's step t
        pos = [[nnp_run[s][k] for k in range(len(confs))] for s in (t - 1, t)]
        e_x = []
        for s in range(2):
            flat = torch.as_tensor(np.concatenate(pos[s]))
            e_x.append(xtb_batch(flat, b.batch)[0].numpy())
        rise_x = e_x[1] > e_x[0]
        failed = ~np.isfinite(e_x[1])
        rise_m = np.array([sur.energy(pos[1][k]) > sur.energy(pos[0][k])
                           for k, sur in enumerate(surrogates)])
        rise_x = rise_x | failed
        print(f"step {t}: NNP steps on which xTB rose {100 * rise_x.mean():.0f} % "
              f"(SCC failed {int(failed.sum())}), MMFF rose {100 * rise_m.mean():.0f} %; "
              f"MMFF rose, xTB fell {100 * (rise_m & ~rise_x).mean():.0f} %; "
              f"MMFF fell, xTB rose {100 * (~rise_m & rise_x).mean():.0f} %")


if __name__ == "__main__":
    main()
