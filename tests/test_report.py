"""report.py: conformations.html, rendered in a real browser (Debian's headless Chromium,
driven over the Chrome DevTools Protocol): every 3D panel is drawn, the console has no
errors, and the page loads nothing but itself. Plus the geometry and text it shows."""
import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import time

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

import data
import evaluate
import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMILES = ["CCO", "C=CC(=O)N", "c1ccncc1"]


def molecules_with_optima():
    """(i, conformation, RMSD to its optimum) for each of SMILES: positions the ETKDG s_0,
    optimal_positions its MMFF optimum as 'DFT optimum', optimal_energy -100 Hartree."""
    for i, smiles in enumerate(SMILES):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        AllChem.EmbedMolecule(mol, randomSeed=1)
        x0 = mol.GetConformer().GetPositions()
        AllChem.MMFFOptimizeMolecule(mol)
        conf = data.Conformation(numbers=np.array([a.GetAtomicNum() for a in mol.GetAtoms()]),
                                 positions=x0, smiles=smiles, id=i + 1,
                                 optimal_positions=mol.GetConformer().GetPositions(),
                                 optimal_energy=-100.0)
        yield i, conf, lambda x, c=conf: evaluate.best_rmsd(x, c.optimal_positions, c.smiles,
                                                            c.numbers)


def tiny_rows():
    """Three rows: ETKDG s_0, an MMFF optimum as 'DFT optimum', s_T = optimum + noise."""
    rows = []
    for i, conf, rmsd in molecules_with_optima():
        x_opt = conf.optimal_positions
        x_T = x_opt + np.random.default_rng(i).normal(0, 0.05, x_opt.shape)
        rows.append(report.conformation_row(conf, -99.99, [
            ("NNP-optimized s_100", x_T, None if i == 2 else -99.999)], rmsd))
    return rows


def two_method_rows():
    """tiny_rows with a second method: method B ends at the optimum but uphill of s_0 for
    the second molecule (diverged), and at E_opt + 0.5 kcal/mol for the others."""
    rows = []
    for i, conf, rmsd in molecules_with_optima():
        x_opt = conf.optimal_positions
        e_b = -99.98 if i == 1 else -100.0 + 0.5 / data.HARTREE_TO_KCAL
        x_a = x_opt + np.random.default_rng(i).normal(0, 0.05, x_opt.shape)
        rows.append(report.conformation_row(conf, -99.99, [("A: NNP-optimized s_100", x_a, -99.999),
                                                           ("B: final conformation", x_opt, e_b)],
                                            rmsd))
    return rows


# ---------------------------------------------------------------------------------------
# What the page shows
# ---------------------------------------------------------------------------------------

def test_kabsch_align_undoes_a_rotation_and_translation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))                                        # a proper rotation
    np.testing.assert_allclose(report.kabsch_align(x @ q.T + [3.0, -1.0, 2.0], x), x, atol=1e-10)


def test_rows_captions_and_molecules():
    rows = tiny_rows()
    ethanol = rows[0]
    assert [p["title"] for p in ethanol["panels"]] == ["initial s_0", "NNP-optimized s_100",
                                                       "DFT optimum"]
    # pct_T (Eq. 4) by hand: (E_0 - E_T) / (E_0 - E_opt) = 0.009 / 0.01 = 90 %
    assert ethanol["panels"][1]["pct"] == pytest.approx(90.0)
    assert "pct<sub>T</sub> = 90.0 %" in report.caption(ethanol["panels"][1], ethanol["e_opt"])
    assert "pct" not in ethanol["panels"][0] and "pct" not in ethanol["panels"][2]
    assert rows[2]["panels"][1]["pct"] == "no E_T"
    assert report.pct_of_final(-1.0, -0.5, -2.0) == "diverged"          # E_T > E_0
    assert ethanol["drawing"].startswith("<svg") and "<path" in ethanol["drawing"]
    assert ethanol["panels"][2]["rmsd"] == pytest.approx(0.0, abs=1e-6)
    assert ethanol["panels"][1]["rmsd"] > 0.0
    # SDF with the SMILES's bonds: ethanol has 8 bonds (C-C, C-O, 6 X-H)
    text, fmt = ethanol["panels"][0]["model"], ethanol["panels"][0]["format"]
    assert fmt == "sdf" and text.splitlines()[3].split()[:2] == ["9", "8"]
    # E - E_opt by hand: (-99.99 + 100) Ha = 0.01 * 627.509474 = 6.28 kcal/mol
    assert "+6.28 kcal/mol" in report.caption(ethanol["panels"][0], ethanol["e_opt"])
    assert "the oracle failed" in report.caption(rows[2]["panels"][1], rows[2]["e_opt"])
    # a SMILES that is not these atoms: XYZ, bonds left to the viewer
    text, fmt = report.molecule_text([8, 1, 1], np.eye(3), "CC")
    assert fmt == "xyz" and text.splitlines()[0] == "3" and text.splitlines()[2].startswith("O ")


