"""`make demo` at toy budgets: every stage, the evaluation, the table and both figures."""

from __future__ import annotations

from dvpo_lightning import demo, plots


def test_quick_demo_runs_every_stage_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = demo.main(["--quick", "--output", str(tmp_path / "report")])
    assert set(summary["stages"]) == {"sft", "gvm", "dvpo"}
    assert set(summary["policies"]) == {"SFT", "DVPO"}
    assert summary["policies"]["SFT"]["kl_ref"] == 0.0  # SFT is its own reference
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| SFT |" in table and "| DVPO |" in table and "| dvpo |" in table
    header, _, sft, dvpo = table.splitlines()[:4]
    assert header.split(" | ")[4] == "win rate vs SFT"
    assert sft.split(" | ")[4] == "—" and 0.0 <= float(dvpo.split(" | ")[4]) <= 1.0
    for figure in ("learning_curves.png", "token_credit.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 10_000
    for stage in ("sft", "gvm", "dvpo"):
        assert (tmp_path / "outputs" / "builtin" / stage / "model" / "config.json").exists()


def test_learning_curves_give_each_metric_its_own_labelled_axis(tmp_path, monkeypatch):
    offline, on_policy = tmp_path / "sft.csv", tmp_path / "dvpo.csv"
    offline.write_text("step,train/loss,val/gold_reward\n0,3.5,\n1,3.1,0.4\n")
    on_policy.write_text("step,rollout/reward\n0,0.1\n1,0.3\n")
    saved = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: saved.append(figure) or path)
    plots.learning_curves(
        [("SFT", offline, ["train/loss", "val/gold_reward"]), ("DVPO", on_policy, ["rollout/reward"])],
        tmp_path / "curves.png",
    )
    shown = [axis for axis in saved[0].axes if axis.get_visible()]
    assert [(axis.get_title(), axis.get_ylabel(), axis.get_xlabel()) for axis in shown] == [
        ("SFT", "train/loss", ""),
        ("DVPO", "rollout/reward", "RL iteration"),
        ("", "val/gold_reward", "optimiser step"),
    ]
    assert [len(axis.lines) for axis in shown] == [1, 1, 1]  # one scale per axis
