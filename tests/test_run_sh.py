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


def test_test_db_is_for_the_official_preset_and_must_exist():
    for flags, words in ((["--test_db", "data/moses_test60.db"], "is for --preset official"),
                         (["--preset", "official", "--test_db", "no/such.db"], "no such file")):
        r = run_sh(*flags)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0] and r.stdout == ""


def test_official_preset_scores_all_eleven_checkpoints_and_its_claims_name_its_rows():
    """Every checkpoint of models/official/ is evaluated once, under a name; every --claim
    parses (report.parse_claim) and compares rows the preset evaluates."""
    import re
    import report
    text = open(os.path.join(ROOT, "run.sh")).read()
    official = text[text.index('if [ "$preset" = official ]'):text.index("exit 0\nfi")]
    rows = re.findall(r'"(f_\S+) (\S+) (eval_\w+)"', official)
    names = {name for name, _, _ in rows} | {"RDKit"}
    files = sorted(f.split(".")[0] for f in os.listdir(os.path.join(ROOT, "models", "official"))
                   if f.endswith(".NNP_checkpoint_actor"))
    assert sorted(file for _, file, _ in rows) == files and len(files) == 11
    assert len({d for _, _, d in rows}) == 11                       # a folder each
    specs = re.findall(r'--claim "([^"]+)"', official)
    assert len(specs) == 9
    for spec in specs:
        claim = report.parse_claim(spec)
        assert {n for a, _, b in claim.comparisons for n in (a, b)} <= names, spec