# ---------------------------------------------------------------------------------------
# The page in a real browser
# ---------------------------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe: JSON messages ending in a NUL
    byte, written to its fd 3 and read from its fd 4. One page, attached (flat session)."""

    def __init__(self, executable, user_data_dir, width=1000, height=1400):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--remote-debugging-pipe",
                 f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"]
        # bash maps the pipe ends onto the fds 3 and 4 Chromium reads and writes
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', executable, *flags],
            pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._next_id, self._buffer, self.events = 0, b"", []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)

    def _read_message(self, deadline):
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, session=False, timeout=20, **params):
        """One command; events that arrive meanwhile are kept in self.events."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for_event(self, method, timeout=20):
        deadline = time.time() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read_message(deadline))

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", session=True, expression=expression,
                           awaitPromise=True, returnByValue=True)
        return result["result"].get("value")

    def open(self, url):
        """Load url, wait for its load event and two frames; returns the events it caused."""
        self.events = []
        self.send("Page.navigate", session=True, url=url)
        self.wait_for_event("Page.loadEventFired")
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        return self.events

    def screenshot(self):
        from PIL import Image
        png = base64.b64decode(self.send("Page.captureScreenshot", session=True, format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))   # [height, width, 3]

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def console_errors(events):
    """Console errors, uncaught exceptions and error log entries among CDP events."""
    errors = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            errors.append(p["exceptionDetails"].get("exception", {}).get("description")
                          or p["exceptionDetails"]["text"])
        elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(p["entry"]["text"])
    return errors


PANELS_JS = """[...document.querySelectorAll('.grid')].map(g => {
  const r = g.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })"""


def drawn_share(image, rect, k, n_panels=3):
    """Share of the pixels of panel k (of n_panels) of a row's rect that are not white
    background."""
    left, top, width, height = (int(round(v)) for v in rect)
    w = width // n_panels
    region = image[top + 10:top + height - 10, left + k * w + 10:left + (k + 1) * w - 10]
    return float((np.abs(region.astype(int) - 255).sum(axis=-1) > 60).mean())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("Chromium is missing: ./setup.sh --test installs Debian's chromium")
    chromium = Chromium(executable, str(tmp_path_factory.mktemp("chromium-profile")))
    yield chromium
    chromium.close()


