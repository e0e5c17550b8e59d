"""PaiNN energy + forces beside other busy processes on the same cores, per thread setting.

    python benchmarks/threads.py [--n_molecules 16] [--rounds 3] [--loads ...] [--variants ...]

A node whose cores the oracle workers fill (Psi4, or tblite's OpenMP threads), or a
machine shared with other jobs, leaves torch fewer cores than it has. This script starts
the neighbour loads itself, as subprocesses on the same cores:
  alone      nothing;
  1 loop     one Python busy loop;
  2 loops    two of them (both cores of a 2-core machine taken);
  1 torch    one torch matmul loop, torch.set_num_threads(1);
  2 torch    two of them;
and beside each one times our PaiNN (painn.py, the CPU default: molecules in groups) and
schnetpack 2.1.1's, same weights (as benchmarks/painn.py), energy + forces of
`--n_molecules` molecules of 30-40 atoms in one call, in these variants:
  2 threads         torch.set_num_threads(2), libgomp's default waiting (spin, then sleep);
  1 thread          torch.set_num_threads(1);
  2 threads PASSIVE 2 threads, OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once);
  2 threads SPIN10k 2 threads, GOMP_SPINCOUNT=10000 (a waiting thread spins 10k times,
                    not 300k, before it sleeps; not run by default);
  rule              oracle_pool.torch_threads_beside_the_pool with no local oracle worker:
                    the cores this process may use that the other processes leave idle.
OMP_WAIT_POLICY and GOMP_SPINCOUNT are read once, when torch loads its OpenMP runtime
(libgomp). Besides the wall time of a call, the CPU time our process spends in it (all
its threads) is printed: threads that spin while waiting show up there.
The neighbours start once and are stopped (SIGSTOP) except while their load is measured,
so that a variant is timed alone and beside each load within a minute or so: the machine's
other work changes little in between. Each libgomp setting has one measuring process, which
builds the models once and measures every variant of that setting on request. Rounds repeat
all of it, in reverse order every other round. Printed: per (load, variant) the median
over rounds of the time and of the ratio to the same variant alone in the same round, and
the load average during the run. All subprocesses are killed at the end, also on error
or Ctrl-C (and by the kernel if the script itself is killed); --timeout bounds each wait.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# the neighbour processes: each prints "ready" once busy, then loops until killed; the
# kernel kills it when its parent dies (PR_SET_PDEATHSIG), also a stopped one
DIE_WITH_PARENT = ("import ctypes, os, signal\nparent = os.getppid()\n"
                   "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
                   "if os.getppid() != parent:\n    raise SystemExit\n")
LOAD_CODE = {
    "loop": DIE_WITH_PARENT + "print('ready', flush=True)\nwhile True:\n    pass\n",
    "torch": DIE_WITH_PARENT + ("import torch\ntorch.set_num_threads(1)\n"
                                "a = torch.randn(256, 256)\na @ a\nprint('ready', flush=True)\n"
                                "while True:\n    a @ a\n"),
}
LOADS = {"alone": [], "1 loop": ["loop"], "2 loops": ["loop", "loop"],
         "1 torch": ["torch"], "2 torch": ["torch", "torch"]}
# variant: (torch threads, or "rule"; libgomp's settings in the measuring process's environment)
VARIANTS = {"2 threads": ("2", ""), "1 thread": ("1", ""),
            "2 threads PASSIVE": ("2", "OMP_WAIT_POLICY=PASSIVE"),
            "2 threads SPIN10k": ("2", "GOMP_SPINCOUNT=10000"), "rule": ("rule", "")}
DEFAULT_VARIANTS = ["2 threads", "1 thread", "2 threads PASSIVE", "rule"]


# ---------------------------------------------------------------------------------------
# The measuring process: one per libgomp setting (read once, when torch loads its OpenMP
# runtime), fed thread counts on stdin, one JSON line of times back per count
# ---------------------------------------------------------------------------------------

def measure(args):
    """Build both models once; then for each line on stdin ("1", "2" or "rule"): set the
    threads, time our E+F and schnetpack's (calls alternate, at least 3 of each, more
    within the budget), print the median ms of each."""
    exec(DIE_WITH_PARENT)
    import numpy as np
    import torch
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import importlib.util
    import oracle_pool
    spec = importlib.util.spec_from_file_location("bench_painn", os.path.join(HERE, "painn.py"))
    bench_painn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_painn)

    saved = np.load(args.molecules)
    mols = [(saved[f"z{i}"], saved[f"pos{i}"]) for i in range(len(saved.files) // 2)]
    z, pos, batch = bench_painn.flat(mols, torch.float32)
    calls = {}
    try:
        spk = bench_painn.import_schnetpack()
        nnp, ours, _, _ = bench_painn.same_weights(spk, 0, "cpu")
        inputs = bench_painn.schnetpack_inputs(spk, mols)
        nnp.eval()
        calls["schnetpack"] = lambda: nnp(dict(inputs))
    except ImportError:          # schnetpack not installed: our model alone
        import painn
        ours = painn.PaiNN(n_atom_basis=128, n_interactions=3, n_rbf=50, cutoff=5.0).float()
    ours.eval()
    calls = {"ours": lambda: ours(z, pos, batch), **calls}
    for fn in calls.values():    # warm-up: allocator, first-call set-up
        fn()
    print("ready", flush=True)

    for line in sys.stdin:
        if line.strip() == "rule":   # no local oracle worker: the cores left idle by others
            rule_args = argparse.Namespace(dask_scheduler=None, n_workers=0, oracle_threads=1)
            threads = oracle_pool.torch_threads_beside_the_pool(rule_args)
        else:
            threads = int(line)
        torch.set_num_threads(threads)
        times = {name: [] for name in calls}
        cpu = {name: [] for name in calls}
        start = time.perf_counter()
        for i in range(args.calls):
            for name, fn in calls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            if i >= 2 and time.perf_counter() - start > args.budget:
                break
        print(json.dumps({"threads": threads,
                          **{name: statistics.median(t) * 1e3 for name, t in times.items()},
                          **{name + " cpu": statistics.median(t) * 1e3
                             for name, t in cpu.items()}}), flush=True)


# ---------------------------------------------------------------------------------------
# The driver: loads x variants x rounds
# ---------------------------------------------------------------------------------------

def start(cmd, procs, env, stdin=None):
    """Popen cmd (added to procs at once: the caller kills them whatever happens)."""
    p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, text=True, env=env)
    procs.append(p)
    return p


def wait_ready(p, what, timeout):
    """Wait for p's "ready" line, at most timeout seconds (then kill it)."""
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        line = p.stdout.readline()
    finally:
        timer.cancel()
    if line.strip() != "ready":
        raise RuntimeError(f"{what} did not start (see its error above)")


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    procs.clear()


