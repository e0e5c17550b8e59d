"""The two oracles of GOLF: the genuine one (DFT in Psi4, or GFN2-xTB in tblite) and the
surrogate one (MMFF94 in RDKit).

GOLF (Tsypin et al., ICLR 2024) improves an NNP with conformations labelled by the *genuine
oracle*, the DFT method of the training data: wB97X-D/def2-SVP in Psi4, as nablaDFT.
GFN2-xTB (semiempirical tight binding, Bannwarth et al. 2019) in tblite is a genuine oracle
too, hundreds of times cheaper than HF/STO-3G (benchmarks/oracle_cost.py), with geometries
close to DFT's: method names starting with "gfn" run in tblite, every other method in Psi4.
The *surrogate oracle*, MMFF94 at tens of microseconds per energy, is the cheap one: an
NNP-optimization trajectory ends where its MMFF energy rises (Algorithm 1, lines 6-7).

Genuine oracle, in this process
-------------------------------
    psi4_gradient(psi4, method, numbers, positions, charge, multiplicity)
        -> energy (Hartree), gradient [n_atoms, 3] (Hartree/Bohr)
    psi4_optimize(..., max_steps, on_step, opt_coordinates)    optking; on_step gets every
                                                    gradient
    xtb_gradient(method, numbers, positions, charge, multiplicity, options)   the same, tblite
    xtb_optimize(..., max_steps, on_step)           ASE's BFGS in Cartesian coordinates,
                                                    down to Psi4's default max force
    isolated_atom_energies(pool, elements)          {z: Hartree}: the atomrefs of a dataset

A genuine-oracle call costs CPU-minutes and may crash or never end, so the stage scripts
run these calls in worker processes, with timeouts and retries: oracle_pool.py
(make_oracle_pool(args) from the flags of add_oracle_args).

Surrogate oracle
----------------
    MMFFSurrogate(conf).energy(positions [n_atoms, 3]) -> kcal/mol, force field built once
    mmff_minimize_checked(conf, max_iters=MMFF_MAX_ITERS) -> positions [n_atoms, 3], converged
    mmff_minimize(conf, max_iters=MMFF_MAX_ITERS) -> positions [n_atoms, 3]

Units: positions Angstrom, energies Hartree, forces Hartree/Angstrom. Psi4 and tblite work
in Bohr: their gradients (Hartree/Bohr) are converted with data.BOHR_TO_ANGSTROM. MMFF:
kcal/mol. This module imports no torch: the oracle workers import it and start fast.
"""
import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem, rdDetermineBonds

import data

DEFAULT_METHOD = "wb97x-d/def2-svp"   # the paper's level of theory, and nablaDFT's
XTB_METHODS = {"gfn2-xtb": "GFN2-xTB", "gfn1-xtb": "GFN1-xTB"}   # --oracle_method -> tblite
# SCC convergence of tblite (1 is its default; smaller is tighter). xtb pairs 0.2 and 0.05
# with gradient thresholds around Psi4's 3e-4 Hartree/Bohr ("tight", "vtight"); 0.1 keeps
# the gradient converged far below that threshold for little more time than 1
# (docs/oracles.md).
XTB_ACCURACY = 0.1
# Optimizations stop when every atom's force is below Psi4's default (QCHEM) max force,
# 3e-4 Hartree/Bohr = 3e-4 * 27.2114 eV / 0.529177 A = 0.0154 eV/A. ASE compares each
# atom's force norm, Psi4 the largest internal-coordinate force: ours is the tighter test.
XTB_MAX_FORCE = 3e-4            # Hartree/Bohr
# Most gradients of an optimization (--max_opt_steps). Sec. 3 runs the genuine oracle's
# optimizations until they converge, and App. D's nablaDFT trajectories average ~100
# steps, so a cap near 100 would cut about half of them short: Psi4's 1000 is a safety cap
# (optking's own geom_maxiter is 50). ASE's BFGS takes a few hundred steps on drug-like
# molecules from ETKDG (docs/oracles.md): 500 for xTB.
DEFAULT_MAX_OPT_STEPS = {"psi4": 1000, "xtb": 500}
# Coordinates of Psi4's optimizer (optking's opt_coordinates). The paper names no
# coordinates for nablaDFT's trajectories behind D_traj; App. E says SPICE's DFT
# trajectories were optimized "in spherical coordinates instead of Cartesian", which implies
# nablaDFT's were Cartesian. optking's own default is redundant internals (our reading of
# App. E for SPICE). xTB's BFGS (ASE) works in Cartesian coordinates only.
OPT_COORDINATES = ("cartesian", "redundant", "internal", "delocalized", "natural", "both")
DEFAULT_OPT_COORDINATES = "cartesian"


