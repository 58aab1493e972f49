"""Packaging: the wheel holds the package `zmqchat` and nothing else at the top level,
pyproject.toml agrees with requirements.txt, and `pip install` into a fresh virtualenv gives
commands and a library that work on their own, beside a user's own modules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, free_ports

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Names a user's own modules often have, and ours had before they moved into the package.
SHADOWS = ("logs", "state", "metrics", "messages", "core", "store", "client", "bot", "broker")


def requirement_lines(text: str) -> list[Requirement]:
    return [
        Requirement(line)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_folder_of_the_package_is_a_package():
    """Each folder under zmqchat/ has an __init__.py, so that setuptools' find includes it."""
    folders = [p for p in (ROOT / "zmqchat").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert folders, "zmqchat/ has no subpackages"
    for folder in folders:
        assert (folder / "__init__.py").exists(), f"{folder} has no __init__.py"


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
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the checkout (setuptools builds in the
    source tree and would leave build/ and *.egg-info in it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".*", "__pycache__", "*.db*", "build", "*.egg-info"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(src)],
        capture_output=True,
        text=True,
        env=run_env(),
        cwd=tmp,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = tmp.glob("zmqchat-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed by `pip install` (and so its declared
    dependencies, not its extras); returns its bin dir. The virtualenv has no pip of its
    own (putting one in took a third of this fixture's time): this run's pip installs."""
    tmp = tmp_path_factory.mktemp("installed")
    venv = tmp / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=run_env()
    )
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--disable-pip-version-check",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        env=run_env(),
        cwd=tmp,
        timeout=120,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv / "bin"


def test_the_wheel_installs_one_package_and_nothing_else(wheel):
    """The wheel's top-level names are exactly `zmqchat` and its dist-info: none of the
    checkout's entry points (broker.py, client.py, messages.py), tests or scripts."""
    with zipfile.ZipFile(wheel) as whl:
        top = {name.split("/")[0] for name in whl.namelist()}
        entry_points = whl.read(next(n for n in whl.namelist() if n.endswith("entry_points.txt")))
    assert top == {
        "zmqchat",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    assert b"zmqchat-broker = zmqchat.broker:main" in entry_points
    assert b"zmqchat = zmqchat._cli.chat:main" in entry_points


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
    assert bad_room.returncode == 2 and bad_room.stderr.startswith("zmqchat-broker: --rooms")
    no_nick = run([str(installed / "zmqchat"), "--json"], tmp_path, input="")
    assert no_nick.returncode == 2 and "-u NICK" in no_nick.stderr


def test_installed_commands_call_themselves_by_the_name_they_were_run_by(installed, tmp_path):
    """Usage and error lines name the command the user typed: `zmqchat`, `zmqchat-broker`,
    `python -m zmqchat`, `python -m zmqchat.broker` (never the checkout's client.py)."""
    client_help = run([str(installed / "zmqchat"), "--help"], tmp_path)
    assert client_help.stdout.startswith("usage: zmqchat [-h]"), client_help.stdout
    bad_nick = run([str(installed / "zmqchat"), "-u", "bad nick"], tmp_path, input="")
    assert bad_nick.returncode == 2
    assert bad_nick.stderr.splitlines()[0].startswith("usage: zmqchat [-h]"), bad_nick.stderr
    assert "zmqchat: error: argument -u/--user: 'bad nick': " in bad_nick.stderr
    no_motd = run([str(installed / "zmqchat-broker"), "--motd", "/nonexistent"], tmp_path)
    assert no_motd.returncode == 1
    assert no_motd.stderr == "zmqchat-broker: --motd: no such file: /nonexistent\n"
    assert not list(tmp_path.iterdir())  # and no database left behind
    python = str(installed / "python")
    module_help = run([python, "-m", "zmqchat", "--help"], tmp_path)
    assert module_help.stdout.startswith("usage: python -m zmqchat [-h]"), module_help.stdout
    module_error = run([python, "-m", "zmqchat.broker", "--rooms", "!!"], tmp_path)
    assert module_error.stderr.startswith("python -m zmqchat.broker: --rooms"), module_error.stderr


def test_installed_package_serves_a_bot_beside_its_own_modules(installed, tmp_path):
    """A bot script in a folder of its own modules named like ours (logs.py, state.py, ...)
    imports zmqchat from site-packages, and `python -m zmqchat.broker` started from that
    folder serves it: none of the user's files is picked up in place of ours."""
    for name in SHADOWS:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user's own {name}.py')\n")
    port, pub_port = free_ports()
    broker = subprocess.Popen(
        [str(installed / "python"), "-m", "zmqchat.broker", "--port", str(port)]
        + ["--pub-port", str(pub_port), "--db", str(tmp_path / "chat.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=run_env(),
    )
    try:
        started = broker.stdout.readline()
        assert started.startswith("Broker started"), started + broker.stderr.read()
        (tmp_path / "mybot.py").write_text(
            "import sys\n"
            "import zmqchat\n"
            "from zmqchat import BlockingClient, Bot, ChatError, Event\n"
            "print(zmqchat.__file__)\n"
            "c = BlockingClient('127.0.0.1', int(sys.argv[1]), 'mybot', bot=True)\n"
            "c.say('lobby', 'hello from my bot')\n"
            "ev = c.next_event(10)\n"
            "while ev is not None and not (ev.kind == 'msg' and ev.mine):\n"
            "    ev = c.next_event(10)\n"
            "print(ev.text if ev else 'nothing came back')\n"
            "c.close()\n"
        )
        out = run([str(installed / "python"), "mybot.py", str(port)], tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        path, echo = out.stdout.splitlines()
        assert "site-packages" in Path(path).parts and echo == "hello from my bot"
    finally:
        broker.terminate()
        broker.wait(10)


def test_the_package_runs_with_python_dash_m(installed, tmp_path):
    """`python -m zmqchat` is the client and `python -m zmqchat.broker` the broker."""
    client = run([str(installed / "python"), "-m", "zmqchat", "--help"], tmp_path)
    assert client.returncode == 0 and "--user" in client.stdout, client.stderr
    broker = run([str(installed / "python"), "-m", "zmqchat.broker", "--help"], tmp_path)
    assert broker.returncode == 0 and "--pub-port" in broker.stdout, broker.stderr


def test_the_public_api_is_declared():
    """`from zmqchat import *` gives exactly the names of __all__, each one importable."""
    import zmqchat

    namespace: dict[str, object] = {}
    exec("from zmqchat import *", namespace)
    assert sorted(k for k in namespace if not k.startswith("__")) == sorted(zmqchat.__all__)
    assert {"Client", "BlockingClient", "Bot", "Event", "ChatError"} <= set(zmqchat.__all__)


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


def test_installed_broker_without_the_cluster_extra_says_what_to_install(installed, tmp_path):
    """`zmqchat-broker --cluster ...` after a plain `pip install .` (no NATS client) says to
    install zmqchat[cluster] and exits 1: no traceback, nothing bound or written."""
    port, pub_port = free_ports()
    out = run(
        [str(installed / "zmqchat-broker"), "--cluster", "nats://127.0.0.1:4222"]
        + ["--port", str(port), "--pub-port", str(pub_port)],
        tmp_path,
    )
    assert out.returncode == 1, out.stderr
    assert "pip install 'zmqchat[cluster]'" in out.stderr
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
