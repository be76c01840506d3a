"""vagrant/ is validated, not run, here: Ruby syntax, the topology it defines, the provisioner."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT = Path(__file__).resolve().parents[1] / "vagrant"

# Loads the Vagrantfile against a recording stand-in for Vagrant's configuration object.
RECORDER = r"""
require "json"
class Recorder
  attr_reader :calls
  def initialize(path = [], calls = {}) ; @path = path ; @calls = calls ; end
  def method_missing(name, *args, **kw, &block)
    key = (@path + [name.to_s]).join(".")
    (@calls[key] ||= []) << args.map(&:to_s)
    child = Recorder.new(@path + [name.to_s], @calls)
    block.call(child) if block
    child
  end
  def respond_to_missing?(*) = true
end
module Vagrant
  def self.configure(_version)
    $recorder = Recorder.new
    yield $recorder
  end
end
load ARGV[0]
puts JSON.generate($recorder.calls)
"""


@pytest.fixture(scope="module")
def ruby() -> str:
    path = shutil.which("ruby")
    if path is None:
        pytest.skip("ruby is not installed (sudo make setup installs it)")
    return path


def test_vagrantfile_syntax(ruby):
    proc = subprocess.run(
        [ruby, "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stderr


def test_vagrantfile_defines_the_lab_topology(ruby, tmp_path):
    script = tmp_path / "record.rb"
    script.write_text(RECORDER)
    proc = subprocess.run(
        [ruby, str(script), str(VAGRANT / "Vagrantfile")],
        capture_output=True,
        text=True,
        cwd=VAGRANT,
    )
    assert proc.returncode == 0, proc.stderr
    calls = json.loads(proc.stdout)
    names = [args[0] for args in calls["vm.define"]]
    assert names == ["client1", "router", "lb1", "lb2", "srv1", "srv2", "srv3"]
    provisions = [args for args in calls["vm.define.vm.provision"]]
    assert provisions.count(["shell"]) == 3 * len(names)  # apt, make setup, provision-node.sh
    networks = calls["vm.define.vm.network"]
    assert len(networks) == 1 + (1 + 2 + 3) + 2 * 2 + 3 * 2  # client, router, lbs, servers


def test_provisioner_is_valid_bash():
    proc = subprocess.run(
        ["bash", "-n", str(VAGRANT / "provision-node.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
