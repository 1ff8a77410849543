#!/usr/bin/env python
"""Django's command-line utility. `python manage.py up` starts the whole stack."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    from config.migrate import SKIP, ensure_migrated

    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and sys.argv[1] not in SKIP:
        import django

        django.setup()
        ensure_migrated()
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
