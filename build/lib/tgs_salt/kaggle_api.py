"""The Kaggle API, imported lazily (``import kaggle`` authenticates at import time)."""

from __future__ import annotations

import os
from pathlib import Path

from tgs_salt.errors import UserError

COMPETITION = "tgs-salt-identification-challenge"
CREDENTIALS_HELP = (
    "Kaggle credentials not found: put kaggle.json (Kaggle > Settings > API > Create New Token) at "
    "~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY; then accept the "
    f"competition rules at https://www.kaggle.com/c/{COMPETITION}/rules")


def has_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


def get_api():
    """An authenticated KaggleApi, or a UserError saying what to do."""
    if not has_credentials():
        raise UserError(CREDENTIALS_HELP)
    try:
        import kaggle
    except ImportError as exc:
        raise UserError(f"the kaggle package is not installed ({exc}); pip install -r requirements.txt") from None
    except (Exception, SystemExit) as exc:
        raise UserError(f"Kaggle authentication failed ({exc}). {CREDENTIALS_HELP}") from None
    api = kaggle.api
    try:
        api.authenticate()
    except (Exception, SystemExit) as exc:
        raise UserError(f"Kaggle authentication failed ({exc}). {CREDENTIALS_HELP}") from None
    return api


def explain_api_error(exc: BaseException, action: str) -> UserError:
    """Turn an API exception into a clear message: 401/403 (rules), network errors, others."""
    text = str(exc)
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status", None)
    if status == 403 or "403" in text:
        return UserError(f"{action} refused by Kaggle (HTTP 403): accept the competition rules at "
                         f"https://www.kaggle.com/c/{COMPETITION}/rules with the account of your credentials")
    if status == 401 or "401" in text:
        return UserError(f"{action} refused by Kaggle (HTTP 401): the credentials are invalid. {CREDENTIALS_HELP}")
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "connection" in text.lower():
        return UserError(f"{action} failed: network error talking to Kaggle ({text}); check the connection and retry")
    return UserError(f"{action} failed: {type(exc).__name__}: {text}")
