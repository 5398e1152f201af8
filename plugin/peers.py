"""How we connect to the PACS and the EHR as configured: DICOM TLS for our C-STORE, and the FHIR
client's CA bundle and credentials. Shared by ``serve`` and ``doctor``, so the doctor tests the
connection the service will use."""

from __future__ import annotations

import ssl
from functools import partial

import httpx

from dicom_io.tls import client_tls_context
from fhir_io import FhirClient
from fhir_io.auth import BearerToken, ClientCredentials
from plugin.config import DIMSE, ConfigError, FhirSettings, PacsSettings, read_secret

__all__ = ["fhir_auth", "fhir_client", "pacs_tls_context"]


def pacs_tls_context(pacs: PacsSettings) -> ssl.SSLContext | None:
    """The C-STORE's TLS context from ``[pacs] tls_*``; None for plain TCP (no CA set)."""
    if pacs.protocol != DIMSE or pacs.tls_ca_certificates is None:
        return None
    try:
        return client_tls_context(
            pacs.tls_ca_certificates,
            pacs.tls_certificate,
            pacs.tls_private_key,
            check_hostname=pacs.tls_check_hostname,
        )
    except (OSError, ssl.SSLError) as error:  # ssl.SSLError is an OSError; named for clarity
        raise ConfigError(f"pacs TLS files cannot be used: {error}") from None


def fhir_auth(fhir: FhirSettings) -> httpx.Auth | None:
    """A bearer token or client credentials flow from ``[fhir]``; None for an open server."""
    if fhir.bearer_token is not None:
        return BearerToken(partial(read_secret, fhir.bearer_token))
    credentials = fhir.client_credentials
    if credentials is not None:
        return ClientCredentials(
            credentials.token_url,
            credentials.client_id,
            partial(read_secret, credentials.client_secret),
            credentials.scope,
        )
    return None


def fhir_client(fhir: FhirSettings, timeout: float = 10.0) -> FhirClient:
    """The EHR's client with the configured CA bundle and credentials."""
    try:
        return FhirClient(
            fhir.base_url, timeout=timeout, auth=fhir_auth(fhir), verify=fhir.ca_certificates
        )
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"fhir.ca_certificates cannot be used: {error}") from None
