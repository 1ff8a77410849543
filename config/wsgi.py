import gc
import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

# Import every view now, then take what startup built out of the cyclic collector's sight. A full
# collection walked ~130k startup objects in ~90 ms, stalling every thread of the worker; it
# showed up in the labeling p99 (docs/BENCHMARKS.md). Frozen objects are never collected again.
get_resolver().url_patterns  # noqa: B018
gc.freeze()
