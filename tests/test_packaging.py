"""Packaging: pyproject.toml lists every module and agrees with requirements.txt, and
`pip install .` into a fresh virtualenv gives commands and modules that work on their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, free_ports

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOT_MODULES = {"setup.py", "conftest.py"}  # build or test scripts, should the top level get one


def requirement_lines(text: str) -> list[Requirement]:
    return [
        Requirement(line)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_top_level_module_is_listed_in_pyproject():
    """pyproject's py-modules are exactly the checkout's top-level modules, sorted."""
    on_disk = {p.stem for p in ROOT.glob("*.py") if p.name not in NOT_MODULES}
    listed = PYPROJECT["tool"]["setuptools"]["py-modules"]
    assert not on_disk - set(listed), f"add to pyproject.toml's py-modules: {on_disk - set(listed)}"
    assert not set(listed) - on_disk, f"no such module in the checkout: {set(listed) - on_disk}"
    assert listed == sorted(listed), "keep py-modules sorted"


def test_requirements_pin_exactly_the_declared_dependencies():
    """requirements.txt pins every dependency and extra of pyproject.toml, within its range."""
    project = PYPROJECT["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared += [
            Requirement(r)
            for r in extra
            if canonicalize_name(Requirement(r).name) != canonicalize_name(project["name"])
        ]
    pins = {
        canonicalize_name(r.name): r
        for r in requirement_lines((ROOT / "requirements.txt").read_text())
    }
    assert {canonicalize_name(r.name) for r in declared} == set(pins)
    for req in declared:
        pin = pins[canonicalize_name(req.name)]
        (spec,) = pin.specifier
        assert spec.operator == "==", f"requirements.txt: pin {pin} to one version"
        assert req.specifier.contains(spec.version), f"{pin} is outside pyproject's {req}"


# ------------------------------------------------------------------ installed with pip


def run_env() -> dict[str, str]:
    """The environment without anything that could import from the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the checkout installed by `pip install`; returns its bin dir.

    pip gets a copy of the checkout's top level (the modules, pyproject.toml, README.md),
    because setuptools builds in the source tree and would leave build/ and *.egg-info in it.
    """
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "zmqchat"
    src.mkdir()
    for path in ROOT.iterdir():
        if path.is_file() and path.suffix in (".py", ".toml", ".md", ".txt"):
            shutil.copy2(path, src / path.name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=run_env())
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(src),
        ],
        capture_output=True,
        text=True,
        env=run_env(),
        cwd=tmp,
        timeout=120,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv / "bin"


def run(command: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=run_env(), timeout=30, **kw
    )


def test_installed_commands_show_help_and_pass_on_exit_status(installed, tmp_path):
    """zmqchat-broker and zmqchat answer --help, and a failure's status reaches the shell."""
    broker_help = run([str(installed / "zmqchat-broker"), "--help"], tmp_path)
    assert broker_help.returncode == 0, broker_help.stderr
    assert broker_help.stdout.startswith("usage: zmqchat-broker")
    for flag in ("--port", "--pub-port", "--db", "--curve-key", "--log-level"):
        assert flag in broker_help.stdout
    client_help = run([str(installed / "zmqchat"), "--help"], tmp_path)
    assert client_help.returncode == 0, client_help.stderr
    for flag in ("--ip", "--port", "--user", "--room", "--json", "--server-key"):
        assert flag in client_help.stdout
    # main() returns these statuses (no SystemExit): the wrapper must sys.exit() with them
    bad_room = run([str(installed / "zmqchat-broker"), "--rooms", "!!"], tmp_path)
    assert bad_room.returncode == 2 and "--rooms" in bad_room.stderr
    no_nick = run([str(installed / "zmqchat"), "--json"], tmp_path, input="")
    assert no_nick.returncode == 2 and "-u NICK" in no_nick.stderr


def test_installed_modules_are_importable_for_bots(installed, tmp_path):
    """The venv's python imports client and bot from site-packages, not from the checkout."""
    code = "import bot, client; print(client.__file__); print(client.Client.__name__)"
    out = run([str(installed / "python"), "-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    path, name = out.stdout.split()
    assert "site-packages" in Path(path).parts and name == "Client"


def test_installed_broker_and_client_exchange_a_message(installed, tmp_path):
    """zmqchat --json says a line through zmqchat-broker and gets it back as its own message."""
    port, pub_port = free_ports()
    broker = subprocess.Popen(
        [
            str(installed / "zmqchat-broker"),
            "--port",
            str(port),
            "--pub-port",
            str(pub_port),
            "--db",
            str(tmp_path / "chat.db"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=run_env(),
    )
    try:
        # it starts only once its history writer (store.py, from site-packages) has answered
        started = broker.stdout.readline()
        assert started.startswith("Broker started"), started + broker.stderr.read()
        text = "hello from an installed zmqchat"
        client = run(
            [
                str(installed / "zmqchat"),
                "--json",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "-u",
                "alice",
            ],
            tmp_path,
            input=text + "\n",
        )
        assert client.returncode == 0, client.stdout + client.stderr
        events = [json.loads(line) for line in client.stdout.splitlines()]
        said = [e for e in events if e["kind"] == "msg" and e["text"] == text]
        assert len(said) == 1, client.stdout
        assert said[0]["mine"] is True and said[0]["nick"] == "alice" and said[0]["room"] == "lobby"
        broker.terminate()
        assert broker.wait(10) == 0, broker.stderr.read()
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
