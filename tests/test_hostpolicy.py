"""The host policy (SSRF): which addresses the S3 and HTTP backends may connect to.

Nothing here sends a packet beyond loopback, not even to show that a host is refused
(something answers at 169.254.169.254 on the machines this runs on): names resolve through a
stubbed resolver (``metadata.test`` is 169.254.169.254, ``files.test`` is 127.0.0.1, ...),
the suite's socket guard fails a test on any connect() outside loopback, and
``test_module_passes_in_a_network_namespace_of_its_own`` runs this whole module again where
nothing but loopback exists.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import vmstore._hostpolicy as hostpolicy
from vmstore import (
    DownloadRequest,
    ErrorType,
    InvalidConfigError,
    NetworkError,
    PermissionDeniedError,
    Storage,
    StorageConfig,
    UploadRequest,
    new_storage,
)
from vmstore._hostpolicy import HostPolicy, literal_address

from tests.http_servers import Nginx, PlainServer, running_nginx
from tests.s3_servers import S3Server, running_s3_server, unique_prefix
from tests.socket_guard import SocketGuard, is_loopback
from tests.support import KiB, random_bytes, write_file

IN_NETNS = "VMSTORE_TEST_IN_NETNS"
METADATA = "169.254.169.254"


# --- the stub resolver ----------------------------------------------------------------------


@dataclass
class StubResolver:
    """``socket.getaddrinfo`` for made-up names; anything else is not resolved at all."""

    names: dict[str, list[list[str]]] = field(default_factory=dict)
    """name -> the answers of successive lookups (the last one repeats)."""
    lookups: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self, host: str, port: Any, family: int = 0, type: int = 0, *rest: Any
    ) -> list[tuple[Any, ...]]:
        name = host.rstrip(".").lower()
        with self.lock:
            answers = self.names.get(name)
            if answers is None:
                raise socket.gaierror(socket.EAI_NONAME, f"stub resolver: unknown name {host}")
            count = sum(1 for seen in self.lookups if seen == name)
            self.lookups.append(name)
        addresses = answers[min(count, len(answers) - 1)]
        infos: list[tuple[Any, ...]] = []
        for text in addresses:
            address = ipaddress.ip_address(text)
            if address.version == 4:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, int(port))))
            else:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (text, int(port), 0, 0)))
        return infos

    def count(self, name: str) -> int:
        with self.lock:
            return self.lookups.count(name)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> StubResolver:
    stub = StubResolver(
        {
            "files.test": [["127.0.0.1"]],
            "s3.test": [["127.0.0.1"]],
            "other.test": [["127.0.0.1"]],
            "localhost": [["127.0.0.1"]],
            "metadata.test": [[METADATA]],
            "mapped.test": [["::ffff:169.254.169.254"]],
            "linklocal6.test": [["fe80::1"]],
            "mixed.test": [["127.0.0.1", METADATA]],
            "rebind.test": [["127.0.0.1"], [METADATA]],
        }
    )
    monkeypatch.setattr(hostpolicy, "default_resolver", stub)
    return stub


@pytest.fixture(autouse=True)
def no_real_name_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that reached the system resolver would be a DNS query leaving the machine."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        text = host.decode() if isinstance(host, bytes) else str(host)
        if text and literal_address(text) is None and text != "localhost":
            raise AssertionError(f"a real name lookup of {text!r} (use the stub resolver)")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSTORE_STATE_DIR", str(tmp_path / "state"))
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


def refused(call: Callable[[], object]) -> PermissionDeniedError:
    with pytest.raises(PermissionDeniedError) as info:
        call()
    assert info.value.type is ErrorType.PERMISSION_DENIED
    return info.value


# --- the rules, without any connection ------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address", "rule"),
    [
        (METADATA, METADATA, "link-local"),
        ("169.254.0.1", "169.254.0.1", "link-local"),
        ("::ffff:169.254.169.254", METADATA, "link-local"),
        ("[::ffff:a9fe:a9fe]", METADATA, "link-local"),
        ("64:ff9b::a9fe:a9fe", METADATA, "link-local"),
        ("::169.254.169.254", METADATA, "link-local"),
        ("2852039166", METADATA, "link-local"),
        ("0xa9fea9fe", METADATA, "link-local"),
        ("0251.0376.0251.0376", METADATA, "link-local"),
        ("169.254.43518", METADATA, "link-local"),
        ("169.254.169.254.", METADATA, "link-local"),
        ("fe80::1", "fe80::1", "link-local"),
        ("fe80::1%lo", "fe80::1", "link-local"),
        ("0.0.0.0", "0.0.0.0", "unspecified"),
        ("0", "0.0.0.0", "unspecified"),
        ("::", "::", "unspecified"),
        ("224.0.0.1", "224.0.0.1", "multicast"),
        ("239.255.255.250", "239.255.255.250", "multicast"),
        ("ff02::1", "ff02::1", "multicast"),
        ("255.255.255.255", "255.255.255.255", "broadcast"),
    ],
)
def test_default_policy_refuses_address_in_every_spelling(
    host: str, address: str, rule: str
) -> None:
    error = refused(lambda: HostPolicy().check_host(host))
    assert host.strip("[]") in error.message
    assert f"({address})" in error.message or host == address
    assert rule in error.message
    assert "list the host (or a CIDR holding its address) in StorageConfig.allowed_hosts" in (
        error.message
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.1.2.3", "192.168.0.1", "fd00::1"])
def test_default_policy_allows_ordinary_addresses(host: str) -> None:
    HostPolicy().check_host(host)
    HostPolicy().check_address(host, ipaddress.ip_address(host))


def test_every_resolved_address_is_checked(resolver: StubResolver) -> None:
    policy = HostPolicy()
    error = refused(lambda: policy.resolve("mixed.test", 80))
    assert "mixed.test (169.254.169.254)" in error.message
    error = refused(lambda: policy.resolve("mapped.test", 80))
    assert "mapped.test (169.254.169.254)" in error.message
    refused(lambda: policy.resolve("linklocal6.test", 80))
    assert policy.resolve("files.test", 80) == [
        (socket.AF_INET, socket.SOCK_STREAM, 6, ("127.0.0.1", 80))
    ]


def test_allowed_hosts_names_and_cidrs() -> None:
    policy = HostPolicy(["files.test", "*.buckets.test", "10.0.0.0/8", "fd00::/8", "192.0.2.7"])
    ip = ipaddress.ip_address
    # A listed name permits whatever it resolves to, link-local included.
    assert policy.refusal("files.test", ip(METADATA)) is None
    assert policy.refusal("FILES.test.", ip("127.0.0.1")) is None
    assert policy.refusal("a.buckets.test", ip("127.0.0.1")) is None
    assert policy.refusal("buckets.test", ip("127.0.0.1")) is not None
    # A CIDR permits its addresses, whatever the name.
    assert policy.refusal("any.test", ip("10.9.8.7")) is None
    assert policy.refusal("any.test", ip("::ffff:10.9.8.7")) is None
    assert policy.refusal("any.test", ip("fd12::1")) is None
    assert policy.refusal("any.test", ip("192.0.2.7")) is None
    # Everything else is refused, loopback too.
    for address in ("127.0.0.1", "::1", "192.0.2.8", "11.0.0.1"):
        assert policy.refusal("any.test", ip(address)) is not None
    refused(lambda: policy.check_host("127.0.0.1"))
    policy.check_host("10.0.0.1")


def test_allowed_hosts_idna_names_and_mapped_cidrs() -> None:
    """urllib3 connects with the IDNA form of a name; an IPv4-mapped CIDR is its IPv4 net."""
    policy = HostPolicy(["bücher.example", "::ffff:10.0.0.0/104"])
    ip = ipaddress.ip_address
    assert policy.refusal("xn--bcher-kva.example", ip("192.0.2.1")) is None
    assert policy.refusal("Bücher.Example.", ip("192.0.2.1")) is None
    assert policy.refusal("any.test", ip("10.1.2.3")) is None
    assert policy.refusal("any.test", ip("::ffff:10.1.2.3")) is None
    assert policy.refusal("any.test", ip("11.1.2.3")) is not None


def test_allowed_hosts_without_cidrs_refuses_unlisted_names_without_resolving(
    resolver: StubResolver,
) -> None:
    policy = HostPolicy(["files.test"])
    error = refused(lambda: policy.resolve("other.test", 80))
    assert "other.test" in error.message and "not in StorageConfig.allowed_hosts" in error.message
    assert resolver.count("other.test") == 0
    assert policy.resolve("files.test", 80)[0][3] == ("127.0.0.1", 80)


@pytest.mark.parametrize(
    "entries",
    [
        ["10.0.0.1/8"],
        ["10.0.0.0/33"],
        ["fd00::/200"],
        ["999.1.1.1"],
        ["https://s3.example.com"],
        ["s3.example.com:443"],
        ["bad..name"],
        [""],
        [],
        [42],
        7,
    ],
)
def test_bad_allowed_hosts_is_invalid_config(entries: Any) -> None:
    with pytest.raises(InvalidConfigError, match="allowed_hosts"):
        StorageConfig(type="http", endpoint="http://127.0.0.1:1", allowed_hosts=entries)


def test_allowed_hosts_from_environment_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    config = StorageConfig.from_env(
        environ={"VMSTORE_TYPE": "http", "VMSTORE_ALLOWED_HOSTS": " files.test, 10.0.0.0/8 ,"}
    )
    assert config.allowed_hosts == ["files.test", "10.0.0.0/8"]
    assert StorageConfig.from_env(environ={"VMSTORE_TYPE": "http"}).allowed_hosts is None
    with pytest.raises(InvalidConfigError, match="allowed_hosts"):
        StorageConfig.from_env(
            environ={"VMSTORE_TYPE": "s3", "VMSTORE_ALLOWED_HOSTS": "1.2.3.4/40"}
        )

    from vmstore.cli._parser import build_parser

    args = build_parser().parse_args(
        ["stat", "--allowed-hosts", "files.test,127.0.0.0/8", "http://files.test/x"]
    )
    assert args.allowed_hosts == ["files.test", "127.0.0.0/8"]


# --- HTTP: a server on 127.0.0.1 reached through stubbed names --------------------------------


@pytest.fixture
def plain() -> Iterator[PlainServer]:
    with PlainServer() as server:
        yield server


def http_store(endpoint: str, **changes: Any) -> Storage:
    return new_storage(StorageConfig(type="http", endpoint=endpoint, max_retries=1, **changes))


def test_http_reaches_a_stubbed_name_at_the_address_it_checked(
    plain: PlainServer, resolver: StubResolver, socket_guard: SocketGuard, tmp_path: Path
) -> None:
    data = random_bytes(300 * KiB, seed=1)
    plain.put_file("disk.img", data)
    with http_store(f"http://files.test:{plain.port}", allowed_hosts=["files.test"]) as store:
        store.download(DownloadRequest("/disk.img", destination_path=str(tmp_path / "d")))
    assert (tmp_path / "d").read_bytes() == data
    assert set(socket_guard.connects_to(plain.port)) == {"127.0.0.1"}
    # The name, not the address, is what the server was asked for.
    assert {r.headers.get("Host") for r in plain.requests()} == {f"files.test:{plain.port}"}


def test_http_name_not_in_allowed_hosts_is_refused_before_any_connect(
    plain: PlainServer, resolver: StubResolver, socket_guard: SocketGuard, tmp_path: Path
) -> None:
    plain.put_file("disk.img", b"x" * 10)
    error = refused(lambda: http_store(f"http://files.test:{plain.port}", allowed_hosts=["x.test"]))
    assert "files.test" in error.message
    # With a CIDR listed the name may still resolve into it: refused when it connects.
    with http_store(f"http://files.test:{plain.port}", allowed_hosts=["10.0.0.0/8"]) as store:
        error = refused(lambda: store.get_metadata("/disk.img"))
    assert "files.test (127.0.0.1)" in error.message
    # Loopback is reachable only when listed: the address itself is refused too.
    error = refused(lambda: http_store(plain.base, allowed_hosts=["other.test"]))
    assert "127.0.0.1" in error.message
    assert socket_guard.connects_to(plain.port) == [] and plain.requests() == []


@pytest.mark.parametrize("name", ["metadata.test", "mapped.test", "mixed.test", "linklocal6.test"])
def test_http_name_resolving_to_link_local_is_refused(
    name: str, resolver: StubResolver, socket_guard: SocketGuard, tmp_path: Path
) -> None:
    with http_store(f"http://{name}:8080") as store:
        error = refused(lambda: store.get_metadata("/latest/meta-data/iam"))
        assert name in error.message and "link-local" in error.message
        refused(
            lambda: store.download(
                DownloadRequest(source_url=f"http://{name}/x", destination_path=str(tmp_path / "x"))
            )
        )
    assert socket_guard.connects == []
    assert not (tmp_path / "x").exists()
    assert resolver.count(name) == 2  # once per call: a refusal is not retried


@pytest.mark.parametrize(
    "url",
    [
        f"http://{METADATA}/latest/meta-data/iam",
        "http://[::ffff:169.254.169.254]/latest/x",
        "http://2852039166/latest/x",
        "http://0xa9fea9fe/x",
        "http://0.0.0.0:9/x",
        "http://[::]:9/x",
        "http://224.0.0.1/x",
        "http://255.255.255.255/x",
    ],
)
def test_http_url_with_a_refused_literal_host(
    url: str, plain: PlainServer, resolver: StubResolver, socket_guard: SocketGuard
) -> None:
    with http_store(plain.base) as store, pytest.raises(PermissionDeniedError):
        store.get_metadata(url)
    assert socket_guard.connects == []


def test_http_mapped_literal_is_judged_as_ipv4_and_connected_as_written(
    plain: PlainServer, socket_guard: SocketGuard
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    plain.put_file("disk.img", b"12345")
    endpoint = f"http://[::ffff:127.0.0.1]:{plain.port}"
    with http_store(endpoint, allowed_hosts=["127.0.0.0/8"]) as store:
        assert store.get_metadata("/disk.img").size == 5
    connected = [ipaddress.ip_address(host) for host in socket_guard.connects_to(plain.port)]
    assert connected == [ipaddress.ip_address("::ffff:127.0.0.1")]  # IPv6, as written
    refused(lambda: http_store(endpoint, allowed_hosts=["::1"]))


def test_http_endpoint_refused_when_the_store_is_built(resolver: StubResolver) -> None:
    error = refused(lambda: http_store(f"http://{METADATA}"))
    assert METADATA in error.message and "link-local" in error.message
    refused(lambda: http_store("http://[fe80::1]:8080"))


def test_http_redirect_to_a_refused_host_is_refused_before_connecting(
    resolver: StubResolver, socket_guard: SocketGuard, tmp_path: Path
) -> None:
    targets = {
        "/to-metadata/": "http://metadata.test/latest/",
        "/to-literal/": f"http://{METADATA}/latest/",
        "/to-mapped/": "http://[::ffff:169.254.169.254]/latest/x",
        "/to-other/": "http://other.test:1/",
    }
    with PlainServer(redirects=targets) as server:
        server.put_file("ok.img", b"fine")
        with http_store(f"http://files.test:{server.port}") as store:
            for prefix in ("/to-metadata/", "/to-literal/", "/to-mapped/"):
                error = refused(lambda prefix=prefix: store.get_metadata(prefix + "x"))
                assert METADATA in error.message
        with http_store(f"http://files.test:{server.port}", allowed_hosts=["files.test"]) as store:
            error = refused(
                lambda: store.download(
                    DownloadRequest(source_url="/to-other/x", destination_path=str(tmp_path / "o"))
                )
            )
            assert "other.test" in error.message
            assert store.get_metadata("/ok.img").size == 4
    assert {host for host, _ in socket_guard.connects} == {"127.0.0.1"}
    # Resolved once and refused on what it resolved to; an unlisted name is not even resolved.
    assert resolver.count("metadata.test") == 1 and resolver.count("other.test") == 0


@pytest.mark.parametrize("concurrency", [1, 4])
def test_http_rebinding_name_is_connected_to_the_checked_address_only(
    concurrency: int,
    plain: PlainServer,
    resolver: StubResolver,
    socket_guard: SocketGuard,
    tmp_path: Path,
) -> None:
    """rebind.test is 127.0.0.1 on the first lookup and 169.254.169.254 afterwards. With one
    connection (kept alive) the transfer goes to 127.0.0.1 on the one checked lookup; with
    four, the second connection's lookup is refused. Never a connect to 169.254.x."""
    data = random_bytes(2 << 20, seed=3)
    plain.put_file("disk.img", data)
    dest = tmp_path / "d"
    store = http_store(
        f"http://rebind.test:{plain.port}", chunk_size=256 * KiB, concurrency=concurrency
    )
    with store:
        if concurrency == 1:
            store.download(DownloadRequest("/disk.img", destination_path=str(dest)))
            assert dest.read_bytes() == data
            assert resolver.count("rebind.test") == 1
        else:
            error = refused(
                lambda: store.download(DownloadRequest("/disk.img", destination_path=str(dest)))
            )
            assert "rebind.test (169.254.169.254)" in error.message
            assert not dest.exists()
    assert {host for host, _ in socket_guard.connects} == {"127.0.0.1"}


