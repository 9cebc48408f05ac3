"""Behaviour of the evaluation: datasets, grading, the report maths, resumable results, the
plot (edge/datasets, grading.py, eval_results.py, evaluate.py, eval_report.py)."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from edge import datasets
from edge.datasets import EvalError, Problem, load_problems, math_prompt
from edge.eval_report import format_table, pareto_front, plot, summarize, write_report
from edge.eval_results import Row, file_sha256, read_results, regrade
from edge.evaluate import EvalInterrupted, Progress, run_eval
from edge.grading import extract_boxed, grade, grade_answer

FIXTURE = Path(__file__).parents[1] / "fixtures" / "eval_run.jsonl"
CONFIG = {"dataset": "math500", "levels": [1], "seed": 0, "max_tokens": 512, "mode": "reasoning"}


# --------------------------------------------------------------------------- grading


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"),
        (r"\frac{14}{3}", r"\dfrac{14}{3}"),
        ("10\\%", "0.1"),
        ("p - q", "-q+p"),
        (r"2\sqrt{3}", r"\sqrt{12}"),
        ("204", "204.0"),
        (r"[2,5)", r"[2, 5)"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),
    ],
)
def test_equivalent_forms_of_the_gold_answer_grade_correct(gold: str, predicted: str) -> None:
    assert grade(f"So the answer is $\\boxed{{{predicted}}}$.", gold)


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        ("3", "4"),
        (r"\frac{1}{2}", "0.51"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{3})"),
        ("p - q", "q - p"),
    ],
)
def test_wrong_answers_grade_wrong(gold: str, predicted: str) -> None:
    assert not grade(f"\\boxed{{{predicted}}}", gold)


def test_output_without_a_box_grades_wrong_even_if_it_states_the_answer() -> None:
    assert not grade("The answer is 42.", "42")
    assert not grade("The answer is \\boxed{}.", "42")
    assert not grade_answer(None, "42")


def test_the_last_box_wins() -> None:
    text = "First I thought \\boxed{41}. Wait, recount: \\boxed{42}."
    assert extract_boxed(text) == "42"
    assert grade(text, "42")
    assert not grade("\\boxed{42} then, on second thought, \\boxed{41}", "42")


def test_nested_braces_in_a_box_are_kept_whole() -> None:
    text = r"Thus $\boxed{\frac{\sqrt{3}}{2}}$ is it."
    assert extract_boxed(text) == r"\frac{\sqrt{3}}{2}"
    assert grade(text, r"\frac{\sqrt3}{2}")


def test_fbox_and_space_forms_are_boxes() -> None:
    assert extract_boxed(r"answer: \fbox{7}") == "7"
    assert extract_boxed("answer: $\\boxed 5$") == "5"
    assert extract_boxed(r"\boxed{1} and later \fbox{2}") == "2"


def test_a_box_cut_off_by_the_budget_falls_back_to_the_previous_one() -> None:
    assert extract_boxed(r"\boxed{2} ... so \boxed{\frac{3") == "2"
    assert extract_boxed(r"no box here, \boxedsomething{3}") is None


def test_grading_works_off_the_main_thread() -> None:
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(grade(r"\boxed{0.5}", r"\frac12")))
    worker.start()
    worker.join()
    assert results == [True]


def test_every_math500_reference_solution_grades_correct() -> None:
    lines = (datasets.resolve("math500")).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    wrong = [i for i, r in enumerate(records) if not grade(r["solution"], r["answer"])]
    assert wrong == []


# --------------------------------------------------------------------------- datasets


def test_math500_level_1_has_43_problems_with_line_index_ids() -> None:
    problems = load_problems(datasets.resolve("math500"), levels={1}, limit=None)
    assert len(problems) == 43
    assert {p.level for p in problems} == {1}
    assert all(p.id.isdigit() for p in problems)
    assert len(load_problems(datasets.resolve("math500"), levels=None, limit=None)) == 500
    assert len(load_problems(datasets.resolve("math500"), levels={1, 2}, limit=5)) == 5


def test_aime_keeps_its_ids_and_refuses_a_level_filter() -> None:
    problems = load_problems(datasets.resolve("aime2024"), levels=None, limit=None)
    assert len(problems) == 30
    assert problems[0].id == "60" and problems[0].answer == "204" and problems[0].level is None
    with pytest.raises(EvalError, match="no levels"):
        load_problems(datasets.resolve("aime2024"), levels={1}, limit=None)


def test_missing_dataset_and_bad_json_line_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="not found"):
        load_problems(tmp_path / "nope.jsonl", None, None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": oops}\n', encoding="utf-8")
    with pytest.raises(EvalError, match="line 2"):
        load_problems(bad, None, None)


def test_prompt_is_the_papers_without_the_think_tag() -> None:
    prompt = math_prompt(Problem(id="0", problem="What is 1+1?", answer="2"))
    assert prompt == (
        "Please reason step by step, and put your final answer within \\boxed{}. What is 1+1?"
    )


# --------------------------------------------------------------------------- report maths


def _fixture_rows() -> list[Row]:
    config, rows = read_results(FIXTURE)
    assert config is not None and config["dataset"] == "math500"
    return rows


def test_summary_of_the_recorded_run_matches_hand_computed_numbers() -> None:
    by_name = {s.strategy: s for s in summarize(_fixture_rows())}
    assert list(by_name) == ["edge", "speculative", "cloud"]

    edge = by_name["edge"]
    assert (edge.n, edge.correct, edge.accuracy_pct) == (2, 1, 50.0)
    assert edge.avg_tokens == 2000.0  # (1000 + 3000) / 2
    assert edge.mean_wall_s == 15.0  # (10 + 20) / 2
    assert edge.tokens_per_s == pytest.approx(4000 / 30)
    assert edge.mean_tokens_per_s == pytest.approx(125.0)  # (100 + 150) / 2
    assert edge.mean_ttft_s == pytest.approx(0.3)
    assert edge.cloud_share_pct == 0.0

    spec = by_name["speculative"]
    assert spec.accuracy_pct == 100.0
    assert spec.avg_tokens == 1500.0
    assert spec.mean_wall_s == 22.5
    assert spec.tokens_per_s == pytest.approx(3000 / 45)
    assert spec.mean_tokens_per_s == pytest.approx(65.0)  # (50 + 80) / 2
    assert spec.cloud_share_pct == pytest.approx(100 * 800 / 3000)
    assert spec.takeovers_per_problem == 5.0
    assert spec.fallbacks == 1 and spec.errors == 0

    cloud = by_name["cloud"]  # one error row: counted wrong, left out of the speed columns
    assert (cloud.n, cloud.correct, cloud.accuracy_pct, cloud.errors) == (2, 1, 50.0, 1)
    assert cloud.avg_tokens == 500.0
    assert cloud.mean_wall_s == 25.0
    assert cloud.tokens_per_s == 20.0
    assert cloud.mean_ttft_s == 1.0
    assert cloud.cloud_share_pct == 100.0


def test_recorded_verdicts_agree_with_the_grader() -> None:
    for row in _fixture_rows():
        assert grade_answer(row.predicted, row.gold) == row.correct, row


def test_table_lists_every_strategy_in_paper_shape() -> None:
    table = format_table(summarize(_fixture_rows()))
    lines = table.splitlines()
    assert "accuracy % / avg tokens" in lines[0]
    assert len(lines) == 2 + 3
    for name, cell in [
        ("edge", "50.0 / 2000"),
        ("speculative", "100.0 / 1500"),
        ("cloud", "50.0 / 500"),
    ]:
        assert any(line.startswith(f"| {name} ") and cell in line for line in lines), name


def test_report_json_holds_summaries_and_rows(tmp_path: Path) -> None:
    rows = _fixture_rows()
    out = tmp_path / "report.json"
    write_report(summarize(rows), rows, out, run_config=CONFIG)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [s["strategy"] for s in report["summaries"]] == ["edge", "speculative", "cloud"]
    assert len(report["rows"]) == 6
    assert report["config"]["dataset"] == "math500"


def test_pareto_front_drops_a_point_beaten_on_both_axes() -> None:
    summaries = summarize(_fixture_rows())
    # edge: 133 tok/s, 50 %; speculative: 67 tok/s, 100 %; cloud: 20 tok/s, 50 % (dominated)
    assert [s.strategy for s in pareto_front(summaries)] == ["speculative", "edge"]


def test_plot_writes_a_png_that_matplotlib_reads_back(tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "plots" / "tradeoff.png"
    plot(summarize(_fixture_rows()), out, dataset="MATH-500", date="2025-01-01")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 0 and image.shape[1] > 0


# --------------------------------------------------------------------------- the run


def _problems() -> list[Problem]:
    return [
        Problem(id="a", problem="1+1?", answer="2", level=1),
        Problem(id="b", problem="half of 1?", answer=r"\frac{1}{2}", level=1),
        Problem(id="c", problem="3*3?", answer="9", level=2),
    ]


def _result(answer: str, strategy: str) -> dict[str, Any]:
    cloud = 30 if strategy != "edge" else 0
    return {
        "text": f"Thinking... \\boxed{{{answer}}}",
        "finish_reason": "stop",
        "segments": [],
        "stats": {
            "edge_tokens": 70,
            "cloud_tokens": cloud,
            "takeovers": 1,
            "wall_s": 2.0,
            "ttft_s": 0.1,
            "fallback": False,
            "cloud_cached_tokens": 0,
            "cloud_prefill_tokens": 0,
        },
    }


class CountingAnswerer:
    """Answers every problem right; records each (problem id, strategy) it is asked."""

    def __init__(self, interrupt_on: int | None = None, fail_on: set[str] | None = None) -> None:
        self.by_prompt = {math_prompt(p): p for p in _problems()}
        self.calls: list[tuple[str, str]] = []
        self.interrupt_on = interrupt_on
        self.fail_on = fail_on or set()

    def __call__(self, prompt: str, strategy: str) -> dict[str, Any]:
        problem = self.by_prompt[prompt]
        self.calls.append((problem.id, strategy))
        if len(self.calls) == self.interrupt_on:
            raise KeyboardInterrupt
        if problem.id in self.fail_on:
            raise RuntimeError("cloud refused")
        return _result(problem.answer, strategy)


def _row_keys(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    return [(r["problem_id"], r["strategy"]) for r in rows]


def test_an_interrupted_run_resumes_with_only_the_remaining_pairs(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    strategies = ["edge", "speculative"]
    first = CountingAnswerer(interrupt_on=3)
    with pytest.raises(EvalInterrupted) as stopped:
        run_eval(_problems(), strategies, first, out, progress=False, run_config=CONFIG)
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert [r.key for r in stopped.value.rows] == [("a", "edge"), ("a", "speculative")]
    assert _row_keys(out) == [("a", "edge"), ("a", "speculative")]

    second = CountingAnswerer()
    rows = run_eval(_problems(), strategies, second, out, progress=False, run_config=CONFIG)
    remaining = [("b", "edge"), ("b", "speculative"), ("c", "edge"), ("c", "speculative")]
    assert second.calls == remaining
    assert len(rows) == 6 and all(r.correct for r in rows)
    keys = _row_keys(out)
    assert len(keys) == 6 and len(set(keys)) == 6

    third = CountingAnswerer()
    again = run_eval(_problems(), strategies, third, out, progress=False, run_config=CONFIG)
    assert third.calls == [] and [r.key for r in again] == [r.key for r in rows]


def test_resuming_under_another_config_is_refused_unless_restarted(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems()[:1], ["edge"], CountingAnswerer(), out, False, run_config=CONFIG)
    other = {**CONFIG, "max_tokens": 1024}
    with pytest.raises(EvalError, match=r"max_tokens.*restart=True"):
        run_eval(_problems()[:1], ["edge"], CountingAnswerer(), out, False, run_config=other)

    fresh = CountingAnswerer()
    run_eval(_problems()[:1], ["edge"], fresh, out, False, run_config=other, restart=True)
    assert fresh.calls == [("a", "edge")]
    config, rows = read_results(out)
    assert config == other and len(rows) == 1


def test_a_knob_added_to_the_method_since_is_no_config_change_at_its_default(
    tmp_path: Path,
) -> None:
    import dataclasses

    from shared.policy import PolicyConfig

    out = tmp_path / "run.jsonl"
    now = dataclasses.asdict(PolicyConfig())
    before = {k: v for k, v in now.items() if not k.startswith("judge_")}  # as of 12-02
    run_eval(
        _problems()[:1], ["edge"], CountingAnswerer(), out, False, {**CONFIG, "policy": before}
    )
    resumed = CountingAnswerer()
    run_eval(_problems()[:2], ["edge"], resumed, out, False, {**CONFIG, "policy": now})
    assert resumed.calls == [("b", "edge")]  # the new knobs at their defaults: same method
    changed = {**now, "judge_threshold": -0.5}
    with pytest.raises(EvalError, match=r"judge_threshold.*restart=True"):
        run_eval(_problems()[:2], ["edge"], resumed, out, False, {**CONFIG, "policy": changed})


def _table_config(variants: dict[str, dict[str, str]]) -> dict[str, Any]:
    return {**CONFIG, "strategies": ["edge", *variants], "variants": variants}


def test_a_resume_adds_a_variant_as_new_rows_and_the_header_names_them_all(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run.jsonl"
    first = {"unc-1": {"trigger": "uncertainty", "uncertainty_threshold": "1"}}
    run_eval(_problems(), ["edge", "unc-1"], CountingAnswerer(), out, False, _table_config(first))

    added = {"w20": {"trigger": "uncertainty", "uncertainty_window": "20"}}
    answerer = CountingAnswerer()
    rows = run_eval(_problems(), ["w20"], answerer, out, False, _table_config(added))

    assert answerer.calls == [("a", "w20"), ("b", "w20"), ("c", "w20")]  # only the new row
    assert [r.key for r in rows][:3] == [("a", "edge"), ("a", "unc-1"), ("a", "w20")]
    assert len(rows) == 9  # the whole table for these problems, old rows included
    config, stored = read_results(out)
    assert config is not None
    assert config["strategies"] == ["edge", "unc-1", "w20"]
    assert config["variants"] == {**first, **added}
    assert len(stored) == 9
    headers = [line for line in out.read_text().splitlines() if '"kind": "header"' in line]
    assert len(headers) == 2

    again = CountingAnswerer()  # running a subset again adds nothing and asks nothing
    run_eval(_problems(), ["edge"], again, out, False, _table_config({}))
    assert again.calls == []
    assert out.read_text().count('"kind": "header"') == 2


def test_a_resume_may_not_redefine_a_variant(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    knobs = {"unc": {"trigger": "uncertainty", "uncertainty_threshold": "1"}}
    run_eval(_problems()[:1], ["unc"], CountingAnswerer(), out, False, _table_config(knobs))
    other = {"unc": {"trigger": "uncertainty", "uncertainty_threshold": "2"}}
    answerer = CountingAnswerer()
    with pytest.raises(EvalError, match=r"variant 'unc'.*another name"):
        run_eval(_problems(), ["unc"], answerer, out, False, _table_config(other))
    assert answerer.calls == []
    config, _ = read_results(out)
    assert config is not None and config["variants"] == knobs


def test_a_problem_that_raises_is_an_error_row_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    answerer = CountingAnswerer(fail_on={"b"})
    rows = run_eval(_problems(), ["speculative"], answerer, out, False, run_config=CONFIG)
    assert [r.problem_id for r in rows] == ["a", "b", "c"]
    failed = rows[1]
    assert failed.error == "RuntimeError: cloud refused"
    assert not failed.correct and failed.output_tokens == 0
    assert rows[0].correct and rows[2].correct
    (summary,) = summarize(rows)
    assert summary.errors == 1 and summary.accuracy_pct == pytest.approx(200 / 3)


def test_error_rows_are_answered_again_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems(), ["edge"], CountingAnswerer(fail_on={"b"}), out, False, run_config=CONFIG)
    plain = CountingAnswerer()
    run_eval(_problems(), ["edge"], plain, out, False, run_config=CONFIG)
    assert plain.calls == []
    retry = CountingAnswerer()
    rows = run_eval(_problems(), ["edge"], retry, out, False, run_config=CONFIG, retry_errors=True)
    assert retry.calls == [("b", "edge")]
    assert [r.error for r in rows] == [None, None, None]
    assert len(read_results(out)[1]) == 3


def test_a_line_torn_by_a_crash_is_dropped_and_its_pair_answered_again(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems()[:2], ["edge"], CountingAnswerer(), out, False, run_config=CONFIG)
    text = out.read_text(encoding="utf-8")
    last_start = text.rstrip("\n").rfind("\n") + 1
    out.write_text(text[: last_start + 25], encoding="utf-8")  # half of row "b"
    answerer = CountingAnswerer()
    rows = run_eval(_problems()[:2], ["edge"], answerer, out, False, run_config=CONFIG)
    assert answerer.calls == [("b", "edge")]
    assert len(rows) == 2 and _row_keys(out) == [("a", "edge"), ("b", "edge")]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_count_accuracy_and_eta_on_a_tty_only(tmp_path: Path) -> None:
    tty = FakeTTY()
    run_eval(
        _problems(),
        ["edge"],
        CountingAnswerer(),
        tmp_path / "a.jsonl",
        True,
        run_config=CONFIG,
        progress_stream=tty,
    )
    shown = tty.getvalue()
    assert "\r1/3" in shown and "\r3/3" in shown and "acc 100.0%" in shown and "ETA" in shown

    pipe = io.StringIO()
    run_eval(
        _problems(),
        ["edge"],
        CountingAnswerer(),
        tmp_path / "b.jsonl",
        True,
        run_config=CONFIG,
        progress_stream=pipe,
    )
    lines = pipe.getvalue().splitlines()  # a log: one plain line per row, no \r
    assert len(lines) == 3 and "\r" not in pipe.getvalue()
    assert lines[0].startswith("1/3  acc 100.0%") and "edge on " in lines[0]
    assert lines[2].startswith("3/3") and ": right, " in lines[2] and " tokens in " in lines[2]

    quiet = io.StringIO()
    run_eval(
        _problems(),
        ["edge"],
        CountingAnswerer(),
        tmp_path / "c.jsonl",
        False,
        run_config=CONFIG,
        progress_stream=quiet,
    )
    assert quiet.getvalue() == ""


def test_progress_eta_is_remaining_items_times_mean_item_time() -> None:
    bar = Progress(total=10, already=4, stream=io.StringIO())
    row = Row.from_dict({**json.loads(FIXTURE.read_text().splitlines()[1]), "correct": True})
    bar.update(row, 30.0)
    bar.update(row, 90.0)
    assert bar.line() == "6/10  acc 100.0%  ETA 0:04:00"  # 4 left x 60 s


# --------------------------------------------------------------------------- model pairs


PAIR_A = {**CONFIG, "cloud_model": "Qwen2.5-Coder-0.5B", "edge_model_sha256": "a" * 64}
PAIR_B = {**CONFIG, "cloud_model": "DeepSeek-R1-Distill-Qwen-32B", "edge_model_sha256": "a" * 64}


def test_the_header_names_the_model_pair_and_every_row_the_pair_that_answered_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems()[:1], ["edge"], CountingAnswerer(), out, False, run_config=PAIR_A)
    header = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert header["config"]["cloud_model"] == "Qwen2.5-Coder-0.5B"
    assert header["config"]["edge_model_sha256"] == "a" * 64
    _, rows = read_results(out)
    assert (rows[0].cloud_model, rows[0].edge_model_sha256) == ("Qwen2.5-Coder-0.5B", "a" * 64)


def test_resuming_against_another_cloud_is_refused_unless_mixing_is_allowed(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems()[:1], ["edge"], CountingAnswerer(), out, False, run_config=PAIR_A)
    with pytest.raises(EvalError, match=r"another model pair \(cloud_model: .*allow_mixed"):
        run_eval(_problems()[:2], ["edge"], CountingAnswerer(), out, False, run_config=PAIR_B)

    more = CountingAnswerer()
    rows = run_eval(
        _problems()[:2], ["edge"], more, out, False, run_config=PAIR_B, allow_mixed=True
    )
    assert more.calls == [("b", "edge")], "only the missing pair is answered"
    assert [r.cloud_model for r in rows] == [
        "Qwen2.5-Coder-0.5B",
        "DeepSeek-R1-Distill-Qwen-32B",
    ], "each row still says which cloud answered it"


def test_a_results_file_from_before_the_pair_was_recorded_is_not_resumed_silently(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems()[:1], ["edge"], CountingAnswerer(), out, False, run_config=CONFIG)
    with pytest.raises(EvalError, match="another model pair"):
        run_eval(_problems()[:1], ["edge"], CountingAnswerer(), out, False, run_config=PAIR_A)


def test_the_report_lists_the_pairs_that_answered(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems()[:1], ["edge"], CountingAnswerer(), out, False, run_config=PAIR_A)
    rows = run_eval(
        _problems()[:2],
        ["edge"],
        CountingAnswerer(),
        out,
        False,
        run_config=PAIR_B,
        allow_mixed=True,
    )
    write_report(summarize(rows), rows, tmp_path / "report.json", run_config=PAIR_B)
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert {(p["cloud_model"], p["rows"]) for p in report["model_pairs"]} == {
        ("Qwen2.5-Coder-0.5B", 1),
        ("DeepSeek-R1-Distill-Qwen-32B", 1),
    }


def test_each_row_keeps_the_answer_text_so_it_can_be_graded_again(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    run_eval(_problems()[:2], ["edge"], CountingAnswerer(), out, False, run_config=CONFIG)
    _, rows = read_results(out)
    assert rows[1].text == "Thinking... \\boxed{\\frac{1}{2}}"
    # a grader that was wrong at the time: the stored text is judged again, no re-run
    wrong = Row(**{**rows[1].__dict__, "predicted": None, "correct": False})
    again = regrade(wrong)
    assert (again.predicted, again.correct) == (r"\frac{1}{2}", True)


def test_the_edge_model_checksum_is_the_files_sha256(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    import hashlib

    assert file_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [(0, 10, 0.0, 27.75), (5, 10, 23.66, 76.34), (10, 10, 72.25, 100.0), (0, 0, 0.0, 0.0)],
)
def test_the_plots_accuracy_interval_is_wilsons(correct, n, low, high) -> None:
    from edge.eval_report import wilson_interval

    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=0.01)


def test_the_table_says_how_much_of_the_gap_each_strategy_closes_and_how_fast() -> None:
    from dataclasses import replace

    from edge.eval_report import against_baselines

    by_name = {s.strategy: s for s in summarize(_fixture_rows())}
    edge = replace(by_name["edge"], accuracy_pct=20.0, tokens_per_s=30.0)
    cloud = replace(by_name["cloud"], accuracy_pct=60.0, tokens_per_s=5.0)
    spec = replace(by_name["speculative"], accuracy_pct=50.0, tokens_per_s=8.0)
    relative = against_baselines([edge, spec, cloud])
    assert relative["speculative"].gap_closed_pct == pytest.approx(75.0)
    assert relative["speculative"].speed_vs_cloud == pytest.approx(1.6)
    assert relative["edge"].gap_closed_pct == 0.0 and relative["cloud"].gap_closed_pct == 100.0
    table = format_table([edge, spec, cloud])
    assert "gap closed %" in table.splitlines()[0]
    assert any(line.startswith("| speculative ") and "| 75 " in line for line in table.splitlines())


def test_without_a_gap_or_a_baseline_nothing_is_claimed() -> None:
    from edge.eval_report import against_baselines

    summaries = summarize(_fixture_rows())  # edge and cloud both at 50 %: no gap to close
    assert all(b.gap_closed_pct is None for b in against_baselines(summaries).values())
    without_cloud = [s for s in summaries if s.strategy != "cloud"]
    assert against_baselines(without_cloud) == {}
    assert "gap closed" not in format_table(without_cloud)
