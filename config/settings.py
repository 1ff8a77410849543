"""Django settings. Everything environment-specific comes from environment variables.

With ``DATABASE_URL`` / ``REDIS_URL`` unset, the embedded PostgreSQL and Redis under ``VAR_DIR``
are started (or attached to) on first import, and the URLs are exported so child processes
(gunicorn workers, Celery) reuse them.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

from config import embedded
from config.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("RL_VAR_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("DJANGO_DEBUG", False)
# RL_PRODUCTION=1: served over HTTPS behind a reverse proxy. It requires DJANGO_SECRET_KEY and
# DJANGO_ALLOWED_HOSTS, refuses DJANGO_DEBUG, and turns on secure cookies, HSTS and the HTTPS
# redirect (see "Security" below); `manage.py check --deploy` passes with it.
PRODUCTION = env_bool("RL_PRODUCTION", False)
if PRODUCTION and DEBUG:
    raise ImproperlyConfigured("RL_PRODUCTION=1 cannot run with DJANGO_DEBUG on")
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if PRODUCTION or env_bool("RL_REQUIRE_SECRET", False):
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set in production")
    # Embedded/dev mode: a per-checkout key kept under var/, never committed.
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        import secrets

        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    SECRET_KEY = key_file.read_text().strip()

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
if PRODUCTION and not env_list("DJANGO_ALLOWED_HOSTS", []):
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS must be set in production (the public host names)")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "annotate",
    "rewards",
    "simulate",
    "training",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "annotate.middleware.QueryStringGuardMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "frontend" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


# --- Database -------------------------------------------------------------------------------
def _database_from_url(url: str) -> dict[str, object]:
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql"}:
        raise ImproperlyConfigured(f"DATABASE_URL must be a postgresql:// URL, got scheme {parsed.scheme!r}")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    host = query.pop("host", None) or unquote(parsed.hostname or "")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parsed.path.lstrip("/")) or "postgres",
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": host,
        "PORT": str(parsed.port or ""),
        "CONN_MAX_AGE": env_int("DB_CONN_MAX_AGE", 600, minimum=0),
        # A health check costs a round trip per request; worth it only behind flaky networks/poolers.
        "CONN_HEALTH_CHECKS": env_bool("DB_CONN_HEALTH_CHECKS", False),
        # Server-side binding with psycopg's prepared statements: PostgreSQL plans each hot labeling
        # statement once per connection instead of on every request (planning cost more than running).
        "OPTIONS": (
            {"server_side_binding": True, "prepare_threshold": 5}
            if env_bool("DB_PREPARED_STATEMENTS", True)
            else {}
        )
        | query,
        "TEST": {"NAME": env_str("DB_TEST_NAME") or None},
    }


# Tools that only read settings (mypy's Django plugin) set this, so they start no servers.
_START_EMBEDDED = not env_bool("RL_SKIP_EMBEDDED_START", False)
DATABASE_URL = env_str("DATABASE_URL")
if not DATABASE_URL and not _START_EMBEDDED:
    DATABASE_URL = f"postgresql://postgres:@/postgres?host={embedded.postgres_dir(VAR_DIR)}"
if not DATABASE_URL:
    DATABASE_URL = embedded.ensure_postgres(VAR_DIR)
    os.environ["DATABASE_URL"] = DATABASE_URL
DATABASES = {"default": _database_from_url(DATABASE_URL)}
# True when the database is the embedded one under VAR_DIR (also in child processes).
EMBEDDED_POSTGRES = str(VAR_DIR) in DATABASE_URL
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: Celery broker and cache ---------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
if not REDIS_URL and not _START_EMBEDDED:
    REDIS_URL = f"redis+socket://{embedded.redis_socket(VAR_DIR)}"
if not REDIS_URL:
    REDIS_URL = embedded.ensure_redis(VAR_DIR)
    os.environ["REDIS_URL"] = REDIS_URL
EMBEDDED_REDIS = str(embedded.redis_dir(VAR_DIR)) in REDIS_URL


def _cache_location(url: str) -> str:
    # Django's RedisCache speaks redis-py URLs: unix:// for sockets.
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": _cache_location(REDIS_URL),
        "KEY_PREFIX": env_str("CACHE_KEY_PREFIX", "rl"),
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = "default"
# Only long GPU work goes to `gpu`; cheap controller and bookkeeping tasks stay on `default`.
CELERY_TASK_ROUTES = {"rewards.tasks.gpu_*": {"queue": "gpu"}, "training.tasks.gpu_*": {"queue": "gpu"}}
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BEAT_SCHEDULE = {
    "expire-leases": {"task": "annotate.tasks.expire_leases", "schedule": 30.0},
    # New samples and comparisons get scores and active-learning priorities from the active model.
    "reward-scores-refresh": {
        "task": "rewards.tasks.scores_refresh",
        "schedule": env_float("RL_SCORE_REFRESH_SECONDS", 60.0, minimum=5.0),
    },
    # Per-project rules (N new judgments / every T minutes) live in each project's RewardConfig.
    "reward-retrain-due": {
        "task": "rewards.tasks.retrain_due",
        "schedule": env_float("RL_RETRAIN_CHECK_SECONDS", 15.0, minimum=1.0),
    },
    # The closed loop's controller (training.services.loop): one step per project per tick.
    "loop-tick": {
        "task": "training.tasks.loop_tick",
        "schedule": env_float("RL_LOOP_TICK_SECONDS", 10.0, minimum=1.0),
    },
}
CELERY_TIMEZONE = "UTC"
# Fewer judged pairs than this and a reward-model job is refused at launch.
RL_REWARD_MIN_PAIRS = env_int("RL_REWARD_MIN_PAIRS", 10, minimum=2)
# ... and fewer held-out pairs than this after the split (the same check at launch and in the worker).
RL_REWARD_MIN_HOLDOUT_PAIRS = env_int("RL_REWARD_MIN_HOLDOUT_PAIRS", 1, minimum=1)
# Encoder of projects with images or videos when their reward config names none: "builtin" (a small
# CLIP built under var/encoders on first use, no download), a local model directory, or "" for none.
RL_DEFAULT_MEDIA_ENCODER = env_str("RL_DEFAULT_MEDIA_ENCODER", "builtin")
# A running reward job with no progress write for this long lost its worker and is marked failed.
RL_REWARD_JOB_STALE_SECONDS = env_int("RL_REWARD_JOB_STALE_SECONDS", 600, minimum=30)

# --- Auth, i18n, static, media --------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
PASSWORD_HASHERS = (
    ["django.contrib.auth.hashers.MD5PasswordHasher"]
    if env_bool("RL_FAST_PASSWORD_HASHER", False)
    else [
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    ]
)
# Failed password checks (login page, POST /api/auth/token/) allowed per window before a 429, per
# username and per client IP; annotate/ratelimit.py. The counters live in the cache (Redis).
RL_LOGIN_USER_ATTEMPTS = env_int("RL_LOGIN_USER_ATTEMPTS", 10, minimum=1)
RL_LOGIN_IP_ATTEMPTS = env_int("RL_LOGIN_IP_ATTEMPTS", 30, minimum=1)
RL_LOGIN_WINDOW_SECONDS = env_int("RL_LOGIN_WINDOW_SECONDS", 300, minimum=1)
# Reverse proxies in front of the app (0: clients connect directly). With N > 0 the client IP is
# the entry the outermost proxy appended to X-Forwarded-For, and X-Forwarded-Proto: https marks a
# request as secure: the proxies must overwrite both headers, never pass on the client's.
RL_PROXY_COUNT = env_int("RL_PROXY_COUNT", 1 if PRODUCTION else 0, minimum=0)
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# frontend/dist is what `npm run build` writes (label.js, label.css).
STATICFILES_DIRS = [
    d for d in (BASE_DIR / "frontend" / "static", BASE_DIR / "frontend" / "dist") if d.is_dir()
]
WHITENOISE_USE_FINDERS = True
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media")))
MEDIA_URL = "/media/"

# Uploads: per-file limits are enforced in annotate.media; these cap the request itself.
RL_MAX_UPLOAD_BYTES = env_int("RL_MAX_UPLOAD_BYTES", 200 * 1024 * 1024, minimum=1)
RL_MAX_IMAGE_BYTES = env_int("RL_MAX_IMAGE_BYTES", 50 * 1024 * 1024, minimum=1)
RL_MAX_IMAGE_PIXELS = env_int("RL_MAX_IMAGE_PIXELS", 40_000_000, minimum=1)
RL_MAX_VIDEO_BYTES = env_int("RL_MAX_VIDEO_BYTES", 200 * 1024 * 1024, minimum=1)
RL_MAX_VIDEO_SECONDS = env_int("RL_MAX_VIDEO_SECONDS", 120, minimum=1)
RL_MAX_TEXT_CHARS = env_int("RL_MAX_TEXT_CHARS", 200_000, minimum=1)
RL_TOKEN_CACHE_SECONDS = env_int("RL_TOKEN_CACHE_SECONDS", 30, minimum=0)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "annotate.api.auth.CachedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        *(["rest_framework.renderers.BrowsableAPIRenderer"] if DEBUG else []),
    ],
    # DRF's parsers plus the storability check (no NUL, lone surrogate, >64-bit integer, NaN).
    "DEFAULT_PARSER_CLASSES": [
        "annotate.api.parsers.JSONParser",
        "annotate.api.parsers.FormParser",
        "annotate.api.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "annotate.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
    # `format` is an export parameter (jsonl/csv/parquet), not DRF's renderer override.
    "URL_FORMAT_OVERRIDE": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Rewardloop API",
    "DESCRIPTION": "Preference annotation, reward models and RL fine-tuning.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI assets ship in a wheel: the docs page works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Reward jobs and RL jobs share one status set: one name for it in the schema.
    "ENUM_NAME_OVERRIDES": {"JobStatusEnum": ["queued", "running", "succeeded", "failed", "cancelled"]},
}

# --- Security ----------------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Cookies only over HTTPS, HSTS and the HTTPS redirect: on in production (each can be turned off
# from the environment, e.g. while the TLS setup is being tried out).
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("RL_SECURE_COOKIES", PRODUCTION)
SECURE_SSL_REDIRECT = env_bool("RL_SSL_REDIRECT", PRODUCTION)
SECURE_HSTS_SECONDS = env_int("RL_HSTS_SECONDS", 365 * 24 * 3600 if PRODUCTION else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("RL_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("RL_HSTS_PRELOAD", True)
# The TLS-terminating proxy says the original scheme; trusted only when a proxy is declared.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if RL_PROXY_COUNT > 0 else None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "WARNING")},
    "loggers": {"pgserver": {"level": "WARNING"}},
}
