"""The `pricectl` command line: one thin function per subcommand.

Each command reads its flags, builds the settings (config.load_settings) and hands a stage
function to runinfo.execute_stage. :func:`main` is the only place that turns exceptions into
exit codes, through the table in errors.py.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pricing_cli import __version__
from pricing_cli.config import Settings, documented_yaml, load_settings, settings_to_yaml
from pricing_cli.errors import (
    PartialFailure,
    PricingError,
    Terminated,
    classify_os_error,
    exit_code_for,
)
from pricing_cli.registry import PIPELINE_NAMES, STAGES, stage
from pricing_cli.runinfo import OutputOptions, StageFn, execute_stage

_DEFAULTS = Settings()


def _default(key: str) -> str:
    """' [default: <value>; config <key>]' for an option that overrides a config key: the
    built-in default, which a preset or --config file may change."""
    section, name = key.split(".")
    value = getattr(getattr(_DEFAULTS, section), name)
    return f" [default: {'none' if value is None else value}; config {key}]"


class _StageOrder(typer.core.TyperGroup):
    """Lists the subcommands in the registry's stage order (the pipeline's), then recommend,
    pipeline and config."""

    def list_commands(self, ctx: Any) -> list[str]:
        order = [*(s.name for s in STAGES), "recommend", "pipeline", "config"]
        names = list(super().list_commands(ctx))
        return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


app = typer.Typer(
    name="pricectl",
    cls=_StageOrder,
    help=(
        "Learn one pricing agent for every product from raw sales history.\n\n"
        "Stages run in this order (`pricectl pipeline` runs them all): "
        + " → ".join(PIPELINE_NAMES) + "; "
        "then `pricectl recommend` prices the days after the data ends. Global options "
        "(--config, --preset, --json, ...) go before the subcommand, e.g. "
        "`pricectl --preset tiny features`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
config_app = typer.Typer(help="Show or check configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


class _Globals:
    """Global options, set by the callback and read by every command."""

    config: Path | None = None
    preset: str | None = None
    max_memory: str | None = None
    output = OutputOptions()
    # Set by `pipeline`: one monitor (one live panel) for every stage of the run.
    shared_monitor: Any = None


G = _Globals()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pricectl {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config file (also PRICECTL_CONFIG).")] = None,
    preset: Annotated[str | None, typer.Option(
        help="Built-in scale preset below the config file: tiny, small or full "
             "(default: none).")] = None,
    live: Annotated[bool | None, typer.Option(
        "--live/--no-live", help="Force the live panel on or off (default: on a TTY; config "
        "monitor.live).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print a machine-readable JSON summary on stdout.")] = False,
    max_memory: Annotated[str | None, typer.Option(
        help="Memory budget of the process tree, e.g. 1.5GB; the stage stops cleanly "
             "before passing it and keeps the work done." + _default("monitor.max_memory"))] = None,
    debug: Annotated[bool, typer.Option(help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    G.config = config
    G.preset = preset
    G.max_memory = max_memory
    G.output = OutputOptions(live="auto" if live is None else ("on" if live else "off"),
                             quiet=quiet, json=json_output, debug=debug)


def _settings(**flags: Any) -> Settings:
    if G.max_memory is not None:
        flags["monitor.max_memory"] = G.max_memory
    return load_settings(G.config, G.preset, flags)


def _run(name: str, settings: Settings, fn: StageFn,
         stage_key: Callable[[], str | None] | None = None) -> None:
    execute_stage(name, settings, G.output, fn, shared=G.shared_monitor, stage_key=stage_key)


# ---------------------------------------------------------------------------------------------
# Stages


@app.command()
def generate(
    seed: Annotated[int | None, typer.Option(
        help="Random seed (same seed, same files)." + _default("generate.seed"))] = None,
    products: Annotated[int | None, typer.Option(
        help="Number of products." + _default("generate.n_products"))] = None,
    days: Annotated[int | None, typer.Option(
        help="Days of history." + _default("generate.n_days"))] = None,
    output_dir: Annotated[Path | None, typer.Option(
        help="Where to write raw data." + _default("generate.output_dir"))] = None,
    file_period: Annotated[str | None, typer.Option(
        help="One transaction file per month, week or day."
            + _default("generate.file_period"))] = None,
    file_format: Annotated[str | None, typer.Option(
        help="csv, csv.gz or parquet." + _default("generate.file_format"))] = None,
) -> None:
    """Write a synthetic market with known ground truth, in the raw-data contract.

    Writes transactions/ (one file per month, week or day), catalog.csv and ground_truth.json,
    which holds every product's true demand parameters so evaluate can score against the true
    optimum. The same seed gives byte-identical files; see docs/market.md.
    """
    from pricing_cli.data.generate import run_generate

    settings = _settings(**{"generate.seed": seed, "generate.n_products": products,
                            "generate.n_days": days, "generate.file_period": file_period,
                            "generate.file_format": file_format,
                            "generate.output_dir": None if output_dir is None else str(output_dir)})
    _run("generate", settings, run_generate)


@app.command()
def features(
    transactions: Annotated[str | None, typer.Option(
        help="Glob of transaction files (CSV, CSV.gz or Parquet)."
            + _default("data.transactions"))] = None,
    catalog: Annotated[str | None, typer.Option(
        help="Catalog file." + _default("data.catalog"))] = None,
    output_dir: Annotated[Path | None, typer.Option(
        help="Where to write features." + _default("features.output_dir"))] = None,
) -> None:
    """Build the daily panel and time-series features on Polars' streaming engine.

    Aggregates per product-day, fills zero-sale days, adds lags, rolling statistics, price
    relative to its reference, calendar and catalog features, splits by date, fits scalers on
    train only, and writes one Parquet file per product.
    """
    from pricing_cli.stages.features import run_features

    settings = _settings(**{"data.transactions": transactions, "data.catalog": catalog,
                            "features.output_dir": None if output_dir is None else str(output_dir)})
    _run("features", settings, run_features)


@app.command()
def preprocess(
    batch_size: Annotated[int | None, typer.Option(
        help="Files per batch." + _default("preprocess.batch_size"))] = None,
    workers: Annotated[int | None, typer.Option(
        help="Worker processes (0 = all cores)." + _default("preprocess.workers"))] = None,
    keep_batches: Annotated[bool | None, typer.Option(
        "--keep-batches", help="Keep batches after a successful merge."
            + _default("preprocess.keep_batches"))] = None,
    resume: Annotated[bool | None, typer.Option(
        "--resume/--no-resume", help="Reuse batches whose inputs and config are unchanged."
            + _default("preprocess.resume"))
    ] = None,
    fail_fast: Annotated[bool | None, typer.Option(
        "--fail-fast", help="Stop at the first failed file."
            + _default("preprocess.fail_fast"))] = None,
    input_glob: Annotated[str | None, typer.Option(
        help="Per-series files to read." + _default("preprocess.input_glob"))] = None,
    executor: Annotated[str | None, typer.Option(
        help="local (process pool) or ray (Ray tasks; pip install 'pricing-cli[ray]')."
            + _default("preprocess.executor"))] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="With --executor ray: auto or ray://host:port joins a cluster; "
             "none: a local Ray instance." + _default("preprocess.ray_address"))] = None,
) -> None:
    """Turn per-product feature files into batches of decision samples (.npz).

    A pool of workers processes one batch of files at a time; the parent holds only that
    batch, writes it atomically, records it in manifest.json and frees it. A re-run redoes
    only missing or invalidated batches.
    """
    from pricing_cli.stages.preprocess import run_preprocess

    settings = _settings(**{"preprocess.batch_size": batch_size, "preprocess.workers": workers,
                            "preprocess.keep_batches": keep_batches, "preprocess.resume": resume,
                            "preprocess.fail_fast": fail_fast,
                            "preprocess.input_glob": input_glob,
                            "preprocess.executor": executor,
                            "preprocess.ray_address": ray_address})
    _run("preprocess", settings, run_preprocess)


@app.command()
def merge(
    strategy: Annotated[str | None, typer.Option(
        help="sequential (two-pass, bounded memory) or accumulative (load-all reference)."
            + _default("merge.strategy"))] = None,
    output_dir: Annotated[Path | None, typer.Option(
        help="Where to write processed arrays." + _default("merge.output_dir"))] = None,
    keep_batches: Annotated[bool | None, typer.Option(
        "--keep-batches", help="Keep the intermediate batches after merging."
            + _default("merge.keep_batches"))] = None,
) -> None:
    """Merge batches into X_{split}.npy, labels, masks and meta per split.

    sequential reads only headers in pass 1, then streams each batch to its offset in pass 2,
    so peak memory is one batch plus a constant. Outputs appear atomically.
    """
    from pricing_cli.stages.merge import run_merge

    settings = _settings(**{"merge.strategy": strategy, "merge.keep_batches": keep_batches,
                            "merge.output_dir": None if output_dir is None else str(output_dir)})
    _run("merge", settings, run_merge)


@app.command("validate-batches")
def validate_batches(
    paths: Annotated[list[Path] | None, typer.Argument(
        help="Batch files or folders (default: preprocess.output_dir).")] = None,
    deep: Annotated[bool, typer.Option(
        "--deep", help="Also rebuild a sample of rows from the source files and compare.")] = False,
    convert_legacy: Annotated[bool, typer.Option(
        "--convert-legacy", help="Rewrite legacy list-of-dicts batches in the current format.")
    ] = False,
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow unpickling legacy batches. Only for files you made.")
    ] = False,
) -> None:
    """Check every batch and explain each problem found; exit non-zero on any problem."""
    from pricing_cli.stages.batch_checks import run_validate_batches

    for path in paths or []:
        if path.is_file() and path.suffix != ".npz":
            raise typer.BadParameter(
                f"{path} is not a batch: validate-batches checks the batch_NNNN.npz files "
                "that `pricectl preprocess` writes (default: the preprocess.output_dir "
                "folder); raw transactions and catalogs are checked by `pricectl features`.",
                param_hint="PATHS")
    settings = _settings()
    fn = functools.partial(run_validate_batches, paths=paths or [], deep=deep,
                           convert_legacy=convert_legacy, trust_pickle=trust_pickle)
    _run("validate-batches", settings, fn)


@app.command()
def train(
    multi_product: Annotated[bool, typer.Option(
        "--multi-product", help="One agent for every product (product embedding).")] = False,
    product: Annotated[str | None, typer.Option(
        help="Train a single-product agent for this product_id instead.")] = None,
    timesteps: Annotated[int | None, typer.Option(
        help="Environment steps of RL." + _default("train.timesteps"))] = None,
    algo: Annotated[str | None, typer.Option(
        help="maskable-ppo or ppo." + _default("train.algo"))] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed." + _default("train.seed"))] = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu or cuda." + _default("train.device"))] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last checkpoint of --run-id.")] = False,
    warm_start: Annotated[str | None, typer.Option(
        help="Supervised start before RL: none (with train.forecast_prior the "
             "policy already starts at the fitted model's myopic optimum), greedy (clone that "
             "optimum), planner (clone the best price path under the fitted model; for "
             "train.price_change_cost > 0) or bc (clone historical prices)."
                 + _default("train.warm_start"))] = None,
    run_id: Annotated[str | None, typer.Option(
        help="Run folder name under models/." + _default("train.run_id"))] = None,
) -> None:
    """Fit the demand model and train the pricing agent; everything lands in models/<run_id>/."""
    from pricing_cli.agent.train import run_train

    if not multi_product and product is None:
        raise typer.BadParameter("pass --multi-product, or --product ID for one product")
    settings = _settings(**{"train.timesteps": timesteps, "train.algo": algo, "train.seed": seed,
                            "train.device": device, "train.warm_start": warm_start,
                            "train.run_id": run_id})
    fn = functools.partial(run_train, product=product, resume=resume)
    _run("train", settings, fn)


@app.command()
def evaluate(
    model: Annotated[Path | None, typer.Option(
        help="Run folder (default: evaluate.model, else the newest complete run under "
             "train.models_dir).")] = None,
    split: Annotated[str | None, typer.Option(
        help="train, val or test." + _default("evaluate.split"))] = None,
    reports_dir: Annotated[Path | None, typer.Option(
        help="Where reports go." + _default("evaluate.reports_dir"))] = None,
) -> None:
    """Compare the agent with historical, static, greedy and random prices (and the oracle).

    Writes evaluation.json, recommendations.csv, plots and report.md to the reports folder.
    """
    from pricing_cli.agent.evaluate import run_evaluate

    settings = _settings(**{"evaluate.model": None if model is None else str(model),
                            "evaluate.split": split,
                            "evaluate.reports_dir":
                                None if reports_dir is None else str(reports_dir)})
    _run("evaluate", settings, run_evaluate)


@app.command()
def recommend(
    horizon: Annotated[int | None, typer.Option(
        help="Days to price." + _default("recommend.horizon"))] = None,
    start: Annotated[str | None, typer.Option(
        help="First day to price, YYYY-MM-DD (default: the day after the data ends; config "
             "recommend.start).")] = None,
    products: Annotated[str | None, typer.Option(
        help="Products to price: a file (one product_id per line) or comma-separated ids "
             "(default: all).")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Run folder (default: evaluate.model, else the newest complete run under "
             "train.models_dir).")] = None,
    policy: Annotated[str | None, typer.Option(
        help="agent, greedy, planner, static or historical."
            + _default("recommend.policy"))] = None,
) -> None:
    """Prices for the days after the data ends, obeying every merchant rule (`rules`).

    Writes prices.csv, explain.json and summary.md to recommendations/<first day>/.
    """
    from pricing_cli.agent.recommend import run_recommend

    settings = _settings(**{"recommend.horizon": horizon, "recommend.start": start,
                            "recommend.policy": policy})
    fn = functools.partial(run_recommend, products=products,
                           model=None if model is None else str(model))
    _run("recommend", settings, fn)


def _run_named_stage(name: str, settings: Settings,
                     stage_key: Callable[[], str | None]) -> None:
    """The pipeline's runner: the registry's stage function, as the subcommand runs it."""
    _run(name, settings, stage(name).load(), stage_key)


@app.command()
def pipeline(
    start: Annotated[str | None, typer.Option(
        "--from", help="First stage to run (default: features, or generate with --generate).")
    ] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Run every planned stage even if it is up to date.")] = False,
    with_generate: Annotated[bool | None, typer.Option(
        "--generate/--no-generate",
        help="Start with generate, a synthetic market (default: pipeline.generate, which only "
             "the built-in presets turn on; never on for your own data).")] = None,
) -> None:
    """Run the stages in pipeline order (`pricectl --help` lists them), skipping those up to date.

    A stage whose inputs, config section and pricectl version are unchanged since its last
    run (recorded in the run.json beside its outputs) is skipped, as `dvc repro` does.
    """
    from pricing_cli.pipeline import run_pipeline
    from pricing_cli.runinfo import make_monitor, new_run_dir

    settings = _settings()
    if with_generate is None:
        with_generate = settings.pipeline.generate
    monitor = make_monitor("pipeline", settings, G.output,
                           new_run_dir(settings, "pipeline") / "memory.jsonl")

    def say(message: str) -> None:
        if not (G.output.quiet or G.output.json):
            monitor.log(f"pipeline: {message}")

    G.shared_monitor = monitor
    try:
        with monitor:
            outcome = run_pipeline(settings, _run_named_stage, say, start=start, stop=stop,
                                   force=force, with_generate=with_generate)
            say("done: " + ", ".join(f"{name} {what}" for name, what in outcome))
    finally:
        G.shared_monitor = None
    if G.output.json:  # after each stage's own line: the whole run, skipped stages included
        import json

        typer.echo(json.dumps({"stage": "pipeline", "summary": dict(outcome), "failures": [],
                               "elapsed_s": round(monitor.elapsed, 3)}))


# ---------------------------------------------------------------------------------------------
# config


@config_app.command("show")
def config_show(
    documented: Annotated[bool, typer.Option(
        "--documented", help="Add each key's description as a comment (configs/default.yaml).")
    ] = False,
) -> None:
    """Print the effective config (defaults < preset < file < env < flags) as YAML."""
    settings = _settings()
    if documented:
        typer.echo(documented_yaml(settings), nl=False)
    elif G.output.json:
        import json

        typer.echo(json.dumps(settings.to_dict(), default=str))
    else:
        typer.echo(settings_to_yaml(settings), nl=False)


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="YAML config file to check.")],
) -> None:
    """Check one config file: unknown keys (with the closest valid key) and types."""
    load_settings(file, None, {}, environ={})
    typer.echo(f"{file}: ok")


# ---------------------------------------------------------------------------------------------
# Entry point: the only place that maps exceptions to exit codes.


def _json_error(code: int, kind: str, message: str, hint: str | None) -> None:
    """With --json, a failure is also one JSON object on stdout (the text stays on stderr)."""
    if G.output.json:
        import json

        sys.stdout.write(json.dumps({"error": {"exit_code": code, "kind": kind,
                                               "message": message, "hint": hint}}) + "\n")
        sys.stdout.flush()


def _global_option_hint(exc: Exception, argv: list[str]) -> str | None:
    """For a global option given after the subcommand (`pricectl preprocess --preset small`):
    the same command with it moved before the subcommand."""
    from typer._click.exceptions import NoSuchOption

    if not isinstance(exc, NoSuchOption) or exc.ctx is None:
        return None
    takes_value: dict[str, bool] = {}
    for param in typer.main.get_command(app).params:
        for name in [*param.opts, *getattr(param, "secondary_opts", [])]:
            takes_value[name] = not getattr(param, "is_flag", False)
    option = exc.option_name
    if option not in takes_value:
        return None
    at = next((i for i, token in enumerate(argv)
               if token == option or token.startswith(option + "=")), None)
    subcommand = exc.ctx.info_name
    if at is None or subcommand not in argv[:at]:
        return None
    width = 2 if takes_value[option] and argv[at] == option and at + 1 < len(argv) else 1
    moved, rest = argv[at:at + width], argv[:at] + argv[at + width:]
    where = rest.index(subcommand)
    fixed = " ".join([*rest[:where], *moved, *rest[where:]])
    return (f"{option} is a global option: it goes before the subcommand, as in "
            f"`pricectl {fixed}`")


def _report(exc: BaseException) -> int:
    row = exit_code_for(exc)
    if isinstance(exc, PartialFailure):
        pass  # the stage's own JSON summary, printed already, lists its failures
    elif isinstance(exc, PricingError):
        _json_error(row.code, row.label, exc.message, exc.hint)
    else:
        _json_error(row.code, row.label, str(exc) or type(exc).__name__, None)
    if G.output.debug:
        traceback.print_exception(exc)
    if isinstance(exc, PricingError):
        sys.stderr.write(f"pricectl: {row.label}: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"  hint: {exc.hint}\n")
    elif isinstance(exc, Terminated):
        sys.stderr.write("pricectl: terminated (SIGTERM); completed work is kept, partial "
                         "outputs removed\n")
    elif isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("pricectl: interrupted; completed work is kept, partial outputs removed\n")
    else:
        sys.stderr.write(f"pricectl: internal error: {type(exc).__name__}: {exc}\n"
                         "  hint: this is a bug; re-run with --debug and report the traceback\n")
    return row.code


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends a run the way Ctrl+C does: the stage's cleanup runs and keeps completed
    work. Worker processes forked after this was installed just die, as before."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _SIGNALS["terminated"] = True
    raise Terminated()


_MAIN_PID = os.getpid()
_SIGNALS = {"terminated": False}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (the console script calls sys.exit on it)."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    _SIGNALS["terminated"] = False
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    from typer._click.exceptions import ClickException  # typer vendors click

    G.output = OutputOptions()  # until the global options of this command line are read
    try:
        result = app(args=argv, standalone_mode=False)
        code = int(result) if isinstance(result, int) else 0
    except typer.Exit as exc:
        code = int(exc.exit_code)
    except typer.Abort:
        return _report(_interruption())
    except ClickException as exc:
        exc.show()
        hint = _global_option_hint(exc, list(sys.argv[1:] if argv is None else argv))
        if hint:
            sys.stderr.write(f"  hint: {hint}\n")
        _json_error(exc.exit_code, "usage error", exc.format_message(), hint)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except PricingError as exc:
        return _report(exc)
    except KeyboardInterrupt as exc:
        return _report(_interruption() if not isinstance(exc, Terminated) else exc)
    except Exception as exc:  # noqa: BLE001 - last resort: no bare traceback without --debug
        classified = classify_os_error(exc)
        if classified is not exc:
            classified.__cause__ = exc  # --debug still shows where it came from
        return _report(classified)
    # typer turns Ctrl+C into exit code 130 itself; add our one-line explanation.
    return _report(_interruption()) if code == 130 else code


def _interruption() -> KeyboardInterrupt:
    """What stopped the run, once click has swallowed the exception: SIGTERM or Ctrl+C."""
    return Terminated() if _SIGNALS["terminated"] else KeyboardInterrupt()


def entry() -> None:
    sys.exit(main())
