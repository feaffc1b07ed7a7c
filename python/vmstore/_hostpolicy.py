"""Which hosts vmstore's network backends may connect to (the SSRF policy).

A URL is something a caller may have been handed by someone else, and the host running
vmstore often reaches what the caller cannot: the cloud metadata service at
169.254.169.254 (credentials), other link-local services, or addresses that mean "this
host". So every connection the S3 and HTTP backends open goes through a :class:`HostPolicy`:

- Default (``StorageConfig.allowed_hosts`` is ``None``): link-local (169.254.0.0/16,
  fe80::/10), unspecified (0.0.0.0/8, ::), multicast (224.0.0.0/4, ff00::/8) and broadcast
  (255.255.255.255) addresses are refused; everything else is reachable.
- ``allowed_hosts`` set: only the names and CIDRs it lists are reachable (loopback too only
  when listed). A listed name permits whatever it resolves to; a CIDR permits its addresses.

IPv6 forms of an IPv4 address (``::ffff:169.254.169.254``, NAT64 ``64:ff9b::/96``, the old
IPv4-compatible ``::a.b.c.d``) are judged as that IPv4 address, and a host written as a
number (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``) is the address the C
library reads it as, so no spelling slips past the rules.

No gap between check and connect (DNS rebinding): a name is resolved once, *every* address
it resolves to is checked, and the socket is connected to exactly those checked addresses.
urllib3 still sees the original name, so the Host header, TLS SNI and certificate
verification are unchanged. This is done by the connection classes of vmstore's own pools
(:func:`policy_adapter` for requests, :func:`install_on_boto3_client` for botocore): no
global patch of ``socket`` or urllib3, other code in the process is unaffected.

Through a proxy (``HTTPS_PROXY`` and friends), the proxy connects to the target, not us: the
target's name is then checked by resolving it here (:meth:`HostPolicy.check_url`), which is
as good as it can be, and the proxy's own address goes through the policy like any other.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from vmstore.errors import InvalidConfigError, PermissionDeniedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., Sequence[tuple[Any, ...]]]
"""``socket.getaddrinfo``'s shape: ``(host, port, family, type) -> [(family, type, proto,
canonname, sockaddr), ...]``."""

default_resolver: Resolver = socket.getaddrinfo
"""The resolver of policies built without one; looked up at each resolution, so a test can
replace it (``monkeypatch.setattr(vmstore._hostpolicy, "default_resolver", stub)``)."""

ENV_VARIABLE = "VMSTORE_ALLOWED_HOSTS"
_HOW_TO_ALLOW = (
    "to allow it, list the host (or a CIDR holding its address) in StorageConfig.allowed_hosts; "
    "only the hosts listed there are then reachable"
)

_DEFAULT_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), rule)
    for cidr, rule in (
        (
            "169.254.0.0/16",
            "link-local addresses (169.254.0.0/16, where cloud metadata services such as "
            "169.254.169.254 answer) are refused",
        ),
        ("fe80::/10", "link-local addresses (fe80::/10) are refused"),
        ("0.0.0.0/8", "unspecified addresses (0.0.0.0/8, which reach this host) are refused"),
        ("::/128", "the unspecified address (::, which reaches this host) is refused"),
        ("224.0.0.0/4", "multicast addresses (224.0.0.0/4) are refused"),
        ("ff00::/8", "multicast addresses (ff00::/8) are refused"),
        ("255.255.255.255/32", "the broadcast address (255.255.255.255) is refused"),
    )
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Characters of a host the C library may read as an IPv4 number (inet_aton's forms).
_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def canonical_address(address: IPAddress) -> IPAddress:
    """The address a connection really goes to: IPv4 for the IPv6 spellings of one, and no
    IPv6 scope (``fe80::1%eth0`` is judged as ``fe80::1``)."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    plain = ipaddress.IPv6Address(int(address))
    if plain.ipv4_mapped is not None:
        return plain.ipv4_mapped
    if plain in _NAT64 or (plain in _IPV4_COMPATIBLE and int(plain) > 1):
        return ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF)
    return plain


