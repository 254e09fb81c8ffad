"""How a client names itself to a server: the token file it reads (workers
with `--auth-token-file`, reapi-cc with REAPI_TOKEN_FILE). A bottom-layer
module: clients import it without the server's code."""

from __future__ import annotations

from pathlib import Path


def read_token(path: Path) -> str:
    """A client's token file: its first word that is not a comment. Raises
    OSError when it cannot be read, ValueError when it holds no token."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.split()[0]
    raise ValueError(f"token file {path} holds no token")
