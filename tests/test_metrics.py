"""`mtlsctl metrics`: Prometheus text that Prometheus' own parser and promtool accept, whose values are what
`list --json` and openssl say, written whole (a reader never sees half a file), refreshed by renew, revoke and
crl, reading index.txt and never every certificate."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtlsctl import metrics
from mtlsctl.crl import parse_openssl_date
from mtlsctl.pki import resolve_settings

from .conftest import is_two_tier, openssl, run_cli, set_profile

pytestmark = pytest.mark.integration


def cli(pki: Path, *args: str):
    return run_cli(["--pki-dir", str(pki), *args])


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus' own text parser: name -> [(labels, value)]; every family must say gauge."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge" and family.documentation, family.name
        out[family.name] = [(dict(s.labels), s.value) for s in family.samples]
    return out


def openssl_date(args: list[str], field: str) -> int:
    out = openssl(*args).stdout
    value = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith(field + "="))
    return int(parse_openssl_date(value).timestamp())


def populate(pki: Path) -> None:
    set_profile(pki, nginx={"reload_command": "", "test_command": ""})
    for args in (["add-client", "alice"], ["add-client", "bob"], ["add-server", "web.example", "--san", "DNS:web.example"],
                 ["revoke", "bob", "--no-reload"], ["replace", "web.example", "--no-reload"]):
        res = cli(pki, *args)
        assert res.code == 0, (args, res.err)


def test_values_match_list_json_and_openssl(tiered_pki):
    pki = tiered_pki
    populate(pki)
    res = cli(pki, "metrics")
    assert res.code == 0, res.err
    got = parse(res.out)
    listed = json.loads(cli(pki, "list", "--json").out)
    certs = got["mtlsctl_certificate_not_after_seconds"]
    assert len(certs) == len(listed)
    for (labels, value), entry in zip(certs, listed, strict=True):
        status = "valid" if entry["status"] == "expiring" else entry["status"]
        assert (labels["name"], labels["serial"], labels["status"]) == (entry["name"], entry["serial"], status)
        assert value == int(datetime.fromisoformat(entry["not_after"]).timestamp())
    kinds = {(labels["name"], labels["serial"]): labels["kind"] for labels, _ in certs}
    assert {k for (n, _), k in kinds.items() if n == "web.example"} == {"server"}  # both: the replaced one too
    assert {k for (n, _), k in kinds.items() if n in ("alice", "bob")} == {"client"}
    counts = {labels["status"]: value for labels, value in got["mtlsctl_certificates"]}
    assert counts == {"valid": 2, "expired": 0, "revoked": 2}  # alice, the new web; bob, the old web
    cas = {labels["ca"]: value for labels, value in got["mtlsctl_ca_not_after_seconds"]}
    assert cas["ca"] == openssl_date(["x509", "-in", str(pki / "ca/ca.crt"), "-noout", "-enddate"], "notAfter")
    crls = {labels["crl"]: value for labels, value in got["mtlsctl_crl_next_update_seconds"]}
    assert crls["ca"] == openssl_date(["crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-nextupdate"], "nextUpdate")
    number = openssl("crl", "-in", str(pki / "crl/ca.crl"), "-noout", "-crlnumber").stdout.strip().split("=")[1]
    assert dict((lbl["crl"], v) for lbl, v in got["mtlsctl_crl_number"])["ca"] == int(number, 16)
    assert dict((lbl["crl"], v) for lbl, v in got["mtlsctl_crl_revoked_entries"])["ca"] == 2
    if is_two_tier(pki):
        assert cas["root"] == openssl_date(["x509", "-in", str(pki / "ca/root.crt"), "-noout", "-enddate"], "notAfter")
        assert crls["root"] == openssl_date(["crl", "-in", str(pki / "crl/root.crl"), "-noout", "-nextupdate"], "nextUpdate")
    else:
        assert set(cas) == {"ca"} and set(crls) == {"ca"}
    assert got["mtlsctl_renew_last_run_timestamp_seconds"] == [({}, 0)]  # never ran: an alert on its age fires
    assert "mtlsctl_ocsp_responder_up" not in got  # no ocsp: in the profile


def test_statuses_and_counts_as_time_passes(fast_pki):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""}, renew={"within_days": 30})
    assert cli(fast_pki, "add-client", "short", "--days", "2").code == 0
    assert cli(fast_pki, "add-client", "long", "--days", "365").code == 0
    settings = resolve_settings(fast_pki, None, environ={})
    now = datetime.now(timezone.utc)
    got = parse(metrics.render(metrics.collect(settings, now=now)[0]))
    assert {lbl["name"]: lbl["status"] for lbl, _ in got["mtlsctl_certificate_not_after_seconds"]} == {"short": "valid", "long": "valid"}
    assert got["mtlsctl_certificates_expiring"] == [({}, 1)]
    got = parse(metrics.render(metrics.collect(settings, now=now + timedelta(days=3))[0]))
    assert {lbl["name"]: lbl["status"] for lbl, _ in got["mtlsctl_certificate_not_after_seconds"]} == {"short": "expired", "long": "valid"}
    assert dict((lbl["status"], v) for lbl, v in got["mtlsctl_certificates"]) == {"valid": 1, "expired": 1, "revoked": 0}


@pytest.mark.needs("promtool")
def test_promtool_accepts_it(tiered_pki):
    populate(tiered_pki)
    res = cli(tiered_pki, "metrics")
    assert res.code == 0
    check = subprocess.run(["promtool", "check", "metrics"], input=res.out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (check.stdout + check.stderr).strip()  # not even a lint warning


def test_label_values_and_help_are_escaped():
    fam = metrics.Family("mtlsctl_test", 'help with \\ and\nnewline "quoted"')
    hostile = 'a"b\\c\nd}e,f="g"'
    fam.add(1, name=hostile, serial="10")
    text = metrics.render([fam])
    assert text.count("\n") == 3  # HELP, TYPE, one sample: the newline in the value did not break the line
    (family,) = text_string_to_metric_families(text)
    assert family.documentation == 'help with \\ and\nnewline "quoted"'
    assert [dict(s.labels) for s in family.samples] == [{"name": hostile, "serial": "10"}]


def test_a_crafted_name_in_index_txt_cannot_forge_a_series(fast_pki):
    """index.txt is the PKI's own file, but what it holds reaches the text only as an escaped label value."""
    row = "V\t361231235959Z\t\t0ABC\tunknown\t/CN=x\"} mtlsctl_forged 1 #\\\n"
    with open(fast_pki / "index.txt", "a") as fh:
        fh.write(row)
    res = cli(fast_pki, "metrics")
    assert res.code == 0, res.err
    got = parse(res.out)
    assert "mtlsctl_forged" not in got
    assert any(lbl["name"] == 'x"} mtlsctl_forged 1 #\\' for lbl, _ in got["mtlsctl_certificate_not_after_seconds"])


