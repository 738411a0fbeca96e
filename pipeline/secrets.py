"""The one redaction rule of r1flow: what never reaches a manifest, a version id, a log line or a Prefect
artifact. A value is hidden when its key names a secret (`hub_token`, `HF_TOKEN`, `openai_api_key`,
`clientSecret`, ...; not `max_new_tokens`, `tokenizer` or a tokenizer's `pad_token`), and token-looking text
(Hugging Face `hf_...`, OpenAI-style `sk-...`, Prefect `pnu_...`, GitHub `ghp_...`) is replaced wherever it
appears, inside longer text too."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# Matched at the end of the key, case-insensitive.
_SECRET_KEY = re.compile(
    r"(token|secret|password|passwd|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|credentials?)$",
    re.IGNORECASE,
)
# Tokenizer special-token settings (TRL's SFTConfig has `eos_token`, `pad_token`) are not secrets.
_NOT_SECRET_KEY = re.compile(r"^(pad|eos|bos|unk|sep|cls|mask)[_-]?token$", re.IGNORECASE)
_SECRET_TEXT = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|pnu_[A-Za-z0-9]{20,}|"
                          r"gh[pousr]_[A-Za-z0-9]{20,})\b")


def is_secret_key(key: Any) -> bool:
    """Whether a config key / table column names a secret."""
    key = str(key)
    return bool(_SECRET_KEY.search(key)) and not _NOT_SECRET_KEY.match(key)


def redact(value: Any) -> Any:
    """`value` with secrets hidden: in text, token-looking substrings become "***"; in dicts (nested, and in
    lists), the values of secret keys (when set) become "***". Returns a copy; other values pass unchanged."""
    if isinstance(value, str):
        return _SECRET_TEXT.sub(REDACTED, value)
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) and v not in (None, "") else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