def test_http_proxy_target_is_resolved_and_checked_here(
    plain: PlainServer,
    resolver: StubResolver,
    socket_guard: SocketGuard,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through a proxy, the proxy connects to the target: its name is checked here first."""
    monkeypatch.setenv("http_proxy", plain.base)
    monkeypatch.setenv("no_proxy", "")
    with http_store("http://metadata.test") as store:
        refused(lambda: store.get_metadata("/latest/x"))
    assert resolver.count("metadata.test") == 1
    assert socket_guard.connects == [] and plain.requests() == []


def test_s3_proxy_target_is_resolved_and_checked_on_every_request(
    plain: PlainServer,
    resolver: StubResolver,
    socket_guard: SocketGuard,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore takes its proxy from the environment once, at client creation; the policy
    decides "through a proxy" once per host too, but still resolves and checks the target's
    name before every request (it may have changed to a refused address since)."""
    monkeypatch.setenv("http_proxy", plain.base)
    monkeypatch.setenv("no_proxy", "")
    store = new_storage(
        StorageConfig(
            type="s3",
            endpoint="http://metadata.test:9000",
            bucket="b",
            access_key="k",
            secret_key="s",
            region="us-east-1",
            max_retries=1,
        )
    )
    with store:
        refused(lambda: store.get_metadata("/x"))
        refused(lambda: store.get_metadata("/y"))
    assert resolver.count("metadata.test") == 2
    assert socket_guard.connects == [] and plain.requests() == []


# --- real servers: nginx and an S3 server ----------------------------------------------------


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with running_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server("rclone", tmp_path_factory.mktemp("rclone")) as server:
        yield server


def nginx_store(nginx: Nginx, base: str, name: str, **changes: Any) -> Storage:
    endpoint = base.replace("127.0.0.1", name)
    values: dict[str, Any] = {"type": "http", "token": nginx.token, "max_retries": 1, **changes}
    return new_storage(StorageConfig(endpoint=endpoint, **values))


def s3_store(server: S3Server, name: str, **changes: Any) -> Storage:
    return new_storage(
        StorageConfig(
            type="s3",
            endpoint=server.endpoint.replace("127.0.0.1", name),
            bucket=server.bucket,
            access_key=server.access_key,
            secret_key=server.secret_key,
            region="us-east-1",
            max_retries=1,
            **changes,
        )
    )


def round_trip(store: Storage, url: str, tmp_path: Path) -> None:
    data = random_bytes(200 * KiB, seed=7)
    source = write_file(tmp_path / "src.img", data)
    store.upload(UploadRequest(source_path=str(source), destination_url=url))
    store.download(DownloadRequest(source_url=url, destination_path=str(tmp_path / "dst.img")))
    assert (tmp_path / "dst.img").read_bytes() == data


def test_nginx_through_an_allowed_name(
    nginx: Nginx, resolver: StubResolver, socket_guard: SocketGuard, tmp_path: Path
) -> None:
    with nginx_store(nginx, nginx.http_base, "files.test", allowed_hosts=["files.test"]) as store:
        round_trip(store, f"/{nginx.area()}/disk.img", tmp_path)
    assert {host for host, _ in socket_guard.connects} == {"127.0.0.1"}
    refused(lambda: nginx_store(nginx, nginx.http_base, "files.test", allowed_hosts=["x.test"]))


def test_nginx_redirect_to_an_unlisted_host_is_refused(
    nginx: Nginx, resolver: StubResolver, socket_guard: SocketGuard
) -> None:
    """nginx's /elsewhere/ answers 302 to its recorder on 127.0.0.2, which is not listed."""
    with nginx_store(nginx, nginx.http_base, "files.test", allowed_hosts=["files.test"]) as store:
        error = refused(lambda: store.get_metadata("/elsewhere/disk.img"))
    assert "127.0.0.2" in error.message
    assert nginx.recorder.requests() == []
    assert "127.0.0.2" not in {host for host, _ in socket_guard.connects}


def test_https_certificate_is_verified_against_the_name_not_the_address(
    nginx: Nginx, resolver: StubResolver, socket_guard: SocketGuard, tmp_path: Path
) -> None:
    """The certificate names localhost and 127.0.0.1. Reached as localhost it verifies; as
    other.test (which resolves to 127.0.0.1 too) it must not: TLS checks the name asked for."""
    ca = str(nginx.ca_cert)
    with nginx_store(nginx, nginx.https_base, "localhost", ca_bundle=ca, type="https") as store:
        round_trip(store, f"/{nginx.area()}/tls.img", tmp_path)
    with (
        nginx_store(nginx, nginx.https_base, "other.test", ca_bundle=ca, type="https") as store,
        pytest.raises(NetworkError, match="certificate verify failed"),
    ):
        store.get_metadata(f"/{nginx.area()}/tls.img")
    assert {host for host, _ in socket_guard.connects} == {"127.0.0.1"}


def test_s3_through_an_allowed_name(
    s3_server: S3Server, resolver: StubResolver, socket_guard: SocketGuard, tmp_path: Path
) -> None:
    with s3_store(s3_server, "s3.test", allowed_hosts=["s3.test"]) as store:
        round_trip(store, f"s3://{s3_server.bucket}/{unique_prefix()}/disk.img", tmp_path)
    assert {host for host, _ in socket_guard.connects} == {"127.0.0.1"}
    assert resolver.count("s3.test") >= 1


def test_s3_unlisted_endpoint_is_refused(
    s3_server: S3Server, resolver: StubResolver, socket_guard: SocketGuard
) -> None:
    error = refused(lambda: s3_store(s3_server, "s3.test", allowed_hosts=["other.test"]))
    assert "s3.test" in error.message
    with s3_store(s3_server, "s3.test", allowed_hosts=["10.0.0.0/8"]) as store:
        error = refused(lambda: store.get_metadata(f"s3://{s3_server.bucket}/x"))
        assert "s3.test (127.0.0.1)" in error.message
    assert socket_guard.connects == []


@pytest.mark.parametrize("concurrency", [1, 4])
def test_s3_rebinding_endpoint_never_reaches_link_local(
    concurrency: int,
    s3_server: S3Server,
    resolver: StubResolver,
    socket_guard: SocketGuard,
    tmp_path: Path,
) -> None:
    """As for HTTP: the one checked lookup serves a kept-alive connection; any later
    connection's lookup (169.254.169.254) is refused, not retried, never connected."""
    url = f"s3://{s3_server.bucket}/{unique_prefix()}/disk.img"
    data = random_bytes(12 << 20, seed=8)  # three 5 MiB parts: four connections at once
    source = write_file(tmp_path / "src.img", data)
    dest = tmp_path / "dst.img"
    with s3_store(s3_server, "rebind.test", concurrency=concurrency, chunk_size=5 << 20) as store:
        if concurrency == 1:
            store.upload(UploadRequest(source_path=str(source), destination_url=url))
            store.download(DownloadRequest(source_url=url, destination_path=str(dest)))
            assert dest.read_bytes() == data
            assert resolver.count("rebind.test") == 1
        else:
            error = refused(
                lambda: store.upload(UploadRequest(source_path=str(source), destination_url=url))
            )
            assert "rebind.test (169.254.169.254)" in error.message
    assert {host for host, _ in socket_guard.connects} == {"127.0.0.1"}


# --- the same refusal on S3 and HTTP ---------------------------------------------------------


def _open(kind: str, endpoint: str, **changes: Any) -> Storage:
    if kind == "s3":
        return new_storage(
            StorageConfig(
                type="s3",
                endpoint=endpoint,
                bucket="b",
                access_key="k",
                secret_key="s",
                region="us-east-1",
                **changes,
            )
        )
    return new_storage(StorageConfig(type="http", endpoint=endpoint, **changes))


def _probe_url(kind: str) -> str:
    return "s3://b/disk.img" if kind == "s3" else "/disk.img"


@pytest.mark.parametrize("kind", ["s3", "http"])
@pytest.mark.parametrize(
    ("endpoint", "changes", "words"),
    [
        (f"http://{METADATA}", {}, [METADATA, "link-local"]),
        ("http://metadata.test:8080", {}, ["metadata.test (169.254.169.254)", "link-local"]),
        ("http://mapped.test:8080", {}, ["mapped.test (169.254.169.254)", "link-local"]),
        ("http://[ff02::1]:8080", {}, ["ff02::1", "multicast"]),
        ("http://0.0.0.0:8080", {}, ["0.0.0.0", "unspecified"]),
        ("http://files.test:8080", {"allowed_hosts": ["other.test"]}, ["files.test"]),
        ("http://files.test:8080", {"allowed_hosts": ["10.0.0.0/8"]}, ["files.test (127.0.0.1)"]),
    ],
)
def test_same_refusal_on_s3_and_http(
    kind: str,
    endpoint: str,
    changes: dict[str, Any],
    words: list[str],
    resolver: StubResolver,
    socket_guard: SocketGuard,
) -> None:
    """Refused when the store is built or on its first call, as PermissionDeniedError with the
    same message on both backends; never retried, never connected."""

    def build_and_call() -> None:
        with _open(kind, endpoint, max_retries=3, **changes) as store:
            store.get_metadata(_probe_url(kind))

    error = refused(build_and_call)
    for word in words:
        assert word in error.message
    assert "StorageConfig.allowed_hosts" in error.message
    assert socket_guard.connects == []
    assert len(resolver.lookups) <= 1


def test_a_botocore_without_the_expected_session_fails_closed() -> None:
    """If botocore's URLLib3Session ever changes shape, no S3 store is built without the
    policy: InvalidConfigError instead of connections that bypass it."""

    class Changed:
        _endpoint = type("Endpoint", (), {"http_session": object()})()

    with pytest.raises(InvalidConfigError, match="host policy"):
        hostpolicy.install_on_boto3_client(Changed(), HostPolicy())


def test_nfs_has_no_hosts(share: Path, tmp_path: Path) -> None:
    with new_storage(StorageConfig(type="nfs", endpoint=str(share), allowed_hosts=["x.test"])) as s:
        round_trip(s, "nfs://disk.img", tmp_path)


def test_cli_allowed_hosts_flag_and_environment(vmstore_cmd: str, tmp_path: Path) -> None:
    """Refused when the store is built (a literal 127.0.0.1 that the list does not hold), so
    the child process never connects; exit status 4 as for any PermissionDenied."""
    env = {**os.environ, "VMSTORE_STATE_DIR": str(tmp_path / "state")}
    url = "http://127.0.0.1:9/disk.img"

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [vmstore_cmd, *args],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=120,
            check=False,
        )

    flag = run("stat", "--allowed-hosts", "files.test,10.0.0.0/8", url)
    assert flag.returncode == 4, flag.stderr
    assert "127.0.0.1" in flag.stderr and "--allowed-hosts" in flag.stderr
    environ = run("stat", url, VMSTORE_ALLOWED_HOSTS="files.test")
    assert environ.returncode == 4, environ.stderr
    bad = run("stat", "--allowed-hosts", "10.0.0.0/99", url)
    assert bad.returncode == 7 and "--allowed-hosts" in bad.stderr, bad.stderr


# --- the whole module again, where only loopback exists --------------------------------------


def _netns_command() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None or not sys.platform.startswith("linux"):
        return None
    flags = "-n" if os.geteuid() == 0 else "-rn"
    return [unshare, flags, "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@pytest.mark.skipif(bool(os.environ.get(IN_NETNS)), reason="already in the namespace")
def test_module_passes_in_a_network_namespace_of_its_own(tmp_path: Path) -> None:
    command = _netns_command()
    if command is None:
        pytest.skip("needs unshare(1) and ip(8) on Linux")
    probe = subprocess.run([*command, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.strip()}")
    env = {**os.environ, IN_NETNS: "1"}
    result = subprocess.run(
        [
            *command,
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "inner"),
            __file__,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_socket_guard_refuses_anything_but_loopback(socket_guard: SocketGuard) -> None:
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback(METADATA) and not is_loopback("localhost")
    with contextlib.closing(socket.socket()) as sock, pytest.raises(PermissionError):
        sock.connect((METADATA, 80))
    assert socket_guard.violations == [f"connect() to ('{METADATA}', 80)"]
    socket_guard.violations.clear()  # the refusal was the point of this test
