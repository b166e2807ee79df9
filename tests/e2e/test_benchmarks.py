"""`make bench`: the quick run writes every report with its columns; the pieces the reports rest on are right.

Timings are never asserted: they are benchmark numbers, not properties of the code.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from benchmarks import cost, peer, real_value, report, run, value_runs
from benchmarks import table as table_benchmark
from benchmarks import value as value_benchmark
from benchmarks.flops import LinearWork, matmul_peak
from benchmarks.report import Table, mean_std, write_index
from benchmarks.timing import alternating, resolve_device

NAMES = ("table", "cost", "rollout", "peer", "value")
# Columns every report must keep: what the final report and README promise.
COLUMNS = {
    "table": [
        "gold reward",
        "gain over SFT",
        "fraction of optimum",
        "win rate vs SFT",
        "KL to SFT (nats)",
        "stage wall time (s)",
        "stage peak memory (GiB)",
    ],
    "cost": [
        "memory ratio",
        "time ratio",
        "model-state floor ratio",
        "model-state floor (GiB)",
        "peak memory above baseline (GiB)",
        "time per RL iteration (s)",
        "% of matmul peak (generate / score / update)",
        "DVPO update, % of matmul peak",
    ],
    "rollout": [
        "engine (tokens/s)",
        "bare generate (tokens/s)",
        "ratio",
        "compiled (tokens/s)",
        "compile + warm-up (s)",
        "% of matmul peak (engine / bare / compiled)",
    ],
    "peer": ["samples (pairs)/s", "real tokens/s", "first-step loss", "verdict", "% of matmul peak"],
    "value": [
        "pairwise accuracy (mean value)",
        "pairwise accuracy (complete response)",
        "value vs gold, SFT samples",
        "token credit vs gold, DVPO samples",
        "gain over SFT",
        "gain minus DVPO's",
        "verdict",
    ],
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m benchmarks.run --quick` with its default output directory moved under a temporary one."""
    output = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "QUICK_OUTPUT", output)
        written = run.main(["--quick"])
    torch.set_num_threads(threads)  # the run sets one thread; leave the test process as it was
    transformers.utils.logging.enable_progress_bar()
    return output, written


def test_quick_run_writes_every_report(quick_run):
    output, written = quick_run
    assert sorted(written) == sorted(NAMES)
    for name in NAMES:
        markdown = (output / f"{name}.md").read_text()
        assert "- date: " in markdown and "- machine: " in markdown
        assert "- command: `python -m benchmarks.run --quick`" in markdown
        record = json.loads((output / f"{name}.json").read_text())
        assert record["machine"]["device"] == "cpu" and record["machine"]["torch"] == torch.__version__
        assert record["results"]["benchmark_seconds"] > 0
    assert (output / "table_reward_vs_kl.png").stat().st_size > 0
    assert "![table_reward_vs_kl](table_reward_vs_kl.png)" in (output / "table.md").read_text()


def test_a_quick_run_shows_its_figures_but_judges_no_target_set_for_the_full_scale(quick_run):
    output, _ = quick_run
    for name in ("cost", "rollout", "peer", "value"):
        rows = [line for line in (output / f"{name}.md").read_text().splitlines() if line.startswith("| ")]
        judged = [row for row in rows if re.search(r"\| (met|missed) \|", row)]
        # The first-step loss of DPO against TRL's is a parity check, exact at any scale: the only one judged.
        assert all("first-step loss gap" in row for row in judged), judged
        assert any(report.NOT_JUDGED in row for row in rows), name


@pytest.mark.parametrize("name", NAMES)
def test_reports_have_their_columns(quick_run, name):
    output, _ = quick_run
    header_lines = [
        line for line in (output / f"{name}.md").read_text().splitlines() if line.startswith("| ")
    ]
    headers = {cell.strip() for line in header_lines for cell in line.strip("|").split("|")}
    missing = [column for column in COLUMNS[name] if column not in headers]
    assert not missing, f"{name}.md lacks columns {missing}"


def test_index_shows_every_latest_report(quick_run):
    output, _ = quick_run
    index = (output / "README.md").read_text()
    for name in NAMES:
        title = (output / f"{name}.md").read_text().splitlines()[0]
        assert "#" + title in index  # one heading level down


def test_table_evaluates_every_policy_on_the_same_prompts(quick_run):
    output, _ = quick_run
    seed_run = json.loads((output / "table.json").read_text())["results"]["seeds"]["0"]
    assert set(seed_run) == set(table_benchmark.STAGES)
    assert {"simpo", "orpo"} <= set(table_benchmark.POLICIES)
    assert {seed_run[name]["prompts"] for name in table_benchmark.POLICIES} == {seed_run["sft"]["prompts"]}
    # The SFT policy against itself: the same seed gives the same answers, so every prompt is a tie.
    assert seed_run["sft"]["win_rate_vs_sft"] == 0.5
    for stage in table_benchmark.STAGES:
        assert (output / "runs" / "table" / "seed0" / stage / "model" / "config.json").exists()


