"""What every config model shares: strictness, and credentials read from files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, FilePath, SecretStr


class SecretFileError(ValueError):
    """A credentials file that cannot be used; the message names the file, never its text."""


def read_secret_file(path: Path) -> str:
    """The one line of a credentials file (e.g. a Kubernetes secret), stripped."""
    try:
        text = path.read_bytes().decode().strip()
    except OSError as e:
        raise SecretFileError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not UTF-8 text") from None
    if not text:
        raise SecretFileError(f"{path} is empty")
    if len(text.splitlines()) > 1:
        raise SecretFileError(f"{path} holds more than one line")
    return text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _readable(path: Path) -> Path:
    read_secret_file(path)
    return path


#: a credentials file, checked when the config is loaded (and read again at each use)
SecretFile = Annotated[FilePath, AfterValidator(_readable)]


def secret(inline: SecretStr | None, file: Path | None) -> str | None:
    """A credential: from its file (now, for rotation) if it has one, else inline, else None.

    Raises SecretFileError when the file went bad after the config was loaded.
    """
    if file is not None:
        return read_secret_file(file)
    return inline.get_secret_value() if inline is not None else None