_OPENED: list[str] = []
_WATCHING: list[bool] = []


def _watch_opens(event: str, args: tuple) -> None:
    if _WATCHING and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


def test_reads_index_txt_never_every_certificate(fast_pki):
    """At thousands of certificates, opening each would cost more than the rest: metrics opens index.txt, the CA
    and the CRL (and lists directories), never a client's certificate (every open() of the run is watched)."""
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    for name in ("a1", "a2", "a3"):
        assert cli(fast_pki, "add-client", name).code == 0
    if not getattr(sys, "_mtlsctl_open_hook", False):
        sys.addaudithook(_watch_opens)  # stays for the process; records only while _WATCHING
        sys._mtlsctl_open_hook = True
    _OPENED.clear()
    _WATCHING.append(True)
    try:
        res = cli(fast_pki, "metrics")
    finally:
        _WATCHING.clear()
    assert res.code == 0, res.err
    assert len(parse(res.out)["mtlsctl_certificate_not_after_seconds"]) == 3
    assert any(p.endswith("index.txt") for p in _OPENED), _OPENED  # the watch works
    certs = [p for p in _OPENED if "newcerts" in p or p.endswith((".crt", ".pem", ".csr", ".key", ".p12"))
             and not p.endswith(("ca/ca.crt", "ca/root.crt"))]
    assert certs == [], certs


# --------------------------------------------------------------------------- --out: whole files only


