"""``python -m simulator --port 58080 --latency-ms 0 --error-rate 429=0.2 --rpm 6000``."""

import sys

from pipeline.errors import ConfigError
from simulator import config_from_args, run


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(config)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
