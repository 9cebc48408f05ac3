"""`specthink-edge eval`: what the command does once typer has parsed its options.

Boundary: edge/cli.py declares the options; this module turns them into problems, one policy
per strategy (named `--variant`s included), a cloud transport and a drafter, runs
`edge.evaluate.run_eval` (resumable, one row per problem and strategy), and writes the table,
report.json and tradeoff.png. `report` does the last step alone from a results file: no
model, no cloud, so it can run beside an eval that is still answering.
"""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Any

import typer

from edge.wiring import (
    EXIT_INTERRUPTED,
    connect_cloud,
    fail,
    load_drafter,
    notice,
    policy_config,
    settings,
)

EVAL_MAX_TOKENS = 32768  # the paper's evaluation budget
BUILTIN_STRATEGIES = ("speculative", "edge", "cloud")


def default_out(dataset_path: Path) -> Path:
    return Path("eval-results") / dataset_path.stem


def run(
    dataset: str,
    *,
    cloud: str | None,
    model: str | None,
    limit: int | None,
    levels: str | None,
    strategies: str,
    variants: list[str] | None,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    mode: str | None,
    policy_file: Path | None,
    knobs: list[str] | None,
    out: Path | None,
    restart: bool,
    allow_mixed: bool,
    gpu_layers: int | None,
    threads: int | None,
) -> None:
    """Answer every (problem, strategy) not yet in OUT/results.jsonl, then write the outputs
    over every row of the table (a run that adds a variant reports it beside the others)."""
    from edge import datasets, evaluate
    from edge.session import CloudSession, SessionOptions, SpeculativeSession
    from edge.wiring import with_mode
    from shared import policy as policy_rules
    from shared.wire import Message, Sampling

    named = _parse_variants(variants or [])
    wanted = [s.strip() for s in strategies.split(",") if s.strip()]
    wanted += [name for name in named if name not in wanted]
    unknown = [s for s in wanted if s not in ("speculative", "edge", "cloud", *named)]
    if not wanted or unknown:
        fail(
            "--strategy takes speculative, edge, cloud and --variant names, not "
            f"{', '.join(unknown) or 'nothing'}"
        )
    path = datasets.resolve(dataset)
    try:
        level_set = {int(x) for x in levels.split(",")} if levels else None
        problems = evaluate.load_problems(path, level_set, limit)
    except ValueError:
        fail(f"--levels takes comma-separated integers, not {levels!r}")
    except evaluate.EvalError as exc:
        fail(str(exc))
    cfg = settings(
        model=model,
        cloud=cloud,
        max_tokens=max_tokens or EVAL_MAX_TOKENS,
        temperature=temperature,
        seed=seed,
        mode=mode,
        policy_file=str(policy_file) if policy_file else None,
        gpu_layers=gpu_layers,
        threads=threads,
    )
    choice = policy_config(cfg, knobs)
    needs_cloud = any(s != "edge" for s in wanted)
    if needs_cloud and not cfg.cloud:
        fail("strategies other than edge need a cloud: pass --cloud HOST:PORT")
    transport, _ = connect_cloud(cfg, "speculative", local_only=not needs_cloud)
    drafter = load_drafter(cfg) if any(s != "cloud" for s in wanted) else None
    base_policy, mode_reason = with_mode(choice, drafter)
    notice(f"mode {mode_reason}")
    policies = {"speculative": base_policy}
    try:
        for name, overrides in named.items():
            policies[name] = policy_rules.config_from_mapping(overrides, base_policy)
    except policy_rules.PolicyConfigError as exc:
        fail(f"--variant {name}: {exc}")
    budget = cfg.max_tokens
    n_ctx = getattr(drafter, "n_ctx", None)
    if n_ctx and budget > n_ctx:
        notice(f"token budget {budget} capped to the edge model's context ({n_ctx})")
        budget = n_ctx
    sampling = Sampling(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed
    )

    def answer_fn(prompt: str, strategy: str) -> dict[str, Any]:
        session_id = uuid.uuid4().hex
        cloud_session = CloudSession(transport, session_id) if strategy != "edge" else None
        options = SessionOptions(
            strategy=strategy if strategy in ("edge", "cloud") else "speculative",
            max_tokens=budget,
            sampling=sampling,
            policy=policies.get(strategy, base_policy),
            think_prefix=getattr(drafter, "think_prefix", ""),
        )
        loop = SpeculativeSession(drafter, cloud_session, options)  # type: ignore[arg-type]
        try:
            return loop.run([Message("user", prompt)]).to_json()
        finally:
            if cloud_session is not None:
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
        "edge_model": str(getattr(drafter, "path", "")),
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
    except evaluate.EvalError as exc:
        fail(str(exc))
    finally:
        if transport is not None:
            transport.close()
    stored, _ = evaluate.read_results(out_dir / "results.jsonl")  # names every row of the table
    table_config: dict[str, Any] = stored or run_config
    write_outputs(rows, table_config.get("strategies") or wanted, out_dir, path.stem, table_config)
    if interrupted:
        notice("interrupted: run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)


def report(dataset: str, out: Path | None) -> None:
    """The table, report.json and tradeoff.png from OUT/results.jsonl as it stands."""
    from edge import datasets, evaluate

    path = datasets.resolve(dataset)
    out_dir = out or default_out(path)
    results = out_dir / "results.jsonl"
    try:
        config, rows = evaluate.read_results(results)
    except evaluate.EvalError as exc:
        fail(str(exc))
    if config is None or not rows:
        fail(f"no results in {results}: run the eval first")
    strategies = list(config.get("strategies") or dict.fromkeys(r.strategy for r in rows))
    write_outputs(rows, strategies, out_dir, path.stem, config)


def write_outputs(
    rows: list[Any],
    strategies: list[str],
    out_dir: Path,
    dataset_name: str,
    run_config: dict[str, Any],
) -> None:
    """Table on stdout, report.json and tradeoff.png, over the problems every strategy has
    answered (a resumed or running eval compares like with like)."""
    from edge import evaluate

    complete, left_out = evaluate.answered_by_all(rows, strategies)
    if left_out:
        problems = len({r.problem_id for r in complete})
        notice(
            f"the table counts the {problems} problems every strategy has answered; "
            f"{left_out} row(s) of problems not yet answered by all are left out"
        )
    summaries = evaluate.summarize(complete)
    typer.echo(evaluate.format_table(summaries))
    by_level_and_paired = evaluate.format_paired(complete)
    if by_level_and_paired:
        typer.echo("\n" + by_level_and_paired)
    evaluate.write_report(summaries, complete, out_dir / "report.json", run_config=run_config)
    evaluate.plot(
        summaries, out_dir / "tradeoff.png", dataset=dataset_name, date=date.today().isoformat()
    )
    notice(
        f"wrote {out_dir / 'report.json'}, {out_dir / 'tradeoff.png'} and "
        f"{out_dir / 'results.jsonl'}"
    )


def _model_pair(transport: Any, drafter: Any) -> dict[str, str | None]:
    """Which models answer (kept in the results header): the cloud's model id, asked of the
    cloud, and the SHA-256 of the edge model's file."""
    from edge import evaluate
    from shared import errors

    cloud_model = None
    if transport is not None:
        try:
            cloud_model = transport.model_info().model_id
        except errors.SpecThinkError as exc:
            fail(f"the cloud did not say which model it serves ({exc.message})")
    path = getattr(drafter, "path", None)
    edge_sha = evaluate.file_sha256(path) if path else None
    return {"cloud_model": cloud_model, "edge_model_sha256": edge_sha}


def _parse_variants(specs: list[str]) -> dict[str, dict[str, Any]]:
    """--variant NAME:KNOB=V[,KNOB=V] -> {NAME: {KNOB: V}} (values checked later)."""
    from edge.wiring import _knob_value

    named: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        name = name.strip()
        if not sep or not name or name in ("speculative", "edge", "cloud") or name in named:
            fail(f"--variant takes NAME:KNOB=VALUE[,KNOB=VALUE] with a new name, not {spec!r}")
        knobs: dict[str, Any] = {}
        for pair in body.split(","):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                fail(f"--variant {name}: expected KNOB=VALUE, got {pair!r}")
            knobs[key.strip()] = _knob_value(value.strip())
        named[name] = knobs
    return named
