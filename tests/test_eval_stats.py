"""Student's t and the Welch test without scipy (against scipy's values), the challenge's
verdict on two groups of seeds, and `underpar compare` / `pretrain --seeds` end to end."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from underpar.errors import ConfigError
from underpar.eval.stats import compare_groups, mean_ci, t_cdf, t_ppf, t_sf, welch_test

from clirun import run_main

pytestmark = pytest.mark.usefixtures("one_thread")

# scipy 1.17.1's values (scipy.stats.t.sf / t.ppf / ttest_ind(equal_var=False)), computed once
# here so that the check runs where scipy is not installed.
T_SF = [((2.5, 4.6), 0.029361101836677884), ((-1.2, 2.0), 0.8234983196103153), ((7.0, 30), 4.434979333610325e-08)]
T_PPF = [((0.975, 10), 2.228138851986274), ((0.995, 3), 5.840909309733355), ((0.01, 1.5), -11.1973161795684)]
# Record-like val_loss (nats) of two 3- and 4-seed groups; one-sided "greater", with and without
# the 0.005 margin (scipy: ttest_ind(a - margin, b, ...)): (t, p, df).
A1, B1 = [2.77116, 2.76739, 2.76815], [2.73901, 2.74100, 2.73650]
A2, B2 = [2.7712, 2.7674, 2.7682], [2.7690, 2.7655, 2.7668, 2.7701]
WELCH = [
    (A1, B1, 0.005, (14.422221555872945, 7.386977354004714e-05, 3.940855398484263)),
    (A1, B1, 0.0, (17.299377073070534, 3.6407923513963747e-05, 3.940855398484263)),
    (A2, B2, 0.005, (-2.5167178155103067, 0.9709670978109454, 4.559051717236185)),
    (A2, B2, 0.0, (0.6961134383327291, 0.26011502949723214, 4.559051717236185)),
]


@pytest.mark.parametrize("args,expected", T_SF)
def test_t_sf_matches_scipy(args, expected):
    assert t_sf(*args) == pytest.approx(expected, rel=1e-9)
    assert t_cdf(-args[0], args[1]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("args,expected", T_PPF)
def test_t_ppf_matches_scipy(args, expected):
    assert t_ppf(*args) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("a,b,margin,expected", WELCH)
def test_welch_matches_scipy(a, b, margin, expected):
    result = welch_test(a, b, alternative="greater", margin=margin)
    assert (result["t"], result["p"], result["df"]) == pytest.approx(expected, rel=1e-9)


def test_against_scipy_on_a_grid_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (0.7, 1, 2, 3.3, 9, 40, 500):
        for t in (-30, -4, -1, -1e-9, 0, 0.2, 1.7, 3, 9, 60):
            assert t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-8, abs=1e-300), (t, df)
        for q in (0.001, 0.1, 0.5, 0.9, 0.999):
            assert t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-12), (q, df)
    rng = random.Random(0)
    for _ in range(50):
        a = [rng.gauss(0, 1) for _ in range(rng.randint(2, 6))]
        b = [rng.gauss(0.5, 2) for _ in range(rng.randint(2, 6))]
        for alternative in ("two-sided", "greater", "less"):
            ours = welch_test(a, b, alternative)
            theirs = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
            assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9) and ours["t"] == pytest.approx(theirs.statistic)


def test_no_spread_is_nan_not_a_crash():
    assert math.isnan(welch_test([1.0, 1.0], [1.0, 1.0])["p"])
    assert mean_ci([1.0, 1.0])["lo"] == 1.0


def test_verdicts_against_the_challenge_bar():
    clear = compare_groups(A1, B1, [1.08, 1.081, 1.079], [1.07, 1.071, 1.069])
    assert clear["significant"] and clear["below_practice_cutoff"]
    assert clear["verdict"].startswith("candidate beats baseline: at least 0.005 nats better at p < 0.01")
    assert clear["difference"]["val_loss_nats"] == pytest.approx(sum(B1) / 3 - sum(A1) / 3)
    assert clear["difference"]["val_bpb"] == pytest.approx(-0.01)
    assert clear["candidate"]["val_loss"]["std"] == pytest.approx(statistics.stdev(B1))
    close = compare_groups(A2, B2, [1.0] * 3, [1.0] * 4, margin_nats=0.0)
    assert not close["significant"] and close["welch"]["p"] == pytest.approx(0.26011502949723214)
    assert "practical cutoff p < 0.25: no" in close["verdict"]
    looser = compare_groups(A2, B2, [1.0] * 3, [1.0] * 4, margin_nats=0.0, practice_alpha=0.3)
    assert looser["below_practice_cutoff"] and "p < 0.3: yes" in looser["verdict"]
    with pytest.raises(ConfigError, match="at least 2 seeds per group"):
        compare_groups([2.7], B1, [1.0], [1.0] * 3)
    with pytest.raises(ConfigError, match="alpha"):
        compare_groups(A1, B1, [1.0] * 3, [1.0] * 3, alpha=1.5)


def write_group(folder, losses, bpbs, scores=None):
    folder.mkdir(parents=True)
    runs = [{"seed": i, "run_dir": f"r{i}", "val_loss": l, "val_bpb": b, **({"scores": scores} if scores else {})}
            for i, (l, b) in enumerate(zip(losses, bpbs))]
    (folder / "group.json").write_text(json.dumps({"name": folder.name, "runs": runs}))
    return folder


def test_compare_command(tmp_path, monkeypatch, capsys):
    old = write_group(tmp_path / "old", A1, [1.08, 1.081, 1.079])
    new = write_group(tmp_path / "new", B1, [1.07, 1.071, 1.069])
    code, out, err = run_main(monkeypatch, capsys, "compare", str(old), str(new))
    assert code == 0, err
    assert "difference (candidate - baseline): -0.01000 bpb" in out and "candidate beats baseline" in out
    code, out, err = run_main(monkeypatch, capsys, "compare", str(new), str(old / "group.json"), "--json", "--margin-nats", "0")
    assert code == 0, err
    result = json.loads(out)
    assert not result["significant"] and result["baseline"]["n"] == 3 and result["score"] == "plain"
    code, _, err = run_main(monkeypatch, capsys, "compare", str(old), str(new), "--score", "ttt")
    assert code == 2 and "has no ttt score" in err


def test_pretrain_seeds_writes_a_group_that_compare_reads(tmp_path, monkeypatch, capsys):
    from test_eval_score import MICRO  # the micro pretrain config of test_pretrain
    from test_prepare import write_corpus

    write_corpus(tmp_path / "corpus", documents=60)
    sets = MICRO + [f"data.path={tmp_path / 'corpus'}", f"data.out={tmp_path / 'prepared'}", f"train.runs_root={tmp_path / 'runs'}",
                    "train.max_steps=2", "train.val_every_steps=0", "train.checkpoint_every_steps=0", "data.val_docs=8"]
    args = ["pretrain", "--preset", "tiny-cpu", "--seeds", "1,2", *[x for s in sets for x in ("--set", s)]]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    [group_dir] = (tmp_path / "runs").glob("*-tiny-cpu-seeds")
    group = json.loads((group_dir / "group.json").read_text())
    assert group["seeds"] == [1, 2] and len({r["run_dir"] for r in group["runs"]}) == 2
    assert group["runs"][0]["val_bpb"] != group["runs"][1]["val_bpb"]  # the seed changed the run
    assert group["val_bpb"]["n"] == 2 and f"group summary {group_dir}/group.json" in out
    assert all(json.loads((tmp_path / "runs" / r["run_dir"].split("/")[-1] / "config.json").read_text())["config"]["train"]["seed"] == s
               for r, s in zip(group["runs"], (1, 2)))
    # A folder of run directories is a group too.
    code, out, err = run_main(monkeypatch, capsys, "compare", str(group_dir), str(tmp_path / "runs"), "--json")
    assert code == 0, err
    assert json.loads(out)["candidate"]["n"] == 2