READER = r"""
import os, sys, time
path, expected, seconds = sys.argv[1], open(sys.argv[2]).read(), float(sys.argv[3])
reads = bad = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        continue
    reads += 1
    if text != expected:
        bad += 1
print(reads, bad)
"""


def test_a_reader_looping_on_the_file_never_sees_half_of_it(fast_pki, tmp_path):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    for i in range(20):
        assert cli(fast_pki, "add-client", f"device-{i:02d}").code == 0
    settings = resolve_settings(fast_pki, None, environ={})
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    out = textdir / "mtlsctl.prom"
    expected = tmp_path / "expected"
    expected.write_text(metrics.metrics(settings).text)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(expected), "4"], stdout=subprocess.PIPE, text=True)
    writes = 0
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        metrics.metrics(settings, out)
        writes += 1
    reads, bad = map(int, reader.communicate(timeout=30)[0].split())
    assert writes > 20 and reads > 100, (writes, reads)
    assert bad == 0, f"{bad} of {reads} reads saw a partial or empty file"
    assert os.listdir(textdir) == ["mtlsctl.prom"]  # no temporary file left behind


def test_out_via_the_cli_mode_644_and_refusals(fast_pki, tmp_path):
    out = tmp_path / "m.prom"
    os.umask(0o077)
    res = cli(fast_pki, "metrics", "--out", str(out), "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["out"] == str(out)
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o644  # node_exporter runs as its own user
    parse(out.read_text())
    for args in (["--out", str(tmp_path / "missing" / "m.prom")], ["--out", str(tmp_path)], ["--json"]):
        res = cli(fast_pki, "metrics", *args)
        assert res.code == 2 and "Traceback" not in res.err, args
    assert not (tmp_path / "missing").exists()
    target = tmp_path / "victim"
    target.write_text("keep")
    os.symlink(target, tmp_path / "link.prom")
    assert cli(fast_pki, "metrics", "--out", str(tmp_path / "link.prom")).code == 2
    assert target.read_text() == "keep"


def test_profile_textfile_must_be_absolute_and_prom(fast_pki):
    for bad in ("relative.prom", "/var/lib/x/m.txt"):
        set_profile(fast_pki, metrics={"textfile": bad})
        res = cli(fast_pki, "metrics")
        assert res.code == 2 and "metrics.textfile" in res.err, res.err


# --------------------------------------------------------------------------- refreshed by renew, revoke, crl


def test_renew_revoke_and_crl_refresh_the_textfile(fast_pki, tmp_path):
    prom = tmp_path / "mtlsctl.prom"
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""}, metrics={"textfile": str(prom)})
    assert cli(fast_pki, "add-client", "alice").code == 0
    assert cli(fast_pki, "add-client", "soon", "--days", "5").code == 0
    assert not prom.exists()  # add-client is not one of them
    res = cli(fast_pki, "revoke", "alice", "--no-reload", "--json")
    assert res.code == 0 and json.loads(res.out)["metrics"] == {"written": str(prom), "error": None}
    got = parse(prom.read_text())
    assert dict((lbl["name"], lbl["status"]) for lbl, _ in got["mtlsctl_certificate_not_after_seconds"])["alice"] == "revoked"
    before = got["mtlsctl_crl_number"]
    assert cli(fast_pki, "crl", "--no-reload").code == 0
    assert parse(prom.read_text())["mtlsctl_crl_number"][0][1] == before[0][1] + 1
    started = int(time.time())
    assert cli(fast_pki, "renew", "--no-reload").code == 0
    got = parse(prom.read_text())
    assert got["mtlsctl_renew_last_run_success"] == [({}, 1)] and got["mtlsctl_renew_last_run_renewed"] == [({}, 1)]
    assert got["mtlsctl_renew_last_run_timestamp_seconds"][0][1] >= started - 1
    # a renew that changes nothing still counts as a run (the alert "renew has not run" must not fire)
    os.utime(prom, (0, 0))
    assert cli(fast_pki, "renew", "--no-reload").code == 0
    assert os.stat(prom).st_mtime > 0 and parse(prom.read_text())["mtlsctl_renew_last_run_renewed"] == [({}, 0)]
    # one that fails is a failed run
    assert cli(fast_pki, "add-client", "later", "--days", "5").code == 0
    (fast_pki / "certs/later.csr").unlink()
    assert cli(fast_pki, "renew", "--no-reload").code == 1
    got = parse(prom.read_text())
    assert got["mtlsctl_renew_last_run_success"] == [({}, 0)] and got["mtlsctl_renew_last_run_failed"] == [({}, 1)]
    assert "failed" in (fast_pki / metrics.RENEW_STATE).read_text()