def literal_address(host: str) -> IPAddress | None:
    """``host`` as the (canonical) IP address it is written as, in any spelling the system's
    resolver would accept as numeric; None for a name."""
    written = _written_address(host)
    return None if written is None else canonical_address(written)


def _written_address(host: str) -> IPAddress | None:
    """The address a numeric host names as written (an IPv6 form stays IPv6, scope kept)."""
    text = host.strip().strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and _NUMERIC_HOST.match(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _literal_sockaddr(address: IPAddress, port: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) to connect to a numeric host: the address as written (a NAT64 or
    mapped IPv6 address goes out as IPv6, as the caller wrote it), with its scope."""
    if isinstance(address, ipaddress.IPv4Address):
        return socket.AF_INET, (str(address), port)
    scope = address.scope_id or ""
    try:
        scope_index = (
            int(scope) if scope.isdigit() else (socket.if_nametoindex(scope) if scope else 0)
        )
    except OSError as exc:
        raise socket.gaierror(socket.EAI_NONAME, f"no network interface {scope!r}") from exc
    return socket.AF_INET6, (str(ipaddress.IPv6Address(int(address))), port, 0, scope_index)


def _normal_name(name: str) -> str:
    """Lower case, no trailing dot, IDNA (the form urllib3 resolves and connects with)."""
    name = name.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


@dataclass(frozen=True)
class AllowedHosts:
    """A parsed ``allowed_hosts``: exact names, ``*.suffix`` patterns and networks."""

    names: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowedHosts:
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip() if isinstance(raw, str) else raw
            if not isinstance(entry, str) or not entry:
                raise _invalid(f"{raw!r} is not a host name or CIDR")
            if "://" in entry:
                _check_name(entry, entry)  # raises: a URL, not a host
            network = _parse_network(entry)
            if network is not None:
                networks.append(network)
                continue
            name = entry.strip().rstrip(".").lower()
            wildcard = name.startswith("*.")
            if wildcard:
                name = name[2:]
            name = _check_name(entry, name)
            if wildcard:
                suffixes.append("." + name)
            else:
                names.add(name)
        if not names and not suffixes and not networks:
            raise _invalid(
                "is empty, which would allow no host at all; list names and CIDRs, or leave "
                "it None for the default policy"
            )
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def permits_name(self, host: str) -> bool:
        name = _normal_name(host)
        return name in self.names or any(name.endswith(suffix) for suffix in self.suffixes)

    def permits_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def _parse_network(entry: str) -> IPNetwork | None:
    """A CIDR or a single address as a network; None when entry is a name."""
    if "/" in entry:
        address, _, length = entry.partition("/")
        try:
            network = ipaddress.ip_network(f"{address.strip('[]')}/{length}")
        except ValueError as exc:
            raise _invalid(
                f"{entry!r} is not a valid CIDR ({exc}; e.g. 10.0.0.0/8, fd00::/8)"
            ) from exc
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            # Addresses are judged in IPv4 form, so an IPv4-mapped CIDR is its IPv4 network.
            return ipaddress.IPv4Network(
                (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
            )
        return network
    address_only = literal_address(entry)
    return None if address_only is None else ipaddress.ip_network(address_only)


def _check_name(entry: str, name: str) -> str:
    """``name`` in IDNA form, or InvalidConfigError when it is no host name."""
    if ":" in name or "/" in name or "@" in name:
        raise _invalid(
            f"{entry!r} is neither a host name nor a CIDR (no scheme, port or path: "
            "e.g. s3.example.com, *.example.com, 10.0.0.0/8)"
        )
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise _invalid(f"{entry!r} is not a valid host name") from None
    labels = ascii_name.split(".")
    if not all(_LABEL.match(label) for label in labels) or len(ascii_name) > 253:
        raise _invalid(f"{entry!r} is not a valid host name")
    if labels[-1].isdigit():
        # No top-level domain is numeric: this was meant as an address, and is not one.
        raise _invalid(f"{entry!r} is not a valid IP address")
    return ascii_name


def _invalid(problem: str) -> InvalidConfigError:
    return InvalidConfigError(f"invalid StorageConfig.allowed_hosts: {problem}")


def check_allowed_hosts(value: object) -> list[str] | None:
    """Validate ``StorageConfig.allowed_hosts`` (InvalidConfigError if it is not a list of
    host names and CIDRs) and return it as a list of stripped strings."""
    if value is None:
        return None
    if isinstance(value, str):
        value = split_allowed_hosts(value)
    if not isinstance(value, list | tuple | set | frozenset):
        raise _invalid("must be a list of host names and CIDRs, or None")
    entries = list(value)
    AllowedHosts.parse(entries)
    return [entry.strip() for entry in entries]


def split_allowed_hosts(text: str) -> list[str]:
    """The comma-separated form (``VMSTORE_ALLOWED_HOSTS``, ``--allowed-hosts``) as a list."""
    return [part.strip() for part in text.split(",") if part.strip()]


def proxied(url: str) -> bool:
    """Whether requests/botocore send ``url`` through a proxy from the environment."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not proxies.get(parts.scheme.lower()):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


class HostPolicy:
    """Decides whether a host may be connected to, and connects to checked addresses only."""

    def __init__(
        self, allowed_hosts: Iterable[str] | None = None, *, resolver: Resolver | None = None
    ) -> None:
        self.allowed = None if allowed_hosts is None else AllowedHosts.parse(allowed_hosts)
        self._resolver = resolver

    @classmethod
    def from_config(cls, config: Any, *, resolver: Resolver | None = None) -> HostPolicy:
        return cls(getattr(config, "allowed_hosts", None), resolver=resolver)

    # -- decisions ----------------------------------------------------------------------

    def refusal(self, host: str, address: IPAddress) -> str | None:
        """Why connecting to ``address`` (which ``host`` resolved to) is refused, or None."""
        address = canonical_address(address)
        if self.allowed is not None:
            if self.allowed.permits_name(host) or self.allowed.permits_address(address):
                return None
            return "neither the name nor the address is in StorageConfig.allowed_hosts"
        for network, rule in _DEFAULT_REFUSED:
            if address in network:
                return rule
        return None

    def check_address(self, host: str, address: IPAddress) -> None:
        reason = self.refusal(host, address)
        if reason is not None:
            raise _refused(host, str(canonical_address(address)), reason)

    def check_host(self, host: str) -> None:
        """What can be decided without resolving: a literal address, or a name that
        ``allowed_hosts`` neither lists nor could permit through a CIDR."""
        address = literal_address(host)
        if address is not None:
            self.check_address(host, address)
        elif (
            self.allowed is not None
            and not self.allowed.networks
            and not self.allowed.permits_name(host)
        ):
            raise _refused(host, "", "the name is not in StorageConfig.allowed_hosts")

    def check_url(self, url: str, *, through_proxy: bool | None = None) -> None:
        """Check the host of a URL before a request: without resolving (the connection
        resolves and checks once, then connects to what it checked), unless the request
        goes through a proxy, which connects on its own: then the name is resolved here.
        ``through_proxy`` is that decision when the caller knows it (None: from the
        environment now)."""
        host = urlsplit(url).hostname or ""
        self.check_host(host)
        if through_proxy is None:
            through_proxy = proxied(url)
        if through_proxy and literal_address(host) is None:
            port = urlsplit(url).port or (443 if url.lower().startswith("https") else 80)
            self.resolve(host, port)

    # -- resolving and connecting -------------------------------------------------------

    def resolve(
        self, host: str, port: int, family: int = socket.AF_UNSPEC
    ) -> list[tuple[int, int, int, tuple[Any, ...]]]:
        """Resolve ``host`` once and check every address: ``(family, type, proto, sockaddr)``
        per address, sockaddr holding the checked address itself. Any refused address
        refuses the host (a name that also points at the metadata service is not trusted)."""
        self.check_host(host)
        written = _written_address(host)
        if written is not None:
            # A numeric host is never handed to a resolver: connected to as written.
            af, sockaddr = _literal_sockaddr(written, port)
            infos: Sequence[tuple[Any, ...]] = [
                (af, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)
            ]
        else:
            resolver = self._resolver or default_resolver
            infos = resolver(host, port, family, socket.SOCK_STREAM)
        checked: list[tuple[int, int, int, tuple[Any, ...]]] = []
        for info in infos:
            af, socktype, proto, _canonname, sockaddr = info[:5]
            try:
                address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            except ValueError:
                raise _refused(
                    host, str(sockaddr[0]), "the resolver did not return an IP address"
                ) from None
            target = canonical_address(address)
            self.check_address(host, target)
            if af == socket.AF_INET6:
                # Keep the sockaddr's own IPv6 address (a mapped one stays mapped for an
                # AF_INET6 socket); it was checked in its canonical form above.
                rest = tuple(sockaddr[2:4]) if len(sockaddr) >= 4 else (0, 0)
                connect_to: tuple[Any, ...] = (
                    str(ipaddress.IPv6Address(int(address))),
                    port,
                    *rest,
                )
            else:
                connect_to = (str(address), port)
            checked.append((af, socktype or socket.SOCK_STREAM, proto, connect_to))
        if not checked:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} resolved to no address")
        return checked

    def create_connection(
        self,
        address: tuple[str, int],
        timeout: object = None,
        source_address: tuple[str, int] | None = None,
        socket_options: Sequence[tuple[int, int, int | bytes]] | None = None,
        family: int = socket.AF_UNSPEC,
    ) -> socket.socket:
        """``urllib3.util.connection.create_connection`` through the policy: each checked
        address in turn, the first that answers wins."""
        host, port = address
        error: OSError | None = None
        for af, socktype, proto, sockaddr in self.resolve(host, port, family):
            sock = None
            try:
                sock = socket.socket(af, socktype, proto)
                for option in socket_options or ():
                    sock.setsockopt(*option)
                if timeout is None or isinstance(timeout, int | float):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                if sock is not None:
                    sock.close()
        assert error is not None  # resolve() returns at least one address
        raise error


