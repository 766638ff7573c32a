"""One config system: YAML files and CLI flags fill the same dataclasses, with checked values."""

import argparse

import pytest

from steerstore.infra.config import ConfigError, add_arguments, from_dict, load
from steerstore.jobs.refresh import RefreshConfig


def parse(tmp_path, yaml_text, *flags):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    parser = argparse.ArgumentParser()
    add_arguments(parser, RefreshConfig)
    return load(RefreshConfig, str(path), parser.parse_args(list(flags)))


def test_yaml_fills_nested_sections_and_flags_override_it(tmp_path):
    cfg = parse(tmp_path, "inputs: {preference_pairs: a.jsonl}\ncaa: {layers: [3, 4], scale: 1.5}\n",
                "--caa.scale", "3", "--resources.model_actors", "2", "--ray.address", "auto")
    assert cfg.inputs.preference_pairs == "a.jsonl"
    assert cfg.caa.layers == [3, 4] and cfg.caa.scale == 3.0
    assert cfg.resources.model_actors == 2 and cfg.ray.address == "auto"


def test_list_flags_take_comma_separated_values(tmp_path):
    cfg = parse(tmp_path, "inputs: {preference_pairs: a.jsonl}\n", "--caa.layers", "5,6,7")
    assert cfg.caa.layers == [5, 6, 7]


def test_unknown_keys_are_rejected_with_the_known_ones_listed():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['layerz'\].*known"):
        from_dict(RefreshConfig, {"inputs": {"preference_pairs": "x"}, "caa": {"layerz": [1]}})


def test_literal_fields_accept_only_their_choices():
    with pytest.raises(ConfigError, match="caa.position: 'first' is not one of"):
        from_dict(RefreshConfig, {"inputs": {"preference_pairs": "x"}, "caa": {"position": "first"}})


def test_values_are_checked_when_the_config_is_built():
    with pytest.raises(ConfigError, match="min_pairs must be >= 1"):
        from_dict(RefreshConfig, {"inputs": {"preference_pairs": "x"}, "prepare": {"min_pairs": 0}})
    with pytest.raises(ConfigError, match="preference_pairs is required"):
        from_dict(RefreshConfig, {})


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="resources.model_actors: expected int"):
        from_dict(RefreshConfig, {"inputs": {"preference_pairs": "x"}, "resources": {"model_actors": "many"}})


def test_the_example_cluster_config_parses_into_the_refresh_config():
    from pathlib import Path

    cfg = load(RefreshConfig, str(Path(__file__).parents[1] / "infra" / "deploy" / "refresh.example.yaml"))
    assert cfg.resources.gpus_per_actor == 1 and cfg.resources.shuffle == "hash"
    assert cfg.output.store.startswith("s3://") and cfg.caa.recommended_layers == [13]


def test_refresh_accepts_address_as_a_shorthand_for_ray_address():
    from steerstore.jobs.cli import build_parser

    args = build_parser().parse_args(["refresh", "--address", "ray://head:10001",
                                      "--inputs.preference_pairs", "p.jsonl"])
    assert load(RefreshConfig, None, args).ray.address == "ray://head:10001"


@pytest.mark.parametrize("command", ["refresh", "inspect", "model", "forget", "generate", "import", "demo", "export", "eval", "bench",
                                     "bench activations", "bench dps", "bench steerx", "bench serving", "bench tau",
                                     "bench pref-accuracy", "bench cost", "bench runtime", "bench scale"])
def test_every_subcommand_prints_its_help(command, capsys):
    from steerstore.jobs.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_setting_one_field_of_a_section_keeps_the_parents_defaults_for_the_others():
    from steerstore.jobs.demo import DemoConfig
    from steerstore.operators.dps import DPSConfig
    from steerstore.operators.history import HistoryContextConfig
    from steerstore.operators.steerx import SteerXConfig

    demo = DemoConfig()
    assert demo.dps.clusters != DPSConfig().clusters  # the demo sizes DPS for a CPU
    changed = from_dict(DemoConfig, {"dps": {"gamma": 3}})
    assert changed.dps.gamma == 3.0
    assert (changed.dps.candidates, changed.dps.clusters, changed.dps.baseline_users) == \
        (demo.dps.candidates, demo.dps.clusters, demo.dps.baseline_users)
    # two levels down: SteerX's history section has its own defaults
    assert SteerXConfig().history.context_items != HistoryContextConfig().context_items
    refresh = from_dict(RefreshConfig, {"inputs": {"preference_pairs": "p.jsonl"},
                                        "steerx": {"history": {"selection": "bm25"}}})
    assert refresh.steerx.history.selection == "bm25"
    assert refresh.steerx.history.context_items == SteerXConfig().history.context_items
    with pytest.raises(ConfigError, match=r"dps: unknown key\(s\) \['nope'\]"):
        from_dict(DemoConfig, {"dps": {"nope": 1}})


def test_help_shows_the_parents_default_for_a_nested_field(capsys):
    from steerstore.jobs.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(full=True).parse_args(["demo", "--help"])
    from steerstore.jobs.demo import DemoConfig

    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DemoConfig().dps.candidates})" in help_text.split("--dps.candidates INT", 2)[-1][:200]


def test_the_rayjob_entrypoint_and_cronjob_of_the_deploy_folder_parse():
    import shlex
    from pathlib import Path

    import yaml

    from steerstore.jobs.cli import build_parser

    deploy = Path(__file__).parents[1] / "infra" / "deploy"
    rayjob = yaml.safe_load((deploy / "rayjob.yaml").read_text())
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["steerstore", "refresh"]
    args = build_parser().parse_args(argv[1:] + ["--inputs.preference_pairs", "p.jsonl"])
    cfg = load(RefreshConfig, None, args)
    assert cfg.resources.deadline_s == 72000 and rayjob["spec"]["activeDeadlineSeconds"] > cfg.resources.deadline_s
    label = rayjob["metadata"]["labels"]["app.kubernetes.io/name"]
    cron = yaml.safe_load((deploy / "cronjob.yaml").read_text())
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and f"app.kubernetes.io/name={label}" in script
    example = load(RefreshConfig, str(deploy / "refresh.example.yaml"))
    assert example.retention.keep_versions == 7 and example.publish.max_users_drop == 0.2


def test_boolean_options_are_switches_that_still_take_a_value():
    from steerstore.infra.config import load
    from steerstore.jobs.cli import _resolve, build_parser

    parser = build_parser()

    def parsed(*argv):
        args = parser.parse_args(["export", "--store", "s", *argv])
        _, cls, _ = _resolve(args)
        return load(cls, None, args)

    assert parsed("--all").all is True
    assert parsed("--all", "true").all is True
    assert parsed("--user", "ann", "--all", "false").all is False
    assert parsed("--user", "ann").all is False
    assert "true|false" in parser._subparsers._group_actions[0].choices["export"].format_help()


def test_help_fits_a_screen_and_help_all_lists_every_option(capsys):
    from steerstore.jobs import cli

    with pytest.raises(SystemExit):
        cli.main(["refresh", "--help"])
    short = capsys.readouterr().out
    assert len(short.splitlines()) <= 60 and "--caa.*  CAA vectors (" in short and "--caa.layers" not in short
    assert "(default: None) (default" not in short and "CFG::" not in short
    with pytest.raises(SystemExit):
        cli.main(["refresh", "--help-all"])
    full = capsys.readouterr().out
    assert "--caa.layers" in full and "--incremental.absent_users" in full
    assert all(line.count("(default:") <= 1 for line in full.splitlines())
    assert "CFG::" not in full
