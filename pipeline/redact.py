"""Secrets out of what the pipeline records and shows: MLflow params, config.yaml, printed lines, errors.

A value is secret when its key looks like one (`aws_secret_access_key`, `hf_token`, `api_key`,
`password`, any `AWS_*`; not `pad_token_id`, `max_tokens`, nor a key that says where something is,
such as `AWS_REGION` or `AWS_CA_BUNDLE`), when it is the password of a URL
(`https://user:PASSWORD@host`) or a signed URL's query parameter (`X-Amz-Signature=...`), or when
it is the value of a secret-looking environment variable of this process (AWS_SECRET_ACCESS_KEY,
MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ...), wherever that value turns up in text. Secrets become
`MASK`; everything else is left as it was.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
SECRET_WORDS = frozenset(
    {"secret", "password", "passwd", "passphrase", "credential", "credentials", "apikey", "signature", "auth"}
)
"""A key holding one of these words (split at `_`, `-`, `.` and camelCase) is secret."""
SECRET_LAST_WORDS = frozenset({"key", "token", "authorization", "cookie"})
"""A key ending in one of these words is secret (`api_key`, `hf_token`), unless listed in NOT_SECRET."""
NOT_SECRET = frozenset({"cache_key", "sort_key"})
WHERE_WORDS = frozenset({"file", "path", "dir", "bundle", "region", "url", "uri", "endpoint", "profile", "home"})
"""A key ending in one of these says where a secret or a service is (`AWS_SHARED_CREDENTIALS_FILE`,
`AWS_CA_BUNDLE`, `AWS_ENDPOINT_URL`), not the secret: masking it would only hide a path or a host."""
MIN_ENV_SECRET = 8
"""Shorter environment values (`1`, `true`, `testing`) are not searched for in text."""

_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)([^/\s@]+)(@)")
_QUERY = re.compile(r"([?&])([^=&\s#'\"]+)=([^&\s#'\"]+)")
_ASSIGNMENT = re.compile(r"""(?P<key>[A-Za-z_][\w.-]*)(?P<sep>=|["']?:\s*["']?)(?P<value>[^\s,;'"&?@}\]]+)""")


def is_secret_key(key: str) -> bool:
    """Whether a config key, parameter name, environment variable or query parameter names a secret."""
    words = _words(key)
    return bool(words) and words[-1] not in WHERE_WORDS and (words[0] == "aws" or _secret_words(words))


def _words(key: str) -> list[str]:
    name = str(key).rsplit(".", 1)[-1]
    return [] if name.lower() in NOT_SECRET else [w.lower() for w in _WORD.findall(name)]


def _secret_words(words: list[str]) -> bool:
    if SECRET_WORDS.intersection(words) or words[-1] in SECRET_LAST_WORDS:
        return True
    return words[-2:] == ["key", "id"]  # aws_access_key_id


def env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Values of this process's environment variables that are secret by their words (not merely
    `AWS_*`: `AWS_RETRY_MODE=standard` must not mask the word "standard"), longest first."""
    environ = os.environ if environ is None else environ
    values = set()
    for key, value in environ.items():
        words = _words(key)
        if words and words[-1] not in WHERE_WORDS and _secret_words(words) and len(value) >= MIN_ENV_SECRET:
            values.add(value)
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, environ: dict[str, str] | None = None) -> str:
    """`text` with URL passwords, `secret_key=...` / `token: ...` values and secret environment values masked."""
    text = str(text)
    for value in env_secrets(environ):
        text = text.replace(value, MASK)
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    text = _QUERY.sub(_mask_query, text)
    return _ASSIGNMENT.sub(_mask_assignment, text)


def _mask_query(match: re.Match) -> str:
    return f"{match.group(1)}{match.group(2)}={MASK}" if is_secret_key(match.group(2)) else match.group(0)


def _mask_assignment(match: re.Match) -> str:
    if not is_secret_key(match.group("key")) or match.group("value") == MASK:
        return match.group(0)
    return match.group("key") + match.group("sep") + MASK


def redact_params(params: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Flat {key: value} with secret keys' values masked and every other text value passed through
    `redact_text` (a data source path may be a signed URL)."""
    out = {}
    for key, value in params.items():
        if is_secret_key(key) and value not in (None, ""):
            out[key] = MASK
        elif isinstance(value, str | list | dict | tuple):
            out[key] = redact_text(str(value), environ) if not isinstance(value, str) or value else value
        else:
            out[key] = value
    return out