class OracleError(RuntimeError):
    """The oracle cannot run at all (Psi4 missing, Dask unreachable, a bad flag): one line."""


def is_xtb(method):
    """A GFN-xTB method runs in tblite; every other method in Psi4."""
    return method.strip().lower().startswith("gfn")


def default_max_opt_steps(method):
    """--max_opt_steps when not given: 1000 for Psi4 (to convergence, Sec. 3), 500 for xTB."""
    return DEFAULT_MAX_OPT_STEPS["xtb" if is_xtb(method) else "psi4"]


# ---------------------------------------------------------------------------------------
# Psi4 in this process
# ---------------------------------------------------------------------------------------

def charge_and_multiplicity(numbers, smiles=None):
    """Total charge from the SMILES formal charges (0 without a SMILES) and the lowest spin
    multiplicity: singlet for an even number of electrons, doublet for an odd one."""
    charge = 0
    if smiles:
        RDLogger.DisableLog("rdApp.*")
        mol = Chem.MolFromSmiles(smiles)
        RDLogger.EnableLog("rdApp.*")
        if mol is not None:
            charge = Chem.GetFormalCharge(mol)
    n_electrons = int(np.sum(numbers)) - charge
    return charge, 1 if n_electrons % 2 == 0 else 2


def psi4_molecule(psi4, numbers, positions, charge, multiplicity):
    """A Psi4 molecule exactly at `positions` (Angstrom): nocom, noreorient, symmetry c1."""
    return psi4.core.Molecule.from_arrays(
        geom=np.asarray(positions, dtype=np.float64), elez=[int(z) for z in numbers],
        units="Angstrom", fix_com=True, fix_orientation=True, fix_symmetry="c1",
        molecular_charge=charge, molecular_multiplicity=multiplicity)


def psi4_gradient(psi4, method, numbers, positions, charge, multiplicity):
    """Energy (Hartree) and gradient dE/dX [n_atoms, 3] (Hartree/Bohr) of one conformation."""
    molecule = psi4_molecule(psi4, numbers, positions, charge, multiplicity)
    if len(numbers) == 1:   # a free atom has no gradient (and psi4.gradient crashes on one)
        return float(psi4.energy(method, molecule=molecule)), np.zeros((1, 3))
    gradient, wfn = psi4.gradient(method, molecule=molecule, return_wfn=True)
    return float(wfn.energy()), np.array(gradient)


def psi4_optimize(psi4, method, numbers, positions, charge, multiplicity, max_steps, on_step,
                  opt_coordinates=DEFAULT_OPT_COORDINATES):
    """Psi4's geometry optimizer (optking, its default criteria) from `positions`, in
    `opt_coordinates` (optking's option: cartesian, as App. E implies for nablaDFT's
    trajectories, or redundant, optking's own default; OPT_COORDINATES lists them).

    Calls on_step(energy Hartree, gradient [n_atoms, 3] Hartree/Bohr, positions [n_atoms, 3]
    Angstrom) for every gradient it evaluates, the starting conformation first. Returns
    (converged, message): max_steps running out is converged=False, not an error.
    psi4.optimize(return_history=True) would lose the steps of an optimization that does
    not converge, so the gradient of every step goes through our function instead."""
    molecule = psi4_molecule(psi4, numbers, positions, charge, multiplicity)

    def gradient_of_one_step(gradient, label, ptype, **kwargs):  # psi4.optimize calls this
        g, wfn = gradient(method, **kwargs)
        geometry = np.array(kwargs["molecule"].geometry()) * psi4.constants.bohr2angstroms
        on_step(float(wfn.energy()), np.array(g), geometry)   # Bohr -> Angstrom as Psi4 read it
        return g, wfn

    psi4.set_options({"geom_maxiter": max_steps, "opt_coordinates": opt_coordinates})
    try:
        psi4.optimize(gradient_of_one_step, molecule=molecule, dertype=1)
        return True, ""
    except psi4.OptimizationConvergenceError as err:
        return False, one_line(err)


