"""Destinations with options (calling AE title, timeouts, TLS) in the YAML file, the lookup of a
queued delivery's options by ``AET@host:port``, the TLS client context, and the sorting of a
peer's answers into transient and permanent failures."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from node.config import ConfigError, Destination, DestinationTLS, load_settings
from node.delivery import (
    Outcome,
    SendStatus,
    Timeouts,
    classify_rejection,
    classify_status,
    destination_timeouts,
    status_meaning,
)
from node.tls import client_context

CA_PEM = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "mednode.yaml"
    path.write_text(text)
    return load_settings(path)


# -- classification ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, Outcome.SUCCESS),
    (0xB000, Outcome.WARNING), (0xB006, Outcome.WARNING), (0xB007, Outcome.WARNING), (0x0107, Outcome.WARNING),
    (None, Outcome.TRANSIENT),  # no response: aborted, or the DIMSE timeout passed
    (0xA700, Outcome.TRANSIENT), (0xA7FF, Outcome.TRANSIENT), (0x0213, Outcome.TRANSIENT), (0xFE00, Outcome.TRANSIENT),
    (0xA900, Outcome.PERMANENT), (0xA9FF, Outcome.PERMANENT),
    (0xC000, Outcome.PERMANENT), (0xC210, Outcome.PERMANENT), (0xCFFF, Outcome.PERMANENT),
    (0x0110, Outcome.PERMANENT), (0x0117, Outcome.PERMANENT), (0x0122, Outcome.PERMANENT), (0x0124, Outcome.PERMANENT),
    (0xA800, Outcome.PERMANENT), (0xD000, Outcome.PERMANENT),  # unknown failures: not "out of resources"
])
def test_store_statuses_are_sorted_by_whether_a_retry_can_help(status: int | None, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


@pytest.mark.parametrize(("result", "outcome"), [
    (1, Outcome.PERMANENT), (2, Outcome.TRANSIENT), (None, Outcome.TRANSIENT), (7, Outcome.TRANSIENT),
])
def test_association_rejections_are_sorted_by_their_result(result: int | None, outcome: Outcome) -> None:
    assert classify_rejection(result) is outcome


def test_a_status_is_described_with_the_standards_words_and_the_peers_comment() -> None:
    refused = SendStatus(Path("x.dcm"), "1.2.3", 0xA900, "SOP class mismatch")
    assert (refused.ok, refused.outcome) == (False, Outcome.PERMANENT)
    assert refused.describe() == "status 0xA900 (data set does not match SOP class): SOP class mismatch"
    busy = SendStatus(Path("x.dcm"), "1.2.3", 0xA702)
    assert (busy.ok, busy.outcome, busy.describe()) == (False, Outcome.TRANSIENT, "status 0xA702 (out of resources)")
    assert SendStatus(Path("x.dcm"), "1.2.3", 0xB000).ok
    assert status_meaning(0xC123) == "cannot understand" and status_meaning(0x0122) == "SOP class not supported"
    lost = SendStatus(Path("x.dcm"), "1.2.3", None, "association aborted")
    assert (lost.ok, lost.outcome, lost.describe()) == (False, Outcome.TRANSIENT, "association aborted")


# -- configuration ----------------------------------------------------------------------------------
def test_a_destination_keeps_its_string_form_and_gains_a_mapping_form(tmp_path: Path) -> None:
    settings = _load(tmp_path, f"""
ae_title: MEDNODE
destination: PACS@10.0.0.5:104
destinations:
  archive: ARCHIVE@10.0.0.6:104
  secure:
    ae_title: ORTHANC
    host: 127.0.0.1
    port: 4242
    calling_ae_title: MEDNODE_OUT
    timeouts: {{acse_s: 5, network_s: 7.5}}
    tls: {{ca_file: {CA_PEM}, server_hostname: pacs.example.org}}
rules:
  - {{name: ct, tasks: [ct_analysis], destinations: [default, secure, "ORTHANC@127.0.0.1:4242"]}}
