"""run.sh refuses bad flags in one line, before it sets anything up or runs a stage."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sh(*flags):
    return subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *flags],
                          capture_output=True, text=True, timeout=60)


def test_run_sh_refuses_an_unknown_flag_and_a_flag_without_its_value():
    for flags, word in ((["--bogus"], "'--bogus'"), (["--preset"], "--preset needs a value")):
        r = run_sh(*flags)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0]
        assert "usage: ./run.sh" in lines[0] and r.stdout == ""
