import os

import pytest


def require(service: str, ok: bool, detail: str) -> None:
    """Fail under CI, skip on a developer machine, when a service is missing."""
    if ok:
        return
    message = f"{service} is not reachable ({detail}); start the stack with `make up`"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
