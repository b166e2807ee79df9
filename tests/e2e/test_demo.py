"""`make demo` at toy budgets: every stage, the evaluation, the table and both figures."""

from __future__ import annotations

from dvpo_lightning import demo


def test_quick_demo_runs_every_stage_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = demo.main(["--quick", "--output", str(tmp_path / "report")])
    assert set(summary["stages"]) == {"sft", "gvm", "dvpo"}
    assert set(summary["policies"]) == {"SFT", "DVPO"}
    assert summary["policies"]["SFT"]["kl_ref"] == 0.0  # SFT is its own reference
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| SFT |" in table and "| DVPO |" in table and "| dvpo |" in table
    for figure in ("learning_curves.png", "token_credit.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 10_000
    for stage in ("sft", "gvm", "dvpo"):
        assert (tmp_path / "outputs" / "builtin" / stage / "model" / "config.json").exists()
