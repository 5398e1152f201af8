"""How we authenticate to the EHR's FHIR endpoint: a static bearer token, or an OAuth2 access token
from the client credentials grant (RFC 6749 section 4.4), as ``httpx.Auth`` flows.

Tokens and secrets are read through callables, so a rotated token file is picked up on the next
401 without a restart. Neither ever reaches a log line or an exception's text: errors name the
token URL, the HTTP status and the OAuth2 error code only.

A 401 is answered once with a fresh token; a second 401 (or a 403) goes back to the caller, and
``FhirClient`` turns it into ``FhirRejectedError``, which the outbox parks rather than retries.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Generator
from urllib.parse import quote_plus

import httpx

from fhir_io._exceptions import FhirError, FhirRejectedError, FhirUnavailableError

__all__ = ["BearerToken", "ClientCredentials"]

# Refresh this long before the token's expires_in runs out (at most half its lifetime), so a
# request does not leave with a token that expires on the way.
EXPIRY_MARGIN_S = 30.0
# A token answer without expires_in is kept this long.
DEFAULT_LIFETIME_S = 300.0


class BearerToken(httpx.Auth):
    """``Authorization: Bearer <token>`` with a static token; on a 401 the token is read again
    and the request retried once, only if it changed (someone rotated it)."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._read = token

    def __repr__(self) -> str:
        return "BearerToken(<redacted>)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._read()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            fresh = self._read()
            if fresh and fresh != token:
                request.headers["Authorization"] = f"Bearer {fresh}"
                yield request


class ClientCredentials(httpx.Auth):
    """An access token from ``token_url`` (grant_type=client_credentials, the client
    authenticated with HTTP Basic, RFC 6749 section 2.3.1), cached until shortly before it
    expires and fetched again once when the FHIR server answers 401.

    Token requests go through the FHIR client's own transport, so they get its CA bundle and
    timeouts. Safe to share between threads: at worst two threads fetch a token each.
    """

    requires_response_body = True

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: Callable[[], str],
        scope: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self.tokens_fetched = 0  # for tests and diagnostics: how often a token was requested

    def __repr__(self) -> str:
        return f"ClientCredentials(token_url={self.token_url!r}, client_id={self.client_id!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._cached()
        if token is None:
            token = yield from self._fetch()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Revoked, or expired early (server restart, clock skew): one fresh token, once.
            self._forget(token)
            token = yield from self._fetch()
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    def _cached(self) -> str | None:
        with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token
            return None

    def _forget(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def _fetch(self) -> Generator[httpx.Request, httpx.Response, str]:
        """POST the grant; the access token, or a FhirError that names the token URL, the
        status and the OAuth2 error code (never the secret or a token)."""
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        # RFC 6749 section 2.3.1: id and secret are form-urlencoded before base64.
        pair = f"{quote_plus(self.client_id)}:{quote_plus(self._secret())}"
        requested_at = self._clock()
        response = yield httpx.Request(
            "POST",
            self.token_url,
            data=form,
            headers={
                "Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii"),
                "Accept": "application/json",
            },
        )
        self.tokens_fetched += 1
        token, lifetime = self._parse(response)
        margin = min(EXPIRY_MARGIN_S, lifetime / 2)
        with self._lock:
            self._token = token
            self._refresh_at = requested_at + lifetime - margin
        return token

    def _parse(self, response: httpx.Response) -> tuple[str, float]:
        what = f"OAuth2 token request to {self.token_url}"
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise FhirUnavailableError(f"{what} answered {status}", status=status)
        try:
            body = response.json()
        except ValueError:
            body = None
        if status >= 400:
            code = body.get("error") if isinstance(body, dict) else None
            raise FhirRejectedError(
                f"{what} refused with {status}"
                + (f" {_printable(code)}" if isinstance(code, str) else "")
                + f": check [fhir] client_id and client secret for {self.client_id}",
                status=status,
            )
        token = body.get("access_token") if isinstance(body, dict) else None
        if status != 200 or not isinstance(token, str) or not token:
            raise FhirError(f"{what} answered {status} without an access_token")
        expires_in = body.get("expires_in")
        lifetime = (
            float(expires_in)
            if isinstance(expires_in, int | float) and expires_in > 0
            else DEFAULT_LIFETIME_S
        )
        return token, lifetime


def _printable(text: str, limit: int = 64) -> str:
    """An OAuth2 error code for a log line: one short line of printable ASCII."""
    return "".join(c for c in text if " " <= c <= "~")[:limit]