def ask(worker, threads, timeout):
    """One measurement by a measuring process: {"threads", "ours", "schnetpack"}."""
    timer = threading.Timer(timeout, worker.kill)
    timer.start()
    try:
        worker.stdin.write(threads + "\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
    finally:
        timer.cancel()
    if not line:
        raise RuntimeError(f"a measuring process stopped or took over {timeout:.0f} s")
    return json.loads(line)


def load_average():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_molecules", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--calls", type=int, default=5, help="timed calls of each model, at most")
    parser.add_argument("--budget", type=float, default=6.0,
                        help="seconds of timed calls of one measurement, after 3 of each")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a process may take to start, or to answer")
    # the measuring process's own flags
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--molecules", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)

    import numpy as np
    sys.path.insert(0, HERE)
    from molecules import load_molecules
    mols = load_molecules(args.n_molecules, 30, 40, seed=0)
    print(f"{len(mols)} molecules, {sum(len(m[0]) for m in mols)} atoms; "
          f"{len(os.sched_getaffinity(0))} cores; {args.rounds} rounds; "
          f"load average before: {load_average():.2f}", flush=True)

    results = {}                 # (load, variant) -> [{"threads", "ours", "schnetpack"}]
    loads_seen = []
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        molecules = os.path.join(tmp, "molecules.npz")
        np.savez(molecules, **{f"{k}{i}": a for i, m in enumerate(mols)
                               for k, a in zip(("z", "pos"), m)})
        try:
            # the neighbours: started once, stopped (SIGSTOP) but when their load is on
            n_of = {kind: max(LOADS[load].count(kind) for load in args.loads) for kind in LOAD_CODE}
            env = dict(os.environ, OMP_NUM_THREADS="1")
            neighbours = {kind: [start([sys.executable, "-c", LOAD_CODE[kind]], procs, env)
                                 for _ in range(n)] for kind, n in n_of.items()}
            workers = {}         # libgomp settings -> its measuring process
            for setting in sorted({VARIANTS[v][1] for v in args.variants}):
                env = {k: v for k, v in os.environ.items() if k not in (
                    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                env.update(item.split("=") for item in setting.split())
                workers[setting] = start(
                    [sys.executable, os.path.abspath(__file__), "--measure", "--molecules",
                     molecules, "--calls", str(args.calls), "--budget", str(args.budget)],
                    procs, env, stdin=subprocess.PIPE)
            for kind, ps in neighbours.items():
                for p in ps:
                    wait_ready(p, f"a '{kind}' load", args.timeout)
                    p.send_signal(signal.SIGSTOP)
            for setting, worker in workers.items():
                wait_ready(worker, f"the measuring process ({setting or 'default'})",
                           args.timeout)
            for r in range(args.rounds):
                for variant in (args.variants if r % 2 == 0 else args.variants[::-1]):
                    threads, setting = VARIANTS[variant]
                    for load in (args.loads if r % 2 == 0 else args.loads[::-1]):
                        on = [neighbours[kind][i] for kind in LOAD_CODE
                              for i in range(LOADS[load].count(kind))]
                        for p in on:
                            p.send_signal(signal.SIGCONT)
                        try:
                            time.sleep(0.5)          # the scheduler sees them busy
                            loads_seen.append(load_average())
                            res = ask(workers[setting], threads, args.timeout)
                        finally:
                            for p in on:
                                p.send_signal(signal.SIGSTOP)
                        results.setdefault((load, variant), []).append(res)
                        print(f"  round {r + 1}, {variant:18s} {load:8s} " +
                              " ".join(f"{k} {v:.0f}" for k, v in res.items()), flush=True)
        finally:
            stop(procs)

    print(f"\nmedian over {args.rounds} rounds; ratio: to the same variant alone in the same "
          f"round; load average during the run {min(loads_seen):.1f}-{max(loads_seen):.1f} "
          "(the loads started here count in it)")
    names = [k for k in ("ours", "schnetpack") if k in next(iter(results.values()))[0]]
    print("cpu ms: CPU time of the measuring process (all threads) per call, median")
    print(f"{'load':10s}{'variant':19s}{'threads':>8s}" +
          "".join(f"{n + ' ms':>16s}{'ratio':>7s}{'cpu ms':>8s}" for n in names))
    for load in args.loads:
        for variant in args.variants:
            runs = results[(load, variant)]
            alone = results.get(("alone", variant))
            threads = "/".join(sorted({str(x["threads"]) for x in runs}))
            row = f"{load:10s}{variant:19s}{threads:>8s}"
            for n in names:
                ratio = statistics.median(x[n] / y[n] for x, y in zip(runs, alone)) \
                    if alone else float("nan")
                row += (f"{statistics.median(x[n] for x in runs):16.0f}{ratio:6.1f}x"
                        f"{statistics.median(x[n + ' cpu'] for x in runs):8.0f}")
            print(row)


if __name__ == "__main__":
    main()