class HostRefusedError(PermissionDeniedError):
    """The host policy refused a connection (a PermissionDeniedError to callers)."""


def _refused(host: str, address: str, reason: str) -> HostRefusedError:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    shown = f"{host} ({address})" if address and address != host.strip("[]") else host
    return HostRefusedError(f"refusing to connect to {shown}: {reason}; {_HOW_TO_ALLOW}")


def refusal_in(exc: BaseException | None) -> PermissionDeniedError | None:
    """The policy's refusal inside ``exc`` (botocore wraps what a connection raises in
    HTTPClientError, urllib3 in MaxRetryError), or None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, HostRefusedError):
            return exc
        inner = getattr(exc, "kwargs", {}).get("error") if hasattr(exc, "kwargs") else None
        if not isinstance(inner, BaseException):
            inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = exc.__cause__ or exc.__context__
        exc = inner
        seen += 1
    return None


# --- urllib3 / requests / botocore hooks ---------------------------------------------------


def _new_conn_through_policy(self: Any) -> socket.socket:
    """urllib3 ``HTTPConnection._new_conn``, with the socket from the policy."""
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

    policy: HostPolicy = self._vmstore_policy
    tunnel_host = getattr(self, "_tunnel_host", None)
    if tunnel_host:
        # Through a CONNECT proxy: the proxy reaches the target, so check its name here.
        policy.resolve(tunnel_host, int(getattr(self, "_tunnel_port", None) or 443))
    try:
        from urllib3.util.connection import allowed_gai_family

        sock = policy.create_connection(
            (self._dns_host, self.port),
            self.timeout,
            source_address=self.source_address,
            socket_options=self.socket_options,
            family=allowed_gai_family(),
        )
    except socket.gaierror as exc:
        raise NameResolutionError(self.host, self, exc) from exc
    except TimeoutError as exc:
        raise ConnectTimeoutError(
            self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
        ) from exc
    except OSError as exc:
        raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
    sys.audit("http.client.connect", self, self.host, self.port)
    return sock


@cache
def _pinned_connection_class(base: type[Any]) -> type[Any]:
    return type(f"HostPolicy{base.__name__}", (base,), {"_new_conn": _new_conn_through_policy})


def pool_classes(policy: HostPolicy, classes: dict[str, type[Any]]) -> dict[str, type[Any]]:
    """Subclasses of urllib3 pool classes (by scheme) whose connections use ``policy``."""

    def pinned(pool: type[Any]) -> type[Any]:
        connection = _pinned_connection_class(pool.ConnectionCls)

        def _new_conn(self: Any) -> Any:
            conn = pool._new_conn(self)
            conn._vmstore_policy = policy
            return conn

        return type(
            f"HostPolicy{pool.__name__}",
            (pool,),
            {"ConnectionCls": connection, "_new_conn": _new_conn},
        )

    return {scheme: pinned(pool) for scheme, pool in classes.items()}


def policy_adapter(policy: HostPolicy, **kwargs: Any) -> Any:
    """A ``requests.adapters.HTTPAdapter`` whose connections (direct or to an HTTP(S)
    proxy) go through ``policy``. SOCKS proxies keep their own connections; their targets
    are checked by :meth:`HostPolicy.check_url`."""
    return _adapter_class()(policy, **kwargs)


@cache
def _adapter_class() -> type[Any]:
    import requests.adapters

    class _PolicyAdapter(requests.adapters.HTTPAdapter):
        def __init__(self, policy: HostPolicy, **kwargs: Any) -> None:
            self._vmstore_policy = policy
            super().__init__(**kwargs)

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            manager = self.poolmanager
            manager.pool_classes_by_scheme = pool_classes(
                self._vmstore_policy, dict(manager.pool_classes_by_scheme)
            )

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            fresh = proxy not in self.proxy_manager
            manager = super().proxy_manager_for(proxy, **proxy_kwargs)
            if fresh and not proxy.lower().startswith("socks"):
                manager.pool_classes_by_scheme = pool_classes(
                    self._vmstore_policy, dict(manager.pool_classes_by_scheme)
                )
            return manager

    return _PolicyAdapter


def install_on_boto3_client(client: Any, policy: HostPolicy) -> None:
    """Route a boto3 client's connections through ``policy`` and check each request's URL
    before it is sent. botocore's URLLib3Session shares one pool-class dict between its
    pool manager and its proxy managers; replacing its entries covers both."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    classes = getattr(session, "_pool_classes_by_scheme", None)
    manager = getattr(session, "_manager", None)
    if not isinstance(classes, dict) or set(classes) != {"http", "https"} or manager is None:
        raise InvalidConfigError(
            "cannot apply the host policy to this botocore version (its URLLib3Session "
            "changed); install a botocore release vmstore supports"
        )
    classes.update(pool_classes(policy, dict(classes)))
    manager.pool_classes_by_scheme = classes

    # botocore reads the proxy environment once, when the client is made; so does this,
    # once per scheme and host (reading the environment costs ~1 ms a request).
    through_proxy: dict[tuple[str, str], bool] = {}

    def before_send(request: Any, **_: Any) -> None:
        url = str(request.url)
        parts = urlsplit(url)
        origin = (parts.scheme.lower(), parts.netloc.lower())
        if origin not in through_proxy:
            through_proxy[origin] = proxied(url)
        policy.check_url(url, through_proxy=through_proxy[origin])

    client.meta.events.register_first("before-send.s3", before_send)
