"""Django settings for the benchmark peer: Django Channels with channels-redis, nothing else."""

import os

SECRET_KEY = "benchmark-peer-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels"]
USE_TZ = True
ASGI_APPLICATION = "asgi.application"
CHANNEL_LAYERS = {
    "default": {
        # The documented default layer; capacity raised so a burst is not dropped.
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # A large pool: with the default, 2,000 chatting sockets hit redis-py's
            # "Too many connections" and lost their consumers.
            "hosts": [
                {
                    "address": os.environ.get("RT_PEER_REDIS_URL", "redis://127.0.0.1:6379/0"),
                    "max_connections": 1000,
                }
            ],
            "capacity": 10000,
        },
    }
}
