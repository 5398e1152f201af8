"""FHIR search-parameter escaping, shared by the client and the bundle builder."""

from __future__ import annotations

from urllib.parse import urlencode

# FHIR R4 search §3.1.1.1.2: these characters are separators inside a parameter value.
_ESCAPED = ("\\", "|", ",", "$")


def escape_search_value(value: str) -> str:
    """Escape ``\\ | , $`` so a literal value cannot be read as a separator."""
    for ch in _ESCAPED:
        value = value.replace(ch, "\\" + ch)
    return value


def identifier_token(system: str, value: str) -> str:
    """``system|value`` for an ``identifier`` search, both halves escaped."""
    return f"{escape_search_value(system)}|{escape_search_value(value)}"


def identifier_query(system: str, value: str, parameter: str = "identifier") -> str:
    """``identifier=system|value`` (or another token ``parameter``, e.g. ``_tag``) URL-encoded,
    as used in ``Bundle.entry.request.ifNoneExist``."""
    return urlencode({parameter: identifier_token(system, value)})
