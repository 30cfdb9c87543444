"""Secrets stay out (issue 24 item 6): a distinct secret planted in each place a user can give one (a
--storage-option, PMD_STORAGE_OPTIONS, the AWS_* variables, a user:pass@ URL in a source's metadata, in an input
and in OUT) is found in none of the files `pmd build`, `pmd verify`, `pmd stats --report`, `pmd export` and
`flava train` write (on S3 and locally, compressed files decoded), nor in their stdout and stderr (debug logging
on, pool workers' output included)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pmd import redact, storage
from pmd_cli.pmd import main
from tests.pipelines.build_fixtures import make_coco
from tests.s3server import s3_server

pytestmark = pytest.mark.slow

SECRETS = {
    "--storage-option": "Opt-Cli-Secret-41d7",
    "--storage-option access_key": "Opt-Cli-Access-9c02",
    "PMD_STORAGE_OPTIONS": "Opt-Env-Token-5e81",
    "AWS_SECRET_ACCESS_KEY": "Aws-Env-Secret-77b3",
    "AWS_ACCESS_KEY_ID": "Aws-Env-KeyId-0a6f",
    "url in metadata": "Url-Meta-Pass-3b19",
    "url in a rejected record": "Url-Reject-Pass-c4e2",
    "url in an input": "Url-Input-Pass-8d55",
    "url in OUT": "Url-Out-Pass-f160",
}


def _texts(name: str, data: bytes) -> list[str]:
    """What a file says, compressed formats decoded (a Parquet or Arrow column compresses the secret away)."""
    texts = [data.decode("utf-8", errors="ignore")]
    if name.endswith(".parquet"):
        texts.append(json.dumps(pq.read_table(pa.BufferReader(data)).drop_columns(
            [c for c in ("image",) if c in pq.read_schema(pa.BufferReader(data)).names]).to_pylist(), default=str))
    elif name.endswith(".arrow"):
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        texts.append(json.dumps(table.select([f.name for f in table.schema if f.type != pa.binary()]).to_pylist(),
                                default=str))
    elif name.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            texts += [tar.extractfile(m).read().decode("utf-8", errors="ignore") for m in tar.getmembers()
                      if not m.name.endswith(".jpg")]
    return texts


def _local_files(root: Path) -> dict[str, list[str]]:
    return {str(p): _texts(p.name, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def _bucket_files(env: dict) -> dict[str, list[str]]:
    s3 = pafs.S3FileSystem(access_key="x", secret_key="y", region="us-east-1",
                           endpoint_override=env["AWS_ENDPOINT_URL"])
    found = {}
    for info in s3.get_file_info(pafs.FileSelector("pmd", recursive=True)):
        if info.type == pafs.FileType.File:
            with s3.open_input_stream(info.path) as f:
                found[f"s3://{info.path}"] = _texts(info.path, f.read())
    return found


def test_no_secret_in_any_file_or_output(tmp_path, monkeypatch, capfd):
    from pmd_cli.flava import main as flava_main

    with s3_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["AWS_SECRET_ACCESS_KEY"])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRETS["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"session_token": SECRETS["PMD_STORAGE_OPTIONS"]}))
        monkeypatch.setenv("PMD_WORK_CACHE", str(tmp_path / "work-cache"))
        options = ["--storage-option", f"secret_key={SECRETS['--storage-option']}",
                   "--storage-option", f"access_key={SECRETS['--storage-option access_key']}"]
        coco = make_coco(tmp_path / "in", n_images=12)
        tsv = tmp_path / "in" / "cc12m.tsv"
        tsv.write_text(f"http://user:{SECRETS['url in metadata']}@127.0.0.1:9/img/1.jpg\ta photo with a password\n"
                       f"ftp://user:{SECRETS['url in a rejected record']}@127.0.0.1/x.jpg\tnot an http url\n")
        config = tmp_path / "build.toml"
        config.write_text('shard_rows = 16\nchunk_rows = 8\nseed = 1\nexecutor = "pool"\nnum_cpus = 2\n'
                          "[download]\ntimeout = 2\nallow_networks = [\"127.0.0.1/32\"]\n"
                          f'[[sources]]\nname = "conceptual_12m"\ninputs = ["{tsv}"]\n'
                          f'[[sources]]\nname = "coco"\ninputs = ["{coco.karpathy}"]\n'
                          f'images = ["{coco.zips[0]}", "{coco.zips[1]}"]\n')
        out = "s3://pmd/secret-build"
        assert main(["-v", "build", "--config", str(config), "--out", out, *options]) == 0
        storage.set_options({"session_token": SECRETS["PMD_STORAGE_OPTIONS"]})  # what the command line added
        assert main(["-v", "verify", out, *options]) == 0
        assert main(["-v", "stats", out, "--report", str(tmp_path / "report"), "--json", *options]) == 0
        assert main(["-v", "export", out, "--format", "webdataset", "--out", str(tmp_path / "wds"), "-q",
                     *options]) == 0
        storage.add_options([o for o in options if o != "--storage-option"])  # flava train reads the env only
        assert flava_main(["train", "--config", "tiny", "--data", out, "--out", str(tmp_path / "run"),
                           "--steps", "2", "run.progress=false", "run.tensorboard=true", "data.num_workers=0",
                           "run.export_final=false", "run.micro_batch_size=4"]) == 0
        # A user:pass@ URL as an input and as OUT: refused, and the refusal does not repeat the password.
        assert main(["build", "conceptual_12m", f"https://u:{SECRETS['url in an input']}@127.0.0.1:9/cc12m.tsv",
                     "--out", str(tmp_path / "other")]) != 0
        assert main(["stats", f"memory://u:{SECRETS['url in OUT']}@bucket/build"]) != 0
        files = {**_local_files(tmp_path / "work-cache"), **_local_files(tmp_path / "report"),
                 **_local_files(tmp_path / "wds"), **_local_files(tmp_path / "run"), **_local_files(tmp_path / "other"),
                 **_bucket_files(env)}
    captured = capfd.readouterr()
    files["stdout"], files["stderr"] = [captured.out], [captured.err]

    leaks = {where: name for name, texts in files.items() for where, secret in SECRETS.items()
             if any(secret in t for t in texts)}
    assert leaks == {}
    # The search can see: the planted rows are there, redacted; the outputs are not empty.
    everything = "\n".join(t for texts in files.values() for t in texts)
    assert f"http://{redact.MASK}@127.0.0.1:9/img/1.jpg" in everything  # the failure row of the metadata URL
    assert f"ftp://{redact.MASK}@127.0.0.1/x.jpg" in everything  # the reject's record
    assert any(name.endswith(".tar") for name in files) and any("shards/shard-" in name for name in files)
    assert any("events.out.tfevents" in name for name in files), sorted(files)
    assert f"pmd stats: error: memory://{redact.MASK}@bucket/build" in captured.err
    assert f"https://{redact.MASK}@127.0.0.1:9/cc12m.tsv does not exist" in captured.err
