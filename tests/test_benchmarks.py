"""The benchmark scripts import the project's modules, not a benchmark of the same name
(benchmarks/oracle_pool.py, benchmarks/relax.py and benchmarks/painn.py sit beside the
scripts that import oracle_pool, relax and painn)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh interpreter: load each script as a module (its main() does not run), the
# project's modules dropped from sys.modules first, so each script resolves them anew.
CHECK = r"""
import glob, os, runpy, sys
root = sys.argv[1]
names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "*.py"))}
wrong = []
for script in sorted(glob.glob(os.path.join(root, "benchmarks", "*.py"))):
    for name in names:
        sys.modules.pop(name, None)
    path = list(sys.path)
    runpy.run_path(script, run_name="benchmark_under_test")
    sys.path[:] = path
    for name in sorted(names & set(sys.modules)):     # `import x` and `from x import y` alike
        if os.path.dirname(os.path.abspath(sys.modules[name].__file__)) != root:
            wrong.append(f"{os.path.basename(script)}: {name} is {sys.modules[name].__file__}")
print("\n".join(wrong) or "ok")
"""


def test_benchmarks_import_the_projects_modules():
    out = subprocess.run([sys.executable, "-c", CHECK, ROOT], cwd=os.path.join(ROOT, "benchmarks"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ok", out.stdout
