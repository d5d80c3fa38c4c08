"""The framework's operations page and API, mounted at /background behind HTTP Basic.

``operations_router`` has no open default: the application passes the
dependency that decides who may see failed tasks' arguments, replay them and
cancel running tasks. Here, one operator account from the settings
(``OPERATIONS_USERNAME``, ``OPERATIONS_PASSWORD``); with no password set the
page answers 403 and says how to turn it on. A real deployment would put its
own single sign-on dependency in its place.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from app.core.background import celery_app
from app.core.background.operations import operations_router
from app.core.config import get_settings

_basic = HTTPBasic(realm="background operations")


def require_operator(credentials: Annotated[HTTPBasicCredentials, Depends(_basic)]) -> str:
    settings = get_settings()
    if settings.operations_password is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "the operations page is off: set OPERATIONS_PASSWORD"
        )
    expected = settings.operations_password.get_secret_value().encode()
    good_user = secrets.compare_digest(
        credentials.username.encode(), settings.operations_username.encode()
    )
    good_password = secrets.compare_digest(credentials.password.encode(), expected)
    if not (good_user and good_password):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "wrong user or password",
            headers={"WWW-Authenticate": 'Basic realm="background operations"'},
        )
    return credentials.username


router = operations_router(guard=require_operator, app=celery_app)