""")
    secure = settings.destinations["secure"]
    assert str(secure) == "ORTHANC@127.0.0.1:4242"
    assert secure.calling_ae_title == "MEDNODE_OUT"
    assert secure.tls == DestinationTLS(ca_file=CA_PEM, server_hostname="pacs.example.org")
    assert destination_timeouts(secure, Timeouts(30, 120, 60)) == Timeouts(5, 120, 7.5)
    archive = settings.destinations["archive"]
    assert (archive.calling_ae_title, archive.tls) == (None, None)
    assert destination_timeouts(archive, Timeouts(30, 120, 60)) == Timeouts(30, 120, 60)
    # jobs store AET@host:port; the options are found again at send time, inline references too
    assert settings.find_destination("ORTHANC@127.0.0.1:4242") == secure
    assert settings.find_destination("PACS@10.0.0.5:104") == settings.destination
    assert settings.find_destination("OTHER@10.0.0.5:104") is None
    assert settings.resolve_destination("ORTHANC@127.0.0.1:4242") == secure


@pytest.mark.parametrize(("entry", "key", "words"), [
    ("{ae_title: ORTHANC, host: 127.0.0.1, port: 4242, calling_ae_title: MUCH_TOO_LONG_A_TITLE}",
     "destinations.pacs.calling_ae_title", "16 printable characters"),
    ("{ae_title: ORTHANC, host: 127.0.0.1, port: 4242, timeouts: {acse_s: 0}}",
     "destinations.pacs.timeouts.acse_s", "greater than 0"),
    ("{ae_title: ORTHANC, host: 127.0.0.1, port: 4242, timeouts: {dimse: 5}}",
     "destinations.pacs.timeouts.dimse", "Extra inputs"),
    ("{ae_title: ORTHANC, host: 127.0.0.1, port: 70000}", "destinations.pacs.port", "65535"),
    ("{ae_title: ORTHANC, host: 127.0.0.1}", "destinations.pacs.port", "Field required"),
    ("{ae_title: ORTHANC, host: 127.0.0.1, port: 4242, tls: {cert_file: /a.pem}}",
     "destinations.pacs.tls.ca_file", "Field required"),
    ("{ae_title: ORTHANC, host: 127.0.0.1, port: 4242, tls: {ca_file: /ca.pem, cert_file: /a.pem}}",
     "destinations.pacs.tls", "both cert_file and key_file"),
    ("{ae_title: ORTHANC, host: 127.0.0.1, port: 4242, callingae: X}", "destinations.pacs.callingae", "Extra inputs"),
])
def test_a_bad_destination_option_is_refused_naming_its_key(tmp_path: Path, entry: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, f"destinations:\n  pacs: {entry}\n")
    message = str(raised.value)
    assert key in message and words in message, message


def test_one_address_with_two_sets_of_options_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, """
destination: ORTHANC@127.0.0.1:4242
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242, calling_ae_title: OTHER}
""")
    assert "destinations.pacs" in str(raised.value) and "ORTHANC@127.0.0.1:4242" in str(raised.value)
    # the same address twice with the same options is fine
    same = _load(tmp_path, "destination: ORTHANC@127.0.0.1:4242\ndestinations:\n  pacs: ORTHANC@127.0.0.1:4242\n")
    assert same.find_destination("ORTHANC@127.0.0.1:4242") == Destination.parse("ORTHANC@127.0.0.1:4242")


def test_the_default_destination_has_a_mapping_form_too(tmp_path: Path) -> None:
    settings = _load(tmp_path, "destination: {ae_title: PACS, host: 10.0.0.5, port: 104, calling_ae_title: OUT}\n")
    assert settings.destination is not None and settings.destination.calling_ae_title == "OUT"
    assert [str(settings.resolve_destination(d)) for d in settings.effective_rules[0].destinations] == \
        ["PACS@10.0.0.5:104"]


# -- TLS client context -----------------------------------------------------------------------------
def test_the_tls_client_context_verifies_the_peer_with_tls_1_2_or_later() -> None:
    context = client_context(DestinationTLS(ca_file=CA_PEM))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_missing_or_unreadable_tls_files_name_their_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"destinations\.pacs\.tls\.ca_file: file not found"):
        client_context(DestinationTLS(ca_file=tmp_path / "nope.pem"), key="destinations.pacs.tls")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls\.ca_file: cannot load CA certificates"):
        client_context(DestinationTLS(ca_file=garbage))
    with pytest.raises(ConfigError, match=r"tls\.cert_file/tls\.key_file: cannot load"):
        client_context(DestinationTLS(ca_file=CA_PEM, cert_file=garbage, key_file=garbage))
