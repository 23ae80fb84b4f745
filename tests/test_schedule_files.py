"""The schedule files in cluster/schedule/ parse, and every facelake command they run exists in the CLI.

Each invocation found (cron line, container command, RayJob entrypoint, launcher setup command)
is parsed by the CLI's own click parser, so a renamed command or option fails here rather than
at 02:30 on the cluster. `submit ... -- COMMAND` is checked twice: submit's options, then COMMAND.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

SCHEDULE = Path(__file__).resolve().parents[1] / "cluster" / "schedule"
YAML_FILES = sorted(SCHEDULE.glob("*.yaml"))
CRON_FILES = sorted(SCHEDULE.glob("*.cron"))


def _cli():
    from facelake.jobs import cli

    if not cli.app.registered_commands:
        cli._register_all()
    return typer.main.get_command(cli.app)


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _strings(node):
    """Every string and every list of strings in a parsed YAML tree."""
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        if node and all(isinstance(v, str) for v in node):
            yield node
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _invocations_in_text(text: str) -> list[list[str]]:
    """facelake invocations in shell text: the arguments after each `facelake` word."""
    found = []
    for line in text.replace(">-", "").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "facelake" not in line:
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if word == "facelake" and i + 1 < len(words) and re.match(r"^[a-z]", words[i + 1]):
                rest = words[i + 1:]
                cut = next((j for j, w in enumerate(rest) if w in ("&&", "||", ";", "|", ">>", ">", "2>&1")), len(rest))
                found.append(rest[:cut])
    return found


def _invocations(path: Path) -> list[list[str]]:
    if path.suffix == ".cron":
        lines = [l for l in path.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
        return [inv for l in lines if not re.match(r"^[A-Z_]+=", l) for inv in _invocations_in_text(l)]
    found = []
    for doc in _documents(path):
        for item in _strings(doc):
            if isinstance(item, list):
                if item[0] == "facelake":
                    found.append(item[1:])
                elif item[0] in ("/bin/sh", "sh", "bash", "-c"):
                    continue
            else:
                found.extend(_invocations_in_text(item))
    return found


def _is_group(command) -> bool:
    return hasattr(command, "get_command") and hasattr(command, "list_commands")


def _check_parses(group, args: list[str], where: str, prefix: str = "facelake") -> None:
    """Parse args exactly as `facelake ARGS` would, without running anything.

    Duck-typed: typer may vendor its own copy of click, so click's classes are not assumed.
    """
    assert args, f"{where}: a facelake command is missing its subcommand"
    name, rest = args[0], args[1:]
    with group.context_class(group, info_name=prefix) as ctx:
        command = group.get_command(ctx, name)
        assert command is not None, (
            f"{where}: `{prefix} {name}` is not a command of this CLI "
            f"(registered: {', '.join(sorted(group.list_commands(ctx)))})")
        if _is_group(command):
            _check_parses(command, rest, where, f"{prefix} {name}")
            return
        try:
            command.make_context(f"{prefix} {name}", list(rest), parent=ctx)
        except Exception as err:  # click's UsageError family, whichever click typer uses
            if not hasattr(err, "format_message"):
                raise
            pytest.fail(f"{where}: `{prefix} {shlex.join(args)}` does not parse: {err.format_message()}")
    if name == "submit":
        inner = rest[rest.index("--") + 1:] if "--" in rest else []
        assert inner, f"{where}: submit without `-- COMMAND`"
        _check_parses(group, inner, where + " (the submitted command)")


def test_schedule_folder_holds_each_file():
    names = {p.name for p in SCHEDULE.iterdir()}
    assert any(n.endswith(".cron") for n in names)
    kinds = {doc.get("kind") for p in YAML_FILES for doc in _documents(p)}
    assert {"CronJob", "RayJob", "RayCluster"} <= kinds
    assert any("available_node_types" in doc for p in YAML_FILES for doc in _documents(p))


@pytest.mark.parametrize("path", YAML_FILES + CRON_FILES, ids=lambda p: p.name)
def test_every_facelake_command_exists_in_the_cli(path):
    group = _cli()
    invocations = _invocations(path)
    if path.name not in ("kuberay-raycluster.yaml",):  # the long-lived cluster runs nothing itself
        assert invocations, f"{path.name} runs no facelake command"
    for args in invocations:
        _check_parses(group, args, path.name)


@pytest.mark.parametrize("path", YAML_FILES + CRON_FILES, ids=lambda p: p.name)
def test_no_credentials_in_schedule_files(path):
    text = path.read_text()
    assert not re.search(r"(?i)(secret_access_key|session_token|password|aws_access_key_id)\s*[:=]\s*\S", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


def test_cron_line_submits_a_rebuild_and_waits():
    (cron,) = CRON_FILES
    jobs = [l for l in cron.read_text().splitlines()
            if l.strip() and not l.lstrip().startswith("#") and not re.match(r"^[A-Z_]+=", l)]
    assert len(jobs) == 1
    fields = jobs[0].split()
    for field, (low, high) in zip(fields[:5], [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]):
        assert field == "*" or low <= int(field) <= high, jobs[0]
    args, *after = _invocations(cron)
    assert args[0] == "submit" and "--wait" in args and "--address" in args
    assert args[args.index("--") + 1] == "rebuild" and "--root" in args
    assert "&& flock" in jobs[0]                          # calibrate only after a successful rebuild
    assert [a[a.index("--") + 1] for a in after] == ["calibrate"] and "--if-stale" in after[0]


def test_every_nightly_rebuild_is_followed_by_calibrate_if_stale():
    """Each schedule that rebuilds then runs `calibrate --if-stale` against the same root."""
    for path in YAML_FILES + CRON_FILES:
        invocations = [a[a.index("--") + 1:] if a[0] == "submit" else a for a in _invocations(path)]
        commands = [a[0] for a in invocations]
        if "rebuild" not in commands:
            continue
        assert "calibrate" in commands[commands.index("rebuild"):], path.name
        rebuild, calibrate = invocations[commands.index("rebuild")], invocations[commands.index("calibrate")]
        assert "--if-stale" in calibrate and "--purpose" in calibrate, path.name
        assert rebuild[rebuild.index("--root") + 1] == calibrate[calibrate.index("--root") + 1], path.name


def test_cronjobs_submit_with_wait_or_create_a_rayjob():
    docs = [d for p in YAML_FILES for d in _documents(p)]
    cronjobs = [d for d in docs if d.get("kind") == "CronJob"]
    assert cronjobs
    for cj in cronjobs:
        assert len(cj["spec"]["schedule"].split()) == 5
        assert cj["spec"]["concurrencyPolicy"] == "Forbid"
        pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
    submit_pods = [c["command"] for cj in cronjobs
                   for c in cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
                   if c.get("command", [None])[0] == "facelake"]
    assert any(cmd[1] == "submit" and "--wait" in cmd for cmd in submit_pods)
    (rayjob,) = [d for d in docs if d.get("kind") == "RayJob"]
    assert shlex.split(rayjob["spec"]["entrypoint"])[:2] == ["facelake", "rebuild"]
    assert rayjob["spec"]["metadata"]["facelake_command"] == "rebuild"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    configmap_users = [v["configMap"]["name"] for cj in cronjobs
                       for v in cj["spec"]["jobTemplate"]["spec"]["template"]["spec"].get("volumes", [])
                       if "configMap" in v]
    assert configmap_users == ["facelake-rayjob"]


def test_kuberay_clusters_have_a_gpu_worker_group():
    for doc in (d for p in YAML_FILES for d in _documents(p) if d.get("kind") in ("RayCluster", "RayJob")):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"]
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"]]
        assert 1 in gpus, doc["kind"]


def test_launcher_has_gpu_workers_that_install_facelake_gpu():
    (launcher,) = [d for p in YAML_FILES for d in _documents(p) if "available_node_types" in d]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU") == 1]
    assert gpu_types, "no node type with resources {'GPU': 1}"
    for node_type in gpu_types:
        assert node_type["node_config"]["InstanceType"]
        assert node_type["max_workers"] >= 1
        commands = node_type.get("worker_setup_commands", launcher.get("worker_setup_commands", []))
        commands = launcher.get("setup_commands", []) + commands
        assert any(re.search(r"pip install .*facelake\[gpu\]", c) for c in commands), commands
    assert any("IamInstanceProfile" in t["node_config"] for t in types.values())
