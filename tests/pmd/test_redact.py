"""pmd.redact: what counts as a secret, and the log records of the process carrying redacted messages."""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from pmd import redact, storage


def test_secrets_are_masked_and_what_locates_a_store_is_not(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEJr//token")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"secret_key": "opt-secret", "access_key": "AKIAOPT",
                                                        "endpoint_override": "http://10.1.2.3:9000",
                                                        "region": "us-east-1", "client_kwargs": {"pw": "nested1"}}))
    message = ("key wJalrXUtnFEMI/K7MDENG token FQoGZXIvYXdzEJr//token opt-secret AKIAOPT nested1 at "
               "http://127.0.0.1:9000 http://10.1.2.3:9000 in eu-west-3/us-east-1: true; "
               "https://alice:pw@host/a.jpg s3://AKIA:SECRET@bucket/p https:/bob:pw@host/x https://host/@user/x.jpg")
    assert redact.text(message) == ("key *** token *** *** *** *** at http://127.0.0.1:9000 http://10.1.2.3:9000 "
                                    "in eu-west-3/us-east-1: true; https://***@host/a.jpg s3://***@bucket/p "
                                    "https:/***@host/x https://host/@user/x.jpg")
    assert redact.text(redact.text(message)) == redact.text(message)  # idempotent: a manifest rewritten is the same
    assert redact.value({"out": "https://u:p@h/x", "n": 3, "l": ["opt-secret", None]}) == {
        "out": "https://***@h/x", "n": 3, "l": ["***", None]}
    table = pa.table({"image_url": ["https://u:p@h/a.jpg", "http://h/b@c.jpg", None],
                      "text": ["https://u:p@h/", "", ""]})
    assert redact.url_columns(table, ["image_url", "missing"]).to_pydict() == {
        "image_url": ["https://***@h/a.jpg", "http://h/b@c.jpg", None], "text": ["https://u:p@h/", "", ""]}


def test_log_records_are_redacted_whoever_handles_them(monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    redact.install()
    redact.install()  # idempotent
    with caplog.at_level(logging.INFO):
        logging.getLogger("some.library").info("connecting with %s to %s", "s3cr3t-value", "https://u:pw@h/x")
        try:
            raise OSError("https://u:pw@h/y refused")
        except OSError:
            logging.getLogger("other").exception("failed")
    assert caplog.records[0].getMessage() == "connecting with *** to https://***@h/x"
    assert "pw@" not in caplog.text and "s3cr3t" not in caplog.text and "https://***@h/y refused" in caplog.text