# ---------------------------------------------------------------------------------------
# GFN-xTB (tblite) in this process
# ---------------------------------------------------------------------------------------

def xtb_calculator(method, numbers, positions, charge, multiplicity, options):
    """A tblite calculator of one molecule at `positions` (Angstrom, given to tblite in
    Bohr), with multiplicity - 1 unpaired electrons. options: tblite Calculator.set
    settings (e.g. {"max-iter": 5}) over ours."""
    from tblite.interface import Calculator as TBLiteCalculator
    xtb = TBLiteCalculator(XTB_METHODS[method.strip().lower()], np.asarray(numbers),
                           np.asarray(positions, dtype=np.float64) / data.BOHR_TO_ANGSTROM,
                           charge=float(charge), uhf=int(multiplicity) - 1)
    xtb.set("verbosity", 0)
    xtb.set("accuracy", XTB_ACCURACY)
    for key, value in options.items():
        xtb.set(key, value)
    return xtb


def xtb_gradient(method, numbers, positions, charge, multiplicity, options):
    """Energy (Hartree) and gradient dE/dX [n_atoms, 3] (Hartree/Bohr) of one conformation,
    the SCC started from scratch (a job's result does not depend on the worker's past).
    An SCC that does not converge raises TBLiteRuntimeError."""
    result = xtb_calculator(method, numbers, positions, charge, multiplicity,
                            options).singlepoint()
    return float(result.get("energy")), np.array(result.get("gradient"))


class XTBCalculator(Calculator):
    """ASE calculator over one tblite calculator, for ASE's optimizers (eV, eV/A). Every
    evaluation goes to on_step(energy Hartree, gradient [n_atoms, 3] Hartree/Bohr,
    positions [n_atoms, 3] Angstrom), the positions exactly those tblite was given. Each
    SCC starts from the previous step's density, which converges it faster."""
    implemented_properties = ["energy", "forces"]

    def __init__(self, xtb, on_step):
        super().__init__()
        self.xtb, self.on_step, self.wavefunction = xtb, on_step, None

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)   # self.atoms: a copy of atoms
        positions = self.atoms.get_positions()                  # [n_atoms, 3] Angstrom
        self.xtb.update(positions=positions / data.BOHR_TO_ANGSTROM)
        self.wavefunction = self.xtb.singlepoint(self.wavefunction)
        energy = float(self.wavefunction.get("energy"))                # Hartree
        gradient = np.array(self.wavefunction.get("gradient"))         # Hartree/Bohr
        self.on_step(energy, gradient, positions)
        self.results = {"energy": energy * units.Hartree,
                        "forces": -gradient * units.Hartree / units.Bohr}


def xtb_optimize(method, numbers, positions, charge, multiplicity, options, max_steps,
                 on_step):
    """ASE's BFGS in Cartesian coordinates from `positions`, until every atom's force is
    below XTB_MAX_FORCE, with at most max_steps gradients (the start included), as Psi4's
    geom_maxiter. BFGS (full inverse Hessian; 3N <= ~200 here, so it costs nothing) takes
    one gradient per step and no line search, so every gradient is a step of the
    trajectory; it needed as many or fewer steps than LBFGS and far fewer than FIRE on
    drug-like molecules. Calls on_step for every gradient (see XTBCalculator). Returns
    (converged, message); running out of steps is converged=False, not an error."""
    from ase.optimize import BFGS    # imports scipy, a slow import: only workers that optimize
    atoms = Atoms(numbers=np.asarray(numbers),
                  positions=np.asarray(positions, dtype=np.float64))
    atoms.calc = XTBCalculator(
        xtb_calculator(method, numbers, positions, charge, multiplicity, options), on_step)
    optimizer = BFGS(atoms, logfile=None)
    fmax = XTB_MAX_FORCE * units.Hartree / units.Bohr                # eV/A
    if optimizer.run(fmax=fmax, steps=max_steps - 1):
        return True, ""
    largest = np.linalg.norm(atoms.get_forces(), axis=1).max() * units.Bohr / units.Hartree
    return False, (f"BFGS: largest atomic force {largest:.1e} Hartree/Bohr, criterion "
                   f"{XTB_MAX_FORCE:.0e}")


