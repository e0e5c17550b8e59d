"""Neighbour lists: our plain-torch painn.neighbor_pairs against torch_cluster.radius_graph.

    python benchmarks/neighbors.py [--threads 2] [--n_molecules 64] [--repeats 20]

Workload: `--n_molecules` drug-like molecules of 36-44 atoms with hydrogens (the first
SMILES of data/moses_sample.smi with that many atoms, one RDKit ETKDG conformer each, fixed
seed), float32 positions, cutoff 5 A. Both must return the same set of ordered pairs (i, j),
i != j, same molecule, |r_i - r_j| < cutoff; the script asserts it.

  * ours: painn.neighbor_pairs (padded [n_molecules, max_n, max_n] block, torch.cdist, mask
    within the cutoff, no self pairs), with skin=0 so that the sets can be compared exactly
    (the model uses a skin of 1e-4 A: extra pairs just beyond the cutoff get weight 0);
  * torch_cluster.radius_graph(positions, r=cutoff, batch=batch, max_num_neighbors=1000),
    if torch_cluster is importable. It is an optional benchmark dependency: PyPI has only
    its source (about 15 minutes to compile on 2 cores); a prebuilt wheel:
        pip install torch-cluster -f https://data.pyg.org/whl/torch-2.13.0+cpu.html
    Its edge_index is (row, col) = (source j, target i) with the default
    flow="source_to_target", so pair (i, j) is (edge_index[1], edge_index[0]);
  * matscipy's neighbour_list, molecule by molecule: what schnetpack's
    MatScipyNeighborList does for benchmarks/painn.py (numpy, no batching).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import painn  # noqa: E402
from molecules import load_molecules  # noqa: E402

CUTOFF = 5.0


def timeit(fn, repeats, warmup=3, min_time=0.1):
    """Median seconds per call of fn() over `repeats` repeats (each looping fn for about
    min_time seconds), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    loops = max(1, int(min_time / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t0) / loops)
    return statistics.median(times)


def pair_set(idx_i, idx_j):
    return set(zip(idx_i.tolist(), idx_j.tolist()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--n_molecules", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load: {load}")

    mols = load_molecules(args.n_molecules, 36, 44)
    z = np.concatenate([m[0] for m in mols])
    pos = torch.as_tensor(np.concatenate([m[1] for m in mols]), dtype=torch.float32)
    counts = torch.tensor([len(m[0]) for m in mols])
    batch = torch.repeat_interleave(torch.arange(len(mols)), counts)
    n_mol = len(mols)

    idx_i, idx_j = painn.neighbor_pairs(pos, batch, n_mol, CUTOFF, skin=0.0)
    ours = pair_set(idx_i, idx_j)
    print(f"{n_mol} molecules, {len(z)} atoms ({len(z) / n_mol:.1f} per molecule), "
          f"{len(ours)} ordered pairs within {CUTOFF} A")

    # the reference set, by brute force in float64
    d = torch.cdist(pos.double(), pos.double())
    same = batch[:, None] == batch[None, :]
    want = (d < CUTOFF) & same & ~torch.eye(len(z), dtype=torch.bool)
    assert ours == pair_set(*want.nonzero(as_tuple=True)), "ours differs from brute force"

    rows = []
    rows.append(("ours: painn.neighbor_pairs, skin=0",
                 timeit(lambda: painn.neighbor_pairs(pos, batch, n_mol, CUTOFF, skin=0.0),
                        args.repeats)))
    rows.append(("ours: painn.neighbor_pairs, skin=1e-4 (model)",
                 timeit(lambda: painn.neighbor_pairs(pos, batch, n_mol, CUTOFF), args.repeats)))
    try:
        import torch_cluster
    except ImportError:
        print("torch_cluster is not installed (optional benchmark dependency); to compare:\n"
              "    pip install torch-cluster -f https://data.pyg.org/whl/torch-2.13.0+cpu.html")
    else:
        edge_index = torch_cluster.radius_graph(pos, r=CUTOFF, batch=batch,
                                                max_num_neighbors=1000)
        # flow="source_to_target": edge_index = (row, col) = (source j, target i)
        theirs = pair_set(edge_index[1], edge_index[0])
        assert theirs == ours, (f"torch_cluster differs: {len(theirs - ours)} extra, "
                                f"{len(ours - theirs)} missing pairs")
        print("torch_cluster.radius_graph returns the same pair set")
        rows.append(("torch_cluster.radius_graph",
                     timeit(lambda: torch_cluster.radius_graph(pos, r=CUTOFF, batch=batch,
                                                               max_num_neighbors=1000),
                            args.repeats)))
    try:
        from ase import Atoms
        from matscipy.neighbours import neighbour_list
    except ImportError:
        pass
    else:
        atoms = []
        for zm, pm in zip([m[0] for m in mols], torch.split(pos.double(), counts.tolist())):
            # matscipy bins atoms in the cell: a box around the molecule, no periodicity
            pm = (pm - pm.min(0).values + CUTOFF).numpy()
            atoms.append(Atoms(numbers=zm, positions=pm, cell=np.diag(pm.max(0) + CUTOFF),
                               pbc=False))
        first = torch.cumsum(counts, 0) - counts
        pairs = [neighbour_list("ij", a, CUTOFF) for a in atoms]
        theirs = set()
        for k, (i, j) in enumerate(pairs):
            theirs |= pair_set(torch.as_tensor(i) + first[k], torch.as_tensor(j) + first[k])
        same_set = theirs == ours
        print(f"matscipy neighbour_list returns "
              f"{'the same pair set' if same_set else f'{len(theirs ^ ours)} different pairs'}")
        rows.append(("matscipy neighbour_list, per molecule (schnetpack)",
                     timeit(lambda: [neighbour_list("ij", a, CUTOFF) for a in atoms],
                            max(3, args.repeats // 4))))

    print(f"\nneighbour list of all {n_mol} molecules, median of {args.repeats} repeats")
    for name, t in rows:
        print(f"  {name:52s}{t * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
