"""The README stays true: its set-up commands, configuration table and CI script."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields

import requests
from conftest import ROOT

from cds_service.config import PREFIX, Settings

README = (ROOT / "README.md").read_text()


def test_configuration_table_lists_every_setting_with_its_default():
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(
            r"^\| `(PAIN_CDS_\w+)` \|[^|]*\| ([^|]+) \|", README, re.M
        )
    }
    expected = {}
    for item in fields(Settings):
        default = (
            item.default if item.default is not MISSING else item.default_factory()
        )
        if isinstance(default, bool):
            default = "on" if default else "off"
        if isinstance(default, list):
            default = ",".join(default)
        expected[PREFIX + item.name.upper()] = (
            f"`{default}`" if default != "" else "(empty)"
        )

    assert rows == expected


def test_two_setup_commands():
    commands = re.findall(r"```sh\n(.+?)\n```", README)

    assert commands[:2] == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && "
        "PAIN_CDS_AUTH=off .venv/bin/pain-cds serve",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
        ".venv/bin/python -m pytest",
    ]


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()

    assert "/bin/pip\" install --quiet -e '.[test]'" in script
    assert '"$venv/bin/python" -m pytest "$@"' in script


def test_curl_example_returns_the_card_shown(live_server):
    request_file = re.search(r"-d @(\S+)", README).group(1)
    url = re.search(r"curl -s (\S+) ", README).group(1)
    summary = re.search(r"^> \*\*(.+)\*\*$", README, re.M).group(1)
    body = (ROOT / request_file).read_text()

    response = requests.post(
        url.replace("http://127.0.0.1:8080", live_server.url),
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )

    assert response.status_code == 200
    assert [card["summary"] for card in response.json()["cards"]] == [summary]
    action = response.json()["systemActions"][0]
    covered = [
        item["valueCode"]
        for extension in action["resource"]["extension"]
        for item in extension["extension"]
        if item["url"] == "covered"
    ]
    assert covered == ["not-covered"]
