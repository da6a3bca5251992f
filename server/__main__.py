"""Command line: `seqserve-server --model-dir models` (see --help)."""

import logging
import os
import signal
import sys
import threading

from .config import Config, SettingError
from .logs import configure

# TensorFlow reads this when first imported, which happens with the app below.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from .app import App


def main(argv: list[str] | None = None) -> int:
    try:
        config = Config.from_args(argv)
    except ValueError as error:
        print(f"seqserve-server: {error}", file=sys.stderr)
        return 2
    configure(config.log_level, config.log_format)
    try:
        app = App(config)
    except SettingError as error:
        print(f"seqserve-server: {error}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as error:
        logging.getLogger("seqserve.server").error("%s", error)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    return 0 if app.stop(drain_s=config.drain_s) else 1


if __name__ == "__main__":
    sys.exit(main())
