"""Benchmarks and experiments, behind one subcommand: ``steerstore bench <name>``.

Each writes its figures as JSON under ``docs/figures/`` (``--json`` elsewhere), with ratios
against a baseline measured in the same run. ``BENCHMARKS`` maps a name to
(config class, main, one-line help); modules are imported only when their benchmark runs.
"""

from __future__ import annotations

import importlib

# name -> (module, config class name, help)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "activations": ("activations", "BenchConfig",
                    "CAA activation capture: batched vs a plain per-sequence loop"),
    "dps": ("dps", "BenchDPSConfig",
            "DPS head scoring (naive vs batched exact vs fast) and decoding, on the development data"),
    "dps-cut": ("dps_cut", "BenchDPSCutConfig",
                "cheaper DPS settings (fewer verified heads, less context) vs today's: model work per user and "
                "agreement of the heads, on the development data"),
    "steerx": ("steerx", "BenchSteerXConfig",
               "SteerX stages (leave-one-out effects, smoothing, style vectors), on the development data"),
    "serving": ("serving", "BenchServingConfig",
                "store lookups (100k synthetic users; --s3_uri for S3) and mixed-batch serving overhead"),
    "endpoint": ("endpoint", "BenchEndpointConfig",
                 "load test of `steerstore serve` over loopback HTTP: concurrent users (mixed batches) vs one at a time"),
    "tau": ("tau", "SteerXTauConfig",
            "choose SteerX's anchor threshold τ on the development data (anchor precision/recall)"),
    "scale": ("scale", "BenchScaleConfig",
              "the real refresh on N synthetic users with a tiny random model: throughput, driver and object-store "
              "peaks, model loads, workers' busy time"),
    "runtime": ("runtime", "BenchRuntimeConfig",
                "throughput and MFU of every model pass (capture, scoring, ablation, attribution, decode) at a "
                "model shape, e.g. --shape llama-3.1-8b on a GPU"),
    "cost": ("cost", "BenchCostConfig",
             "model work per typical user, counted per stage with hooks on the decoder blocks (forward-token-"
             "equivalents), and at a model shape (--shape llama-3.1-8b) FLOPs, GPU-seconds and users per GPU-hour"),
    "directions": ("directions", "BenchDirectionsConfig",
                   "per-user steering directions (CAA's mean difference, the training margins' gradient, controls) "
                   "scored on an evaluation's held-out own-vs-other pairs"),
    "pref-accuracy": ("pref_accuracy", "PrefEvalConfig",
                      "per-user preference accuracy of population / CAA / BT steering on held-out real pairs"),
}


def names() -> list[str]:
    return list(_REGISTRY)


def help_text(name: str) -> str:
    return _REGISTRY[name][2]


def load(name: str):
    """(config class, main) of benchmark ``name``."""
    module_name, config_name, _ = _REGISTRY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, config_name), module.main