def test_a_textfile_that_cannot_be_written_is_a_warning_not_a_failure(fast_pki, tmp_path):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""},
                metrics={"textfile": str(tmp_path / "gone" / "m.prom")})
    res = cli(fast_pki, "crl", "--no-reload", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["metrics"]["written"] is None and "does not exist" in json.loads(res.out)["metrics"]["error"]
    assert "metrics.textfile" in res.err


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"v": 1, "time": "x", "result": "ok", "renewed": 1, "failed": 0}',
                                     b'{"v": 1, "time": "2030-01-01T00:00:00Z", "result": "ok", "renewed": true, "failed": 0}',
                                     b'{"v": 1, "time": "2030-01-01T00:00:00Z", "result": "ok", "renewed": 1, "failed": 0, "x": 1}',
                                     b"\xff" * 10000, "link"])
def test_a_damaged_renew_state_reads_as_never_ran(fast_pki, tmp_path, content):
    state = fast_pki / metrics.RENEW_STATE
    if content == "link":
        good = tmp_path / "good"
        good.write_text('{"v": 1, "time": "2030-01-01T00:00:00Z", "result": "ok", "renewed": 1, "failed": 0}')
        os.symlink(good, state)
    else:
        state.write_bytes(content)
    res = cli(fast_pki, "metrics")
    assert res.code == 0, res.err
    got = parse(res.out)
    assert got["mtlsctl_renew_last_run_timestamp_seconds"] == [({}, 0)] and got["mtlsctl_renew_last_run_success"] == [({}, 0)]


