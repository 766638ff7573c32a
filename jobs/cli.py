"""The ``steerstore`` command: one subcommand per job; benchmarks under ``steerstore bench <name>``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from steerstore.infra.config import ConfigError, add_arguments, load


def _jobs():
    from steerstore.jobs import (demo, evaluate, export, forget, generate, importers, inspect_store, model_cmd, refresh,
                                 serve, verify_export)

    return {
        "refresh": (refresh.RefreshConfig, refresh.main, "compute steering vectors and publish a new store version"),
        "forget": (forget.ForgetConfig, forget.main,
                   "remove users from every retained store version and from every later refresh"),
        "inspect": (inspect_store.InspectConfig, inspect_store.main, "describe a store: versions, rows, schema, model"),
        "model": (model_cmd.ModelCmdConfig, model_cmd.main,
                  "print the model folder or hub id a store must be served with (--check: load and compare)"),
        "generate": (generate.GenerateConfig, generate.main, "answer a prompt unsteered and steered for a user"),
        "serve": (serve.ServeConfig, serve.main,
                  "an OpenAI-compatible HTTP endpoint personalising each request by its 'user' (reference path)"),
        "export": (export.ExportConfig, export.main,
                   "export users' steering vectors for serving engines: llama.cpp GGUF, EasySteer JSON, safetensors"),
        "verify-export": (verify_export.VerifyExportConfig, verify_export.main,
                          "run a user's exported vectors in llama.cpp and compare with the HF path (exit 1 if short)"),
        "import": (importers.ImportConfig, importers.main, "convert PRISM or plain pairs into preference_pairs, or LaMP / LongLaMP question files into histories + held-out items"),
        "demo": (demo.DemoConfig, demo.main, "run the embedded demo end to end into ./steerstore-out"),
        "eval": (evaluate.EvalConfig, evaluate.main,
                 "evaluate every method against baselines on held-out per-user data; write an HTML report"),
    }


def _add_job(sub, name: str, cls, help_text: str, full: bool = False) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", help="YAML config file (local or s3://); flags override it")
    if name == "inspect":
        p.add_argument("store_uri", nargs="?", help="store URI")
    if name in ("refresh", "demo"):
        p.add_argument("--address", dest="cfg::ray.address", default=argparse.SUPPRESS, metavar="ADDRESS",
                       help="Ray cluster address (same as --ray.address); default: embedded local Ray")
    add_arguments(p, cls, full=full)


def build_parser(full: bool = False) -> argparse.ArgumentParser:
    """``full``: every option in each subcommand's help (``--help-all``), else the top-level ones and sections."""
    from steerstore.jobs import bench

    parser = argparse.ArgumentParser(prog="steerstore", description="Per-user LLM steering artifacts on Ray.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in _jobs().items():
        _add_job(sub, name, cls, help_text, full)
    bench_parser = sub.add_parser("bench", help="benchmarks and experiments (figures under docs/figures/)",
                                  description="benchmarks and experiments; each writes its figures as JSON")
    bench_sub = bench_parser.add_subparsers(dest="bench", required=True)
    for name in bench.names():
        _add_job(bench_sub, name, bench.load(name)[0], bench.help_text(name), full)
    return parser


def _resolve(args: argparse.Namespace):
    if args.command == "bench":
        from steerstore.jobs import bench

        cls, run = bench.load(args.bench)
        return f"bench {args.bench}", cls, run
    cls, run, _ = _jobs()[args.command]
    return args.command, cls, run


def _message(exc: BaseException) -> str:
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() adds quotes


_ACCESS = ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken",
           "no credentials", "unable to locate credentials")


def _hint(exc: BaseException) -> str:
    """What to check, for the storage errors a person can fix by a setting (the full traceback: --debug)."""
    text = str(exc).lower()
    if any(a in text for a in _ACCESS):
        return (". Check the credentials: --storage.access_key_id / --storage.secret_access_key, $AWS_ACCESS_KEY_ID "
                "/ $AWS_SECRET_ACCESS_KEY or ~/.aws/credentials, and the bucket's permissions")
    if "nosuchbucket" in text or "bucket does not exist" in text:
        return ". Check the bucket name in the URI and --storage.endpoint_url / --storage.region"
    return "" if isinstance(exc, (KeyError, ValueError, FileNotFoundError)) else " (the full traceback: --debug)"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    full = "--help-all" in argv
    args = build_parser(full).parse_args(["--help" if a == "--help-all" else a for a in argv])
    name, cls, run = _resolve(args)
    overrides = {"store": args.store_uri} if getattr(args, "store_uri", None) else {}
    try:
        config = load(cls, args.config, args, overrides)
    except ConfigError as exc:
        print(f"steerstore {name}: config error: {exc}", file=sys.stderr)
        return 2
    from steerstore.jobs.refresh.guard import PublishRefused

    try:
        result = run(config)
    except PublishRefused as exc:  # its own status: the job worked, the guard kept its version off serving
        print(f"steerstore {name}: publish refused: {exc}", file=sys.stderr)
        return 3
    except (KeyError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        print(f"steerstore {name}: {type(exc).__name__}: {_message(exc)}{_hint(exc)}", file=sys.stderr)
        return 1
    if isinstance(result, dict) and result.get("failed"):  # ran, and what it checked fell short
        print(f"steerstore {name}: {result['failed']}", file=sys.stderr)
        return 1
    if isinstance(result, dict) and result.get("nothing_done"):  # ran, but did none of what was asked
        print(f"steerstore {name}: {result['nothing_done']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