def test_page_renders_in_chromium(browser, tmp_path):
    path = tmp_path / "conformations.html"
    report.write_conformations_page(str(path), tiny_rows(), "test <page>")
    events = browser.open(path.as_uri())
    assert console_errors(events) == []
    requested = {e["params"]["request"]["url"] for e in events
                 if e.get("method") == "Network.requestWillBeSent"}
    assert requested == {path.as_uri()}                  # self-contained: nothing else loaded
    assert browser.evaluate("document.title") == "test <page>"
    assert browser.evaluate("document.querySelectorAll('.grid canvas').length") == 3
    rects = browser.evaluate(PANELS_JS)
    image = browser.screenshot()
    assert len(rects) == 3 and rects[-1][1] + rects[-1][3] <= image.shape[0]
    for rect in rects:
        for k in range(3):
            share = drawn_share(image, rect, k)
            assert 0.01 < share < 0.5, (rect, k, share)  # a molecule on a white background
    # the oxygen of ethanol is drawn in 3Dmol's red in its 3 panels
    left, top, width, height = (int(v) for v in rects[0])
    red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)
    for k in range(3):
        assert red[top:top + height, left + k * width // 3:left + (k + 1) * width // 3].sum() > 20


def test_browser_check_sees_errors_and_blank_panels(browser, tmp_path):
    """The checks above can fail: a script error is reported, an empty row stays white."""
    path = tmp_path / "broken.html"
    report.write_conformations_page(str(path), tiny_rows()[:1], "broken")
    page = path.read_text()
    page = re.sub(r"var ROWS = .*;", lambda m: m.group(0) + "\nROWS[0].panels.length = 0;\n"
                  "undefinedFunction();", page)
    path.write_text(page)
    events = browser.open(path.as_uri())
    assert any("undefinedFunction" in e for e in console_errors(events))
    image = browser.screenshot()
    rect = browser.evaluate(PANELS_JS)[0]
    assert all(drawn_share(image, rect, k) < 0.001 for k in range(3))


def test_evaluate_writes_the_page(browser, tmp_path):
    """evaluate.py with the paper's f_GOLF-10k on a Psi4-optimized test db (hf/sto-3g, two
    tiny molecules) writes conformations.html: the first conformation, its numbers from
    per_conformation.jsonl, drawn in the browser."""
    import make_trajectories
    oracle = ["--oracle_method", "hf/sto-3g", "--n_workers", "2"]
    smiles = tmp_path / "mols.smi"
    smiles.write_text("CO methanol\nC=O formaldehyde\n")
    test_db = str(tmp_path / "test.db")
    make_trajectories.main(["--smiles", str(smiles), "--mode", "optimize",
                            "--conformers_per_molecule", "1", "--out", str(tmp_path / "traj.db"),
                            "--out_optimal", test_db, *oracle])
    golf_10k = os.path.join(REPO, "models", "official", "GOLF-10k.NNP_checkpoint_actor")
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", golf_10k, "--db", test_db, "--out_dir", str(out),
                   "--timelimit_eval", "5", "--eval_steps", "5", "--page_conformations", "1",
                   *oracle])
    first = min(evaluate.read_records(out / "per_conformation.jsonl"), key=lambda r: r["conf_id"])
    page = (out / "conformations.html").read_text()
    assert page.count('class="grid"') == 1 and f"conformation {first['conf_id']}:" in page
    assert "NNP-optimized s_5" in page
    assert f"E<sub>DFT</sub> = {first['energy_dft'][-1]:.6f} Ha" in page
    assert console_errors(browser.open((out / "conformations.html").as_uri())) == []
    image = browser.screenshot()
    rect = browser.evaluate(PANELS_JS)[0]
    assert all(drawn_share(image, rect, k) > 0.005 for k in range(3))

    # another method's final conformations (here GOLF-10k's own, as an external method
    # named by --name), then both side by side on one page (--task page)
    external = tmp_path / "eval_external"
    evaluate.main(["--model", "external", "--positions", str(out / "final.db"),
                   "--name", "Uni-Mol+", "--db", test_db, "--out_dir", str(external),
                   "--page_conformations", "1", *oracle])
    page = (external / "conformations.html").read_text()
    assert "<title>Uni-Mol+ on " in page and "Uni-Mol+: final conformation" in page
    assert "NNP-optimized" not in page and "None on" not in page
    assert json.load(open(external / "summary.json"))["name"] == "Uni-Mol+"
    both = tmp_path / "page.html"
    evaluate.main(["--task", "page", "--evaluations", str(out), str(external),
                   "--names", "f_GOLF-10k", "UMP", "--out", str(both),
                   "--page_conformations", "2"])
    page = both.read_text()
    assert page.count('class="grid"') == 2 and page.count('<div class="drawing"><svg') == 2
    assert "f_GOLF-10k: NNP-optimized s_5" in page and "UMP: final conformation" in page
    # the same s_T scored twice: the same pct_T under both
    pct = re.findall(r"pct<sub>T</sub> = ([^<]*)<", page)
    assert len(pct) == 4 and pct[0] == pct[1] and pct[2] == pct[3]
    browser.send("Emulation.setDeviceMetricsOverride", session=True, width=1700, height=1400,
                 deviceScaleFactor=1, mobile=False)
    try:
        assert console_errors(browser.open(both.as_uri())) == []
        image = browser.screenshot()
        for rect in browser.evaluate(PANELS_JS):
            assert all(drawn_share(image, rect, k, 4) > 0.005 for k in range(4))
    finally:
        browser.send("Emulation.clearDeviceMetricsOverride", session=True)


def test_two_methods_side_by_side_in_chromium(browser, tmp_path):
    """Appendix H / Fig. 5: two methods of one test set in a row: 2D drawing, s_0, A's and
    B's s_T and the optimum, every 3D panel drawn, each method's pct_T under it."""
    browser.send("Emulation.setDeviceMetricsOverride", session=True, width=1700, height=1400,
                 deviceScaleFactor=1, mobile=False)
    try:
        path = tmp_path / "two.html"
        rows = two_method_rows()
        report.write_conformations_page(str(path), rows, "A, B", methods="A's and B's s_T")
        events = browser.open(path.as_uri())
        assert console_errors(events) == []
        assert browser.evaluate("document.querySelectorAll('.grid canvas').length") == 3
        assert browser.evaluate("document.querySelectorAll('.drawing svg').length") == 3
        captions = browser.evaluate("[...document.querySelectorAll('.captions')]"
                                    ".map(c => c.children.length)")
        assert captions == [4, 4, 4]
        text = browser.evaluate("document.body.innerText")
        # A: 90 % everywhere; B: 0.01 - 0.5/627.5 over 0.01 = 92.0 %, and diverged once
        assert text.count("pctT = ") == 6 and "pctT = 90.0 %" in text
        assert "pctT = 92.0 %" in text and "pctT = none: diverged" in text
        image = browser.screenshot()
        for rect in browser.evaluate(PANELS_JS):
            assert rect[2] == 4 * report.PANEL_SIZE[0]
            for k in range(4):
                assert 0.01 < drawn_share(image, rect, k, 4) < 0.5, (rect, k)
        drawing = browser.evaluate("[...document.querySelectorAll('.drawing svg')].map(s => {"
                                   "const r = s.getBoundingClientRect(); return [r.width, "
                                   "r.height]; })")
        assert all(w > 100 and h > 100 for w, h in drawing)
    finally:
        browser.send("Emulation.clearDeviceMetricsOverride", session=True)