# --------------------------------------------------------------------------- OCSP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ocsp_responder_liveness_is_a_gauge(fast_pki):
    port = free_port()
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""},
                ocsp={"url": f"http://127.0.0.1:{port}", "port": port})
    assert cli(fast_pki, "ocsp", "setup").code == 0
    started = time.monotonic()
    res = cli(fast_pki, "metrics")
    assert res.code == 0, res.err  # nobody listens: a 0, not an error
    assert time.monotonic() - started < metrics.OCSP_TIMEOUT + 2
    assert parse(res.out)["mtlsctl_ocsp_responder_up"] == [({"url": f"http://127.0.0.1:{port}"}, 0)]
    responder = subprocess.Popen(["openssl", "ocsp", "-index", "index.txt", "-port", str(port), "-rsigner",
                                  "certs/ocsp-responder.crt", "-rkey", "private/ocsp-responder.key", "-CA", "ca/ca.crt",
                                  "-nmin", "1"], cwd=fast_pki, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # no bare connect() to wait for it: a connection without a request makes openssl ocsp spin (FIELD-NOTES)
        for _ in range(50):
            res = cli(fast_pki, "metrics")
            if parse(res.out)["mtlsctl_ocsp_responder_up"][0][1] == 1:
                break
            time.sleep(0.1)
        assert parse(res.out)["mtlsctl_ocsp_responder_up"] == [({"url": f"http://127.0.0.1:{port}"}, 1)]
    finally:
        responder.terminate()
        responder.wait(timeout=10)
    # a responder that accepts and never answers (the spin FIELD-NOTES describe): 0 within the timeout
    with socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", port))
        silent.listen(5)
        started = time.monotonic()
        res = cli(fast_pki, "metrics")
        took = time.monotonic() - started
        assert 2.5 < took < 4.5, took  # stopped after 3 s (openssl's own -timeout 5 would take longer)
        assert parse(res.out)["mtlsctl_ocsp_responder_up"][0][1] == 0


@pytest.mark.needs("promtool")
def test_the_documented_alert_rules_load(tmp_path):
    """docs/operations.md's alert rules: what promtool (Prometheus' own checker) accepts, on the metrics we write."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs/operations.md").read_text()
    section = text.split("### Alert rules", 1)[1]
    rules = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    for name in ("mtlsctl_crl_next_update_seconds", "mtlsctl_certificate_not_after_seconds", "mtlsctl_ca_not_after_seconds",
                 "mtlsctl_renew_last_run_success", "mtlsctl_renew_last_run_timestamp_seconds"):
        assert name in rules
    path = tmp_path / "mtlsctl.rules.yml"
    path.write_text(rules)
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.needs("promtool")
def test_the_documented_alert_rules_fire_when_they_should(tmp_path):
    """promtool test rules: a renewed name (a later valid certificate) does not fire, a lone expiring one does; a CRL
    3 days from its end fires, one 20 days away does not; a renew run 3 days old fires, a failed one fires."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs/operations.md").read_text()
    import yaml

    rules = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text.split("### Alert rules", 1)[1], re.S).group(1))
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations")  # the test compares labels; the words are for people
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    day = 86400
    series = {
        'mtlsctl_crl_next_update_seconds{crl="ca"}': 3 * day,
        'mtlsctl_crl_next_update_seconds{crl="root"}': 20 * day,
        'mtlsctl_certificate_not_after_seconds{name="renewed",serial="10",kind="client",status="valid"}': 5 * day,
        'mtlsctl_certificate_not_after_seconds{name="renewed",serial="11",kind="client",status="valid"}': 365 * day,
        'mtlsctl_certificate_not_after_seconds{name="forgotten",serial="12",kind="server",status="valid"}': 5 * day,
        'mtlsctl_certificate_not_after_seconds{name="gone",serial="13",kind="client",status="revoked"}': 5 * day,
        'mtlsctl_ca_not_after_seconds{ca="ca"}': 3000 * day,
        'mtlsctl_renew_last_run_success': 0,
        'mtlsctl_renew_last_run_timestamp_seconds': 1,
    }
    inputs = "\n".join(f"      - series: '{k}'\n        values: '{v}x180'" for k, v in series.items())
    (tmp_path / "test.yml").write_text(f"""rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{inputs}
    alert_rule_test:
      - eval_time: 2h
        alertname: MtlsctlCertificateExpiringWithoutRenewal
        exp_alerts:
          - exp_labels: {{severity: warning, name: forgotten, kind: server}}
      - eval_time: 2h
        alertname: MtlsctlCrlNextUpdateSoon
        exp_alerts:
          - exp_labels: {{severity: critical, crl: ca}}
      - eval_time: 2h
        alertname: MtlsctlCaExpiresWithinAYear
        exp_alerts: []
      - eval_time: 2h
        alertname: MtlsctlRenewFailed
        exp_alerts:
          - exp_labels: {{severity: warning}}
""")
    check = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_renew_run_that_stops_on_an_error_is_a_failed_run(fast_pki):
    set_profile(fast_pki, nginx={"reload_command": "", "test_command": ""})
    assert cli(fast_pki, "renew", "--no-reload").code == 0
    assert parse(cli(fast_pki, "metrics").out)["mtlsctl_renew_last_run_success"] == [({}, 1)]
    index = (fast_pki / "index.txt").read_bytes()
    (fast_pki / "index.txt").write_bytes(index + b"not a row openssl would write\n")  # renew stops on it, under the lock
    res = cli(fast_pki, "renew", "--no-reload")
    assert res.code == 1, res.err
    (fast_pki / "index.txt").write_bytes(index)
    got = parse(cli(fast_pki, "metrics").out)
    assert got["mtlsctl_renew_last_run_success"] == [({}, 0)] and got["mtlsctl_renew_last_run_failed"] == [({}, 1)]
    last = json.loads((fast_pki / "audit.log").read_text().splitlines()[-1])
    assert (last["command"], last["result"]) == ("renew", "failed") and "index.txt" in last["error"], last


@pytest.mark.parametrize("out,why", [("", "names no file"), (".", "names no file"), ("metrics.txt", "does not end in .prom")])
def test_out_must_name_a_prom_file(fast_pki, tmp_path, monkeypatch, out, why):
    """node_exporter's textfile collector reads only *.prom: any other --out would be written and never read."""
    monkeypatch.chdir(tmp_path)
    res = run_cli(["--pki-dir", str(fast_pki), "metrics", "--out", out])
    assert res.code == 2 and why in res.err, res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pki"]  # nothing written beside the PKI
