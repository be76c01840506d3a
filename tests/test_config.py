"""Config: defaults, the packaged default.toml, one-line problems, and the `config` CLI."""

from __future__ import annotations

import json
import tomllib

import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    check_config,
    config_to_dict,
    config_to_toml,
    load_config,
    parse_config,
)
from connpub.datapath.masks import MaskSpec
from connpub.errors import ConnpubError


def write(tmp_path, text: str, name: str = "c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(text: str) -> list[str]:
    problems: list[str] = []
    parse_config(tomllib.loads(text), problems)
    return problems


def test_packaged_default_file_is_exactly_the_defaults():
    cfg, problems = check_config(DEFAULT_CONFIG_PATH, check_key_file=False)
    assert problems == []
    assert cfg == Config()
    with open(DEFAULT_CONFIG_PATH, "rb") as handle:
        data = tomllib.load(handle)
    assert data == config_to_dict(Config())  # every key is written out, none extra


def test_defaults_and_partial_file(tmp_path):
    cfg = load_config(write(tmp_path, "[publish]\nmode = 'adaptive'\n[lease]\nk = 4\n"))
    assert cfg.publish.mode == "adaptive" and cfg.lease.k == 4.0
    assert cfg.publish.interval_s == 1.0 and cfg.lease.max_s == 300.0
    assert cfg.masks.level3 == MaskSpec(False, False, 25, 56, True)
    with pytest.raises(AttributeError):
        cfg.publish.mode = "full"  # type: ignore[misc]


def test_toml_round_trip_of_show_output():
    cfg = Config()
    assert parse_config(tomllib.loads(config_to_toml(cfg)), []) == cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[publish]\nintervall_s = 2\n",
         "[publish] intervall_s: unknown key; did you mean 'interval_s'?"),
        ("[leese]\nk = 2\n", "[leese]: unknown section; did you mean 'lease'?"),
        ("[publish]\nmtu = 'big'\n",
         "[publish] mtu: wrong type, expected an integer, got string 'big'"),
        ("[rollout]\nshadow = 1\n",
         "[rollout] shadow: wrong type, expected a boolean, got integer 1"),
        ("[rollout]\nfraction = 1.5\n", "[rollout] fraction: 1.5 is out of range (must be <= 1.0)"),
        ("[publish]\ninterval_s = 0\n",
         "[publish] interval_s: 0.0 is out of range (must be > 0.0)"),
        ("[publish]\nmode = 'fast'\n",
         "[publish] mode: 'fast' is not one of baseline, adaptive, predictive, full"),
        ("[granularity]\nduration_long_s = 100\n",
         "[granularity] duration thresholds out of order: need duration_long_s=100 < "
         "duration_very_long_s=0.2 < duration_extreme_long_s=0.3"),
        ("[lease]\ninitial_s = 500\n",
         "[lease] initial_s=500 must be within [min_s, max_s] = [1, 300]"),
        ("[masks.level2]\nkeep_client_port = true\n",
         "[masks] level2 keeps something level1 drops; each level must be at most as fine as "
         "the one before"),
        ("[masks.level3]\nclient_prefix_v4 = 33\n",
         "[masks.level3] client_prefix_v4: 33 is out of range (0..32)"),
        ("[masks.level4]\n", "[masks] level4: unknown key; did you mean 'level3'?"),
        ("[agent]\nlb_addresses = ['10.0.0.300']\n",
         "[agent] '10.0.0.300' is not an IP address"),
        ("[granularity]\nmap_pressure = [0.9, 0.8, 0.95]\n",
         "[granularity] map_pressure: need 3 ascending occupancy fractions, "
         "got [0.9, 0.8, 0.95]"),
    ],
)
def test_one_line_per_problem(text, expected):
    assert problems_of(text) == [expected]


def test_baseline_lease_must_fit_bounds():
    assert problems_of("[lease]\nmin_s = 2\ninitial_s = 3\n[publish]\ninterval_s = 0.5\n") == [
        "[lease] baseline lease k*interval_s = 1.5s must be within [min_s, max_s] = [2, 300]"]
    assert problems_of("[lease]\nk = 500\n") == [
        "[lease] baseline lease k*interval_s = 500s must be within [min_s, max_s] = [1, 300]"]


def test_key_file_permissions(tmp_path):
    key = tmp_path / "key"
    key.write_text("00" * 32)
    key.chmod(0o644)
    path = write(tmp_path, f"[security]\nkey_file = '{key}'\n")
    _, problems = check_config(path)
    assert problems == [f"[security] key_file: {key} is accessible by group/others (mode 0644); "
                        f"run `chmod 600 {key}`"]
    key.chmod(0o600)
    assert check_config(path) == (load_config(path), [])
    key.write_text("abcd")
    assert check_config(path)[1] == [
        f"[security] key_file: key in {key} is 2 bytes, need >= 16; "
        "write it with `openssl rand -hex 32`"]
    key.unlink()
    assert "cannot stat" in check_config(path)[1][0]


def test_unreadable_and_invalid_files(tmp_path):
    assert check_config(tmp_path / "nope.toml")[1][0].startswith("cannot read")
    bad = write(tmp_path, "[publish\n")
    cfg, problems = check_config(bad, check_key_file=False)
    assert cfg is None and problems[0].startswith("not valid TOML")
    with pytest.raises(ConnpubError, match="not valid TOML"):
        load_config(bad)


def test_load_config_raises_first_problem_and_count(tmp_path):
    path = write(tmp_path, "[publish]\nmtu = 1\nmode = 'x'\n")
    with pytest.raises(ConnpubError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: [publish] mtu: 1 is out of range (must be >= 576) "
                              f"(+1 more; run `connpub config check {path}`)")


def test_cli_check_ok_and_problems(tmp_path):
    key = tmp_path / "key"
    key.write_text("00" * 32)
    key.chmod(0o600)
    good = write(tmp_path, f"[security]\nkey_file = '{key}'\n[agent]\nlb_addresses=['10.0.0.1']\n")
    runner = CliRunner()
    result = runner.invoke(main, ["config", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK {good}: mode=baseline interval=1s mtu=1400")
    bad = write(tmp_path, f"[security]\nkey_file = '{key}'\n[publish]\nmtuu = 1400\nmode = 1\n",
                "bad.toml")
    result = runner.invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 2
    assert result.stdout == ""  # problems are errors: stderr, one line each
    assert result.stderr.splitlines() == [
        f"connpub: error: {bad}: [publish] mtuu: unknown key; did you mean 'mtu'?",
        f"connpub: error: {bad}: [publish] mode: wrong type, expected a string, got integer 1",
    ]
    result = runner.invoke(main, ["config", "check", "--json", str(bad)])
    assert result.exit_code == 2 and json.loads(result.output)["ok"] is False


def test_cli_show(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["config", "show", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == config_to_dict(Config())
    path = write(tmp_path, "[lease]\nk = 5\n")
    result = runner.invoke(main, ["config", "show", str(path)])
    assert result.exit_code == 0
    assert tomllib.loads(result.output)["lease"]["k"] == 5.0
    bad = write(tmp_path, "[lease]\nk = -1\n", "bad.toml")
    result = runner.invoke(main, ["config", "show", str(bad)])
    assert result.exit_code == 2
    assert "connpub: error:" in result.output and "[lease] k: -1.0 is out of range" in result.output
