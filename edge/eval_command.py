"""`specthink-edge eval`: what the command does once typer has parsed its options.

Boundary: edge/cli.py declares the options; this module turns them into problems, one policy
per strategy (named `--variant`s included), a cloud transport and a drafter, runs
`edge.evaluate.run_eval` (resumable, one row per problem and strategy), and writes the table,
report.json and tradeoff.png. `report` does the last step alone from the results of one or
more folders (edge/eval_folders.py reads and joins them): no model, no cloud, so it can run
beside an eval that is still answering.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edge.options import EdgeOptions, Strategy
from edge.outcome import EdgeError, notice_line
from edge.policy_choice import knob_value, policy_choice, with_mode
from edge.run import connect_cloud, settings
from edge.small_model import load_drafter

if TYPE_CHECKING:
    from edge.cloud_client import GrpcCloud
    from edge.drafter import LlamaDrafter

DEFAULT_STRATEGIES = "speculative,edge,cloud"  # a run's rows when --strategy is not given
EVAL_MAX_TOKENS = 32768  # the evaluation budget of Speculative Thinking (its evaluation setup)


def notice(message: str) -> None:
    typer.echo(notice_line(message), err=True)


def default_out(dataset_path: Path) -> Path:
    return Path("eval-results") / dataset_path.stem


def run(
    dataset: str,
    options: EdgeOptions,
    *,
    limit: int | None,
    levels: str | None,
    strategies: str | None,
    variants: list[str],
    out: Path | None,
    restart: bool,
    allow_mixed: bool,
) -> bool:
    """Answer every (problem, strategy) not yet in OUT/results.jsonl, then write the outputs
    over every row of the table (a run that adds a variant reports it beside the others).
    False when interrupted (the rows so far are kept and reported)."""
    from edge import datasets, eval_results, evaluate
    from edge.cloud_session import CloudSession
    from edge.datasets import EvalError
    from edge.session import SessionOptions, SpeculativeSession
    from shared.policy import PolicyConfigError
    from shared.policy_config import config_from_mapping
    from shared.wire import Message, Sampling

    named = _parse_variants(variants)
    wanted = [s.strip() for s in (strategies or DEFAULT_STRATEGIES).split(",") if s.strip()]
    wanted += [name for name in named if name not in wanted]
    unknown = [s for s in wanted if s not in (*Strategy, *named)]
    if not wanted or unknown:
        raise EdgeError(
            "--strategy takes speculative, edge, cloud and --variant names, not "
            f"{', '.join(unknown) or 'nothing'}"
        )
    path = datasets.resolve(dataset)
    try:
        level_set = {int(x) for x in levels.split(",")} if levels else None
        problems = datasets.load_problems(path, level_set, limit)
    except ValueError:
        raise EdgeError(f"--levels takes comma-separated integers, not {levels!r}") from None
    except EvalError as exc:
        raise EdgeError(str(exc)) from None
    cfg = settings(dataclasses.replace(options, max_tokens=options.max_tokens or EVAL_MAX_TOKENS))
    choice = policy_choice(cfg, options.knobs)
    needs_cloud = any(s != Strategy.EDGE for s in wanted)
    if needs_cloud and not cfg.cloud:
        raise EdgeError("strategies other than edge need a cloud: pass --cloud HOST:PORT")
    transport, _ = connect_cloud(
        cfg, Strategy.SPECULATIVE, local_only=not needs_cloud, say=notice, check=False
    )
    drafter = load_drafter(cfg) if any(s != Strategy.CLOUD for s in wanted) else None
    base_policy, mode_reason = with_mode(choice, drafter)
    notice(f"mode {mode_reason}")
    policies = {"speculative": base_policy}
    try:
        for name, overrides in named.items():
            policies[name] = config_from_mapping(overrides, base_policy)
    except PolicyConfigError as exc:
        raise EdgeError(f"--variant {name}: {exc}") from None
    budget = cfg.max_tokens
    n_ctx = drafter.n_ctx if drafter is not None else None
    if n_ctx and budget > n_ctx:
        notice(f"token budget {budget} capped to the edge model's context ({n_ctx})")
        budget = n_ctx
    sampling = Sampling(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed
    )

    def answer_fn(prompt: str, strategy: str) -> dict[str, Any]:
        session_id = uuid.uuid4().hex
        cloud_session = (
            CloudSession(transport, session_id)
            if transport is not None and strategy != Strategy.EDGE
            else None
        )
        options = SessionOptions(
            strategy=Strategy(strategy) if strategy in set(Strategy) else Strategy.SPECULATIVE,
            max_tokens=budget,
            sampling=sampling,
            policy=policies.get(strategy, base_policy),
            think_prefix=drafter.think_prefix if drafter is not None else "",
        )
        loop = SpeculativeSession(drafter, cloud_session, options)  # type: ignore[arg-type]
        try:
            return loop.run([Message("user", prompt)]).to_json()
        finally:
            if cloud_session is not None and transport is not None:
                transport.end_session(session_id)

    out_dir = out or default_out(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        "dataset": path.name,
        "levels": sorted(level_set) if level_set else None,
        "limit": limit,
        "strategies": wanted,
        "max_tokens": budget,
        "mode": str(base_policy.mode),
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "seed": cfg.seed,
        "edge_model": str(drafter.path) if drafter is not None else "",
        "policy": {k: v for k, v in vars(base_policy).items() if k != "mode"},
        "variants": named,
        **_model_pair(transport, drafter),
    }
    rows: list[Any] = []
    interrupted = False
    try:
        rows = evaluate.run_eval(
            problems,
            wanted,
            answer_fn,
            out_dir / "results.jsonl",
            progress=True,
            run_config=run_config,
            restart=restart,
            allow_mixed=allow_mixed,
        )
    except evaluate.EvalInterrupted as stop:
        rows, interrupted = stop.rows, True
    except EvalError as exc:
        raise EdgeError(str(exc)) from None
    finally:
        if transport is not None:
            transport.close()
    stored, _ = eval_results.read_results(out_dir / "results.jsonl")  # names every row of the table
    table_config: dict[str, Any] = stored or run_config
    write_outputs(rows, table_config.get("strategies") or wanted, out_dir, path.stem, table_config)
    return not interrupted


def report(
    dataset: str,
    out: Path | None,
    also: list[Path],
    strategies: str | None = None,
    versus: Sequence[str] = (),
) -> None:
    """The table, report.json and tradeoff.png from OUT/results.jsonl as it stands, joined
    by each ALSO/results.jsonl; only the `strategies` rows when given (comma-separated);
    each row paired with the `versus` rows too."""
    from edge import datasets
    from edge.eval_folders import report_rows

    path = datasets.resolve(dataset)
    out_dir = out or default_out(path)
    chosen = None if strategies is None else [s.strip() for s in strategies.split(",") if s.strip()]
    table = report_rows(out_dir, also, chosen, path.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(
        table.rows,
        table.strategies,
        out_dir,
        path.stem,
        table.config,
        read_from=table.results_files,
        order=table.strategies if chosen is not None else (),
        versus=versus,
    )


def write_outputs(
    rows: list[Any],
    strategies: list[str],
    out_dir: Path,
    dataset_name: str,
    run_config: dict[str, Any],
    read_from: Sequence[Path] = (),
    order: Sequence[str] = (),
    versus: Sequence[str] = (),
) -> None:
    """Table on stdout, report.json and tradeoff.png, over the problems every strategy has
    answered (a resumed or running eval compares like with like). `read_from`: the results
    files a report read (none: the run wrote OUT/results.jsonl); `order`: the table's rows
    first in this order (else edge, speculative, cloud, the others by name)."""
    from edge import eval_report
    from edge.evaluate import answered_by_all

    complete, left_out = answered_by_all(rows, strategies)
    if left_out:
        problems = len({r.problem_id for r in complete})
        notice(
            f"the table counts the {problems} problems every strategy has answered; "
            f"{left_out} row(s) of problems not yet answered by all are left out"
        )
    summaries = eval_report.summarize(complete, order)
    typer.echo(eval_report.format_table(summaries))
    unknown = [v for v in versus if v not in strategies]
    if unknown:
        raise EdgeError(f"--versus {unknown[0]}: no such row (rows: {', '.join(strategies)})")
    by_level_and_paired = eval_report.format_paired(complete, order, versus)
    if by_level_and_paired:
        typer.echo("\n" + by_level_and_paired)
    judged = eval_report.format_judge(complete, order)
    if judged:
        typer.echo("\n" + judged)
    eval_report.write_report(summaries, complete, out_dir / "report.json", run_config=run_config)
    eval_report.plot(
        summaries, out_dir / "tradeoff.png", dataset=dataset_name, date=date.today().isoformat()
    )
    report, png = out_dir / "report.json", out_dir / "tradeoff.png"
    results = out_dir / "results.jsonl"
    if not read_from:
        notice(f"wrote {report}, {png} and {results}")
    else:  # --report only reads the results
        notice(f"wrote {report} and {png}; read {', '.join(map(str, read_from))}")


def _model_pair(transport: GrpcCloud | None, drafter: LlamaDrafter | None) -> dict[str, str | None]:
    """Which models answer (kept in the results header): the cloud's model id, asked of the
    cloud, and the SHA-256 of the edge model's file."""
    from edge.eval_results import file_sha256
    from shared import errors

    cloud_model = None
    if transport is not None:
        try:
            cloud_model = transport.model_info().model_id
        except errors.SpecThinkError as exc:
            raise EdgeError(
                f"the cloud did not say which model it serves ({exc.message})"
            ) from None
    edge_sha = file_sha256(drafter.path) if drafter is not None else None
    return {"cloud_model": cloud_model, "edge_model_sha256": edge_sha}


def _parse_variants(specs: list[str]) -> dict[str, dict[str, Any]]:
    """--variant NAME:KNOB=V[,KNOB=V] -> {NAME: {KNOB: V}} (values checked later)."""
    named: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        name = name.strip()
        if not sep or not name or name in set(Strategy) or name in named:
            raise EdgeError(
                f"--variant takes NAME:KNOB=VALUE[,KNOB=VALUE] with a new name, not {spec!r}"
            )
        knobs: dict[str, Any] = {}
        for pair in body.split(","):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise EdgeError(f"--variant {name}: expected KNOB=VALUE, got {pair!r}")
            knobs[key.strip()] = knob_value(value.strip())
        named[name] = knobs
    return named
