"""The peer's ASGI app: `uvicorn asgi:application`, run from this folder in its own venv."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

import django

django.setup()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from consumers import Room  # noqa: E402
from django.urls import path  # noqa: E402

application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/", Room.as_asgi())])})
