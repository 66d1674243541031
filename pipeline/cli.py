"""`python -m pipeline`: run, plan, ls, show and serve the ERNIE 4.5 pipeline.

python -m pipeline run conf=tiny                         # every stage, tiny model, local Ray
python -m pipeline run conf=ernie_21b dry_run=true       # the 21B graph on a shrunk model
python -m pipeline run conf=tiny stages=[quantize]       # rerun one stage from cached inputs
python -m pipeline run conf=tiny from=sft force=[dpo] pretrain.steps=200
python -m pipeline plan conf=ernie_21b                   # graph, cache status, memory per GPU
python -m pipeline ls | show RUN_ID | serve conf=tiny
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .contract import UserError
from .driver import shown_status
from .redact import redact_text
from .store import StorageError

RUN_OPTIONS = ("stages", "from", "until", "force", "dry_run")
EXAMPLES = __doc__.split("\n\n", 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except StorageError as err:  # the artifact root failed outside a stage (run records, cache lookups)
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished stages stay cached, rerun the same command to continue", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="The ERNIE 4.5 recipe end to end: data -> pretrain -> sft/dpo -> quantize -> serve, "
        "on Ray, configured with Hydra, tracked in MLflow.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    words = "conf=NAME [key=value ...]: a preset from conf/ and Hydra overrides"
    run = sub.add_parser(
        "run",
        help="run the pipeline (cached stages are skipped)",
        description=(
            f"Run the pipeline. Arguments: {words}; plus stages=[a,b] (run these, and missing upstream), "
            "from=STAGE, until=STAGE, force=[a,b] (recompute even if cached), dry_run=true (tiny model, same graph)."
        ),
    )
    run.add_argument("words", nargs="*", metavar="conf=NAME key=value")
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser("plan", help="print the stage graph, cache status and resource/memory plan")
    plan.add_argument("words", nargs="*", metavar="conf=NAME key=value")
    plan.set_defaults(func=cmd_plan)
    ls = sub.add_parser("ls", help="list past pipeline runs")
    ls.add_argument("words", nargs="*", metavar="artifacts.root=URI")
    ls.set_defaults(func=cmd_ls)
    show = sub.add_parser("show", help="one run: stages, cache keys, artifact URIs, MLflow runs")
    show.add_argument("run_id")
    show.add_argument("words", nargs="*", metavar="artifacts.root=URI")
    show.set_defaults(func=cmd_show)
    serve = sub.add_parser("serve", help="serve the latest quantized model of a preset and block")
    serve.add_argument("words", nargs="*", metavar="conf=NAME key=value")
    serve.set_defaults(func=cmd_serve)
    return parser


# ---------------------------------------------------------------------- argument words
def parse_words(words: list[str]) -> tuple[str, list[str], dict]:
    """conf name, Hydra overrides, run options."""
    conf, overrides, options = None, [], {}
    for word in words:
        if "=" not in word:
            raise UserError(f"argument {word!r} is not key=value; e.g. conf=tiny pretrain.steps=100")
        key, value = word.split("=", 1)
        if key == "conf":
            conf = value
        elif key in RUN_OPTIONS:
            options[key] = value
        else:
            overrides.append(word)
    if conf is None:
        raise UserError("missing conf=NAME, the preset to run (e.g. conf=tiny); presets live in conf/")
    return conf, overrides, options


def _list(value: str | None, key: str) -> list[str] | None:
    if value is None:
        return None
    text = value.strip()
    if text.startswith("[") != text.endswith("]"):
        raise UserError(f"{key}={value} is not a list; write {key}=[a,b]")
    return [part.strip() for part in text.strip("[]").split(",") if part.strip()]


def _bool(value: str | None, key: str) -> bool:
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"{key}={value} must be true or false")


def _load(words):
    from . import config
    from .graph import Selection

    conf, overrides, options = parse_words(words)
    dry_run = _bool(options.get("dry_run"), "dry_run")
    cfg = config.load(conf, overrides, dry_run=dry_run)
    selection = Selection(
        stages=_list(options.get("stages"), "stages"),
        from_stage=options.get("from"),
        until=options.get("until"),
        force=_list(options.get("force"), "force") or [],
    )
    return conf, cfg, selection, dry_run, overrides


# ---------------------------------------------------------------------- commands
def cmd_run(args) -> int:
    from . import executor, runner
    from .ui import ConsoleUI

    conf, cfg, selection, dry_run, _ = _load(args.words)
    ui = ConsoleUI()
    try:
        outcome = runner.execute(cfg, conf, selection, dry_run, ui)
    except executor.StageFailure as failure:
        ui.failure(failure, resume_command(args.words))
        return 2 if failure.user_error else 1
    ui.summary(cfg, outcome)
    return 0


def resume_command(words: list[str]) -> str:
    return "python -m pipeline run " + " ".join(words)


def cmd_plan(args) -> int:
    from .plan import print_plan

    conf, cfg, selection, dry_run, _ = _load(args.words)
    print_plan(cfg, conf, selection, dry_run)
    return 0


def _store_from_words(words):
    from .config import ArtifactsConfig
    from .store import ArtifactStore

    artifacts = ArtifactsConfig()
    for word in words:
        key, _, value = word.partition("=")
        if key not in ("artifacts.root", "artifacts.local_root"):
            raise UserError(f"unexpected argument {word!r}; only artifacts.root=URI is accepted here")
        setattr(artifacts, key.split(".")[1], value)
    from .runner import _absolute

    return ArtifactStore(_absolute(artifacts.root), _absolute(artifacts.local_root))


def cmd_ls(args) -> int:
    store = _store_from_words(args.words)
    runs = store.runs()
    if not runs:
        print(f"no pipeline runs under {redact_text(store.root)}")
        return 0
    print(f"{'run id':24s} {'conf':14s} {'status':9s} {'started':20s} stages")
    for r in runs:
        stages = " ".join(f"{name}:{s.get('status', '?')}" for name, s in _stages(r).items())
        print(f"{r['run_id']:24s} {r['conf']:14s} {shown_status(r):9s} {r['started_at']:20s} {stages}")
    return 0


def cmd_show(args) -> int:
    store = _store_from_words(args.words)
    r = store.run(args.run_id)
    print(f"run {r['run_id']}  conf={r['conf']}  dry_run={r.get('dry_run', '-')}  status={shown_status(r)}")
    if r.get("ended_by"):
        print(f"ended: {r['ended_by']}")
    print(f"started {r['started_at']}  finished {r.get('finished_at', '-')}")
    print(redact_text(f"MLflow: {r.get('mlflow_uri', '-')}  parent run {r.get('mlflow_run_id', '-')}"))
    for name, s in _stages(r).items():
        key = str(s.get("cache_key", "-"))[:16]
        print(f"\n  {name:9s} {s.get('status', '?'):7s} key {key}  mlflow run {s.get('mlflow_run_id', '-')}")
        print(f"            {redact_text(s.get('uri', '-'))}")
        metrics = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if shown:
            print("            " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())[:12]))
    return 0


def _stages(record: dict) -> dict[str, dict]:
    """The record's stage entries that are entries (a hand-edited record may hold anything)."""
    stages = record.get("stages")
    return {str(k): v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}


def cmd_serve(args) -> int:
    from .serving import serve_latest

    conf, cfg, _, _, _ = _load(args.words)
    return serve_latest(cfg, conf)


def entry() -> None:
    try:
        code = main()
    except Exception:  # noqa: BLE001 - last resort: never a bare crash without context
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        code = 1
    sys.exit(code)