def test_table_runs_the_stages_a_configs_directory_holds_and_names_its_report_after_it(tmp_path):
    hard = table_benchmark.CONFIGS / "hard"
    assert table_benchmark.stages_in(hard) == (
        "sft",
        "rm",
        "gvm",
        "dpo",
        "ppo",
        "dvpo",
        "gvm_grpo",
        "ppo_gvm_critic",
    )
    assert table_benchmark.stages_in(table_benchmark.CONFIGS) == table_benchmark.STAGES
    assert table_benchmark.report_name(hard) == "table_hard"
    assert table_benchmark.report_name(table_benchmark.CONFIGS) == "table"
    for stage in ("sft", "dvpo", "ppo"):  # PPO without the reward model it loads
        (tmp_path / f"{stage}.yaml").write_text((hard / f"{stage}.yaml").read_text())
    with pytest.raises(ValueError, match=r"lacks the config of gvm \(for dvpo\), rm \(for ppo\)"):
        table_benchmark.stages_in(tmp_path)


def test_merging_runs_reproduces_their_reports_and_refuses_a_seed_twice(quick_run, tmp_path):
    output, _ = quick_run
    run.main(["--only", "table,value", "--merge", str(output), "--output", str(tmp_path)])
    for name in ("table", "value"):
        original, merged = ((path / f"{name}.md").read_text().splitlines() for path in (output, tmp_path))
        assert [line for line in merged if line.startswith("|")] == [
            line for line in original if line.startswith("|")
        ]
        note = "- Merged from 1 runs made as separate processes: `python -m benchmarks.run --quick`"
        assert any(line.startswith(note) for line in merged)
    with pytest.raises(ValueError, match="seed 0 is in more than one"):
        run.main(["--only", "value", "--merge", f"{output},{output}", "--output", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="has no table.json"):
        run.main(["--only", "table", "--merge", str(tmp_path / "nowhere"), "--output", str(tmp_path)])


def test_peer_first_losses_agree(quick_run):
    output, _ = quick_run
    results = json.loads((output / "peer.json").read_text())["results"]
    jobs = ["builtin"] + (["hh"] if peer.HH_FILE.exists() else [])
    assert [job for job in ("builtin", "hh") if job in results] == jobs
    for job in jobs:
        ours, theirs = results[job]["first_losses"]["ours"], results[job]["first_losses"]["trl"]
        assert abs(ours - theirs) <= 1e-5
        assert abs(ours - 0.6931472) > 1e-4  # the reference differs from the policy: not the trivial log 2
        assert 0 < results[job]["fraction_of_matmul_peak"]["ours"] < 1


def test_value_judges_every_value_model_and_policy_of_its_runs(quick_run):
    output, _ = quick_run
    results = json.loads((output / "value.json").read_text())["results"]
    seed_run = results["builtin"]["0"]
    assert set(seed_run["values"]) == {*value_benchmark.JUDGED, "sft_monte_carlo"}
    # the SFT policy's own values, on its own samples only
    monte_carlo = seed_run["values"]["sft_monte_carlo"]
    assert set(monte_carlo) == {"sft_samples"}
    assert monte_carlo["sft_samples"]["final_value_pearson"] == pytest.approx(1.0)
    assert set(seed_run["policies"]) == {"sft", *value_runs.POLICIES}
    gold = seed_run["values"]["gold"]  # the oracle agrees with itself: the measures are wired right
    for samples in ("sft_samples", "dvpo_samples"):
        assert gold[samples]["final_value_pearson"] == pytest.approx(1.0)
        assert gold[samples]["token_credit_pearson"] == pytest.approx(1.0)
        assert gold[samples]["contextual_credit_pearson"] == pytest.approx(1.0)
    root = output / "runs" / "value" / "seed0" / "builtin"
    for item in value_runs.BUILTIN_RUNS:
        assert (root / item.name / "model" / "config.json").exists(), item.name
    assert (root / "ppo" / "critic" / "config.json").exists()
    for output, _ in value_runs.SAMPLED_DATA.values():  # the gold- and the GVM-scored samples
        assert (root / output).stat().st_size > 0
    assert bool(results["hh"]) == value_runs.HH_FILE.exists()
    if results["hh"]:
        assert set(results["hh"]["0"]) == {*value_runs.HH_VALUE_MODELS, "ppo_critic"}


def test_value_run_arguments_scale_the_budget_and_let_later_options_win(tmp_path):
    configs, device = value_benchmark.CONFIGS, torch.device("cpu")
    runs = {item.name: item for item in value_runs.BUILTIN_RUNS}
    quarter = value_runs.reduced(0.25)
    gvm = value_runs.arguments(runs["gvm_inner_epochs"], 1, tmp_path, quarter, device, configs)
    assert "--trainer.max_steps=150" in gvm and "--model.init_args.inner_epochs=2" in gvm  # 600 / 4
    assert f"--model.init_args.model.name_or_path={tmp_path / 'sft' / 'model'}" in gvm
    oracle = value_runs.arguments(runs["dvpo_gold_values"], 0, tmp_path, quarter, device, configs)
    assert "--model.init_args.gold_values=true" in oracle
    assert not any(option.startswith("--model.init_args.value_model.") for option in oracle)
    samples = value_runs.arguments(runs["gvm_sft_samples"], 0, tmp_path, quarter, device, configs)
    assert f"--data.init_args.dataset={tmp_path}/{value_runs.SAMPLED_PAIRS}" in samples
    assert "--model.init_args.lam=1.0" in samples  # VC-PPO's Monte-Carlo targets
    # the earned form trains on the same gold-scored file, written before it by the run above
    earned = value_runs.arguments(runs["gvm_earned_sft_samples"], 0, tmp_path, quarter, device, configs)
    assert f"--data.init_args.dataset={tmp_path}/{value_runs.SAMPLED_PAIRS}" in earned
    assert "--model.init_args.value_form=earned" in earned
    names = [item.name for item in value_runs.BUILTIN_RUNS]
    assert names.index("gvm_sft_samples") < names.index("gvm_earned_sft_samples")
    reference = value_runs.arguments(runs["dvpo_reference_advantages"], 0, tmp_path, quarter, device, configs)
    assert '--model.init_args.advantage.options={"bootstrap": "zero", "whiten_values": true}' in reference
    assert "--data.init_args.max_response_length=16" in samples  # the task's, not a file's default
    hh_ppo = value_runs.arguments(
        value_runs.HH_RUNS[-1], 0, tmp_path, value_runs.QUICK, device, configs, hh=True
    )
    batch_sizes = [option for option in hh_ppo if option.startswith("--data.init_args.batch_size=")]
    assert batch_sizes[-1] == "--data.init_args.batch_size=8"  # the quick scale's wins over the run's own 32


def test_value_refuses_a_configs_directory_without_its_configs(tmp_path):
    (tmp_path / "sft.yaml").write_text("{}")
    with pytest.raises(ValueError, match="lacks dpo.yaml, dvpo.yaml"):
        value_benchmark.run(quick=True, device=torch.device("cpu"), output=tmp_path, configs=tmp_path)


def test_real_value_quick_judges_every_value_model_and_policy_on_disjoint_pairs(hh_file, tmp_path):
    threads = torch.get_num_threads()
    written = run.main(["--quick", "--only", "real_value", "--output", str(tmp_path)])
    torch.set_num_threads(threads)
    transformers.utils.logging.enable_progress_bar()
    markdown = written["real_value"].read_text()
    for column in (
        "pairwise accuracy (complete response)",
        "DVPO v2 paper",
        "random init, value report",
        "win rate vs instruct (judge)",
        "KL to instruct (nats)",
    ):
        assert column in markdown
    assert "![real_value_token_credit](real_value_token_credit.png)" in markdown
    assert (
        "| met |" not in markdown and "not judged (not the full scale)" in markdown
    )  # quick judges no budget
    assert (tmp_path / "real_value_token_credit.png").stat().st_size > 0
    results = json.loads((tmp_path / "real_value.json").read_text())["results"]
    scale = real_value.QUICK
    assert set(results["values"]) == {"rm", "gvm", "ppo_critic", "judge"}
    assert {value["pairs"] for value in results["values"].values()} == {scale.held_out_pairs}
    start = results["policies"]["base"]
    assert start["win_rate_vs_instruct"] == 0.5 and start["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert set(results["policies"]) == {"base", "ppo", "dvpo"}
    # The proxy-gold split: no pair is in two parts, and every row read is in one.
    parts = {
        name: (tmp_path / "runs" / "real_value" / "seed0" / "data" / f"{name}.jsonl").read_text().splitlines()
        for name in ("runs", "judge", "held_out")
    }
    assert len(parts["held_out"]) == scale.held_out_pairs
    assert sum(map(len, parts.values())) == len(set().union(*parts.values())) == scale.rows


def test_real_value_is_opt_in():
    assert "real_value" not in run.parse_args([]).only
    assert run.parse_args(["--only", "real_value"]).only == ["real_value"]


def test_real_value_reduced_scale_keeps_every_budget_positive():
    scale = real_value.FULL.reduced(0.01)
    budgets = ("value_steps", "judge_steps", "rl_iterations", "held_out_pairs", "held_out_prompts")
    assert [getattr(scale, name) for name in budgets] == [1, 1, 1, 4, 4]
    half = real_value.FULL.reduced(0.5)
    assert [getattr(half, name) * 2 for name in budgets] == [
        getattr(real_value.FULL, name) for name in budgets
    ]


def test_only_runs_the_chosen_benchmarks(tmp_path):
    threads = torch.get_num_threads()
    written = run.main(["--quick", "--only", "rollout", "--output", str(tmp_path)])
    torch.set_num_threads(threads)
    transformers.utils.logging.enable_progress_bar()
    assert list(written) == ["rollout"]
    assert sorted(path.name for path in tmp_path.glob("*.md")) == ["README.md", "rollout.md"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "table,nope"], "unknown benchmark"),
        (["--seeds", "0,x"], "comma-separated integers"),
        (["--seeds", "1,1"], "repeated seed"),
        (["--fraction", "0"], "--fraction takes a number in"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_model_state_floor_counts_trained_and_frozen_models():
    work = LinearWork(body=0, head=0)
    exports = cost.Exports(
        "p", "r", "g", policy_parameters=10, value_parameters=8, policy_work=work, value_work=work
    )
    gib = 2**30
    # PPO: actor 10 and critic 8 trained (16 B each), reference 10 and reward model 8 frozen (4 B each).
    assert cost.model_state_floor_gb(exports, "ppo") * gib == 16 * 18 + 4 * 18
    # DVPO: actor 10 trained, reference 10 and GVM 8 frozen.
    assert cost.model_state_floor_gb(exports, "dvpo") * gib == 16 * 10 + 4 * 18


def test_table_markdown_and_its_row_check():
    table = Table("caption", ["a", "b"], [["1", "2"]])
    assert table.markdown() == "**caption**\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        Table("broken", ["a", "b"], [["1"]]).markdown()


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    assert mean_std([0.5]) == "0.500"
    assert mean_std([-0.0001, 0.0001]) == "0.000 ± 0.000"  # no "-0.000"


def test_measurements_take_turns():
    assert [alternating(("ppo", "dvpo"), index) for index in range(3)] == [
        ["ppo", "dvpo"],
        ["dvpo", "ppo"],
        ["ppo", "dvpo"],
    ]


def test_index_orders_known_benchmarks_first(tmp_path):
    for name in ("zeta", "peer", "table"):
        (tmp_path / f"{name}.md").write_text(f"# {name}\n")
    index = write_index(tmp_path).read_text()
    assert index.index("## table") < index.index("## peer") < index.index("## zeta")


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device must be one of"):
        resolve_device("tpu")


def test_linear_work_counts_the_body_and_the_lm_head_apart(tokenizer):
    from dvpo_lightning.models import ModelSpec, build_policy, build_value_model

    arch = cost.llama(64, 2)  # per layer 4 x 64^2 attention + 3 x 64 x 256 MLP
    policy = build_policy(ModelSpec(arch=dict(arch)), tokenizer)
    work = LinearWork.of(policy)
    assert work == LinearWork(body=2 * (4 * 64 * 64 + 3 * 64 * 256), head=64 * len(tokenizer))
    assert work.forward(10, logit_tokens=3) == 2 * work.body * 10 + 2 * work.head * 3
    assert work.training(10) == 3 * work.forward(10)
    value = LinearWork.of(build_value_model(ModelSpec(arch=dict(arch)), tokenizer))
    assert value.body == work.body + 64 and value.head == 0  # a scalar head is no LM head


def test_stage_flops_count_each_algorithms_models():
    work = LinearWork(body=100, head=10)
    exports = cost.Exports("p", "r", "g", 0, 0, policy_work=work, value_work=LinearWork(body=50, head=0))
    scale = cost.QUICK  # 4 prompts x 4 new tokens, 1 epoch
    ppo, dvpo = (cost.stage_flops(name, exports, scale, tokens=40) for name in ("ppo", "dvpo"))
    assert ppo["generate"] == dvpo["generate"] == 2 * 100 * 40 + 2 * 10 * 16
    assert ppo["score"] - dvpo["score"] == 2 * 50 * 40  # PPO also runs its critic
    assert ppo["update"] - dvpo["update"] == 6 * 50 * 40  # and trains it


def test_matmul_peak_is_a_rate():
    assert 1e6 < matmul_peak(torch.device("cpu"), quick=True) < 1e14