def one_line(err, limit=300):
    """An exception as one short line (Psi4's messages span many lines)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:limit]


# ---------------------------------------------------------------------------------------
# Command-line flags shared by the stage scripts (oracle_pool.make_oracle_pool reads them)
# ---------------------------------------------------------------------------------------

def add_oracle_args(parser, optimize=True, method=True):
    """The genuine oracle's flags (Psi4 or xTB, and the pool). optimize=False: the stage
    asks the oracle for energies and forces only, so no optimization flags. method=False:
    the script names the method with a flag of its own (relax.py --check_with)."""
    group = parser.add_argument_group("genuine oracle (Psi4, or GFN2-xTB in tblite)")
    if method:
        group.add_argument("--oracle_method", default=DEFAULT_METHOD,
                           help="Psi4 method/basis (default: %(default)s, the paper's level), "
                                "or gfn2-xtb (GFN2-xTB in tblite, tens of ms per gradient "
                                "of a drug-like molecule; also gfn1-xtb)")
    group.add_argument("--oracle_threads", "--psi4_threads", dest="oracle_threads", type=int,
                       default=1, help="threads per Psi4 or xTB job (OMP_NUM_THREADS; "
                                       "--psi4_threads is the same flag)")
    group.add_argument("--psi4_memory", default="2 GB",
                       help="memory per Psi4 job (xTB ignores it)")
    group.add_argument("--oracle_timeout", type=float, default=600.0,
                       help="seconds one gradient may take; an optimization's every "
                            "step is one (default: %(default)s, as the official code)")
    group.add_argument("--oracle_retries", type=int, default=1,
                       help="extra attempts of a failed job (default: %(default)s)")
    group.add_argument("--n_workers", type=int, default=2,
                       help="oracle jobs at once on this machine (default: %(default)s; use "
                            "about cores / --oracle_threads)")
    group.add_argument("--dask_scheduler", default=None,
                       help="tcp://HOST:PORT of a Dask scheduler: run the jobs on its "
                            "workers instead of --n_workers local processes")
    group.add_argument("--oracle_journal", default=None,
                       help="SQLite file that keeps every finished oracle result, keyed by "
                            "its question (elements, positions, charge, multiplicity, "
                            "method), so a rerun never computes one twice (default: "
                            "oracle_journal.sqlite beside the stage's output; several "
                            "stages and runs may share one)")
    if not optimize:
        return parser
    group.add_argument("--max_opt_steps", type=int, default=None,
                       help="most steps (gradients) of an optimization (default: 1000 for "
                            "Psi4, as geom_maxiter: a safety cap, the paper optimizes to "
                            "convergence and App. D's trajectories average ~100 steps; 500 "
                            "for xTB, whose Cartesian BFGS takes a few hundred: docs/oracles.md)")
    group.add_argument("--opt_coordinates", choices=OPT_COORDINATES,
                       default=DEFAULT_OPT_COORDINATES,
                       help="coordinates of Psi4's optimizer, optking's opt_coordinates "
                            "(default: %(default)s, as App. E implies for nablaDFT's data; "
                            "redundant: optking's own default). xTB's BFGS is Cartesian only")
    return parser


# ---------------------------------------------------------------------------------------
# Reference energies of isolated atoms (the `atomrefs` of a dataset)
# ---------------------------------------------------------------------------------------

# Ground-state spin multiplicities of the free atoms (Hund's rules)
ATOM_MULTIPLICITY = {1: 2, 3: 2, 5: 2, 6: 3, 7: 4, 8: 3, 9: 2, 11: 2, 13: 2, 14: 3, 15: 4,
                     16: 3, 17: 2, 35: 2, 53: 2}


def isolated_atom_energies(pool, elements):
    """{z: energy of the free atom} (Hartree) at the pool's level of theory, unrestricted
    for open shells: what nablaDFT's atomrefs are (Psi4 reproduces its wB97X-D/def2-SVP
    values to 0.001 kcal/mol). Raises OracleError naming an atom that fails."""
    futures = {}
    for z in sorted(set(int(z) for z in elements)):
        atom = data.Conformation(numbers=np.array([z]), positions=np.zeros((1, 3)))
        futures[z] = pool.submit(atom, -z, charge=0, multiplicity=ATOM_MULTIPLICITY.get(z, 1))
    energies = {}
    for z, future in futures.items():
        result = future.result()
        if not result.ok:
            raise OracleError(f"the isolated atom Z={z} failed: {result.reason}")
        energies[z] = result.energy
    return energies


# ---------------------------------------------------------------------------------------
# Surrogate oracle: MMFF94 in RDKit (kcal/mol)
# ---------------------------------------------------------------------------------------

def rdkit_molecule(conf):
    """RDKit molecule with explicit hydrogens and one conformer at conf.positions.

    From the row's SMILES, whose atoms (hydrogens added at the end, as nablaDFT and
    make_trajectories.py lay them out) must be the conformation's, in the same order.
    Without a SMILES, bonds are perceived from the coordinates (neutral molecule)."""
    where = f"row {conf.id}" if conf.id is not None else "conformation"
    numbers = [int(z) for z in conf.numbers]
    if conf.smiles:
        RDLogger.DisableLog("rdApp.*")
        mol = Chem.MolFromSmiles(conf.smiles)
        RDLogger.EnableLog("rdApp.*")
        if mol is None:
            raise data.DataError(f"{where}: RDKit cannot parse SMILES {conf.smiles!r}")
        mol = Chem.AddHs(mol)
        elements = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
        if elements != numbers:
            raise data.DataError(
                f"{where}: the atoms of SMILES {conf.smiles!r} with hydrogens ({elements}) "
                f"are not the conformation's atoms in the same order ({numbers}); fix the "
                "smiles key, or remove it to perceive bonds from the coordinates")
    else:
        xyz = f"{len(numbers)}\n\n" + "".join(
            f"{Chem.GetPeriodicTable().GetElementSymbol(z)} {x:.8f} {y:.8f} {w:.8f}\n"
            for z, (x, y, w) in zip(numbers, conf.positions))
        mol = Chem.MolFromXYZBlock(xyz)
        try:
            rdDetermineBonds.DetermineBonds(mol, charge=0)
        except Exception as err:
            raise data.DataError(f"{where}: no SMILES, and RDKit cannot perceive bonds from "
                                 f"the coordinates ({one_line(err)}); add a smiles key") from None
        mol = Chem.Mol(mol)
        mol.RemoveAllConformers()
    conformer = Chem.Conformer(len(numbers))
    for i, (x, y, z) in enumerate(np.asarray(conf.positions, dtype=np.float64)):
        conformer.SetAtomPosition(i, (float(x), float(y), float(z)))
    mol.AddConformer(conformer, assignId=True)
    return mol


class MMFFSurrogate:
    """MMFF94 energy of one molecule at any positions; the force field is built once.

    ForceField.CalcEnergy takes a flat position list, so a new conformation costs one call:
    tens of microseconds (benchmarks/mmff.py, its numbers in benchmarks/README.md; the paper
    quotes ~120 us)."""

    def __init__(self, conf):
        self.mol = rdkit_molecule(conf)
        properties = AllChem.MMFFGetMoleculeProperties(self.mol, mmffVariant="MMFF94")
        if properties is None:
            where = f"row {conf.id}" if conf.id is not None else "conformation"
            raise data.DataError(f"{where}: MMFF94 has no atom types for {conf.smiles or 'it'}")
        self.force_field = AllChem.MMFFGetMoleculeForceField(self.mol, properties)

    def energy(self, positions):
        """MMFF94 energy (kcal/mol) at positions [n_atoms, 3] Angstrom."""
        return self.force_field.CalcEnergy(np.asarray(positions, dtype=np.float64).ravel().tolist())


MMFF_MAX_ITERS = 1000   # MMFF minimization iterations for D_rdkit and the RDKit row alike


def mmff_minimize_checked(conf, max_iters=MMFF_MAX_ITERS):
    """MMFF94 minimum near conf.positions: the paper's RDKit baseline and the start of its
    D_rdkit conformations. Returns positions [n_atoms, 3] Angstrom and whether RDKit's
    minimizer converged within max_iters (ForceField.Minimize returns 0)."""
    surrogate = MMFFSurrogate(conf)
    surrogate.force_field.Initialize()
    not_converged = surrogate.force_field.Minimize(maxIts=max_iters)
    return np.array(surrogate.force_field.Positions()).reshape(-1, 3), not_converged == 0


def mmff_minimize(conf, max_iters=MMFF_MAX_ITERS):
    """The positions of mmff_minimize_checked, converged or not."""
    return mmff_minimize_checked(conf, max_iters)[0]


