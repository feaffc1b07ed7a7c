"""The HTTP transport: one requests session, redirects followed here (hop by hop, each checked
by the host policy), and the bearer token sent only to the origin the caller named."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import requests.auth

from vmstore._hostpolicy import HostPolicy, policy_adapter
from vmstore.backends.http._errors import HttpStatusError
from vmstore.config import StorageConfig
from vmstore.errors import (
    InvalidConfigError,
)
from vmstore.urls import redact_url

log = logging.getLogger("vmstore.http")

MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


# --- small pure helpers -------------------------------------------------------------------


def _with_path_suffix(url: str, suffix: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + suffix))


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _may_send_token(named_url: str, hop_url: str) -> bool:
    """The token goes to the origin the caller named, or its https upgrade, nowhere else."""
    named, hop = _origin(named_url), _origin(hop_url)
    if named == hop:
        return True
    return named == ("http", hop[1], 80) and hop == ("https", named[1], 443)


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- transport ----------------------------------------------------------------------------


class _BearerAuth(requests.auth.AuthBase):
    """Sets (or, for a foreign hop, removes) the Authorization header. Passing an auth object
    on every request also keeps requests from filling one in from ~/.netrc."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        else:
            request.headers.pop("Authorization", None)
        return request


BodyFactory = Callable[[], Any]


class _Transport:
    """One requests.Session, redirects followed by hand so the token never leaves its host."""

    def __init__(self, config: StorageConfig) -> None:
        self.token = config.token
        self._timeout = (config.timeout, config.timeout)
        self._verify: bool | str = True
        if config.insecure_skip_verify:
            self._verify = False
        elif config.ca_bundle:
            if not os.path.isfile(config.ca_bundle):
                raise InvalidConfigError(
                    f"invalid StorageConfig.ca_bundle: {config.ca_bundle} is not a file; give "
                    "the path of a PEM file holding the CA certificate(s) to trust"
                )
            self._verify = config.ca_bundle
        session = requests.Session()
        # Byte ranges must be ranges of the file itself, not of a compressed rendition.
        session.headers.update({"Accept-Encoding": "identity", "User-Agent": _user_agent()})
        # Retries are vmstore's (RetryPolicy), so max_retries means one thing everywhere.
        # Every connection resolves through the host policy and goes to the checked address.
        self.policy = HostPolicy.from_config(config)
        adapter = policy_adapter(
            self.policy, pool_connections=4, pool_maxsize=config.concurrency + 4, max_retries=0
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        self._warned_plain_http = False

    def close(self) -> None:
        self._session.close()

    def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: BodyFactory | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """One request, redirects followed; the response is returned whatever its status."""
        hop = url
        for _ in range(MAX_REDIRECTS + 1):
            with_token = bool(self.token) and _may_send_token(url, hop)
            if (
                with_token
                and hop.startswith("http://")
                and not _is_loopback(hop)
                and not self._warned_plain_http
            ):
                self._warned_plain_http = True
                log.warning("sending the bearer token over plain http to %s", redact_url(hop))
            self.policy.check_url(hop)  # each hop: a redirect may point anywhere
            response = self._session.request(
                method,
                hop,
                headers=dict(headers or {}),
                # A fresh body per hop: a redirected PUT re-reads the source, never a spent one.
                data=body() if body is not None else None,
                stream=stream,
                allow_redirects=False,
                timeout=self._timeout,
                verify=self._verify,
                auth=_BearerAuth(self.token if with_token else None),
            )
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            if response.status_code == 303 and method not in ("GET", "HEAD"):
                return response
            response.close()
            hop = urljoin(hop, location)
            log.debug("%s %s redirected to %s", method, redact_url(url), redact_url(hop))
        raise HttpStatusError(method, 310, f"more than {MAX_REDIRECTS} redirects")


def _user_agent() -> str:
    from vmstore import __version__

    return f"vmstore/{__version__} python-requests/{requests.__version__}"
