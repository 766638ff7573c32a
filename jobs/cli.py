"""The ``steerstore`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from infra.config import ConfigError, add_arguments, load


def _jobs():
    from jobs import (bench, bench_dps, bench_serving, bench_steerx, demo, evaluate, export, generate, importers,
                      inspect_store, pref_eval, refresh, steerx_tau)

    return {
        "refresh": (refresh.RefreshConfig, refresh.main, "compute steering vectors and publish a new store version"),
        "inspect": (inspect_store.InspectConfig, inspect_store.main, "describe a store: versions, rows, schema, model"),
        "generate": (generate.GenerateConfig, generate.main, "answer a prompt unsteered and steered for a user"),
        "export": (export.ExportConfig, export.main,
                   "export users' steering vectors for serving engines: llama.cpp GGUF, EasySteer JSON, safetensors"),
        "import": (importers.ImportConfig, importers.main, "convert PRISM or plain pairs into preference_pairs, or LaMP / LongLaMP question files into histories + held-out items"),
        "demo": (demo.DemoConfig, demo.main, "run the embedded demo end to end into ./steerstore-out"),
        "bench": (bench.BenchConfig, bench.main, "benchmark the activation stage against a plain per-sequence loop"),
        "bench-dps": (bench_dps.BenchDPSConfig, bench_dps.main,
                      "benchmark DPS head scoring (naive vs batched exact vs fast) and decoding on real data"),
        "bench-steerx": (bench_steerx.BenchSteerXConfig, bench_steerx.main,
                         "benchmark SteerX stages (leave-one-out effects, smoothing, style vectors) on real data"),
        "bench-serving": (bench_serving.BenchServingConfig, bench_serving.main,
                          "benchmark store lookups (100k synthetic users, local and S3) and mixed-batch serving"),
        "steerx-tau": steerx_tau.COMMAND,
        "eval": (evaluate.EvalConfig, evaluate.main,
                 "evaluate every method against baselines on held-out per-user data; write an HTML report"),
        "pref-accuracy": (pref_eval.PrefEvalConfig, pref_eval.main,
                          "per-user preference accuracy of population / CAA / BT steering on held-out real pairs"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerstore", description="Per-user LLM steering artifacts on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in _jobs().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file (local or s3://); flags override it")
        if name == "inspect":
            p.add_argument("store_uri", nargs="?", help="store URI")
        if name in ("refresh", "demo"):
            p.add_argument("--address", dest="cfg::ray.address", default=argparse.SUPPRESS,
                           help="Ray cluster address (same as --ray.address); default: embedded local Ray")
        add_arguments(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    cls, run, _ = _jobs()[args.command]
    overrides = {"store": args.store_uri} if getattr(args, "store_uri", None) else {}
    try:
        config = load(cls, args.config, args, overrides)
    except ConfigError as exc:
        print(f"steerstore {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    try:
        run(config)
    except (KeyError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"steerstore {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
